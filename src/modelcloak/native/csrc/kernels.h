/* Compute kernels of the native enclave, included by the generated model.c.
 *
 * Plain C99 plus GCC/Clang vector types (8 floats; the compiler maps them to AVX/AVX2/AVX-512 or
 * to pairs of NEON registers). The dense kernel is register-blocked: 6 rows x 16 columns of
 * accumulators (12 vector registers, enough independent FMAs to cover their latency) stay in
 * registers while B streams from a panel layout packed at LOAD, or in place from an im2col matrix.
 */
#ifndef MC_KERNELS_H
#define MC_KERNELS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef float mc_v8 __attribute__((vector_size(32)));
typedef float mc_v8u __attribute__((vector_size(32), aligned(4)));   /* unaligned access */

#define MC_PANEL 16

static inline size_t mc_panels(int m) { return (size_t)(m + MC_PANEL - 1) / MC_PANEL; }

/* Pack w ([K][M] row-major, or [M][K] when transposed) into panels of 16 columns:
 * panel p holds, for k = 0..K-1, the 16 values w[k][16p .. 16p+15] (zero beyond M). */
static inline void mc_pack(float *restrict out, const float *restrict w, int K, int M, int transposed, float scale) {
    for (size_t p = 0; p < mc_panels(M); p++)
        for (int k = 0; k < K; k++)
            for (int j = 0; j < MC_PANEL; j++) {
                int col = (int)p * MC_PANEL + j;
                float v = col < M ? (transposed ? w[(size_t)col * K + k] : w[(size_t)k * M + col]) : 0.f;
                out[(p * (size_t)K + (size_t)k) * MC_PANEL + (size_t)j] = v * scale;
            }
}

static inline mc_v8 mc_splat(float a) { return (mc_v8){a, a, a, a, a, a, a, a}; }

/* One 16-column panel of y = x * B (+ biases): B's value at (k, j) is b[k * bstride + j] for j < 16,
 * so a packed panel has bstride 16 and a row-major matrix its row length. Writes `cols` columns. */
static inline void mc_gemm_panel(int rows, int K, int cols, const float *restrict x, size_t ldx,
                                 const float *restrict b, size_t bstride, const float *restrict bias_col,
                                 const float *restrict bias_row, float *restrict y, size_t ldy) {
    mc_v8 b0 = mc_splat(0.f), b1 = mc_splat(0.f);
    if (bias_col) {
        float tmp[MC_PANEL] = {0};
        memcpy(tmp, bias_col, (size_t)cols * sizeof(float));
        b0 = *(const mc_v8u *)tmp, b1 = *(const mc_v8u *)(tmp + 8);
    }
    int r = 0;
    for (; r + 6 <= rows; r += 6) {
        const float *x0 = x + (size_t)r * ldx;
        mc_v8 a[6][2];
        for (int i = 0; i < 6; i++) {
            float br = bias_row ? bias_row[r + i] : 0.f;
            a[i][0] = b0 + br, a[i][1] = b1 + br;
        }
        for (int k = 0; k < K; k++) {
            mc_v8 w0 = *(const mc_v8u *)(b + (size_t)k * bstride);
            mc_v8 w1 = *(const mc_v8u *)(b + (size_t)k * bstride + 8);
            for (int i = 0; i < 6; i++) {
                mc_v8 s = mc_splat(x0[(size_t)i * ldx + k]);
                a[i][0] += s * w0, a[i][1] += s * w1;
            }
        }
        for (int i = 0; i < 6; i++) {
            float out[MC_PANEL];
            *(mc_v8u *)out = a[i][0], *(mc_v8u *)(out + 8) = a[i][1];
            memcpy(y + (size_t)(r + i) * ldy, out, (size_t)cols * sizeof(float));
        }
    }
    for (; r + 4 <= rows; r += 4) {
        const float *x0 = x + (size_t)r * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
        mc_v8 a00 = b0, a01 = b1, a10 = b0, a11 = b1, a20 = b0, a21 = b1, a30 = b0, a31 = b1;
        if (bias_row) {
            a00 += bias_row[r], a01 += bias_row[r], a10 += bias_row[r + 1], a11 += bias_row[r + 1];
            a20 += bias_row[r + 2], a21 += bias_row[r + 2], a30 += bias_row[r + 3], a31 += bias_row[r + 3];
        }
        for (int k = 0; k < K; k++) {
            mc_v8 w0 = *(const mc_v8u *)(b + (size_t)k * bstride);
            mc_v8 w1 = *(const mc_v8u *)(b + (size_t)k * bstride + 8);
            mc_v8 s;
            s = mc_splat(x0[k]), a00 += s * w0, a01 += s * w1;
            s = mc_splat(x1[k]), a10 += s * w0, a11 += s * w1;
            s = mc_splat(x2[k]), a20 += s * w0, a21 += s * w1;
            s = mc_splat(x3[k]), a30 += s * w0, a31 += s * w1;
        }
        float out[4][MC_PANEL];
        *(mc_v8u *)out[0] = a00, *(mc_v8u *)(out[0] + 8) = a01, *(mc_v8u *)out[1] = a10, *(mc_v8u *)(out[1] + 8) = a11;
        *(mc_v8u *)out[2] = a20, *(mc_v8u *)(out[2] + 8) = a21, *(mc_v8u *)out[3] = a30, *(mc_v8u *)(out[3] + 8) = a31;
        for (int i = 0; i < 4; i++) memcpy(y + (size_t)(r + i) * ldy, out[i], (size_t)cols * sizeof(float));
    }
    for (; r < rows; r++) {   /* leftover rows: two accumulator pairs hide the FMA latency */
        const float *x0 = x + (size_t)r * ldx;
        float br = bias_row ? bias_row[r] : 0.f;
        mc_v8 a0 = b0 + br, a1 = b1 + br, c0 = mc_splat(0.f), c1 = mc_splat(0.f);
        int k = 0;
        for (; k + 2 <= K; k += 2) {
            const float *w = b + (size_t)k * bstride;
            mc_v8 s = mc_splat(x0[k]), t = mc_splat(x0[k + 1]);
            a0 += s * *(const mc_v8u *)w, a1 += s * *(const mc_v8u *)(w + 8);
            c0 += t * *(const mc_v8u *)(w + bstride), c1 += t * *(const mc_v8u *)(w + bstride + 8);
        }
        for (; k < K; k++) {
            mc_v8 s = mc_splat(x0[k]);
            a0 += s * *(const mc_v8u *)(b + (size_t)k * bstride);
            a1 += s * *(const mc_v8u *)(b + (size_t)k * bstride + 8);
        }
        float out[MC_PANEL];
        *(mc_v8u *)out = a0 + c0, *(mc_v8u *)(out + 8) = a1 + c1;
        memcpy(y + (size_t)r * ldy, out, (size_t)cols * sizeof(float));
    }
}

/* y[r][j] = bias_col[j] + bias_row[r] + sum_k x[r][k] * w[k][j] for r < rows, j < M.
 * x: rows x K (row stride ldx), w: packed panels (mc_pack), y: rows x M (row stride ldy); either bias may be NULL. */
static inline void mc_gemm(int rows, int K, int M, const float *restrict x, size_t ldx, const float *restrict w,
                           const float *restrict bias_col, const float *restrict bias_row, float *restrict y, size_t ldy) {
    for (size_t p = 0; p < mc_panels(M); p++) {
        int j0 = (int)p * MC_PANEL, cols = M - j0 < MC_PANEL ? M - j0 : MC_PANEL;
        mc_gemm_panel(rows, K, cols, x, ldx, w + p * (size_t)K * MC_PANEL, MC_PANEL, bias_col ? bias_col + j0 : NULL,
                      bias_row, y + j0, ldy);
    }
}

/* As mc_gemm with B a plain row-major K x M matrix (row stride ldb), as convolutions produce it:
 * full panels are read in place; the last partial one is first copied into `tail` (K x 16 floats)
 * so that no load runs past the end of B. */
static inline void mc_gemm_rows(int rows, int K, int M, const float *restrict x, size_t ldx, const float *restrict b,
                                size_t ldb, const float *restrict bias_row, float *restrict tail, float *restrict y,
                                size_t ldy) {
    int j0 = 0;
    for (; j0 + MC_PANEL <= M; j0 += MC_PANEL)
        mc_gemm_panel(rows, K, MC_PANEL, x, ldx, b + j0, ldb, NULL, bias_row, y + j0, ldy);
    if (j0 < M) {
        int cols = M - j0;
        for (int k = 0; k < K; k++) {
            memcpy(tail + (size_t)k * MC_PANEL, b + (size_t)k * ldb + j0, (size_t)cols * sizeof(float));
            memset(tail + (size_t)k * MC_PANEL + cols, 0, (size_t)(MC_PANEL - cols) * sizeof(float));
        }
        mc_gemm_panel(rows, K, cols, x, ldx, tail, MC_PANEL, NULL, bias_row, y + j0, ldy);
    }
}

/* Softmax over `axis` of length `len` for `outer` x `inner` positions (inner = elements after the axis). */
static inline void mc_softmax(size_t outer, size_t len, size_t inner, const float *restrict x, float *restrict y) {
    for (size_t o = 0; o < outer; o++)
        for (size_t i = 0; i < inner; i++) {
            const float *in = x + o * len * inner + i;
            float *out = y + o * len * inner + i;
            float top = -INFINITY, sum = 0.f;
            for (size_t c = 0; c < len; c++) top = fmaxf(top, in[c * inner]);
            for (size_t c = 0; c < len; c++) sum += out[c * inner] = expf(in[c * inner] - top);
            for (size_t c = 0; c < len; c++) out[c * inner] /= sum;
        }
}

/* LayerNormalization of `outer` rows of `len` values: (x - mean) / sqrt(var + eps) * scale + bias
 * (bias may be NULL). Two passes over the row, as onnxruntime computes mean and variance. */
static inline void mc_layernorm(size_t outer, size_t len, float eps, const float *restrict scale,
                                const float *restrict bias, const float *restrict x, float *restrict y) {
    for (size_t o = 0; o < outer; o++) {
        const float *in = x + o * len;
        float *out = y + o * len;
        float mean = 0.f, var = 0.f;
        for (size_t c = 0; c < len; c++) mean += in[c];
        mean /= (float)len;
        for (size_t c = 0; c < len; c++) var += (in[c] - mean) * (in[c] - mean);
        const float inv = 1.f / sqrtf(var / (float)len + eps);
        for (size_t c = 0; c < len; c++) out[c] = (in[c] - mean) * inv * scale[c] + (bias ? bias[c] : 0.f);
    }
}

/* Walk every index of an output of `rank` dims (dims[0] is the batch), giving the element offsets
 * of two broadcast inputs (stride 0 on broadcast axes). The generator only uses this where no
 * simpler loop fits. The body is the variadic part, so that commas inside it need no parentheses. */
#define MC_BROADCAST(rank, dims, as, bs, ...)                                                   \
    do {                                                                                        \
        int64_t idx_[MC_MAX_RANK + 1] = {0};                                                    \
        size_t ia = 0, ib = 0, io = 0, total_ = 1;                                              \
        for (int d_ = 0; d_ < (rank); d_++) total_ *= (size_t)(dims)[d_];                       \
        for (io = 0; io < total_; io++) {                                                       \
            __VA_ARGS__;                                                                        \
            for (int d_ = (rank)-1; d_ >= 0; d_--) {                                            \
                ia += (size_t)(as)[d_], ib += (size_t)(bs)[d_];                                 \
                if (++idx_[d_] < (dims)[d_]) break;                                             \
                ia -= (size_t)(as)[d_] * (size_t)(dims)[d_], ib -= (size_t)(bs)[d_] * (size_t)(dims)[d_]; \
                idx_[d_] = 0;                                                                   \
            }                                                                                   \
        }                                                                                       \
    } while (0)

/* Geometry of one 2-D window op (1-D ops use h = kh = 1): input c x h x w, output oh x ow. */
typedef struct {
    int c, h, w, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow;
} mc_window;

/* im2col into a row-major K x P matrix: row k = (ci, ky, kx), column = (oy, ox), for mc_gemm_rows.
 * Each output row is a strided copy (contiguous when the stride is 1) with its padding split off
 * in front and behind, so no index is divided per element. */
static inline void mc_im2col(const mc_window *g, const float *restrict x, float *restrict out) {
    const int sw = g->sw;
    const size_t P = (size_t)g->oh * (size_t)g->ow;
    for (int ci = 0; ci < g->c; ci++)
        for (int ky = 0; ky < g->kh; ky++)
            for (int kx = 0; kx < g->kw; kx++) {
                float *restrict dst = out + (size_t)((ci * g->kh + ky) * g->kw + kx) * P;
                const int shift = kx * g->dw - g->pl;                            /* ix = ox * sw + shift */
                int lo = shift >= 0 ? 0 : (-shift + sw - 1) / sw;                /* first ox with ix >= 0 */
                int hi = g->w - 1 - shift < 0 ? 0 : (g->w - 1 - shift) / sw + 1; /* first ox with ix >= w */
                if (hi > g->ow) hi = g->ow;
                if (lo > hi) lo = hi;
                for (int oy = 0; oy < g->oh; oy++, dst += g->ow) {
                    const int iy = oy * g->sh - g->pt + ky * g->dh;
                    if (iy < 0 || iy >= g->h) {
                        memset(dst, 0, (size_t)g->ow * sizeof(float));
                        continue;
                    }
                    const float *restrict row = x + ((size_t)ci * g->h + (size_t)iy) * g->w;
                    for (int o = 0; o < lo; o++) dst[o] = 0.f;
                    if (sw == 1)
                        memcpy(dst + lo, row + lo + shift, (size_t)(hi - lo) * sizeof(float));
                    else
                        for (int o = lo; o < hi; o++) dst[o] = row[o * sw + shift];
                    for (int o = hi; o < g->ow; o++) dst[o] = 0.f;
                }
            }
}

/* Depthwise convolution (one filter per channel): direct loops, interior without bounds checks. */
static inline void mc_depthwise(const mc_window *g, const float *restrict x, const float *restrict wt,
                                const float *restrict bias, float *restrict y) {
    for (int c = 0; c < g->c; c++) {
        const float *xc = x + (size_t)c * g->h * g->w, *wc = wt + (size_t)c * g->kh * g->kw;
        float *yc = y + (size_t)c * g->oh * g->ow;
        for (int oy = 0; oy < g->oh; oy++)
            for (int ox = 0; ox < g->ow; ox++) {
                float acc = bias ? bias[c] : 0.f;
                int iy0 = oy * g->sh - g->pt, ix0 = ox * g->sw - g->pl;
                for (int ky = 0; ky < g->kh; ky++) {
                    int iy = iy0 + ky * g->dh;
                    if (iy < 0 || iy >= g->h) continue;
                    for (int kx = 0; kx < g->kw; kx++) {
                        int ix = ix0 + kx * g->dw;
                        if (ix >= 0 && ix < g->w) acc += xc[(size_t)iy * g->w + (size_t)ix] * wc[ky * g->kw + kx];
                    }
                }
                yc[(size_t)oy * g->ow + (size_t)ox] = acc;
            }
    }
}

/* Pooling: mode 0 max, 1 average counting padding, 2 average over the window's valid cells. */
static inline void mc_pool(const mc_window *g, int mode, const float *restrict x, float *restrict y) {
    for (int c = 0; c < g->c; c++)
        for (int oy = 0; oy < g->oh; oy++)
            for (int ox = 0; ox < g->ow; ox++) {
                float acc = mode == 0 ? -INFINITY : 0.f;
                int valid = 0;
                for (int ky = 0; ky < g->kh; ky++) {
                    int iy = oy * g->sh - g->pt + ky * g->dh;
                    for (int kx = 0; kx < g->kw; kx++) {
                        int ix = ox * g->sw - g->pl + kx * g->dw;
                        if (iy < 0 || iy >= g->h || ix < 0 || ix >= g->w) continue;
                        float v = x[((size_t)c * g->h + (size_t)iy) * g->w + (size_t)ix];
                        acc = mode == 0 ? (v > acc || isnan(v) ? v : acc) : acc + v;
                        valid++;
                    }
                }
                if (mode == 1) acc /= (float)(g->kh * g->kw);
                if (mode == 2) acc /= (float)(valid ? valid : 1);
                y[((size_t)c * g->oh + (size_t)oy) * g->ow + (size_t)ox] = acc;
            }
}

/* Reduce the middle axis of outer x len x inner: mode 0 mean, 1 max, 2 sum. */
static inline void mc_reduce(size_t outer, size_t len, size_t inner, int mode, const float *restrict x, float *restrict y) {
    for (size_t o = 0; o < outer; o++)
        for (size_t i = 0; i < inner; i++) {
            const float *in = x + o * len * inner + i;
            float acc = mode == 1 ? -INFINITY : 0.f;
            for (size_t c = 0; c < len; c++) acc = mode == 1 ? (in[c * inner] > acc || isnan(in[c * inner]) ? in[c * inner] : acc) : acc + in[c * inner];
            y[o * inner + i] = mode == 0 ? acc / (float)len : acc;
        }
}

#endif
