"""A small C kernel for the diagonal LSTM scan on CPU.

On a CPU the scan is sequential within one image but independent across
(direction, batch) pairs, and a per-step PyTorch op costs more in dispatch
than the arithmetic it does. This module compiles (once, with the system C
compiler, into ``~/.cache/arnn-plugins``) a plain C function that walks one
sequence in raster order, which is a valid order for the recurrence: cell
``(i, j)`` needs only ``(i - 1, j)`` and ``(i, j - 1)``. Sequences are split
over threads from Python (``ctypes`` releases the GIL), the forward saves
gate activations and cells, and the backward is the reverse raster walk
(writing the input gradient over the saved activations when the graph is
not retained, so it allocates next to nothing).

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
from torch.autograd.function import once_differentiable

__all__ = ["load", "c_scan", "available"]

_SOURCE = r"""
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Pointwise activations over arrays. sigmoid(x) = 1 / (1 + e^-x) and
   tanh(x) = 1 - 2 / (e^2x + 1): one exp each, exact at the saturated ends
   (an exp overflowing to inf gives 1, underflowing gives -1). */
static void sig_n_f64(double *a, int n)
{
    for (int i = 0; i < n; ++i) a[i] = 1.0 / (1.0 + exp(-a[i]));
}
static void tanh_n_f64(double *y, const double *x, int n)
{
    for (int i = 0; i < n; ++i) y[i] = 1.0 - 2.0 / (exp(2.0 * x[i]) + 1.0);
}

/* float: eight lanes at a time through a vector exp (GCC/Clang vector
   extensions, so the compiler picks the instruction set), since a libm
   call per gate costs more than the whole recurrence matvec. */
typedef float v8sf __attribute__((vector_size(32)));
typedef int v8si __attribute__((vector_size(32)));

static inline v8sf v8_load(const float *p) { v8sf v; memcpy(&v, p, sizeof v); return v; }
static inline void v8_store(float *p, v8sf v) { memcpy(p, &v, sizeof v); }
static inline v8sf v8_select(v8si m, v8sf a, v8sf b) { return (v8sf)(((v8si)a & m) | ((v8si)b & ~m)); }

/* Cephes expf: e^x = 2^n e^r, n = round(x log2 e), |r| <= ln2 / 2, degree-6
   polynomial (about 1 ulp); x clamped to [-87, 88] keeps 2^n a normal float. */
static inline v8sf v8_exp(v8sf x)
{
    const v8sf zero = {0};
    x = v8_select(x > 88.0f, zero + 88.0f, x);
    x = v8_select(x < -87.0f, zero - 87.0f, x);
    const v8sf fx = x * 1.44269504088896341f + 0.5f;
    v8si n = __builtin_convertvector(fx, v8si);
    n += (v8si)(__builtin_convertvector(n, v8sf) > fx); /* truncation -> floor */
    const v8sf nf = __builtin_convertvector(n, v8sf);
    const v8sf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    v8sf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    return p * (v8sf)((n + 127) << 23);
}
static void sig_n_f32(float *a, int n)
{
    int i = 0;
    for (; i + 8 <= n; i += 8) v8_store(a + i, 1.0f / (1.0f + v8_exp(-v8_load(a + i))));
    for (; i < n; ++i) a[i] = 1.0f / (1.0f + expf(-a[i]));
}
static void tanh_n_f32(float *y, const float *x, int n)
{
    int i = 0;
    for (; i + 8 <= n; i += 8) v8_store(y + i, 1.0f - 2.0f / (v8_exp(2.0f * v8_load(x + i)) + 1.0f));
    for (; i < n; ++i) y[i] = 1.0f - 2.0f / (expf(2.0f * x[i]) + 1.0f);
}

/* Gate order [o, f, i, g]; wt[d][r][k][g] = weight_hh[d, g, k, r] with
   r = 0 the upper neighbour and r = 1 the left one; the backward takes
   wg[d][r][g][k] = weight_hh[d, g, k, r]. Strides in elements;
   the feature dimension of gx, h and dgx is contiguous, gout's has stride
   osf. dgx may be the acts buffer itself: each cell's activations are read
   into registers before its gradient is written over them. */
#define DEFINE(T, SUF)                                                             \
/* dw[k][g] += sum_j hs[j * hsj + k] * zs[j * zsj + g] for j < n: blocks of  */   \
/* 2 x 32 accumulators stay in registers over the j loop.                    */   \
static void outer_acc_##SUF(T *dw, const T *hs, long hsj, const T *zs, long zsj,  \
                            int n, int t, int G)                                  \
{                                                                                  \
    for (int g0 = 0; g0 < G; g0 += 32) {                                           \
        const int gn = G - g0 < 32 ? G - g0 : 32;                                  \
        for (int k = 0; k < t; k += 2) {                                           \
            const int two = k + 1 < t;                                             \
            T acc0[32] = {0}, acc1[32] = {0};                                      \
            for (int j = 0; j < n; ++j) {                                          \
                const T h0 = hs[j * hsj + k], h1 = two ? hs[j * hsj + k + 1] : 0; \
                const T *restrict z = zs + j * zsj + g0;                           \
                if (gn == 32) {                                                    \
                    for (int g = 0; g < 32; ++g) {                                 \
                        acc0[g] += h0 * z[g]; acc1[g] += h1 * z[g];                \
                    }                                                              \
                } else {                                                           \
                    for (int g = 0; g < gn; ++g) {                                 \
                        acc0[g] += h0 * z[g]; acc1[g] += h1 * z[g];                \
                    }                                                              \
                }                                                                  \
            }                                                                      \
            T *d0 = dw + (long)k * G + g0;                                         \
            for (int g = 0; g < gn; ++g) d0[g] += acc0[g];                         \
            if (two) for (int g = 0; g < gn; ++g) d0[G + g] += acc1[g];            \
        }                                                                          \
    }                                                                              \
}                                                                                  \
                                                                                   \
/* gates_block works on a block of 32 columns; called with the literal   */   \
/* 32 (every block but a tail) its inlined loops have a constant trip     */   \
/* count and the sums stay in registers.                                   */   \
/* a[g] = x[g] + sum_k hu[k] wu[k * G + g] + sum_k hl[k] wl[k * G + g],     */  \
/* g < gn; a null neighbour adds nothing.                                   */  \
static inline __attribute__((always_inline)) void                               \
gates_block_##SUF(T *restrict a, const T *restrict x, const T *restrict hu,      \
                  const T *restrict wu, const T *restrict hl,                    \
                  const T *restrict wl, int t, int G, const int gn)              \
{                                                                                  \
    T acc[32];                                                                     \
    for (int g = 0; g < gn; ++g) acc[g] = x[g];                                    \
    if (hu) for (int k = 0; k < t; ++k) {                                          \
        const T hk = hu[k]; const T *w = wu + (long)k * G;                         \
        for (int g = 0; g < gn; ++g) acc[g] += hk * w[g];                          \
    }                                                                              \
    if (hl) for (int k = 0; k < t; ++k) {                                          \
        const T hk = hl[k]; const T *w = wl + (long)k * G;                         \
        for (int g = 0; g < gn; ++g) acc[g] += hk * w[g];                          \
    }                                                                              \
    for (int g = 0; g < gn; ++g) a[g] = acc[g];                                    \
}                                                                                  \
static void gates_##SUF(T *restrict a, const T *restrict x, const T *restrict hu, \
                        const T *restrict wu, const T *restrict hl,               \
                        const T *restrict wl, int t, int G)                       \
{                                                                                  \
    for (int g0 = 0; g0 < G; g0 += 32) {                                           \
        if (G - g0 >= 32)                                                          \
            gates_block_##SUF(a + g0, x + g0, hu, wu + g0, hl, wl + g0, t, G, 32); \
        else                                                                       \
            gates_block_##SUF(a + g0, x + g0, hu, wu + g0, hl, wl + g0, t, G, G - g0); \
    }                                                                              \
}                                                                                  \
                                                                                   \
/* y[k] = sum_g z[g] * wg[g * t + k], with blocks of 16 sums in registers.  */  \
static void matvec_t_##SUF(T *restrict y, const T *restrict wg,                  \
                           const T *restrict z, int t, int G)                    \
{                                                                                  \
    int k0 = 0;                                                                    \
    for (; k0 + 16 <= t; k0 += 16) {                                               \
        T acc[16] = {0};                                                           \
        for (int g = 0; g < G; ++g) {                                              \
            const T zg = z[g]; const T *w = wg + (long)g * t + k0;                 \
            for (int k = 0; k < 16; ++k) acc[k] += zg * w[k];                      \
        }                                                                          \
        for (int k = 0; k < 16; ++k) y[k0 + k] = acc[k];                           \
    }                                                                              \
    for (int k = k0; k < t; ++k) {                                                 \
        T acc = 0;                                                                 \
        for (int g = 0; g < G; ++g) acc += z[g] * wg[(long)g * t + k];             \
        y[k] = acc;                                                                \
    }                                                                              \
}                                                                                  \
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
                const T *hu = i > 0 ? h + b * hsb + d * hsd + (i - 1) * hsi + j * hsj : 0; \
                const T *hl = j > 0 ? h + b * hsb + d * hsd + i * hsi + (j - 1) * hsj : 0; \
                const T *cl = j > 0 ? cs + ((long)i * W + j - 1) * t : 0;          \
                gates_##SUF(a, g0, hu, wup, hl, wl, t, G);                         \
                sig_n_##SUF(a, 3 * t);                                             \
                tanh_n_##SUF(a + 3 * t, a + 3 * t, t);                             \
                T *restrict c = cs + ((long)i * W + j) * t;                        \
                T *restrict ho = h + b * hsb + d * hsd + i * hsi + j * hsj;        \
                if (cl) for (int k = 0; k < t; ++k)                                \
                    c[k] = a[t + k] * cl[k] + a[2 * t + k] * a[3 * t + k];         \
                else for (int k = 0; k < t; ++k) c[k] = a[2 * t + k] * a[3 * t + k]; \
                tanh_n_##SUF(ho, c, t);                                            \
                for (int k = 0; k < t; ++k) ho[k] *= a[k];                         \
            }                                                                      \
        }                                                                          \
    }                                                                              \
}                                                                                  \
                                                                                   \
void arnn_bwd_##SUF(const T *go, long osb, long osd, long osf, long osi,           \
                    long osj, const T *wg, const T *h, long hsb, long hsd,         \
                    long hsi, long hsj, const T *cbuf, const T *acts,              \
                    T *dgx, long dsb, long dsd, long dsi, long dsj, T *dwt,        \
                    int B, int H, int W, int t, int s0, int s1)                    \
{                                                                                  \
    const int G = 4 * t;                                                           \
    T *down = (T *)malloc(sizeof(T) * (size_t)W * t);                              \
    T *rh = (T *)malloc(sizeof(T) * (size_t)t);                                    \
    T *rc = (T *)malloc(sizeof(T) * (size_t)t);                                    \
    T *tcs = (T *)malloc(sizeof(T) * (size_t)t);                                   \
    T *restrict zl = (T *)malloc(sizeof(T) * (size_t)4 * t);                       \
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
                tanh_n_##SUF(tcs, c, t);                                           \
                /* Into a local buffer first: dz may overlay this cell's     */   \
                /* activations, and with no aliasing the loop vectorises.    */   \
                for (int k = 0; k < t; ++k) {                                      \
                    const T o = a[k], f = a[t + k], ig = a[2 * t + k],             \
                            gg = a[3 * t + k];                                     \
                    const T tc = tcs[k];                                           \
                    const T dh = g0[k * osf] + dn[k] + rh[k];                      \
                    const T dc = rc[k] + dh * o * ((T)1 - tc * tc);                \
                    zl[k] = dh * tc * o * ((T)1 - o);                              \
                    zl[t + k] = dc * (cl ? cl[k] : (T)0) * f * ((T)1 - f);         \
                    zl[2 * t + k] = dc * gg * ig * ((T)1 - ig);                    \
                    zl[3 * t + k] = dc * ig * ((T)1 - gg * gg);                    \
                    rc[k] = dc * f;                                                \
                }                                                                  \
                memcpy(dz, zl, sizeof(T) * (size_t)G);                             \
                /* Gradients for the upper and left neighbours' h; dn[j]   */     \
                /* was consumed above and now collects row i - 1's.        */     \
                if (i > 0) matvec_t_##SUF(dn, wgu, zl, t, G);                      \
                else for (int k = 0; k < t; ++k) dn[k] = 0;                        \
                if (j > 0) matvec_t_##SUF(rh, wgl, zl, t, G);                      \
            }                                                                      \
            /* Weight gradients of the whole row as two small GEMMs, far   */     \
            /* cheaper than an outer product per cell.                     */     \
            const T *hrow = h + b * hsb + d * hsd + i * hsi;                       \
            const T *zrow = dgx + b * dsb + d * dsd + i * dsi;                     \
            if (W > 1) outer_acc_##SUF(dwl, hrow, hsj, zrow + dsj, dsj, W - 1, t, G); \
            if (i > 0) outer_acc_##SUF(dwup, hrow - hsi, hsj, zrow, dsj, W, t, G);  \
        }                                                                          \
    }                                                                              \
    free(down); free(rh); free(rc); free(tcs); free(zl);                           \
}

DEFINE(float, f32)
DEFINE(double, f64)
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


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph`` / ``create_graph``).

    Unknown (an older torch without the query) counts as kept, the safe side.
    """
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


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
        return hid

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: torch.Tensor):
        wg, hid, cbuf, acts = ctx.saved_tensors
        b, d, t, h, w = hid.shape
        lib = load()
        # When the graph is freed after this backward (no retain_graph, no
        # create_graph), the gradient is written over the saved gate
        # activations, cell by cell as they are consumed, so the backward
        # allocates next to nothing. Either way it has the (D, B, H, W, 4t)
        # layout the layer's input projection writes, so it flows on
        # without a layout copy.
        dz = acts if not _graph_kept() else torch.empty_like(acts)
        dgx = dz.view(d, b, h, w, 4 * t).permute(1, 0, 4, 2, 3)
        dwt = hid.new_empty(d, b, 2, t, 4 * t)
        bwd = getattr(lib, f"arnn_bwd_{ctx.suf}")
        sb, sd, sf, si, sj = grad_h.stride()
        args_o = [ctypes.c_long(v) for v in (sb, sd, sf, si, sj)]
        args_h, args_d = _strides(hid), _strides(dgx)

        def run(s0, s1):
            bwd(_ptr(grad_h), *args_o, _ptr(wg), _ptr(hid), *args_h, _ptr(cbuf), _ptr(acts), _ptr(dgx), *args_d,
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
