"""Geometry of the multi-digit layouts: ink boxes, resampling weights, free positions."""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["ink_boxes", "resize_matrix", "free_positions"]


def ink_boxes(images: np.ndarray) -> np.ndarray:
    """``(N, 4)`` ink bounding boxes ``(y0, y1, x0, x1)`` of ``(N, h, w)`` digits."""
    rows, cols = images.any(axis=2), images.any(axis=1)
    h, w = images.shape[1:]
    empty = ~rows.any(axis=1)
    y0 = rows.argmax(axis=1)
    y1 = h - rows[:, ::-1].argmax(axis=1)
    x0 = cols.argmax(axis=1)
    x1 = w - cols[:, ::-1].argmax(axis=1)
    box = np.stack([y0, y1, x0, x1], axis=1)
    box[empty] = (0, h, 0, w)  # a blank image keeps its frame
    return box


@functools.lru_cache(maxsize=4096)
def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` antialiased bilinear (triangle filter) resampling
    weights, as PIL's BILINEAR; a 2-D resize is ``R_y @ img @ R_x.T``."""
    scale = n_in / n_out
    support = max(scale, 1.0)  # widen the filter when shrinking (antialias)
    centres = (np.arange(n_out) + 0.5) * scale
    x = np.arange(n_in) + 0.5
    w = np.clip(1.0 - np.abs(x[None, :] - centres[:, None]) / support, 0.0, None)
    w /= w.sum(axis=1, keepdims=True)
    w = w.astype(np.float32)
    w.setflags(write=False)
    return w


def free_positions(size: int, placed, bh: int, bw: int) -> np.ndarray:
    """Flat indices (row-major over ``(size - bh + 1, size - bw + 1)``) of the
    top-left corners where a ``bh x bw`` box overlaps none of ``placed``
    (boxes ``(y0, x0, y1, x1)``)."""
    ok = np.ones((size - bh + 1, size - bw + 1), dtype=bool)
    for y0, x0, y1, x1 in placed:
        # A box at (y, x) overlaps iff y0 - bh < y < y1 and x0 - bw < x < x1.
        ok[max(0, y0 - bh + 1):y1, max(0, x0 - bw + 1):x1] = False
    return np.flatnonzero(ok)
