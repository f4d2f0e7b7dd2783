"""Skewing of feature maps (paper Fig. 3), vectorised.

Row ``i`` of a ``(..., H, W)`` map is shifted right by ``i``; the result has
width ``W + H - 1`` and column ``k`` of it holds the anti-diagonal
``i + j = k`` of the image. Both directions are a pad, a flat view with a
different row stride and a crop: no per-row Python loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["skew", "unskew", "skew_mask"]


def skew(x: torch.Tensor) -> torch.Tensor:
    """Shift row ``i`` right by ``i``.

    Args:
        x: ``(..., H, W)``.

    Returns:
        ``(..., H, W + H - 1)`` with ``out[..., i, i + j] = x[..., i, j]`` and
        zeros elsewhere.
    """
    *lead, h, w = x.shape
    # Padded rows have length W + H; re-reading the flat buffer with row
    # length W + H - 1 starts row i exactly i places earlier, i.e. shifts it
    # right by i (the places it borrows are the zero padding of row i - 1).
    flat = F.pad(x, (0, h)).reshape(*lead, h * (w + h))
    return flat[..., : h * (w + h - 1)].reshape(*lead, h, w + h - 1)


def unskew(s: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`skew`.

    Args:
        s: ``(..., H, W + H - 1)`` skewed map.
        width: the original width ``W``.

    Returns:
        ``(..., H, W)`` with ``out[..., i, j] = s[..., i, i + j]``.
    """
    *lead, h, ws = s.shape
    if ws != width + h - 1:
        raise ValueError(f"unskew: expected width {width + h - 1} for H={h}, W={width}, got {ws}")
    # Row length W + H - 1 read back with stride W + H puts s[i, i + j] at
    # column j of row i.
    flat = F.pad(s.reshape(*lead, h * ws), (0, h))
    return flat.reshape(*lead, h, ws + 1)[..., :width]


def skew_mask(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(H, W + H - 1)`` map that is 1 on cells holding image pixels, 0 on padding."""
    return skew(torch.ones(h, w, device=device, dtype=dtype))
