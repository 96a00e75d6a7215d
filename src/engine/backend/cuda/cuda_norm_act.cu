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
 * the runs of C/groups channels of every pixel. Where C is a multiple of
 * 8 (every image of the UNet and the VAE) two kernels do it, each thread
 * holding the same 8 channels of every rows-th pixel of its block's range
 * (so it reads gamma, beta and statistics once, and 16-byte vectors):
 *
 *   group_stats_cl  grid (chunks, B): per-thread shifted sums, per-group
 *                   Welford triples merged in shared memory; the block
 *                   that finishes an image last merges its chunks (so no
 *                   finalize kernel)
 *   group_apply_cl  the same layout: normalise, scale, shift, activate
 *
 * The second reads the tensor again, mostly from L2. Other tensors
 * ([B, C, ...], which keep each group contiguous, or odd channel counts)
 * take the three kernels above.
 *
 * LayerNorm rows are short (at most a few thousand values): one block per
 * row computes the statistics and writes the row.
 *
 * The activations are PyTorch's formulas, as the CPU backend's: silu
 * x * sigmoid(x) (with fast exp and division, see silu()), gelu
 * 0.5 x (1 + erf(x / sqrt 2)), quick_gelu x * sigmoid(1.702 x). Half tensors are computed in float and rounded
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

/* x * sigmoid(x) with the hardware's exp2 and reciprocal (a few
 * instructions where expf and an IEEE division take some thirty: the
 * group norms of the largest images spent as long on SiLU as on memory).
 * Relative error within about 1e-5 (the exponent's argument rounded at
 * |x| near 88); below x = -87 the divisor passes 2^126, where
 * __fdividef gives 0 for what is under 1e-36. */
__device__ __forceinline__ float silu(float x) { return __fdividef(x, 1.0f + __expf(-x)); }

__device__ __forceinline__ float activate_one(float x, activation act) {
    switch (act) {
    case ACT_SILU: return silu(x);
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
    if (cuda_check(cb, "activate", "input", x, 0) || sdx4_check_activation("activate", act)) return NULL;
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

/* in diffusers: hidden, gate = proj(x).chunk(2, dim=-1); hidden * gelu(gate) */
template <typename T>
__global__ void geglu_kernel(const T *x, T *y, int64_t n, int64_t N) {
    FOR_EACH(i, n) {
        const T *row = x + i / N * 2 * N;
        int64_t c = i % N;
        y[i] = from_f32<T>(to_f32(row[c]) * gelu(to_f32(row[N + c])));
    }
}

/* The same, 8 outputs a thread (N % 8 == 0): one index division per 8
 * values instead of two 64-bit divisions per value, and 16-byte loads. */
template <typename T>
__global__ void geglu8_kernel(const T *x, T *y, int64_t n8, int64_t N) {
    const int64_t units = N / 8;
    FOR_EACH(i, n8) {
        const int64_t r = i / units, c = i % units * 8;
        float h[8], g[8];
        vec8<T>::load(x + r * 2 * N + c, h);
        vec8<T>::load(x + r * 2 * N + N + c, g);
#pragma unroll
        for (int k = 0; k < 8; k++) h[k] *= gelu(g[k]);
        vec8<T>::store(y + r * N + c, h);
    }
}

tensor *cuda_geglu(backend *be, const tensor *x) {
    cuda_lock lock(be, "geglu");
    if (!lock) return NULL;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, "geglu", "input", x, 0) || cuda_refuse_image("geglu", x)) return NULL;
    if (sdx4_check_geglu(x)) return NULL;
    int64_t N = x->shape[x->ndim - 1] / 2;
    int64_t shape[4];
    memcpy(shape, x->shape, sizeof shape);
    shape[x->ndim - 1] = N;
    tensor *y = cuda_tensor_new(cb, x->ndim, shape, x->type);
    if (!y) return NULL;
    int64_t n = tensor_numel(y);
    if (N % 8 == 0)
        CUDA_DISPATCH(x->type, T,
                      geglu8_kernel<<<cuda_blocks(n / 8), CUDA_THREADS, 0, cb->stream>>>(
                          (const T *)x->data, (T *)y->data, n / 8, N));
    else
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
        sdx4_check_same_shape("add", a, b))
        return -1;
    cuda_buf b_tmp;
    const void *bd = cuda_data_as(cb, b, a->type, &b_tmp);
    if (!bd) return -1;
    int rc = cuda_add(cb, a->type, a->data, bd, tensor_numel(a), scale_b);
    cuda_buf_free(cb, &b_tmp);
    return rc;
}

int cuda_add(cuda_backend *cb, dtype type, void *a, const void *b, int64_t n, float scale) {
    CUDA_DISPATCH(type, T,
                  add_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cb->stream>>>(
                      (T *)a, (const T *)b, n, scale));
    return cuda_launched("add");
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
    if (sdx4_check_channel_bias(x, v)) return -1;
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

/* channels-last: the channel of element i is i % C */
template <typename T>
__global__ void prelu_kernel(T *x, const T *slopes, float slope, int64_t n, int64_t C) {
    FOR_EACH(i, n) {
        float v = to_f32(x[i]);
        if (v < 0.0f) x[i] = from_f32<T>(v * (slopes ? to_f32(slopes[i % C]) : slope));
    }
}

int cuda_prelu_inplace(backend *be, tensor *x, const tensor *slopes, float slope) {
    cuda_lock lock(be, "prelu");
    if (!lock) return -1;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, "prelu", "x", x, 4) || (slopes && cuda_check(cb, "prelu", "slopes", slopes, 1)) ||
        sdx4_check_prelu(x, slopes, slope))
        return -1;
    cuda_buf s_tmp;
    const void *sd = NULL;
    if (slopes && !(sd = cuda_data_as(cb, slopes, x->type, &s_tmp))) return -1;
    int64_t n = tensor_numel(x);
    CUDA_DISPATCH(x->type, T,
                  prelu_kernel<<<cuda_blocks(n), CUDA_THREADS, 0, cb->stream>>>(
                      (T *)x->data, (const T *)sd, slope, n, x->shape[1]));
    int rc = cuda_launched("prelu");
    if (slopes) cuda_buf_free(cb, &s_tmp);
    return rc;
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

/* A warp's merge of the `chunks` partial results at p (read from L2:
 * other blocks wrote them): mean and 1 / sqrt(var + eps) in lane 0. In
 * double, because up to GROUP_MAX_CHUNKS rounding errors would add up in
 * float, and as sums around one reference mean (the first chunk's), which
 * need no division per chunk, unlike Chan's pairwise merge (a chain of
 * double divisions that made the last block of group_stats_cl a tail of
 * several microseconds):
 *   S = sum n_i (mean_i - ref),  Q = sum m2_i + n_i (mean_i - ref)^2,
 *   mean = ref + S / N,  var = Q / N - (S / N)^2
 * with ref near the mean, so that the subtraction cancels little. */
__device__ float2 merge_chunks(const welford *p, int chunks, float eps) {
    const double ref = __ldcg(&p[0].mean);
    double n = 0, s = 0, q = 0;
    for (int i = threadIdx.x % 32; i < chunks; i += 32) {
        const double ni = __ldcg(&p[i].n), d = (double)__ldcg(&p[i].mean) - ref;
        n += ni, s += ni * d, q += __ldcg(&p[i].m2) + ni * d * d;
    }
    for (int mask = 16; mask > 0; mask >>= 1) {
        n += __shfl_xor_sync(0xffffffffu, n, mask);
        s += __shfl_xor_sync(0xffffffffu, s, mask);
        q += __shfl_xor_sync(0xffffffffu, q, mask);
    }
    const double shift = s / n, var = q / n - shift * shift;
    return make_float2((float)(ref + shift), (float)(1.0 / sqrt(fmax(var, 0.0) + eps)));
}

/* One warp per group (see merge_chunks). */
__global__ void group_finalize_kernel(const welford *partial, int chunks, float eps,
                                      float2 *stats) {
    float2 st = merge_chunks(partial + (int64_t)blockIdx.x * chunks, chunks, eps);
    if (threadIdx.x == 0) stats[blockIdx.x] = st;
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


/* The channels-last path (cl below) takes images whose C is a multiple
 * of 8 up to this, and whose groups are whole 8-channel units or halves
 * of one (C / groups a multiple of 8, or 4). */
#define CL_MAX_CHANNELS (8 * CUDA_THREADS)
#define CL_UNROLL 4 /* pixels a thread loads before it uses them */
#define CL_BLOCKS_PER_SM 3

/* Where a thread of a cl kernel works: the 8 channels from c0 (unit
 * c0 / 8 of the U = C / 8 of a pixel) of every rows-th pixel of its
 * block's range, from `row` on. Its channels never change, so gamma,
 * beta and the statistics it needs are read once, and no thread divides
 * an index per value. Threads with row == rows (when U does not divide
 * the block) sit idle. */
struct cl_thread {
    int U, rows, unit, row, c0;
    __device__ cl_thread(int C) {
        U = C / 8, rows = CUDA_THREADS / U, unit = threadIdx.x % U, row = threadIdx.x / U,
        c0 = unit * 8;
    }
};

/* grid (chunks, B): the statistics of pixels [chunk * ppc, + ppc) of image
 * b, per group, into partial[(b * groups + g) * chunks + chunk]. Each
 * thread sums its 8 channels shifted by their first value (exact enough
 * without Welford's division per value), turns them into Welford triples
 * per group, and the block merges those in shared memory. The block that
 * finishes image b last (counters[b] counts them, and is reset for the
 * next call) merges the chunks into stats[b * groups + g]: no third kernel. */
template <typename T>
__global__ void __launch_bounds__(CUDA_THREADS, CL_BLOCKS_PER_SM)
group_stats_cl_kernel(const T *x, const T *add, int64_t HW, int C, int64_t ppc, int groups,
                      float eps, welford *partial, unsigned *counters, float2 *stats) {
    __shared__ welford acc[2 * CUDA_THREADS];
    __shared__ bool last;
    const cl_thread th(C);
    const int per_group = C / groups, gpt = per_group < 8 ? 8 / per_group : 1;
    const int b = blockIdx.y;
    const int64_t p0 = blockIdx.x * ppc, p1 = p0 + ppc < HW ? p0 + ppc : HW;
    const T *image = x + b * HW * C + th.c0;
    float n = 0.0f, shift[8] = {0}, s[8] = {0}, ss[8] = {0};
    if (th.row < th.rows) {
        for (int64_t p = p0 + th.row; p < p1; p += (int64_t)th.rows * CL_UNROLL) {
            float v[CL_UNROLL][8];
#pragma unroll
            for (int u = 0; u < CL_UNROLL; u++)
                if (p + u * th.rows < p1) vec8<T>::load(image + (p + u * th.rows) * C, v[u]);
            if (p == p0 + th.row)
#pragma unroll
                for (int i = 0; i < 8; i++) shift[i] = v[0][i];
            /* a constant per channel moves only the mean: added to it below */
#pragma unroll
            for (int u = 0; u < CL_UNROLL; u++) {
                if (p + u * th.rows >= p1) break;
                n += 1.0f;
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    const float d = v[u][i] - shift[i];
                    s[i] += d, ss[i] += d * d;
                }
            }
        }
        welford lo = {0.0f, 0.0f, 0.0f}, hi = lo; /* hi: channels 4..7 of a second group */
        float plus[8] = {0}; /* loaded only now: live through the loop, it spilled */
        if (add) vec8<T>::load(add + b * C + th.c0, plus);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            welford c = {0.0f, 0.0f, 0.0f};
            if (n > 0.0f)
                c = {n, shift[i] + plus[i] + s[i] / n, fmaxf(ss[i] - s[i] * s[i] / n, 0.0f)};
            if (gpt == 2 && i >= 4) hi = welford_merge(hi, c);
            else lo = welford_merge(lo, c);
        }
        acc[threadIdx.x * gpt] = lo;
        if (gpt == 2) acc[threadIdx.x * 2 + 1] = hi;
    }
    __syncthreads();
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        const int first = g * per_group, u0 = first / 8, u1 = (first + per_group - 1) / 8;
        const int j = first % 8 / per_group; /* 0 unless a unit holds two groups */
        welford m = {0.0f, 0.0f, 0.0f};
        for (int r = 0; r < th.rows; r++)
            for (int u = u0; u <= u1; u++) m = welford_merge(m, acc[(r * th.U + u) * gpt + j]);
        partial[((int64_t)b * groups + g) * gridDim.x + blockIdx.x] = m;
    }
    __threadfence(); /* the partial results are visible before the count */
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&counters[b], 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    for (int g = threadIdx.x / 32; g < groups; g += blockDim.x / 32) {
        float2 st = merge_chunks(partial + ((int64_t)b * groups + g) * gridDim.x, gridDim.x, eps);
        if (threadIdx.x % 32 == 0) stats[b * groups + g] = st;
    }
    if (threadIdx.x == 0) counters[b] = 0;
}

/* grid (chunks, B): y = act((x - mean) * rstd * gamma + beta) over pixels
 * [chunk * ppc, + ppc) of image b, in the layout of group_stats_cl. */
template <typename T>
__global__ void __launch_bounds__(CUDA_THREADS, CL_BLOCKS_PER_SM)
group_apply_cl_kernel(const T *x, const T *add, T *y, const float2 *stats, const T *gamma,
                      const T *beta, int64_t HW, int C, int64_t ppc, int groups, activation act) {
    const cl_thread th(C);
    if (th.row >= th.rows) return;
    const int per_group = C / groups, b = blockIdx.y;
    float mean[8], scale[8], shift[8], plus[8] = {0};
    if (add) vec8<T>::load(add + b * C + th.c0, plus);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const float2 st = stats[b * groups + (th.c0 + i) / per_group];
        /* (x + plus - mean) as x - (mean - plus) */
        mean[i] = st.x - plus[i], scale[i] = st.y * to_f32(gamma[th.c0 + i]);
        shift[i] = to_f32(beta[th.c0 + i]);
    }
    const int64_t p0 = blockIdx.x * ppc, p1 = p0 + ppc < HW ? p0 + ppc : HW, at = b * HW * C + th.c0;
    for (int64_t p = p0 + th.row; p < p1; p += (int64_t)th.rows * CL_UNROLL) {
        float v[CL_UNROLL][8];
#pragma unroll
        for (int u = 0; u < CL_UNROLL; u++)
            if (p + u * th.rows < p1) vec8<T>::load(x + at + (p + u * th.rows) * C, v[u]);
#pragma unroll
        for (int u = 0; u < CL_UNROLL; u++) {
            if (p + u * th.rows >= p1) break;
#pragma unroll
            for (int i = 0; i < 8; i++)
                v[u][i] = activate_one((v[u][i] - mean[i]) * scale[i] + shift[i], act);
            vec8<T>::store(y + at + (p + u * th.rows) * C, v[u]);
        }
    }
}

/* channels-last images the cl path does not take: one value a thread */
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

/* Pixels per block of the cl kernels: a few blocks per SM over the whole
 * batch, each thread at least one unrolled round of pixels. */
static int64_t cl_pixels_per_block(const cuda_backend *cb, int64_t HW, int64_t B, int rows) {
    int64_t want = ((int64_t)cb->sms * CL_BLOCKS_PER_SM + B - 1) / B;
    int64_t ppc = (HW + want - 1) / want, least = (int64_t)rows * CL_UNROLL;
    if (ppc < least) ppc = least;
    if ((HW + ppc - 1) / ppc > GROUP_MAX_CHUNKS) ppc = (HW + GROUP_MAX_CHUNKS - 1) / GROUP_MAX_CHUNKS;
    return ppc;
}

/* The cl path: two kernels, statistics then normalisation. */
template <typename T>
static int group_norm_cl(cuda_backend *cb, const tensor *x, const void *add, tensor *y,
                         const void *gamma, const void *beta, int groups, float eps,
                         activation act) {
    int64_t B = x->shape[0], C = x->shape[1], HW = x->shape[2] * x->shape[3];
    int rows = (int)(CUDA_THREADS / (C / 8));
    int64_t ppc = cl_pixels_per_block(cb, HW, B, rows);
    unsigned chunks = (unsigned)((HW + ppc - 1) / ppc);
    cuda_buf partial, stats;
    if (cuda_buf_alloc(cb, &partial, (size_t)(B * groups * chunks) * sizeof(welford))) return -1;
    if (cuda_buf_alloc(cb, &stats, (size_t)(B * groups) * sizeof(float2))) {
        cuda_buf_free(cb, &partial);
        return -1;
    }
    group_stats_cl_kernel<<<dim3(chunks, (unsigned)B), CUDA_THREADS, 0, cb->stream>>>(
        (const T *)x->data, (const T *)add, HW, (int)C, ppc, groups, eps, (welford *)partial.ptr,
        (unsigned *)cb->group_counters.ptr, (float2 *)stats.ptr);
    int rc = cuda_launched("group_norm");
    if (!rc) {
        group_apply_cl_kernel<<<dim3(chunks, (unsigned)B), CUDA_THREADS, 0, cb->stream>>>(
            (const T *)x->data, (const T *)add, (T *)y->data, (const float2 *)stats.ptr,
            (const T *)gamma, (const T *)beta, HW, (int)C, ppc, groups, act);
        rc = cuda_launched("group_norm");
    }
    cuda_buf_free(cb, &partial);
    cuda_buf_free(cb, &stats);
    return rc;
}

template <typename T>
static int launch_group_norm(cuda_backend *cb, const tensor *x, const void *add, tensor *y,
                             const void *gamma, const void *beta, int groups, float eps,
                             activation act) {
    int64_t B = x->shape[0], C = x->shape[1], S = tensor_numel(x) / (B * C);
    int64_t group_size = C / groups * S, ngroups = B * groups, per_group = C / groups;
    const bool channels_last = x->ndim == 4;
    if (channels_last && C % 8 == 0 && C <= CL_MAX_CHANNELS &&
        (per_group % 8 == 0 || per_group == 4) && B <= CUDA_GROUP_COUNTERS)
        return group_norm_cl<T>(cb, x, add, y, gamma, beta, groups, eps, act);
    if (add) { /* y = x + add, then normalised in place */
        if (cuda_ok(cudaMemcpyAsync(y->data, x->data, (size_t)tensor_numel(x) * sizeof(T),
                                    cudaMemcpyDeviceToDevice, cb->stream),
                    "group_norm: copy"))
            return -1;
        channel_bias_kernel<<<cuda_blocks(B * C * S), CUDA_THREADS, 0, cb->stream>>>(
            (T *)y->data, (const T *)add, B * C * S, C, C * S);
        if (cuda_launched("group_norm")) return -1;
        x = y;
    }
    int64_t chunk = (group_size + GROUP_MAX_CHUNKS - 1) / GROUP_MAX_CHUNKS;
    if (chunk < GROUP_CHUNK) chunk = GROUP_CHUNK;
    int chunks = (int)((group_size + chunk - 1) / chunk);
    cuda_buf partial, stats;
    if (cuda_buf_alloc(cb, &partial, (size_t)(ngroups * chunks) * sizeof(welford))) return -1;
    if (cuda_buf_alloc(cb, &stats, (size_t)ngroups * sizeof(float2))) {
        cuda_buf_free(cb, &partial);
        return -1;
    }
    group_stats_kernel<<<dim3(chunks, (unsigned)ngroups), CUDA_THREADS, 0, cb->stream>>>(
        (const T *)x->data, group_size, chunk, (welford *)partial.ptr, C,
        channels_last ? per_group : 0, groups);
    int rc = cuda_launched("group_norm");
    if (!rc) {
        group_finalize_kernel<<<(unsigned)ngroups, 32, 0, cb->stream>>>(
            (const welford *)partial.ptr, chunks, eps, (float2 *)stats.ptr);
        rc = cuda_launched("group_norm");
    }
    if (!rc && channels_last) {
        group_apply_cl_scalar<<<cuda_blocks(B * C * S), CUDA_THREADS, 0, cb->stream>>>(
            (const T *)x->data, (T *)y->data, (const float2 *)stats.ptr, (const T *)gamma,
            (const T *)beta, B * C * S, C, C * S, per_group, groups, act);
        rc = cuda_launched("group_norm");
    } else if (!rc) {
        int64_t BC = B * C, x_blocks = (S + CUDA_THREADS - 1) / CUDA_THREADS;
        dim3 grid((unsigned)(x_blocks < 1024 ? x_blocks : 1024),
                  (unsigned)(BC < 65535 ? BC : 65535));
        group_apply_kernel<<<grid, CUDA_THREADS, 0, cb->stream>>>(
            (const T *)x->data, (T *)y->data, (const float2 *)stats.ptr, (const T *)gamma,
            (const T *)beta, BC, C, S, per_group, groups, act);
        rc = cuda_launched("group_norm");
    }
    cuda_buf_free(cb, &partial);
    cuda_buf_free(cb, &stats);
    return rc;
}

static int launch_group_norm_as(cuda_backend *cb, const tensor *x, const void *add, tensor *y,
                                const void *gamma, const void *beta, int groups, float eps,
                                activation act) {
    int rc = -1;
    CUDA_DISPATCH(x->type, T,
                  rc = launch_group_norm<T>(cb, x, add, y, gamma, beta, groups, eps, act));
    return rc;
}

static int check_gamma_beta(const cuda_backend *cb, const char *op, const tensor *gamma,
                            const tensor *beta, int64_t C) {
    if (cuda_check(cb, op, "gamma", gamma, 0) || cuda_check(cb, op, "beta", beta, 0)) return -1;
    return sdx4_check_affine(op, gamma, beta, C);
}

/* group_norm, and group_norm_add with v (else NULL) */
static tensor *group_norm_plus(backend *be, const char *op, const tensor *x, const tensor *v,
                               int groups, const tensor *gamma, const tensor *beta, float eps,
                               activation act) {
    cuda_lock lock(be, op);
    if (!lock) return NULL;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, op, "input", x, v ? 4 : 0) || sdx4_check_activation(op, act)) return NULL;
    if (sdx4_check_group_norm(x, groups)) return NULL;
    if (v && (cuda_check(cb, op, "v", v, 2) || sdx4_check_channel_bias(x, v))) return NULL;
    int64_t B = x->shape[0], C = x->shape[1];
    if (B * groups > 65535) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "%s: %" PRId64 " groups are too many", op,
                  B * groups);
        return NULL;
    }
    if (check_gamma_beta(cb, op, gamma, beta, C)) return NULL;
    cuda_profile_label(cb->profile, " %s B%" PRId64 " C%" PRId64 " n%" PRId64, dtype_name(x->type),
                       B, C, tensor_numel(x) / (B * C));
    cuda_buf g_tmp = {}, b_tmp = {}, v_tmp = {};
    const void *gd = NULL, *bd = NULL, *vd = NULL;
    tensor *y = NULL;
    if (!(gd = cuda_data_as(cb, gamma, x->type, &g_tmp)) ||
        !(bd = cuda_data_as(cb, beta, x->type, &b_tmp)) ||
        (v && !(vd = cuda_data_as(cb, v, x->type, &v_tmp))) ||
        !(y = cuda_tensor_new(cb, x->ndim, x->shape, x->type)) ||
        launch_group_norm_as(cb, x, vd, y, gd, bd, groups, eps, act)) {
        cuda_tensor_release(cb, y);
        y = NULL;
    }
    cuda_buf_free(cb, &g_tmp);
    cuda_buf_free(cb, &b_tmp);
    cuda_buf_free(cb, &v_tmp);
    return y;
}

tensor *cuda_group_norm(backend *be, const tensor *x, int groups, const tensor *gamma,
                        const tensor *beta, float eps, activation act) {
    return group_norm_plus(be, "group_norm", x, NULL, groups, gamma, beta, eps, act);
}

tensor *cuda_group_norm_add(backend *be, const tensor *x, const tensor *v, int groups,
                            const tensor *gamma, const tensor *beta, float eps, activation act) {
    return group_norm_plus(be, "group_norm_add", x, v, groups, gamma, beta, eps, act);
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

/* Rows of up to LN_WARP_MAX values, a multiple of 8 (the UNet's 512 and
 * 1024, CLIP's 1024): one warp per row, each lane NV 16-byte vectors of it
 * in registers, so the row is read once and the variance taken exactly
 * in two passes over registers; no block-wide synchronisation. */
#define LN_WARP_MAX 1024

__device__ __forceinline__ float warp_sum(float v) {
    for (int mask = 16; mask > 0; mask >>= 1) v += __shfl_xor_sync(0xffffffffu, v, mask);
    return v;
}

template <typename T, int NV>
__global__ void __launch_bounds__(CUDA_THREADS)
layer_norm_warp_kernel(const T *x, T *y, const T *gamma, const T *beta, int64_t rows, int D,
                       float eps) {
    const int lane = threadIdx.x % 32;
    const int64_t r = (int64_t)blockIdx.x * (CUDA_THREADS / 32) + threadIdx.x / 32;
    if (r >= rows) return;
    const T *src = x + r * D;
    T *dst = y + r * D;
    float v[NV][8], sum = 0.0f;
#pragma unroll
    for (int k = 0; k < NV; k++) {
        const int c = (k * 32 + lane) * 8;
#pragma unroll
        for (int i = 0; i < 8; i++) v[k][i] = 0.0f;
        if (c < D) vec8<T>::load(src + c, v[k]);
#pragma unroll
        for (int i = 0; i < 8; i++) sum += v[k][i];
    }
    const float mean = warp_sum(sum) / (float)D;
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < NV; k++)
        if ((k * 32 + lane) * 8 < D)
#pragma unroll
            for (int i = 0; i < 8; i++) ss += (v[k][i] - mean) * (v[k][i] - mean);
    const float rstd = 1.0f / sqrtf(warp_sum(ss) / (float)D + eps);
#pragma unroll
    for (int k = 0; k < NV; k++) {
        const int c = (k * 32 + lane) * 8;
        if (c >= D) continue;
        float g[8], b[8];
        vec8<T>::load(gamma + c, g);
        vec8<T>::load(beta + c, b);
#pragma unroll
        for (int i = 0; i < 8; i++) v[k][i] = (v[k][i] - mean) * rstd * g[i] + b[i];
        vec8<T>::store(dst + c, v[k]);
    }
}

template <typename T>
static void launch_layer_norm_warp(cuda_backend *cb, const T *x, T *y, const T *gamma,
                                   const T *beta, int64_t rows, int D, float eps) {
    const unsigned blocks = (unsigned)((rows + CUDA_THREADS / 32 - 1) / (CUDA_THREADS / 32));
    switch ((D + 255) / 256) {
    case 1: layer_norm_warp_kernel<T, 1><<<blocks, CUDA_THREADS, 0, cb->stream>>>(x, y, gamma, beta, rows, D, eps); break;
    case 2: layer_norm_warp_kernel<T, 2><<<blocks, CUDA_THREADS, 0, cb->stream>>>(x, y, gamma, beta, rows, D, eps); break;
    case 3: layer_norm_warp_kernel<T, 3><<<blocks, CUDA_THREADS, 0, cb->stream>>>(x, y, gamma, beta, rows, D, eps); break;
    default: layer_norm_warp_kernel<T, 4><<<blocks, CUDA_THREADS, 0, cb->stream>>>(x, y, gamma, beta, rows, D, eps); break;
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
    cuda_buf g_tmp = {}, b_tmp = {};
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
        bool warp = D % 8 == 0 && D <= LN_WARP_MAX && rows <= (int64_t)INT_MAX * 8;
        if (warp)
            CUDA_DISPATCH(x->type, T,
                          launch_layer_norm_warp<T>(cb, (const T *)x->data, (T *)y->data,
                                                    (const T *)gd, (const T *)bd, rows, (int)D,
                                                    eps));
        else
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
