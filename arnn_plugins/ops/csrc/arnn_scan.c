/* The diagonal LSTM scan of AttentionRNN on CPU (the C side of backend="fused").

   Per direction d and batch item b, for each image cell (i, j), gate order
   [o, f, i, g], upper neighbour (i - 1, j), left neighbour (i, j - 1):

       gates  = gx(i, j) + K_up h(i - 1, j) + K_left h(i, j - 1)
       c(i, j) = sigmoid(f) c(i, j - 1) + sigmoid(i) tanh(g)
       h(i, j) = sigmoid(o) tanh(c(i, j))

   with zero states outside the image. On a CPU the scan is sequential
   within one image but independent across (direction, batch) pairs, and a
   per-step PyTorch op costs more in dispatch than the arithmetic it does.
   So arnn_fwd_* walks whole sequences s0 <= s < s1 (s = d * B + b) in raster
   order, which is a valid order for the recurrence: cell (i, j) needs only
   (i - 1, j) and (i, j - 1). The caller, arnn_plugins/ops/cpu_kernel.py,
   splits the sequences over threads (ctypes releases the GIL). The forward
   saves the gate activations and the cells; arnn_bwd_* is the reverse raster
   walk, and may write the input gradient over the saved activations (when
   the autograd graph is not retained) so that it allocates next to nothing.

   No Python or torch headers: the file builds with the system C compiler in
   about a second and needs nothing from the network. cpu_kernel.py compiles
   it once with -O3 -march=native -shared -fPIC -std=c99 -lm into
   ~/.cache/arnn-plugins/kernels, the library's name keyed by a hash of this
   file's text, the flags and the CPU's instruction sets. Exported:
   arnn_fwd_f32, arnn_fwd_f64, arnn_bwd_f32, arnn_bwd_f64. */

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
