/*
 * cuda_norm_act.cu - normalisations, activations and in-place arithmetic.
 *
 * Statistics are taken in float with Welford's update per thread and Chan's
 * formula to merge partial results, which stays exact to float precision
 * even when the mean is large against the spread (a sum of squares would
 * cancel). GroupNorm spreads each group over many blocks, because the
 * VAE's groups hold millions of values while there are only B*32 of them:
 *
 *   group_stats     grid (chunks, B*groups): partial (n, mean, M2) of one
 *                   chunk of one group
 *   group_finalize  one warp per group merges its chunks in double:
 *                   mean and 1/sqrt(var + eps)
 *   group_apply     (x - mean) * (rstd * gamma[c]) + beta[c], then the
 *                   activation, over a 2-D grid of (position, channel)
 *
 * Images are channels-last (cuda_internal.h): there a group's values are
 * the runs of C/groups channels of every pixel. group_stats_cl reads whole
 * pixel rows instead, coalesced, one channel per thread (or several, for
 * wide rows), for a chunk of the pixels of one image; the block then
 * merges its per-channel statistics into per-group ones in shared memory.
 * group_apply is one pass over the tensor in memory order. Tensors of
 * other ranks ([B, C, ...]) keep each group contiguous.
 *
 * LayerNorm rows are short (at most a few thousand values): one block per
 * row computes the statistics and writes the row.
 *
 * The activations are PyTorch's exact formulas, as the CPU backend's: silu
 * x * sigmoid(x), gelu 0.5 x (1 + erf(x / sqrt 2)), quick_gelu
 * x * sigmoid(1.702 x). Half tensors are computed in float and rounded
 * once when stored.
 */
#include <inttypes.h>
#include <limits.h>
#include <math.h>

#include "backend/cuda/cuda_internal.h"

/* ----------------------------------------------------------- activations */

__device__ __forceinline__ float gelu(float x) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}

__device__ __forceinline__ float activate_one(float x, activation act) {
    switch (act) {
    case ACT_SILU: return x / (1.0f + expf(-x));
    case ACT_GELU: return gelu(x);
    case ACT_QUICK_GELU: return x / (1.0f + expf(-1.702f * x));
    default: return x;
    }
}

template <typename T>
__global__ void activate_kernel(const T *x, T *y, int64_t n, activation act) {
    FOR_EACH(i, n) y[i] = from_f32<T>(activate_one(to_f32(x[i]), act));
}

tensor *cuda_activate(backend *be, const tensor *x, activation act) {
    cuda_lock lock(be, "activate");
    if (!lock) return NULL;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, "activate", "input", x, 0) || check_activation("activate", act)) return NULL;
    tensor *y = cuda_tensor_new(cb, x->ndim, x->shape, x->type);
    if (!y) return NULL;
    int64_t n = tensor_numel(x);
    CUDA_DISPATCH(x->type, T,
                  activate_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cb->stream>>>(
                      (const T *)x->data, (T *)y->data, n, act));
    if (cuda_launched("activate")) {
        cuda_tensor_release(cb, y);
        return NULL;
    }
    return y;
}

/* in diffusers: hidden, gate = proj(x).chunk(2, dim=-1); hidden * gelu(gate) */
template <typename T>
__global__ void geglu_kernel(const T *x, T *y, int64_t n, int64_t N) {
    FOR_EACH(i, n) {
        const T *row = x + i / N * 2 * N;
        int64_t c = i % N;
        y[i] = from_f32<T>(to_f32(row[c]) * gelu(to_f32(row[N + c])));
    }
}

tensor *cuda_geglu(backend *be, const tensor *x) {
    cuda_lock lock(be, "geglu");
    if (!lock) return NULL;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, "geglu", "input", x, 0) || cuda_refuse_image("geglu", x)) return NULL;
    if (check_geglu(x)) return NULL;
    int64_t N = x->shape[x->ndim - 1] / 2;
    int64_t shape[4];
    memcpy(shape, x->shape, sizeof shape);
    shape[x->ndim - 1] = N;
    tensor *y = cuda_tensor_new(cb, x->ndim, shape, x->type);
    if (!y) return NULL;
    int64_t n = tensor_numel(y);
    CUDA_DISPATCH(x->type, T,
                  geglu_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cb->stream>>>(
                      (const T *)x->data, (T *)y->data, n, N));
    if (cuda_launched("geglu")) {
        cuda_tensor_release(cb, y);
        return NULL;
    }
    return y;
}

/* -------------------------------------------------------------- in place */

/* a += b * scale; scale 1 is exactly a + b (the residual connections) */
template <typename T>
__global__ void add_kernel(T *a, const T *b, int64_t n, float scale) {
    if (scale == 1.0f) {
        FOR_EACH(i, n) a[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
    } else {
        FOR_EACH(i, n) a[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]) * scale);
    }
}

int cuda_add_inplace(backend *be, tensor *a, const tensor *b, float scale_b) {
    cuda_lock lock(be, "add");
    if (!lock) return -1;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, "add", "a", a, 0) || cuda_check(cb, "add", "b", b, 0) ||
        check_same_shape("add", a, b))
        return -1;
    cuda_buf b_tmp;
    const void *bd = cuda_data_as(cb, b, a->type, &b_tmp);
    if (!bd) return -1;
    int64_t n = tensor_numel(a);
    CUDA_DISPATCH(a->type, T,
                  add_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cb->stream>>>(
                      (T *)a->data, (const T *)bd, n, scale_b));
    int rc = cuda_launched("add");
    cuda_buf_free(cb, &b_tmp);
    return rc;
}

/* x[b][p][c] += v[b][c] over the pixels p of channels-last images of
 * C channels and `image` values */
template <typename T>
__global__ void channel_bias_kernel(T *x, const T *v, int64_t n, int64_t C, int64_t image) {
    FOR_EACH(i, n) x[i] = from_f32<T>(to_f32(x[i]) + to_f32(v[i / image * C + i % C]));
}

int cuda_add_channel_bias_inplace(backend *be, tensor *x, const tensor *v) {
    cuda_lock lock(be, "add_channel_bias");
    if (!lock) return -1;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, "add_channel_bias", "x", x, 4) ||
        cuda_check(cb, "add_channel_bias", "v", v, 2))
        return -1;
    if (check_channel_bias(x, v)) return -1;
    int64_t C = x->shape[1], image = C * x->shape[2] * x->shape[3];
    cuda_buf v_tmp;
    const void *vd = cuda_data_as(cb, v, x->type, &v_tmp);
    if (!vd) return -1;
    int64_t n = tensor_numel(x);
    CUDA_DISPATCH(x->type, T,
                  channel_bias_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cb->stream>>>(
                      (T *)x->data, (const T *)vd, n, C, image));
    int rc = cuda_launched("add_channel_bias");
    cuda_buf_free(cb, &v_tmp);
    return rc;
}

template <typename T>
__global__ void scale_kernel(T *x, int64_t n, float s) {
    FOR_EACH(i, n) x[i] = from_f32<T>(to_f32(x[i]) * s);
}

int cuda_scale_inplace(backend *be, tensor *x, float s) {
    cuda_lock lock(be, "scale");
    if (!lock) return -1;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, "scale", "x", x, 0)) return -1;
    int64_t n = tensor_numel(x);
    CUDA_DISPATCH(x->type, T,
                  scale_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cb->stream>>>((T *)x->data, n, s));
    return cuda_launched("scale");
}

/* --------------------------------------------------------------- welford */

/* count, mean and sum of squared deviations of a set of values */
struct welford {
    float n, mean, m2;
};

__device__ __forceinline__ void welford_add(welford &w, float x) {
    w.n += 1.0f;
    float d = x - w.mean;
    w.mean += d / w.n;
    w.m2 += d * (x - w.mean);
}

/* Chan et al.: the statistics of the union of two sets. */
__device__ __forceinline__ welford welford_merge(welford a, welford b) {
    float n = a.n + b.n;
    if (n == 0.0f) return a;
    float delta = b.mean - a.mean, share = b.n / n;
    welford r;
    r.n = n;
    r.mean = a.mean + delta * share;
    r.m2 = a.m2 + b.m2 + delta * delta * a.n * share;
    return r;
}

__device__ __forceinline__ welford welford_shuffle(welford w, int lane_mask) {
    welford o;
    o.n = __shfl_xor_sync(0xffffffffu, w.n, lane_mask);
    o.mean = __shfl_xor_sync(0xffffffffu, w.mean, lane_mask);
    o.m2 = __shfl_xor_sync(0xffffffffu, w.m2, lane_mask);
    return welford_merge(w, o);
}

/* Merges the values of all threads of the block (blockDim.x a multiple of
 * 32); every thread gets the result. */
__device__ welford block_welford(welford w) {
    __shared__ welford warps[32];
    for (int mask = 16; mask > 0; mask >>= 1) w = welford_shuffle(w, mask);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warps[warp] = w;
    __syncthreads();
    if (warp == 0) {
        w = lane < (int)(blockDim.x / 32) ? warps[lane] : welford{0.0f, 0.0f, 0.0f};
        for (int mask = 16; mask > 0; mask >>= 1) w = welford_shuffle(w, mask);
        if (lane == 0) warps[0] = w;
    }
    __syncthreads();
    w = warps[0];
    __syncthreads(); /* warps[] is free for the next call */
    return w;
}

/* ------------------------------------------------------------ group norm */

/* Values per block of group_stats, at least, and most blocks per group. */
#define GROUP_CHUNK 4096
#define GROUP_MAX_CHUNKS 1024

/* Element i of group blockIdx.y: at i in a contiguous group, or at pixel
 * i / run, channel i % run of the group's run in a channels-last image of
 * C channels (run = C / groups, `groups` per image). */
template <typename T>
__global__ void group_stats_kernel(const T *x, int64_t group_size, int64_t chunk,
                                   welford *partial, int64_t C, int64_t run, int groups) {
    const int64_t b = blockIdx.y / groups, gi = blockIdx.y % groups;
    const T *g = run ? x + b * group_size * groups + gi * run : x + blockIdx.y * group_size;
    int64_t start = blockIdx.x * chunk, end = start + chunk < group_size ? start + chunk : group_size;
    welford w = {0.0f, 0.0f, 0.0f};
    if (run) {
        for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x)
            welford_add(w, to_f32(g[i / run * C + i % run]));
    } else {
        for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) welford_add(w, to_f32(g[i]));
    }
    w = block_welford(w);
    if (threadIdx.x == 0) partial[(int64_t)blockIdx.y * gridDim.x + blockIdx.x] = w;
}

/* Chan's merge in double (the finalize step adds up to GROUP_MAX_CHUNKS
 * partial results, whose rounding errors float would accumulate). */
__device__ __forceinline__ void merge_double(double &n, double &mean, double &m2, double pn,
                                             double pmean, double pm2) {
    if (pn == 0.0) return;
    double total = n + pn, delta = pmean - mean;
    mean += delta * pn / total;
    m2 += pm2 + delta * delta * n * pn / total;
    n = total;
}

/* One warp per group: the lanes merge strided chunks (independent loads,
 * all in flight at once), then each other's results by shuffles. */
__global__ void group_finalize_kernel(const welford *partial, int chunks, float eps,
                                      float2 *stats) {
    const welford *p = partial + (int64_t)blockIdx.x * chunks;
    double n = 0, mean = 0, m2 = 0;
    for (int i = threadIdx.x; i < chunks; i += 32) merge_double(n, mean, m2, p[i].n, p[i].mean, p[i].m2);
    for (int mask = 16; mask > 0; mask >>= 1)
        merge_double(n, mean, m2, __shfl_xor_sync(0xffffffffu, n, mask),
                     __shfl_xor_sync(0xffffffffu, mean, mask), __shfl_xor_sync(0xffffffffu, m2, mask));
    if (threadIdx.x == 0) stats[blockIdx.x] = make_float2((float)mean, (float)(1.0 / sqrt(m2 / n + eps)));
}

template <typename T>
__global__ void group_apply_kernel(const T *x, T *y, const float2 *stats, const T *gamma,
                                   const T *beta, int64_t BC, int64_t C, int64_t S,
                                   int64_t per_group, int groups, activation act) {
    for (int64_t bc = blockIdx.y; bc < BC; bc += gridDim.y) {
        int64_t c = bc % C;
        float2 st = stats[bc / C * groups + c / per_group];
        float scale = st.y * to_f32(gamma[c]), shift = to_f32(beta[c]);
        const T *src = x + bc * S;
        T *dst = y + bc * S;
        FOR_EACH(i, S) dst[i] = from_f32<T>(activate_one((to_f32(src[i]) - st.x) * scale + shift, act));
    }
}

/* Eight neighbouring values as float: one 16-byte load or store for half
 * and bfloat16, two for float (the address is 16-byte aligned). */
template <typename T> struct vec8 {
    static __device__ __forceinline__ void load(const T *p, float v[8]) {
        uint4 u = *(const uint4 *)p;
        const T *h = (const T *)&u;
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = to_f32(h[i]);
    }
    static __device__ __forceinline__ void store(T *p, const float v[8]) {
        uint4 u;
        T *h = (T *)&u;
#pragma unroll
        for (int i = 0; i < 8; i++) h[i] = from_f32<T>(v[i]);
        *(uint4 *)p = u;
    }
};
template <> struct vec8<float> {
    static __device__ __forceinline__ void load(const float *p, float v[8]) {
        float4 a = *(const float4 *)p, b = *(const float4 *)(p + 4);
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    }
    static __device__ __forceinline__ void store(float *p, const float v[8]) {
        *(float4 *)p = make_float4(v[0], v[1], v[2], v[3]);
        *(float4 *)(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
    }
};

/* Rows of up to this many channels take the vectorised channels-last
 * path (each of CUDA_THREADS threads holds 8 channels of a pixel). */
#define CL_MAX_CHANNELS (8 * CUDA_THREADS)
#define CL_UNROLL 4 /* pixels a thread loads before it uses them */

/* grid (chunks, B): partial[(b * groups + g) * chunks + chunk] over the
 * pixels [chunk * ppc, + ppc) of image b (see the top comment). Thread t
 * holds channels 8 (t % (C / 8)) .. + 7 of every rows-th pixel; the eight
 * Welford accumulators share one count, so one division per pixel. */
template <typename T>
__global__ void __launch_bounds__(CUDA_THREADS)
group_stats_cl_kernel(const T *x, int64_t HW, int C, int64_t ppc, int groups, welford *partial) {
    __shared__ welford acc[CL_MAX_CHANNELS];
    const int per_row = C / 8, rows = CUDA_THREADS / per_row;
    const int c0 = threadIdx.x % per_row * 8, row = threadIdx.x / per_row;
    const int64_t p0 = blockIdx.x * ppc, p1 = p0 + ppc < HW ? p0 + ppc : HW;
    const T *image = x + blockIdx.y * HW * C;
    float n = 0.0f, mean[8] = {0}, m2[8] = {0};
    if (row < rows) {
        for (int64_t p = p0 + row; p < p1; p += (int64_t)rows * CL_UNROLL) {
            float v[CL_UNROLL][8];
#pragma unroll
            for (int u = 0; u < CL_UNROLL; u++)
                if (p + u * rows < p1) vec8<T>::load(image + (p + u * rows) * C + c0, v[u]);
#pragma unroll
            for (int u = 0; u < CL_UNROLL; u++) {
                if (p + u * rows >= p1) break;
                n += 1.0f;
                const float inv = 1.0f / n;
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    float d = v[u][i] - mean[i];
                    mean[i] += d * inv;
                    m2[i] += d * (v[u][i] - mean[i]);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < 8; i++) acc[row * C + c0 + i] = welford{n, mean[i], m2[i]};
    }
    __syncthreads();
    const int per_group = C / groups;
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        welford m = {0.0f, 0.0f, 0.0f};
        for (int r = 0; r < rows; r++)
            for (int c = g * per_group; c < (g + 1) * per_group; c++) m = welford_merge(m, acc[r * C + c]);
        partial[((int64_t)blockIdx.y * groups + g) * gridDim.x + blockIdx.x] = m;
    }
}

/* channels-last: y[b][p][c] over the tensor in memory order, eight
 * neighbouring channels a thread (C % 8 == 0) */
template <typename T>
__global__ void group_apply_cl_kernel(const T *x, T *y, const float2 *stats, const T *gamma,
                                      const T *beta, int64_t n8, int C, int64_t image,
                                      int per_group, int groups, activation act) {
    FOR_EACH(i, n8) {
        const int64_t at = i * 8;
        const int c0 = (int)(at % C);
        const float2 *st = stats + at / image * groups;
        float v[8];
        vec8<T>::load(x + at, v);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float2 m = st[(c0 + j) / per_group];
            v[j] = activate_one((v[j] - m.x) * m.y * to_f32(gamma[c0 + j]) + to_f32(beta[c0 + j]),
                                act);
        }
        vec8<T>::store(y + at, v);
    }
}

/* Groups of at most this many values (the UNet's 16x16 and 32x32 levels)
 * are normalised by one block each, in one kernel: statistics, then the
 * same values again (from L2) normalised; three kernels cost more than
 * their work there. */
#define GROUP_FUSED_MAX 65536

/* grid B * groups, channels-last, C / groups % 8 == 0 */
template <typename T>
__global__ void __launch_bounds__(CUDA_THREADS)
group_norm_fused_kernel(const T *x, T *y, const T *gamma, const T *beta, int64_t S, int C,
                        int groups, float eps, activation act) {
    const int per_group = C / groups, units_per_pixel = per_group / 8;
    const int64_t units = S * units_per_pixel;
    const int b = blockIdx.x / groups, g = blockIdx.x % groups;
    const T *src = x + (int64_t)b * S * C + g * per_group;
    T *dst = y + (int64_t)b * S * C + g * per_group;
    float n = 0.0f, mean[8] = {0}, m2[8] = {0};
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
        float v[8];
        vec8<T>::load(src + u / units_per_pixel * C + u % units_per_pixel * 8, v);
        n += 1.0f;
        const float inv = 1.0f / n;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float d = v[i] - mean[i];
            mean[i] += d * inv;
            m2[i] += d * (v[i] - mean[i]);
        }
    }
    welford w = {0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < 8; i++) w = welford_merge(w, welford{n, mean[i], m2[i]});
    w = block_welford(w);
    const float rstd = rsqrtf(w.m2 / w.n + eps);
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
        const int64_t at = u / units_per_pixel * C + u % units_per_pixel * 8;
        const int c0 = g * per_group + (int)(u % units_per_pixel) * 8;
        float v[8];
        vec8<T>::load(src + at, v);
#pragma unroll
        for (int i = 0; i < 8; i++)
            v[i] = activate_one((v[i] - w.mean) * rstd * to_f32(gamma[c0 + i]) + to_f32(beta[c0 + i]),
                                act);
        vec8<T>::store(dst + at, v);
    }
}

/* channels-last rows the vectorised path does not take (C % 8 != 0 or
 * C > CL_MAX_CHANNELS): one value a thread */
template <typename T>
__global__ void group_apply_cl_scalar(const T *x, T *y, const float2 *stats, const T *gamma,
                                      const T *beta, int64_t n, int64_t C, int64_t image,
                                      int64_t per_group, int groups, activation act) {
    FOR_EACH(i, n) {
        int64_t c = i % C;
        float2 st = stats[i / image * groups + c / per_group];
        y[i] = from_f32<T>(
            activate_one((to_f32(x[i]) - st.x) * st.y * to_f32(gamma[c]) + to_f32(beta[c]), act));
    }
}

template <typename T>
static int launch_group_norm(cuda_backend *cb, const tensor *x, tensor *y, const void *gamma,
                             const void *beta, int groups, float eps, activation act) {
    int64_t B = x->shape[0], C = x->shape[1], S = tensor_numel(x) / (B * C);
    int64_t group_size = C / groups * S, ngroups = B * groups;
    /* channels-last rows of a multiple of 8 channels: the vectorised path */
    const bool channels_last = x->ndim == 4,
               rows = channels_last && C % 8 == 0 && C <= CL_MAX_CHANNELS;
    int64_t chunk = (group_size + GROUP_MAX_CHUNKS - 1) / GROUP_MAX_CHUNKS;
    if (chunk < GROUP_CHUNK) chunk = GROUP_CHUNK;
    int chunks = (int)((group_size + chunk - 1) / chunk);
    if (rows) { /* chunks of at least 16 pixels: about two blocks per SM */
        int64_t want = (264 + B - 1) / B;
        if (want > S / 16) want = S / 16;
        if (want < 1) want = 1;
        chunk = (S + want - 1) / want;
        chunks = (int)((S + chunk - 1) / chunk);
    }
    if (channels_last && (C / groups) % 8 == 0 && group_size <= GROUP_FUSED_MAX) {
        group_norm_fused_kernel<<<(unsigned)ngroups, CUDA_THREADS, 0, cb->stream>>>(
            (const T *)x->data, (T *)y->data, (const T *)gamma, (const T *)beta, S, (int)C, groups,
            eps, act);
        return cuda_launched("group_norm");
    }
    cuda_buf partial, stats;
    if (cuda_buf_alloc(cb, &partial, (size_t)(ngroups * chunks) * sizeof(welford))) return -1;
    if (cuda_buf_alloc(cb, &stats, (size_t)ngroups * sizeof(float2))) {
        cuda_buf_free(cb, &partial);
        return -1;
    }
    if (rows)
        group_stats_cl_kernel<<<dim3(chunks, (unsigned)B), CUDA_THREADS, 0, cb->stream>>>(
            (const T *)x->data, S, (int)C, chunk, groups, (welford *)partial.ptr);
    else
        group_stats_kernel<<<dim3(chunks, (unsigned)ngroups), CUDA_THREADS, 0, cb->stream>>>(
            (const T *)x->data, group_size, chunk, (welford *)partial.ptr, C,
            channels_last ? C / groups : 0, groups);
    int rc = cuda_launched("group_norm");
    if (!rc) {
        group_finalize_kernel<<<(unsigned)ngroups, 32, 0, cb->stream>>>(
            (const welford *)partial.ptr, chunks, eps, (float2 *)stats.ptr);
        rc = cuda_launched("group_norm");
    }
    if (!rc && rows) {
        int64_t n8 = B * C * S / 8;
        group_apply_cl_kernel<<<cuda_blocks(n8), CUDA_THREADS, 0, cb->stream>>>(
            (const T *)x->data, (T *)y->data, (const float2 *)stats.ptr, (const T *)gamma,
            (const T *)beta, n8, (int)C, C * S, (int)(C / groups), groups, act);
        rc = cuda_launched("group_norm");
    } else if (!rc && channels_last) {
        group_apply_cl_scalar<<<cuda_blocks(B * C * S), CUDA_THREADS, 0, cb->stream>>>(
            (const T *)x->data, (T *)y->data, (const float2 *)stats.ptr, (const T *)gamma,
            (const T *)beta, B * C * S, C, C * S, C / groups, groups, act);
        rc = cuda_launched("group_norm");
    } else if (!rc) {
        int64_t BC = B * C, x_blocks = (S + CUDA_THREADS - 1) / CUDA_THREADS;
        dim3 grid((unsigned)(x_blocks < 1024 ? x_blocks : 1024),
                  (unsigned)(BC < 65535 ? BC : 65535));
        group_apply_kernel<<<grid, CUDA_THREADS, 0, cb->stream>>>(
            (const T *)x->data, (T *)y->data, (const float2 *)stats.ptr, (const T *)gamma,
            (const T *)beta, BC, C, S, C / groups, groups, act);
        rc = cuda_launched("group_norm");
    }
    cuda_buf_free(cb, &partial);
    cuda_buf_free(cb, &stats);
    return rc;
}

static int launch_group_norm_as(cuda_backend *cb, const tensor *x, tensor *y, const void *gamma,
                                const void *beta, int groups, float eps, activation act) {
    int rc = -1;
    CUDA_DISPATCH(x->type, T, rc = launch_group_norm<T>(cb, x, y, gamma, beta, groups, eps, act));
    return rc;
}

static int check_gamma_beta(const cuda_backend *cb, const char *op, const tensor *gamma,
                            const tensor *beta, int64_t C) {
    if (cuda_check(cb, op, "gamma", gamma, 0) || cuda_check(cb, op, "beta", beta, 0)) return -1;
    return check_affine(op, gamma, beta, C);
}

tensor *cuda_group_norm(backend *be, const tensor *x, int groups, const tensor *gamma,
                        const tensor *beta, float eps, activation act) {
    cuda_lock lock(be, "group_norm");
    if (!lock) return NULL;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, "group_norm", "input", x, 0) || check_activation("group_norm", act))
        return NULL;
    if (check_group_norm(x, groups)) return NULL;
    int64_t B = x->shape[0], C = x->shape[1];
    if (B * groups > 65535) {
        set_error(SDX4_ERR_INVALID_ARGUMENT, "group_norm: %" PRId64 " groups are too many",
                  B * groups);
        return NULL;
    }
    if (check_gamma_beta(cb, "group_norm", gamma, beta, C)) return NULL;
    cuda_profile_label(cb->profile, " %s B%" PRId64 " C%" PRId64 " n%" PRId64, dtype_name(x->type),
                       B, C, tensor_numel(x) / (B * C));
    cuda_buf g_tmp = {NULL, 0}, b_tmp = {NULL, 0};
    const void *gd = NULL, *bd = NULL;
    tensor *y = NULL;
    if (!(gd = cuda_data_as(cb, gamma, x->type, &g_tmp)) ||
        !(bd = cuda_data_as(cb, beta, x->type, &b_tmp)) ||
        !(y = cuda_tensor_new(cb, x->ndim, x->shape, x->type)) ||
        launch_group_norm_as(cb, x, y, gd, bd, groups, eps, act)) {
        cuda_tensor_release(cb, y);
        y = NULL;
    }
    cuda_buf_free(cb, &g_tmp);
    cuda_buf_free(cb, &b_tmp);
    return y;
}

/* ------------------------------------------------------------ layer norm */

template <typename T>
__global__ void layer_norm_kernel(const T *x, T *y, const T *gamma, const T *beta, int64_t rows,
                                  int64_t D, float eps) {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *src = x + r * D;
        T *dst = y + r * D;
        welford w = {0.0f, 0.0f, 0.0f};
        for (int64_t i = threadIdx.x; i < D; i += blockDim.x) welford_add(w, to_f32(src[i]));
        w = block_welford(w);
        float rstd = 1.0f / sqrtf(w.m2 / w.n + eps);
        for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
            dst[i] = from_f32<T>((to_f32(src[i]) - w.mean) * rstd * to_f32(gamma[i]) +
                                 to_f32(beta[i]));
    }
}

tensor *cuda_layer_norm(backend *be, const tensor *x, const tensor *gamma, const tensor *beta,
                        float eps) {
    cuda_lock lock(be, "layer_norm");
    if (!lock) return NULL;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, "layer_norm", "input", x, 0) || cuda_refuse_image("layer_norm", x))
        return NULL;
    int64_t D = x->shape[x->ndim - 1], rows = tensor_numel(x) / D;
    if (check_gamma_beta(cb, "layer_norm", gamma, beta, D)) return NULL;
    cuda_buf g_tmp = {NULL, 0}, b_tmp = {NULL, 0};
    const void *gd = NULL, *bd = NULL;
    tensor *y = NULL;
    /* a warp per 32 values of the row, up to 8 warps */
    int threads = D >= 256 ? 256 : (int)((D + 31) / 32 * 32);
    unsigned blocks = (unsigned)(rows < INT_MAX ? rows : INT_MAX);
    if (!(gd = cuda_data_as(cb, gamma, x->type, &g_tmp)) ||
        !(bd = cuda_data_as(cb, beta, x->type, &b_tmp)) ||
        !(y = cuda_tensor_new(cb, x->ndim, x->shape, x->type))) {
        cuda_tensor_release(cb, y);
        y = NULL;
    } else {
        CUDA_DISPATCH(x->type, T,
                      layer_norm_kernel<<<blocks, threads, 0, cb->stream>>>(
                          (const T *)x->data, (T *)y->data, (const T *)gd,
                          (const T *)bd, rows, D, eps));
        if (cuda_launched("layer_norm")) {
            cuda_tensor_release(cb, y);
            y = NULL;
        }
    }
    cuda_buf_free(cb, &g_tmp);
    cuda_buf_free(cb, &b_tmp);
    return y;
}
