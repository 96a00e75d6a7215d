/*
 * cuda_layout.cu - kernels that only move (and convert) values: type
 * conversion, bias broadcast, row gathers, im2col, channel concatenation,
 * nearest-neighbour upsampling, the token views of images, and the
 * transposes between PyTorch's NCHW and the backend's channels-last
 * storage (see cuda_internal.h).
 *
 * Elementwise kernels are grid-stride loops over the output, one element
 * per thread per step. The transposes go through 32x32 tiles in shared
 * memory (padded by one column so the column reads hit distinct banks) so
 * that both the reads and the writes are coalesced. Upsampling uses
 * PyTorch's rule for mode="nearest", with the same float arithmetic as the
 * CPU backend so that both pick the same source pixels.
 *
 * Channels-last makes the token layout of the transformer blocks the
 * image's own: [B, H, W, C] is [B, H*W, C], so nchw_to_tokens and
 * tokens_to_nchw are plain copies.
 */
#include <inttypes.h>
#include <limits.h>
#include <math.h>

#include "backend/cuda/cuda_internal.h"

/* ------------------------------------------------------------ conversion */

template <typename S, typename D>
__global__ void convert_kernel(const S *src, D *dst, int64_t n) {
    FOR_EACH(i, n) dst[i] = from_f32<D>(to_f32(src[i]));
}

int cuda_convert(cuda_backend *cb, const void *src, dtype src_type, void *dst, dtype dst_type,
                 int64_t n) {
    if (!cuda_storable(dst_type) || !cuda_storable(src_type)) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "convert: %s to %s", dtype_name(src_type),
                  dtype_name(dst_type));
        return -1;
    }
    if (src_type == dst_type)
        return cuda_ok(cudaMemcpyAsync(dst, src, (size_t)n * dtype_size(src_type),
                                       cudaMemcpyDeviceToDevice, cb->stream),
                       "convert: copy");
    CUDA_DISPATCH(src_type, S,
                  CUDA_DISPATCH(dst_type, D,
                                convert_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cb->stream>>>(
                                    (const S *)src, (D *)dst, n)));
    return cuda_launched("convert");
}

/* ------------------------------------------------------------------ bias */

template <typename T>
__global__ void fill_bias_kernel(T *y, const T *bias, int64_t n, int64_t channels, int64_t inner) {
    FOR_EACH(i, n) y[i] = bias[i / inner % channels];
}

/* channels-last rows (inner 1) of whole 16-byte units: one unit a thread */
__global__ void fill_rows_kernel(uint4 *y, const uint4 *bias, int64_t n, int64_t units) {
    FOR_EACH(i, n) y[i] = bias[i % units];
}

int cuda_fill_bias(cuda_backend *cb, void *y, const void *bias, dtype type, int64_t outer,
                   int64_t channels, int64_t inner) {
    int64_t n = outer * channels * inner, row = channels * (int64_t)dtype_size(type);
    if (inner == 1 && row % 16 == 0) {
        fill_rows_kernel<<<cuda_blocks(n * (int64_t)dtype_size(type) / 16), CUDA_THREADS, 0,
                           cb->stream>>>((uint4 *)y, (const uint4 *)bias,
                                         n * (int64_t)dtype_size(type) / 16, row / 16);
        return cuda_launched("bias");
    }
    CUDA_DISPATCH(type, T,
                  fill_bias_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cb->stream>>>(
                      (T *)y, (const T *)bias, n, channels, inner));
    return cuda_launched("bias");
}

/* ------------------------------------------------------- channel widths */

template <typename T>
__global__ void copy_channels_kernel(const T *src, int64_t src_c, T *dst, int64_t dst_c,
                                     int64_t rows) {
    FOR_EACH(i, rows * dst_c) {
        int64_t r = i / dst_c, c = i % dst_c;
        dst[i] = c < src_c ? src[r * src_c + c] : from_f32<T>(0.0f);
    }
}

int cuda_copy_channels(cuda_backend *cb, dtype type, const void *src, int64_t src_c, void *dst,
                       int64_t dst_c, int64_t rows) {
    CUDA_DISPATCH(type, T,
                  copy_channels_kernel<<<cuda_blocks(rows * dst_c), CUDA_THREADS, 0, cb->stream>>>(
                      (const T *)src, src_c, (T *)dst, dst_c, rows));
    return cuda_launched("copy_channels");
}

/* ------------------------------------------------------------- compare */

/* out[0] = max |a - b| (infinity where a has a NaN), out[1] = max |b|,
 * as float bits: non-negative floats order as their bits */
template <typename T>
__global__ void max_abs_kernel(const T *a, const T *b, int64_t n, unsigned *out) {
    float d = 0.0f, m = 0.0f;
    bool nonfinite = false; /* an inf in b would make any d look small */
    FOR_EACH(i, n) {
        const float x = to_f32(a[i]), y = to_f32(b[i]);
        nonfinite |= !isfinite(x) || !isfinite(y);
        d = fmaxf(d, fabsf(x - y));
        m = fmaxf(m, fabsf(y));
    }
    for (int mask = 16; mask > 0; mask >>= 1) {
        d = fmaxf(d, __shfl_xor_sync(0xffffffffu, d, mask));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, mask));
    }
    if (__any_sync(0xffffffffu, nonfinite)) d = INFINITY;
    if (threadIdx.x % 32 == 0) {
        atomicMax(&out[0], __float_as_uint(d));
        atomicMax(&out[1], __float_as_uint(m));
    }
}

float cuda_relative_difference(cuda_backend *cb, dtype type, const void *a, const void *b,
                               int64_t n) {
    cuda_buf out = {};
    unsigned host[2] = {0, 0};
    float rel = -1.0f;
    if (cuda_buf_alloc(cb, &out, sizeof host) == 0 &&
        cuda_ok(cudaMemsetAsync(out.ptr, 0, sizeof host, cb->stream), "compare") == 0) {
        CUDA_DISPATCH(type, T,
                      max_abs_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cb->stream>>>(
                          (const T *)a, (const T *)b, n, (unsigned *)out.ptr));
        if (cuda_launched("compare") == 0 &&
            cuda_ok(cudaMemcpyAsync(host, out.ptr, sizeof host, cudaMemcpyDeviceToHost,
                                    cb->stream), "compare") == 0 &&
            cuda_ok(cudaStreamSynchronize(cb->stream), "compare") == 0) {
            float d, m;
            memcpy(&d, &host[0], sizeof d);
            memcpy(&m, &host[1], sizeof m);
            rel = d / (m > 0.0f ? m : 1.0f);
        }
    }
    cuda_buf_free(cb, &out);
    return rel;
}

/* ---------------------------------------------------------------- gather */

template <typename S, typename D>
__global__ void gather_kernel(const S *table, const int32_t *ids, int64_t n, int64_t cols,
                              D *out) {
    FOR_EACH(i, n * cols) out[i] = from_f32<D>(to_f32(table[ids[i / cols] * cols + i % cols]));
}

int cuda_gather_rows(cuda_backend *cb, const void *table, dtype table_type, const int32_t *ids,
                     int n, int64_t cols, void *out, dtype out_type) {
    unsigned blocks = cuda_blocks((int64_t)n * cols);
    CUDA_DISPATCH(table_type, S,
                  CUDA_DISPATCH(out_type, D,
                                gather_kernel<<<blocks, CUDA_THREADS, 0, cb->stream>>>(
                                    (const S *)table, ids, n, cols, (D *)out)));
    return cuda_launched("embedding");
}

/* ---------------------------------------------------------------- im2col */

/* col[p][(ky * k + kx) * C + c] = x[iy][ix][c] (zero in the padding) for
 * the output pixels p0 .. p0 + P of one channels-last image. */
template <typename T>
__global__ void im2col_kernel(const T *x, int64_t C, int64_t H, int64_t W, int k, int stride,
                              int pad, int64_t Wo, int64_t p0, int64_t P, T *col) {
    const int64_t kkc = (int64_t)k * k * C;
    FOR_EACH(i, kkc * P) {
        int64_t p = i / kkc, j = i % kkc, c = j % C, tap = j / C;
        int ky = (int)(tap / k), kx = (int)(tap % k);
        int64_t oy = (p0 + p) / Wo, ox = (p0 + p) % Wo;
        int64_t iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
        col[i] = iy >= 0 && iy < H && ix >= 0 && ix < W ? x[(iy * W + ix) * C + c]
                                                         : from_f32<T>(0.0f);
    }
}

int cuda_im2col(cuda_backend *cb, dtype type, const void *x, int64_t C, int64_t H, int64_t W,
                int k, int stride, int pad, int64_t Wo, int64_t p0, int64_t P, void *col) {
    unsigned blocks = cuda_blocks(C * k * k * P);
    CUDA_DISPATCH(type, T,
                  im2col_kernel<<<blocks, CUDA_THREADS, 0, cb->stream>>>(
                      (const T *)x, C, H, W, k, stride, pad, Wo, p0, P, (T *)col));
    return cuda_launched("conv2d: im2col");
}

/* ---------------------------------------------------------------- concat */

/* 16 bytes a thread: rows of a and b that are whole 16-byte units
 * (every image of the UNet: 256 to 2048 half channels). unit u of pixel p
 * of y is unit u of a's row p, or unit u - Ua of b's. */
__global__ void concat_units_kernel(const uint4 *a, const uint4 *b, uint4 *y, int64_t pixels,
                                    int64_t Ua, int64_t Ub) {
    const int64_t U = Ua + Ub;
    FOR_EACH(i, pixels * U) {
        const int64_t p = i / U, u = i % U;
        y[i] = u < Ua ? a[p * Ua + u] : b[p * Ub + u - Ua];
    }
}

/* Channels-last: each pixel of the output is a's channels then b's: one
 * kernel over 16-byte units, else two strided copies. */
tensor *cuda_concat_channels(backend *be, const tensor *a, const tensor *b) {
    cuda_lock lock(be, "concat_channels");
    if (!lock) return NULL;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, "concat_channels", "a", a, 4) || cuda_check(cb, "concat_channels", "b", b, 4))
        return NULL;
    if (sdx4_check_concat_channels(a, b)) return NULL;
    int64_t Ca = a->shape[1], Cb = b->shape[1], pixels = a->shape[0] * a->shape[2] * a->shape[3];
    int64_t shape[4] = {a->shape[0], Ca + Cb, a->shape[2], a->shape[3]};
    size_t es = dtype_size(a->type), row_a = (size_t)Ca * es, row_b = (size_t)Cb * es;
    cuda_buf b_tmp;
    const void *bd = cuda_data_as(cb, b, a->type, &b_tmp);
    tensor *y = bd ? cuda_tensor_new(cb, 4, shape, a->type) : NULL;
    if (y && row_a % 16 == 0 && row_b % 16 == 0) {
        concat_units_kernel<<<cuda_blocks(pixels * (int64_t)(row_a + row_b) / 16), CUDA_THREADS, 0,
                              cb->stream>>>((const uint4 *)a->data, (const uint4 *)bd,
                                            (uint4 *)y->data, pixels, (int64_t)row_a / 16,
                                            (int64_t)row_b / 16);
        if (cuda_launched("concat_channels")) {
            cuda_tensor_release(cb, y);
            y = NULL;
        }
    } else if (y && (cuda_ok(cudaMemcpy2DAsync(y->data, row_a + row_b, a->data, row_a, row_a,
                                        (size_t)pixels, cudaMemcpyDeviceToDevice, cb->stream),
                      "concat_channels") ||
              cuda_ok(cudaMemcpy2DAsync((char *)y->data + row_a, row_a + row_b, bd, row_b, row_b,
                                        (size_t)pixels, cudaMemcpyDeviceToDevice, cb->stream),
                      "concat_channels"))) {
        cuda_tensor_release(cb, y);
        y = NULL;
    }
    cuda_buf_free(cb, &b_tmp);
    return y;
}

/* -------------------------------------------------------------- upsample */

/* PyTorch's source index for mode="nearest" with an explicit size:
 * floor(dst * (in / out)), the ratio and the product in float. */
__device__ __forceinline__ int64_t nearest_source(int64_t dst, int64_t in, int64_t out) {
    if (out == in) return dst;
    if (out == 2 * in) return dst >> 1;
    float scale = __fdiv_rn((float)in, (float)out);
    int64_t src = (int64_t)floorf(__fmul_rn((float)dst, scale));
    return src < in - 1 ? src : in - 1;
}

/* channels-last: y[b][oy][ox][c] = x[b][sy][sx][c], in units of C values
 * (the type) or of 16 bytes (uint4, where a pixel is whole 16-byte units:
 * a thread then moves 8 half channels, with one index computation) */
template <typename T>
__global__ void upsample_kernel(const T *x, T *y, int64_t B, int64_t C, int64_t H, int64_t W,
                                int64_t h, int64_t w) {
    FOR_EACH(i, B * h * w * C) {
        int64_t c = i % C, ox = i / C % w, oy = i / (C * w) % h, b = i / (C * w * h);
        y[i] = x[((b * H + nearest_source(oy, H, h)) * W + nearest_source(ox, W, w)) * C + c];
    }
}

tensor *cuda_upsample_nearest(backend *be, const tensor *x, int h, int w) {
    cuda_lock lock(be, "upsample_nearest");
    if (!lock) return NULL;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, "upsample_nearest", "input", x, 4)) return NULL;
    if (sdx4_check_upsample(h, w)) return NULL;
    int64_t B = x->shape[0], C = x->shape[1], H = x->shape[2], W = x->shape[3];
    int64_t shape[4] = {B, C, h, w};
    tensor *y = cuda_tensor_new(cb, 4, shape, x->type);
    if (!y) return NULL;
    const int64_t row = C * (int64_t)dtype_size(x->type);
    if (row % 16 == 0)
        upsample_kernel<uint4><<<cuda_blocks(B * h * w * row / 16), CUDA_THREADS, 0, cb->stream>>>(
            (const uint4 *)x->data, (uint4 *)y->data, B, row / 16, H, W, h, w);
    else
        CUDA_DISPATCH(x->type, T,
                      upsample_kernel<T><<<cuda_blocks(B * C * h * w), CUDA_THREADS, 0,
                                           cb->stream>>>((const T *)x->data, (T *)y->data, B, C,
                                                         H, W, h, w));
    if (cuda_launched("upsample_nearest")) {
        cuda_tensor_release(cb, y);
        return NULL;
    }
    return y;
}

/* channels-last: the small image's pixel (y, x) holds, at channel
 * c*r*r + i*r + j, the large image's pixel (y*r + i, x*r + j) at channel c.
 * One thread per element of the large image, in either direction. */
template <typename T>
__global__ void pixel_shuffle_kernel(const T *src, T *dst, int64_t B, int64_t C, int64_t h, int64_t w,
                                     int r, int unshuffle) {
    int64_t H = h * r, W = w * r, rr = (int64_t)r * r;
    FOR_EACH(e, B * H * W * C) {
        int64_t c = e % C, X = e / C % W, Y = e / (C * W) % H, b = e / (C * W * H);
        int64_t small = ((b * h + Y / r) * w + X / r) * C * rr + c * rr + (Y % r) * r + X % r;
        if (unshuffle) dst[small] = src[e];
        else dst[e] = src[small];
    }
}

static tensor *pixel_shuffled(backend *be, const tensor *x, int r, int unshuffle) {
    const char *op = unshuffle ? "pixel_unshuffle" : "pixel_shuffle";
    cuda_lock lock(be, op);
    if (!lock) return NULL;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, op, "input", x, 4) || sdx4_check_pixel_shuffle(x, r, unshuffle)) return NULL;
    int64_t B = x->shape[0], C = x->shape[1], H = x->shape[2], W = x->shape[3], rr = (int64_t)r * r;
    int64_t big_c = unshuffle ? C : C / rr, h = unshuffle ? H / r : H, w = unshuffle ? W / r : W;
    int64_t shape[4] = {B, unshuffle ? C * rr : big_c, unshuffle ? h : H * r, unshuffle ? w : W * r};
    tensor *y = cuda_tensor_new(cb, 4, shape, x->type);
    if (!y) return NULL;
    CUDA_DISPATCH(x->type, T,
                  pixel_shuffle_kernel<T><<<cuda_blocks(B * big_c * h * r * w * r), CUDA_THREADS, 0,
                                            cb->stream>>>((const T *)x->data, (T *)y->data, B, big_c, h,
                                                          w, r, unshuffle));
    if (cuda_launched(op)) {
        cuda_tensor_release(cb, y);
        return NULL;
    }
    return y;
}

tensor *cuda_pixel_shuffle(backend *be, const tensor *x, int r) { return pixel_shuffled(be, x, r, 0); }
tensor *cuda_pixel_unshuffle(backend *be, const tensor *x, int r) { return pixel_shuffled(be, x, r, 1); }

/* ------------------------------------------------------------- transpose */

#define TILE 32
#define TILE_ROWS 8 /* threads per tile column: each moves TILE / TILE_ROWS values */

/* dst[b][c][r] = src[b][r][c] for batches (grid.y) of rows x cols
 * matrices, converting the type; grid.x enumerates the tiles. */
template <typename S, typename D>
__global__ void transpose_kernel(const S *src, D *dst, int64_t rows, int64_t cols,
                                 int64_t col_tiles) {
    __shared__ float tile[TILE][TILE + 1];
    const S *s = src + blockIdx.y * rows * cols;
    D *d = dst + blockIdx.y * rows * cols;
    int64_t r0 = (int64_t)(blockIdx.x / col_tiles) * TILE, c0 = (int64_t)(blockIdx.x % col_tiles) * TILE;
    for (int i = threadIdx.y; i < TILE; i += TILE_ROWS) {
        int64_t r = r0 + i, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[i][threadIdx.x] = to_f32(s[r * cols + c]);
    }
    __syncthreads();
    for (int i = threadIdx.y; i < TILE; i += TILE_ROWS) {
        int64_t c = c0 + i, r = r0 + threadIdx.x;
        if (r < rows && c < cols) d[c * rows + r] = from_f32<D>(tile[threadIdx.x][i]);
    }
}

int cuda_transpose(cuda_backend *cb, const void *src, dtype src_type, void *dst, dtype dst_type,
                   int64_t batches, int64_t rows, int64_t cols) {
    int64_t col_tiles = (cols + TILE - 1) / TILE, tiles = (rows + TILE - 1) / TILE * col_tiles;
    if (tiles > INT_MAX || batches > 65535) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                  "transpose: %" PRId64 " x %" PRId64 "x%" PRId64 " is too large", batches, rows,
                  cols);
        return -1;
    }
    if (!cuda_storable(src_type) || !cuda_storable(dst_type)) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "transpose: %s to %s", dtype_name(src_type),
                  dtype_name(dst_type));
        return -1;
    }
    if (rows * cols == 0) return 0;
    dim3 grid((unsigned)tiles, (unsigned)batches), block(TILE, TILE_ROWS);
    CUDA_DISPATCH(src_type, S,
                  CUDA_DISPATCH(dst_type, D,
                                transpose_kernel<<<grid, block, 0, cb->stream>>>(
                                    (const S *)src, (D *)dst, rows, cols, col_tiles)));
    return cuda_launched("transpose");
}

/* A new tensor of `shape` holding a copy of x's memory. */
static tensor *copy_as(cuda_backend *cb, const char *op, const tensor *x, int ndim,
                       const int64_t *shape) {
    tensor *y = cuda_tensor_new(cb, ndim, shape, x->type);
    if (y && cuda_ok(cudaMemcpyAsync(y->data, x->data, (size_t)tensor_numel(x) * dtype_size(x->type),
                                     cudaMemcpyDeviceToDevice, cb->stream),
                     op)) {
        cuda_tensor_release(cb, y);
        y = NULL;
    }
    return y;
}

tensor *cuda_nchw_to_tokens(backend *be, const tensor *x) {
    cuda_lock lock(be, "nchw_to_tokens");
    if (!lock || cuda_check(lock.cb, "nchw_to_tokens", "input", x, 4)) return NULL;
    int64_t shape[3] = {x->shape[0], x->shape[2] * x->shape[3], x->shape[1]};
    return copy_as(lock.cb, "nchw_to_tokens", x, 3, shape);
}

/* Channels-last images and tokens are the same bytes: only the header
 * changes. */
int cuda_relayout_tokens(backend *be, tensor *x, int h, int w) {
    cuda_lock lock(be);
    if (!lock || cuda_check(lock.cb, "relayout_tokens", "x", x, 0)) return -1;
    if (x->ndim == 4) {
        int64_t C = x->shape[1], T = x->shape[2] * x->shape[3];
        x->ndim = 3, x->shape[1] = T, x->shape[2] = C, x->shape[3] = 0;
    } else if (x->ndim == 3) {
        if (sdx4_check_tokens_to_nchw(x, h, w)) return -1;
        int64_t C = x->shape[2];
        x->ndim = 4, x->shape[1] = C, x->shape[2] = h, x->shape[3] = w;
    } else {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "relayout_tokens: x must be 3-D or 4-D");
        return -1;
    }
    return 0;
}

tensor *cuda_tokens_to_nchw(backend *be, const tensor *x, int h, int w) {
    cuda_lock lock(be, "tokens_to_nchw");
    if (!lock || cuda_check(lock.cb, "tokens_to_nchw", "input", x, 3)) return NULL;
    if (sdx4_check_tokens_to_nchw(x, h, w)) return NULL;
    int64_t shape[4] = {x->shape[0], x->shape[2], h, w};
    return copy_as(lock.cb, "tokens_to_nchw", x, 4, shape);
}
