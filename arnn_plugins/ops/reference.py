"""``backend="reference"``: the diagonal LSTM scan in plain PyTorch, and the skew it walks.

The recurrence of :mod:`arnn_plugins.ops`, written as directly as possible:
skew the gate inputs, walk the ``W + H - 1`` skewed columns, let autograd
differentiate every step, unskew. Slow, but it is the definition the other
backends are tested against.

Skewing (paper Fig. 3): row ``i`` of a ``(..., H, W)`` map is shifted right
by ``i``; the result has width ``W + H - 1`` and column ``k`` of it holds the
anti-diagonal ``i + j = k`` of the image. Both directions are a pad, a flat
view with a different row stride and a crop: no per-row Python loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["reference_scan", "skew", "unskew", "skew_mask"]


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


def reference_scan(gx: torch.Tensor, weight_hh: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch scan over skewed columns, differentiated by autograd.

    Args:
        gx: ``(B, D, 4t, H, W)`` input part of the gate pre-activations, gate
            order ``[o, f, i, g]``.
        weight_hh: ``(D, 4t, t, 2)`` recurrent kernel; ``[..., 0]`` upper
            neighbour, ``[..., 1]`` left neighbour.

    Returns:
        ``(B, D, t, H, W)`` hidden states. Written for clarity, not speed.
    """
    b, d, g4, h, w = gx.shape
    t = g4 // 4
    s = skew(gx)  # (B, D, 4t, H, W + H - 1)
    valid = skew_mask(h, w, device=gx.device, dtype=gx.dtype)  # (H, W + H - 1)
    k_up, k_left = weight_hh[..., 0], weight_hh[..., 1]  # (D, 4t, t)
    hid = gx.new_zeros(b, d, t, h)
    cell = gx.new_zeros(b, d, t, h)
    outs = []
    for k in range(s.shape[-1]):
        h_up = F.pad(hid, (1, 0))[..., :h]  # row i - 1 of the previous column
        gates = (
            s[..., k]
            + torch.einsum("dgt,bdti->bdgi", k_up, h_up)
            + torch.einsum("dgt,bdti->bdgi", k_left, hid)
        )
        o, f, i, g = gates.chunk(4, dim=2)
        cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
        hid = torch.sigmoid(o) * torch.tanh(cell)
        # Padding cells of the skewed map hold no pixel: keep their state at
        # zero so nothing flows through them.
        m = valid[:, k]
        cell = cell * m
        hid = hid * m
        outs.append(hid)
    return unskew(torch.stack(outs, dim=-1), w)
