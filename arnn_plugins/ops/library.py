"""The scan as PyTorch operators (``torch.ops.arnn_plugins.*``), for compiled and exported models.

In eager mode the backends run as ``autograd.Function`` s, which may spend
saved buffers in the backward (the C kernel writes the input gradient over
its saved activations). Graph capture (``torch.compile``, ``torch.export``,
``torch.jit.trace``, ONNX) needs operators instead: opaque to the tracer,
with a fake (meta) implementation giving output shapes, dtypes and strides,
and a registered backward. One forward and one backward operator per
implementation:

=========================  ===================================================
``scan_cpu[_backward]``    the C kernel (:mod:`.cpu_kernel`), CPU
``scan_torch[_backward]``  the anti-diagonal PyTorch scan (:mod:`.fused`), any
                           device: CPU without a compiler, CUDA fallback
``scan_triton[_backward]`` the Triton kernels (:mod:`.triton_scan`), CUDA
=========================  ===================================================

Each forward returns the hidden states first, then what its backward needs
(the autograd formula saves them; they carry no gradient). The backward
operators allocate fresh gradients, so a compiled backward never aliases or
mutates saved tensors. For export to runtimes that do not know these
operators (ONNX), :data:`arnn_plugins.ops.EXPORT_DECOMPOSITIONS` replaces each
forward by the reference scan written in core ATen operators.
"""

from typing import Tuple

import torch
from torch import Tensor

from . import cpu_kernel, fused, triton_scan
from .shapes import check_scan

__all__ = [
    "scan_cpu",
    "scan_cpu_backward",
    "scan_torch",
    "scan_torch_backward",
    "scan_triton",
    "scan_triton_backward",
]


def _check_kernel_inputs(op: str, gx: Tensor, weight_hh: Tensor, dtypes) -> None:
    # The kernels index raw buffers by these sizes: refuse anything else before they read.
    check_scan(gx, weight_hh, op)
    if gx.dtype not in dtypes or weight_hh.dtype != gx.dtype:
        raise TypeError(f"{op}: expected gx and weight_hh of one dtype among {dtypes}, got {gx.dtype} and "
                        f"{weight_hh.dtype}")


def _check_cpu_saved(grad_h: Tensor, weight_hh: Tensor, hid: Tensor, cells: Tensor, acts: Tensor) -> None:
    # The C backward reads cells and acts as dense (D * B, H, W, .) buffers and
    # the rest by their strides: anything but what its forward made is refused.
    op = "scan_cpu_backward"
    if hid.dim() != 5:
        raise ValueError(f"{op}: expected hid of shape (B, D, t, H, W), got {tuple(hid.shape)}")
    b, d, t, h, w = hid.shape
    want = {"grad_h": (grad_h, (b, d, t, h, w)), "weight_hh": (weight_hh, (d, 4 * t, t, 2)),
            "cells": (cells, (d * b, h, w, t)), "acts": (acts, (d * b, h, w, 4 * t))}
    for what, (x, shape) in want.items():
        if tuple(x.shape) != shape or x.dtype != hid.dtype or x.device != hid.device:
            raise ValueError(f"{op}: expected {what} of shape {shape} ({hid.dtype}, {hid.device}) for hid of shape "
                             f"{tuple(hid.shape)}, got {tuple(x.shape)} ({x.dtype}, {x.device})")
    if hid.dtype not in (torch.float32, torch.float64) or not (cells.is_contiguous() and acts.is_contiguous()):
        raise ValueError(f"{op}: expected float32/float64 buffers with dense cells and acts, as scan_cpu returns them")


def _sizes(gx: Tensor):
    b, d, g4, h, w = gx.shape
    return b, d, g4 // 4, h, w


def _features_last(shape_bdhwf, like: Tensor) -> Tensor:
    """An empty ``(B, D, F, H, W)`` tensor stored as ``(B, H, W, D, F)``: the layout the kernels write."""
    b, d, h, w, f = shape_bdhwf
    return like.new_empty(b, h, w, d, f).permute(0, 3, 4, 1, 2)


# -- the C kernel ------------------------------------------------------------------------------


@torch.library.custom_op("arnn_plugins::scan_cpu", mutates_args=(), device_types="cpu")
def scan_cpu(gx: Tensor, weight_hh: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """C kernel forward: ``(B, D, 4t, H, W)``, ``(D, 4t, t, 2)`` -> ``h (B, D, t, H, W)``, cells, activations."""
    _check_kernel_inputs("scan_cpu", gx, weight_hh, (torch.float32, torch.float64))
    return cpu_kernel.scan_forward(gx, weight_hh)


@scan_cpu.register_fake
def _(gx, weight_hh):
    b, d, t, h, w = _sizes(gx)
    return _features_last((b, d, h, w, t), gx), gx.new_empty(d * b, h, w, t), gx.new_empty(d * b, h, w, 4 * t)


@torch.library.custom_op("arnn_plugins::scan_cpu_backward", mutates_args=(), device_types="cpu")
def scan_cpu_backward(grad_h: Tensor, weight_hh: Tensor, hid: Tensor, cells: Tensor,
                      acts: Tensor) -> Tuple[Tensor, Tensor]:
    """C kernel backward: ``(grad_gx (B, D, 4t, H, W), grad_weight_hh (D, 4t, t, 2))``."""
    _check_cpu_saved(grad_h, weight_hh, hid, cells, acts)
    return cpu_kernel.scan_backward(grad_h, weight_hh, hid, cells, acts)


@scan_cpu_backward.register_fake
def _(grad_h, weight_hh, hid, cells, acts):
    b, d, t, h, w = hid.shape
    dgx = acts.new_empty(d, b, h, w, 4 * t).permute(1, 0, 4, 2, 3)
    return dgx, weight_hh.new_empty(d, 2, t, 4 * t).permute(0, 3, 2, 1)


def _register_autograd(forward, backward) -> None:
    """Wire ``backward(grad_h, weight_hh, hid, cells, acts)`` as the gradient of ``forward -> (hid, cells, acts)``."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1], *output)

    def grad(ctx, grad_h, _grad_cells, _grad_acts):
        weight_hh, hid, cells, acts = ctx.saved_tensors
        grad_h = torch.zeros_like(hid) if grad_h is None else grad_h
        return backward(grad_h, weight_hh, hid, cells, acts)

    forward.register_autograd(grad, setup_context=setup_context)


_register_autograd(scan_cpu, scan_cpu_backward)


# -- the PyTorch anti-diagonal scan --------------------------------------------------------------


@torch.library.custom_op("arnn_plugins::scan_torch", mutates_args=())
def scan_torch(gx: Tensor, weight_hh: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Anti-diagonal PyTorch forward: ``h (B, D, t, H, W)``, activations, hidden and cell buffers."""
    check_scan(gx, weight_hh, "scan_torch")
    h, acts, hbuf, cbuf = fused.scan_forward(gx, weight_hh, defined=True)
    return h, acts, hbuf, cbuf


@scan_torch.register_fake
def _(gx, weight_hh):
    b, d, t, h, w = _sizes(gx)
    buf = gx.new_empty(w + h, d, h + 1, b, t)
    return _features_last((b, d, h, w, t), gx), gx.new_empty(d, h * w, b, 4 * t), buf, torch.empty_like(buf)


@torch.library.custom_op("arnn_plugins::scan_torch_backward", mutates_args=())
def scan_torch_backward(grad_h: Tensor, weight_hh: Tensor, acts: Tensor, hbuf: Tensor,
                        cbuf: Tensor) -> Tuple[Tensor, Tensor]:
    """Anti-diagonal PyTorch backward: ``(grad_gx, grad_weight_hh)``."""
    return fused.scan_backward(grad_h, weight_hh, acts, hbuf, cbuf)


@scan_torch_backward.register_fake
def _(grad_h, weight_hh, acts, hbuf, cbuf):
    b, d, t, h, w = grad_h.shape[0], weight_hh.shape[0], grad_h.shape[2], grad_h.shape[3], grad_h.shape[4]
    return _features_last((b, d, h, w, 4 * t), grad_h), torch.empty_like(weight_hh, memory_format=torch.contiguous_format)


def _save_torch(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], *output[1:])
    ctx.hid_shape = output[0].shape


def _grad_torch(ctx, grad_h, *_):
    weight_hh, acts, hbuf, cbuf = ctx.saved_tensors
    grad_h = acts.new_zeros(ctx.hid_shape) if grad_h is None else grad_h
    return scan_torch_backward(grad_h, weight_hh, acts, hbuf, cbuf)


scan_torch.register_autograd(_grad_torch, setup_context=_save_torch)


# -- the Triton kernels --------------------------------------------------------------------------


@torch.library.custom_op("arnn_plugins::scan_triton", mutates_args=())
def scan_triton(gx: Tensor, weight_hh: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Triton forward: ``h``, cells ``(B, D, H, W, t)`` and activations ``(B, D, H, W, 4t)``.

    ``h`` comes as the kernel stores it, ``(B, D, H, W, t)``; the caller
    permutes it to ``(B, D, t, H, W)``.
    """
    return triton_scan.scan_forward(gx, weight_hh)


@scan_triton.register_fake
def _(gx, weight_hh):
    b, d, t, h, w = _sizes(gx)
    return gx.new_empty(b, d, h, w, t), gx.new_empty(b, d, h, w, t), gx.new_empty(b, d, h, w, 4 * t)


@torch.library.custom_op("arnn_plugins::scan_triton_backward", mutates_args=())
def scan_triton_backward(grad_h: Tensor, weight_hh: Tensor, hid: Tensor, cells: Tensor,
                         acts: Tensor) -> Tuple[Tensor, Tensor]:
    """Triton backward; ``grad_h`` ``(B, D, H, W, t)`` as ``h`` was returned."""
    return triton_scan.scan_backward(grad_h.permute(0, 1, 4, 2, 3), hid, cells, acts, weight_hh)


@scan_triton_backward.register_fake
def _(grad_h, weight_hh, hid, cells, acts):
    b, d, h, w, t = hid.shape
    return (acts.new_empty(b, d, h, w, 4 * t).permute(0, 1, 4, 2, 3),
            torch.empty_like(weight_hh, memory_format=torch.contiguous_format))


_register_autograd(scan_triton, scan_triton_backward)
