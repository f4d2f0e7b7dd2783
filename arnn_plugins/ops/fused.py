"""The anti-diagonal PyTorch scan with a hand-written backward (``backend="fused"``).

This is the fused backend's GPU path and its CPU fallback; on CPU
:func:`arnn_plugins.ops.fused_scan` prefers the C kernel of
:mod:`arnn_plugins.ops.cpu_kernel` when it builds. Same math as
:func:`arnn_plugins.ops.reference.reference_scan`, organised for speed:

- the input part of the gates is reordered once, by one gather, into
  anti-diagonal order (step ``k`` holds the cells ``i + j = k``, rows
  ``lo..hi``); padding cells of the skewed map are never stored or computed;
- both directions and the whole batch advance together: per step two
  batched matmuls (upper and left neighbour) and a few in-place pointwise ops;
- hidden and cell states live in per-step buffers with one zero row on top
  (row ``r + 1`` holds image row ``r``), so the upper and left neighbours of
  the rows ``lo..hi`` are plain slices and out-of-image states read as zero;
- the backward is a reverse scan over saved gate activations and states,
  with no per-step autograd graph.
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Tuple

import torch
from torch.autograd.function import once_differentiable

__all__ = ["fused_scan_torch", "scan_backward", "scan_forward"]


@lru_cache(maxsize=64)
def _plan(h: int, w: int) -> Tuple[List[Tuple[int, int, int]], torch.Tensor, torch.Tensor]:
    """Steps ``(lo, hi, offset)`` over anti-diagonals, the cell order and its inverse.

    ``order[offset + r]`` is the flat image index ``i * W + j`` of row
    ``i = lo + r`` on anti-diagonal ``k``; offsets count cells.
    ``inverse[i * W + j]`` is that cell's position in step order.
    """
    steps, order, off = [], [], 0
    for k in range(w + h - 1):
        lo, hi = max(0, k - w + 1), min(k, h - 1)
        steps.append((lo, hi, off))
        order.extend(i * w + (k - i) for i in range(lo, hi + 1))
        off += hi - lo + 1
    order_t = torch.tensor(order, dtype=torch.long)
    return steps, order_t, torch.argsort(order_t)


def _to_steps(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``(B, D, F, H, W)`` -> ``(D, cells, B, F)`` in anti-diagonal cell order.

    One gather; cheapest when ``x`` is channels-last (``F`` innermost).
    """
    b, d, f, h, w = x.shape
    return x.permute(1, 3, 4, 0, 2).reshape(d, h * w, b, f).index_select(1, order)


def _from_steps(y: torch.Tensor, inverse: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_to_steps`: ``(D, cells, B, F)`` -> ``(B, D, F, H, W)``.

    The result is stored channels-last (memory order ``B, H, W, D, F``), the
    layout the surrounding 1x1 convs read and write fastest.
    """
    d, cells, b, f = y.shape
    out = y.permute(2, 1, 0, 3).index_select(1, inverse)  # (B, H*W, D, F), contiguous
    return out.view(b, h, w, d, f).permute(0, 3, 4, 1, 2)


def _recurrent(weight_hh: torch.Tensor):
    """``K_h`` ``(D, 4t, t, 2)`` as the right operands of the per-step products: ``(D, t, 4t)`` each."""
    return weight_hh[..., 0].transpose(1, 2).contiguous(), weight_hh[..., 1].transpose(1, 2).contiguous()


def scan_forward(gx: torch.Tensor, weight_hh: torch.Tensor, defined: bool = False):
    """The anti-diagonal forward scan; returns ``(h, acts, hbuf, cbuf)``.

    Args:
        gx: ``(B, D, 4t, H, W)``; weight_hh: ``(D, 4t, t, 2)``.
        defined: zero the state buffers' cells that no step writes (the
            skew's padding) instead of leaving them undefined, so that every
            returned value is a function of the inputs (operators must be).

    Returns:
        ``h`` ``(B, D, t, H, W)`` (a channels-last view), and what the
        backward needs: the gate activations ``acts`` ``(D, H * W, B, 4t)``
        in step order, and the per-step hidden and cell buffers ``hbuf``,
        ``cbuf`` ``(W + H, D, H + 1, B, t)``.
    """
    b, d, g4, h, w = gx.shape
    t = g4 // 4
    steps, order, inverse = _plan(h, w)
    order, inverse = order.to(gx.device), inverse.to(gx.device)
    w_up, w_left = _recurrent(weight_hh)

    # Gate activations are written over the gathered inputs in place.
    acts = _to_steps(gx, order)  # (D, cells, B, 4t)
    alloc = gx.new_zeros if defined else gx.new_empty
    hbuf = alloc(len(steps) + 1, d, h + 1, b, t)
    cbuf = alloc(len(steps) + 1, d, h + 1, b, t)
    if not defined:
        # Only states that are read without having been written must be
        # zero: the padding row above the image, and at step k the row k
        # (column -1 of it, left of the image) of the previous column.
        diag = torch.arange(min(h, len(steps)), device=gx.device)
        for buf in (hbuf, cbuf):
            buf[:, :, 0] = 0
            buf[diag, :, diag + 1] = 0
    for k, (lo, hi, off) in enumerate(steps):
        n = hi - lo + 1
        z = acts[:, off : off + n]  # (D, n, B, 4t) view
        zf = z.reshape(d, n * b, g4)
        zf.baddbmm_(hbuf[k, :, lo : hi + 1].reshape(d, n * b, t), w_up)
        zf.baddbmm_(hbuf[k, :, lo + 1 : hi + 2].reshape(d, n * b, t), w_left)
        z[..., : 3 * t].sigmoid_()
        z[..., 3 * t :].tanh_()
        o, f, i, g = z.split(t, dim=-1)
        c = cbuf[k + 1, :, lo + 1 : hi + 2]
        torch.mul(f, cbuf[k, :, lo + 1 : hi + 2], out=c)
        c.addcmul_(i, g)
        torch.mul(o, torch.tanh(c), out=hbuf[k + 1, :, lo + 1 : hi + 2])
    # States of the cells, in step order, for the output.
    hs = torch.cat([hbuf[k + 1, :, lo + 1 : hi + 2] for k, (lo, hi, _) in enumerate(steps)], dim=1)
    return _from_steps(hs, inverse, h, w), acts, hbuf, cbuf


def scan_backward(grad_h: torch.Tensor, weight_hh: torch.Tensor, acts: torch.Tensor, hbuf: torch.Tensor,
                  cbuf: torch.Tensor):
    """The reverse scan over what :func:`scan_forward` saved; returns ``(grad_gx, grad_weight_hh)``.

    ``grad_h`` is ``(B, D, t, H, W)``, any strides; shapes of the rest as
    :func:`scan_forward` returns them.
    """
    b, t, h, w = grad_h.shape[0], grad_h.shape[2], grad_h.shape[3], grad_h.shape[4]
    d = weight_hh.shape[0]
    steps, order, inverse = _plan(h, w)
    order, inverse = order.to(grad_h.device), inverse.to(grad_h.device)
    w_up, w_left = _recurrent(weight_hh)
    g_out = _to_steps(grad_h, order)  # (D, cells, B, t)
    dz_all = torch.empty_like(acts)
    d_up = torch.zeros_like(w_up)
    d_left = torch.zeros_like(w_left)
    w_cat_t = torch.cat([w_up, w_left], dim=1).transpose(1, 2)  # (D, 4t, 2t)
    carry_h = hbuf.new_zeros(d, h + 1, b, t)  # gradient reaching each row's h
    carry_c = hbuf.new_zeros(d, h + 1, b, t)  # ... and its memory cell
    for k in range(len(steps) - 1, -1, -1):
        lo, hi, off = steps[k]
        n = hi - lo + 1
        o, f, i, g = acts[:, off : off + n].split(t, dim=-1)
        c = cbuf[k + 1, :, lo + 1 : hi + 2]
        c_left = cbuf[k, :, lo + 1 : hi + 2]
        dh = g_out[:, off : off + n] + carry_h[:, lo + 1 : hi + 2]
        tc = torch.tanh(c)
        dc = (1 - tc * tc).mul_(o).mul_(dh).add_(carry_c[:, lo + 1 : hi + 2])
        dz = dz_all[:, off : off + n]
        do, df, di, dg = dz.split(t, dim=-1)
        torch.mul(dh, tc, out=do).mul_(o * (1 - o))
        torch.mul(dc, c_left, out=df).mul_(f * (1 - f))
        torch.mul(dc, g, out=di).mul_(i * (1 - i))
        torch.mul(dc, i, out=dg).mul_(1 - g * g)
        dzf = dz.reshape(d, n * b, 4 * t)
        d_up.baddbmm_(hbuf[k, :, lo : hi + 1].reshape(d, n * b, t).transpose(1, 2), dzf)
        d_left.baddbmm_(hbuf[k, :, lo + 1 : hi + 2].reshape(d, n * b, t).transpose(1, 2), dzf)
        back = torch.bmm(dzf, w_cat_t).view(d, n, b, 2 * t)
        carry_h.zero_()
        carry_h[:, lo : hi + 1] = back[..., :t]
        carry_h[:, lo + 1 : hi + 2] += back[..., t:]
        carry_c.zero_()
        carry_c[:, lo + 1 : hi + 2] = dc.mul_(f)
    grad_gx = _from_steps(dz_all, inverse, h, w)
    grad_w = torch.stack([d_up.transpose(1, 2), d_left.transpose(1, 2)], dim=-1)
    return grad_gx, grad_w


class _FusedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx: torch.Tensor, weight_hh: torch.Tensor) -> torch.Tensor:
        out, acts, hbuf, cbuf = scan_forward(gx, weight_hh)
        ctx.save_for_backward(weight_hh, acts, hbuf, cbuf)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: torch.Tensor):
        return scan_backward(grad_h, *ctx.saved_tensors)


def fused_scan_torch(gx: torch.Tensor, weight_hh: torch.Tensor) -> torch.Tensor:
    """The anti-diagonal PyTorch scan with hand-written backward (any device).

    Args:
        gx: ``(B, D, 4t, H, W)`` gate inputs, gate order ``[o, f, i, g]``.
        weight_hh: ``(D, 4t, t, 2)`` recurrent kernel, same dtype and device.

    Returns:
        ``(B, D, t, H, W)`` hidden states, stored channels-last.
    """
    return _FusedScan.apply(gx, weight_hh)
