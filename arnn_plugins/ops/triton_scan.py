"""Triton backend of the diagonal LSTM scan (``backend="triton"``).

One persistent program per ``(batch, direction)`` pair keeps that direction's
recurrent kernel (eight ``t x t`` tiles: four gates, upper and left
neighbour) in registers and walks the ``W + H - 1`` skewed columns in a loop
inside the kernel. The skew is pure address arithmetic on the image-layout
``gx``: at step ``k`` row ``i`` works on image column ``j = k - i`` (a cell
exists when ``0 <= j < W``), so no skewed copy is ever materialised.

The two neighbours of cell ``(i, j)`` live in different places:

* the left one ``(i, j - 1)`` was handled by the same row one step earlier,
  so its ``h`` and ``c`` are still in registers;
* the upper one ``(i - 1, j)`` was handled by row ``i - 1`` one step earlier.
  Rows are spread over threads, so instead of shuffling registers the kernel
  reads it back from the output ``h`` it has just written, after a barrier.
  Every image cell is written exactly once, so this needs no scratch buffer
  and has no write-after-read hazard.

The backward kernel runs the same scan in reverse and uses ``grad_gx`` the
same way (the gradient arriving from the cell below is read back from the
``grad_gx`` it wrote one step earlier). The recurrent weight gradient has no
sequential dependency, so it is a batched matmul after the kernel rather
than eight more small products inside the serial loop.

This module only defines the kernels; :mod:`arnn_plugins.ops` registers
:func:`triton_scan` as ``backend="triton"`` when Triton imports. Kernels run
on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's
interpreter, used by the tests). ``TRITON_INTERPRET`` is read when the kernels
are decorated, i.e. when this module is first imported, which importing
``arnn_plugins`` (or ``arnn_plugins.ops``) does: set it before that.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: without it arnn_plugins.ops does not register the backend.
    triton = None
    tl = None

__all__ = ["HAS_TRITON", "scan_backward", "scan_forward", "triton_scan", "triton_scan_supported"]

HAS_TRITON = triton is not None

# Floor of the padded tile sizes: tl.dot needs K >= 16 on NVIDIA GPUs.
_MIN_BLOCK = 16
# Full fp32 products: TF32 keeps 10 mantissa bits (~1e-3 relative error per
# product), far from the 1e-5 agreement expected between backends.
_PRECISION = "ieee"


if HAS_TRITON:
    from triton.language.extra import libdevice

    @triton.jit
    def _tanh(x, LIBDEVICE: tl.constexpr):
        if LIBDEVICE:
            y = libdevice.tanh(x)
        else:
            # The interpreter has no libdevice. e = exp(-2|x|) <= 1 cannot
            # overflow; the absolute error stays within a few roundoffs.
            e = tl.exp(-2.0 * tl.abs(x))
            y = (1.0 - e) / (1.0 + e)
            y = tl.where(x < 0, -y, y)
        return y

    @triton.jit
    def _load_weights(w_ptr, d, T, feat, TRANSPOSED: tl.constexpr):
        # Eight (BT, BT) tiles of K_h[d]: gates [o, f, i, g] x [upper, left].
        # TRANSPOSED gives (in, out) tiles, so that gates = h @ tile; else
        # (out, in), so that the gradient reaching h is d_gates @ tile.
        if TRANSPOSED:
            w_in = feat[:, None]
            w_out = feat[None, :]
        else:
            w_out = feat[:, None]
            w_in = feat[None, :]
        mask = (w_in < T) & (w_out < T)
        off = ((d * 4 * T + w_out) * T + w_in) * 2
        gs = 2 * T * T  # from one gate's rows of weight_hh to the next
        u_o = tl.load(w_ptr + off, mask=mask, other=0.0)
        u_f = tl.load(w_ptr + off + gs, mask=mask, other=0.0)
        u_i = tl.load(w_ptr + off + 2 * gs, mask=mask, other=0.0)
        u_g = tl.load(w_ptr + off + 3 * gs, mask=mask, other=0.0)
        l_o = tl.load(w_ptr + off + 1, mask=mask, other=0.0)
        l_f = tl.load(w_ptr + off + 1 + gs, mask=mask, other=0.0)
        l_i = tl.load(w_ptr + off + 1 + 2 * gs, mask=mask, other=0.0)
        l_g = tl.load(w_ptr + off + 1 + 3 * gs, mask=mask, other=0.0)
        return u_o, u_f, u_i, u_g, l_o, l_f, l_i, l_g

    @triton.jit
    def _diag_lstm_fwd_kernel(
        gx_ptr, w_ptr, h_ptr, c_ptr, act_ptr,
        sx_b, sx_d, sx_c, sx_h, sx_w,
        H, W, T, D, n_steps,
        BH: tl.constexpr, BT: tl.constexpr,
        SAVE: tl.constexpr, LIBDEVICE: tl.constexpr, PREC: tl.constexpr,
    ):
        # gx is read through its strides; h, c and the gate activations are
        # written channels-last, (B, D, H, W, T) and (B, D, H, W, 4T), so
        # that a row's features are contiguous in every later access.
        pid = tl.program_id(0)  # b * D + d
        b = pid // D
        d = pid % D
        x_base = b.to(tl.int64) * sx_b + d.to(tl.int64) * sx_d
        h_base = pid.to(tl.int64) * H * W * T
        a_base = 4 * h_base

        rows = tl.arange(0, BH)
        feat = tl.arange(0, BT)
        fmask = feat < T
        wu_o, wu_f, wu_i, wu_g, wl_o, wl_f, wl_i, wl_g = _load_weights(w_ptr, d, T, feat, True)

        hid = tl.zeros((BH, BT), dtype=wu_o.dtype)
        cell = tl.zeros((BH, BT), dtype=wu_o.dtype)
        row_ok = rows < H
        # Pointers of row i at step 0 (column j = -i); step k adds k columns.
        x_start = (
            gx_ptr + x_base + feat[None, :].to(tl.int64) * sx_c
            + (rows.to(tl.int64) * (sx_h - sx_w))[:, None]
        )
        x_gate = T * sx_c
        pix0 = (rows * (W - 1))[:, None]
        h_start = h_ptr + h_base + pix0 * T + feat[None, :]
        c_start = c_ptr + h_base + pix0 * T + feat[None, :]
        a_start = act_ptr + a_base + pix0 * (4 * T) + feat[None, :]
        for k in range(0, n_steps):
            col = k - rows
            valid = row_ok & (col >= 0) & (col < W)
            m = valid[:, None] & fmask[None, :]
            x_ptrs = x_start + k * sx_w
            h_ptrs = h_start + k * T
            a_o = tl.load(x_ptrs, mask=m, other=0.0)
            a_f = tl.load(x_ptrs + x_gate, mask=m, other=0.0)
            a_i = tl.load(x_ptrs + 2 * x_gate, mask=m, other=0.0)
            a_g = tl.load(x_ptrs + 3 * x_gate, mask=m, other=0.0)
            # (i - 1, j): written by row i - 1 at step k - 1, before the barrier.
            up = tl.load(h_ptrs - W * T, mask=m & (rows >= 1)[:, None], other=0.0)

            a_o = tl.dot(up, wu_o, a_o, input_precision=PREC, out_dtype=a_o.dtype)
            a_o = tl.dot(hid, wl_o, a_o, input_precision=PREC, out_dtype=a_o.dtype)
            a_f = tl.dot(up, wu_f, a_f, input_precision=PREC, out_dtype=a_o.dtype)
            a_f = tl.dot(hid, wl_f, a_f, input_precision=PREC, out_dtype=a_o.dtype)
            a_i = tl.dot(up, wu_i, a_i, input_precision=PREC, out_dtype=a_o.dtype)
            a_i = tl.dot(hid, wl_i, a_i, input_precision=PREC, out_dtype=a_o.dtype)
            a_g = tl.dot(up, wu_g, a_g, input_precision=PREC, out_dtype=a_o.dtype)
            a_g = tl.dot(hid, wl_g, a_g, input_precision=PREC, out_dtype=a_o.dtype)

            o = tl.sigmoid(a_o)
            f = tl.sigmoid(a_f)
            i_ = tl.sigmoid(a_i)
            g = _tanh(a_g, LIBDEVICE)
            # Cells outside the image keep a zero state so nothing flows
            # through the skew's padding.
            cell = tl.where(m, f * cell + i_ * g, 0.0)
            hid = tl.where(m, o * _tanh(cell, LIBDEVICE), 0.0)

            tl.store(h_ptrs, hid, mask=m)
            if SAVE:
                tl.store(c_start + k * T, cell, mask=m)
                a_ptrs = a_start + k * (4 * T)
                tl.store(a_ptrs, o, mask=m)
                tl.store(a_ptrs + T, f, mask=m)
                tl.store(a_ptrs + 2 * T, i_, mask=m)
                tl.store(a_ptrs + 3 * T, g, mask=m)
            # Make this column's h visible to the rows below before they read it.
            tl.debug_barrier()

    @triton.jit
    def _diag_lstm_bwd_kernel(
        dh_ptr, w_ptr, c_ptr, act_ptr, dgx_ptr,
        sd_b, sd_d, sd_c, sd_h, sd_w,
        H, W, T, D, n_steps,
        BH: tl.constexpr, BT: tl.constexpr,
        LIBDEVICE: tl.constexpr, PREC: tl.constexpr,
    ):
        # c is (B, D, H, W, T), act and dgx are (B, D, H, W, 4T) as written
        # by the forward; the incoming gradient dh is read through its strides.
        pid = tl.program_id(0)
        b = pid // D
        d = pid % D
        dh_base = b.to(tl.int64) * sd_b + d.to(tl.int64) * sd_d
        h_base = pid.to(tl.int64) * H * W * T
        a_base = 4 * h_base

        rows = tl.arange(0, BH)
        feat = tl.arange(0, BT)
        fmask = feat < T
        wu_o, wu_f, wu_i, wu_g, wl_o, wl_f, wl_i, wl_g = _load_weights(w_ptr, d, T, feat, False)

        # Gradients flowing into row i from its right neighbour (i, j + 1),
        # which this row handled one step earlier in the reverse scan.
        dh_right = tl.zeros((BH, BT), dtype=wu_o.dtype)
        dc_right = tl.zeros((BH, BT), dtype=wu_o.dtype)
        row_ok = rows < H
        dh_start = (
            dh_ptr + dh_base + feat[None, :].to(tl.int64) * sd_c
            + (rows.to(tl.int64) * (sd_h - sd_w))[:, None]
        )
        pix0 = (rows * (W - 1))[:, None]
        c_start = c_ptr + h_base + pix0 * T + feat[None, :]
        a_start = act_ptr + a_base + pix0 * (4 * T) + feat[None, :]
        g_start = dgx_ptr + a_base + pix0 * (4 * T) + feat[None, :]
        for kk in range(0, n_steps):
            k = n_steps - 1 - kk
            col = k - rows
            valid = row_ok & (col >= 0) & (col < W)
            m = valid[:, None] & fmask[None, :]
            g_ptrs = g_start + k * (4 * T)
            a_ptrs = a_start + k * (4 * T)
            c_ptrs = c_start + k * T

            o = tl.load(a_ptrs, mask=m, other=0.0)
            f = tl.load(a_ptrs + T, mask=m, other=0.0)
            i_ = tl.load(a_ptrs + 2 * T, mask=m, other=0.0)
            g = tl.load(a_ptrs + 3 * T, mask=m, other=0.0)
            cell = tl.load(c_ptrs, mask=m, other=0.0)
            c_left = tl.load(c_ptrs - T, mask=m & (col >= 1)[:, None], other=0.0)
            dh = tl.load(dh_start + k * sd_w, mask=m, other=0.0) + dh_right

            # (i + 1, j): its gate gradient was stored at step k + 1, before the barrier.
            below = m & (rows + 1 < H)[:, None]
            b_ptrs = g_ptrs + W * 4 * T
            db_o = tl.load(b_ptrs, mask=below, other=0.0)
            db_f = tl.load(b_ptrs + T, mask=below, other=0.0)
            db_i = tl.load(b_ptrs + 2 * T, mask=below, other=0.0)
            db_g = tl.load(b_ptrs + 3 * T, mask=below, other=0.0)
            dh = tl.dot(db_o, wu_o, dh, input_precision=PREC, out_dtype=dh.dtype)
            dh = tl.dot(db_f, wu_f, dh, input_precision=PREC, out_dtype=dh.dtype)
            dh = tl.dot(db_i, wu_i, dh, input_precision=PREC, out_dtype=dh.dtype)
            dh = tl.dot(db_g, wu_g, dh, input_precision=PREC, out_dtype=dh.dtype)

            tc = _tanh(cell, LIBDEVICE)
            dc = dh * o * (1.0 - tc * tc) + dc_right
            da_o = tl.where(m, dh * tc * o * (1.0 - o), 0.0)
            da_f = tl.where(m, dc * c_left * f * (1.0 - f), 0.0)
            da_i = tl.where(m, dc * g * i_ * (1.0 - i_), 0.0)
            da_g = tl.where(m, dc * i_ * (1.0 - g * g), 0.0)
            tl.store(g_ptrs, da_o, mask=m)
            tl.store(g_ptrs + T, da_f, mask=m)
            tl.store(g_ptrs + 2 * T, da_i, mask=m)
            tl.store(g_ptrs + 3 * T, da_g, mask=m)

            dc_right = tl.where(m, dc * f, 0.0)
            dh_right = tl.dot(da_o, wl_o, input_precision=PREC, out_dtype=dh.dtype)
            dh_right = tl.dot(da_f, wl_f, dh_right, input_precision=PREC, out_dtype=dh.dtype)
            dh_right = tl.dot(da_i, wl_i, dh_right, input_precision=PREC, out_dtype=dh.dtype)
            dh_right = tl.dot(da_g, wl_g, dh_right, input_precision=PREC, out_dtype=dh.dtype)
            # Make this column's gate gradients visible to the rows above.
            tl.debug_barrier()


def _detect_interpreter() -> bool:
    if not HAS_TRITON:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of other Triton releases
        return False
    return isinstance(_diag_lstm_fwd_kernel, InterpretedFunction)


# Fixed when the kernels were decorated (at import), whatever the environment says later.
_INTERPRETED = _detect_interpreter()


def _interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (CPU tensors, numpy)."""
    return _INTERPRETED


def triton_scan_supported(device: torch.device) -> bool:
    """Whether :func:`triton_scan` can run on tensors of ``device``."""
    if not HAS_TRITON:
        return False
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


def _launch_config(h: int, t: int) -> Tuple[int, int, int]:
    """``(BH, BT, num_warps)`` for an ``H``-row scan with ``t`` features."""
    bh = max(_MIN_BLOCK, triton.next_power_of_2(h))
    bt = max(_MIN_BLOCK, triton.next_power_of_2(t))
    # Four elements of each (BH, BT) tile per thread. The fp32 dots run on
    # FMA units, where every thread holds whole columns of the eight weight
    # tiles; with more elements per thread ptxas (sm_90) spills. This keeps
    # both kernels spill-free up to BH * BT = 1024 (e.g. H <= 64 at t <= 16,
    # H <= 32 at t = 32); beyond that the 16-warp cap of 128 registers spills.
    num_warps = max(1, min(16, (bh * bt) // 128))
    return bh, bt, num_warps


def check_inputs(gx: torch.Tensor, weight_hh: torch.Tensor) -> None:
    """Raise unless ``gx`` ``(B, D, 4t, H, W)`` and ``weight_hh`` ``(D, 4t, t, 2)`` suit the kernels here."""
    if not HAS_TRITON:
        raise RuntimeError("AttentionRNN: the triton backend needs the 'triton' package, which is not installed")
    if gx.dim() != 5 or gx.shape[2] % 4 != 0:
        raise ValueError(f"AttentionRNN triton backend: expected gx of shape (B, D, 4t, H, W), got {tuple(gx.shape)}")
    b, d, g4, h, w = gx.shape
    t = g4 // 4
    if tuple(weight_hh.shape) != (d, g4, t, 2):
        raise ValueError(
            f"AttentionRNN triton backend: expected weight_hh of shape ({d}, {g4}, {t}, 2) "
            f"for gx of shape {tuple(gx.shape)}, got {tuple(weight_hh.shape)}"
        )
    if gx.device != weight_hh.device:
        raise ValueError(
            f"AttentionRNN triton backend: gx and weight_hh must be on the same device, "
            f"got {gx.device} and {weight_hh.device}"
        )
    if gx.dtype not in (torch.float32, torch.float64) or weight_hh.dtype != gx.dtype:
        raise TypeError(
            f"AttentionRNN triton backend: expected float32 or float64 gx and weight_hh of one dtype, "
            f"got {gx.dtype} and {weight_hh.dtype}"
        )
    if not triton_scan_supported(gx.device):
        raise RuntimeError(
            f"AttentionRNN: the triton backend runs on CUDA tensors (or on CPU tensors under "
            f"TRITON_INTERPRET=1 set before arnn_plugins is imported); got tensors on {gx.device}. "
            f"Use backend='auto', 'fused' or 'reference' here."
        )


def _device_guard(device: torch.device):
    # Launch on the tensors' GPU, not on whichever is current.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _forward(
    gx: torch.Tensor, weight_hh: torch.Tensor, save: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Run the forward kernel.

    Returns ``h`` as ``(B, D, H, W, t)`` and, with ``save``, ``c`` of the same
    shape and the gate activations ``(B, D, H, W, 4t)`` (all contiguous).
    """
    b, d, g4, h, w = gx.shape
    t = g4 // 4
    weight_hh = weight_hh.contiguous()
    hid = torch.empty(b, d, h, w, t, device=gx.device, dtype=gx.dtype)
    cell = torch.empty_like(hid) if save else hid  # pointer unused when not saving
    act = torch.empty(b, d, h, w, g4, device=gx.device, dtype=gx.dtype) if save else hid
    bh, bt, num_warps = _launch_config(h, t)
    with _device_guard(gx.device):
        _diag_lstm_fwd_kernel[(b * d,)](
            gx, weight_hh, hid, cell, act,
            *gx.stride(),
            h, w, t, d, w + h - 1,
            BH=bh, BT=bt, SAVE=save, LIBDEVICE=not _interpreting(), PREC=_PRECISION,
            num_warps=num_warps, num_stages=1,
        )
    if not save:
        return hid, None, None
    return hid, cell, act


def _backward(
    grad_h: torch.Tensor,
    hid: torch.Tensor,
    cell: torch.Tensor,
    act: torch.Tensor,
    weight_hh: torch.Tensor,
    need_weight_grad: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of the scan.

    Args:
        grad_h: ``(B, D, t, H, W)`` gradient of the output, any strides.
        hid, cell: ``(B, D, H, W, t)`` from :func:`_forward`.
        act: ``(B, D, H, W, 4t)`` gate activations from :func:`_forward`.
        weight_hh: ``(D, 4t, t, 2)``.

    Returns:
        ``grad_gx`` ``(B, D, 4t, H, W)`` (a channels-last view) and
        ``grad_weight_hh`` ``(D, 4t, t, 2)`` (``None`` unless ``need_weight_grad``).
    """
    b, d, h, w, t = hid.shape
    g4 = 4 * t
    grad_h = grad_h.to(hid.dtype)
    weight_hh = weight_hh.contiguous()
    # Every image cell is written by the kernel: no zero fill needed.
    grad_gx = torch.empty_like(act)
    bh, bt, num_warps = _launch_config(h, t)
    with _device_guard(hid.device):
        _diag_lstm_bwd_kernel[(b * d,)](
            grad_h, weight_hh, cell, act, grad_gx,
            *grad_h.stride(),
            h, w, t, d, w + h - 1,
            BH=bh, BT=bt, LIBDEVICE=not _interpreting(), PREC=_PRECISION,
            num_warps=num_warps, num_stages=1,
        )
    grad_gx_view = grad_gx.permute(0, 1, 4, 2, 3)
    if not need_weight_grad:
        return grad_gx_view, None
    # dK_h[..., 0] = sum over cells of d_gates (x) h(i - 1, j), dK_h[..., 1]
    # likewise with h(i, j - 1): a batched matmul over the pixels of every
    # (batch, direction) pair, then a sum over the batch. No sequential
    # dependency, so it stays out of the serial kernel loop.
    h_up = F.pad(hid, (0, 0, 0, 0, 1, 0))[:, :, :h]
    h_left = F.pad(hid, (0, 0, 1, 0))[:, :, :, :w]
    gg = grad_gx.view(b * d, h * w, g4).transpose(1, 2)
    grad_w = torch.stack(
        [torch.bmm(gg, h_up.reshape(b * d, h * w, t)), torch.bmm(gg, h_left.reshape(b * d, h * w, t))],
        dim=-1,
    )
    return grad_gx_view, grad_w.view(b, d, g4, t, 2).sum(0)


def scan_forward(gx: torch.Tensor, weight_hh: torch.Tensor):
    """Forward kernel keeping what the backward needs: ``(h, cells, acts)``, ``(B, D, H, W, t | t | 4t)``."""
    return _forward(gx, weight_hh, save=True)


def scan_backward(grad_h: torch.Tensor, hid: torch.Tensor, cell: torch.Tensor, act: torch.Tensor,
                  weight_hh: torch.Tensor):
    """Backward kernel on :func:`scan_forward`'s outputs; ``grad_h`` ``(B, D, t, H, W)``, any strides.

    Returns ``(grad_gx (B, D, 4t, H, W), grad_weight_hh (D, 4t, t, 2))``.
    """
    return _backward(grad_h, hid, cell, act, weight_hh, True)


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx, weight_hh):
        hid, cell, act = _forward(gx, weight_hh, save=True)
        ctx.save_for_backward(hid, cell, act, weight_hh)
        return hid.permute(0, 1, 4, 2, 3)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        hid, cell, act, weight_hh = ctx.saved_tensors
        grad_gx, grad_w = _backward(grad_h, hid, cell, act, weight_hh, ctx.needs_input_grad[1])
        return (grad_gx if ctx.needs_input_grad[0] else None), grad_w


def triton_scan(gx: torch.Tensor, weight_hh: torch.Tensor) -> torch.Tensor:
    """Diagonal LSTM scan in Triton kernels, with a hand-written backward.

    Args:
        gx: ``(B, D, 4t, H, W)`` float32 or float64 gate inputs, gate order
            ``[o, f, i, g]``, on a CUDA device (or CPU under ``TRITON_INTERPRET=1``).
        weight_hh: ``(D, 4t, t, 2)`` recurrent kernel, same dtype and device;
            ``[..., 0]`` upper neighbour, ``[..., 1]`` left neighbour.

    Returns:
        ``(B, D, t, H, W)`` hidden states (a view of a channels-last buffer),
        equal to :func:`arnn_plugins.ops.reference.reference_scan` up to rounding.
    """
    check_inputs(gx, weight_hh)
    b, d, g4, h, w = gx.shape
    if gx.numel() == 0:
        # Nothing to scan; keep both inputs in the graph for autograd.
        return gx[:, :, : g4 // 4] * 0 + weight_hh.sum() * 0
    if torch.is_grad_enabled() and (gx.requires_grad or weight_hh.requires_grad):
        return _TritonScan.apply(gx, weight_hh)
    hid, _, _ = _forward(gx, weight_hh, save=False)
    return hid.permute(0, 1, 4, 2, 3)

