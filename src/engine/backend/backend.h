/*
 * backend.h - the operations the model code runs, and nothing more.
 *
 * A backend is a table of function pointers behind an opaque handle (as in
 * ggml-backend): the text encoder, UNet and VAE call these operations on
 * tensors that live in the backend's memory, and never see how or where
 * they are computed. The CPU backend (backend/cpu) computes in float32 with
 * OpenBLAS and OpenMP, or its convolutions and linear layers in bfloat16
 * through oneDNN (cpu_onednn.c); the CUDA backend (backend/cuda) slots in
 * behind the same table.
 *
 * Tensors are dense, row-major (the last dimension is contiguous) and at
 * most 4-D. Image tensors are NCHW as in PyTorch; token tensors are
 * [batch, tokens, channels]. Every operation returns a new tensor (or NULL
 * after setting the error, see core/error.h) and leaves its inputs alone,
 * except the *_inplace ones. The caller frees what it created with
 * tensor_free(); weights belong to the model.
 *
 * All operations of one backend may be called from several threads at once
 * on distinct tensors.
 */
#ifndef SDX4_BACKEND_H
#define SDX4_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "core/dtype.h"
#include "sdx4.h"

typedef struct backend backend;
typedef struct backend_step backend_step; /* a step run again and again, see below */

typedef struct tensor {
    backend *be;
    void *data;         /* backend memory (host pointer on the CPU) */
    int ndim;
    int64_t shape[4];
    dtype type;         /* activations are F32; weights may be F16 on GPUs */
    int owns_data;      /* 0 for a view of weight bytes the model owns */
    void *prepared;     /* a weight as the backend's kernels read it, made at
                           its first use (the CPU's oneDNN layout: then data
                           may be NULL); NULL for any other tensor */
} tensor;

static inline int64_t tensor_numel(const tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

/* Activation functions, selected by the configs' names. */
typedef enum { ACT_NONE, ACT_SILU, ACT_GELU, ACT_QUICK_GELU } activation;

struct backend {
    const char *name;        /* "cpu", "cuda" */
    const char *description; /* device name for model-info */

    /* --- memory ------------------------------------------------------- */
    /* A new uninitialised F32 tensor. */
    tensor *(*new_tensor)(backend *be, int ndim, const int64_t *shape);
    void (*free_tensor)(backend *be, tensor *t);
    /* A weight from file bytes of type `type`. The backend may use `data`
     * in place (the CPU backend does for aligned F32): then the tensor's
     * data is `data`, which must outlive the tensor. Otherwise `data` is
     * not read after the call returns, and the caller may free it. */
    tensor *(*weight)(backend *be, const void *data, dtype type, int ndim,
                      const int64_t *shape);
    /* Copies between host float32 and a tensor of the same element count. */
    int (*upload)(backend *be, tensor *dst, const float *src);
    int (*download)(backend *be, const tensor *src, float *dst);

    /* --- dense algebra ------------------------------------------------ */
    /* y[..., N] = x[..., K] @ w[N, K]^T + bias[N] (bias may be NULL):
     * torch.nn.Linear. */
    tensor *(*linear)(backend *be, const tensor *x, const tensor *w,
                      const tensor *bias);
    /* torch.nn.Conv2d on NCHW, square kernel w[O, C, k, k], zero padding,
     * bias may be NULL. */
    tensor *(*conv2d)(backend *be, const tensor *x, const tensor *w,
                      const tensor *bias, int stride, int padding);
    /* Optional (NULL: the model adds separately): linear or conv2d + r,
     * r of the output's shape, a residual connection added while the
     * product is still in float (one rounding where PyTorch has two, and
     * no pass of its own). blocks.h's linear_add_forward and conv_add_forward. */
    tensor *(*linear_add)(backend *be, const tensor *x, const tensor *w,
                          const tensor *bias, const tensor *r);
    tensor *(*conv2d_add)(backend *be, const tensor *x, const tensor *w,
                          const tensor *bias, int stride, int padding,
                          const tensor *r);
    /* Scaled dot-product attention, scale 1/sqrt(head_dim):
     * q[B, Tq, H*D], k and v [B, Tk, H*D] -> [B, Tq, H*D]. `causal` masks
     * key j > query i (CLIP). Must not hold the whole [Tq, Tk] score matrix
     * for large Tq (the VAE attends over 16384 tokens at 512x512). */
    tensor *(*attention)(backend *be, const tensor *q, const tensor *k,
                         const tensor *v, int heads, int causal);

    /* --- normalisation ------------------------------------------------ */
    /* torch.nn.GroupNorm on NCHW (or [B, C, ...]), then `act` applied. */
    tensor *(*group_norm)(backend *be, const tensor *x, int groups,
                          const tensor *gamma, const tensor *beta, float eps,
                          activation act);
    /* Optional (NULL: add_channel_bias_inplace, then group_norm):
     * group_norm(x + v[b, c] broadcast over H, W), the sum never written
     * (a resnet's time embedding, which only its second norm reads). */
    tensor *(*group_norm_add)(backend *be, const tensor *x, const tensor *v,
                              int groups, const tensor *gamma,
                              const tensor *beta, float eps, activation act);
    /* torch.nn.LayerNorm over the last dimension. */
    tensor *(*layer_norm)(backend *be, const tensor *x, const tensor *gamma,
                          const tensor *beta, float eps);

    /* --- elementwise -------------------------------------------------- */
    tensor *(*activate)(backend *be, const tensor *x, activation act);
    /* GEGLU: x[..., 2N] -> a * gelu(g) where a, g = x.chunk(2, dim=-1). */
    tensor *(*geglu)(backend *be, const tensor *x);
    /* a += b * scale_b, same shapes. */
    int (*add_inplace)(backend *be, tensor *a, const tensor *b, float scale_b);
    /* x[B, C, H, W] += v[B, C] broadcast over H, W (time embedding). */
    int (*add_channel_bias_inplace)(backend *be, tensor *x, const tensor *v);
    /* x *= s */
    int (*scale_inplace)(backend *be, tensor *x, float s);
    /* x = x * slope where x < 0, in place: slopes[c] per channel of an
     * NCHW x (torch.nn.PReLU), or the one `slope` when slopes is NULL
     * (ReLU at 0, torch.nn.LeakyReLU otherwise). The GAN upscalers'
     * activations (model/esrgan.h). */
    int (*prelu_inplace)(backend *be, tensor *x, const tensor *slopes, float slope);

    /* --- layout ------------------------------------------------------- */
    /* torch.cat([a, b], dim=1) for NCHW with equal B, H, W. */
    tensor *(*concat_channels)(backend *be, const tensor *a, const tensor *b);
    /* F.interpolate(x, size=(h, w), mode="nearest"). */
    tensor *(*upsample_nearest)(backend *be, const tensor *x, int h, int w);
    /* F.pixel_shuffle(x, r): [B, C*r*r, H, W] -> [B, C, H*r, W*r], output
     * channel c's r x r block taken from input channels c*r*r..; and
     * F.pixel_unshuffle(x, r), its inverse (sides multiples of r). */
    tensor *(*pixel_shuffle)(backend *be, const tensor *x, int r);
    tensor *(*pixel_unshuffle)(backend *be, const tensor *x, int r);
    /* [B, C, H, W] -> [B, H*W, C] and back (transformer blocks). */
    tensor *(*nchw_to_tokens)(backend *be, const tensor *x);
    tensor *(*tokens_to_nchw)(backend *be, const tensor *x, int h, int w);
    /* Optional: the same two, in place on x, where the backend stores both
     * shapes alike (CUDA's channels-last images): 0 done, 1 not possible
     * for this tensor (use the copies above), -1 error. h, w are read only
     * for tokens -> image. blocks.h's as_tokens / as_image. */
    int (*relayout_tokens)(backend *be, tensor *x, int h, int w);
    /* out[i, :] = table[ids[i], :] for a table [V, D]: embeddings. */
    tensor *(*embedding)(backend *be, const tensor *table, const int32_t *ids,
                         int n);

    /* --- precision ---------------------------------------------------- */
    /* Optional (NULL: activations are always F32). A backend that keeps
     * activations in half precision (CUDA in fp16 mode) makes the tensors
     * that this thread creates from now on, and everything derived from
     * them, of type `t` (DTYPE_F32, DTYPE_F16 or DTYPE_BF16), and returns
     * the previous setting. The pipeline asks for BF16 around the VAE
     * decode, which overflows in fp16 (diffusers upcasts it to float):
     * bfloat16 has float's range. A backend in full precision (CUDA's fp32
     * mode) stays in F32 whatever is asked, and one may answer a request
     * for BF16 with F32 (CUDA without allow_bf16, cuda_settings). Per
     * thread, so concurrent upscales on one engine do not disturb each
     * other. Any other `t` changes nothing and just returns the current
     * type. */
    dtype (*set_activation_type)(backend *be, dtype t);
    /* The type that convolutions and linear layers multiply in where it is
     * not the activations' (the CPU's oneDNN path: DTYPE_BF16 operands,
     * float accumulation and output); DTYPE_F32 (zero) otherwise. For
     * model-info's compute_dtype. */
    dtype dense_type;

    /* --- steps -------------------------------------------------------- */
    /* Optional (NULL: sdx4_step_run() calls fn every time, see below). A GPU
     * backend may record the operations of a step once and replay them,
     * which spares the host's per-operation work (the CUDA backend
     * captures a CUDA graph, cuda_graph.cu); a backend may plan the
     * memory of the later calls (both do). When and how it warms up,
     * plans and records is its own business. */
    backend_step *(*step_new)(backend *be);
    int (*step_run)(backend *be, backend_step *s, int (*fn)(void *ctx), void *ctx);
    void (*step_free)(backend *be, backend_step *s);
    /* Whether step_run replays recordings instead of calling fn (the CUDA
     * backend's graphs); the CPU calls fn every time. */
    int replays_steps;

    /* --- lifetime ----------------------------------------------------- */
    /* Waits until every operation enqueued so far has finished; optional
     * (NULL: the backend computes each operation before returning, as the
     * CPU backend does). Only for timing: download() waits anyway. */
    int (*synchronize)(backend *be);
    /* Bytes of device memory in use now and at most (0 if unknown). */
    void (*memory)(backend *be, int64_t *in_use, int64_t *peak);
    /* Gives memory kept for reuse back to the system; the engine calls it
     * when an upscale ends. Optional (NULL: nothing is kept, or what is
     * kept is meant to outlive jobs, as the CUDA backend's device blocks:
     * cudaMalloc is slow, and the device is the service's own). */
    void (*trim)(backend *be);
    void (*destroy)(backend *be);
};

/* ------------------------------------------------------------------ steps
 * A step is work that runs again and again, the same operations on new
 * values: a UNet evaluation of the denoising loop. sdx4_step_run() runs fn(ctx),
 * which calls this backend's operations and returns 0, or -1 with the
 * error set; or, on a backend that records steps, replays what an earlier
 * call of fn did instead of calling fn again. The CUDA backend runs the
 * first call as it is called (cuDNN chooses its algorithms on first runs),
 * the second as a planning pass that lays out the memory of the third,
 * records the third into a CUDA graph, and replays the graph from then on.
 * The CPU runs fn every time, and from the third call on gives its
 * buffers the places a planning pass of the second laid out in one arena
 * (cpu_step.c). So that a replay computes what fn would:
 *   - from its second call on, fn calls the same operations in the same
 *     order on tensors of the same shapes (its first call may do more:
 *     fill a cache that the later ones read, as kv_cache does), and does
 *     nothing on the host that a later step needs (a replay runs none of
 *     fn's host code);
 *   - fn's inputs are tensors created before the step's first run, into
 *     which the caller writes each step's values (upload()) before calling
 *     sdx4_step_run();
 *   - fn stores its results in ctx, freeing the previous call's first;
 *     after a replay, the results of the recorded call hold the new
 *     values: the caller reads them (download()) and keeps them alive
 *     until sdx4_step_free(). Tensors that fn creates and frees keep their
 *     memory for the replays, which write it again;
 *   - fn calls no operation on host data (upload, download, weight,
 *     embedding): a recording cannot hold them.
 * While a step records, the operations of other threads wait. A step is
 * run by one thread (the CUDA backend plans per thread); after sdx4_step_run()
 * fails, only sdx4_step_free() is left to call.
 */

/* A new step; NULL with the error set. */
backend_step *sdx4_step_new(backend *be);
int sdx4_step_run(backend *be, backend_step *s, int (*fn)(void *ctx), void *ctx);
void sdx4_step_free(backend *be, backend_step *s); /* NULL is fine */
/* Whether sdx4_step_run() may replay steps on this backend: then its first
 * calls of a step call fn, and the later ones do not (bench.c times them). */
int sdx4_step_replays(const backend *be);

/* ---------------------------------------------------------------- backends */

/* How the CUDA backend computes: sdx4.h's sdx4_cuda_options, checked by
 * sdx4_cuda_settings_parse() in every build (a bad value is refused whatever the
 * device). cuda_backend.cu describes each. */
typedef enum {
    CONV_IM2COL,       /* im2col + GEMM, as in builds without cuDNN */
    CONV_CUDNN,        /* cuDNN: the faster of the legacy call and the graph API */
    CONV_CUDNN_GRAPH,  /* graph API plans kept even when slower (tests) */
    CONV_CUDNN_LEGACY, /* the legacy call alone: a new shape is chosen faster */
} conv_path;

typedef struct {
    dtype mode;     /* DTYPE_F16 (half weights and activations) or DTYPE_F32 */
    int allow_bf16; /* the VAE decode in bfloat16 (else float) in F16 mode */
    conv_path conv;
    int use_graphs; /* record steps as CUDA graphs (else run them as called) */
    int use_plans;  /* a planning pass before recording */
    int profile;    /* GPU time per operation, on stderr at destroy() */
    const char *plan_cache; /* sdx4_cuda_options.plan_cache, as given */
} cuda_settings;

/* The settings `o` asks for (NULL: the defaults); -1 with an error naming
 * the option and its choices. */
int sdx4_cuda_settings_parse(const sdx4_cuda_options *o, cuda_settings *s);

/* How the CPU backend computes its convolutions and linear layers:
 * sdx4.h's sdx4_cpu_options.dtype. The oneDNN float32 paths are not
 * offered there: they are the bfloat16 path's code with float32 data
 * types, which the tests run on CPUs that cannot run bfloat16, and on
 * operands rounded to a narrower format's values to measure its error. */
typedef enum {
    CPU_DENSE_BLAS,        /* float32 through OpenBLAS (the default) */
    CPU_DENSE_ONEDNN_F32,  /* float32 through oneDNN (tests) */
    CPU_DENSE_ONEDNN_BF16, /* bfloat16 operands, float accumulation and
                              output, through oneDNN; refused on a CPU
                              without AVX512-BF16 or AMX, never emulated */
    CPU_DENSE_ONEDNN_F32_BF16_OPERANDS, /* tests only: float32 through
                              oneDNN on inputs and weights rounded to
                              bfloat16 (to nearest even, as oneDNN's
                              reorders round). Products of bfloat16 values
                              are exact in float and the bf16 path
                              accumulates in float, so this is the bf16
                              path's arithmetic up to summation order: how
                              the tests measure its error on any CPU */
    CPU_DENSE_ONEDNN_F32_FP8_OPERANDS, /* tests only: float32 through oneDNN
                              on inputs and weights quantized to FP8 E4M3
                              with one scale per tensor, as an H100's FP8
                              GEMM or convolution reads them (cpu_onednn.c's
                              round_operands): FP8's error, measured before
                              there are FP8 kernels; a lower bound, as the
                              accumulation here is float32's */
    CPU_DENSE_ONEDNN_F32_FP8_LINEAR_OPERANDS, /* the same for the linear
                              layers only (cuBLASLt's products on CUDA),
                              convolutions in float32 */
    CPU_DENSE_ONEDNN_F32_FP8_CONV_OPERANDS, /* and for the convolutions only
                              (cuDNN's), linear layers in float32 */
} cpu_dense_path;

/* The path `o` asks for (NULL: the default); -1 with an error naming the
 * option and its choices. Like sdx4_cuda_settings_parse, whatever the
 * device. */
int sdx4_cpu_settings_parse(const sdx4_cpu_options *o, cpu_dense_path *path);

/* Backends compiled into this build. Each returns NULL with the error set
 * when it cannot start (no GPU, no bfloat16 on this CPU, ...). threads = 0:
 * all cores. sdx4_backend_cpu_create(t) is sdx4_backend_cpu_open(t,
 * CPU_DENSE_BLAS). */
backend *sdx4_backend_cpu_create(int threads);
backend *sdx4_backend_cpu_open(int threads, cpu_dense_path path);
backend *sdx4_backend_cuda_create(int device_index, const cuda_settings *settings);

/* Shorthands that keep model code readable. */
static inline void tensor_free(tensor *t) {
    if (t) t->be->free_tensor(t->be, t);
}

#endif
