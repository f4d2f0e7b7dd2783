"""Where a train step's CPU time goes (``arnn-plugins bench --profile``).

One ``torch.profiler`` pass over one train step (forward, backward,
optimiser step) of timm ResNet18+CBAM and of the same model with CBAM's
spatial branch replaced by AttentionRNN, after a warm-up step, with a fixed
thread count (of three profiled steps, the one with the least total time:
on a shared machine the others carry other processes' load). Printed: each model's self CPU total, and the operators by
self CPU time side by side, so that a change to the scan or to what surrounds
it is measured the same way each time. Self CPU is the time spent in an
operator minus its children: the totals add up to the step.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["profile_step", "profile_models", "format_profile", "run_profile"]


@contextlib.contextmanager
def _threads(n: Optional[int]):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def profile_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, warmup: int = 1,
                 steps: int = 3) -> Dict[str, Tuple[int, float]]:
    """Self CPU ms and call count per operator over one SGD train step.

    Args:
        model: a classifier, ``(B, 3, H, W) -> (B, classes)``; put in train mode.
        x: ``(B, 3, H, W)`` input; y: ``(B,)`` class indices.
        warmup: train steps run before the profiled ones (first-use costs,
            kernel builds, allocator growth).
        steps: steps profiled one by one; the one with the smallest total
            is returned, the one other processes on the machine disturbed
            least.

    Returns:
        ``{name: (calls, self_cpu_ms)}`` for every operator and autograd
        node seen; ``"total"`` maps to ``(0, sum of self CPU ms)``.
    """
    from torch.profiler import ProfilerActivity, profile

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(warmup):
        step()
    best = None
    for _ in range(max(1, steps)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        out = {e.key: (e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()}
        out["total"] = (0, sum(ms for _, ms in out.values()))
        if best is None or out["total"][1] < best["total"][1]:
            best = out
    return best


def _models(backend: str) -> Dict[str, torch.nn.Module]:
    from .bench import resnet18_models

    models = resnet18_models(backend)
    return {name: models[name] for name in ("resnet18+cbam", "resnet18+cbam+arnn")}


def profile_models(batch: int = 16, size: int = 128, threads: Optional[int] = 2, backend: str = "auto",
                   progress: Optional[Callable[[str], None]] = None) -> Dict[str, Dict[str, Tuple[int, float]]]:
    """:func:`profile_step` of timm ResNet18+CBAM and ResNet18+CBAM+ARNN on CPU.

    Input ``(batch, 3, size, size)``, 100 classes, ``threads`` torch threads
    (``None``: torch's setting). Returns ``{model name: profile_step result}``.
    """
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 100, (batch,))
    res = {}
    with _threads(threads):
        for name, model in _models(backend).items():
            if progress:
                progress(f"profile {name}")
            res[name] = profile_step(model, x, y)
    return res


def format_profile(res: Dict[str, Dict[str, Tuple[int, float]]], top: int = 25, title: str = "") -> str:
    """Markdown: self CPU totals per model, then the ``top`` operators by the last model's self CPU."""
    names = list(res)
    last = res[names[-1]]
    lines = [f"**{title}**" if title else "", "", "| model | self CPU total ms |", "|---|---:|"]
    lines += [f"| {n} | {res[n]['total'][1]:.1f} |" for n in names]
    if len(names) > 1:
        diff = res[names[-1]]["total"][1] - res[names[0]]["total"][1]
        lines.append(f"| difference | {diff:+.1f} |")
    lines += ["", "| operator | " + " | ".join(f"{n} calls | {n} self ms" for n in names) + " | difference ms |",
              "|---|" + "---:|---:|" * len(names) + "---:|"]
    ops = sorted((k for k in last if k != "total"), key=lambda k: -last[k][1])[:top]
    for op in ops:
        cells = []
        for n in names:
            calls, ms = res[n].get(op, (0, 0.0))
            cells += [str(calls), f"{ms:.1f}"]
        diff = last[op][1] - res[names[0]].get(op, (0, 0.0))[1]
        lines.append(f"| {op} | " + " | ".join(cells) + f" | {diff:+.1f} |")
    return "\n".join(lines).lstrip("\n")


def run_profile(batch: int = 16, size: int = 128, threads: Optional[int] = 2, backend: str = "auto",
                top: int = 25, progress: Optional[Callable[[str], None]] = None) -> str:
    """:func:`profile_models` formatted by :func:`format_profile`."""
    res = profile_models(batch, size, threads, backend, progress)
    nthreads = threads or torch.get_num_threads()
    title = (f"torch.profiler, one timm ResNet18 train step, batch {batch}, {size}x{size}, cpu, "
             f"{nthreads} threads, backend {backend}")
    return format_profile(res, top, title)
