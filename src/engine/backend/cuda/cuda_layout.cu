/*
 * cuda_layout.cu - kernels that only move (and convert) values: type
 * conversion, bias broadcast, row gathers, im2col, channel concatenation,
 * nearest-neighbour upsampling and the NCHW <-> token transposes.
 *
 * Elementwise kernels are grid-stride loops over the output, one element
 * per thread per step. The transposes go through 32x32 tiles in shared
 * memory (padded by one column so the column reads hit distinct banks) so
 * that both the reads and the writes are coalesced. Upsampling uses
 * PyTorch's rule for mode="nearest", with the same float arithmetic as the
 * CPU backend so that both pick the same source pixels.
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

template <typename S>
static void launch_convert(cuda_backend *cb, const void *src, void *dst, dtype dst_type,
                           int64_t n) {
    if (dst_type == DTYPE_F16)
        convert_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cb->stream>>>((const S *)src,
                                                                        (__half *)dst, n);
    else
        convert_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cb->stream>>>((const S *)src,
                                                                        (float *)dst, n);
}

int cuda_convert(cuda_backend *cb, const void *src, dtype src_type, void *dst, dtype dst_type,
                 int64_t n) {
    if (dst_type != DTYPE_F32 && dst_type != DTYPE_F16) {
        set_error(SDX4_ERR_INVALID_ARGUMENT, "convert: cannot store %s", dtype_name(dst_type));
        return -1;
    }
    if (src_type == dst_type)
        return cuda_ok(cudaMemcpyAsync(dst, src, (size_t)n * dtype_size(src_type),
                                       cudaMemcpyDeviceToDevice, cb->stream),
                       "convert: copy");
    switch (src_type) {
    case DTYPE_F32: launch_convert<float>(cb, src, dst, dst_type, n); break;
    case DTYPE_F16: launch_convert<__half>(cb, src, dst, dst_type, n); break;
    case DTYPE_BF16: launch_convert<__nv_bfloat16>(cb, src, dst, dst_type, n); break;
    default:
        set_error(SDX4_ERR_INVALID_ARGUMENT, "convert: cannot read %s", dtype_name(src_type));
        return -1;
    }
    return cuda_launched("convert");
}

/* ------------------------------------------------------------------ bias */

template <typename T>
__global__ void fill_bias_kernel(T *y, const T *bias, int64_t n, int64_t channels, int64_t inner) {
    FOR_EACH(i, n) y[i] = bias[i / inner % channels];
}

int cuda_fill_bias(cuda_backend *cb, void *y, const void *bias, dtype type, int64_t outer,
                   int64_t channels, int64_t inner) {
    int64_t n = outer * channels * inner;
    if (type == DTYPE_F16)
        fill_bias_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cb->stream>>>(
            (__half *)y, (const __half *)bias, n, channels, inner);
    else
        fill_bias_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cb->stream>>>(
            (float *)y, (const float *)bias, n, channels, inner);
    return cuda_launched("bias");
}

/* ---------------------------------------------------------------- gather */

template <typename S, typename D>
__global__ void gather_kernel(const S *table, const int32_t *ids, int64_t n, int64_t cols,
                              D *out) {
    FOR_EACH(i, n * cols) out[i] = from_f32<D>(to_f32(table[ids[i / cols] * cols + i % cols]));
}

template <typename S>
static void launch_gather(cuda_backend *cb, const void *table, const int32_t *ids, int n,
                          int64_t cols, void *out, dtype out_type) {
    unsigned blocks = cuda_blocks((int64_t)n * cols);
    if (out_type == DTYPE_F16)
        gather_kernel<<<blocks, CUDA_THREADS, 0, cb->stream>>>((const S *)table, ids, n, cols,
                                                               (__half *)out);
    else
        gather_kernel<<<blocks, CUDA_THREADS, 0, cb->stream>>>((const S *)table, ids, n, cols,
                                                               (float *)out);
}

int cuda_gather_rows(cuda_backend *cb, const void *table, dtype table_type, const int32_t *ids,
                     int n, int64_t cols, void *out, dtype out_type) {
    if (table_type == DTYPE_F16)
        launch_gather<__half>(cb, table, ids, n, cols, out, out_type);
    else
        launch_gather<float>(cb, table, ids, n, cols, out, out_type);
    return cuda_launched("embedding");
}

/* ---------------------------------------------------------------- im2col */

template <typename T>
__global__ void im2col_kernel(const T *x, int64_t C, int64_t H, int64_t W, int k, int stride,
                              int pad, int64_t Wo, int64_t p0, int64_t P, T *col) {
    FOR_EACH(i, C * k * k * P) {
        int64_t p = i % P, row = i / P, c = row / (k * k);
        int ky = (int)(row / k % k), kx = (int)(row % k);
        int64_t oy = (p0 + p) / Wo, ox = (p0 + p) % Wo;
        int64_t iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
        col[i] = iy >= 0 && iy < H && ix >= 0 && ix < W ? x[(c * H + iy) * W + ix]
                                                         : from_f32<T>(0.0f);
    }
}

int cuda_im2col(cuda_backend *cb, dtype type, const void *x, int64_t C, int64_t H, int64_t W,
                int k, int stride, int pad, int64_t Wo, int64_t p0, int64_t P, void *col) {
    unsigned blocks = cuda_blocks(C * k * k * P);
    if (type == DTYPE_F16)
        im2col_kernel<<<blocks, CUDA_THREADS, 0, cb->stream>>>(
            (const __half *)x, C, H, W, k, stride, pad, Wo, p0, P, (__half *)col);
    else
        im2col_kernel<<<blocks, CUDA_THREADS, 0, cb->stream>>>(
            (const float *)x, C, H, W, k, stride, pad, Wo, p0, P, (float *)col);
    return cuda_launched("conv2d: im2col");
}

/* ---------------------------------------------------------------- concat */

/* Each image of the output is a's channels then b's: 2B plain copies. */
tensor *cuda_concat_channels(backend *be, const tensor *a, const tensor *b) {
    cuda_lock lock(be, "concat_channels");
    if (!lock) return NULL;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, "concat_channels", "a", a, 4) || cuda_check(cb, "concat_channels", "b", b, 4))
        return NULL;
    if (check_concat_channels(a, b)) return NULL;
    int64_t B = a->shape[0], Ca = a->shape[1], Cb = b->shape[1], S = a->shape[2] * a->shape[3];
    int64_t shape[4] = {B, Ca + Cb, a->shape[2], a->shape[3]};
    size_t es = dtype_size(a->type), bytes_a = (size_t)(Ca * S) * es, bytes_b = (size_t)(Cb * S) * es;
    cuda_buf b_tmp;
    const void *bd = cuda_data_as(cb, b, a->type, &b_tmp);
    tensor *y = bd ? cuda_tensor_new(cb, 4, shape, a->type) : NULL;
    for (int64_t n = 0; y && n < B; n++) {
        char *dst = (char *)y->data + (size_t)n * (bytes_a + bytes_b);
        if (cuda_ok(cudaMemcpyAsync(dst, (const char *)a->data + (size_t)n * bytes_a, bytes_a,
                                    cudaMemcpyDeviceToDevice, cb->stream),
                    "concat_channels") ||
            cuda_ok(cudaMemcpyAsync(dst + bytes_a, (const char *)bd + (size_t)n * bytes_b, bytes_b,
                                    cudaMemcpyDeviceToDevice, cb->stream),
                    "concat_channels")) {
            cuda_tensor_release(cb, y);
            y = NULL;
        }
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

template <typename T>
__global__ void upsample_kernel(const T *x, T *y, int64_t BC, int64_t H, int64_t W, int64_t h,
                                int64_t w) {
    FOR_EACH(i, BC * h * w) {
        int64_t ox = i % w, oy = i / w % h, bc = i / (w * h);
        y[i] = x[(bc * H + nearest_source(oy, H, h)) * W + nearest_source(ox, W, w)];
    }
}

tensor *cuda_upsample_nearest(backend *be, const tensor *x, int h, int w) {
    cuda_lock lock(be, "upsample_nearest");
    if (!lock) return NULL;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, "upsample_nearest", "input", x, 4)) return NULL;
    if (check_upsample(h, w)) return NULL;
    int64_t BC = x->shape[0] * x->shape[1], H = x->shape[2], W = x->shape[3];
    int64_t shape[4] = {x->shape[0], x->shape[1], h, w};
    tensor *y = cuda_tensor_new(cb, 4, shape, x->type);
    if (!y) return NULL;
    unsigned blocks = cuda_blocks(BC * h * w);
    if (x->type == DTYPE_F16)
        upsample_kernel<<<blocks, CUDA_THREADS, 0, cb->stream>>>(
            (const __half *)x->data, (__half *)y->data, BC, H, W, h, w);
    else
        upsample_kernel<<<blocks, CUDA_THREADS, 0, cb->stream>>>(
            (const float *)x->data, (float *)y->data, BC, H, W, h, w);
    if (cuda_launched("upsample_nearest")) {
        cuda_tensor_release(cb, y);
        return NULL;
    }
    return y;
}

/* ------------------------------------------------------------- transpose */

#define TILE 32
#define TILE_ROWS 8 /* threads per tile column: each moves TILE / TILE_ROWS values */

/* dst[b][c][r] = src[b][r][c] for batches of rows x cols matrices. */
template <typename T>
__global__ void transpose_kernel(const T *src, T *dst, int64_t rows, int64_t cols) {
    __shared__ T tile[TILE][TILE + 1];
    const T *s = src + blockIdx.z * rows * cols;
    T *d = dst + blockIdx.z * rows * cols;
    int64_t r0 = (int64_t)blockIdx.y * TILE, c0 = (int64_t)blockIdx.x * TILE;
    for (int i = threadIdx.y; i < TILE; i += TILE_ROWS) {
        int64_t r = r0 + i, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[i][threadIdx.x] = s[r * cols + c];
    }
    __syncthreads();
    for (int i = threadIdx.y; i < TILE; i += TILE_ROWS) {
        int64_t c = c0 + i, r = r0 + threadIdx.x;
        if (r < rows && c < cols) d[c * rows + r] = tile[threadIdx.x][i];
    }
}

/* The lock is held by the caller. */
static tensor *transpose(cuda_backend *cb, const char *op, const tensor *x, int64_t batches,
                         int64_t rows, int64_t cols, int ndim, const int64_t *shape) {
    int64_t row_tiles = (rows + TILE - 1) / TILE, col_tiles = (cols + TILE - 1) / TILE;
    if (row_tiles > 65535 || batches > 65535 || col_tiles > INT_MAX) {
        set_error(SDX4_ERR_INVALID_ARGUMENT, "%s: %" PRId64 "x%" PRId64 " is too large", op, rows,
                  cols);
        return NULL;
    }
    tensor *y = cuda_tensor_new(cb, ndim, shape, x->type);
    if (!y) return NULL;
    dim3 grid((unsigned)col_tiles, (unsigned)row_tiles, (unsigned)batches), block(TILE, TILE_ROWS);
    if (x->type == DTYPE_F16)
        transpose_kernel<<<grid, block, 0, cb->stream>>>((const __half *)x->data,
                                                         (__half *)y->data, rows, cols);
    else
        transpose_kernel<<<grid, block, 0, cb->stream>>>((const float *)x->data, (float *)y->data,
                                                         rows, cols);
    if (cuda_launched(op)) {
        cuda_tensor_release(cb, y);
        return NULL;
    }
    return y;
}

tensor *cuda_nchw_to_tokens(backend *be, const tensor *x) {
    cuda_lock lock(be, "nchw_to_tokens");
    if (!lock || cuda_check(lock.cb, "nchw_to_tokens", "input", x, 4)) return NULL;
    int64_t B = x->shape[0], C = x->shape[1], S = x->shape[2] * x->shape[3];
    int64_t shape[3] = {B, S, C};
    return transpose(lock.cb, "nchw_to_tokens", x, B, C, S, 3, shape);
}

tensor *cuda_tokens_to_nchw(backend *be, const tensor *x, int h, int w) {
    cuda_lock lock(be, "tokens_to_nchw");
    if (!lock || cuda_check(lock.cb, "tokens_to_nchw", "input", x, 3)) return NULL;
    if (check_tokens_to_nchw(x, h, w)) return NULL;
    int64_t B = x->shape[0], S = x->shape[1], C = x->shape[2];
    int64_t shape[4] = {B, C, h, w};
    return transpose(lock.cb, "tokens_to_nchw", x, B, S, C, 4, shape);
}
