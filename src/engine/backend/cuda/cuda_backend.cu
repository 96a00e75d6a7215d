/*
 * cuda_backend.cu - the CUDA backend: tensors in device memory, dense
 * algebra through cuBLAS (and cuDNN for convolutions when the build found
 * it), everything else in the kernels of the other files of this folder.
 *
 * Settings (cuda_settings, backend.h: the engine's open options, which the
 * CLI and the server fill from SDX4_CUDA_* variables and flags). Precision:
 * the mode picks one of two ways to compute:
 *   fp16 (default)  weights are stored as half; activations are half unless
 *                   a thread asks for float or bfloat16
 *                   (set_activation_type(): the pipeline asks for
 *                   bfloat16, float's range at half the memory and twice
 *                   the tensor-core speed, for the VAE decoder, which
 *                   overflows in half; allow_bf16 off gives it float
 *                   instead). Every product and reduction accumulates in
 *                   float; float activations may use TF32 tensor cores,
 *                   as PyTorch's convolutions do by default.
 *   fp32            weights and activations are float, and no TF32: the
 *                   results match the CPU backend's within float rounding,
 *                   which is how the golden tests check this backend.
 * use_graphs off leaves the steps unrecorded (cuda_graph.cu), so that
 * every step runs operation by operation, for comparison; use_plans off
 * leaves the planning pass untraced, so that recordings take their memory
 * from the cache as they did before arenas. conv CONV_IM2COL makes convolutions
 * use the im2col + GEMM path even when cuDNN is there (the fallback of
 * builds without cuDNN), so that path can be tested on the same machine;
 * CONV_CUDNN_GRAPH keeps every half-precision plan of cuDNN's graph API
 * that computes what the legacy call does, faster or not, so that its path
 * can be tested too; CONV_CUDNN_LEGACY leaves the graph API out: the first
 * run of a new size then tries a few algorithms per shape instead of up to
 * 8 more plans, and later runs are slower (BENCHMARKS.md). profile turns
 * on cuda_profile.cu. plan_cache names the file where the choices timed
 * per shape are kept for the next process (cuda_internal.h, below).
 *
 * This file holds what every operation needs and the operations that are
 * one library call each:
 *   - memory: a caching allocator. Activations come and go thousands of
 *     times per UNet step, and cudaMalloc/cudaFree synchronise the device,
 *     so freed blocks go to a free list per size class (512-byte steps up to
 *     64 KiB, then eight classes per power of two, so at most 12.5% is
 *     wasted) and the next request of that class takes one back. When
 *     cudaMalloc fails, the cached blocks are returned to the driver and the
 *     request is tried once more. Weights, allocated once, get exact
 *     cudaMalloc blocks. While a planning pass traces a thread
 *     (plan_begin), every block it takes and gives back is noted; the
 *     recording that follows takes its blocks from one exact arena at the
 *     places the plan gave them (cuda_graph.cu). memory() counts the bytes
 *     of live tensors, weights, scratch and arenas (not the cached free
 *     blocks), like PyTorch's memory_allocated.
 *   - weights: uploaded once, converted on the device to the mode's type
 *     (F16 files are copied as they are in fp16 mode); weight() waits for
 *     its copy, so the caller frees the host bytes at once (model load).
 *   - transfers: upload() and download() take and give host float32 and
 *     convert (and transpose, cuda_internal.h) on the device; download()
 *     waits for the stream, and is the only transfer that does. Transfers
 *     up to CUDA_PINNED_BYTES (a UNet step's input and output) go through
 *     a pinned host buffer.
 *   - linear: one GEMM (cuda_gemm.cu), the bias added in its epilogue.
 *   - embedding: the ids are copied to the device and the rows gathered.
 */
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"

/* ----------------------------------------------------------------- errors */

int cuda_ok(cudaError_t e, const char *what) {
    if (e == cudaSuccess) return 0;
    /* the runtime keeps it as the thread's last error too: taken, so that
     * the next launch's check (cuda_launched) does not report it again */
    (void)cudaGetLastError();
    sdx4_set_error(e == cudaErrorMemoryAllocation ? SDX4_ERR_NO_MEMORY : SDX4_ERR_DEVICE, "%s: %s",
              what, cudaGetErrorString(e));
    return -1;
}

int cublas_ok(cublasStatus_t s, const char *what) {
    if (s == CUBLAS_STATUS_SUCCESS) return 0;
    sdx4_set_error(s == CUBLAS_STATUS_ALLOC_FAILED ? SDX4_ERR_NO_MEMORY : SDX4_ERR_DEVICE, "%s: %s",
              what, cublasGetStatusString(s));
    return -1;
}

cuda_lock::cuda_lock(const backend *be, const char *op) : cb((cuda_backend *)be), ok(false) {
    pthread_mutex_lock(&cb->lock);
    ok = cuda_ok(cudaSetDevice(cb->device), "cuda: cudaSetDevice") == 0;
    if (ok && op && cb->profile)
        cuda_profile_begin(cb->profile, cb->stream, op, cb->in_use, cb->recording != NULL);
}

cuda_lock::~cuda_lock() {
    if (cb->profile) cuda_profile_end(cb->profile, cb->stream, cb->peak);
    pthread_mutex_unlock(&cb->lock);
}

/* ----------------------------------------------------------------- memory */

static void count_bytes(cuda_backend *cb, int64_t delta) {
    cb->in_use += delta;
    if (cb->in_use > cb->peak) cb->peak = cb->in_use;
}

/* The free list of a request and the bytes it gets (see the top comment). */
static int size_class(size_t bytes, size_t *rounded) {
    if (bytes <= 65536) {
        size_t n = bytes ? (bytes + 511) / 512 : 1;
        *rounded = n * 512;
        return (int)n - 1; /* 0..127 */
    }
    int k = 63 - __builtin_clzll((unsigned long long)(bytes - 1)); /* 2^k < bytes <= 2^(k+1) */
    size_t step = (size_t)1 << (k - 3);
    *rounded = (bytes + step - 1) / step * step;
    return 128 + (k - 16) * 8 + (int)((*rounded - ((size_t)1 << k)) / step) - 1;
}

#define MAX_BLOCK_BYTES ((size_t)1 << 48) /* the last size class */

/* The bytes of the blocks of size class c (the inverse of size_class). */
static size_t class_bytes(int c) {
    if (c < 128) return (size_t)(c + 1) * 512;
    int k = 16 + (c - 128) / 8;
    return ((size_t)1 << k) + (size_t)((c - 128) % 8 + 1) * ((size_t)1 << (k - 3));
}

/* cudaFree, and the driver's count; cudaFree waits for the device, so no
 * kernel still uses the block. */
static void device_free(cuda_backend *cb, void *ptr, size_t bytes) {
    cuda_ignore(cudaFree(ptr)); /* a failure leaves nothing to undo */
    cb->reserved -= (int64_t)bytes;
}

/* Gives every cached block back to the driver. */
static void release_cache(cuda_backend *cb) {
    for (int c = 0; c < CUDA_SIZE_CLASSES; c++) {
        while (cb->cache[c]) {
            cuda_block *b = cb->cache[c];
            cb->cache[c] = b->next;
            device_free(cb, b->ptr, class_bytes(c));
            free(b);
        }
    }
}

/* cudaMalloc, retried once after emptying the cache. */
static int device_malloc(cuda_backend *cb, void **ptr, size_t bytes) {
    cudaError_t e = cudaMalloc(ptr, bytes);
    if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError(); /* clears the error: it is not sticky */
        release_cache(cb);
        e = cudaMalloc(ptr, bytes);
    }
    if (e == cudaSuccess) {
        cb->reserved += (int64_t)bytes;
        if (cb->reserved > cb->reserved_peak) cb->reserved_peak = cb->reserved;
        return 0;
    }
    (void)cudaGetLastError();
    *ptr = NULL;
    sdx4_set_error(e == cudaErrorMemoryAllocation ? SDX4_ERR_NO_MEMORY : SDX4_ERR_DEVICE,
              "cuda: cannot allocate %.1f MiB of device memory: %s", (double)bytes / 1048576.0,
              cudaGetErrorString(e));
    return -1;
}

/* The trace of the calling thread's allocations, or NULL. */
static memplan *trace_here(cuda_backend *cb) {
    if (!cb->tracing_threads) return NULL;
    cuda_plan_slot *s = cuda_memory_plan_slot(cb, false);
    return s ? s->tracing : NULL;
}

int cuda_buf_alloc(cuda_backend *cb, cuda_buf *b, size_t bytes) {
    b->ptr = NULL;
    b->bytes = 0;
    b->arena = NULL;
    if (bytes > MAX_BLOCK_BYTES) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "cuda: cannot allocate %zu bytes", bytes);
        return -1;
    }
    /* while recording, the place the planning pass gave it */
    cuda_arena *a = cb->recording ? cb->recording->arena : NULL;
    int64_t offset = a ? sdx4_memplan_follow_alloc(a->plan, bytes) : -1;
    if (offset >= 0) {
        b->ptr = (char *)a->ptr + offset;
        b->bytes = bytes;
        b->arena = a;
        a->refs++;
        return 0;
    }
    size_t rounded;
    int c = size_class(bytes, &rounded);
    /* while recording, the recording's own blocks first */
    cuda_block **list = cb->recording && cb->recording->cache[c] ? &cb->recording->cache[c]
                                                                  : &cb->cache[c];
    if (*list) {
        cuda_block *blk = *list;
        *list = blk->next;
        b->ptr = blk->ptr;
        free(blk);
    } else if (device_malloc(cb, &b->ptr, rounded)) {
        return -1;
    }
    b->bytes = rounded;
    count_bytes(cb, (int64_t)rounded);
    /* out of host memory spoils the trace: the recording goes unplanned */
    memplan *trace = trace_here(cb);
    if (trace) (void)sdx4_memplan_note_alloc(trace, b->ptr, bytes);
    return 0;
}

void cuda_buf_free(cuda_backend *cb, cuda_buf *b) {
    if (!b->ptr) return;
    if (b->arena) {
        cuda_arena *a = b->arena;
        if (cb->recording && cb->recording->arena == a)
            sdx4_memplan_follow_free(a->plan, (char *)b->ptr - (char *)a->ptr);
        b->ptr = NULL;
        b->bytes = 0;
        b->arena = NULL;
        cuda_arena_release(cb, a);
        return;
    }
    memplan *trace = trace_here(cb);
    if (trace) sdx4_memplan_note_free(trace, b->ptr);
    size_t rounded;
    int c = size_class(b->bytes, &rounded);
    cuda_block *blk = (cuda_block *)malloc(sizeof *blk);
    /* freed while recording: reserved for the recording's replays */
    cuda_block **list = cb->recording ? &cb->recording->cache[c] : &cb->cache[c];
    if (blk) {
        blk->ptr = b->ptr;
        blk->next = *list;
        *list = blk;
    } else {
        device_free(cb, b->ptr, b->bytes); /* no host memory for the free list */
    }
    count_bytes(cb, -(int64_t)b->bytes);
    b->ptr = NULL;
    b->bytes = 0;
}

cuda_arena *cuda_arena_new(cuda_backend *cb, memplan *plan) {
    cuda_arena *a = (cuda_arena *)calloc(1, sizeof *a);
    size_t bytes = sdx4_memplan_arena_bytes(plan);
    release_cache(cb);
    /* exact: a size class would round hundreds of MiB up by up to 1/8 */
    if (!a || device_malloc(cb, &a->ptr, bytes)) {
        free(a);
        sdx4_memplan_free(plan);
        return NULL;
    }
    a->bytes = bytes;
    a->plan = plan;
    a->refs = 1;
    count_bytes(cb, (int64_t)bytes);
    return a;
}

void cuda_arena_release(cuda_backend *cb, cuda_arena *a) {
    if (!a || --a->refs > 0) return;
    device_free(cb, a->ptr, a->bytes); /* after any replay that still writes it */
    count_bytes(cb, -(int64_t)a->bytes);
    sdx4_memplan_free(a->plan);
    free(a);
}

void cuda_cache_adopt(cuda_backend *cb, cuda_block **lists) {
    for (int c = 0; c < CUDA_SIZE_CLASSES; c++) {
        while (lists[c]) {
            cuda_block *blk = lists[c];
            lists[c] = blk->next;
            blk->next = cb->cache[c];
            cb->cache[c] = blk;
        }
    }
}

/* ---------------------------------------------------------------- tensors */

typedef struct {
    tensor t;           /* first member: a tensor* is a cuda_tensor* */
    cuda_buf mem;       /* activations: a block of the cache */
    size_t weight_bytes; /* weights: an exact cudaMalloc block (else 0) */
} cuda_tensor;

static cuda_tensor *tensor_header(cuda_backend *cb, int ndim, const int64_t *shape, dtype type) {
    cuda_tensor *ct = (cuda_tensor *)calloc(1, sizeof *ct);
    if (!ct) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "cuda backend: cannot allocate a tensor");
        return NULL;
    }
    ct->t.be = &cb->base;
    ct->t.ndim = ndim;
    for (int i = 0; i < ndim; i++) ct->t.shape[i] = shape[i];
    ct->t.type = type;
    ct->t.owns_data = 1;
    return ct;
}

tensor *cuda_tensor_new(cuda_backend *cb, int ndim, const int64_t *shape, dtype type) {
    int64_t n = sdx4_check_shape("new_tensor", ndim, shape);
    if (n < 0) return NULL;
    cuda_tensor *ct = tensor_header(cb, ndim, shape, type);
    if (!ct) return NULL;
    if (cuda_buf_alloc(cb, &ct->mem, (size_t)n * dtype_size(type))) {
        free(ct);
        return NULL;
    }
    ct->t.data = ct->mem.ptr;
    return &ct->t;
}

void cuda_tensor_release(cuda_backend *cb, tensor *t) {
    if (!t) return;
    cuda_tensor *ct = (cuda_tensor *)t;
    if (ct->weight_bytes) {
        device_free(cb, t->data, ct->weight_bytes);
        count_bytes(cb, -(int64_t)ct->weight_bytes);
    } else {
        cuda_buf_free(cb, &ct->mem);
    }
    free(ct);
}

/* The activation type a thread chose with set_activation_type(). */
static thread_local const cuda_backend *precision_owner;
static thread_local dtype precision_type;

dtype cuda_activation_type(const cuda_backend *cb) {
    return precision_owner == cb ? precision_type : cb->mode;
}

static dtype cuda_set_activation_type(backend *be, dtype activations) {
    if (!be || !be->name || strcmp(be->name, "cuda")) return DTYPE_F32;
    const cuda_backend *cb = (const cuda_backend *)be;
    dtype previous = cuda_activation_type(cb);
    /* fp32 mode never lowers precision; SDX4_CUDA_VAE=fp32 keeps float
     * where float's range is asked for */
    if (activations == DTYPE_BF16 && !cb->allow_bf16) activations = DTYPE_F32;
    if (activations != DTYPE_F32 && cb->mode == DTYPE_F32) activations = DTYPE_F32;
    if (cuda_storable(activations)) {
        precision_owner = cb;
        precision_type = activations;
    }
    return previous;
}

static tensor *cuda_new_tensor(backend *be, int ndim, const int64_t *shape) {
    cuda_lock lock(be);
    if (!lock) return NULL;
    return cuda_tensor_new(lock.cb, ndim, shape, cuda_activation_type(lock.cb));
}

static void cuda_free_tensor(backend *be, tensor *t) {
    if (!t) return;
    cuda_lock lock(be); /* host memory is freed even if the device is gone */
    cuda_tensor_release(lock.cb, t);
}

const void *cuda_data_as(cuda_backend *cb, const tensor *t, dtype type, cuda_buf *tmp) {
    tmp->ptr = NULL;
    tmp->bytes = 0;
    if (t->type == type) return t->data;
    int64_t n = tensor_numel(t);
    if (cuda_buf_alloc(cb, tmp, (size_t)n * dtype_size(type))) return NULL;
    if (cuda_convert(cb, t->data, t->type, tmp->ptr, type, n)) {
        cuda_buf_free(cb, tmp);
        return NULL;
    }
    return tmp->ptr;
}

/* ----------------------------------------------------------------- layout */

/* Writes `src`, NCHW values of type `type` in device memory, into the 4-D
 * tensor t, channels-last and in t's type. */
static int to_channels_last(cuda_backend *cb, const void *src, dtype type, tensor *t) {
    return cuda_transpose(cb, src, type, t->data, t->type, t->shape[0], t->shape[1],
                          t->shape[2] * t->shape[3]);
}

int cuda_refuse_image(const char *op, const tensor *t) {
    if (t->ndim != 4) return 0;
    sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
              "%s: 4-D tensors are stored channels-last on cuda, their last dimension is not "
              "contiguous",
              op);
    return -1;
}

/* ---------------------------------------------------------------- weights */

static tensor *cuda_weight(backend *be, const void *data, dtype type, int ndim,
                           const int64_t *shape) {
    cuda_lock lock(be);
    if (!lock) return NULL;
    cuda_backend *cb = lock.cb;
    int64_t n = sdx4_check_weight(data, type, ndim, shape);
    if (n < 0) return NULL;
    dtype stored = cb->mode;
    size_t bytes = (size_t)n * dtype_size(stored), file_bytes = (size_t)n * dtype_size(type);
    cuda_buf staging = {};
    cuda_tensor *ct = tensor_header(cb, ndim, shape, stored);
    if (!ct) return NULL;
    if (device_malloc(cb, &ct->t.data, bytes)) {
        free(ct);
        return NULL;
    }
    ct->weight_bytes = bytes;
    count_bytes(cb, (int64_t)bytes);
    if (type == stored && ndim != 4) {
        if (cuda_ok(cudaMemcpyAsync(ct->t.data, data, bytes, cudaMemcpyHostToDevice, cb->stream),
                    "weight: copy to the device"))
            goto fail;
    } else if (cuda_buf_alloc(cb, &staging, file_bytes) ||
               cuda_ok(cudaMemcpyAsync(staging.ptr, data, file_bytes, cudaMemcpyHostToDevice,
                                       cb->stream),
                       "weight: copy to the device") ||
               (ndim == 4 ? to_channels_last(cb, staging.ptr, type, &ct->t)
                          : cuda_convert(cb, staging.ptr, type, ct->t.data, stored, n))) {
        goto fail;
    }
    /* the caller frees `data` when this returns (backend.h), and a copy
     * from pageable memory may not have read all of it yet */
    if (cuda_ok(cudaStreamSynchronize(cb->stream), "weight: copy to the device")) goto fail;
    cuda_buf_free(cb, &staging);
    return &ct->t;
fail:
    cuda_buf_free(cb, &staging);
    cuda_tensor_release(cb, &ct->t);
    return NULL;
}

/* -------------------------------------------------------------- transfers */

/* Host -> device through the pinned staging buffer when it is large
 * enough (a copy from pinned memory is a plain DMA, from pageable memory
 * the driver stages it in pieces): the host copy waits for the previous
 * transfer out of the buffer, so the caller may reuse src at once. */
static int host_to_device(cuda_backend *cb, void *dst, const void *src, size_t bytes) {
    if (bytes > CUDA_PINNED_BYTES || !cb->pinned)
        return cuda_ok(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cb->stream),
                       "upload");
    if (cuda_ok(cudaEventSynchronize(cb->pinned_free), "upload: staging")) return -1;
    memcpy(cb->pinned, src, bytes);
    return cuda_ok(cudaMemcpyAsync(dst, cb->pinned, bytes, cudaMemcpyHostToDevice, cb->stream),
                   "upload") ||
                   cuda_ok(cudaEventRecord(cb->pinned_free, cb->stream), "upload: staging")
               ? -1
               : 0;
}

/* Device -> host, then waits for the stream (through the pinned buffer
 * when it is large enough). */
static int device_to_host(cuda_backend *cb, void *dst, const void *src, size_t bytes) {
    bool pinned = bytes <= CUDA_PINNED_BYTES && cb->pinned;
    if (cuda_ok(cudaMemcpyAsync(pinned ? cb->pinned : dst, src, bytes, cudaMemcpyDeviceToHost,
                                cb->stream),
                "download") ||
        cuda_ok(cudaStreamSynchronize(cb->stream), "download"))
        return -1;
    if (pinned) memcpy(dst, cb->pinned, bytes);
    return 0;
}

static int cuda_upload(backend *be, tensor *dst, const float *src) {
    cuda_lock lock(be);
    if (!lock) return -1;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, "upload", "destination", dst, 0) ||
        sdx4_check_host_buffer("upload", "source", src))
        return -1;
    int64_t n = tensor_numel(dst);
    size_t bytes = (size_t)n * sizeof(float);
    /* from pageable memory the copy returns once src is staged: the caller
     * may reuse it at once */
    if (dst->type == DTYPE_F32 && dst->ndim != 4) return host_to_device(cb, dst->data, src, bytes);
    cuda_buf staging;
    if (cuda_buf_alloc(cb, &staging, bytes)) return -1;
    int rc = host_to_device(cb, staging.ptr, src, bytes) ||
                     (dst->ndim == 4
                          ? to_channels_last(cb, staging.ptr, DTYPE_F32, dst)
                          : cuda_convert(cb, staging.ptr, DTYPE_F32, dst->data, dst->type, n))
                 ? -1
                 : 0;
    cuda_buf_free(cb, &staging);
    return rc;
}

static int cuda_download(backend *be, const tensor *src, float *dst) {
    cuda_lock lock(be);
    if (!lock) return -1;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, "download", "source", src, 0) ||
        sdx4_check_host_buffer("download", "destination", dst))
        return -1;
    int64_t n = tensor_numel(src);
    size_t bytes = (size_t)n * sizeof(float);
    cuda_buf staging = {};
    const void *from = src->data;
    int rc = 0;
    if (src->ndim == 4) { /* channels-last [N, H*W, C] -> [N, C, H*W] */
        rc = cuda_buf_alloc(cb, &staging, bytes) ||
             cuda_transpose(cb, src->data, src->type, staging.ptr, DTYPE_F32, src->shape[0],
                            src->shape[2] * src->shape[3], src->shape[1]);
        from = staging.ptr;
    } else if (src->type != DTYPE_F32) {
        rc = cuda_buf_alloc(cb, &staging, bytes) ||
             cuda_convert(cb, src->data, src->type, staging.ptr, DTYPE_F32, n);
        from = staging.ptr;
    }
    /* errors of earlier kernels surface here, at the first wait */
    if (!rc) rc = device_to_host(cb, dst, from, bytes);
    cuda_buf_free(cb, &staging);
    cuda_profile_collect(cb->profile);
    /* a result is out: the choices its operations timed go to disk now,
     * not only at exit (a server's warm-up, a process that is killed) */
    if (cb->choices) (void)sdx4_plan_cache_save(cb->choices);
    return rc ? -1 : 0;
}

static int cuda_synchronize(backend *be) {
    cuda_lock lock(be);
    if (!lock) return -1;
    int rc = cuda_ok(cudaStreamSynchronize(lock.cb->stream), "cuda: synchronize");
    cuda_profile_collect(lock.cb->profile);
    return rc;
}

static void cuda_memory(backend *be, int64_t *in_use, int64_t *peak) {
    cuda_lock lock(be); /* the counters are host-side: readable either way */
    if (in_use) *in_use = lock.cb->in_use;
    if (peak) *peak = lock.cb->peak;
}

/* ----------------------------------------------------------------- checks */

int cuda_check(const cuda_backend *cb, const char *op, const char *what, const tensor *t,
               int ndim) {
    if (sdx4_check_present(op, what, t)) return -1;
    if (t->be != &cb->base) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "%s: %s is a tensor of another backend (%s)", op,
                  what, t->be && t->be->name ? t->be->name : "unknown");
        return -1;
    }
    if (!cuda_storable(t->type)) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                  "%s: %s is %s, the cuda backend computes in F32, F16 or BF16", op, what,
                  dtype_name(t->type));
        return -1;
    }
    return sdx4_check_ndim(op, what, t, ndim);
}

/* ----------------------------------------------------------------- linear */

/* y[M, N] = x[M, K] @ w[N, K]^T + bias. cuBLAS is column-major: there the
 * row-major y is y^T [N, M] = w [K, N]^T x^T [K, M]. */
/* linear, and linear_add with r (else NULL): see cuda_gemm */
static tensor *linear_residual(backend *be, const char *op, const tensor *x, const tensor *w,
                               const tensor *bias, const tensor *r) {
    cuda_lock lock(be, op);
    if (!lock) return NULL;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, op, "input", x, 0) || cuda_check(cb, op, "weight", w, 2) ||
        cuda_refuse_image(op, x))
        return NULL;
    if (sdx4_check_linear(x, w)) return NULL;
    int64_t K = x->shape[x->ndim - 1], N = w->shape[0];
    if (bias && (cuda_check(cb, op, "bias", bias, 0) || sdx4_check_bias(op, bias, N))) return NULL;
    int64_t shape[4];
    memcpy(shape, x->shape, sizeof shape);
    shape[x->ndim - 1] = N;
    if (r && (cuda_check(cb, op, "residual", r, 0) || sdx4_check_residual(op, r, x->ndim, shape)))
        return NULL;
    int64_t M = tensor_numel(x) / K;
    if (sdx4_check_gemm_size(op, "cuBLAS", M, N, K)) return NULL;
    cuda_profile_label(cb->profile, " %s M%" PRId64 " N%" PRId64 " K%" PRId64,
                       dtype_name(x->type), M, N, K);
    dtype type = x->type;
    cuda_buf w_tmp = {}, b_tmp = {}, r_tmp = {};
    const void *wd = NULL, *bd = NULL, *rd = NULL;
    tensor *y = NULL;
    if (!(wd = cuda_data_as(cb, w, type, &w_tmp)) ||
        (bias && !(bd = cuda_data_as(cb, bias, type, &b_tmp))) ||
        (r && !(rd = cuda_data_as(cb, r, type, &r_tmp))) ||
        !(y = cuda_tensor_new(cb, x->ndim, shape, type)) ||
        cuda_gemm(cb, type, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)M, (int)K, wd, (int)K, x->data,
                  (int)K, bd, rd, y->data, (int)N)) {
        sdx4_error_prefix("%s", op);
        cuda_tensor_release(cb, y);
        y = NULL;
    }
    cuda_buf_free(cb, &w_tmp);
    cuda_buf_free(cb, &b_tmp);
    cuda_buf_free(cb, &r_tmp);
    return y;
}

static tensor *cuda_linear(backend *be, const tensor *x, const tensor *w, const tensor *bias) {
    return linear_residual(be, "linear", x, w, bias, NULL);
}

static tensor *cuda_linear_add(backend *be, const tensor *x, const tensor *w, const tensor *bias,
                               const tensor *r) {
    return linear_residual(be, "linear_add", x, w, bias, r);
}

/* -------------------------------------------------------------- embedding */

static tensor *cuda_embedding(backend *be, const tensor *table, const int32_t *ids, int n) {
    cuda_lock lock(be, "embedding");
    if (!lock) return NULL;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, "embedding", "table", table, 2)) return NULL;
    if (sdx4_check_embedding(table->shape[0], ids, n)) return NULL;
    int64_t D = table->shape[1];
    int64_t shape[2] = {n, D};
    size_t id_bytes = (size_t)n * sizeof *ids;
    cuda_buf device_ids;
    tensor *out = NULL;
    if (cuda_buf_alloc(cb, &device_ids, id_bytes)) return NULL;
    if (cuda_ok(cudaMemcpyAsync(device_ids.ptr, ids, id_bytes, cudaMemcpyHostToDevice, cb->stream),
                "embedding: copy the ids") ||
        !(out = cuda_tensor_new(cb, 2, shape, cuda_activation_type(cb))) ||
        cuda_gather_rows(cb, table->data, table->type, (const int32_t *)device_ids.ptr, n, D,
                         out->data, out->type)) {
        cuda_tensor_release(cb, out);
        out = NULL;
    }
    cuda_buf_free(cb, &device_ids);
    return out;
}

/* ------------------------------------------------------------ plan cache */

const void *cuda_choice_get(cuda_backend *cb, const char *key, size_t len) {
    size_t n = 0;
    const void *v = cb->choices ? sdx4_plan_cache_get(cb->choices, key, &n) : NULL;
    return v && n == len ? v : NULL;
}

void cuda_choice_put(cuda_backend *cb, const char *key, const void *value, size_t len) {
    if (cb->choices) (void)sdx4_plan_cache_put(cb->choices, key, value, len);
}

/* Opens the plan cache that `option` names (sdx4_cuda_options.plan_cache)
 * for this device (cuda_internal.h: what the device key holds). Without
 * one, or out of memory, the backend times every shape as before. */
static plan_cache *open_choices(const char *option, const cudaDeviceProp *prop) {
    char path[4096], key[PLAN_CACHE_MAX_KEY + 1], uuid[33];
    if (!sdx4_plan_cache_path(option, path, sizeof path)) return NULL;
    for (int i = 0; i < 16; i++)
        snprintf(uuid + 2 * i, 3, "%02x", (unsigned char)prop->uuid.bytes[i]);
    int driver = 0, runtime = 0;
    cuda_ignore(cudaDriverGetVersion(&driver));
    cuda_ignore(cudaRuntimeGetVersion(&runtime));
#ifdef SDX4_HAVE_CUDNN
    const size_t cudnn = cudnnGetVersion();
#else
    const size_t cudnn = 0;
#endif
    snprintf(key, sizeof key,
             "%s|GPU-%s|sm%d%d|%d SMs|driver %d|cudart %d|cudnn %zu|cublasLt %zu|records %d",
             prop->name, uuid, prop->major, prop->minor, prop->multiProcessorCount, driver,
             runtime, cudnn, cublasLtGetVersion(), CUDA_PLAN_RECORDS);
    return sdx4_plan_cache_open(path, key);
}

/* --------------------------------------------------------------- lifetime */

/* Frees what create() made, in any state of completion. */
static void teardown(cuda_backend *cb) {
    if (cb->stream) cuda_ignore(cudaStreamSynchronize(cb->stream));
    if (cb->choices) (void)sdx4_plan_cache_save(cb->choices);
    sdx4_plan_cache_close(cb->choices);
    if (cb->profile) /* beside memory()'s peak, which does not count cached blocks */
        fprintf(stderr, "device memory taken from the driver: at most %.1f MiB\n",
                cb->reserved_peak / 1048576.0);
    cuda_profile_destroy(cb->profile);
    if (cb->pinned) cuda_ignore(cudaFreeHost(cb->pinned));
    if (cb->pinned_free) cuda_ignore(cudaEventDestroy(cb->pinned_free));
#ifdef SDX4_HAVE_CUDNN
    cuda_conv_plans_free(cb);
    if (cb->cudnn) (void)cudnnDestroy(cb->cudnn);
#endif
    cuda_gemm_plans_free(cb);
    if (cb->cublaslt) (void)cublasLtDestroy(cb->cublaslt);
    cuda_buf_free(cb, &cb->gemm_workspace);
    cuda_buf_free(cb, &cb->group_counters);
    if (cb->cublas) (void)cublasDestroy(cb->cublas);
    release_cache(cb);
    for (int i = 0; i < CUDA_PLAN_SLOTS; i++) cuda_memory_plan_clear(cb, &cb->memory_plans[i]);
    if (cb->stream) cuda_ignore(cudaStreamDestroy(cb->stream));
    pthread_mutex_destroy(&cb->lock);
    if (precision_owner == cb) precision_owner = NULL;
    free(cb);
}

static void cuda_destroy(backend *be) {
    cuda_backend *cb = (cuda_backend *)be;
    cuda_ignore(cudaSetDevice(cb->device)); /* on failure the frees below fail alike */
    teardown(cb);
}

extern "C" backend *sdx4_backend_cuda_create(int device_index, const cuda_settings *settings) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        sdx4_set_error(SDX4_ERR_DEVICE, "no CUDA device: %s", cudaGetErrorString(e));
        return NULL;
    }
    if (count == 0) {
        sdx4_set_error(SDX4_ERR_DEVICE, "no CUDA device: the driver reports none");
        return NULL;
    }
    if (device_index < 0 || device_index >= count) {
        sdx4_set_error(SDX4_ERR_DEVICE, "cuda:%d: there are %d CUDA devices", device_index, count);
        return NULL;
    }
    const dtype weights = settings->mode;
    const conv_path conv = settings->conv;
    cudaDeviceProp prop;
    if (cuda_ok(cudaSetDevice(device_index), "cuda: cudaSetDevice") ||
        cuda_ok(cudaGetDeviceProperties(&prop, device_index), "cuda: cudaGetDeviceProperties"))
        return NULL;
    if (prop.major < 8) {
        sdx4_set_error(SDX4_ERR_DEVICE, "cuda:%d (%s) has compute capability %d.%d; sdx4 needs 8.0 or newer",
                  device_index, prop.name, prop.major, prop.minor);
        return NULL;
    }
    cuda_backend *cb = (cuda_backend *)calloc(1, sizeof *cb);
    if (!cb) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "cuda backend: out of memory");
        return NULL;
    }
    {
        pthread_mutexattr_t attr;
        pthread_mutexattr_init(&attr);
        pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
        pthread_mutex_init(&cb->lock, &attr);
        pthread_mutexattr_destroy(&attr);
    }
    cb->device = device_index;
    cb->sms = prop.multiProcessorCount;
    cb->smem_per_block = (int)prop.sharedMemPerBlockOptin;
    cb->mode = weights;
    cb->allow_tf32 = weights == DTYPE_F16;
    cb->allow_bf16 = settings->allow_bf16;
    cb->profile = settings->profile ? cuda_profile_create() : NULL;
    cb->use_graphs = settings->use_graphs;
    cb->use_plans = settings->use_plans;
    if (cuda_ok(cudaStreamCreateWithFlags(&cb->stream, cudaStreamNonBlocking), "cuda: stream") ||
        cublas_ok(cublasCreate(&cb->cublas), "cuda: cublasCreate") ||
        cublas_ok(cublasSetStream(cb->cublas, cb->stream), "cuda: cublasSetStream") ||
        cublas_ok(cublasLtCreate(&cb->cublaslt), "cuda: cublasLtCreate") ||
        cuda_buf_alloc(cb, &cb->gemm_workspace, CUDA_GEMM_WORKSPACE) ||
        cuda_buf_alloc(cb, &cb->group_counters, CUDA_GROUP_COUNTERS * sizeof(unsigned)) ||
        cuda_ok(cudaMemsetAsync(cb->group_counters.ptr, 0, cb->group_counters.bytes, cb->stream),
                "cuda: memset") ||
        cuda_ok(cudaEventCreateWithFlags(&cb->pinned_free, cudaEventDisableTiming),
                "cuda: event") ||
        /* float accumulation throughout, also in split-K reductions */
        cublas_ok(cublasSetMathMode(cb->cublas, (cublasMath_t)(CUBLAS_DEFAULT_MATH |
                                     CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)),
                  "cuda: cublasSetMathMode"))
        goto fail;
#ifdef SDX4_HAVE_CUDNN
    cb->conv = conv;
    {
        cudnnStatus_t s = cudnnCreate(&cb->cudnn);
        if (s == CUDNN_STATUS_SUCCESS) s = cudnnSetStream(cb->cudnn, cb->stream);
        if (s != CUDNN_STATUS_SUCCESS) {
            sdx4_set_error(SDX4_ERR_DEVICE, "cuda: cudnnCreate: %s", cudnnGetErrorString(s));
            goto fail;
        }
    }
#else
    (void)conv; /* im2col is the only path of this build */
#endif
    cb->choices = open_choices(settings->plan_cache, &prop);
    if (cudaHostAlloc(&cb->pinned, CUDA_PINNED_BYTES, cudaHostAllocDefault) != cudaSuccess) {
        (void)cudaGetLastError(); /* no pinned memory: transfers stay pageable */
        cb->pinned = NULL;
    }
    snprintf(cb->description, sizeof cb->description, "cuda:%d (%s, %d GiB, %s)", device_index,
             prop.name, (int)((prop.totalGlobalMem + ((size_t)1 << 29)) >> 30),
             weights == DTYPE_F16 ? "fp16" : "fp32");

    {
        backend *be = &cb->base;
        be->name = "cuda";
        be->description = cb->description;
        be->new_tensor = cuda_new_tensor;
        be->free_tensor = cuda_free_tensor;
        be->weight = cuda_weight;
        be->upload = cuda_upload;
        be->download = cuda_download;
        be->linear = cuda_linear;
        be->conv2d = cuda_conv2d;
        be->linear_add = cuda_linear_add;
        be->conv2d_add = cuda_conv2d_add;
        be->attention = cuda_attention;
        be->group_norm = cuda_group_norm;
        be->group_norm_add = cuda_group_norm_add;
        be->layer_norm = cuda_layer_norm;
        be->activate = cuda_activate;
        be->geglu = cuda_geglu;
        be->add_inplace = cuda_add_inplace;
        be->add_channel_bias_inplace = cuda_add_channel_bias_inplace;
        be->scale_inplace = cuda_scale_inplace;
        be->prelu_inplace = cuda_prelu_inplace;
        be->concat_channels = cuda_concat_channels;
        be->upsample_nearest = cuda_upsample_nearest;
        be->pixel_shuffle = cuda_pixel_shuffle;
        be->pixel_unshuffle = cuda_pixel_unshuffle;
        be->nchw_to_tokens = cuda_nchw_to_tokens;
        be->tokens_to_nchw = cuda_tokens_to_nchw;
        be->relayout_tokens = cuda_relayout_tokens;
        be->embedding = cuda_embedding;
        be->synchronize = cuda_synchronize;
        if (cb->use_graphs) { /* else steps run as called (backend.c) */
            be->step_new = cuda_step_new;
            be->step_run = cuda_step_run;
            be->step_free = cuda_step_free;
            be->replays_steps = 1;
        }
        be->memory = cuda_memory;
        be->set_activation_type = cuda_set_activation_type;
        be->destroy = cuda_destroy;
        return be;
    }
fail:
    teardown(cb);
    return NULL;
}
