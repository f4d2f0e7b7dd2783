"""The scan's boundary check: what every backend and operator may assume of its inputs.

The kernels trust their shapes (the C and Triton code index raw buffers by
``B, D, t, H, W``), so everything that reaches one passes through
:func:`check_scan` first, whatever the caller is: the layer,
:func:`~arnn_plugins.ops.diagonal_lstm`, or an operator called directly.
"""

from __future__ import annotations

import torch

__all__ = ["check_scan"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_scan(gx, weight_hh, name: str = "diagonal_lstm") -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``gx`` ``(B, D, 4t, H, W)`` fits ``weight_hh`` ``(D, 4t, t, 2)``.

    Both must be non-empty floating point tensors on one device; any strides.
    """
    for what, t in (("gx", gx), ("weight_hh", weight_hh)):
        if isinstance(t, torch.fx.Proxy):
            return  # an FX trace: nothing is known until it runs
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected {what} a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name}: expected a floating point {what}, got dtype {t.dtype}")
    if gx.dim() != 5 or gx.shape[2] % 4 or 0 in gx.shape:
        raise ValueError(f"{name}: expected a non-empty gx of shape (B, D, 4t, H, W) (gate count a multiple of "
                         f"4), got shape {tuple(gx.shape)}")
    b, d, g4, h, w = gx.shape
    want = (d, g4, g4 // 4, 2)
    if tuple(weight_hh.shape) != want:
        raise ValueError(f"{name}: expected weight_hh of shape {want} (D, 4t, t, 2) for gx of shape "
                         f"{tuple(gx.shape)}, got {tuple(weight_hh.shape)}")
    if gx.device != weight_hh.device:
        raise ValueError(f"{name}: gx is on {gx.device} but weight_hh on {weight_hh.device}; put both on one device")
