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
 * That kernel is the exact one (float everywhere): fp32 mode runs it, and
 * so do head sizes the tensor-core kernel below has no variant for.
 *
 * The tensor-core kernel (FlashAttention-2's scheme with mma.sync
 * m16n8k16, half inputs, float accumulation) serves the rest: half
 * tensors, and float tensors in fp16 mode (the VAE's 16384-token
 * attention), which it rounds to half first, saturating at +-65504 so
 * that nothing becomes inf. Each warp owns 16 query rows; a block of WR
 * row groups walks the keys in tiles of BK held in shared memory, K and V
 * as [key][d] rows padded by 8 halves (so that the 8 rows a fragment load
 * touches fall in distinct banks); q and k fragments are 32-bit loads of
 * two neighbours, v fragments come transposed from ldmatrix.trans. Per
 * tile a warp computes its 16 x BK scores in
 * registers, runs the online softmax on them, and reuses them as the A
 * operand of P V without leaving registers (the accumulator layout of one
 * mma is the operand layout of the next). Large heads (D 256, 512) would
 * need too many registers for a 16 x D output per warp, so WD warps share
 * a row group: each multiplies a D/WD slice of q and k, the partial scores
 * are added through shared memory, and each keeps a D/WD slice of the
 * output.
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

/* -------------------------------------------------- tensor-core kernel */

/* d += a b for one m16n8k16 tile: a 16x16 (row), b 16x8 (col), half in,
 * float accumulators (PTX ISA, "mma.m16n8k16" fragment layouts). */
__device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], uint32_t b0,
                                          uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *(uint32_t *)&h;
}

__device__ __forceinline__ uint32_t ld32(const __half *p) { return *(const uint32_t *)p; }

/* Four 8x8 half matrices from shared memory, transposed: lane l gives the
 * address of row l % 8 of matrix l / 8 and gets, of each matrix M,
 * {M[2t][g], M[2t+1][g]} (t = l % 4, g = l / 4), which is an mma B
 * fragment when M's rows run along k. */
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const __half *p) {
    unsigned addr = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

/* Copies rows [r0, r0 + rows) of a head (row stride ld) into shared
 * memory with row stride LD, 8 halves at a time; zero past `valid`. */
template <int D, int LD>
__device__ __forceinline__ void load_rows(__half *dst, const __half *src, int64_t ld, int r0,
                                          int rows, int valid, int tid, int threads) {
    for (int i = tid; i < rows * (D / 8); i += threads) {
        int r = i / (D / 8), c = i % (D / 8) * 8;
        uint4 x = make_uint4(0, 0, 0, 0);
        if (r0 + r < valid) x = *(const uint4 *)(src + (int64_t)(r0 + r) * ld + c);
        *(uint4 *)(dst + r * LD + c) = x;
    }
}

template <int D, int WD, int WR, int BK>
__global__ void __launch_bounds__(32 * WD * WR)
mma_attention_kernel(const __half *q, const __half *k, const __half *v, __half *o, int Tq, int Tk,
                     int heads, float scale_log2, int causal) {
    constexpr int BQ = 16 * WR, DS = D / WD, THREADS = 32 * WD * WR;
    constexpr int LDK = D + 8;     /* padding: conflict-free fragment loads */
    constexpr int LDP = BK + 4;    /* likewise for the partial scores */
    constexpr int NT = BK / 8, ONT = DS / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __half *q_s = (__half *)smem_raw;      /* [BQ][LDK] */
    __half *k_s = q_s + BQ * LDK;          /* [BK][LDK] */
    __half *v_s = k_s + BK * LDK;          /* [BK][LDK] */
    float *part = (float *)(v_s + BK * LDK); /* [WR][WD][16][LDP] partial scores */

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, t = lane & 3; /* the fragment coordinates */
    const int wr = warp / WD, wd = warp % WD;
    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int q0 = blockIdx.x * BQ;
    const int64_t ld = (int64_t)heads * D;
    const __half *qb = q + (int64_t)b * Tq * ld + (int64_t)h * D;
    const __half *kb = k + (int64_t)b * Tk * ld + (int64_t)h * D;
    const __half *vb = v + (int64_t)b * Tk * ld + (int64_t)h * D;
    __half *ob = o + (int64_t)b * Tq * ld + (int64_t)h * D;

    load_rows<D, LDK>(q_s, qb, ld, q0, BQ, Tq, tid, THREADS);

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, acc[ONT][4];
#pragma unroll
    for (int n = 0; n < ONT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    const int row0 = q0 + 16 * wr + g; /* this thread's rows: row0, row0 + 8 */
    const int kv_end = causal && q0 + BQ < Tk ? q0 + BQ : Tk;

    for (int k0 = 0; k0 < kv_end; k0 += BK) {
        __syncthreads(); /* the previous tile is consumed */
        load_rows<D, LDK>(k_s, kb, ld, k0, BK, Tk, tid, THREADS);
        load_rows<D, LDK>(v_s, vb, ld, k0, BK, Tk, tid, THREADS);
        __syncthreads();

        /* scores of this warp's rows and its slice of D */
        float s[NT][4];
#pragma unroll
        for (int j = 0; j < NT; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < DS / 16; kk++) {
            const int d0 = wd * DS + 16 * kk;
            const __half *qr = q_s + (16 * wr + g) * LDK + d0 + 2 * t;
            const uint32_t a[4] = {ld32(qr), ld32(qr + 8 * LDK), ld32(qr + 8), ld32(qr + 8 * LDK + 8)};
#pragma unroll
            for (int j = 0; j < NT; j++) {
                const __half *kr = k_s + (8 * j + g) * LDK + d0 + 2 * t;
                mma_16816(s[j], a, ld32(kr), ld32(kr + 8));
            }
        }
        if (WD > 1) { /* add the slices' partial scores */
            float *mine = part + (wr * WD + wd) * 16 * LDP;
#pragma unroll
            for (int j = 0; j < NT; j++) {
                *(float2 *)&mine[g * LDP + 8 * j + 2 * t] = make_float2(s[j][0], s[j][1]);
                *(float2 *)&mine[(g + 8) * LDP + 8 * j + 2 * t] = make_float2(s[j][2], s[j][3]);
            }
            __syncthreads();
#pragma unroll
            for (int j = 0; j < NT; j++) {
                s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
                for (int w = 0; w < WD; w++) {
                    const float *p = part + (wr * WD + w) * 16 * LDP;
                    float2 lo = *(const float2 *)&p[g * LDP + 8 * j + 2 * t];
                    float2 hi = *(const float2 *)&p[(g + 8) * LDP + 8 * j + 2 * t];
                    s[j][0] += lo.x, s[j][1] += lo.y, s[j][2] += hi.x, s[j][3] += hi.y;
                }
            }
        }

        /* online softmax in base 2: p = 2^(s * scale * log2(e) - m) */
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < NT; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = k0 + 8 * j + 2 * t + (e & 1), row = row0 + (e >> 1) * 8;
                const bool visible = key < Tk && (!causal || key <= row);
                s[j][e] = visible ? s[j][e] * scale_log2 : -INFINITY;
                tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[j][e]);
            }
        }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(FULL_MASK, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(FULL_MASK, tile_max[r], 2));
            const float m_new = fmaxf(m[r], tile_max[r]);
            /* a row with nothing visible yet (padding rows) keeps m = -inf */
            alpha[r] = m_new == -INFINITY ? 1.0f : exp2f(m[r] - m_new);
            m[r] = m_new;
            l[r] *= alpha[r];
        }
#pragma unroll
        for (int j = 0; j < NT; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float mr = m[e >> 1];
                s[j][e] = mr == -INFINITY ? 0.0f : exp2f(s[j][e] - mr);
                l[e >> 1] += s[j][e];
            }
        }
#pragma unroll
        for (int n = 0; n < ONT; n++) {
            acc[n][0] *= alpha[0], acc[n][1] *= alpha[0];
            acc[n][2] *= alpha[1], acc[n][3] *= alpha[1];
        }

        /* acc += P V: the scores' accumulator layout is P's operand layout */
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            const uint32_t a[4] = {pack_half2(s[2 * kk][0], s[2 * kk][1]),
                                   pack_half2(s[2 * kk][2], s[2 * kk][3]),
                                   pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            /* lane: row 16kk + lane % 8 (+8 for matrices 1, 3), columns +8
             * for matrices 2, 3: two n-tiles of B per ldmatrix */
            const __half *vr = v_s + (16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8) * LDK +
                               wd * DS + (lane >> 4) * 8;
#pragma unroll
            for (int n = 0; n < ONT; n += 2) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, vr + 8 * n);
                mma_16816(acc[n], a, b[0], b[1]);
                mma_16816(acc[n + 1], a, b[2], b[3]);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(FULL_MASK, l[r], 1);
        l[r] += __shfl_xor_sync(FULL_MASK, l[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = row0 + 8 * r;
        if (row >= Tq) continue;
        const float inv = 1.0f / l[r];
#pragma unroll
        for (int n = 0; n < ONT; n++) {
            const int col = wd * DS + 8 * n + 2 * t;
            *(__half2 *)(ob + (int64_t)row * ld + col) =
                __floats2half2_rn(acc[n][2 * r] * inv, acc[n][2 * r + 1] * inv);
        }
    }
}

template <int D, int WD, int WR, int BK>
static int launch_mma_attention(cuda_backend *cb, const __half *q, const __half *k,
                                const __half *v, __half *o, int B, int Tq, int Tk, int heads,
                                int causal) {
    constexpr int BQ = 16 * WR;
    const int smem = (BQ + 2 * BK) * (D + 8) * 2 + (WD > 1 ? WR * WD * 16 * (BK + 4) * 4 : 0);
    auto kernel = mma_attention_kernel<D, WD, WR, BK>;
    if (cuda_ok(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
                "attention: shared memory"))
        return -1;
    dim3 grid((unsigned)((Tq + BQ - 1) / BQ), (unsigned)(B * heads));
    kernel<<<grid, 32 * WD * WR, smem, cb->stream>>>(q, k, v, o, Tq, Tk, heads,
                                                     (float)(M_LOG2E / sqrt((double)D)), causal);
    return cuda_launched("attention");
}

/* Whether the tensor-core kernel has a variant for head size D. */
static bool mma_head_size(int64_t D) { return D == 64 || D == 128 || D == 256 || D == 512; }

static int attend_mma(cuda_backend *cb, const __half *q, const __half *k, const __half *v,
                      __half *o, int B, int Tq, int Tk, int heads, int D, int causal) {
    switch (D) {
    case 64: return launch_mma_attention<64, 1, 4, 64>(cb, q, k, v, o, B, Tq, Tk, heads, causal);
    case 128: return launch_mma_attention<128, 1, 4, 64>(cb, q, k, v, o, B, Tq, Tk, heads, causal);
    case 256: return launch_mma_attention<256, 2, 2, 64>(cb, q, k, v, o, B, Tq, Tk, heads, causal);
    default: return launch_mma_attention<512, 4, 4, 32>(cb, q, k, v, o, B, Tq, Tk, heads, causal);
    }
}

/* to half, saturating at the largest finite half instead of inf */
template <typename T>
__global__ void to_half_saturated(const T *x, __half *y, int64_t n) {
    FOR_EACH(i, n) y[i] = __float2half_rn(fminf(fmaxf(to_f32(x[i]), -65504.0f), 65504.0f));
}

/* The tensor-core path for tensors of any type: float and bfloat16
 * operands are rounded to half (saturating) and the result converted
 * back. */
static int attention_on_tensor_cores(cuda_backend *cb, const tensor *q, const void *kd,
                                     const void *vd, tensor *out, int B, int Tq, int Tk,
                                     int heads, int D, int causal) {
    if (q->type == DTYPE_F16)
        return attend_mma(cb, (const __half *)q->data, (const __half *)kd, (const __half *)vd,
                          (__half *)out->data, B, Tq, Tk, heads, D, causal);
    int64_t nq = tensor_numel(q), nk = (int64_t)B * Tk * heads * D;
    cuda_buf q16 = {NULL, 0}, k16 = {NULL, 0}, v16 = {NULL, 0}, o16 = {NULL, 0};
    int rc = cuda_buf_alloc(cb, &q16, nq * 2) || cuda_buf_alloc(cb, &k16, nk * 2) ||
             cuda_buf_alloc(cb, &v16, nk * 2) || cuda_buf_alloc(cb, &o16, nq * 2);
    if (!rc) {
        CUDA_DISPATCH(q->type, T,
                      to_half_saturated<<<cuda_blocks(nq), CUDA_THREADS, 0, cb->stream>>>(
                          (const T *)q->data, (__half *)q16.ptr, nq);
                      to_half_saturated<<<cuda_blocks(nk), CUDA_THREADS, 0, cb->stream>>>(
                          (const T *)kd, (__half *)k16.ptr, nk);
                      to_half_saturated<<<cuda_blocks(nk), CUDA_THREADS, 0, cb->stream>>>(
                          (const T *)vd, (__half *)v16.ptr, nk));
        rc = cuda_launched("attention: to half") ||
             attend_mma(cb, (const __half *)q16.ptr, (const __half *)k16.ptr,
                        (const __half *)v16.ptr, (__half *)o16.ptr, B, Tq, Tk, heads, D, causal) ||
             cuda_convert(cb, o16.ptr, DTYPE_F16, out->data, q->type, nq);
    }
    cuda_buf_free(cb, &q16);
    cuda_buf_free(cb, &k16);
    cuda_buf_free(cb, &v16);
    cuda_buf_free(cb, &o16);
    return rc ? -1 : 0;
}

/* attend() in the tensors' type */
static int attend_as(cuda_backend *cb, dtype type, const void *q, const void *k, const void *v,
                     void *o, int B, int Tq, int Tk, int heads, int D, int causal) {
    int rc = -1;
    CUDA_DISPATCH(type, T, rc = attend<T>(cb, q, k, v, o, B, Tq, Tk, heads, D, causal));
    return rc;
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
        /* tensor cores unless fp32 mode asks for float arithmetic */
        (mma_head_size(D) && (q->type != DTYPE_F32 || cb->allow_tf32)
             ? attention_on_tensor_cores(cb, q, kd, vd, out, (int)B, (int)Tq, (int)Tk, heads,
                                         (int)D, causal)
             : attend_as(cb, q->type, q->data, kd, vd, out->data, (int)B, (int)Tq, (int)Tk,
                         heads, (int)D, causal))) {
        cuda_tensor_release(cb, out);
        out = NULL;
    }
    cuda_buf_free(cb, &k_tmp);
    cuda_buf_free(cb, &v_tmp);
    return out;
}
