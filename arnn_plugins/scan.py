"""The diagonal LSTM scan: the one function boundary behind which backends live.

Every backend computes the same thing (paper eq. 8), per direction, for each
image cell ``(i, j)`` with upper neighbour ``u = (i - 1, j)`` and left
neighbour ``l = (i, j - 1)``::

    [o, f, i, g] = gx(i, j) + K_h[..., 0] @ h(u) + K_h[..., 1] @ h(l)
    c(i, j)      = sigmoid(f) * c(l) + sigmoid(i) * tanh(g)
    h(i, j)      = sigmoid(o) * tanh(c(i, j))

In the skewed frame both neighbours sit in the previous column (rows
``i - 1`` and ``i``), which is what makes a column-by-column scan possible;
the memory cell is carried along the row, as in the Diagonal BiLSTM. States
outside the image (the skew's padding cells) are zero, so the scan is exactly
this recurrence over image cells with zero boundary states, and ``h(i, j)``
depends on the inputs of the quadrant ``i' <= i, j' <= j`` and nothing else.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

from .skew import skew, skew_mask, unskew

__all__ = ["BACKENDS", "diagonal_lstm", "available_backends", "resolve_backend", "register_backend"]

BACKENDS = ("auto", "reference", "fused", "triton")

ScanFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_IMPLS: Dict[str, ScanFn] = {}


def register_backend(name: str, fn: ScanFn) -> None:
    """Make ``fn(gx, weight_hh) -> h`` available as ``backend=name``."""
    _IMPLS[name] = fn


def available_backends() -> list:
    """Names of the backends that can run here (``"auto"`` not included)."""
    return sorted(_IMPLS)


def resolve_backend(backend: str, device: torch.device, hidden: int = 16, height: int = 32) -> str:
    """Turn ``"auto"`` into a concrete backend for ``device`` and the scan's size."""
    if backend != "auto":
        return backend
    # The Triton kernel keeps a whole (H, t) state tile in registers; past
    # these sizes it spills and the fused path is the safer choice.
    if device.type == "cuda" and "triton" in _IMPLS and hidden <= 32 and height <= 64:
        return "triton"
    if "fused" in _IMPLS:
        return "fused"
    return "reference"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The recurrence accumulates over W + H - 1 steps: never run it in half
    # precision, whatever the surrounding autocast region asks for.
    return torch.float64 if dtype == torch.float64 else torch.float32


def diagonal_lstm(gx: torch.Tensor, weight_hh: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Run ``D`` independent diagonal LSTMs over image-shaped gate inputs.

    Args:
        gx: ``(B, D, 4t, H, W)`` input part of the gate pre-activations, gate
            order ``[o, f, i, g]``, each direction already in its own scan
            frame (top-left to bottom-right).
        weight_hh: ``(D, 4t, t, 2)`` the 2x1 recurrent kernel ``K_h``;
            ``[..., 0]`` acts on the upper neighbour, ``[..., 1]`` on the left.
        backend: one of :data:`BACKENDS`.

    Returns:
        ``(B, D, t, H, W)`` hidden states, in ``gx``'s dtype.
    """
    name = resolve_backend(backend, gx.device, gx.shape[2] // 4, gx.shape[3])
    if name not in _IMPLS:
        raise ValueError(
            f"AttentionRNN: backend {backend!r} is not available here; "
            f"available: {['auto'] + available_backends()}"
        )
    out_dtype = gx.dtype
    cdtype = _compute_dtype(out_dtype)
    with torch.autocast(device_type=gx.device.type, enabled=False):
        h = _IMPLS[name](gx.to(cdtype), weight_hh.to(cdtype))
    return h.to(out_dtype)


def reference_scan(gx: torch.Tensor, weight_hh: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch scan over skewed columns, differentiated by autograd.

    Shapes as in :func:`diagonal_lstm`. Written for clarity, not speed.
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


register_backend("reference", reference_scan)
