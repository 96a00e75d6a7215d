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
 * that nothing becomes inf. A block takes BQ queries in WR row groups of
 * MT m-tiles (16 rows each); the WD warps of a row group split D, each
 * owning a D/WD slice. A warp loads its q fragments (its rows, its slice)
 * into registers once and keeps them. The keys come in tiles of BK through
 * a ring of STAGES shared-memory stages filled by cp.async (16 bytes a
 * copy, straight from L2): while the block computes tile i, tiles i + 1 ..
 * i + STAGES - 1 are on their way, and one __syncthreads per tile both
 * publishes the tile that landed and frees the stage refilled next. K and
 * V sit as [key][d] rows padded by 8 halves, so that the 8 rows an
 * ldmatrix phase reads fall in distinct banks: K fragments come from
 * ldmatrix, V fragments from ldmatrix.trans. Per tile a warp computes its
 * 16 MT x BK scores over its slice in registers; with WD > 1 the slices'
 * partial scores are added through shared memory (float2 stores in the
 * accumulator layout, rows padded to BK + 8 floats: conflict-free), each
 * warp summing 1/WD of them, the row group's warps alone waiting on a
 * named barrier. Then the online softmax, in base 2, and the scores,
 * rounded to half, become the A operand of P V without leaving registers
 * (the accumulator layout of one mma is the operand layout of the next);
 * each warp keeps the 16 MT x D/WD output of its slice. Two m-tiles per
 * warp (MT 2, used for D 512) read every K and V fragment once for two
 * mma, halving the shared-memory traffic that bounds the kernel; it takes
 * 8 warps of 255 registers (acc alone is 128).
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
 * float accumulators (PTX ISA, "mma.m16n8k16" fragment layouts: with
 * g = lane / 4, t = lane % 4, a holds A[g][2t..2t+1], A[g+8][2t..],
 * A[g][2t+8..], A[g+8][2t+8..]; b holds B[2t..2t+1][g], B[2t+8..2t+9][g];
 * d holds D[g][2t..2t+1], D[g+8][2t..2t+1]). */
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

/* 2^x by the hardware's approximation, as exp2f, less exp2f's care for
 * results below 2^-126 (they flush to 0; a p that small is 0 in half
 * anyway, and next to the row's largest term, 1, nothing in l); 2^-inf = 0 */
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* two neighbouring halves of global memory, or zeros past the last row */
__device__ __forceinline__ uint32_t ld_pair(const __half *p, bool in) {
    return in ? __ldg((const unsigned int *)p) : 0u;
}

/* Four 8x8 half matrices from shared memory: lane l gives the address of
 * row l % 8 of matrix l / 8 and gets, of each matrix M, {M[g][2t],
 * M[g][2t+1]} (g = l / 4, t = l % 4), which is an mma B fragment when M's
 * rows run along n; with .trans it gets {M[2t][g], M[2t+1][g]}, a B
 * fragment when M's rows run along k. */
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const __half *p) {
    unsigned addr = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const __half *p) {
    unsigned addr = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

/* 16 bytes from global to shared memory without passing through registers
 * (.cg: cached in L2 only); with `in` false it writes 16 zeros and reads
 * nothing. */
__device__ __forceinline__ void cp_async_16(__half *dst, const __half *src, bool in) {
    unsigned addr = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src),
                 "r"(in ? 16 : 0)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

/* waits until at most N of this thread's committed groups are in flight */
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* a barrier for the WD warps of row group wr only: named barrier 1 + wr
 * (__syncthreads is barrier 0), an immediate so that ptxas reserves WR + 1
 * barriers rather than all 16 */
template <int ID, int THREADS> __device__ __forceinline__ void named_sync() {
    asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "n"(THREADS) : "memory");
}

template <int WD, int WR> __device__ __forceinline__ void row_group_sync(int wr) {
    static_assert(WR <= 4, "row groups");
    if (WR == 1 || wr == 0) named_sync<1, 32 * WD>();
    else if (WR == 2 || wr == 1) named_sync<2, 32 * WD>();
    else if (WR == 3 || wr == 2) named_sync<3, 32 * WD>();
    else named_sync<4, 32 * WD>();
}

/* threadIdx.x, read anew: the compiler cannot reuse what it derived from
 * the first read */
__device__ __forceinline__ int thread_index() {
    int x;
    asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(x));
    return x;
}

/* Starts copying a tile of BK keys of K and V (kt, vt: its first key)
 * into a pipeline stage, 16 bytes per cp.async: this thread's share is the
 * 8 halves at `off` (key r1 of the tile, column c) and those RSTEP, 2 RSTEP,
 * ... keys further, to dst (the stage's K tile at key r1, column c) and BK
 * rows below (the V tile). Keys at or past `rows` become zeros (a key past
 * Tk must be 0, not garbage: p = 0 times a NaN is still NaN). */
template <int D, int BK, int THREADS>
__device__ __forceinline__ void load_kv_async(__half *dst, const __half *kt, const __half *vt,
                                              int64_t ld, int off, int r1, int rows) {
    constexpr int LDK = D + 8, RSTEP = THREADS / (D / 8);
    static_assert(THREADS % (D / 8) == 0 && BK % RSTEP == 0, "whole rows per pass");
#pragma unroll
    for (int u = 0; u < BK / RSTEP; u++) {
        const bool in = r1 + u * RSTEP < rows;
        const int64_t at = in ? u * RSTEP * ld + off : 0; /* a valid address either way */
        cp_async_16(dst + u * RSTEP * LDK, kt + at, in);
        cp_async_16(dst + (BK + u * RSTEP) * LDK, vt + at, in);
    }
}

template <int D, int WD, int WR, int MT, int BK, int STAGES, int MINB>
__global__ void __launch_bounds__(32 * WD * WR, MINB)
mma_attention_kernel(const __half *q, const __half *k, const __half *v, __half *o, int Tq, int Tk,
                     int heads, float scale_log2, int causal) {
    constexpr int RG = 16 * MT;            /* rows of a row group */
    constexpr int BQ = RG * WR, DS = D / WD, THREADS = 32 * WD * WR;
    constexpr int LDK = D + 8;             /* padding: conflict-free ldmatrix */
    constexpr int LDP = BK + 8;            /* likewise for the partial scores */
    constexpr int NT = BK / 8, ONT = DS / 8, KS = DS / 16;
    constexpr int STAGE = 2 * BK * LDK;    /* halves of one stage: K, then V */
    static_assert(STAGES >= 2 && NT % 2 == 0 && ONT % 2 == 0, "tile shape");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __half *kv_s = (__half *)smem_raw;                 /* [STAGES][K, V][BK][LDK] */
    float *part = (float *)(kv_s + STAGES * STAGE);    /* [WR][WD][RG][LDP] */

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, t = lane & 3; /* the fragment coordinates */
    const int wr = warp / WD, wd = warp % WD;
    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int q0 = blockIdx.x * BQ;
    const int64_t ld = (int64_t)heads * D;
    const __half *qb = q + (int64_t)b * Tq * ld + (int64_t)h * D;
    const int row0 = q0 + RG * wr + g; /* rows row0 + 16 mt + {0, 8} */
    const int kv_end = causal && q0 + BQ < Tk ? q0 + BQ : Tk;
    const int tiles = (kv_end + BK - 1) / BK;

    /* the pipeline's first STAGES - 1 tiles start loading first; one
     * group per tile, empty ones too, so that the count of groups in
     * flight says which tile has landed. This thread copies columns c1..
     * c1 + 7 of keys r1, r1 + RSTEP, ... of each tile. */
    const int r1 = tid / (D / 8), c1 = tid % (D / 8) * 8;
    __half *kv_mine = kv_s + r1 * LDK + c1;
    const int kv_off = r1 * (int)ld + c1; /* < 2^31: r1 < 16, ld < 2^26 */
    const __half *kb = k + (int64_t)b * Tk * ld + (int64_t)h * D;
    const __half *vb = v + (int64_t)b * Tk * ld + (int64_t)h * D;
#pragma unroll
    for (int st = 0; st < STAGES - 1; st++) {
        if (st < tiles)
            load_kv_async<D, BK, THREADS>(kv_mine + st * STAGE, kb + (int64_t)st * BK * ld,
                                          vb + (int64_t)st * BK * ld, ld, kv_off, r1, Tk - st * BK);
        cp_async_commit();
    }

    /* this warp's A fragments of q (its rows, its D slice) stay in
     * registers for the whole walk: rows past Tq are zeros */
    uint32_t qf[MT][KS][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        const int r = row0 + 16 * mt;
        const __half *lo = qb + (int64_t)r * ld + wd * DS + 2 * t, *hi = lo + 8 * ld;
#pragma unroll
        for (int ks = 0; ks < KS; ks++) {
            qf[mt][ks][0] = ld_pair(lo + 16 * ks, r < Tq);
            qf[mt][ks][1] = ld_pair(hi + 16 * ks, r + 8 < Tq);
            qf[mt][ks][2] = ld_pair(lo + 16 * ks + 8, r < Tq);
            qf[mt][ks][3] = ld_pair(hi + 16 * ks + 8, r + 8 < Tq);
        }
    }

    float m[MT][2], l[MT][2], acc[MT][ONT][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        m[mt][0] = m[mt][1] = -INFINITY;
        l[mt][0] = l[mt][1] = 0.0f;
#pragma unroll
        for (int n = 0; n < ONT; n++)
            acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.0f;
    }

    int stage = 0;
    for (int it = 0; it < tiles; it++) {
        cp_async_wait<STAGES - 2>(); /* this thread's copies of tile `it` are done */
        __syncthreads(); /* everyone's are, and tile it - 1 is consumed by all */
        {
            /* refill the stage tile it - 1 used with tile it + STAGES - 1 */
            const int next = it + STAGES - 1, ns = stage == 0 ? STAGES - 1 : stage - 1;
            if (next < tiles)
                load_kv_async<D, BK, THREADS>(kv_mine + ns * STAGE, kb + (int64_t)next * BK * ld,
                                              vb + (int64_t)next * BK * ld, ld, kv_off, r1,
                                              Tk - next * BK);
            cp_async_commit();
        }
        /* this lane's ldmatrix rows (from a fresh thread index: registers
         * are too scarce to keep them): for K, matrices (keys +0, d +0),
         * (+0, +8), (+8, +0), (+8, +8) are b0, b1 of n-tiles j and j + 1;
         * for V (transposed), (keys +0, d +0), (+8, +0), (+0, +8), (+8, +8)
         * are b0, b1 of n-tiles n and n + 1 */
        const int tn = thread_index(), ln = tn % 32, dn = tn / 32 % WD * DS;
        const __half *k_s = kv_s + stage * STAGE, *v_s = k_s + BK * LDK;
        const __half *k_frag = k_s + ((ln & 7) + (ln >> 4) * 8) * LDK + dn + ((ln >> 3) & 1) * 8;
        const __half *v_frag = v_s + ((ln & 7) + ((ln >> 3) & 1) * 8) * LDK + dn + (ln >> 4) * 8;
        const int k0 = it * BK;
        stage = stage + 1 == STAGES ? 0 : stage + 1;

        /* scores of this warp's rows and its slice of D */
        float s[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int j = 0; j < NT; j++)
                s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KS; ks++) {
#pragma unroll
            for (int j = 0; j < NT; j += 2) {
                uint32_t kf[4];
                ldmatrix_x4(kf, k_frag + 8 * j * LDK + 16 * ks);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_16816(s[mt][j], qf[mt][ks], kf[0], kf[1]);
                    mma_16816(s[mt][j + 1], qf[mt][ks], kf[2], kf[3]);
                }
            }
        }
        if (WD > 1) {
            /* add the slices' partial scores: each warp writes its own,
             * warp wd sums fragments wd, wd + WD, ... into slot 0, and all
             * read the sums back; only the row group's warps wait */
            float *grp = part + wr * WD * RG * LDP;
            float *mine = grp + wd * RG * LDP;
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    const int at = (16 * mt + g) * LDP + 8 * j + 2 * t;
                    *(float2 *)&mine[at] = make_float2(s[mt][j][0], s[mt][j][1]);
                    *(float2 *)&mine[at + 8 * LDP] = make_float2(s[mt][j][2], s[mt][j][3]);
                }
            row_group_sync<WD, WR>(wr);
            for (int f = wd; f < MT * NT; f += WD) {
                const int at = (16 * (f / NT) + g) * LDP + 8 * (f % NT) + 2 * t;
                float2 lo = *(const float2 *)&grp[at], hi = *(const float2 *)&grp[at + 8 * LDP];
#pragma unroll
                for (int w = 1; w < WD; w++) {
                    const float2 a = *(const float2 *)&grp[w * RG * LDP + at];
                    const float2 c = *(const float2 *)&grp[w * RG * LDP + at + 8 * LDP];
                    lo.x += a.x, lo.y += a.y, hi.x += c.x, hi.y += c.y;
                }
                *(float2 *)&grp[at] = lo;
                *(float2 *)&grp[at + 8 * LDP] = hi;
            }
            row_group_sync<WD, WR>(wr);
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    const int at = (16 * mt + g) * LDP + 8 * j + 2 * t;
                    const float2 lo = *(const float2 *)&grp[at];
                    const float2 hi = *(const float2 *)&grp[at + 8 * LDP];
                    s[mt][j][0] = lo.x, s[mt][j][1] = lo.y, s[mt][j][2] = hi.x, s[mt][j][3] = hi.y;
                }
        }

        /* online softmax in base 2: p = 2^(s * scale * log2(e) - m); only
         * a tile with keys past Tk, or past a row (causal), needs the mask */
        const bool partial = k0 + BK > Tk || (causal && k0 + BK - 1 > q0);
        float tile_max[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            tile_max[mt][0] = tile_max[mt][1] = -INFINITY;
#pragma unroll
            for (int j = 0; j < NT; j++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int key = k0 + 8 * j + 2 * t + (e & 1);
                    const int row = row0 + 16 * mt + (e >> 1) * 8;
                    const bool visible = !partial || (key < Tk && (!causal || key <= row));
                    s[mt][j][e] = visible ? s[mt][j][e] * scale_log2 : -INFINITY;
                    tile_max[mt][e >> 1] = fmaxf(tile_max[mt][e >> 1], s[mt][j][e]);
                }
            }
        }
        float alpha[MT][2];
        bool grew = false;
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float tm = tile_max[mt][r];
                tm = fmaxf(tm, __shfl_xor_sync(FULL_MASK, tm, 1));
                tm = fmaxf(tm, __shfl_xor_sync(FULL_MASK, tm, 2));
                const float m_new = fmaxf(m[mt][r], tm);
                /* a row with nothing visible yet (padding rows) keeps m = -inf */
                alpha[mt][r] = m_new == -INFINITY ? 1.0f : exp2_ftz(m[mt][r] - m_new);
                grew |= alpha[mt][r] != 1.0f;
                m[mt][r] = m_new;
                l[mt][r] *= alpha[mt][r];
            }
#pragma unroll
            for (int j = 0; j < NT; j++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const float mr = m[mt][e >> 1];
                    s[mt][j][e] = mr == -INFINITY ? 0.0f : exp2_ftz(s[mt][j][e] - mr);
                    l[mt][e >> 1] += s[mt][j][e];
                }
            }
        }
        /* once the maxima settle, alpha is 1 and rescaling would change
         * nothing: skip it when no row of the warp moved */
        if (__any_sync(FULL_MASK, grew)) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int n = 0; n < ONT; n++) {
                    acc[mt][n][0] *= alpha[mt][0], acc[mt][n][1] *= alpha[mt][0];
                    acc[mt][n][2] *= alpha[mt][1], acc[mt][n][3] *= alpha[mt][1];
                }
        }

        /* acc += P V: the scores' accumulator layout is P's operand layout */
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                a[mt][0] = pack_half2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                a[mt][1] = pack_half2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                a[mt][2] = pack_half2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                a[mt][3] = pack_half2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int n = 0; n < ONT; n += 2) {
                uint32_t vf[4];
                ldmatrix_x4_trans(vf, v_frag + 16 * kk * LDK + 8 * n);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_16816(acc[mt][n], a[mt], vf[0], vf[1]);
                    mma_16816(acc[mt][n + 1], a[mt], vf[2], vf[3]);
                }
            }
        }
    }

    /* acc / l to the output: this thread's columns of rows row0 + 16 mt +
     * {0, 8}, addressed from a fresh read of the thread index so that the
     * q loads' row offsets need not live through the loop (registers) */
    const int tid2 = thread_index(), lane2 = tid2 % 32, warp2 = tid2 / 32;
    __half *ob = o + ((int64_t)b * Tq + q0 + RG * (warp2 / WD) + (lane2 >> 2)) * ld +
                 (int64_t)h * D + (warp2 % WD) * DS + 2 * (lane2 & 3);
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float lr = l[mt][r];
            lr += __shfl_xor_sync(FULL_MASK, lr, 1);
            lr += __shfl_xor_sync(FULL_MASK, lr, 2);
            if (row0 + 16 * mt + 8 * r >= Tq) continue;
            const float inv = 1.0f / lr;
            __half *orow = ob + (16 * mt + 8 * r) * ld;
#pragma unroll
            for (int n = 0; n < ONT; n++)
                *(__half2 *)(orow + 8 * n) =
                    __floats2half2_rn(acc[mt][n][2 * r] * inv, acc[mt][n][2 * r + 1] * inv);
        }
    }
}

/* The dynamic shared memory of a variant: the K, V stages in half, and the
 * partial scores in float. */
static constexpr int mma_smem(int D, int WD, int WR, int MT, int BK, int STAGES) {
    return STAGES * 2 * BK * (D + 8) * 2 + (WD > 1 ? WR * WD * 16 * MT * (BK + 8) * 4 : 0);
}

template <int D, int WD, int WR, int MT, int BK, int STAGES, int MINB>
static int launch_mma_attention(cuda_backend *cb, const __half *q, const __half *k,
                                const __half *v, __half *o, int B, int Tq, int Tk, int heads,
                                int causal) {
    constexpr int BQ = 16 * MT * WR;
    const int smem = mma_smem(D, WD, WR, MT, BK, STAGES);
    auto kernel = mma_attention_kernel<D, WD, WR, MT, BK, STAGES, MINB>;
    if (cuda_ok(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
                "attention: shared memory"))
        return -1;
    dim3 grid((unsigned)((Tq + BQ - 1) / BQ), (unsigned)(B * heads));
    kernel<<<grid, 32 * WD * WR, smem, cb->stream>>>(q, k, v, o, Tq, Tk, heads,
                                                     (float)(M_LOG2E / sqrt((double)D)), causal);
    return cuda_launched("attention");
}

/* Whether the tensor-core kernel has a variant for head size D that this
 * device can hold (512's needs more shared memory than sm_86 and sm_89
 * give a block; those take the float kernel). */
static bool mma_head_size(const cuda_backend *cb, int64_t D) {
    return D == 64 || D == 128 || D == 256 ||
           (D == 512 && cb->smem_per_block >= mma_smem(512, 4, 2, 2, 16, 3));
}

/* <D, WD, WR, MT, BK, STAGES, blocks per SM>, chosen so that no variant
 * spills (ptxas -v): 64 and 128 as 4 warps, one per 16 rows, at 4 and 3
 * blocks an SM; 256 as 2 x 2 warps; 512 as 2 row groups of 32 rows x 4
 * slices of 128, 255 registers, 122 KB of shared memory, one block an SM
 * (the 3 stages need more than the 99 KB of sm_86 / sm_89) */
static int attend_mma(cuda_backend *cb, const __half *q, const __half *k, const __half *v,
                      __half *o, int B, int Tq, int Tk, int heads, int D, int causal) {
#define MMA_ATTENTION(...) \
    launch_mma_attention<__VA_ARGS__>(cb, q, k, v, o, B, Tq, Tk, heads, causal)
    switch (D) {
    case 64: return MMA_ATTENTION(64, 1, 4, 1, 32, 3, 4);
    case 128: return MMA_ATTENTION(128, 1, 4, 1, 32, 3, 3);
    case 256: return MMA_ATTENTION(256, 2, 2, 1, 32, 2, 2);
    default: return MMA_ATTENTION(512, 4, 2, 2, 16, 3, 1); /* mma_head_size's 512 */
    }
#undef MMA_ATTENTION
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
    cuda_buf q16 = {}, k16 = {}, v16 = {}, o16 = {};
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
    if (sdx4_check_attention(q, k, v, heads)) return NULL;
    int64_t B = q->shape[0], Tq = q->shape[1], Tk = k->shape[1], D = q->shape[2] / heads;
    cuda_profile_label(cb->profile, " %s B%" PRId64 " H%d Tq%" PRId64 " Tk%" PRId64 " D%" PRId64,
                       dtype_name(q->type), B, heads, Tq, Tk, D);
    if (D > MAX_HEAD_DIM) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                  "attention: head dimension %" PRId64 " (at most %d on cuda)", D, MAX_HEAD_DIM);
        return NULL;
    }
    if (Tq > INT_MAX - 64 || Tk > INT_MAX - 64 || B * heads > 65535) {
        char qs[SHAPE_STR_SIZE];
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "attention: q %s with %d heads is too large",
                  sdx4_shape_str(q, qs, sizeof qs), heads);
        return NULL;
    }
    cuda_buf k_tmp = {}, v_tmp = {};
    const void *kd = NULL, *vd = NULL;
    tensor *out = NULL;
    if (!(kd = cuda_data_as(cb, k, q->type, &k_tmp)) ||
        !(vd = cuda_data_as(cb, v, q->type, &v_tmp)) ||
        !(out = cuda_tensor_new(cb, 3, q->shape, q->type)) ||
        /* tensor cores unless fp32 mode asks for float arithmetic */
        (mma_head_size(cb, D) && (q->type != DTYPE_F32 || cb->allow_tf32)
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
