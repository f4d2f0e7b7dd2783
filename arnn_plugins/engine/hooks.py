"""Hooks: a progress bar with ETA and the time per training step."""

from __future__ import annotations

import statistics
import time
from typing import List

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

__all__ = ["ProgressBarHook"]


@HOOKS.register_module()
class ProgressBarHook(Hook):
    """A tqdm bar over the training iterations (with ETA), and the time per step.

    Args:
        desc: the bar's label.
        enabled: draw the bar (on rank 0 only); step times are recorded either way.

    After training, :attr:`step_times` holds the seconds of every iteration
    (data loading included) and :meth:`seconds_per_step` their median,
    leaving out the first (warm-up) step.
    """

    priority = "BELOW_NORMAL"

    def __init__(self, desc: str = "train", enabled: bool = True) -> None:
        self.desc, self.enabled = desc, enabled
        self.step_times: List[float] = []
        self._bar = None
        self._t = None

    def before_train(self, runner) -> None:
        # One bar per run: in a distributed run the other ranks' bars would
        # interleave with rank 0's (they all step together).
        if self.enabled and runner.rank == 0:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=runner.max_iters, initial=runner.iter, desc=self.desc, unit="it",
                             dynamic_ncols=True, leave=True)
        self._t = time.perf_counter()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self._t)
        self._t = now
        if self._bar is not None:
            self._bar.update(1)
            if outputs and "loss" in outputs:
                loss = outputs["loss"]
                loss = loss.detach() if isinstance(loss, torch.Tensor) else loss
                self._bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)

    def after_train(self, runner) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def seconds_per_step(self) -> float:
        """Median seconds per training iteration (first one left out when there are more)."""
        times = self.step_times[1:] if len(self.step_times) > 1 else self.step_times
        return statistics.median(times) if times else float("nan")
