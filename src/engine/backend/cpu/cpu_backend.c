/*
 * cpu_backend.c - the CPU backend: float32 tensors in host memory, dense
 * algebra through OpenBLAS, everything else in OpenMP loops.
 *
 * This file builds the operation table of backend.h and holds what every
 * kernel needs: tensor and scratch allocation (64-byte aligned, counted in
 * two atomic counters so memory() can report use and peak from any thread;
 * large freed blocks are kept for reuse, see aligned_bytes), weights
 * (aligned float32 file data is used in place, other types are converted
 * once), argument checks, the parallel matrix product, and the two
 * operations that are one call each: linear (one product over all rows)
 * and embedding.
 */
#include <inttypes.h>
#include <limits.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "backend/cpu/cpu_internal.h"
#include "core/cancel.h"
#include "core/error.h"

/* ---------------------------------------------------------------- memory */

static void raise_to(_Atomic int64_t *mark, int64_t now) {
    int64_t seen = atomic_load(mark);
    while (now > seen && !atomic_compare_exchange_weak(mark, &seen, now)) {
    }
}

void sdx4_cpu_count_bytes(backend *be, int64_t delta) {
    cpu_backend *cb = (cpu_backend *)be;
    int64_t now = atomic_fetch_add(&cb->in_use, delta) + delta;
    raise_to(&cb->peak, now);
    raise_to(&cb->high_water, now);
}

/* Large blocks are kept after they are freed and handed to the next request
 * of exactly the same size: a fresh block from the system costs a page fault
 * per 4 KB on first touch (as much as the pass over the data that follows).
 * Smaller blocks come from malloc's free lists, which already reuse them.
 * A step's own buffers come from its arena once planned (cpu_step.c); the
 * kept blocks serve the rest: a step's first runs, the text encoder, the
 * VAE's tiles.
 *
 * The blocks kept may hold 512 MiB, or more where the job has had more in
 * use at once since the last trim() (its high-water mark): up to what
 * keeps kept and used bytes within that mark, which the process has held
 * anyway. A fixed bound alone left a 512 px job faulting several GB in
 * again every step. trim(), when an upscale ends, gives them all back, so
 * that an idle process holds its weights only. */
#define REUSE_MIN_BYTES ((size_t)1 << 20)
#define SPARE_FLOOR_BYTES ((int64_t)512 << 20)

/* Takes kept block i off the list; its memory is the caller's. Under cb->lock. */
static void *unkeep(cpu_backend *cb, int i) {
    void *p = cb->spare[i].data;
    cb->spare_bytes -= cb->spare[i].bytes;
    memmove(cb->spare + i, cb->spare + i + 1, (size_t)(--cb->spare_count - i) * sizeof cb->spare[0]);
    return p;
}

static void drop_oldest_spare(cpu_backend *cb) { free(unkeep(cb, 0)); }

/* Drops the oldest kept blocks until the rest fit beside `owned` bytes in
 * use (above). Under cb->lock. */
static void fit_spares(cpu_backend *cb, int64_t owned) {
    int64_t room = atomic_load(&cb->high_water) - owned;
    if (room < SPARE_FLOOR_BYTES) room = SPARE_FLOOR_BYTES;
    while (cb->spare_count && (int64_t)cb->spare_bytes > room) drop_oldest_spare(cb);
}

void sdx4_cpu_drop_spares(cpu_backend *cb) {
    pthread_mutex_lock(&cb->lock);
    while (cb->spare_count) drop_oldest_spare(cb);
    pthread_mutex_unlock(&cb->lock);
}

/* A kept block of exactly `bytes`, newest first; NULL when none, after
 * making room for the new block that will be allocated instead. */
static void *take_spare(cpu_backend *cb, size_t bytes) {
    void *p = NULL;
    pthread_mutex_lock(&cb->lock);
    for (int i = cb->spare_count - 1; i >= 0 && !p; i--)
        if (cb->spare[i].bytes == bytes) p = unkeep(cb, i);
    if (!p) fit_spares(cb, atomic_load(&cb->in_use) + (int64_t)bytes);
    pthread_mutex_unlock(&cb->lock);
    return p;
}

static void *aligned_bytes(backend *be, size_t bytes) {
    cpu_backend *cb = (cpu_backend *)be;
    void *p = sdx4_cpu_step_place(cb, bytes); /* inside the arena: counted with it */
    if (p) return p;
    if (bytes >= REUSE_MIN_BYTES) p = take_spare(cb, bytes);
    /* posix_memalign(0) may return NULL legitimately; never ask for 0 */
    if (!p && posix_memalign(&p, 64, bytes ? bytes : 64) != 0) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "cpu backend: cannot allocate %zu bytes", bytes);
        return NULL;
    }
    sdx4_cpu_count_bytes(be, (int64_t)bytes);
    sdx4_cpu_step_traced(cb, p, bytes);
    return p;
}

static void release_bytes(backend *be, void *p, size_t bytes) {
    cpu_backend *cb = (cpu_backend *)be;
    if (sdx4_cpu_step_release(cb, p)) return; /* it was in an arena */
    sdx4_cpu_count_bytes(be, -(int64_t)bytes);
    if (bytes < REUSE_MIN_BYTES) {
        free(p);
        return;
    }
    pthread_mutex_lock(&cb->lock);
    if (cb->spare_count == CPU_SPARE_SLOTS) drop_oldest_spare(cb);
    cb->spare[cb->spare_count++] = (cpu_spare){p, bytes};
    cb->spare_bytes += bytes;
    fit_spares(cb, atomic_load(&cb->in_use));
    pthread_mutex_unlock(&cb->lock);
}

/* Gives every kept block back; the next job's mark starts from what is in
 * use now (the weights). */
static void cpu_trim(backend *be) {
    cpu_backend *cb = (cpu_backend *)be;
    sdx4_cpu_drop_spares(cb);
    atomic_store(&cb->high_water, atomic_load(&cb->in_use));
}

void *sdx4_cpu_bytes_alloc(backend *be, size_t bytes) { return aligned_bytes(be, bytes); }

void sdx4_cpu_bytes_free(backend *be, void *p, size_t bytes) {
    if (p) release_bytes(be, p, bytes);
}

float *sdx4_cpu_scratch_alloc(backend *be, size_t floats) {
    if (floats > SIZE_MAX / sizeof(float)) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "cpu backend: scratch of %zu floats is too large", floats);
        return NULL;
    }
    return aligned_bytes(be, floats * sizeof(float));
}

void sdx4_cpu_scratch_free(backend *be, float *p, size_t floats) {
    if (p) release_bytes(be, p, floats * sizeof(float));
}

static tensor *tensor_header(backend *be, int ndim, const int64_t *shape) {
    tensor *t = calloc(1, sizeof *t);
    if (!t) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "cpu backend: cannot allocate a tensor");
        return NULL;
    }
    t->be = be;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    t->type = DTYPE_F32;
    return t;
}

tensor *sdx4_cpu_new_tensor(backend *be, int ndim, const int64_t *shape) {
    int64_t n = sdx4_check_shape("new_tensor", ndim, shape);
    if (n < 0) return NULL;
    tensor *t = tensor_header(be, ndim, shape);
    if (!t) return NULL;
    t->data = aligned_bytes(be, (size_t)n * sizeof(float));
    if (!t->data) {
        free(t);
        return NULL;
    }
    t->owns_data = 1;
    return t;
}

static void cpu_free_tensor(backend *be, tensor *t) {
    if (!t) return;
#ifdef SDX4_HAVE_ONEDNN
    if (t->prepared) sdx4_cpu_onednn_weight_release(be, t);
#endif
    if (t->owns_data) release_bytes(be, t->data, (size_t)tensor_numel(t) * sizeof(float));
    free(t);
}

static tensor *cpu_weight(backend *be, const void *data, dtype type, int ndim,
                          const int64_t *shape) {
    int64_t n = sdx4_check_weight(data, type, ndim, shape);
    if (n < 0) return NULL;
    tensor *t = tensor_header(be, ndim, shape);
    if (!t) return NULL;
    /* in place, but not on the oneDNN path: there the float copy is freed
     * once its first use has reordered it (cpu_onednn.c), which the
     * model's file bytes cannot be */
    if (type == DTYPE_F32 && (uintptr_t)data % sizeof(float) == 0 &&
        ((cpu_backend *)be)->dense == CPU_DENSE_BLAS) {
        t->data = (void *)data; /* read-only by contract: weights are inputs */
        return t;
    }
    t->data = aligned_bytes(be, (size_t)n * sizeof(float));
    if (!t->data) {
        free(t);
        return NULL;
    }
    t->owns_data = 1;
    dtype_to_f32(type, data, t->data, (size_t)n);
    return t;
}

static int cpu_upload(backend *be, tensor *dst, const float *src) {
    (void)be;
    if (sdx4_cpu_check("upload", "destination", dst, 0) ||
        sdx4_check_host_buffer("upload", "source", src))
        return -1;
    memcpy(dst->data, src, (size_t)tensor_numel(dst) * sizeof(float));
    return 0;
}

static int cpu_download(backend *be, const tensor *src, float *dst) {
    (void)be;
    if (sdx4_cpu_check("download", "source", src, 0) ||
        sdx4_check_host_buffer("download", "destination", dst))
        return -1;
    memcpy(dst, src->data, (size_t)tensor_numel(src) * sizeof(float));
    return 0;
}

static void cpu_memory(backend *be, int64_t *in_use, int64_t *peak) {
    cpu_backend *cb = (cpu_backend *)be;
    if (in_use) *in_use = atomic_load(&cb->in_use);
    if (peak) *peak = atomic_load(&cb->peak);
}

/* ---------------------------------------------------------------- checks */

int sdx4_cpu_check(const char *op, const char *what, const tensor *t, int ndim) {
    if (t && !t->data && t->prepared) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                       "%s: %s is a weight held in oneDNN's layout, for convolutions and linear "
                       "layers only", op, what);
        return -1;
    }
    if (sdx4_check_present(op, what, t)) return -1;
    if (t->type != DTYPE_F32) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "%s: %s is %s, the cpu backend computes in F32", op,
                  what, dtype_name(t->type));
        return -1;
    }
    return sdx4_check_ndim(op, what, t, ndim);
}

/* ------------------------------------------------------------------ gemm */

/* Products smaller than this run on the calling thread alone. */
#define PARALLEL_GEMM_FLOPS (1 << 22)
/* Larger ones are cut into pieces of about this many (tens of
 * milliseconds on one core; the weights a row piece repacks cost about a
 * percent of it), so that the caller's cancel flag is read between them:
 * one product can take seconds (a 1x1 convolution at 2048x2048, a
 * feed-forward layer over 65536 tokens). */
#define GEMM_PIECE_FLOPS ((int64_t)1 << 31)

int sdx4_cpu_gemm(backend *be, int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
             int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc) {
    int64_t flops = 2 * M * N * K;
    int threads = flops < PARALLEL_GEMM_FLOPS ? 1 : cpu_threads(be);
    int split_rows = M >= N;
    int64_t len = split_rows ? M : N;
    /* a multiple of the threads, so that a static schedule stays even */
    int64_t rounds = (flops + threads * GEMM_PIECE_FLOPS - 1) / (threads * GEMM_PIECE_FLOPS);
    int64_t pieces = threads * (rounds > 0 ? rounds : 1);
    if (pieces > len) pieces = len > 0 ? len : 1;
    if (threads > pieces) threads = (int)pieces;
    const sdx4_atomic_int *cancel = sdx4_cancel_flag(); /* the workers' thread-locals have none */
    int canceled = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        cpu_blas_one_thread();
#pragma omp for schedule(static) reduction(|| : canceled)
        for (int64_t piece = 0; piece < pieces; piece++) {
            if (canceled || (canceled = cancel_is_set(cancel))) continue;
            int64_t lo = len * piece / pieces, n = len * (piece + 1) / pieces - lo;
            /* rows of A and C, or columns of C and of op(B) */
            const float *a = split_rows ? A + lo * lda : A;
            const float *b = split_rows ? B : trans_b ? B + lo * ldb : B + lo;
            float *c = split_rows ? C + lo * ldc : C + lo;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                        (int)(split_rows ? n : M), (int)(split_rows ? N : n), (int)K, 1.0f, a,
                        (int)lda, b, (int)ldb, 0.0f, c, (int)ldc);
        }
    }
    return canceled ? sdx4_cancel_stopped() : 0;
}

/* ---------------------------------------------------------------- linear */

/* y[M, N] = x[M, K] @ w[N, K]^T + bias: one product over all rows, then
 * the bias. */
static tensor *cpu_linear(backend *be, const tensor *x, const tensor *w, const tensor *bias) {
    if (sdx4_cpu_check("linear", "input", x, 0) || sdx4_cpu_check("linear", "weight", w, 2)) return NULL;
    if (sdx4_check_linear(x, w)) return NULL;
    int64_t K = x->shape[x->ndim - 1], N = w->shape[0];
    if (bias && (sdx4_cpu_check("linear", "bias", bias, 0) || sdx4_check_bias("linear", bias, N)))
        return NULL;
    int64_t M = tensor_numel(x) / K;
    if (sdx4_check_gemm_size("linear", "BLAS", M, N, K)) return NULL;
    int64_t shape[4];
    memcpy(shape, x->shape, sizeof shape);
    shape[x->ndim - 1] = N;
    tensor *y = sdx4_cpu_new_tensor(be, x->ndim, shape);
    if (!y) return NULL;
    if (sdx4_cpu_gemm(be, 1, M, N, K, x->data, K, w->data, K, y->data, N)) {
        tensor_free(y);
        return NULL;
    }
    if (bias) {
        float *out = y->data;
        const float *b = bias->data;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) out[m * N + n] += b[n];
    }
    return y;
}

/* ------------------------------------------------------------- embedding */

static tensor *cpu_embedding(backend *be, const tensor *table, const int32_t *ids, int n) {
    if (sdx4_cpu_check("embedding", "table", table, 2)) return NULL;
    if (sdx4_check_embedding(table->shape[0], ids, n)) return NULL;
    int64_t D = table->shape[1];
    tensor *out = sdx4_cpu_new_tensor(be, 2, (int64_t[]){n, D});
    if (!out) return NULL;
    for (int i = 0; i < n; i++)
        memcpy((float *)out->data + (int64_t)i * D, (const float *)table->data + ids[i] * D,
               (size_t)D * sizeof(float));
    return out;
}

/* ------------------------------------------------------------- lifetime */

static void cpu_destroy(backend *be) {
    cpu_backend *cb = (cpu_backend *)be;
#ifdef SDX4_HAVE_ONEDNN
    if (cb->onednn) sdx4_cpu_onednn_close(be);
#endif
    cpu_trim(be);
    pthread_mutex_destroy(&cb->lock);
    free(cb);
}

backend *sdx4_backend_cpu_create(int threads) { return sdx4_backend_cpu_open(threads, CPU_DENSE_BLAS); }

backend *sdx4_backend_cpu_open(int threads, cpu_dense_path dense) {
#ifndef SDX4_HAVE_ONEDNN
    if (dense != CPU_DENSE_BLAS) {
        sdx4_set_error(SDX4_ERR_DEVICE, "cpu.dtype %s: this build of sdx4 has no oneDNN (built with "
                       "SDX4_ONEDNN=OFF or without libdnnl-dev)",
                       dense == CPU_DENSE_ONEDNN_BF16 ? "bf16" : "fp32 through oneDNN");
        return NULL;
    }
#endif
    if (threads < 0) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "cpu backend: %d threads", threads);
        return NULL;
    }
    cpu_backend *cb = calloc(1, sizeof *cb);
    if (!cb) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "cpu backend: out of memory");
        return NULL;
    }
    cb->threads = threads ? threads : omp_get_num_procs();
    cb->dense = dense;
    atomic_init(&cb->in_use, 0);
    atomic_init(&cb->peak, 0);
    atomic_init(&cb->high_water, 0);
    if (pthread_mutex_init(&cb->lock, NULL) != 0) {
        free(cb);
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "cpu backend: cannot create a lock");
        return NULL;
    }
    snprintf(cb->description, sizeof cb->description, "CPU, %d threads, OpenBLAS %s", cb->threads,
             openblas_get_corename());

    backend *be = &cb->base;
    be->name = "cpu";
    be->description = cb->description;
    be->new_tensor = sdx4_cpu_new_tensor;
    be->free_tensor = cpu_free_tensor;
    be->weight = cpu_weight;
    be->upload = cpu_upload;
    be->download = cpu_download;
    be->linear = cpu_linear;
    be->conv2d = sdx4_cpu_conv2d;
    be->attention = sdx4_cpu_attention;
    be->group_norm = sdx4_cpu_group_norm;
    be->layer_norm = sdx4_cpu_layer_norm;
    be->activate = sdx4_cpu_activate;
    be->geglu = sdx4_cpu_geglu;
    be->add_inplace = sdx4_cpu_add_inplace;
    be->add_channel_bias_inplace = sdx4_cpu_add_channel_bias_inplace;
    be->scale_inplace = sdx4_cpu_scale_inplace;
    be->prelu_inplace = sdx4_cpu_prelu_inplace;
    be->concat_channels = sdx4_cpu_concat_channels;
    be->upsample_nearest = sdx4_cpu_upsample_nearest;
    be->pixel_shuffle = sdx4_cpu_pixel_shuffle;
    be->pixel_unshuffle = sdx4_cpu_pixel_unshuffle;
    be->nchw_to_tokens = sdx4_cpu_nchw_to_tokens;
    be->tokens_to_nchw = sdx4_cpu_tokens_to_nchw;
    be->embedding = cpu_embedding;
    be->memory = cpu_memory;
    be->trim = cpu_trim;
    be->step_new = sdx4_cpu_step_new;
    be->step_run = sdx4_cpu_step_run;
    be->step_free = sdx4_cpu_step_free;
    be->destroy = cpu_destroy;
#ifdef SDX4_HAVE_ONEDNN
    if (dense != CPU_DENSE_BLAS && sdx4_cpu_onednn_open(be, dense)) {
        cpu_destroy(be);
        return NULL;
    }
#endif
    return be;
}
