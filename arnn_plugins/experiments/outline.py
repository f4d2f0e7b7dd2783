"""A small structured-mask task where the raster-scan past is the whole story (``arnn-plugins demo --outline``).

Images hold the outlines of a few rectangles in noise; the target mask is
their filled interiors. A pixel's label cannot be read off its neighbourhood
(inside and outside look the same away from the edges), but it follows from
the raster-scan past: a scan-line fill along the row. AttentionRNN sees that
past; a local 3x3 attention does not.
"""

from __future__ import annotations

import time
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..arnn import AttentionRNN
from ..checks import check_choice
from .pictures import mask_grid_png

__all__ = ["outline_task", "MaskNet", "train_mask_model", "run_outline_demo"]


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


def train_mask_model(
    kind: str, data, seconds: float = 30.0, max_steps: int = 2000, batch: int = 16, seed: int = 0, progress=None
) -> Tuple[MaskNet, Dict[str, float]]:
    """Train a :class:`MaskNet` on ``data = (x_train, y_train, x_test, y_test)`` for a time budget."""
    torch.manual_seed(seed)
    model = MaskNet(kind)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
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
        "bce": F.binary_cross_entropy_with_logits(logits, yte).item(),
        "steps": steps,
        "ms_per_step": 1e3 * elapsed / max(steps, 1),
    }


def run_outline_demo(out: str = "arnn_demo.png", seconds: float = 30.0, size: int = 24, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Train local attention and ARNN on the outline task; print a table, write the PNG."""
    from tqdm import tqdm

    xtr, ytr = outline_task(512, size, seed)
    xte, yte = outline_task(64, size, seed + 1)
    results, probs = {}, {}
    for kind in ("local", "arnn"):
        with tqdm(total=int(seconds), desc=f"train {kind}", unit="s") as bar:
            def progress(_k, step, loss, el):
                bar.n = min(int(el), bar.total)
                bar.set_postfix(step=step, loss=f"{loss:.3f}")
                bar.refresh()

            model, res = train_mask_model(kind, (xtr, ytr, xte, yte), seconds=seconds, seed=seed, progress=progress)
        results[kind] = res
        with torch.no_grad():
            probs[kind] = torch.sigmoid(model(xte[:6]))
    print(f"{'attention':<10} {'IoU':>6} {'pixel acc':>10} {'steps':>6} {'ms/step':>8}")
    for kind, r in results.items():
        print(f"{kind:<10} {r['iou']:>6.3f} {r['pixel_acc']:>10.3f} {r['steps']:>6d} {r['ms_per_step']:>8.1f}")
    mask_grid_png(out, xte[:6], {"target": yte[:6], "local 3x3": probs["local"], "ARNN": probs["arnn"]})
    print(f"masks written to {out}")
    return results
