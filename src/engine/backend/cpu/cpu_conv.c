/*
 * cpu_conv.c - torch.nn.Conv2d (NCHW, square kernel, zero padding, stride)
 * as matrix products, in one of three ways.
 *
 * A 1x1 convolution with stride 1 is already a product: per image,
 * y[O, H*W] = w[O, C] @ x[C, H*W], split over the threads by sdx4_cpu_gemm.
 *
 * A 3x3 convolution with stride 1 and 32 or more channels in and out
 * (nearly all the work of the UNet and the VAE, and all of the ESRGAN
 * family's: Real-ESRGAN x4plus ran 1.5 times as fast as with im2col, its
 * dense blocks' 32 to 64 outputs from 64 to 192 channels) uses Winograd's
 * F(4x4, 3x3): each 4x4
 * block of output is A^T [sum over c of (G g G^T) * (B^T d B)] A, d being
 * the 6x6 input patch under it and g the kernel. That is 36 matrix
 * products, M[e] = U[e] @ V[e] for e over the 6x6 transformed positions,
 * of the transformed weights U[e] [O, C] and the transformed patches V[e]
 * [C, tiles]: 36 multiplications per 4x4 outputs instead of 144 (F(2x2,
 * 3x3) needs 64). The transforms scale by fractions, so the rounding
 * error grows: 3e-6 to 4e-6 of the largest output at 128 to 1024 channels,
 * against 5e-7 to 6e-7 for F(2x2, 3x3) (the tests hold it to 1e-5). The
 * weights are transformed once per call, in blocks of output channels;
 * the 4x4 tiles of all images are cut into units of tens to hundreds, and
 * each thread transforms its unit's patches, runs the 36 products and
 * writes the output. On two Zen 4 cores this ran 1.1 to 1.4 times as fast as F(2x2,
 * 3x3) on the model's layers.
 *
 * Anything else goes through im2col, in tiles of output pixels: for a
 * tile of P consecutive output pixels (in row-major order, so a tile may
 * span several output rows), the column buffer col[C*k*k, P] holds the
 * input value under each kernel tap for each pixel (zero in the padding),
 * and y[O, tile] = w[O, C*k*k] @ col is written straight into the NCHW
 * output with leading dimension Ho*Wo.
 *
 * Both tiled paths keep their scratch per thread bounded (4 MB of columns,
 * 16 MB for a Winograd unit, twice that where the fewest pixels or tiles
 * a unit needs are larger; Winograd adds one call's transformed weights,
 * about 36 MB at most) whatever the channel count or image size
 * (the VAE's 512x512 layers need no more than the UNet's), spread the
 * units of all images over the threads, each running single-threaded
 * sgemms (see cpu_internal.h), and make the unit count a multiple of the
 * thread count when it is small, so no thread idles at the end.
 *
 * One layer at 2048x2048 takes a second or more on two cores, so every
 * unit (and each piece of a 1x1's product, see sdx4_cpu_gemm) first reads the
 * caller's cancel flag (core/cancel.h): once it is set, the units left
 * are skipped and the convolution fails as canceled.
 */
#include <inttypes.h>
#include <limits.h>
#include <omp.h>
#include <string.h>

#include <cblas.h>

#include "backend/cpu/cpu_internal.h"
#include "core/cancel.h"
#include "core/error.h"

/* Scratch per thread for one tile's columns: a few hundred pixels at the
 * UNet's widest layers, and small enough to stay in the shared L3 cache. */
#define COL_BUDGET_BYTES ((int64_t)4 << 20)
/* With fewer pixels per tile the sgemm spends more time repacking the
 * weights (once per tile) than multiplying: tiles may grow to this many
 * pixels, up to COL_LIMIT_BYTES of columns (1024 channels at 16x16). */
#define MIN_TILE_PIXELS 256
#define COL_LIMIT_BYTES ((int64_t)16 << 20)
/* Scratch per thread for one unit of Winograd tiles (input and product),
 * and the fewest 4x4 tiles per unit. OpenBLAS repacks a unit's 36 weight
 * matrices for every unit, so units of fewer tiles spend more of their
 * time packing (at 512 channels, 8 MB units took 25% longer than 16 MB
 * ones; 32 MB gained 5% more). */
#define WINOGRAD_BUDGET_BYTES ((int64_t)16 << 20)
#define WINOGRAD_MIN_TILES 32
#define WINOGRAD_PAD 16
/* Output x input channels transformed at once, about: 36 MB of weights
 * (a block of ceil(O / blocks) channels can pass it by less than C). */
#define WINOGRAD_WEIGHTS ((int64_t)512 * 512)

typedef struct {
    int64_t C, H, W;   /* input channels and size */
    int64_t O, Ho, Wo; /* output channels and size */
    int k, stride, pad;
} conv_shape;

/* First output column ox in [0, Wo) whose tap kx lands inside the input
 * (ix = ox*stride - pad + kx >= 0), and one past the last (ix < W). */
static void valid_columns(const conv_shape *s, int kx, int64_t *lo, int64_t *hi) {
    int64_t first = s->pad - kx; /* smallest ox*stride allowed */
    *lo = first <= 0 ? 0 : (first + s->stride - 1) / s->stride;
    int64_t last = s->W - 1 + s->pad - kx; /* largest ox*stride allowed */
    *hi = last < 0 ? 0 : last / s->stride + 1;
    if (*hi > s->Wo) *hi = s->Wo;
    if (*lo > *hi) *lo = *hi;
}

/* col[(c*k + ky)*k + kx][p - p0] = x[c, oy*stride - pad + ky, ox*stride - pad + kx]
 * for the output pixels p = oy*Wo + ox in [p0, p0 + P), zero outside x. */
static void im2col_tile(const conv_shape *s, const float *x, int64_t p0, int64_t P, float *col) {
    const int k = s->k;
    for (int64_t c = 0; c < s->C; c++) {
        const float *xc = x + c * s->H * s->W;
        for (int ky = 0; ky < k; ky++) {
            for (int kx = 0; kx < k; kx++) {
                float *row = col + ((c * k + ky) * k + kx) * P;
                int64_t lo, hi;
                valid_columns(s, kx, &lo, &hi);
                for (int64_t p = p0; p < p0 + P;) {
                    int64_t oy = p / s->Wo, ox0 = p % s->Wo;
                    int64_t ox1 = ox0 + (p0 + P - p);
                    if (ox1 > s->Wo) ox1 = s->Wo;
                    float *dst = row + (p - p0); /* dst[ox - ox0] */
                    int64_t iy = oy * s->stride - s->pad + ky;
                    int64_t a = ox0 > lo ? ox0 : lo, b = ox1 < hi ? ox1 : hi;
                    if (iy < 0 || iy >= s->H || a >= b) {
                        memset(dst, 0, (size_t)(ox1 - ox0) * sizeof(float));
                    } else {
                        const float *src = xc + iy * s->W; /* src[ox*stride + shift] */
                        int64_t shift = kx - s->pad;
                        memset(dst, 0, (size_t)(a - ox0) * sizeof(float));
                        if (s->stride == 1) {
                            memcpy(dst + (a - ox0), src + (a + shift),
                                   (size_t)(b - a) * sizeof(float));
                        } else {
                            for (int64_t ox = a; ox < b; ox++)
                                dst[ox - ox0] = src[ox * s->stride + shift];
                        }
                        memset(dst + (b - ox0), 0, (size_t)(ox1 - b) * sizeof(float));
                    }
                    p += ox1 - ox0;
                }
            }
        }
    }
}

static void add_bias_rows(float *y, int64_t rows, int64_t ld, int64_t n, const float *bias) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < n; i++) y[r * ld + i] += bias[r];
}

/* y[b] = w[O, C] @ x[b][C, H*W] for a 1x1 kernel with stride 1. */
static int conv_1x1(backend *be, const conv_shape *s, int64_t B, const float *x, const float *w,
                    const float *bias, float *y) {
    int64_t npix = s->H * s->W;
    for (int64_t b = 0; b < B; b++)
        if (sdx4_cpu_gemm(be, 0, s->O, npix, s->C, w, s->C, x + b * s->C * npix, npix,
                     y + b * s->O * npix, npix))
            return -1;
    if (bias) {
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static)
        for (int64_t r = 0; r < B * s->O; r++)
            for (int64_t i = 0; i < npix; i++) y[r * npix + i] += bias[r % s->O];
    }
    return 0;
}

/* Splits each image's `items` (output pixels, or Winograd tiles) into
 * units of work: about `budget` bytes of scratch per unit (but at least
 * min_items items while that stays under `limit` bytes), enough units to
 * keep every thread busy, and a total that is a multiple of the threads
 * when the count is small. */
static void plan_units(int64_t items, int64_t item_bytes, int64_t budget, int64_t min_items,
                       int64_t limit, int64_t B, int threads, int64_t *per_unit,
                       int64_t *units_per_image) {
    int64_t max_items = budget / item_bytes;
    if (max_items < min_items)
        max_items = min_items < limit / item_bytes ? min_items : limit / item_bytes;
    if (max_items < 1) max_items = 1;
    int64_t n = (items + max_items - 1) / max_items;
    if (B * n < threads) n = (threads + B - 1) / B;
    while ((B * n) % threads && B * n < 8 * threads) n++;
    if (n > items) n = items;
    int64_t t = (items + n - 1) / n;
    *per_unit = t;
    *units_per_image = (items + t - 1) / t;
}

static int conv_im2col(backend *be, const conv_shape *s, int64_t B, const float *x, const float *w,
                       const float *bias, float *y) {
    int threads = cpu_threads(be);
    int64_t npix = s->Ho * s->Wo, ckk = s->C * s->k * s->k;
    int64_t tile, ntiles;
    plan_units(npix, ckk * (int64_t)sizeof(float), COL_BUDGET_BYTES, MIN_TILE_PIXELS,
               COL_LIMIT_BYTES, B, threads, &tile, &ntiles);
    size_t col_floats = (size_t)(ckk * tile);
    float *cols = sdx4_cpu_scratch_alloc(be, col_floats * (size_t)threads);
    if (!cols) return -1;
    int64_t units = B * ntiles;
    const sdx4_atomic_int *cancel = sdx4_cancel_flag(); /* the workers' thread-locals have none */
    int canceled = 0;
#pragma omp parallel num_threads(threads)
    {
        cpu_blas_one_thread();
        float *col = cols + (size_t)omp_get_thread_num() * col_floats;
#pragma omp for schedule(dynamic, 1) reduction(|| : canceled)
        for (int64_t u = 0; u < units; u++) {
            if (canceled || (canceled = cancel_is_set(cancel))) continue;
            int64_t b = u / ntiles, p0 = (u % ntiles) * tile;
            int64_t P = npix - p0 < tile ? npix - p0 : tile;
            float *yb = y + b * s->O * npix + p0;
            im2col_tile(s, x + b * s->C * s->H * s->W, p0, P, col);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)s->O, (int)P, (int)ckk,
                        1.0f, w, (int)ckk, col, (int)P, 0.0f, yb, (int)npix);
            if (bias) add_bias_rows(yb, s->O, npix, P, bias);
        }
    }
    sdx4_cpu_scratch_free(be, cols, col_floats * (size_t)threads);
    return canceled ? sdx4_cancel_stopped() : 0;
}

/* ------------------------------------------------- Winograd F(4x4, 3x3) */

/* The three transforms of F(4x4, 3x3), built on the points 0, 1, -1, 2,
 * -1/2 (and infinity). The usual 0, +-1, +-2 give rounder coefficients
 * but about twice the rounding error (in a float32 model of both, 1.1e-5
 * against 5.8e-6 of the largest output at 512 channels; the choice follows
 * Barabasz et al., "Error analysis and improving the accuracy of Winograd
 * convolution", 2020). */

/* The transforms return small structs rather than fill arrays: an array in
 * the body of an `omp simd` loop becomes one array per vector lane, and GCC
 * then gives up vectorising the loop. */
typedef struct {
    float v[6];
} line6;
typedef struct {
    float v[4];
} line4;

/* B^T d for one line of six inputs. */
static inline line6 winograd_bt(float d0, float d1, float d2, float d3, float d4, float d5) {
    return (line6){{d0 + 1.5f * d1 - 2.0f * d2 - 1.5f * d3 + d4,
                    -d1 - 2.5f * d2 - 0.5f * d3 + d4,
                    d1 + 0.5f * d2 - 2.5f * d3 + d4,
                    -0.5f * d1 - d2 + 0.5f * d3 + d4,
                    2.0f * d1 - d2 - 2.0f * d3 + d4,
                    d1 + 1.5f * d2 - 2.0f * d3 - 1.5f * d4 + d5}};
}

/* A^T m for one line of six products. */
static inline line4 winograd_at(float m0, float m1, float m2, float m3, float m4, float m5) {
    float p = m1 + m2, n = m1 - m2;
    return (line4){{m0 + p + m3 + m4, n + 2.0f * m3 - 0.5f * m4, p + 4.0f * m3 + 0.25f * m4,
                    n + 8.0f * m3 - 0.125f * m4 + m5}};
}

/* G g for one line of three weights. */
static inline line6 winograd_g(float g0, float g1, float g2) {
    const float third = 1.0f / 3, fifteenth = 1.0f / 15;
    return (line6){{g0, -(g0 + g1 + g2) * third, (g0 - g1 + g2) * third,
                    (g0 + 2.0f * g1 + 4.0f * g2) * fifteenth,
                    (-16.0f * g0 + 8.0f * g1 - 4.0f * g2) * fifteenth, g2}};
}

/* u[j * step] = r[j], for j = 0..5. */
static inline void winograd_store(float *u, int64_t step, line6 r) {
    u[0] = r.v[0], u[step] = r.v[1], u[2 * step] = r.v[2];
    u[3 * step] = r.v[3], u[4 * step] = r.v[4], u[5 * step] = r.v[5];
}

/* U[e][o][c] (U[e] starting at e * u_step) = (G g G^T)[e], e = 6*i + j,
 * for each 3x3 kernel g = w[o][c]: G down the kernel's three columns, then
 * along each of the six rows. */
static void winograd_weights(backend *be, const conv_shape *s, const float *w, float *U,
                             int64_t u_step) {
    int64_t OC = s->O * s->C;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static)
    for (int64_t oc = 0; oc < OC; oc++) { /* not vectorised: kernels are 9 floats apart */
        const float *g = w + oc * 9;
        line6 c0 = winograd_g(g[0], g[3], g[6]), c1 = winograd_g(g[1], g[4], g[7]);
        line6 c2 = winograd_g(g[2], g[5], g[8]);
        float *u = U + oc; /* row i of G g G^T goes to U[6i .. 6i+5] */
        winograd_store(u, u_step, winograd_g(c0.v[0], c1.v[0], c2.v[0]));
        winograd_store(u + 6 * u_step, u_step, winograd_g(c0.v[1], c1.v[1], c2.v[1]));
        winograd_store(u + 12 * u_step, u_step, winograd_g(c0.v[2], c1.v[2], c2.v[2]));
        winograd_store(u + 18 * u_step, u_step, winograd_g(c0.v[3], c1.v[3], c2.v[3]));
        winograd_store(u + 24 * u_step, u_step, winograd_g(c0.v[4], c1.v[4], c2.v[4]));
        winograd_store(u + 30 * u_step, u_step, winograd_g(c0.v[5], c1.v[5], c2.v[5]));
    }
}

/* V[e][c][pos + t] (V[e] at e * v_step) = (B^T d B)[e] for the 6x6 input
 * patches d of the run of n tiles (ty, tx0 + t) in one tile row.
 * Patches overlap by two columns, so the six input rows are loaded once,
 * split by column modulo 4 (line (i, k) holds column 4j + k of the run at
 * j): patch t is then columns (k, t) for k = 0..3, (0, t+1) and (1, t+1),
 * and both halves of the transform are unit-stride vector loops. `lines`
 * holds 24 * (n + 1) floats. */
static void winograd_input_run(const conv_shape *s, const float *xc, int64_t ty, int64_t tx0,
                               int64_t n, float *v, int64_t v_step, float *lines) {
    const int64_t len = n + 1;
#define LINE(i, k) (lines + (4 * (i) + (k)) * len)
    int64_t y0 = 4 * ty - s->pad, x0 = 4 * tx0 - s->pad;
    int inside = x0 >= 0 && x0 + 4 * n + 3 < s->W;
    for (int i = 0; i < 6; i++) {
        int64_t iy = y0 + i;
        if (iy < 0 || iy >= s->H) {
            memset(LINE(i, 0), 0, (size_t)(4 * len) * sizeof(float));
            continue;
        }
        const float *row = xc + iy * s->W;
        if (inside) {
            const float *r = row + x0;
            float *l0 = LINE(i, 0), *l1 = LINE(i, 1), *l2 = LINE(i, 2), *l3 = LINE(i, 3);
#pragma omp simd
            for (int64_t j = 0; j < len; j++) {
                l0[j] = r[4 * j], l1[j] = r[4 * j + 1];
                l2[j] = r[4 * j + 2], l3[j] = r[4 * j + 3];
            }
        } else {
            for (int64_t j = 0; j < 4 * len; j++) {
                int64_t ix = x0 + j;
                LINE(i, j % 4)[j / 4] = ix >= 0 && ix < s->W ? row[ix] : 0.0f;
            }
        }
    }
    for (int k = 0; k < 4; k++) { /* B^T d, in place, column by column */
        float *d0 = LINE(0, k), *d1 = LINE(1, k), *d2 = LINE(2, k);
        float *d3 = LINE(3, k), *d4 = LINE(4, k), *d5 = LINE(5, k);
#pragma omp simd
        for (int64_t j = 0; j < len; j++) {
            line6 r = winograd_bt(d0[j], d1[j], d2[j], d3[j], d4[j], d5[j]);
            d0[j] = r.v[0], d1[j] = r.v[1], d2[j] = r.v[2];
            d3[j] = r.v[3], d4[j] = r.v[4], d5[j] = r.v[5];
        }
    }
    for (int i = 0; i < 6; i++) { /* (B^T d) B */
        const float *p0 = LINE(i, 0), *p1 = LINE(i, 1), *p2 = LINE(i, 2), *p3 = LINE(i, 3);
        float *v0 = v + 6 * i * v_step, *v1 = v0 + v_step, *v2 = v1 + v_step;
        float *v3 = v2 + v_step, *v4 = v3 + v_step, *v5 = v4 + v_step;
#pragma omp simd
        for (int64_t t = 0; t < n; t++) {
            line6 r = winograd_bt(p0[t], p1[t], p2[t], p3[t], p0[t + 1], p1[t + 1]);
            v0[t] = r.v[0], v1[t] = r.v[1], v2[t] = r.v[2];
            v3[t] = r.v[3], v4[t] = r.v[4], v5[t] = r.v[5];
        }
    }
#undef LINE
}

/* V[e][c][t] for the tiles t0 .. t0+T-1 of one image. */
static void winograd_input(const conv_shape *s, const float *x, int64_t tiles_w, int64_t t0,
                           int64_t T, float *V, int64_t v_step, float *lines) {
    for (int64_t pos = 0, n; pos < T; pos += n) { /* runs of tiles within one tile row */
        int64_t ty = (t0 + pos) / tiles_w, tx0 = (t0 + pos) % tiles_w;
        n = tiles_w - tx0 < T - pos ? tiles_w - tx0 : T - pos;
        for (int64_t c = 0; c < s->C; c++)
            winograd_input_run(s, x + c * s->H * s->W, ty, tx0, n, V + c * T + pos, v_step, lines);
    }
}

/* Output rows 4ty .. 4ty+3 of channel o for a run of n tiles: each 4x4
 * block is A^T m A + bias, m[e] = m[e * m_step + t]. As for the input,
 * in two unit-stride passes: A^T down each of the six columns into
 * `lines` (line (r, j) holds row r of column j for every tile), then A^T
 * along each row. Blocks are clipped at the output's edges: rows past Ho
 * and columns past Wo are not written. `lines` holds 24 * n floats. */
static void winograd_output_run(const conv_shape *s, const float *m, int64_t m_step, float bias,
                                float *yo, int64_t ty, int64_t tx0, int64_t n, float *lines) {
#define LINE(r, j) (lines + (6 * (r) + (j)) * n)
    for (int j = 0; j < 6; j++) {
        const float *m0 = m + j * m_step, *m1 = m0 + 6 * m_step, *m2 = m1 + 6 * m_step;
        const float *m3 = m2 + 6 * m_step, *m4 = m3 + 6 * m_step, *m5 = m4 + 6 * m_step;
        float *a0 = LINE(0, j), *a1 = LINE(1, j), *a2 = LINE(2, j), *a3 = LINE(3, j);
#pragma omp simd
        for (int64_t t = 0; t < n; t++) {
            line4 a = winograd_at(m0[t], m1[t], m2[t], m3[t], m4[t], m5[t]);
            a0[t] = a.v[0], a1[t] = a.v[1], a2[t] = a.v[2], a3[t] = a.v[3];
        }
    }
    int64_t rows = s->Ho - 4 * ty < 4 ? s->Ho - 4 * ty : 4;
    int64_t whole = 4 * (tx0 + n) <= s->Wo ? n : n - 1; /* tiles with all four columns */
    for (int r = 0; r < rows; r++) {
        const float *a0 = LINE(r, 0), *a1 = LINE(r, 1), *a2 = LINE(r, 2);
        const float *a3 = LINE(r, 3), *a4 = LINE(r, 4), *a5 = LINE(r, 5);
        float *out = yo + (4 * ty + r) * s->Wo + 4 * tx0;
#pragma omp simd
        for (int64_t t = 0; t < whole; t++) {
            line4 y = winograd_at(a0[t], a1[t], a2[t], a3[t], a4[t], a5[t]);
            out[4 * t] = y.v[0] + bias, out[4 * t + 1] = y.v[1] + bias;
            out[4 * t + 2] = y.v[2] + bias, out[4 * t + 3] = y.v[3] + bias;
        }
        if (whole < n) { /* the last tile, cut by the right edge */
            int64_t t = whole;
            line4 y = winograd_at(a0[t], a1[t], a2[t], a3[t], a4[t], a5[t]);
            for (int64_t c = 0; c < s->Wo - 4 * (tx0 + t); c++) out[4 * t + c] = y.v[c] + bias;
        }
    }
#undef LINE
}

/* y[o] for the tiles t0 .. t0+T-1 of one image from M[e][o][t]. */
static void winograd_output(const conv_shape *s, const float *M, int64_t m_step, int64_t tiles_w,
                            int64_t t0, int64_t T, const float *bias, float *y, float *lines) {
    for (int64_t pos = 0, n; pos < T; pos += n) { /* runs of tiles within one tile row */
        int64_t ty = (t0 + pos) / tiles_w, tx0 = (t0 + pos) % tiles_w;
        n = tiles_w - tx0 < T - pos ? tiles_w - tx0 : T - pos;
        for (int64_t o = 0; o < s->O; o++)
            winograd_output_run(s, M + o * T + pos, m_step, bias ? bias[o] : 0.0f,
                                y + o * s->Ho * s->Wo, ty, tx0, n, lines);
    }
}

/* Winograd needs 3x3 with stride 1. It pays when the 36 products are real
 * matrix products and there are enough tiles to amortise transforming the
 * weights (on Zen 4 with OpenBLAS, 512 channels at 16x16 for two images,
 * 32 tiles, ran faster through im2col). */
static int winograd_pays(const conv_shape *s, int64_t B) {
    int64_t tiles = B * ((s->Ho + 3) / 4) * ((s->Wo + 3) / 4);
    return s->k == 3 && s->stride == 1 && s->C >= 32 && s->O >= 32 && tiles >= 64;
}

static int conv_winograd(backend *be, const conv_shape *s, int64_t B, const float *x,
                         const float *w, const float *bias, float *y) {
    int threads = cpu_threads(be);
    int64_t tiles_w = (s->Wo + 3) / 4, tiles = (s->Ho + 3) / 4 * tiles_w;
    /* output channels in blocks of about WINOGRAD_WEIGHTS transformed
     * weights per position; each block transforms the input anew */
    int64_t blocks = (s->O * s->C + WINOGRAD_WEIGHTS - 1) / WINOGRAD_WEIGHTS;
    int64_t block_o = (s->O + blocks - 1) / blocks;
    int64_t per_unit, units_per_image;
    plan_units(tiles, 36 * (s->C + block_o) * (int64_t)sizeof(float), WINOGRAD_BUDGET_BYTES,
               WINOGRAD_MIN_TILES, WINOGRAD_BUDGET_BYTES * 2, B, threads, &per_unit,
               &units_per_image);
    /* a gap of WINOGRAD_PAD floats after each of the 36 matrices of U, V
     * and M keeps the transforms' 36 store or load streams from aliasing
     * in the cache */
    int64_t u_step = block_o * s->C + WINOGRAD_PAD;
    int64_t v_step = s->C * per_unit + WINOGRAD_PAD, m_step = block_o * per_unit + WINOGRAD_PAD;
    size_t u_floats = (size_t)(36 * u_step), v_floats = (size_t)(36 * v_step);
    size_t m_floats = (size_t)(36 * m_step);
    size_t line_floats = (size_t)(24 * (tiles_w + 1));
    size_t thread_floats = v_floats + m_floats + line_floats;
    float *U = sdx4_cpu_scratch_alloc(be, u_floats);
    float *scratch = U ? sdx4_cpu_scratch_alloc(be, thread_floats * (size_t)threads) : NULL;
    if (!scratch) {
        sdx4_cpu_scratch_free(be, U, u_floats);
        return -1;
    }
    int64_t units = B * units_per_image, out_pixels = s->Ho * s->Wo;
    const sdx4_atomic_int *cancel = sdx4_cancel_flag(); /* the workers' thread-locals have none */
    int canceled = 0;
    for (int64_t o0 = 0; o0 < s->O && !canceled; o0 += block_o) {
        conv_shape part = *s; /* output channels o0 .. o0 + part.O - 1 */
        part.O = s->O - o0 < block_o ? s->O - o0 : block_o;
        winograd_weights(be, &part, w + o0 * s->C * 9, U, u_step);
#pragma omp parallel num_threads(threads)
        {
            cpu_blas_one_thread();
            float *V = scratch + (size_t)omp_get_thread_num() * thread_floats;
            float *M = V + v_floats, *lines = M + m_floats;
#pragma omp for schedule(dynamic, 1) reduction(|| : canceled)
            for (int64_t u = 0; u < units; u++) {
                if (canceled || (canceled = cancel_is_set(cancel))) continue;
                int64_t b = u / units_per_image, t0 = (u % units_per_image) * per_unit;
                int64_t T = tiles - t0 < per_unit ? tiles - t0 : per_unit;
                winograd_input(s, x + b * s->C * s->H * s->W, tiles_w, t0, T, V, v_step, lines);
                for (int e = 0; e < 36; e++)
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)part.O, (int)T,
                                (int)s->C, 1.0f, U + e * u_step, (int)s->C, V + e * v_step, (int)T,
                                0.0f, M + e * m_step, (int)T);
                winograd_output(&part, M, m_step, tiles_w, t0, T, bias ? bias + o0 : NULL,
                                y + (b * s->O + o0) * out_pixels, lines);
            }
        }
    }
    sdx4_cpu_scratch_free(be, scratch, thread_floats * (size_t)threads);
    sdx4_cpu_scratch_free(be, U, u_floats);
    return canceled ? sdx4_cancel_stopped() : 0;
}

tensor *sdx4_cpu_conv2d(backend *be, const tensor *x, const tensor *w, const tensor *bias, int stride,
                   int padding) {
    if (sdx4_cpu_check("conv2d", "input", x, 4) || sdx4_cpu_check("conv2d", "weight", w, 4)) return NULL;
    if (bias && sdx4_cpu_check("conv2d", "bias", bias, 0)) return NULL;
    conv_shape s = {.C = x->shape[1],
                    .H = x->shape[2],
                    .W = x->shape[3],
                    .O = w->shape[0],
                    .k = (int)w->shape[2],
                    .stride = stride,
                    .pad = padding};
    if (sdx4_check_conv2d(x, w, bias, stride, padding, "BLAS", &s.Ho, &s.Wo)) return NULL;
    int64_t B = x->shape[0];
    tensor *y = sdx4_cpu_new_tensor(be, 4, (int64_t[]){B, s.O, s.Ho, s.Wo});
    if (!y) return NULL;
    const float *bias_data = bias ? bias->data : NULL;
    int failed = 0;
    if (s.k == 1 && stride == 1 && padding == 0)
        failed = conv_1x1(be, &s, B, x->data, w->data, bias_data, y->data);
    else if (winograd_pays(&s, B))
        failed = conv_winograd(be, &s, B, x->data, w->data, bias_data, y->data);
    else
        failed = conv_im2col(be, &s, B, x->data, w->data, bias_data, y->data);
    if (failed) {
        tensor_free(y);
        return NULL;
    }
    return y;
}
