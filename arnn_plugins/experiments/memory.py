"""Memory of a forward and its backward: what autograd holds, and the peak while the backward runs."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Callable, List, Optional, Tuple

import torch

__all__ = ["memory_mb"]


@contextlib.contextmanager
def _quiet_fd2():
    """Silence file descriptor 2 (the profiler library logs there from C++)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_MARK = "arnn_plugins.experiments.memory.backward"


def _cpu_allocations(fn: Callable[[], None]) -> Tuple[List[tuple], Optional[int]]:
    """CPU allocator events during ``fn()`` and the start time of the backward mark.

    Events are ``(time_ns, bytes, total_allocated)`` in order; the mark is
    where ``fn`` entered ``record_function(_MARK)`` (``None`` if it did not).
    ``total_allocated`` is the allocator's running total over the memory
    allocated while profiling, so its level minus the level before the
    first event is what ``fn`` holds at that moment.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings(), _quiet_fd2():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    found, mark = [], None
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.name == _MARK:
            mark = node.start_time_ns if mark is None else min(mark, node.start_time_ns)
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            found.append((node.start_time_ns, node.typed[1].alloc_size, node.typed[1].total_allocated))
    return sorted(found), mark


def memory_mb(forward: Callable[[], torch.Tensor], device: torch.device) -> Tuple[float, float]:
    """``(held, peak)`` in MB for ``out = forward()`` then ``out.sum().backward()``.

    ``held``: what is still allocated when the forward has returned (the
    activations kept for backward, plus the output); ``peak``: the highest
    allocation during the backward (gradients included). Both count from the
    level before the forward, so ``peak / held`` is how much the backward
    needs over what the forward kept. CUDA: the caching allocator's counters;
    CPU: the profiler's allocation events.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        loss = forward().float().sum()
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device) - base
        torch.cuda.reset_peak_memory_stats(device)
        loss.backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        return held / 2**20, max(peak, held) / 2**20

    from torch.profiler import record_function

    def run():
        loss = forward().float().sum()
        with record_function(_MARK):
            loss.backward()

    events, mark = _cpu_allocations(run)
    if not events or mark is None:
        return 0.0, 0.0
    base = events[0][2] - events[0][1]
    before = [tot for ts, _, tot in events if ts < mark]
    after = [tot for ts, _, tot in events if ts >= mark]
    held = (before[-1] if before else base) - base
    peak = max(after, default=held + base) - base
    return held / 2**20, max(peak, held) / 2**20
