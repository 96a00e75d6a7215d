/*
 * cpu_layout.c - operations that only move values: channel concatenation,
 * nearest-neighbour upsampling, and the NCHW <-> token transposes of the
 * transformer blocks.
 *
 * The transposes go through 32x32 blocks so both the reads and the writes
 * touch whole cache lines; upsampling precomputes the source row and column
 * of every output position with PyTorch's rule for mode="nearest".
 */
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_internal.h"
#include "core/cancel.h"
#include "core/error.h"

tensor *sdx4_cpu_concat_channels(backend *be, const tensor *a, const tensor *b) {
    if (sdx4_cpu_check("concat_channels", "a", a, 4) || sdx4_cpu_check("concat_channels", "b", b, 4))
        return NULL;
    if (sdx4_check_concat_channels(a, b)) return NULL;
    int64_t B = a->shape[0], Ca = a->shape[1], Cb = b->shape[1], C = Ca + Cb;
    int64_t S = a->shape[2] * a->shape[3];
    tensor *y = sdx4_cpu_new_tensor(be, 4, (int64_t[]){B, C, a->shape[2], a->shape[3]});
    if (!y) return NULL;
    const float *ad = a->data, *bd = b->data;
    float *yd = y->data;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static)
    for (int64_t bc = 0; bc < B * C; bc++) {
        int64_t n = bc / C, c = bc % C;
        const float *src = c < Ca ? ad + (n * Ca + c) * S : bd + (n * Cb + c - Ca) * S;
        memcpy(yd + bc * S, src, (size_t)S * sizeof(float));
    }
    return y;
}

/* PyTorch's source index for mode="nearest" with an explicit size:
 * floor(dst * (in / out)), the ratio and the product in float. */
static int64_t nearest_source(int64_t dst, int64_t in, int64_t out) {
    if (out == in) return dst;
    if (out == 2 * in) return dst >> 1;
    float scale = (float)in / (float)out;
    int64_t src = (int64_t)floorf((float)dst * scale);
    return src < in - 1 ? src : in - 1;
}

tensor *sdx4_cpu_upsample_nearest(backend *be, const tensor *x, int h, int w) {
    if (sdx4_cpu_check("upsample_nearest", "input", x, 4)) return NULL;
    if (sdx4_check_upsample(h, w)) return NULL;
    int64_t B = x->shape[0], C = x->shape[1], H = x->shape[2], W = x->shape[3];
    int64_t *src_col = malloc((size_t)w * sizeof *src_col);
    if (!src_col) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "upsample_nearest: out of memory");
        return NULL;
    }
    tensor *y = sdx4_cpu_new_tensor(be, 4, (int64_t[]){B, C, h, w});
    if (!y) {
        free(src_col);
        return NULL;
    }
    for (int ox = 0; ox < w; ox++) src_col[ox] = nearest_source(ox, W, w);
    const float *xd = x->data;
    float *yd = y->data;
    /* seconds at the VAE's 2048x2048 layers on a busy machine: the
     * caller's cancel flag (core/cancel.h) is read row by row */
    const sdx4_atomic_int *cancel = sdx4_cancel_flag(); /* the workers' thread-locals have none */
    int canceled = 0;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static) reduction(|| : canceled)
    for (int64_t row = 0; row < B * C * h; row++) {
        if (canceled || (canceled = cancel_is_set(cancel))) continue;
        int64_t bc = row / h, oy = row % h;
        const float *src = xd + (bc * H + nearest_source(oy, H, h)) * W;
        float *dst = yd + row * w;
        for (int ox = 0; ox < w; ox++) dst[ox] = src[src_col[ox]];
    }
    free(src_col);
    if (canceled) {
        tensor_free(y);
        sdx4_cancel_stopped();
        return NULL;
    }
    return y;
}

/* Both directions in one loop over the small side's rows: the r x r
 * block at (y, x) of channel c of the large image is channels c*r*r + i*r
 * + j at (y, x) of the small one. */
static tensor *pixel_shuffled(backend *be, const tensor *x, int r, int unshuffle) {
    const char *op = unshuffle ? "pixel_unshuffle" : "pixel_shuffle";
    if (sdx4_cpu_check(op, "input", x, 4) || sdx4_check_pixel_shuffle(x, r, unshuffle)) return NULL;
    int64_t B = x->shape[0], C = x->shape[1], H = x->shape[2], W = x->shape[3], rr = (int64_t)r * r;
    int64_t big_c = unshuffle ? C : C / rr, h = unshuffle ? H / r : H, w = unshuffle ? W / r : W;
    tensor *y = sdx4_cpu_new_tensor(be, 4, unshuffle ? (int64_t[]){B, C * rr, h, w}
                                                     : (int64_t[]){B, big_c, H * r, W * r});
    if (!y) return NULL;
    const float *src = x->data;
    float *dst = y->data;
    /* one row of the small image for one of its channels: b, c, i, j, sy */
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static)
    for (int64_t row = 0; row < B * big_c * rr * h; row++) {
        int64_t sy = row % h, q = row / h, ij = q % rr, bc = q / rr, i = ij / r, j = ij % r;
        int64_t small = q * h * w + sy * w, big = bc * h * r * w * r + (sy * r + i) * w * r + j;
        if (unshuffle)
            for (int64_t sx = 0; sx < w; sx++) dst[small + sx] = src[big + sx * r];
        else
            for (int64_t sx = 0; sx < w; sx++) dst[big + sx * r] = src[small + sx];
    }
    return y;
}

tensor *sdx4_cpu_pixel_shuffle(backend *be, const tensor *x, int r) { return pixel_shuffled(be, x, r, 0); }
tensor *sdx4_cpu_pixel_unshuffle(backend *be, const tensor *x, int r) { return pixel_shuffled(be, x, r, 1); }

/* dst[b][c][r] = src[b][r][c] for `batches` matrices of rows x cols. */
#define BLOCK 32
static void transpose(backend *be, const float *src, float *dst, int64_t batches, int64_t rows,
                      int64_t cols) {
    int64_t row_blocks = (rows + BLOCK - 1) / BLOCK, col_blocks = (cols + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static)
    for (int64_t u = 0; u < batches * row_blocks * col_blocks; u++) {
        int64_t b = u / (row_blocks * col_blocks), rb = u / col_blocks % row_blocks;
        int64_t r0 = rb * BLOCK, c0 = u % col_blocks * BLOCK;
        int64_t r1 = r0 + BLOCK < rows ? r0 + BLOCK : rows;
        int64_t c1 = c0 + BLOCK < cols ? c0 + BLOCK : cols;
        const float *s = src + b * rows * cols;
        float *d = dst + b * rows * cols;
        for (int64_t c = c0; c < c1; c++)
            for (int64_t r = r0; r < r1; r++) d[c * rows + r] = s[r * cols + c];
    }
}

tensor *sdx4_cpu_nchw_to_tokens(backend *be, const tensor *x) {
    if (sdx4_cpu_check("nchw_to_tokens", "input", x, 4)) return NULL;
    int64_t B = x->shape[0], C = x->shape[1], S = x->shape[2] * x->shape[3];
    tensor *y = sdx4_cpu_new_tensor(be, 3, (int64_t[]){B, S, C});
    if (!y) return NULL;
    transpose(be, x->data, y->data, B, C, S);
    return y;
}

tensor *sdx4_cpu_tokens_to_nchw(backend *be, const tensor *x, int h, int w) {
    if (sdx4_cpu_check("tokens_to_nchw", "input", x, 3)) return NULL;
    if (sdx4_check_tokens_to_nchw(x, h, w)) return NULL;
    int64_t B = x->shape[0], S = x->shape[1], C = x->shape[2];
    tensor *y = sdx4_cpu_new_tensor(be, 4, (int64_t[]){B, C, h, w});
    if (!y) return NULL;
    transpose(be, x->data, y->data, B, S, C);
    return y;
}
