/*
 * cpu_internal.h - what the files of the CPU backend share.
 *
 * cpu_backend.c builds the operation table (backend.h) and owns memory,
 * weights, linear and embedding; cpu_step.c plans the memory of steps;
 * cpu_conv.c, cpu_attention.c,
 * cpu_norm_act.c and cpu_layout.c hold the other kernels; cpu_onednn.c
 * holds the oneDNN path of convolutions and linear layers (bfloat16, or
 * float32 for tests), which replaces cpu_conv.c's and linear's entries of
 * the table when the backend is opened with it. They all use the
 * helpers below to allocate tensors and scratch (counted by memory()), to
 * check their tensors, and to multiply matrices.
 *
 * Threads: every kernel parallelises its own loops with
 * `num_threads(cpu_threads(be))` and calls sgemm on its share of the work
 * from inside the parallel region, single-threaded (sdx4_cpu_gemm does this for
 * one big product). The OpenMP build of OpenBLAS takes its thread count
 * from the calling task's OpenMP setting and would start a nested team
 * from a region of one thread, so such regions begin with
 * cpu_blas_one_thread(); and since OpenBLAS never runs its own teams, two
 * application threads may run products at once without sharing its
 * per-thread buffers.
 */
#ifndef SDX4_CPU_INTERNAL_H
#define SDX4_CPU_INTERNAL_H

#include <omp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"
#include "backend/backend_check.h"

/* Freed blocks kept for reuse (cpu_backend.c): at most this many. They are
 * not counted in memory()'s figures. */
#define CPU_SPARE_SLOTS 256

typedef struct {
    void *data;
    size_t bytes;
} cpu_spare;

typedef struct cpu_onednn cpu_onednn; /* cpu_onednn.c */
typedef struct cpu_arena cpu_arena;   /* cpu_step.c */

typedef struct {
    backend base;           /* first member: a backend* is a cpu_backend* */
    int threads;            /* OpenMP team size of every kernel */
    cpu_dense_path dense;   /* how convolutions and linear layers compute */
    cpu_onednn *onednn;     /* its state, when dense is a oneDNN path */
    _Atomic int64_t in_use; /* bytes of tensor data and scratch owned now */
    _Atomic int64_t peak;   /* most bytes ever owned at once */
    _Atomic int64_t high_water; /* most owned at once since the last trim() */
    char description[256];
    pthread_mutex_t lock;             /* guards the fields below */
    cpu_spare spare[CPU_SPARE_SLOTS]; /* oldest first */
    int spare_count;
    size_t spare_bytes;
    cpu_arena *arenas;        /* the steps' arenas (cpu_step.c) */
    _Atomic int arena_count;  /* read without the lock: none, no search */
} cpu_backend;

/* Memory (cpu_backend.c): the in-use count behind memory(), and the kept
 * blocks given back at once. */
void sdx4_cpu_count_bytes(backend *be, int64_t delta);
void sdx4_cpu_drop_spares(cpu_backend *cb);

/* Steps (cpu_step.c): backend.h's entries, and the allocator's hooks. A
 * planned place for this allocation of the calling thread, or NULL; a
 * block from the heap, which a planning pass notes; and a free, 1 when the
 * memory was an arena's (the caller then does nothing more). */
backend_step *sdx4_cpu_step_new(backend *be);
int sdx4_cpu_step_run(backend *be, backend_step *s, int (*fn)(void *ctx), void *ctx);
void sdx4_cpu_step_free(backend *be, backend_step *s);
void *sdx4_cpu_step_place(cpu_backend *cb, size_t bytes);
void sdx4_cpu_step_traced(cpu_backend *cb, void *p, size_t bytes);
int sdx4_cpu_step_release(cpu_backend *cb, void *p);

static inline int cpu_threads(const backend *be) { return ((const cpu_backend *)be)->threads; }

/* First statement of a parallel region that calls sgemm (see above); the
 * setting is the region's own and ends with it. */
static inline void cpu_blas_one_thread(void) { omp_set_num_threads(1); }

/* C[M, N] = A[M, K] @ B where B is [K, N], or [N, K] used transposed when
 * trans_b; leading dimensions as in BLAS. Split along M or N over the
 * backend's threads, single-threaded sgemms of a bounded size each.
 * 0, or -1 with SDX4_ERR_CANCELED when the caller's cancel flag stopped it
 * (core/cancel.h: every kernel that can run long reads it between its
 * pieces of work, and fails as canceled once it is set). */
int sdx4_cpu_gemm(backend *be, int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
             int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc);

/* 64-byte aligned scratch counted by memory(); NULL with the error set. */
float *sdx4_cpu_scratch_alloc(backend *be, size_t floats);
void sdx4_cpu_scratch_free(backend *be, float *p, size_t floats);

/* A new F32 tensor; NULL with the error set (bad shape, no memory). */
tensor *sdx4_cpu_new_tensor(backend *be, int ndim, const int64_t *shape);

/* Checks that `t` is a non-NULL F32 tensor with `ndim` dimensions (0: any),
 * else sets "op: what is ..." and returns -1. The checks of how shapes fit
 * together are backend_check.h's. */
int sdx4_cpu_check(const char *op, const char *what, const tensor *t, int ndim);

/* The oneDNN path (cpu_onednn.c, in builds with SDX4_HAVE_ONEDNN). open
 * returns 0, or -1 with the error set when the path cannot run here (no
 * bfloat16 instructions: refused, never emulated); it sets the backend's
 * conv2d, conv2d_add, linear and linear_add. weight_release frees what
 * a weight's first use prepared (tensor.prepared); close frees the rest. */
int sdx4_cpu_onednn_open(backend *be, cpu_dense_path path);
void sdx4_cpu_onednn_weight_release(backend *be, tensor *w);
void sdx4_cpu_onednn_close(backend *be);
/* The bytes and the release of the backend's own memory, for
 * cpu_onednn.c's weights and scratch of any size (memory() counts them). */
void *sdx4_cpu_bytes_alloc(backend *be, size_t bytes);
void sdx4_cpu_bytes_free(backend *be, void *p, size_t bytes);

/* Kernels of the other files, with the signatures of backend.h. */
tensor *sdx4_cpu_conv2d(backend *be, const tensor *x, const tensor *w, const tensor *bias, int stride,
                   int padding);
tensor *sdx4_cpu_attention(backend *be, const tensor *q, const tensor *k, const tensor *v, int heads,
                      int causal);
tensor *sdx4_cpu_group_norm(backend *be, const tensor *x, int groups, const tensor *gamma,
                       const tensor *beta, float eps, activation act);
tensor *sdx4_cpu_layer_norm(backend *be, const tensor *x, const tensor *gamma, const tensor *beta,
                       float eps);
tensor *sdx4_cpu_activate(backend *be, const tensor *x, activation act);
tensor *sdx4_cpu_geglu(backend *be, const tensor *x);
int sdx4_cpu_add_inplace(backend *be, tensor *a, const tensor *b, float scale_b);
int sdx4_cpu_add_channel_bias_inplace(backend *be, tensor *x, const tensor *v);
int sdx4_cpu_scale_inplace(backend *be, tensor *x, float s);
int sdx4_cpu_prelu_inplace(backend *be, tensor *x, const tensor *slopes, float slope);
tensor *sdx4_cpu_concat_channels(backend *be, const tensor *a, const tensor *b);
tensor *sdx4_cpu_upsample_nearest(backend *be, const tensor *x, int h, int w);
tensor *sdx4_cpu_pixel_shuffle(backend *be, const tensor *x, int r);
tensor *sdx4_cpu_pixel_unshuffle(backend *be, const tensor *x, int r);
tensor *sdx4_cpu_nchw_to_tokens(backend *be, const tensor *x);
tensor *sdx4_cpu_tokens_to_nchw(backend *be, const tensor *x, int h, int w);

#endif
