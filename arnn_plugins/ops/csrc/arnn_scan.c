/* The diagonal LSTM scan of AttentionRNN on CPU (the C side of backend="fused").

   Per direction d and batch item b, for each image cell (i, j), gate order
   [o, f, i, g], upper neighbour (i - 1, j), left neighbour (i, j - 1):

       gates  = gx(i, j) + K_up h(i - 1, j) + K_left h(i, j - 1)
       c(i, j) = sigmoid(f) c(i, j - 1) + sigmoid(i) tanh(g)
       h(i, j) = sigmoid(o) tanh(c(i, j))

   with zero states outside the image. Given the layer's features x (B, D,
   H, W, Cin), each direction's in its own scan frame, instead of gx, the
   forward computes gx(i, j) = b_x + K_x x(i, j) in the tile itself, so the
   gate inputs are never written to memory and read back. On a CPU the scan is sequential
   within one image but independent across (direction, batch) pairs, and a
   per-step PyTorch op costs more in dispatch than the arithmetic it does.
   So arnn_fwd_* walks whole sequences s0 <= s < s1 (s = d * B + b) in raster
   order, which is a valid order for the recurrence: cell (i, j) needs only
   (i - 1, j) and (i, j - 1); a few batch items of one direction at a time
   (see NB below), so that their mat-vecs become one small GEMM sharing the
   weights. arnn_*_par_* split the blocks over threads (below); without
   OpenMP the caller, arnn_plugins/ops/cpu_kernel.py, splits them over
   Python threads (ctypes releases the GIL). The forward
   saves the gate activations and the cells; arnn_bwd_* is the reverse raster
   walk, and may write the input gradient over the saved activations (when
   the autograd graph is not retained) so that it allocates next to nothing.

   No Python or torch headers: the file builds with the system C compiler in
   about a second and needs nothing from the network. cpu_kernel.py compiles
   it once with -O3 -march=native -ffp-contract=fast -fopenmp -shared -fPIC
   -std=c99 -lm (without -fopenmp where the compiler lacks it) into
   ~/.cache/arnn-plugins/kernels, the library's name keyed by a hash of this
   file's text, the flags and the CPU's instruction sets. Exported:
   arnn_fwd_f32, arnn_fwd_f64, arnn_bwd_f32, arnn_bwd_f64, arnn_block, their
   arnn_*_par_* whole-scan forms and arnn_openmp. */

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
static inline __attribute__((always_inline)) v8sf v8_sig(v8sf x) { return 1.0f / (1.0f + v8_exp(-x)); }
static inline __attribute__((always_inline)) v8sf v8_tanh(v8sf x) { return 1.0f - 2.0f / (v8_exp(2.0f * x) + 1.0f); }
static inline float sig_f32(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float tanh_f32(float x) { return 1.0f - 2.0f / (expf(2.0f * x) + 1.0f); }

/* Gate order [o, f, i, g]; wt[d][r][k][g] = weight_hh[d, g, k, r] with
   r = 0 the upper neighbour and r = 1 the left one; the backward takes
   wg[d][r][g][k] = weight_hh[d, g, k, r]. Strides in elements; the feature
   dimension of gx, x, h and dgx is contiguous, gout's has stride osf. dgx
   may be the acts buffer itself: each cell's activations are read before
   its gradient is written over them. The projection: xin NULL (gx is read)
   or x with strides xsb, xsd, xsi, xsj, wx[d][g][k] = K_x and bx[d][g] its bias.

   Sequences s0 <= s < s1 go in blocks of NB consecutive batch items of one
   direction, which advance together cell by cell: they share the weights,
   so each weight vector loaded feeds NB multiply-adds, and NB independent
   dependency chains keep the FMA units busy where one sequence's chain
   (gates -> h -> next cell's gates) leaves them waiting on latency. A block
   short of NB items repeats its last item in rows whose results are never
   stored. The tiles read local copies of the weights padded with zeros to
   whole vectors, so no vector load reads past a buffer.

   Both functions return 0, or -1 when their scratch memory could not be
   allocated (nothing is written then). arnn_block() tells the caller NB, so
   that it hands threads whole blocks. */

#define NB 4 /* sequences per block */
#define VB 2 /* vectors per tile row: NB x VB accumulators fit 16 registers */
/* How many cells ahead the backward prefetches the saved activations: it
   walks them backwards, a stream the hardware prefetchers follow poorly. */
#define PD 4

/* The activations of a block's nb cells at once, vector index outer and item
   inner: each item's exp -> divide chain is long and those of the items are
   independent, so interleaving them keeps the vector units busy where one
   item at a time leaves them waiting on latency. Per element the operations
   are those of one item alone, so the results are the same to the bit.
   gate_acts: a[q] = [sigmoid(o, f, i), tanh(g)] in place; hidden: h[q] =
   o tanh(c[q]); tanh_block: y[q * t + k] = tanh(c[q][k]). */
static void gate_acts_f32(float *const *a, int nb, int t)
{
    const int n = 3 * t, nv = n / 8 * 8, m = t / 8 * 8;
    for (int k = 0; k < nv; k += 8)
        for (int q = 0; q < nb; ++q) v8_store(a[q] + k, v8_sig(v8_load(a[q] + k)));
    for (int k = 0; k < m; k += 8)
        for (int q = 0; q < nb; ++q) v8_store(a[q] + n + k, v8_tanh(v8_load(a[q] + n + k)));
    for (int q = 0; q < nb; ++q) {
        for (int k = nv; k < n; ++k) a[q][k] = sig_f32(a[q][k]);
        for (int k = n + m; k < n + t; ++k) a[q][k] = tanh_f32(a[q][k]);
    }
}
static void hidden_f32(float *const *h, const float *const *c, const float *const *a, int nb, int t)
{
    const int m = t / 8 * 8;
    for (int k = 0; k < m; k += 8)
        for (int q = 0; q < nb; ++q) v8_store(h[q] + k, v8_tanh(v8_load(c[q] + k)) * v8_load(a[q] + k));
    for (int q = 0; q < nb; ++q)
        for (int k = m; k < t; ++k) h[q][k] = tanh_f32(c[q][k]) * a[q][k];
}
static void tanh_block_f32(float *y, const float *const *c, int nb, int t)
{
    const int m = t / 8 * 8;
    for (int k = 0; k < m; k += 8)
        for (int q = 0; q < nb; ++q) v8_store(y + q * t + k, v8_tanh(v8_load(c[q] + k)));
    for (int q = 0; q < nb; ++q)
        for (int k = m; k < t; ++k) y[q * t + k] = tanh_f32(c[q][k]);
}
static void gate_acts_f64(double *const *a, int nb, int t)
{
    for (int q = 0; q < nb; ++q) {
        sig_n_f64(a[q], 3 * t);
        tanh_n_f64(a[q] + 3 * t, a[q] + 3 * t, t);
    }
}
static void hidden_f64(double *const *h, const double *const *c, const double *const *a, int nb, int t)
{
    for (int q = 0; q < nb; ++q) {
        tanh_n_f64(h[q], c[q], t);
        for (int k = 0; k < t; ++k) h[q][k] *= a[q][k];
    }
}
static void tanh_block_f64(double *y, const double *const *c, int nb, int t)
{
    for (int q = 0; q < nb; ++q) tanh_n_f64(y + q * t, c[q], t);
}

typedef float vec_f32 __attribute__((vector_size(32)));
typedef double vec_f64 __attribute__((vector_size(32)));

/* The gate gradients of one cell at features k (a vector of them, V, or one):
   read every activation before writing: z may be the activations' storage. */
#define SLOAD(p) (*(p))
#define SSTORE(p, v) (*(p) = (v))
#define GATE_GRADS(T, V, LD, ST)                                                   \
    do {                                                                           \
        const V o = LD(a + k), f = LD(a + t + k), ig = LD(a + 2 * t + k);          \
        const V gg = LD(a + 3 * t + k), tc = LD(tcs + k);                          \
        const V dh = LD(gk + k) + LD(dn + k) + LD(rhq + k);                        \
        const V dc = LD(rcq + k) + dh * o * ((T)1 - tc * tc);                      \
        ST(z + k, dh * tc * o * ((T)1 - o));                                       \
        ST(z + t + k, dc * LD(cl + k) * f * ((T)1 - f));                           \
        ST(z + 2 * t + k, dc * gg * ig * ((T)1 - ig));                             \
        ST(z + 3 * t + k, dc * ig * ((T)1 - gg * gg));                             \
        ST(rcq + k, dc * f);                                                       \
    } while (0)

/* Keep a loaded vector in a register: left alone, the compiler folds the
   load into every multiply-add that uses it, and the tiles then issue more
   loads than the core can serve, not more multiply-adds. */
#if defined(__x86_64__) && defined(__AVX__)
#define IN_REG(v) __asm__("" : "+x"(v))
#elif defined(__aarch64__)
#define IN_REG(v) __asm__("" : "+w"(v))
#else
#define IN_REG(v) ((void)0)
#endif

#define DEFINE(T, SUF)                                                             \
static inline vec_##SUF vload_##SUF(const T *p) { vec_##SUF v; memcpy(&v, p, sizeof v); return v; } \
static inline void vstore_##SUF(T *p, vec_##SUF v) { memcpy(p, &v, sizeof v); }  \
                                                                                   \
/* acc[q][v] += src[q][m] * w[v * L] for q < NB, v < VB: one rank-1 update */   \
/* of the tile, the VB weight vectors loaded once for the NB rows.          */   \
static inline __attribute__((always_inline)) void                                 \
mac_row_##SUF(vec_##SUF acc[NB][VB], const T *const *src, long m, const T *w)    \
{                                                                                  \
    enum { L = 32 / sizeof(T) };                                                   \
    vec_##SUF wv[VB];                                                              \
    for (int v = 0; v < VB; ++v) {                                                 \
        wv[v] = vload_##SUF(w + v * L);                                            \
        IN_REG(wv[v]);                                                             \
    }                                                                              \
    for (int q = 0; q < NB; ++q) {                                                 \
        const T x = src[q][m];                                                     \
        for (int v = 0; v < VB; ++v) acc[q][v] += x * wv[v];                       \
    }                                                                              \
}                                                                                  \
                                                                                   \
/* out[q][g] = x[q][g] + sum_k hs[r][q][k] * ws[r][k * Gp + g] for r with   */   \
/* hs[r] given, q < NB, g < Gp: the block's gate pre-activations (out[q] may */   \
/* be x[q]). With xp, x[q][g] is the input projection instead,               */   \
/* sum_{k < cin} xp[q][k] * wx[k * Gp + g] + bx[g]: summed from zero in      */   \
/* ascending k and the bias added last, the order in which the BLAS batched  */   \
/* matmul the layer would otherwise call sums it.                            */   \
static inline __attribute__((always_inline)) void                                 \
gates_tile_##SUF(T *const out[NB], const T *const x[NB], const T *const *hs[2],   \
                 const T *const ws[2], int t, int Gp, const T *const *xp,          \
                 const T *wx, const T *bx, int cin)                                \
{                                                                                  \
    enum { L = 32 / sizeof(T) };                                                   \
    for (int g0 = 0; g0 < Gp; g0 += VB * L) {                                      \
        vec_##SUF acc[NB][VB];                                                     \
        if (xp) {                                                                  \
            for (int q = 0; q < NB; ++q)                                           \
                for (int v = 0; v < VB; ++v) acc[q][v] = (vec_##SUF){0};           \
            for (int k = 0; k < cin; ++k)                                          \
                mac_row_##SUF(acc, xp, k, wx + (long)k * Gp + g0);                 \
            for (int v = 0; v < VB; ++v) {                                         \
                const vec_##SUF bv = vload_##SUF(bx + g0 + v * L);                 \
                for (int q = 0; q < NB; ++q) acc[q][v] = acc[q][v] + bv;           \
            }                                                                      \
        } else                                                                     \
            for (int q = 0; q < NB; ++q)                                           \
                for (int v = 0; v < VB; ++v) acc[q][v] = vload_##SUF(x[q] + g0 + v * L); \
        for (int r = 0; r < 2; ++r) {                                              \
            const T *const *hr = hs[r];                                            \
            if (!hr) continue;                                                     \
            for (int k = 0; k < t; ++k)                                            \
                mac_row_##SUF(acc, hr, k, ws[r] + (long)k * Gp + g0);              \
        }                                                                          \
        for (int q = 0; q < NB; ++q)                                               \
            for (int v = 0; v < VB; ++v) vstore_##SUF(out[q] + g0 + v * L, acc[q][v]); \
    }                                                                              \
}                                                                                  \
                                                                                   \
/* y[q][k] = sum_{g < G} z[q][g] * w[g * tp + k] for q < NB, k < tp.          */   \
static inline __attribute__((always_inline)) void                                 \
matvec_t_tile_##SUF(T *const y[NB], const T *const z[NB], const T *restrict w,    \
                    int G, int tp)                                                 \
{                                                                                  \
    enum { L = 32 / sizeof(T) };                                                   \
    for (int k0 = 0; k0 < tp; k0 += VB * L) {                                      \
        vec_##SUF acc[NB][VB];                                                     \
        for (int q = 0; q < NB; ++q)                                               \
            for (int v = 0; v < VB; ++v) acc[q][v] = (vec_##SUF){0};               \
        for (int g = 0; g < G; ++g) mac_row_##SUF(acc, z, g, w + (long)g * tp + k0); \
        for (int q = 0; q < NB; ++q)                                               \
            for (int v = 0; v < VB; ++v) vstore_##SUF(y[q] + k0 + v * L, acc[q][v]); \
    }                                                                              \
}                                                                                  \
                                                                                   \
/* dw[k][g] += sum_j hs[j * hsj + k] * zs[j * zsj + g] for j < n, k < t,     */   \
/* g < G: tiles of NB rows by VB vectors stay in registers over the j loop;  */   \
/* a row tile past t repeats row t - 1 and is not stored, gates past the last */  \
/* whole tile go one at a time.                                              */   \
static void outer_acc_##SUF(T *dw, const T *hs, long hsj, const T *zs, long zsj,  \
                            int n, int t, int G)                                  \
{                                                                                  \
    enum { L = 32 / sizeof(T) };                                                   \
    const int Gv = G / (VB * L) * (VB * L);                                        \
    for (int k0 = 0; k0 < t; k0 += NB) {                                           \
        const T *hk[NB]; /* column k0 + m of hs, a tile of NB rows of dw */        \
        for (int m = 0; m < NB; ++m) hk[m] = hs + (k0 + m < t ? k0 + m : t - 1);   \
        for (int g0 = 0; g0 < Gv; g0 += VB * L) {                                  \
            vec_##SUF acc[NB][VB];                                                 \
            for (int m = 0; m < NB; ++m)                                           \
                for (int v = 0; v < VB; ++v) acc[m][v] = (vec_##SUF){0};           \
            for (int j = 0; j < n; ++j)                                            \
                mac_row_##SUF(acc, hk, j * hsj, zs + j * zsj + g0);                \
            for (int m = 0; m < NB && k0 + m < t; ++m)                             \
                for (int v = 0; v < VB; ++v) {                                     \
                    T *d = dw + (long)(k0 + m) * G + g0 + v * L;                   \
                    vstore_##SUF(d, vload_##SUF(d) + acc[m][v]);                   \
                }                                                                  \
        }                                                                          \
        for (int m = 0; m < NB && k0 + m < t; ++m)                                 \
            for (int g = Gv; g < G; ++g) {                                         \
                T acc = 0;                                                         \
                for (int j = 0; j < n; ++j) acc += hs[j * hsj + k0 + m] * zs[j * zsj + g]; \
                dw[(long)(k0 + m) * G + g] += acc;                                 \
            }                                                                      \
    }                                                                              \
}                                                                                  \
                                                                                   \
int arnn_fwd_##SUF(const T *gx, long gsb, long gsd, long gsi, long gsj,            \
                   const T *xin, long xsb, long xsd, long xsi, long xsj, const T *wx, \
                   const T *bx, int cin,                                           \
                   const T *wt, T *h, long hsb, long hsd, long hsi, long hsj,      \
                   T *cbuf, T *acts, int B, int H, int W, int t, int s0, int s1)   \
{                                                                                  \
    enum { L = 32 / sizeof(T) };                                                   \
    const int G = 4 * t, Gp = (G + VB * L - 1) / (VB * L) * (VB * L);              \
    const int ncx = xin ? cin : 0;                                                 \
    T *wp = (T *)calloc((size_t)(2 * t + ncx + 1) * Gp, sizeof(T));                \
    T *sa = (T *)calloc((size_t)NB * Gp, sizeof(T));                               \
    if (!wp || !sa) { free(wp); free(sa); return -1; }                             \
    const T *const ws[2] = {wp, wp + (long)t * Gp};                                \
    T *wxp = wp + (long)2 * t * Gp, *bxp = wxp + (long)ncx * Gp;                   \
    for (int s = s0, dw = -1; s < s1;) {                                           \
        const int d = s / B, b0 = s % B;                                           \
        const int left = s1 - s < B - b0 ? s1 - s : B - b0;                        \
        const int nb = left < NB ? left : NB;                                      \
        if (d != dw) { /* this direction's K_h rows (and K_x, bias), padded to Gp */ \
            for (int rk = 0; rk < 2 * t; ++rk)                                     \
                memcpy(wp + (long)rk * Gp, wt + ((long)d * 2 * t + rk) * G, sizeof(T) * (size_t)G); \
            for (int k = 0; k < ncx; ++k)                                          \
                for (int g = 0; g < G; ++g) wxp[(long)k * Gp + g] = wx[((long)d * G + g) * cin + k]; \
            if (xin) memcpy(bxp, bx + (long)d * G, sizeof(T) * (size_t)G);         \
            dw = d;                                                                \
        }                                                                          \
        for (int i = 0; i < H; ++i) {                                              \
            for (int j = 0; j < W; ++j) {                                          \
                /* Whole tiles (Gp == G): read gx and write acts in place;   */   \
                /* otherwise through the padded scratch rows.                */   \
                const T *hu[NB], *hl[NB], *xq[NB], *pq[NB];                        \
                T *oq[NB];                                                         \
                for (int q = 0; q < NB; ++q) {                                     \
                    const int b = b0 + (q < nb ? q : nb - 1);                      \
                    const T *hb = h + b * hsb + d * hsd;                           \
                    hu[q] = i > 0 ? hb + (i - 1) * hsi + j * hsj : hb;             \
                    hl[q] = j > 0 ? hb + i * hsi + (j - 1) * hsj : hb;             \
                    oq[q] = sa + (long)q * Gp;                                     \
                    if (q < nb && Gp == G)                                         \
                        oq[q] = acts + (((long)(d * B + b) * H + i) * W + j) * G;  \
                    xq[q] = oq[q];                                                 \
                    if (xin) {                                                     \
                        pq[q] = xin + b * xsb + d * xsd + i * xsi + j * xsj;       \
                        continue;                                                  \
                    }                                                              \
                    const T *x = gx + b * gsb + d * gsd + i * gsi + j * gsj;       \
                    if (Gp == G) xq[q] = x;                                        \
                    else memcpy(oq[q], x, sizeof(T) * (size_t)G);                  \
                }                                                                  \
                const T *const *hs[2] = {i > 0 ? hu : 0, j > 0 ? hl : 0};          \
                gates_tile_##SUF(oq, xq, hs, ws, t, Gp, xin ? pq : 0, wxp, bxp, ncx); \
                T *aq[NB], *cq[NB], *hq[NB];                                       \
                for (int q = 0; q < nb; ++q) {                                     \
                    const int b = b0 + q;                                          \
                    const long cell = ((long)(d * B + b) * H + i) * W + j;         \
                    aq[q] = acts + cell * G;                                       \
                    cq[q] = cbuf + cell * t;                                       \
                    hq[q] = h + b * hsb + d * hsd + i * hsi + j * hsj;             \
                    if (Gp != G) memcpy(aq[q], oq[q], sizeof(T) * (size_t)G);      \
                }                                                                  \
                gate_acts_##SUF(aq, nb, t);                                        \
                for (int q = 0; q < nb; ++q) {                                     \
                    T *restrict a = aq[q], *restrict c = cq[q];                    \
                    if (j > 0) {                                                   \
                        const T *cl = c - t;                                       \
                        for (int k = 0; k < t; ++k)                                \
                            c[k] = a[t + k] * cl[k] + a[2 * t + k] * a[3 * t + k]; \
                    } else for (int k = 0; k < t; ++k) c[k] = a[2 * t + k] * a[3 * t + k]; \
                }                                                                  \
                hidden_##SUF(hq, (const T *const *)cq, (const T *const *)aq, nb, t); \
            }                                                                      \
        }                                                                          \
        s += nb;                                                                   \
    }                                                                              \
    free(wp); free(sa);                                                            \
    return 0;                                                                      \
}                                                                                  \
                                                                                   \
int arnn_bwd_##SUF(const T *go, long osb, long osd, long osf, long osi,            \
                   long osj, const T *wg, const T *h, long hsb, long hsd,          \
                   long hsi, long hsj, const T *cbuf, const T *acts,               \
                   T *dgx, long dsb, long dsd, long dsi, long dsj, T *dwt,         \
                   int B, int H, int W, int t, int s0, int s1)                     \
{                                                                                  \
    enum { L = 32 / sizeof(T) };                                                   \
    const int G = 4 * t, tp = (t + VB * L - 1) / (VB * L) * (VB * L);              \
    /* Per item: down[j] the gradient into h(i, j) from row i + 1 (then it    */   \
    /* collects row i - 1's), rh / rc the gradients into h and c from the     */   \
    /* right neighbour; zero stands for the cell left of column 0.            */   \
    T *wp = (T *)calloc((size_t)2 * G * tp, sizeof(T));                            \
    T *down = (T *)calloc((size_t)NB * W * tp, sizeof(T));                         \
    T *rh = (T *)calloc((size_t)NB * tp, sizeof(T));                               \
    T *rc = (T *)calloc((size_t)NB * t, sizeof(T));                                \
    T *restrict zero = (T *)calloc((size_t)t, sizeof(T));                          \
    T *restrict tcb = (T *)calloc((size_t)NB * t, sizeof(T));                      \
    T *restrict gh = (T *)calloc((size_t)t, sizeof(T));                            \
    if (!wp || !down || !rh || !rc || !zero || !tcb || !gh) {                        \
        free(wp); free(down); free(rh); free(rc); free(zero); free(tcb); free(gh);  \
        return -1;                                                                 \
    }                                                                              \
    const T *wgu = wp, *wgl = wp + (long)G * tp;                                   \
    for (int s = s0, dw = -1; s < s1;) {                                           \
        const int d = s / B, b0 = s % B;                                           \
        const int left = s1 - s < B - b0 ? s1 - s : B - b0;                        \
        const int nb = left < NB ? left : NB;                                      \
        if (d != dw) { /* this direction's K_h^T rows, padded to tp */             \
            for (int rg = 0; rg < 2 * G; ++rg)                                     \
                memcpy(wp + (long)rg * tp, wg + ((long)d * 2 * G + rg) * t, sizeof(T) * (size_t)t); \
            dw = d;                                                                \
        }                                                                          \
        const T *zq[NB];                                                           \
        T *dq[NB], *rq[NB];                                                        \
        for (int q = 0; q < NB; ++q) rq[q] = rh + (long)q * tp;                    \
        memset(down, 0, sizeof(T) * (size_t)NB * W * tp);                          \
        memset(dwt + (long)s * 2 * t * G, 0, sizeof(T) * (size_t)nb * 2 * t * G);  \
        for (int i = H - 1; i >= 0; --i) {                                         \
            memset(rh, 0, sizeof(T) * (size_t)NB * tp);                            \
            memset(rc, 0, sizeof(T) * (size_t)NB * t);                             \
            for (int j = W - 1; j >= 0; --j) {                                     \
                const T *cq[NB];                                                   \
                for (int q = 0; q < nb; ++q)                                       \
                    cq[q] = cbuf + (((long)(d * B + b0 + q) * H + i) * W + j) * t; \
                tanh_block_##SUF(tcb, cq, nb, t);                                  \
                for (int q = 0; q < nb; ++q) {                                     \
                    const int b = b0 + q;                                          \
                    const long cell = ((long)(d * B + b) * H + i) * W + j;         \
                    const T *tcs = tcb + (long)q * t;                              \
                    const T *a = acts + cell * G, *c = cbuf + cell * t;            \
                    if (j >= PD) {                                                 \
                        const char *pa = (const char *)(a - PD * G);               \
                        for (int l = 0; l < (int)(G * sizeof(T)); l += 64)          \
                            __builtin_prefetch(pa + l, 0, 3);                      \
                        __builtin_prefetch(c - PD * t, 0, 3);                      \
                    }                                                              \
                    const T *g0 = go + b * osb + d * osd + i * osi + j * osj;      \
                    const T *dn = down + ((long)q * W + j) * tp, *rhq = rq[q];     \
                    T *rcq = rc + (long)q * t;                                     \
                    T *z = dgx + b * dsb + d * dsd + i * dsi + j * dsj;            \
                    zq[q] = z;                                                     \
                    const T *gk = g0, *cl = j > 0 ? c - t : zero;                  \
                    if (osf != 1) { for (int k = 0; k < t; ++k) gh[k] = g0[k * osf]; gk = gh; } \
                    if (t % L == 0)                                                \
                        for (int k = 0; k < t; k += L)                             \
                            GATE_GRADS(T, vec_##SUF, vload_##SUF, vstore_##SUF);   \
                    else for (int k = 0; k < t; ++k) GATE_GRADS(T, T, SLOAD, SSTORE); \
                }                                                                  \
                /* Gradients for the upper and left neighbours' h; down[j]  */    \
                /* was consumed above and now collects row i - 1's.         */    \
                for (int q = 0; q < NB; ++q) {                                     \
                    dq[q] = down + ((long)q * W + j) * tp;                         \
                    if (q >= nb) zq[q] = zq[nb - 1];                               \
                }                                                                  \
                if (i > 0) matvec_t_tile_##SUF(dq, zq, wgu, G, tp);                \
                if (j > 0) matvec_t_tile_##SUF(rq, zq, wgl, G, tp);                \
            }                                                                      \
            /* Weight gradients of the whole row as two small GEMMs, far    */    \
            /* cheaper than an outer product per cell.                      */    \
            for (int q = 0; q < nb; ++q) {                                         \
                const int b = b0 + q;                                              \
                T *dwup = dwt + (long)(s + q) * 2 * t * G, *dwl = dwup + (long)t * G; \
                const T *hrow = h + b * hsb + d * hsd + i * hsi;                   \
                const T *zrow = dgx + b * dsb + d * dsd + i * dsi;                 \
                if (W > 1) outer_acc_##SUF(dwl, hrow, hsj, zrow + dsj, dsj, W - 1, t, G); \
                if (i > 0) outer_acc_##SUF(dwup, hrow - hsi, hsj, zrow, dsj, W, t, G); \
            }                                                                      \
        }                                                                          \
        s += nb;                                                                   \
    }                                                                              \
    free(wp); free(down); free(rh); free(rc); free(zero); free(tcb); free(gh);      \
    return 0;                                                                      \
}

DEFINE(float, f32)
DEFINE(double, f64)

int arnn_block(void) { return NB; }

/* The whole scan on nthreads threads: blocks of NB items of one direction,
   each thread taking the next block when it is done with one (a busy core
   then slows the scan only by the blocks it does not get to). Built with
   -fopenmp, the threads are those of the OpenMP runtime already loaded in
   the process: PyTorch's own intra-op pool on Linux wheels, whose workers
   are waiting for work right after torch's previous op. A separate pool of
   threads would compete with them for the same cores. Only a plain
   parallel region and atomics, so any libgomp since GCC 4.9 serves it.
   Returns 0, or -1 if some block could not allocate its scratch. */
#ifdef _OPENMP
int arnn_openmp(void) { return 1; }
#else
int arnn_openmp(void) { return 0; }
#endif

#define PARALLEL_BLOCKS(CALL)                                                      \
    const int per = (B + NB - 1) / NB, total = D * per;                            \
    int next = 0, rc = 0;                                                          \
    _Pragma("omp parallel num_threads(nthreads)")                                  \
    for (;;) {                                                                     \
        const int k = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);              \
        if (k >= total) break;                                                     \
        const int b0 = (k % per) * NB, s0 = (k / per) * B + b0;                    \
        const int s1 = s0 + (B - b0 < NB ? B - b0 : NB);                           \
        if (CALL) __atomic_store_n(&rc, -1, __ATOMIC_RELAXED);                     \
    }                                                                              \
    return rc;

#define DEFINE_PAR(T, SUF)                                                         \
int arnn_fwd_par_##SUF(const T *gx, long gsb, long gsd, long gsi, long gsj,        \
                       const T *xin, long xsb, long xsd, long xsi, long xsj,       \
                       const T *wx,                                                \
                       const T *bx, int cin,                                       \
                       const T *wt, T *h, long hsb, long hsd, long hsi, long hsj,  \
                       T *cbuf, T *acts, int B, int H, int W, int t, int D,        \
                       int nthreads)                                               \
{                                                                                  \
    PARALLEL_BLOCKS(arnn_fwd_##SUF(gx, gsb, gsd, gsi, gsj, xin, xsb, xsd, xsi, xsj, wx, \
                                   bx, cin, wt, h, hsb, hsd, hsi, hsj, cbuf, acts, \
                                   B, H, W, t, s0, s1))                            \
}                                                                                  \
                                                                                   \
int arnn_bwd_par_##SUF(const T *go, long osb, long osd, long osf, long osi,        \
                       long osj, const T *wg, const T *h, long hsb, long hsd,      \
                       long hsi, long hsj, const T *cbuf, const T *acts,           \
                       T *dgx, long dsb, long dsd, long dsi, long dsj, T *dwt,     \
                       int B, int H, int W, int t, int D, int nthreads)            \
{                                                                                  \
    PARALLEL_BLOCKS(arnn_bwd_##SUF(go, osb, osd, osf, osi, osj, wg, h, hsb, hsd,   \
                                   hsi, hsj, cbuf, acts, dgx, dsb, dsd, dsi, dsj,  \
                                   dwt, B, H, W, t, s0, s1))                       \
}

DEFINE_PAR(float, f32)
DEFINE_PAR(double, f64)
