"""A small C kernel for the diagonal LSTM scan on CPU.

On a CPU the scan is sequential within one image but independent across
(direction, batch) pairs, and a per-step PyTorch op costs more in dispatch
than the arithmetic it does. This module compiles (once, with the system C
compiler, into ``~/.cache/arnn-plugins``) a plain C function that walks one
sequence in raster order, which is a valid order for the recurrence: cell
``(i, j)`` needs only ``(i - 1, j)`` and ``(i, j - 1)``. Sequences are split
over threads from Python (``ctypes`` releases the GIL), the forward saves
gate activations and cells, and the backward is the reverse raster walk.

The C source has no Python or torch headers, so it builds in about a second
and needs nothing from the network. If no compiler is found, or
``ARNN_PLUGINS_NO_CC=1`` is set, :func:`load` returns ``None`` and the fused
backend uses its pure-PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

__all__ = ["load", "c_scan", "available"]

_SOURCE = r"""
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Gate order [o, f, i, g]; wt[d][r][k][g] = weight_hh[d, g, k, r] with
   r = 0 the upper neighbour and r = 1 the left one; the backward takes
   wg[d][r][g][k] = weight_hh[d, g, k, r]. Strides in elements;
   the feature dimension of gx, h, gout and dgx is contiguous. */
/* tanh through one exp: cheaper than the libm tanh, and exact at the     \
   saturated ends (exp overflowing to inf gives 1, underflowing gives -1). */ \
#define DEFINE(T, SUF, EXP)                                                        \
static inline T sig_##SUF(T x) { return (T)1 / ((T)1 + EXP(-x)); }                 \
static inline T tanh_##SUF(T x) { return (T)1 - (T)2 / (EXP((T)2 * x) + (T)1); }   \
                                                                                   \
void arnn_fwd_##SUF(const T *gx, long gsb, long gsd, long gsi, long gsj,           \
                    const T *wt, T *h, long hsb, long hsd, long hsi, long hsj,     \
                    T *cbuf, T *acts, int B, int H, int W, int t, int s0, int s1)  \
{                                                                                  \
    const int G = 4 * t;                                                           \
    for (int s = s0; s < s1; ++s) {                                                \
        const int d = s / B, b = s % B;                                            \
        const T *wup = wt + (long)d * 2 * t * G, *wl = wup + (long)t * G;          \
        T *cs = cbuf + (long)s * H * W * t;                                        \
        T *as = acts + (long)s * H * W * G;                                        \
        for (int i = 0; i < H; ++i) {                                              \
            for (int j = 0; j < W; ++j) {                                          \
                const T *g0 = gx + b * gsb + d * gsd + i * gsi + j * gsj;          \
                T *restrict a = as + ((long)i * W + j) * G;                        \
                for (int g = 0; g < G; ++g) a[g] = g0[g];                          \
                if (i > 0) {                                                       \
                    const T *hu = h + b * hsb + d * hsd + (i - 1) * hsi + j * hsj; \
                    for (int k = 0; k < t; ++k) {                                  \
                        const T hk = hu[k]; const T *wr = wup + (long)k * G;       \
                        for (int g = 0; g < G; ++g) a[g] += hk * wr[g];            \
                    }                                                              \
                }                                                                  \
                const T *cl = 0;                                                   \
                if (j > 0) {                                                       \
                    const T *hl = h + b * hsb + d * hsd + i * hsi + (j - 1) * hsj; \
                    for (int k = 0; k < t; ++k) {                                  \
                        const T hk = hl[k]; const T *wr = wl + (long)k * G;        \
                        for (int g = 0; g < G; ++g) a[g] += hk * wr[g];            \
                    }                                                              \
                    cl = cs + ((long)i * W + j - 1) * t;                           \
                }                                                                  \
                for (int g = 0; g < 3 * t; ++g) a[g] = sig_##SUF(a[g]);            \
                for (int g = 3 * t; g < G; ++g) a[g] = tanh_##SUF(a[g]);                 \
                T *c = cs + ((long)i * W + j) * t;                                 \
                T *ho = h + b * hsb + d * hsd + i * hsi + j * hsj;                 \
                for (int k = 0; k < t; ++k) {                                      \
                    const T cv = a[t + k] * (cl ? cl[k] : (T)0)                    \
                                 + a[2 * t + k] * a[3 * t + k];                    \
                    c[k] = cv;                                                     \
                    ho[k] = a[k] * tanh_##SUF(cv);                                       \
                }                                                                  \
            }                                                                      \
        }                                                                          \
    }                                                                              \
}                                                                                  \
                                                                                   \
void arnn_bwd_##SUF(const T *go, long osb, long osd, long osi, long osj,           \
                    const T *wg, const T *h, long hsb, long hsd, long hsi,         \
                    long hsj, const T *cbuf, const T *acts,                        \
                    T *dgx, long dsb, long dsd, long dsi, long dsj, T *dwt,        \
                    int B, int H, int W, int t, int s0, int s1)                    \
{                                                                                  \
    const int G = 4 * t;                                                           \
    T *down = (T *)malloc(sizeof(T) * (size_t)W * t);                              \
    T *rh = (T *)malloc(sizeof(T) * (size_t)t);                                    \
    T *rc = (T *)malloc(sizeof(T) * (size_t)t);                                    \
    for (int s = s0; s < s1; ++s) {                                                \
        const int d = s / B, b = s % B;                                            \
        const T *wgu = wg + (long)d * 2 * t * G, *wgl = wgu + (long)t * G;         \
        T *dwup = dwt + (long)s * 2 * t * G, *dwl = dwup + (long)t * G;            \
        const T *cs = cbuf + (long)s * H * W * t;                                  \
        const T *as = acts + (long)s * H * W * G;                                  \
        memset(down, 0, sizeof(T) * (size_t)W * t);                                \
        memset(dwup, 0, sizeof(T) * (size_t)2 * t * G);                            \
        for (int i = H - 1; i >= 0; --i) {                                         \
            memset(rh, 0, sizeof(T) * (size_t)t);                                  \
            memset(rc, 0, sizeof(T) * (size_t)t);                                  \
            for (int j = W - 1; j >= 0; --j) {                                     \
                const T *a = as + ((long)i * W + j) * G;                           \
                const T *c = cs + ((long)i * W + j) * t;                           \
                const T *cl = j > 0 ? c - t : 0;                                   \
                const T *g0 = go + b * osb + d * osd + i * osi + j * osj;          \
                T *dz = dgx + b * dsb + d * dsd + i * dsi + j * dsj;               \
                T *dn = down + (long)j * t;                                        \
                for (int k = 0; k < t; ++k) {                                      \
                    const T o = a[k], f = a[t + k], ig = a[2 * t + k],             \
                            gg = a[3 * t + k];                                     \
                    const T tc = tanh_##SUF(c[k]);                                       \
                    const T dh = g0[k] + dn[k] + rh[k];                            \
                    const T dc = rc[k] + dh * o * ((T)1 - tc * tc);                \
                    dz[k] = dh * tc * o * ((T)1 - o);                              \
                    dz[t + k] = cl ? dc * cl[k] * f * ((T)1 - f) : (T)0;           \
                    dz[2 * t + k] = dc * gg * ig * ((T)1 - ig);                    \
                    dz[3 * t + k] = dc * ig * ((T)1 - gg * gg);                    \
                    rc[k] = dc * f;                                                \
                }                                                                  \
                /* Gradients for the upper and left neighbours' h, as axpys */    \
                /* over the transposed kernel so they vectorise; dn[j] was   */    \
                /* consumed above and now collects row i - 1's gradient.     */    \
                for (int k = 0; k < t; ++k) { dn[k] = 0; rh[k] = 0; }              \
                for (int g = 0; g < G; ++g) {                                      \
                    const T zg = dz[g];                                            \
                    const T *restrict gu = wgu + (long)g * t;                      \
                    const T *restrict gl = wgl + (long)g * t;                      \
                    if (i > 0) for (int k = 0; k < t; ++k) dn[k] += zg * gu[k];    \
                    if (j > 0) for (int k = 0; k < t; ++k) rh[k] += zg * gl[k];    \
                }                                                                  \
                if (i > 0) {                                                       \
                    const T *hu = h + b * hsb + d * hsd + (i - 1) * hsi + j * hsj; \
                    for (int k = 0; k < t; ++k) {                                  \
                        const T hk = hu[k]; T *dr = dwup + (long)k * G;            \
                        for (int g = 0; g < G; ++g) dr[g] += hk * dz[g];           \
                    }                                                              \
                }                                                                  \
                if (j > 0) {                                                       \
                    const T *hl = h + b * hsb + d * hsd + i * hsi + (j - 1) * hsj; \
                    for (int k = 0; k < t; ++k) {                                  \
                        const T hk = hl[k]; T *dr = dwl + (long)k * G;             \
                        for (int g = 0; g < G; ++g) dr[g] += hk * dz[g];           \
                    }                                                              \
                }                                                                  \
            }                                                                      \
        }                                                                          \
    }                                                                              \
    free(down); free(rh); free(rc);                                                \
}

DEFINE(float, f32, expf)
DEFINE(double, f64, exp)
"""

_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c99"]
_lib = None
_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None


def _cache_dir() -> str:
    root = os.environ.get("ARNN_PLUGINS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "arnn-plugins")
    return os.path.join(root, "kernels")


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the machine and its instruction sets."""
    sig = sys.platform + os.uname().machine
    try:
        with open("/proc/cpuinfo") as f:
            sig += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return sig


def _compile(path: str) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "arnn_scan.c")
        with open(src, "w") as f:
            f.write(_SOURCE)
        out = os.path.join(tmp, "arnn_scan.so")
        subprocess.run([cc, *_FLAGS, src, "-o", out, "-lm"], check=True, capture_output=True, timeout=120)
        # Atomic, so concurrent first uses never load a half-written file.
        tmp_target = f"{path}.{os.getpid()}.tmp"
        shutil.copyfile(out, tmp_target)
        os.replace(tmp_target, path)


def load():
    """The compiled kernel library, building it on first use; ``None`` if unavailable."""
    global _lib
    if _lib is not None:
        return _lib or None
    with _lock:
        if _lib is not None:
            return _lib or None
        if os.environ.get("ARNN_PLUGINS_NO_CC") == "1" or sys.platform == "win32":
            _lib = False
            return None
        key = hashlib.sha256((_SOURCE + " ".join(_FLAGS) + _cpu_signature()).encode()).hexdigest()[:16]
        path = os.path.join(_cache_dir(), f"arnn_scan_{key}.so")
        try:
            if not os.path.exists(path):
                _compile(path)
            lib = ctypes.CDLL(path)
        except (OSError, RuntimeError, subprocess.SubprocessError):
            _lib = False
            return None
        _lib = lib
        return lib


def available() -> bool:
    """True when the C kernel can be used here."""
    return load() is not None


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def _run_chunks(fn, n_seq: int) -> None:
    """Call ``fn(s0, s1)`` over ``n_seq`` sequences split across torch's thread count."""
    global _pool
    workers = max(1, min(torch.get_num_threads(), n_seq))
    if workers == 1:
        fn(0, n_seq)
        return
    if _pool is None or _pool._max_workers < workers:
        _pool = ThreadPoolExecutor(max_workers=workers)
    bounds = [round(k * n_seq / workers) for k in range(workers + 1)]
    futures = [_pool.submit(fn, bounds[k], bounds[k + 1]) for k in range(workers)]
    for fut in futures:
        fut.result()


def _strides(x: torch.Tensor):
    """Element strides of a ``(B, D, F, H, W)`` tensor as ``b, d, i, j`` longs."""
    sb, sd, _, si, sj = x.stride()
    return [ctypes.c_long(v) for v in (sb, sd, si, sj)]


def _features_last(x: torch.Tensor) -> torch.Tensor:
    """Same values as ``x`` ``(B, D, F, H, W)`` with the feature dimension contiguous."""
    if x.stride(2) == 1:
        return x
    return x.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)


class _CScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx: torch.Tensor, weight_hh: torch.Tensor) -> torch.Tensor:
        lib = load()
        b, d, g4, h, w = gx.shape
        t = g4 // 4
        suf = "f64" if gx.dtype == torch.float64 else "f32"
        gx = _features_last(gx)
        wt = weight_hh.permute(0, 3, 2, 1).contiguous()  # (D, 2, t, 4t)
        hid = gx.new_empty(b, h, w, d, t).permute(0, 3, 4, 1, 2)  # (B, D, t, H, W), features last
        cbuf = gx.new_empty(d * b, h, w, t)
        acts = gx.new_empty(d * b, h, w, g4)
        fwd = getattr(lib, f"arnn_fwd_{suf}")
        args_g, args_h = _strides(gx), _strides(hid)

        def run(s0, s1):
            fwd(_ptr(gx), *args_g, _ptr(wt), _ptr(hid), *args_h, _ptr(cbuf), _ptr(acts),
                ctypes.c_int(b), ctypes.c_int(h), ctypes.c_int(w), ctypes.c_int(t), ctypes.c_int(s0), ctypes.c_int(s1))

        _run_chunks(run, d * b)
        ctx.save_for_backward(weight_hh.permute(0, 3, 1, 2).contiguous(), hid, cbuf, acts)
        ctx.suf = suf
        ctx.gx_shape, ctx.gx_strides = gx.shape, gx.stride()
        return hid

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        wg, hid, cbuf, acts = ctx.saved_tensors
        b, d, t, h, w = hid.shape
        lib = load()
        go = _features_last(grad_h)
        # Same strides as the forward's input, so the gradient flows on
        # through the input projection without a layout copy.
        dgx = torch.empty_strided(ctx.gx_shape, ctx.gx_strides, dtype=hid.dtype)
        dwt = hid.new_empty(d, b, 2, t, 4 * t)
        bwd = getattr(lib, f"arnn_bwd_{ctx.suf}")
        args_o, args_h, args_d = _strides(go), _strides(hid), _strides(dgx)

        def run(s0, s1):
            bwd(_ptr(go), *args_o, _ptr(wg), _ptr(hid), *args_h, _ptr(cbuf), _ptr(acts), _ptr(dgx), *args_d,
                _ptr(dwt), ctypes.c_int(b), ctypes.c_int(h), ctypes.c_int(w), ctypes.c_int(t),
                ctypes.c_int(s0), ctypes.c_int(s1))

        _run_chunks(run, d * b)
        grad_w = dwt.sum(1).permute(0, 3, 2, 1)  # (D, 4t, t, 2)
        return dgx, grad_w


def c_scan(gx: torch.Tensor, weight_hh: torch.Tensor) -> torch.Tensor:
    """Diagonal LSTM scan by the C kernel (CPU, float32/float64).

    Shapes as in :func:`arnn_plugins.scan.diagonal_lstm`; raises
    ``RuntimeError`` if the kernel is not available.
    """
    if load() is None:
        raise RuntimeError("AttentionRNN: the CPU scan kernel is not available (no C compiler?)")
    if gx.device.type != "cpu" or gx.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"AttentionRNN: the CPU scan kernel takes float32/float64 CPU tensors, got {gx.dtype} on {gx.device}")
    return _CScan.apply(gx, weight_hh.to(gx.dtype))
