/*
 * cpu_conv.c - torch.nn.Conv2d (NCHW, square kernel, zero padding, stride)
 * as matrix products, in one of three ways.
 *
 * A 1x1 convolution with stride 1 is already a product: per image,
 * y[O, H*W] = w[O, C] @ x[C, H*W], split over the threads by cpu_gemm.
 *
 * A 3x3 convolution with stride 1 and 128 or more channels (nearly all the
 * work of the UNet and the VAE) uses Winograd's F(2x2, 3x3): each 2x2 block
 * of output is A^T [sum over c of (G g G^T) * (B^T d B)] A, d being the 4x4
 * input patch under it and g the kernel. That is sixteen matrix products,
 * M[e] = U[e] @ V[e] for e over the 4x4 transformed positions, of the
 * transformed weights U[e] [O, C] and the transformed patches V[e]
 * [C, tiles]: 16 multiplications per 2x2 outputs instead of 36, 1.5 to 1.8
 * times faster in practice. The transforms only add, subtract and halve,
 * so the rounding error stays that of the direct sum (the tests hold it to
 * 1e-5). The weights are transformed once per call; the 2x2 tiles of all
 * images are cut into units of a few hundred, and each thread transforms
 * its unit's patches, runs the sixteen products and writes the output.
 *
 * Anything else goes through im2col, in tiles of output pixels: for a
 * tile of P consecutive output pixels (in row-major order, so a tile may
 * span several output rows), the column buffer col[C*k*k, P] holds the
 * input value under each kernel tap for each pixel (zero in the padding),
 * and y[O, tile] = w[O, C*k*k] @ col is written straight into the NCHW
 * output with leading dimension Ho*Wo.
 *
 * Both tiled paths keep their scratch per thread to a few MB whatever the
 * channel count or image size (the VAE's 512x512 layers need no more than
 * the UNet's), spread the units of all images over the threads, each
 * running single-threaded sgemms (see cpu_internal.h), and make the unit
 * count a multiple of the thread count when it is small, so no thread
 * idles at the end.
 */
#include <inttypes.h>
#include <limits.h>
#include <omp.h>
#include <string.h>

#include <cblas.h>

#include "backend/cpu/cpu_internal.h"
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
 * and the fewest 2x2 tiles per unit. */
#define WINOGRAD_BUDGET_BYTES ((int64_t)8 << 20)
#define WINOGRAD_MIN_TILES 32
#define WINOGRAD_PAD 16

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
static void conv_1x1(backend *be, const conv_shape *s, int64_t B, const float *x, const float *w,
                     const float *bias, float *y) {
    int64_t npix = s->H * s->W;
    for (int64_t b = 0; b < B; b++)
        cpu_gemm(be, 0, s->O, npix, s->C, w, s->C, x + b * s->C * npix, npix, y + b * s->O * npix,
                 npix);
    if (bias) {
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static)
        for (int64_t r = 0; r < B * s->O; r++)
            for (int64_t i = 0; i < npix; i++) y[r * npix + i] += bias[r % s->O];
    }
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
    float *cols = cpu_scratch_alloc(be, col_floats * (size_t)threads);
    if (!cols) return -1;
    int64_t units = B * ntiles;
#pragma omp parallel num_threads(threads)
    {
        cpu_blas_one_thread();
        float *col = cols + (size_t)omp_get_thread_num() * col_floats;
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < units; u++) {
            int64_t b = u / ntiles, p0 = (u % ntiles) * tile;
            int64_t P = npix - p0 < tile ? npix - p0 : tile;
            float *yb = y + b * s->O * npix + p0;
            im2col_tile(s, x + b * s->C * s->H * s->W, p0, P, col);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)s->O, (int)P, (int)ckk,
                        1.0f, w, (int)ckk, col, (int)P, 0.0f, yb, (int)npix);
            if (bias) add_bias_rows(yb, s->O, npix, P, bias);
        }
    }
    cpu_scratch_free(be, cols, col_floats * (size_t)threads);
    return 0;
}

/* ------------------------------------------------- Winograd F(2x2, 3x3) */

/* U[e][o][c] (U[e] starting at e * u_step) = (G g G^T)[e], e = 4*i + j,
 * for each 3x3 kernel g = w[o][c], G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]. */
static void winograd_weights(backend *be, const conv_shape *s, const float *w, float *U,
                             int64_t u_step) {
    int64_t OC = s->O * s->C;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static)
    for (int64_t oc = 0; oc < OC; oc++) {
        const float *g = w + oc * 9;
        float t[4][3]; /* G g */
        for (int j = 0; j < 3; j++) {
            t[0][j] = g[j];
            t[1][j] = 0.5f * (g[j] + g[3 + j] + g[6 + j]);
            t[2][j] = 0.5f * (g[j] - g[3 + j] + g[6 + j]);
            t[3][j] = g[6 + j];
        }
        for (int i = 0; i < 4; i++) {
            U[(4 * i + 0) * u_step + oc] = t[i][0];
            U[(4 * i + 1) * u_step + oc] = 0.5f * (t[i][0] + t[i][1] + t[i][2]);
            U[(4 * i + 2) * u_step + oc] = 0.5f * (t[i][0] - t[i][1] + t[i][2]);
            U[(4 * i + 3) * u_step + oc] = t[i][2];
        }
    }
}

/* V[e][c][pos + t] (V[e] at e * v_step) = (B^T d B)[e] for the 4x4 input
 * patches d of the run of n tiles (ty, tx0 + t) in one tile row,
 * B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
 * Patches overlap by two columns, so the four input rows are loaded once,
 * split into even and odd columns (ev[i][j] = column 2j of the run, od the
 * column after): patch t is then ev[t], od[t], ev[t+1], od[t+1], and both
 * halves of the transform are unit-stride vector loops. `lines` holds
 * 8 * (n + 1) floats. */
static void winograd_input_run(const conv_shape *s, const float *xc, int64_t ty, int64_t tx0,
                               int64_t n, float *v, int64_t v_step, float *lines) {
    float *ev[4], *od[4];
    for (int i = 0; i < 4; i++) ev[i] = lines + (2 * i) * (n + 1), od[i] = ev[i] + n + 1;
    int64_t y0 = 2 * ty - s->pad, x0 = 2 * tx0 - s->pad;
    for (int i = 0; i < 4; i++) {
        int64_t iy = y0 + i;
        if (iy < 0 || iy >= s->H) {
            memset(ev[i], 0, (size_t)(n + 1) * sizeof(float));
            memset(od[i], 0, (size_t)(n + 1) * sizeof(float));
            continue;
        }
        const float *row = xc + iy * s->W;
        if (x0 >= 0 && x0 + 2 * n + 1 < s->W) {
#pragma omp simd
            for (int64_t j = 0; j <= n; j++) {
                ev[i][j] = row[x0 + 2 * j];
                od[i][j] = row[x0 + 2 * j + 1];
            }
        } else {
            for (int64_t j = 0; j <= n; j++) {
                int64_t ix = x0 + 2 * j;
                ev[i][j] = ix >= 0 && ix < s->W ? row[ix] : 0.0f;
                od[i][j] = ix + 1 >= 0 && ix + 1 < s->W ? row[ix + 1] : 0.0f;
            }
        }
    }
    for (int half = 0; half < 2; half++) { /* B^T d, in place, on even then odd columns */
        float **r = half ? od : ev;
#pragma omp simd
        for (int64_t j = 0; j <= n; j++) {
            float d0 = r[0][j], d1 = r[1][j], d2 = r[2][j], d3 = r[3][j];
            r[0][j] = d0 - d2;
            r[1][j] = d1 + d2;
            r[2][j] = d2 - d1;
            r[3][j] = d1 - d3;
        }
    }
    for (int i = 0; i < 4; i++) { /* (B^T d) B */
        float *v0 = v + (4 * i) * v_step, *v1 = v0 + v_step, *v2 = v1 + v_step, *v3 = v2 + v_step;
        const float *e = ev[i], *o = od[i];
#pragma omp simd
        for (int64_t t = 0; t < n; t++) {
            v0[t] = e[t] - e[t + 1];
            v1[t] = o[t] + e[t + 1];
            v2[t] = e[t + 1] - o[t];
            v3[t] = o[t] - o[t + 1];
        }
    }
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

/* Output rows 2ty, 2ty+1 of channel o for a run of n tiles: each 2x2 block
 * is A^T m A + bias, m[e] = M[e][o][pos + t] (M[e] at e * m_step),
 * A^T = [1 1 1 0; 0 1 -1 -1]. Blocks are clipped at odd output edges: a
 * missing second column is not written, a missing second row goes to
 * `scrap` (2 * n floats). */
static void winograd_output_run(const conv_shape *s, const float *m, int64_t m_step, float bias,
                                float *yo, int64_t ty, int64_t tx0, int64_t n, float *scrap) {
    float *row0 = yo + 2 * ty * s->Wo + 2 * tx0;
    float *row1 = 2 * ty + 1 < s->Ho ? row0 + s->Wo : scrap;
    int64_t whole = 2 * (tx0 + n) <= s->Wo ? n : n - 1; /* tiles with both columns */
#pragma omp simd
    for (int64_t t = 0; t < n; t++) {
        float a[2][4]; /* A^T m */
        for (int j = 0; j < 4; j++) {
            float m0 = m[j * m_step + t], m1 = m[(4 + j) * m_step + t];
            float m2 = m[(8 + j) * m_step + t], m3 = m[(12 + j) * m_step + t];
            a[0][j] = m0 + m1 + m2;
            a[1][j] = m1 - m2 - m3;
        }
        float y00 = a[0][0] + a[0][1] + a[0][2] + bias, y01 = a[0][1] - a[0][2] - a[0][3] + bias;
        float y10 = a[1][0] + a[1][1] + a[1][2] + bias, y11 = a[1][1] - a[1][2] - a[1][3] + bias;
        if (t < whole) {
            row0[2 * t] = y00, row0[2 * t + 1] = y01;
            row1[2 * t] = y10, row1[2 * t + 1] = y11;
        } else {
            row0[2 * t] = y00;
            row1[2 * t] = y10;
        }
    }
}

/* y[o] for the tiles t0 .. t0+T-1 of one image from M[e][o][t]. */
static void winograd_output(const conv_shape *s, const float *M, int64_t m_step, int64_t tiles_w,
                            int64_t t0, int64_t T, const float *bias, float *y, float *scrap) {
    for (int64_t pos = 0, n; pos < T; pos += n) { /* runs of tiles within one tile row */
        int64_t ty = (t0 + pos) / tiles_w, tx0 = (t0 + pos) % tiles_w;
        n = tiles_w - tx0 < T - pos ? tiles_w - tx0 : T - pos;
        for (int64_t o = 0; o < s->O; o++)
            winograd_output_run(s, M + o * T + pos, m_step, bias ? bias[o] : 0.0f,
                                y + o * s->Ho * s->Wo, ty, tx0, n, scrap);
    }
}

/* Winograd needs 3x3 with stride 1. It pays (measured on Zen 4 with
 * OpenBLAS: 1.5x to 1.8x at 128 to 512 channels and 32x32 pixels or more)
 * when the 16 products are real matrix products and there are enough
 * tiles to amortise transforming the weights; the cap on O*C keeps the
 * transformed weights within 32 MB. */
static int winograd_pays(const conv_shape *s, int64_t B) {
    int64_t tiles = B * ((s->Ho + 1) / 2) * ((s->Wo + 1) / 2);
    return s->k == 3 && s->stride == 1 && s->C >= 128 && s->O >= 128 && s->O * s->C <= 1024 * 512 &&
           tiles >= 128;
}

static int conv_winograd(backend *be, const conv_shape *s, int64_t B, const float *x,
                         const float *w, const float *bias, float *y) {
    int threads = cpu_threads(be);
    int64_t tiles_w = (s->Wo + 1) / 2, tiles = (s->Ho + 1) / 2 * tiles_w;
    int64_t per_unit, units_per_image;
    plan_units(tiles, 16 * (s->C + s->O) * (int64_t)sizeof(float), WINOGRAD_BUDGET_BYTES,
               WINOGRAD_MIN_TILES, WINOGRAD_BUDGET_BYTES * 2, B, threads, &per_unit,
               &units_per_image);
    /* the 16 matrices of U, V and M are WINOGRAD_PAD floats apart so the
     * transforms' 16 store or load streams do not alias in the cache */
    int64_t u_step = s->O * s->C + WINOGRAD_PAD;
    int64_t v_step = s->C * per_unit + WINOGRAD_PAD, m_step = s->O * per_unit + WINOGRAD_PAD;
    size_t u_floats = (size_t)(16 * u_step), v_floats = (size_t)(16 * v_step);
    size_t m_floats = (size_t)(16 * m_step);
    size_t line_floats = (size_t)(8 * (tiles_w + 1)); /* also >= the 2 * tiles_w of `scrap` */
    size_t thread_floats = v_floats + m_floats + line_floats;
    float *U = cpu_scratch_alloc(be, u_floats);
    float *scratch = U ? cpu_scratch_alloc(be, thread_floats * (size_t)threads) : NULL;
    if (!scratch) {
        cpu_scratch_free(be, U, u_floats);
        return -1;
    }
    winograd_weights(be, s, w, U, u_step);
    int64_t units = B * units_per_image;
#pragma omp parallel num_threads(threads)
    {
        cpu_blas_one_thread();
        float *V = scratch + (size_t)omp_get_thread_num() * thread_floats;
        float *M = V + v_floats, *lines = M + m_floats;
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < units; u++) {
            int64_t b = u / units_per_image, t0 = (u % units_per_image) * per_unit;
            int64_t T = tiles - t0 < per_unit ? tiles - t0 : per_unit;
            winograd_input(s, x + b * s->C * s->H * s->W, tiles_w, t0, T, V, v_step, lines);
            for (int e = 0; e < 16; e++)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)s->O, (int)T, (int)s->C,
                            1.0f, U + e * u_step, (int)s->C, V + e * v_step, (int)T, 0.0f,
                            M + e * m_step, (int)T);
            winograd_output(s, M, m_step, tiles_w, t0, T, bias, y + b * s->O * s->Ho * s->Wo,
                            lines);
        }
    }
    cpu_scratch_free(be, scratch, thread_floats * (size_t)threads);
    cpu_scratch_free(be, U, u_floats);
    return 0;
}

tensor *cpu_conv2d(backend *be, const tensor *x, const tensor *w, const tensor *bias, int stride,
                   int padding) {
    if (cpu_check("conv2d", "input", x, 4) || cpu_check("conv2d", "weight", w, 4)) return NULL;
    if (bias && cpu_check("conv2d", "bias", bias, 0)) return NULL;
    conv_shape s = {.C = x->shape[1],
                    .H = x->shape[2],
                    .W = x->shape[3],
                    .O = w->shape[0],
                    .k = (int)w->shape[2],
                    .stride = stride,
                    .pad = padding};
    if (check_conv2d(x, w, bias, stride, padding, "BLAS", &s.Ho, &s.Wo)) return NULL;
    int64_t B = x->shape[0];
    tensor *y = cpu_new_tensor(be, 4, (int64_t[]){B, s.O, s.Ho, s.Wo});
    if (!y) return NULL;
    const float *bias_data = bias ? bias->data : NULL;
    int failed = 0;
    if (s.k == 1 && stride == 1 && padding == 0)
        conv_1x1(be, &s, B, x->data, w->data, bias_data, y->data);
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
