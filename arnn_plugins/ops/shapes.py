"""The scan's boundary check: what every backend and operator may assume of its inputs.

The kernels trust their shapes (the C and Triton code index raw buffers by
``B, D, t, H, W``), so everything that reaches one passes through
:func:`check_scan` first, whatever the caller is: the layer,
:func:`~arnn_plugins.ops.diagonal_lstm`, or an operator called directly.
"""

from __future__ import annotations

import torch

__all__ = ["check_projection", "check_scan"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _floating_tensors(name: str, tensors) -> bool:
    """Raise ``TypeError`` unless each ``(what, t)`` is a floating point tensor; ``False`` in an FX trace."""
    for what, t in tensors:
        if isinstance(t, torch.fx.Proxy):
            return False  # an FX trace: nothing is known until it runs
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected {what} a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name}: expected a floating point {what}, got dtype {t.dtype}")
    return True


def check_scan(gx, weight_hh, name: str = "diagonal_lstm") -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``gx`` ``(B, D, 4t, H, W)`` fits ``weight_hh`` ``(D, 4t, t, 2)``.

    Both must be non-empty floating point tensors on one device; any strides.
    """
    if not _floating_tensors(name, (("gx", gx), ("weight_hh", weight_hh))):
        return
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


def check_projection(x, weight, bias, weight_hh, name: str = "projected_lstm") -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless the shapes fit together.

    ``x`` ``(B, H, W, Cin)``, ``weight`` ``(2, 4t, Cin)``, ``bias`` ``(2, 4t)``,
    ``weight_hh`` ``(2, 4t, t, 2)``: non-empty floating point tensors on one
    device, any strides.
    """
    tensors = (("x", x), ("weight", weight), ("bias", bias), ("weight_hh", weight_hh))
    if not _floating_tensors(name, tensors):
        return
    if x.dim() != 4 or 0 in x.shape:
        raise ValueError(f"{name}: expected a non-empty x of shape (B, H, W, Cin), got shape {tuple(x.shape)}")
    if weight.dim() != 3 or weight.shape[0] != 2 or weight.shape[1] % 4 or weight.shape[1] == 0 \
            or weight.shape[2] != x.shape[3]:
        raise ValueError(f"{name}: expected weight of shape (2, 4t, {x.shape[3]}) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    g4 = weight.shape[1]
    for what, t, want in (("bias", bias, (2, g4)), ("weight_hh", weight_hh, (2, g4, g4 // 4, 2))):
        if tuple(t.shape) != want:
            raise ValueError(f"{name}: expected {what} of shape {want} for weight of shape {tuple(weight.shape)}, "
                             f"got {tuple(t.shape)}")
    for what, t in tensors[1:]:
        if t.device != x.device:
            raise ValueError(f"{name}: x is on {x.device} but {what} on {t.device}; put all on one device")
