/*
 * cuda_internal.h - what the files of the CUDA backend share.
 *
 * cuda_backend.cu builds the operation table and owns the device state:
 * the stream, the cuBLAS and cuDNN handles, the caching allocator, weights,
 * transfers, linear and embedding. cuda_conv.cu, cuda_attention.cu,
 * cuda_norm_act.cu and cuda_layout.cu hold the other operations, and
 * cuda_layout.cu also the type conversions that every file uses.
 *
 * Concurrency: backend.h lets several threads call one backend at once. All
 * work goes to one stream, so the device runs it in order anyway; the host
 * side (handles, allocator, plan cache) is guarded by one mutex that each
 * operation holds while it enqueues its kernels (cuda_lock below). Memory
 * freed by one operation is reused by the next at once: both are ordered on
 * the same stream, so no kernel can still be reading it.
 *
 * Layout: a 4-D tensor of logical shape [N, C, H, W] (an image, or a
 * convolution's weights [O, C, k, k]) is stored channels-last, as
 * [N, H, W, C]: cuDNN's tensor-core convolutions work on that layout
 * without transposing, a 1x1 convolution is one GEMM, and the token view
 * [N, H*W, C] of the transformer blocks is the same memory. upload(),
 * download() and weight() transpose from and to PyTorch's NCHW; operations
 * that depend on the layout (conv2d, group_norm, concat_channels,
 * upsample_nearest, add_channel_bias, the token views) read and write
 * channels-last; elementwise ones do not care; those that work on the last
 * dimension (linear, layer_norm, geglu) refuse 4-D tensors, whose last
 * stored dimension is not W. Tensors of other ranks are row-major.
 *
 * Types: a tensor is DTYPE_F32, DTYPE_F16 or DTYPE_BF16 (activations of
 * the VAE decode, which needs float's range). An operation computes in the
 * type of its main input and converts the other operands to it when they
 * differ (cuda_data_as), so F32 activations may meet F16 weights.
 */
#ifndef SDX4_CUDA_INTERNAL_H
#define SDX4_CUDA_INTERNAL_H

/* the C headers first, so that backend.h's includes of them inside the
 * extern "C" block below are no-ops */
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "sdx4.h" /* C++ includes (<atomic>) cannot go inside extern "C" */

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#ifdef SDX4_HAVE_CUDNN
#include <cudnn.h>
#endif

extern "C" {
#include "backend/backend.h"
#include "core/memplan.h"
#include "core/error.h"
#include "core/plan_cache.h"
}
#include "backend/backend_check.h"

/* Free lists of the caching allocator: one per size class (see
 * cuda_backend.cu), enough classes for blocks up to 2^48 bytes. */
#define CUDA_SIZE_CLASSES 512

typedef struct cuda_block {
    void *ptr;
    struct cuda_block *next;
} cuda_block;

typedef struct cuda_arena cuda_arena;

/* Scratch device memory from the caching allocator, counted by memory(),
 * or a piece of a recording's arena (counted with the arena). */
typedef struct {
    void *ptr;
    size_t bytes;      /* the size class, not the size asked for */
    cuda_arena *arena; /* the arena `ptr` lies in, or NULL */
} cuda_buf;

/* The pinned staging buffer of upload() and download(). */
#define CUDA_PINNED_BYTES ((size_t)8 << 20)

/* cuBLASLt's workspace: NVIDIA advises 32 MiB on Hopper. */
#define CUDA_GEMM_WORKSPACE ((size_t)32 << 20)

/* A recorded step (cuda_graph.cu): the instantiated CUDA graph and the
 * free lists of the blocks its operations freed while being recorded,
 * which stay reserved for its replays. */
struct backend_graph {
    cudaGraphExec_t exec;
    cuda_block *cache[CUDA_SIZE_CLASSES];
    cuda_arena *arena; /* laid out by a planning pass, or NULL */
    int profiled_first, profiled_count; /* its operations' events (cuda_profile.cu) */
};

/* One exact device block holding every buffer of a recording at the place
 * its plan gave (cuda_graph.cu). It lives while the graph or any buffer in
 * it does: the tensors a recording returns may outlive the graph. */
struct cuda_arena {
    void *ptr;
    size_t bytes;
    memplan *plan;
    int refs; /* the graph, and each live buffer in the arena */
};

/* A thread's planning pass (cuda_graph.cu): the trace it is taking, or
 * the plan it finished for its next recording. Several workers may plan
 * on one backend at once, each in a slot of its own. */
#define CUDA_PLAN_SLOTS 8
typedef struct {
    pthread_t thread;
    memplan *tracing, *planned; /* both NULL: the slot is free */
} cuda_plan_slot;

typedef struct conv_plan conv_plan;       /* cuda_conv.cu */
typedef struct gemm_plan gemm_plan;       /* cuda_gemm.cu */
typedef struct cuda_profile cuda_profile; /* cuda_profile.cu */

typedef struct {
    backend base;            /* first member: a backend* is a cuda_backend* */
    int device;
    cudaStream_t stream;     /* every kernel, copy and library call */
    cublasHandle_t cublas;
    cublasLtHandle_t cublaslt;
    gemm_plan *gemm_plans;   /* cuBLASLt algorithm per GEMM shape */
    plan_cache *choices;     /* the plans' choices on file, or NULL (below) */
#ifdef SDX4_HAVE_CUDNN
    cudnnHandle_t cudnn;
    conv_path conv;          /* which convolutions (backend.h) */
    conv_plan *plans;        /* cuDNN algorithm per convolution shape */
#endif
    dtype mode;              /* F16 or F32: the weights' type, and the
                                activations' unless a thread set another */
    int allow_tf32;          /* F32 GEMMs and convolutions may use TF32 */
    int allow_bf16;          /* BF16 activations when asked for (else F32) */
    int use_graphs;          /* steps are recorded (cuda_graph.cu) */
    int use_plans;           /* and planned first */
    backend_graph *recording; /* the graph being captured, or NULL */
    cuda_plan_slot memory_plans[CUDA_PLAN_SLOTS];
    int tracing_threads;      /* slots tracing now (0: the allocator need not look) */
    pthread_mutex_t lock;    /* recursive: record_begin holds it until record_end */
    cuda_block *cache[CUDA_SIZE_CLASSES]; /* free device blocks by class */
    int64_t in_use, peak;    /* bytes of live tensors, weights and scratch */
    int64_t reserved, reserved_peak; /* bytes from cudaMalloc, cached ones too */
    cuda_buf gemm_workspace; /* cuBLASLt's, for the backend's lifetime */
    cuda_buf group_counters; /* CUDA_GROUP_COUNTERS zeros (cuda_norm_act.cu) */
    int sms;                 /* the device's multiprocessors */
    int smem_per_block;      /* shared memory a block may opt in to, bytes */
    void *pinned;            /* CUDA_PINNED_BYTES of page-locked host memory */
    cudaEvent_t pinned_free; /* recorded after each copy out of `pinned` */
    cuda_profile *profile;   /* GPU time per operation, or NULL */
    char description[192];
} cuda_backend;

/* Holds the backend's lock while an operation enqueues its work, and makes
 * the backend's device current on the calling thread; false if that fails
 * (the error is set). An operation that names itself (`op`) is timed when
 * profiling is on. */
struct cuda_lock {
    cuda_backend *cb;
    bool ok;
    explicit cuda_lock(const backend *be, const char *op = NULL);
    ~cuda_lock();
    explicit operator bool() const { return ok; }
};


int cuda_buf_alloc(cuda_backend *cb, cuda_buf *b, size_t bytes);
void cuda_buf_free(cuda_backend *cb, cuda_buf *b);
/* Moves the blocks of `lists` (free lists by size class) to the cache. */
void cuda_cache_adopt(cuda_backend *cb, cuda_block **lists);
/* An arena laid out by `plan` (which it takes, also when it fails: NULL
 * with the error set) and one reference to it; the last release frees it.
 * The cache's idle blocks go back to the driver first: they are what the
 * planned steps left, and the arena replaces them. Lock held. */
cuda_arena *cuda_arena_new(cuda_backend *cb, memplan *plan);
void cuda_arena_release(cuda_backend *cb, cuda_arena *a);

/* --- cuda_graph.cu: backend.h's steps, recorded as CUDA graphs -------- */
backend_step *cuda_step_new(backend *be);
int cuda_step_run(backend *be, backend_step *s, int (*fn)(void *ctx), void *ctx);
void cuda_step_free(backend *be, backend_step *s);
/* The calling thread's slot (a free one made its own if `make`), or NULL.
 * Lock held. */
cuda_plan_slot *cuda_memory_plan_slot(cuda_backend *cb, bool make);
/* Frees what a slot holds. Lock held. */
void cuda_memory_plan_clear(cuda_backend *cb, cuda_plan_slot *s);

/* The type new activations get on this thread. */
dtype cuda_activation_type(const cuda_backend *cb);
/* A new uninitialised tensor of `type`; NULL with the error set. */
tensor *cuda_tensor_new(cuda_backend *cb, int ndim, const int64_t *shape, dtype type);
/* Frees a tensor of this backend; the lock must be held. */
void cuda_tensor_release(cuda_backend *cb, tensor *t);

/* t's elements as `type`: t's own memory, or a converted copy that `tmp`
 * holds until cuda_buf_free(tmp). NULL with the error set. */
const void *cuda_data_as(cuda_backend *cb, const tensor *t, dtype type, cuda_buf *tmp);

/* Checks that `t` is a tensor of this backend, F32 or F16, with `ndim`
 * dimensions (0: any); else sets "op: what is ..." and returns -1. The
 * checks of how shapes fit together are backend_check.h's. */
int cuda_check(const cuda_backend *cb, const char *op, const char *what, const tensor *t,
               int ndim);

/* Whether tensors of this backend may hold type t (see Types above). */
static inline bool cuda_storable(dtype t) {
    return t == DTYPE_F32 || t == DTYPE_F16 || t == DTYPE_BF16;
}

/* -1 with the error set if t is 4-D (see Layout above), else 0. */
int cuda_refuse_image(const char *op, const tensor *t);

/* 0 on success, else -1 with "what: <library message>" set. */
int cuda_ok(cudaError_t e, const char *what);
int cublas_ok(cublasStatus_t s, const char *what);
/* The status of the kernel launched last on this thread. */
static inline int cuda_launched(const char *what) { return cuda_ok(cudaGetLastError(), what); }
/* A status ignored on purpose (a release, a wait before one): its error is
 * taken from the runtime's last error as cuda_ok takes it, so that it does
 * not surface as the next launch's. */
static inline void cuda_ignore(cudaError_t e) {
    if (e != cudaSuccess) (void)cudaGetLastError();
}

/* The mean GPU time in ms of three runs of run() (which returns 0 on
 * success) after an untimed one, on the backend's stream (it waits for
 * it: never while recording); -1 if a run fails, with the error cleared
 * (a trial that fails only means that way is not taken). */
template <typename F> static inline float cuda_time_runs(cuda_backend *cb, F run) {
    cudaEvent_t e0 = NULL, e1 = NULL;
    float ms = -1.0f;
    if (cudaEventCreate(&e0) == cudaSuccess && cudaEventCreate(&e1) == cudaSuccess &&
        run() == 0 && cudaEventRecord(e0, cb->stream) == cudaSuccess) {
        bool ok = true;
        for (int i = 0; ok && i < 3; i++) ok = run() == 0;
        if (ok && cudaEventRecord(e1, cb->stream) == cudaSuccess &&
            cudaEventSynchronize(e1) == cudaSuccess &&
            cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess)
            ms /= 3;
        else
            ms = -1.0f;
    }
    if (e0) (void)cudaEventDestroy(e0);
    if (e1) (void)cudaEventDestroy(e1);
    (void)cudaGetLastError();
    sdx4_error_clear();
    return ms;
}

/* --- the plan cache: choices made by timing, kept across processes ---- */
/* The conv and GEMM plans look their choices up in cb->choices (see
 * core/plan_cache.h) before timing, and store what they timed; a cached
 * choice that no longer builds or runs is timed again and replaced. The
 * device key names everything a choice depends on besides the shape: the
 * GPU (UUID), its driver, the CUDA runtime, cuDNN and cuBLASLt, and
 * CUDA_PLAN_RECORDS, the layout of the values below, raised whenever one
 * changes. Saved when a download finds new choices (the end of an upscale,
 * so a server's warm-up leaves them on disk) and at destroy. */
#define CUDA_PLAN_RECORDS 1
/* The cached value of `key` if it is exactly `len` bytes (values are
 * fixed-size records), else NULL; and storing one. Both do nothing without
 * a cache. */
const void *cuda_choice_get(cuda_backend *cb, const char *key, size_t len);
void cuda_choice_put(cuda_backend *cb, const char *key, const void *value, size_t len);

/* --- cuda_gemm.cu --------------------------------------------------- */
/* C[m, n] = op(A) op(B) (+ bias[i] on row i) (+ R[m, n]), bias and R
 * may be NULL (R, if given, laid out as C, ldc == m), column-major as
 * cuBLAS, all of `type`, accumulated in float. */
int cuda_gemm(cuda_backend *cb, dtype type, cublasOperation_t ta, cublasOperation_t tb, int m,
              int n, int k, const void *A, int lda, const void *B, int ldb, const void *bias,
              const void *R, void *C, int ldc);
/* a[i] += b[i] * scale for n elements of `type` (the residual connections). */
int cuda_add(cuda_backend *cb, dtype type, void *a, const void *b, int64_t n, float scale);
void cuda_gemm_plans_free(cuda_backend *cb);

/* --- cuda_profile.cu: GPU time per operation (see there) ------------- */
/* An empty profile; NULL on out of memory (then nothing is profiled). */
cuda_profile *cuda_profile_create(void);
void cuda_profile_begin(cuda_profile *p, cudaStream_t stream, const char *op, int64_t in_use,
                        bool recording);
/* Appends to the running operation's key, printf-style; no-op when off. */
void cuda_profile_label(cuda_profile *p, const char *fmt, ...);
void cuda_profile_end(cuda_profile *p, cudaStream_t stream, int64_t peak);
/* How many operations have been recorded into graphs so far (0 when off):
 * a graph's are those between its record_begin and record_end. */
int cuda_profile_recorded(const cuda_profile *p);
/* A graph holding recorded operations [first, first + count) was launched. */
void cuda_profile_replayed(cuda_profile *p, int first, int count);
/* Reads the finished operations' events (waits for them). */
void cuda_profile_collect(cuda_profile *p);
/* Prints the table to stderr and frees; NULL is fine. */
void cuda_profile_destroy(cuda_profile *p);

/* --- cuda_layout.cu: conversions and copies used by every file -------- */
/* dst[i] = src[i] for n elements, of F32, F16 or BF16. */
int cuda_convert(cuda_backend *cb, const void *src, dtype src_type, void *dst, dtype dst_type,
                 int64_t n);
/* y[o, c, i] = bias[c] for y [outer, channels, inner]: a GEMM or
 * convolution with beta = 1 then adds the bias before rounding once. */
int cuda_fill_bias(cuda_backend *cb, void *y, const void *bias, dtype type, int64_t outer,
                   int64_t channels, int64_t inner);
/* dst[r][c] = src[r][c] for c < src_c, else 0, for c < dst_c: rows of
 * channels widened with zeros or narrowed. */
int cuda_copy_channels(cuda_backend *cb, dtype type, const void *src, int64_t src_c, void *dst,
                       int64_t dst_c, int64_t rows);
/* max |a - b| / max |b| over n values of `type` (waits for the stream:
 * a self-check, never while recording); infinite where either has a NaN
 * or an infinity, -1 with the error set on failure. */
float cuda_relative_difference(cuda_backend *cb, dtype type, const void *a, const void *b,
                               int64_t n);
/* out[i, :] = table[ids[i], :] with ids in device memory. */
int cuda_gather_rows(cuda_backend *cb, const void *table, dtype table_type, const int32_t *ids,
                     int n, int64_t cols, void *out, dtype out_type);
/* dst[b][c][r] = src[b][r][c] for `batches` rows x cols matrices, src
 * and dst F32, F16 or BF16: NCHW <-> channels-last is rows C, cols
 * H*W and back. */
int cuda_transpose(cuda_backend *cb, const void *src, dtype src_type, void *dst, dtype dst_type,
                   int64_t batches, int64_t rows, int64_t cols);
/* col[p][(ky*k + kx)*C + c] for the output pixels p in [p0, p0 + P) of the
 * channels-last image x [H, W, C] (cuda_conv.cu's fallback). */
int cuda_im2col(cuda_backend *cb, dtype type, const void *x, int64_t C, int64_t H, int64_t W,
                int k, int stride, int pad, int64_t Wo, int64_t p0, int64_t P, void *col);

/* --- the operations of the other files, with backend.h's signatures --- */
tensor *cuda_conv2d(backend *be, const tensor *x, const tensor *w, const tensor *bias, int stride,
                    int padding);
int cuda_relayout_tokens(backend *be, tensor *x, int h, int w);
tensor *cuda_group_norm_add(backend *be, const tensor *x, const tensor *v, int groups,
                            const tensor *gamma, const tensor *beta, float eps, activation act);
tensor *cuda_conv2d_add(backend *be, const tensor *x, const tensor *w, const tensor *bias,
                        int stride, int padding, const tensor *r);
#ifdef SDX4_HAVE_CUDNN
void cuda_conv_plans_free(cuda_backend *cb);

/* --- cuda_conv_graph.cu: convolutions through cuDNN's graph API ------- */
#define CONV_GRAPH_WORKSPACE_LIMIT ((int64_t)64 << 20) /* the peak-memory goal */
typedef struct conv_graph conv_graph;
/* The fastest graph-API plan for y = conv(x, w) (+ bias[c]) (+ r) on
 * channels-last half or bfloat16 tensors (dims [N, C, H, W], weights
 * [O, C, k, k]), timed on the tensors given (y is overwritten), its time
 * in *ms; NULL where the graph API has none (no error set). */
conv_graph *conv_graph_plan(cuda_backend *cb, dtype type, const int64_t xdims[4],
                            const int64_t wdims[4], const int64_t ydims[4], int stride, int pad,
                            const void *x, const void *w, const void *bias, const void *r,
                            void *y, float *ms);
/* What a plan is, for the plan cache: conv_graph_build makes the same plan
 * again from it. taken 0 is the record of a shape where the legacy call
 * won (or the graph API had nothing). */
#define GRAPH_KNOBS 48 /* one choice per knob type at most (44 in cuDNN 9.19) */
typedef struct {
    int64_t taken;
    int64_t engine;               /* CUDNN_ATTR_ENGINE_GLOBAL_INDEX */
    int64_t knobs;                /* choices in knob[] */
    int64_t knob[GRAPH_KNOBS][2]; /* knob type, value */
} conv_graph_choice;
/* Describes g's engine configuration; false if cuDNN will not say. */
bool conv_graph_describe(const conv_graph *g, conv_graph_choice *c);
/* The plan of choice `c` for these operands, built without timing; NULL
 * (no error set) where it no longer builds or its numerics are not
 * allowed. */
conv_graph *conv_graph_build(cuda_backend *cb, dtype type, const int64_t xdims[4],
                             const int64_t wdims[4], const int64_t ydims[4], int stride, int pad,
                             bool bias, bool r, const conv_graph_choice *c);
/* Runs a plan on tensors of its shape, with the operands it was made for. */
int conv_graph_run(cuda_backend *cb, const conv_graph *g, const void *x, const void *w,
                   const void *bias, const void *r, void *y);
void conv_graph_free(conv_graph *g);
#endif
tensor *cuda_attention(backend *be, const tensor *q, const tensor *k, const tensor *v, int heads,
                       int causal);
tensor *cuda_group_norm(backend *be, const tensor *x, int groups, const tensor *gamma,
                        const tensor *beta, float eps, activation act);
tensor *cuda_layer_norm(backend *be, const tensor *x, const tensor *gamma, const tensor *beta,
                        float eps);
tensor *cuda_activate(backend *be, const tensor *x, activation act);
tensor *cuda_geglu(backend *be, const tensor *x);
int cuda_add_inplace(backend *be, tensor *a, const tensor *b, float scale_b);
int cuda_add_channel_bias_inplace(backend *be, tensor *x, const tensor *v);
int cuda_scale_inplace(backend *be, tensor *x, float s);
int cuda_prelu_inplace(backend *be, tensor *x, const tensor *slopes, float slope);
tensor *cuda_concat_channels(backend *be, const tensor *a, const tensor *b);
tensor *cuda_upsample_nearest(backend *be, const tensor *x, int h, int w);
tensor *cuda_pixel_shuffle(backend *be, const tensor *x, int r);
tensor *cuda_pixel_unshuffle(backend *be, const tensor *x, int r);
tensor *cuda_nchw_to_tokens(backend *be, const tensor *x);
tensor *cuda_tokens_to_nchw(backend *be, const tensor *x, int h, int w);

/* --- device helpers ---------------------------------------------------- */

/* Kernels compute in float whatever they load and store. */
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) {
    return __float2half_rn(x); /* round to nearest even, as torch's .half() */
}
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

/* Runs the statements after `T` with T the element type of the tensor
 * type `type` (F16: __half, BF16: __nv_bfloat16, else float): one
 * template instance per type, as in
 *     CUDA_DISPATCH(x->type, T, kernel<<<blocks, threads, 0, s>>>((T *)x->data, n));
 * (variadic, so that the launch's commas need no parentheses). */
#define CUDA_DISPATCH(type, T, ...)                                                  \
    do {                                                                           \
        switch (type) {                                                            \
        case DTYPE_F16: { typedef __half T; __VA_ARGS__; } break;                  \
        case DTYPE_BF16: { typedef __nv_bfloat16 T; __VA_ARGS__; } break;          \
        default: { typedef float T; __VA_ARGS__; } break;                          \
        }                                                                          \
    } while (0)

/* Threads per block of the elementwise kernels, and the most blocks they
 * launch (their loops stride over the rest). */
#define CUDA_THREADS 256
/* Images a group norm may have: one block counter each, for the kernel
 * that merges the statistics when the last block of an image is done. */
#define CUDA_GROUP_COUNTERS 1024
#define CUDA_MAX_BLOCKS 65536

/* A grid-stride loop of i over [0, n). */
#define FOR_EACH(i, n)                                                           \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); \
         i += (int64_t)gridDim.x * blockDim.x)

static inline unsigned cuda_blocks(int64_t n) {
    int64_t b = (n + CUDA_THREADS - 1) / CUDA_THREADS;
    return (unsigned)(b < CUDA_MAX_BLOCKS ? (b > 0 ? b : 1) : CUDA_MAX_BLOCKS);
}

#endif
