/*
 * cpu_conv.c - torch.nn.Conv2d (NCHW, square kernel, zero padding, stride)
 * as matrix products.
 *
 * A 1x1 convolution with stride 1 is already a product: per image,
 * y[O, H*W] = w[O, C] @ x[C, H*W], one multithreaded sgemm.
 *
 * Any other kernel goes through im2col, in tiles of output pixels: for a
 * tile of P consecutive output pixels (in row-major order, so a tile may
 * span several output rows), the column buffer col[C*k*k, P] holds the input
 * value under each kernel tap for each pixel (zero in the padding), and
 * y[O, tile] = w[O, C*k*k] @ col is written straight into the NCHW output
 * with leading dimension Ho*Wo. The tile size keeps each column buffer near
 * COL_BUDGET_BYTES whatever the channel count or image size, so the VAE's
 * 512x512 layers need no more scratch than the UNet's. Tiles of all images
 * are spread over the threads, each with its own column buffer and a
 * single-threaded sgemm (OpenBLAS inside a parallel region), so building
 * the columns runs in parallel too; the tile count is a multiple of the
 * thread count when it is small, so no thread idles at the end.
 */
#include <inttypes.h>
#include <limits.h>
#include <omp.h>
#include <string.h>

#include <cblas.h>

#include "backend/cpu/cpu_internal.h"
#include "core/error.h"

/* Scratch per thread for one tile's columns: big enough that the sgemm
 * sees a few hundred pixels at the UNet's widest layers, small enough to
 * stay in the shared L3 cache. */
#define COL_BUDGET_BYTES ((int64_t)4 << 20)
/* Fewer pixels than this per tile make the sgemm inefficient. */
#define MIN_TILE_PIXELS 32
/* Scratch per thread for one unit of Winograd tiles (input and product). */
#define WINOGRAD_BUDGET_BYTES ((int64_t)4 << 20)

typedef struct {
    int64_t C, H, W;      /* input channels and size */
    int64_t O, Ho, Wo;    /* output channels and size */
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
                            memcpy(dst + (a - ox0), src + (a + shift), (size_t)(b - a) * sizeof(float));
                        } else {
                            for (int64_t ox = a; ox < b; ox++) dst[ox - ox0] = src[ox * s->stride + shift];
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
static void conv_1x1(backend *be, const conv_shape *s, int64_t B, const float *x,
                     const float *w, const float *bias, float *y) {
    int64_t npix = s->H * s->W;
    cpu_enter(be);
    for (int64_t b = 0; b < B; b++)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)s->O, (int)npix, (int)s->C,
                    1.0f, w, (int)s->C, x + b * s->C * npix, (int)npix, 0.0f,
                    y + b * s->O * npix, (int)npix);
    if (bias) {
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static)
        for (int64_t r = 0; r < B * s->O; r++)
            for (int64_t i = 0; i < npix; i++) y[r * npix + i] += bias[r % s->O];
    }
}

/* Splits each image's `items` (output pixels, or Winograd tiles) into
 * units of work: few enough items per unit that its scratch stays near
 * the budget, enough units to keep every thread busy, and a total that is
 * a multiple of the threads when the count is small. */
static void plan_units(int64_t items, int64_t item_bytes, int64_t budget, int64_t min_items,
                       int64_t B, int threads, int64_t *per_unit, int64_t *units_per_image) {
    int64_t max_items = budget / item_bytes;
    if (max_items < min_items) max_items = min_items;
    int64_t n = (items + max_items - 1) / max_items;
    if (B * n < threads) n = (threads + B - 1) / B;
    while ((B * n) % threads && B * n < 8 * threads) n++;
    int64_t t = (items + n - 1) / n;
    if (t < min_items) t = min_items < items ? min_items : items;
    *per_unit = t;
    *units_per_image = (items + t - 1) / t;
}

static int conv_im2col(backend *be, const conv_shape *s, int64_t B, const float *x,
                       const float *w, const float *bias, float *y) {
    int threads = cpu_threads(be);
    int64_t npix = s->Ho * s->Wo, ckk = s->C * s->k * s->k;
    int64_t tile, ntiles;
    plan_units(npix, ckk * (int64_t)sizeof(float), COL_BUDGET_BYTES, MIN_TILE_PIXELS, B, threads,
               &tile, &ntiles);
    size_t col_floats = (size_t)(ckk * tile);
    float *cols = cpu_scratch_alloc(be, col_floats * (size_t)threads);
    if (!cols) return -1;
    int64_t units = B * ntiles;
#pragma omp parallel num_threads(threads)
    {
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

/* U[e][o][c] = (G g G^T)[e], e = 4*i + j, for each 3x3 kernel g = w[o][c],
 * G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]. */
static void winograd_weights(backend *be, const conv_shape *s, const float *w, float *U) {
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
            U[(4 * i + 0) * OC + oc] = t[i][0];
            U[(4 * i + 1) * OC + oc] = 0.5f * (t[i][0] + t[i][1] + t[i][2]);
            U[(4 * i + 2) * OC + oc] = 0.5f * (t[i][0] - t[i][1] + t[i][2]);
            U[(4 * i + 3) * OC + oc] = t[i][2];
        }
    }
}

/* V[e][c][t] = (B^T d B)[e] for the 4x4 input patch d under each tile t0 + t
 * of one image, B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]. */
static void winograd_input(const conv_shape *s, const float *x, int64_t tiles_w, int64_t t0,
                           int64_t T, float *V) {
    int64_t CT = s->C * T;
    for (int64_t c = 0; c < s->C; c++) {
        const float *xc = x + c * s->H * s->W;
        for (int64_t t = 0; t < T; t++) {
            int64_t y0 = (t0 + t) / tiles_w * 2 - s->pad, x0 = (t0 + t) % tiles_w * 2 - s->pad;
            float d[4][4];
            if (y0 >= 0 && x0 >= 0 && y0 + 4 <= s->H && x0 + 4 <= s->W) {
                for (int i = 0; i < 4; i++)
                    for (int j = 0; j < 4; j++) d[i][j] = xc[(y0 + i) * s->W + x0 + j];
            } else {
                for (int i = 0; i < 4; i++)
                    for (int j = 0; j < 4; j++) {
                        int64_t iy = y0 + i, ix = x0 + j;
                        d[i][j] = iy >= 0 && iy < s->H && ix >= 0 && ix < s->W ? xc[iy * s->W + ix] : 0.0f;
                    }
            }
            float r[4][4]; /* B^T d */
            for (int j = 0; j < 4; j++) {
                r[0][j] = d[0][j] - d[2][j];
                r[1][j] = d[1][j] + d[2][j];
                r[2][j] = d[2][j] - d[1][j];
                r[3][j] = d[1][j] - d[3][j];
            }
            float *v = V + c * T + t;
            for (int i = 0; i < 4; i++) {
                v[(4 * i + 0) * CT] = r[i][0] - r[i][2];
                v[(4 * i + 1) * CT] = r[i][1] + r[i][2];
                v[(4 * i + 2) * CT] = r[i][2] - r[i][1];
                v[(4 * i + 3) * CT] = r[i][1] - r[i][3];
            }
        }
    }
}

/* y's 2x2 block of each tile = A^T m A + bias, m[e] = M[e][o][t],
 * A^T = [1 1 1 0; 0 1 -1 -1]; blocks are clipped at odd output edges. */
static void winograd_output(const conv_shape *s, const float *M, int64_t tiles_w, int64_t t0,
                            int64_t T, const float *bias, float *y) {
    int64_t OT = s->O * T;
    for (int64_t o = 0; o < s->O; o++) {
        float *yo = y + o * s->Ho * s->Wo;
        float b = bias ? bias[o] : 0.0f;
        for (int64_t t = 0; t < T; t++) {
            const float *m = M + o * T + t;
            float r[2][4]; /* A^T m */
            for (int j = 0; j < 4; j++) {
                float m0 = m[j * OT], m1 = m[(4 + j) * OT], m2 = m[(8 + j) * OT], m3 = m[(12 + j) * OT];
                r[0][j] = m0 + m1 + m2;
                r[1][j] = m1 - m2 - m3;
            }
            int64_t oy = (t0 + t) / tiles_w * 2, ox = (t0 + t) % tiles_w * 2;
            for (int i = 0; i < 2 && oy + i < s->Ho; i++) {
                float *row = yo + (oy + i) * s->Wo + ox;
                row[0] = r[i][0] + r[i][1] + r[i][2] + b;
                if (ox + 1 < s->Wo) row[1] = r[i][1] - r[i][2] - r[i][3] + b;
            }
        }
    }
}

/* Winograd needs 3x3 with stride 1; it pays when the channel counts make
 * the 16 products real matrix products, and its transformed weights
 * (16/9 of the kernel) stay within a few tens of MB. */
static int winograd_pays(const conv_shape *s) {
    return s->k == 3 && s->stride == 1 && s->C >= 32 && s->O >= 32 &&
           s->O * s->C <= 1024 * 512 && s->Ho * s->Wo >= 64;
}

static int conv_winograd(backend *be, const conv_shape *s, int64_t B, const float *x,
                         const float *w, const float *bias, float *y) {
    int threads = cpu_threads(be);
    int64_t tiles_w = (s->Wo + 1) / 2, tiles = (s->Ho + 1) / 2 * tiles_w;
    int64_t per_unit, units_per_image;
    plan_units(tiles, 16 * (s->C + s->O) * (int64_t)sizeof(float), WINOGRAD_BUDGET_BYTES,
               MIN_TILE_PIXELS, B, threads, &per_unit, &units_per_image);
    size_t u_floats = (size_t)(16 * s->O * s->C);
    size_t v_floats = (size_t)(16 * s->C * per_unit), m_floats = (size_t)(16 * s->O * per_unit);
    float *U = cpu_scratch_alloc(be, u_floats);
    float *scratch = U ? cpu_scratch_alloc(be, (v_floats + m_floats) * (size_t)threads) : NULL;
    if (!scratch) {
        cpu_scratch_free(be, U, u_floats);
        return -1;
    }
    winograd_weights(be, s, w, U);
    int64_t units = B * units_per_image, OC = s->O * s->C;
#pragma omp parallel num_threads(threads)
    {
        float *V = scratch + (size_t)omp_get_thread_num() * (v_floats + m_floats);
        float *M = V + v_floats;
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < units; u++) {
            int64_t b = u / units_per_image, t0 = (u % units_per_image) * per_unit;
            int64_t T = tiles - t0 < per_unit ? tiles - t0 : per_unit;
            winograd_input(s, x + b * s->C * s->H * s->W, tiles_w, t0, T, V);
            for (int e = 0; e < 16; e++)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)s->O, (int)T, (int)s->C,
                            1.0f, U + e * OC, (int)s->C, V + e * s->C * T, (int)T, 0.0f,
                            M + e * s->O * T, (int)T);
            winograd_output(s, M, tiles_w, t0, T, bias, y + b * s->O * s->Ho * s->Wo);
        }
    }
    cpu_scratch_free(be, scratch, (v_floats + m_floats) * (size_t)threads);
    cpu_scratch_free(be, U, u_floats);
    return 0;
}

tensor *cpu_conv2d(backend *be, const tensor *x, const tensor *w, const tensor *bias,
                   int stride, int padding) {
    if (cpu_check("conv2d", "input", x, 4) || cpu_check("conv2d", "weight", w, 4)) return NULL;
    if (bias && cpu_check("conv2d", "bias", bias, 0)) return NULL;
    char xs[CPU_SHAPE_STR_SIZE], ws[CPU_SHAPE_STR_SIZE];
    conv_shape s = {.C = x->shape[1], .H = x->shape[2], .W = x->shape[3], .O = w->shape[0],
                    .k = (int)w->shape[2], .stride = stride, .pad = padding};
    if (w->shape[2] != w->shape[3] || w->shape[2] > INT_MAX) {
        set_error(SDX4_ERR_INVALID_ARGUMENT, "conv2d: weight %s is not a square kernel",
                  cpu_shape_str(w, ws, sizeof ws));
        return NULL;
    }
    if (w->shape[1] != s.C) {
        set_error(SDX4_ERR_INVALID_ARGUMENT, "conv2d: input has %" PRId64
                  " channels, weight expects %" PRId64, s.C, w->shape[1]);
        return NULL;
    }
    if (stride < 1 || padding < 0) {
        set_error(SDX4_ERR_INVALID_ARGUMENT, "conv2d: stride %d, padding %d", stride, padding);
        return NULL;
    }
    if (bias && tensor_numel(bias) != s.O) {
        set_error(SDX4_ERR_INVALID_ARGUMENT, "conv2d: bias has %" PRId64
                  " elements, weight has %" PRId64 " outputs", tensor_numel(bias), s.O);
        return NULL;
    }
    s.Ho = (s.H + 2 * (int64_t)padding - s.k) / stride + 1;
    s.Wo = (s.W + 2 * (int64_t)padding - s.k) / stride + 1;
    if (s.H + 2 * (int64_t)padding < s.k || s.W + 2 * (int64_t)padding < s.k) {
        set_error(SDX4_ERR_INVALID_ARGUMENT, "conv2d: input %s is smaller than kernel %s",
                  cpu_shape_str(x, xs, sizeof xs), cpu_shape_str(w, ws, sizeof ws));
        return NULL;
    }
    if (s.Ho * s.Wo > INT_MAX || s.H * s.W > INT_MAX || s.C * s.k * s.k > INT_MAX || s.O > INT_MAX) {
        set_error(SDX4_ERR_INVALID_ARGUMENT, "conv2d: input %s exceeds the BLAS int range",
                  cpu_shape_str(x, xs, sizeof xs));
        return NULL;
    }
    int64_t B = x->shape[0];
    tensor *y = cpu_new_tensor(be, 4, (int64_t[]){B, s.O, s.Ho, s.Wo});
    if (!y) return NULL;
    const float *bias_data = bias ? bias->data : NULL;
    int failed = 0;
    if (s.k == 1 && stride == 1 && padding == 0)
        conv_1x1(be, &s, B, x->data, w->data, bias_data, y->data);
    else if (winograd_pays(&s))
        failed = conv_winograd(be, &s, B, x->data, w->data, bias_data, y->data);
    else
        failed = conv_im2col(be, &s, B, x->data, w->data, bias_data, y->data);
    if (failed) {
        tensor_free(y);
        return NULL;
    }
    return y;
}
