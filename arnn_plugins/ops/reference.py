"""``backend="reference"``: the diagonal LSTM scan in plain PyTorch.

The recurrence of :mod:`arnn_plugins.ops`, written as directly as possible:
skew the gate inputs, walk the ``W + H - 1`` skewed columns, let autograd
differentiate every step, unskew. Slow, but it is the definition the other
backends are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .skew import skew, skew_mask, unskew

__all__ = ["reference_scan"]


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
