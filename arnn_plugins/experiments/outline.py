"""A small structured-mask task where the raster-scan past is the whole story (``arnn-plugins demo --outline``).

Images hold the outlines of a few rectangles in noise; the target mask is
their filled interiors. A pixel's label cannot be read off its neighbourhood
(inside and outside look the same away from the edges), but it follows from
the raster-scan past: a scan-line fill along the row. AttentionRNN sees that
past; a local 3x3 attention does not.
"""

from __future__ import annotations

import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..arnn import AttentionRNN
from ..checks import check_choice
from .pictures import mask_grid_png

__all__ = ["outline_task", "outline_data", "outline_run", "MaskNet", "train_mask_model", "run_outline_demo",
           "format_outline_table", "OUTLINE_KINDS"]


def outline_task(n: int, size: int = 24, seed: int = 0, noise: float = 0.3) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rectangle outlines in noise and their filled interiors.

    Returns:
        images ``(n, 1, size, size)`` float, targets ``(n, 1, size, size)`` in {0, 1}.
    """
    rng = np.random.default_rng(seed)
    img = rng.normal(0.0, noise, (n, size, size)).astype(np.float32)
    tgt = np.zeros((n, size, size), np.float32)
    for k in range(n):
        taken = np.zeros((size, size), bool)
        for _ in range(rng.integers(1, 3)):
            h, w = rng.integers(5, size // 2 + 2, 2)
            i, j = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            if taken[max(i - 1, 0) : i + h + 1, max(j - 1, 0) : j + w + 1].any():
                continue
            taken[i : i + h, j : j + w] = True
            img[k, i : i + h, [j, j + w - 1]] += 1.0
            img[k, [i, i + h - 1], j : j + w] += 1.0
            tgt[k, i + 1 : i + h - 1, j + 1 : j + w - 1] = 1.0
    return torch.from_numpy(img)[:, None], torch.from_numpy(tgt)[:, None]


class MaskNet(nn.Module):
    """Two 3x3 convs then an attention layer giving mask logits.

    Args:
        kind: ``"local"`` (3x3 conv, the usual local attention) or ``"arnn"``.

    Shape: ``(B, 1, H, W)`` -> logits ``(B, 1, H, W)``.
    """

    def __init__(self, kind: str = "arnn", width: int = 16, backend: str = "auto") -> None:
        super().__init__()
        check_choice("MaskNet", "kind", kind, ("local", "arnn"))
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()
        )
        if kind == "local":
            self.attn = nn.Conv2d(width, 1, 3, padding=1)
        else:
            self.attn = AttentionRNN(width, hidden_channels=16, context_kernel=3, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` -> mask logits ``(B, 1, H, W)``."""
        return self.attn(self.features(x))


def _iou(logits: torch.Tensor, target: torch.Tensor) -> float:
    pred = logits > 0
    tgt = target > 0.5
    return ((pred & tgt).sum() / (pred | tgt).sum().clamp(min=1)).item()


def _correctness(logits: torch.Tensor, target: torch.Tensor) -> float:
    # The PAN metric on this task: the share of the mask's mass (sigmoid) inside the target, per image.
    m = torch.sigmoid(logits).flatten(1)
    t = (target > 0.5).flatten(1).float()
    return ((m * t).sum(1) / m.sum(1).clamp_min(1e-12)).mean().item()


def train_mask_model(
    kind: str, data, seconds: float = float("inf"), max_steps: int = 600, batch: int = 16, seed: int = 0,
    progress=None, lr: float = 3e-3,
) -> Tuple[MaskNet, Dict[str, float]]:
    """Train a :class:`MaskNet` on ``data = (x_train, y_train, x_test, y_test)``.

    Trains ``max_steps`` Adam steps of ``batch`` items; ``seconds`` can cap
    the time as well (then the step count, and the result, depend on the
    machine's speed). ``seed`` fixes the initialisation and the batches.
    Returns the model and its test ``iou``, ``pixel_acc``, ``correctness``
    (share of the sigmoid mask's mass inside the target), ``bce``,
    ``steps`` and ``ms_per_step``.
    """
    torch.manual_seed(seed)
    model = MaskNet(kind)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xtr, ytr, xte, yte = data
    g = torch.Generator().manual_seed(seed)
    t0, steps = time.perf_counter(), 0
    while steps < max_steps and time.perf_counter() - t0 < seconds:
        idx = torch.randint(0, len(xtr), (batch,), generator=g)
        loss = F.binary_cross_entropy_with_logits(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        if progress is not None:
            progress(kind, steps, loss.item(), time.perf_counter() - t0)
    elapsed = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        logits = model(xte)
    return model, {
        "iou": _iou(logits, yte),
        "pixel_acc": ((logits > 0) == (yte > 0.5)).float().mean().item(),
        "correctness": _correctness(logits, yte),
        "uniform_correctness": (yte > 0.5).float().mean().item(),
        "bce": F.binary_cross_entropy_with_logits(logits, yte).item(),
        "steps": steps,
        "ms_per_step": 1e3 * elapsed / max(steps, 1),
    }


OUTLINE_KINDS = ("local", "arnn")


def outline_data(size: int = 24, n_train: int = 512, n_test: int = 64, data_seed: int = 0):
    """``(x_train, y_train, x_test, y_test)`` of :func:`outline_task` (test drawn from ``data_seed + 1``)."""
    xtr, ytr = outline_task(n_train, size, data_seed)
    xte, yte = outline_task(n_test, size, data_seed + 1)
    return xtr, ytr, xte, yte


def outline_run(kind: str, seed: int, steps: int = 600, size: int = 24, threads: Optional[int] = None,
                keep: int = 6) -> Dict[str, object]:
    """One run of the outline task: metrics, and the first ``keep`` test masks (sigmoid) with their inputs."""
    if threads is not None:
        torch.set_num_threads(threads)
    data = outline_data(size)
    model, res = train_mask_model(kind, data, max_steps=steps, seed=seed)
    with torch.no_grad():
        probs = torch.sigmoid(model(data[2][:keep]))
    return {"metrics": res, "probs": probs, "images": data[2][:keep], "targets": data[3][:keep]}


def run_outline_demo(out: str = "arnn_demo.png", seconds: float = float("inf"), size: int = 24, seed: int = 0,
                     steps: int = 600, seeds: Sequence[int] = (0,)) -> Dict[str, Dict[str, float]]:
    """Train local attention and ARNN on the outline task for each seed; print a table, write the PNG.

    ``steps`` per model (``seconds`` can cap the time, which makes the
    figures machine-dependent); ``seed`` is the data's. Returns per kind the
    metrics of the last seed with ``per_seed`` (all seeds' metrics).
    """
    from tqdm import tqdm

    data = outline_data(size, data_seed=seed)
    results, probs = {}, {}
    for kind in OUTLINE_KINDS:
        per_seed = {}
        for s in seeds:
            with tqdm(total=steps, desc=f"train {kind} seed {s}", unit="step") as bar:
                def progress(_k, step, loss, el):
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

                model, res = train_mask_model(kind, data, seconds=seconds, max_steps=steps, seed=s,
                                              progress=progress)
            per_seed[s] = res
            if s == seeds[0]:
                with torch.no_grad():
                    probs[kind] = torch.sigmoid(model(data[2][:6]))
        results[kind] = dict(res, per_seed=per_seed)
    print(format_outline_table(results, seeds))
    mask_grid_png(out, data[2][:6], {"target": data[3][:6], "local 3x3": probs["local"], "ARNN": probs["arnn"]})
    print(f"masks written to {out}")
    return results


def format_outline_table(results: Dict[str, Dict], seeds: Sequence[int]) -> str:
    """Mean ± sample std over ``seeds`` of each kind's IoU, correctness, pixel accuracy and time per step."""
    import statistics

    def pm(vals, digits=3):
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.fmean(vals):.{digits}f} ± {sd:.{digits}f}"

    lines = [f"{'attention':<10} {'IoU':>15} {'mask corr.':>15} {'pixel acc':>15} {'steps':>6} {'ms/step':>12}"]
    for kind, r in results.items():
        per = [r["per_seed"][s] for s in seeds]
        lines.append(f"{kind:<10} {pm([p['iou'] for p in per]):>15} {pm([p['correctness'] for p in per]):>15} "
                     f"{pm([p['pixel_acc'] for p in per]):>15} {per[0]['steps']:>6d} "
                     f"{pm([p['ms_per_step'] for p in per], 1):>12}")
    first = next(iter(results.values()))["per_seed"][seeds[0]]
    lines.append(f"{'uniform':<10} {'-':>15} {first['uniform_correctness']:>15.3f}   (a mask equal everywhere)")
    return "\n".join(lines)
