/*
 * cpu_attention.c - scaled dot-product attention, softmax(q k^T / sqrt(D)) v,
 * computed a tile of queries at a time.
 *
 * q, k, v stay in their [B, T, H*D] token layout: head h of batch b is the
 * strided matrix that starts at column h*D with leading dimension H*D, which
 * sgemm reads directly, so nothing is transposed or copied. For each tile of
 * up to a few hundred queries of one (batch, head):
 *
 *   scores[rows, Tk] = (Q_tile @ K^T) / sqrt(D)        one sgemm
 *   scores = exp(scores - row max), row sums (float, in vector lanes)
 *   out_tile = (scores @ V) / row sum                  one sgemm
 *
 * (normalising the [rows, D] output instead of the [rows, Tk] weights saves
 * a pass.) Only one [rows, Tk] tile per thread exists at a time, so the
 * VAE's 16384-token self-attention needs a few MB, not a 1 GB score matrix.
 * The tiles of all batches and heads are spread over the threads, each
 * with single-threaded sgemms. With `causal`, query i sees keys j <= i
 * (PyTorch's is_causal, aligned at the top-left), and a tile only computes
 * the key columns its last query can see.
 *
 * A tile takes milliseconds, the whole operation up to minutes (the tiny
 * model's VAE at 512x512 attends over 262144 tokens), so each tile first
 * reads the caller's cancel flag (core/cancel.h): once it is set the
 * remaining tiles are skipped and the operation fails as canceled.
 */
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#include <cblas.h>

#include "backend/cpu/cpu_internal.h"
#include "backend/cpu/cpu_math.h"
#include "core/cancel.h"
#include "core/error.h"

/* Scratch per thread for one tile of scores. */
#define SCORE_BUDGET_BYTES ((int64_t)8 << 20)
#define MAX_QUERY_TILE 256
#define MIN_QUERY_TILE 16

typedef struct {
    int64_t B, Tq, Tk, heads, D;
    int causal;
    float scale;
} attn_shape;

/* Rows per tile and tiles per (batch, head): tiles small enough for the
 * scratch budget and numerous enough to keep every thread busy. */
static void plan_tiles(const attn_shape *a, int threads, int64_t *tile, int64_t *ntiles) {
    int64_t t = SCORE_BUDGET_BYTES / (a->Tk * (int64_t)sizeof(float));
    if (t > MAX_QUERY_TILE) t = MAX_QUERY_TILE;
    if (t < MIN_QUERY_TILE) t = MIN_QUERY_TILE;
    int64_t n = (a->Tq + t - 1) / t;
    int64_t heads = a->B * a->heads;
    if (heads * n < threads) n = (threads + heads - 1) / heads;
    t = (a->Tq + n - 1) / n;
    *tile = t;
    *ntiles = (a->Tq + t - 1) / t;
}

/* out rows [q0, q0 + rows) of one (batch, head); q, k, v, out point at the
 * head's first column, rows are H*D apart. */
static void attend_tile(const attn_shape *a, const float *q, const float *k, const float *v,
                        float *out, int64_t q0, int64_t rows, float *scores) {
    int64_t ld = a->heads * a->D;
    /* causal: the last query of the tile sees keys 0..q0+rows-1 */
    int64_t keys = a->causal && q0 + rows < a->Tk ? q0 + rows : a->Tk;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)keys, (int)a->D, a->scale,
                q + q0 * ld, (int)ld, k, (int)ld, 0.0f, scores, (int)keys);
    float inv_sum[MAX_QUERY_TILE];
    for (int64_t r = 0; r < rows; r++) {
        float *s = scores + r * keys;
        int64_t visible = a->causal && q0 + r + 1 < keys ? q0 + r + 1 : keys;
        /* lanes past the row read -inf: they leave the max alone and their
         * e^-87 vanishes in a sum that is at least 1 */
        v4f lanes = v4_splat(-INFINITY);
        for (int64_t j = 0; j < visible; j += 4)
            lanes = v4_maxv(lanes, v4_load_fill(s + j, visible - j, -INFINITY));
        float max = v4_max(lanes);
        v4f sums = v4_splat(0.0f);
        for (int64_t j = 0; j < visible; j += 4) {
            v4f e = cpu_exp4(v4_load_fill(s + j, visible - j, -INFINITY) - max);
            v4_store(s + j, e, visible - j);
            sums += e;
        }
        float sum = v4_sum(sums);
        memset(s + visible, 0, (size_t)(keys - visible) * sizeof(float));
        inv_sum[r] = 1.0f / sum;
    }
    float *o = out + q0 * ld;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)a->D, (int)keys, 1.0f,
                scores, (int)keys, v, (int)ld, 0.0f, o, (int)ld);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t d = 0; d < a->D; d++) o[r * ld + d] *= inv_sum[r];
}

tensor *sdx4_cpu_attention(backend *be, const tensor *q, const tensor *k, const tensor *v, int heads,
                      int causal) {
    if (sdx4_cpu_check("attention", "q", q, 3) || sdx4_cpu_check("attention", "k", k, 3) ||
        sdx4_cpu_check("attention", "v", v, 3))
        return NULL;
    if (sdx4_check_attention(q, k, v, heads)) return NULL;
    if (q->shape[1] > INT_MAX || k->shape[1] > INT_MAX || q->shape[2] > INT_MAX) {
        char qs[SHAPE_STR_SIZE];
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "attention: q %s exceeds the BLAS int range",
                  sdx4_shape_str(q, qs, sizeof qs));
        return NULL;
    }
    attn_shape a = {.B = q->shape[0],
                    .Tq = q->shape[1],
                    .Tk = k->shape[1],
                    .heads = heads,
                    .D = q->shape[2] / heads,
                    .causal = causal};
    a.scale = (float)(1.0 / sqrt((double)a.D));

    tensor *out = sdx4_cpu_new_tensor(be, 3, q->shape);
    if (!out) return NULL;
    int threads = cpu_threads(be);
    int64_t tile, ntiles;
    plan_tiles(&a, threads, &tile, &ntiles);
    size_t scratch_floats = (size_t)(tile * a.Tk);
    float *scratch = sdx4_cpu_scratch_alloc(be, scratch_floats * (size_t)threads);
    if (!scratch) {
        tensor_free(out);
        return NULL;
    }
    int64_t units = a.B * a.heads * ntiles, ld = a.heads * a.D;
    const float *qd = q->data, *kd = k->data, *vd = v->data;
    float *od = out->data;
    const sdx4_atomic_int *cancel = sdx4_cancel_flag(); /* the workers' thread-locals have none */
    int canceled = 0;
#pragma omp parallel num_threads(threads)
    {
        cpu_blas_one_thread();
        float *scores = scratch + (size_t)omp_get_thread_num() * scratch_floats;
#pragma omp for schedule(dynamic, 1) reduction(|| : canceled)
        for (int64_t u = 0; u < units; u++) {
            if (canceled || (canceled = cancel_is_set(cancel))) continue;
            int64_t bh = u / ntiles, b = bh / a.heads, h = bh % a.heads;
            int64_t q0 = (u % ntiles) * tile, rows = a.Tq - q0 < tile ? a.Tq - q0 : tile;
            int64_t head = h * a.D;
            attend_tile(&a, qd + b * a.Tq * ld + head, kd + b * a.Tk * ld + head,
                        vd + b * a.Tk * ld + head, od + b * a.Tq * ld + head, q0, rows, scores);
        }
    }
    sdx4_cpu_scratch_free(be, scratch, scratch_floats * (size_t)threads);
    if (canceled) {
        tensor_free(out);
        sdx4_cancel_stopped();
        return NULL;
    }
    return out;
}
