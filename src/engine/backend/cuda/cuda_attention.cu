/*
 * cuda_attention.cu - scaled dot-product attention, softmax(q k^T / sqrt(D)) v,
 * in one pass over the keys with an online softmax (as FlashAttention):
 * no [Tq, Tk] score matrix exists anywhere, so the VAE's attention over
 * 16384 (or 65536) positions needs no more memory than its output.
 *
 * q, k, v stay in their [B, T, H*D] token layout; head h of batch b is the
 * strided matrix that starts at column h*D. A block of 4 warps takes ROWS
 * queries per warp of one (batch, head), holds them in shared memory, and
 * walks the keys in tiles of BK that it stages in shared memory (in float,
 * each key row padded by the 32/BK lanes that score it, so that the 32
 * lanes of a warp read 32 different banks). For each tile and query row, each warp:
 *
 *   scores   lane group j (32/BK lanes) dots the query with key j, each
 *            lane a strided part of D, then adds the parts by shuffles
 *   softmax  m' = max(m, max_j s_j); p_j = exp(s_j - m');
 *            l = l * exp(m - m') + sum_j p_j
 *   output   acc = acc * exp(m - m') + sum_j p_j v_j, each lane holding
 *            the dimensions lane, lane + 32, ... of its row
 *
 * and at the end writes acc / l. Everything is accumulated in float,
 * whatever the tensors' type. D is a run-time value up to DMAX, the
 * kernel's compile-time capacity (64, 128, 256 or 512; the tiles shrink as
 * D grows so that shared memory stays under 66 KB). With `causal`, query i
 * sees keys j <= i (PyTorch's is_causal, aligned at the top-left) and a
 * block stops at the last key its last query can see.
 *
 * This is the plain version (CUDA cores, no tensor cores): the fast path
 * is a later step.
 */
#include <inttypes.h>
#include <limits.h>
#include <math.h>

#include "backend/cuda/cuda_internal.h"

#define ATTN_WARPS 4
#define FULL_MASK 0xffffffffu

template <typename T, int DMAX, int BK, int ROWS>
__global__ void __launch_bounds__(ATTN_WARPS * 32)
flash_attention_kernel(const T *q, const T *k, const T *v, T *o, int Tq, int Tk, int heads, int D,
                       float scale, int causal) {
    constexpr int G = 32 / BK;       /* lanes per key when scoring */
    constexpr int DPL = DMAX / 32;   /* output dimensions per lane */
    constexpr int QROWS = ATTN_WARPS * ROWS;
    constexpr int LD = DMAX + G;     /* padded key row: see the top comment */
    extern __shared__ float smem[];
    float *q_s = smem;               /* [QROWS][DMAX] */
    float *k_s = q_s + QROWS * DMAX; /* [BK][LD] */
    float *v_s = k_s + BK * LD;      /* [BK][LD] */

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int q0 = blockIdx.x * QROWS;
    const int64_t ld = (int64_t)heads * D;
    const T *qb = q + (int64_t)b * Tq * ld + (int64_t)h * D;
    const T *kb = k + (int64_t)b * Tk * ld + (int64_t)h * D;
    const T *vb = v + (int64_t)b * Tk * ld + (int64_t)h * D;
    T *ob = o + (int64_t)b * Tq * ld + (int64_t)h * D;

    for (int i = threadIdx.x; i < QROWS * DMAX; i += blockDim.x) {
        int r = i / DMAX, d = i % DMAX;
        q_s[i] = q0 + r < Tq && d < D ? to_f32(qb[(int64_t)(q0 + r) * ld + d]) : 0.0f;
    }
    float m[ROWS], l[ROWS], acc[ROWS][DPL];
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[r][i] = 0.0f;
    }

    const int kv_end = causal && q0 + QROWS < Tk ? q0 + QROWS : Tk;
    const int key_in_tile = lane / G, part = lane % G;
    for (int k0 = 0; k0 < kv_end; k0 += BK) {
        __syncthreads(); /* the previous tile is consumed (and q_s written) */
        for (int i = threadIdx.x; i < BK * DMAX; i += blockDim.x) {
            int j = i / DMAX, d = i % DMAX;
            bool in = k0 + j < Tk && d < D;
            int64_t at = (int64_t)(k0 + j) * ld + d;
            k_s[j * LD + d] = in ? to_f32(kb[at]) : 0.0f;
            v_s[j * LD + d] = in ? to_f32(vb[at]) : 0.0f;
        }
        __syncthreads();
        const int key = k0 + key_in_tile;
        const float *kr = k_s + key_in_tile * LD;
#pragma unroll
        for (int r = 0; r < ROWS; r++) {
            const int row = q0 + warp * ROWS + r;
            const float *qr = q_s + (warp * ROWS + r) * DMAX;
            float s = 0.0f;
            for (int d = part; d < D; d += G) s += qr[d] * kr[d];
#pragma unroll
            for (int mask = G / 2; mask > 0; mask >>= 1) s += __shfl_xor_sync(FULL_MASK, s, mask);
            const bool visible = key < Tk && (!causal || key <= row);
            s = visible ? s * scale : -INFINITY;
            float tile_max = s;
#pragma unroll
            for (int mask = 16; mask > 0; mask >>= 1)
                tile_max = fmaxf(tile_max, __shfl_xor_sync(FULL_MASK, tile_max, mask));
            /* key 0 is in the first tile and visible to every row, so m is
             * finite from then on; before, m = -inf and alpha must be 0 */
            const float m_new = fmaxf(m[r], tile_max);
            const float p = visible ? expf(s - m_new) : 0.0f;
            const float alpha = m[r] == -INFINITY ? 0.0f : expf(m[r] - m_new);
            float p_sum = part == 0 ? p : 0.0f; /* one lane per key */
#pragma unroll
            for (int mask = 16; mask > 0; mask >>= 1) p_sum += __shfl_xor_sync(FULL_MASK, p_sum, mask);
            l[r] = l[r] * alpha + p_sum;
            m[r] = m_new;
#pragma unroll
            for (int i = 0; i < DPL; i++) acc[r][i] *= alpha;
#pragma unroll
            for (int j = 0; j < BK; j++) {
                const float pj = __shfl_sync(FULL_MASK, p, j * G);
                const float *vr = v_s + j * LD + lane;
#pragma unroll
                for (int i = 0; i < DPL; i++) acc[r][i] += pj * vr[32 * i];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
        const int row = q0 + warp * ROWS + r;
        if (row >= Tq) continue;
        const float inv = 1.0f / l[r];
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            if (d < D) ob[(int64_t)row * ld + d] = from_f32<T>(acc[r][i] * inv);
        }
    }
}

template <typename T, int DMAX, int BK, int ROWS>
static int launch_attention(cuda_backend *cb, const void *q, const void *k, const void *v,
                            void *o, int B, int Tq, int Tk, int heads, int D, int causal) {
    constexpr int QROWS = ATTN_WARPS * ROWS;
    const int smem = (QROWS * DMAX + 2 * BK * (DMAX + 32 / BK)) * (int)sizeof(float);
    auto kernel = flash_attention_kernel<T, DMAX, BK, ROWS>;
    /* above 48 KB a kernel must ask for its shared memory */
    if (cuda_ok(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
                "attention: shared memory"))
        return -1;
    dim3 grid((unsigned)((Tq + QROWS - 1) / QROWS), (unsigned)(B * heads));
    kernel<<<grid, ATTN_WARPS * 32, smem, cb->stream>>>(
        (const T *)q, (const T *)k, (const T *)v, (T *)o, Tq, Tk, heads, D,
        (float)(1.0 / sqrt((double)D)), causal);
    return cuda_launched("attention");
}

/* The kernel whose capacity fits D, in the tensors' type. */
template <typename T>
static int attend(cuda_backend *cb, const void *q, const void *k, const void *v, void *o, int B,
                  int Tq, int Tk, int heads, int D, int causal) {
    if (D <= 64) return launch_attention<T, 64, 32, 4>(cb, q, k, v, o, B, Tq, Tk, heads, D, causal);
    if (D <= 128) return launch_attention<T, 128, 32, 4>(cb, q, k, v, o, B, Tq, Tk, heads, D, causal);
    if (D <= 256) return launch_attention<T, 256, 16, 4>(cb, q, k, v, o, B, Tq, Tk, heads, D, causal);
    return launch_attention<T, 512, 8, 4>(cb, q, k, v, o, B, Tq, Tk, heads, D, causal);
}

#define MAX_HEAD_DIM 512

tensor *cuda_attention(backend *be, const tensor *q, const tensor *k, const tensor *v, int heads,
                       int causal) {
    cuda_lock lock(be, "attention");
    if (!lock) return NULL;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, "attention", "q", q, 3) || cuda_check(cb, "attention", "k", k, 3) ||
        cuda_check(cb, "attention", "v", v, 3))
        return NULL;
    if (check_attention(q, k, v, heads)) return NULL;
    int64_t B = q->shape[0], Tq = q->shape[1], Tk = k->shape[1], D = q->shape[2] / heads;
    cuda_profile_label(cb->profile, " %s B%" PRId64 " H%d Tq%" PRId64 " Tk%" PRId64 " D%" PRId64,
                       dtype_name(q->type), B, heads, Tq, Tk, D);
    if (D > MAX_HEAD_DIM) {
        set_error(SDX4_ERR_INVALID_ARGUMENT,
                  "attention: head dimension %" PRId64 " (at most %d on cuda)", D, MAX_HEAD_DIM);
        return NULL;
    }
    if (Tq > INT_MAX - 64 || Tk > INT_MAX - 64 || B * heads > 65535) {
        char qs[SHAPE_STR_SIZE];
        set_error(SDX4_ERR_INVALID_ARGUMENT, "attention: q %s with %d heads is too large",
                  shape_str(q, qs, sizeof qs), heads);
        return NULL;
    }
    cuda_buf k_tmp = {NULL, 0}, v_tmp = {NULL, 0};
    const void *kd = NULL, *vd = NULL;
    tensor *out = NULL;
    if (!(kd = cuda_data_as(cb, k, q->type, &k_tmp)) ||
        !(vd = cuda_data_as(cb, v, q->type, &v_tmp)) ||
        !(out = cuda_tensor_new(cb, 3, q->shape, q->type)) ||
        (q->type == DTYPE_F16
             ? attend<__half>(cb, q->data, kd, vd, out->data, (int)B, (int)Tq, (int)Tk, heads,
                              (int)D, causal)
             : attend<float>(cb, q->data, kd, vd, out->data, (int)B, (int)Tq, (int)Tk, heads,
                             (int)D, causal))) {
        cuda_tensor_release(cb, out);
        out = NULL;
    }
    cuda_buf_free(cb, &k_tmp);
    cuda_buf_free(cb, &v_tmp);
    return out;
}
