/*
 * cuda_conv.cu - torch.nn.Conv2d (square kernel, zero padding, stride) on
 * channels-last tensors (cuda_internal.h), through cuDNN, or im2col +
 * cuBLAS where cuDNN is missing or has no algorithm for a shape. A 1x1
 * convolution with stride 1 is one GEMM over all pixels of the batch:
 * channels-last pixels are the rows of a [B*H*W, C] matrix, and the
 * weights [O, 1, 1, C] a linear layer's.
 *
 * cuDNN: the first convolution of each shape (batch, channels, size,
 * kernel, stride, padding, type) times cuDNN's algorithms on the real
 * tensors (cudnnFindConvolutionForwardAlgorithmEx, with at most
 * CONV_WORKSPACE_LIMIT of workspace) and keeps the fastest whose math is
 * allowed: tensor cores for half and bfloat16; for float, TF32 only in fp16 mode (see
 * cuda_backend.cu), plain FMA in fp32 mode, never a conversion to half.
 * The plan (descriptors, algorithm, workspace size) is cached for the
 * backend's lifetime: a model has a few dozen shapes. Every choice made by
 * timing (the algorithm and its math, the way of adding the bias, and
 * whether the graph API's plan replaces the legacy call, with that plan's
 * engine and knobs) is also a record of the plan cache (cuda_internal.h),
 * so the next process at this shape takes it without timing. A plan made
 * from records is marked `cached` until its first run succeeds; if that
 * run fails (another cuDNN, a record that does not fit), the shape is
 * timed again as if new and its records replaced.
 *
 * im2col: per image and per tile of output pixels, a kernel gathers the
 * input under each kernel tap into col[P, k*k*C] (zero in the padding) and
 * one GEMM writes y[tile, O] = col @ w[O, k*k*C]^T into the channels-last
 * output. Tiles keep the column buffer under COL_BUDGET_BYTES.
 *
 * cuDNN adds the bias in the convolution's epilogue where that is faster
 * (cudnnConvolutionBiasActivationForward, identity activation: both ways
 * are timed on first use); else the bias is written into the output first
 * and the convolution added to it (beta = 1). The GEMMs add it in their epilogue (cuda_gemm.cu). Every way
 * in float, before the one rounding.
 */
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"

#define COL_BUDGET_BYTES ((int64_t)64 << 20)

typedef struct {
    int64_t B, C, H, W;   /* input */
    int64_t O, Ho, Wo;    /* output channels and size */
    int k, stride, pad;
} conv_shape;

/* ---------------------------------------------------------------- im2col */

static int conv_im2col(cuda_backend *cb, const conv_shape *s, dtype type, const void *x,
                       const void *w, const void *bias, void *y) {
    size_t es = dtype_size(type);
    int64_t P = s->Ho * s->Wo, kkc = s->C * s->k * s->k;
    int direct = s->k == 1 && s->stride == 1 && s->pad == 0 && s->B * P <= INT_MAX;
    /* column-major, as cuBLAS: y^T [O, rows] = (w as stored)^T . col^T + bias */
    if (direct)
        return cuda_gemm(cb, type, CUBLAS_OP_T, CUBLAS_OP_N, (int)s->O, (int)(s->B * P), (int)kkc,
                         w, (int)kkc, x, (int)kkc, bias, NULL, y, (int)s->O);
    int rc = 0;
    int64_t tile = COL_BUDGET_BYTES / (kkc * (int64_t)es);
    if (tile > P) tile = P;
    if (tile < 1) tile = 1;
    cuda_buf col = {};
    if (!rc) rc = cuda_buf_alloc(cb, &col, (size_t)(tile * kkc) * es);
    for (int64_t n = 0; !rc && n < s->B; n++) {
        const char *xn = (const char *)x + (size_t)(n * s->H * s->W * s->C) * es;
        char *yn = (char *)y + (size_t)(n * P * s->O) * es;
        for (int64_t p0 = 0; !rc && p0 < P; p0 += tile) {
            int64_t rows = P - p0 < tile ? P - p0 : tile;
            rc = cuda_im2col(cb, type, xn, s->C, s->H, s->W, s->k, s->stride, s->pad, s->Wo, p0,
                             rows, col.ptr) ||
                 cuda_gemm(cb, type, CUBLAS_OP_T, CUBLAS_OP_N, (int)s->O, (int)rows, (int)kkc, w,
                           (int)kkc, col.ptr, (int)kkc, bias, NULL, yn + (size_t)(p0 * s->O) * es,
                           (int)s->O);
        }
    }
    cuda_buf_free(cb, &col);
    return rc;
}

/* ----------------------------------------------------------------- cuDNN */

#ifdef SDX4_HAVE_CUDNN

/* Workspace the algorithm search may offer: the fast algorithms for the
 * VAE's large images need far less. */
#define CONV_WORKSPACE_LIMIT ((size_t)256 << 20)
#define PLAN_KEY 10

struct conv_plan {
    conv_plan *next;
    int64_t key[PLAN_KEY];
    cudnnTensorDescriptor_t x, y;
    cudnnFilterDescriptor_t w;
    cudnnConvolutionDescriptor_t conv;
    cudnnConvolutionFwdAlgo_t algo;
    size_t workspace;
    int usable; /* 0: cuDNN has no algorithm for this shape, use im2col */
    /* the bias in the convolution's epilogue: 1 yes, -1 no (declined or
     * slower), 0 not decided yet (choose_bias_path) */
    int fuse_bias;
    cudnnTensorDescriptor_t bias;
    cudnnActivationDescriptor_t identity;
    /* the graph API's plan where it beat this one, per operands (bias?,
     * residual?), and whether that was tried (cuda_conv_graph.cu) */
    conv_graph *graph[4];
    bool graph_tried[4];
    bool cached; /* a choice came from the plan cache, not yet run */
    int timings; /* choices made by timing so far (for the profile's label) */
};

/* The legacy call's choice, as the plan cache keeps it. */
typedef struct {
    int32_t usable, algo, math, reserved;
} legacy_choice;

/* The plan cache's key of a choice about a shape: `what` and the plan's
 * key, and `extra` (the operands, the conv path). */
static void choice_key(char *buf, size_t size, const char *what, const int64_t *key,
                       const char *extra) {
    snprintf(buf, size, "%s %s B%" PRId64 " C%" PRId64 " H%" PRId64 " W%" PRId64 " O%" PRId64
             " k%" PRId64 " s%" PRId64 " p%" PRId64 " tf32 %" PRId64 "%s", what,
             dtype_name((dtype)key[8]), key[0], key[1], key[2], key[3], key[4], key[5], key[6],
             key[7], key[9], extra);
}

static int cudnn_ok(cudnnStatus_t s, const char *what) {
    if (s == CUDNN_STATUS_SUCCESS) return 0;
    sdx4_set_error(s == CUDNN_STATUS_ALLOC_FAILED ? SDX4_ERR_NO_MEMORY : SDX4_ERR_DEVICE,
              "conv2d: %s: %s", what, cudnnGetErrorString(s));
    return -1;
}

static void plan_free(conv_plan *p) {
    if (p->x) (void)cudnnDestroyTensorDescriptor(p->x);
    if (p->y) (void)cudnnDestroyTensorDescriptor(p->y);
    if (p->w) (void)cudnnDestroyFilterDescriptor(p->w);
    if (p->conv) (void)cudnnDestroyConvolutionDescriptor(p->conv);
    if (p->bias) (void)cudnnDestroyTensorDescriptor(p->bias);
    if (p->identity) (void)cudnnDestroyActivationDescriptor(p->identity);
    for (int i = 0; i < 4; i++) conv_graph_free(p->graph[i]);
    free(p);
}

void cuda_conv_plans_free(cuda_backend *cb) {
    while (cb->plans) {
        conv_plan *p = cb->plans;
        cb->plans = p->next;
        plan_free(p);
    }
}

/* The math an algorithm may use: see the top comment. */
static int math_allowed(dtype type, int allow_tf32, cudnnMathType_t math) {
    if (math == CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION) return 0;
    if (type != DTYPE_F32 || allow_tf32) return 1;
    return math == CUDNN_FMA_MATH;
}

/* Takes a cached legacy choice if cuDNN still offers it for this shape;
 * false (nothing changed but the math type) if not. */
static bool adopt_choice(cuda_backend *cb, conv_plan *p, dtype type, const legacy_choice *c) {
    if (!c->usable) { /* no algorithm of allowed math when timed: im2col */
        p->cached = true;
        return true;
    }
    const cudnnMathType_t math = (cudnnMathType_t)c->math;
    const cudnnConvolutionFwdAlgo_t algo = (cudnnConvolutionFwdAlgo_t)c->algo;
    size_t bytes = 0;
    if (c->algo < 0 || c->algo >= CUDNN_CONVOLUTION_FWD_ALGO_COUNT ||
        !math_allowed(type, cb->allow_tf32, math) ||
        cudnnSetConvolutionMathType(p->conv, math) != CUDNN_STATUS_SUCCESS ||
        cudnnGetConvolutionForwardWorkspaceSize(cb->cudnn, p->x, p->w, p->conv, p->y, algo,
                                                &bytes) != CUDNN_STATUS_SUCCESS ||
        bytes > CONV_WORKSPACE_LIMIT)
        return false;
    p->algo = algo;
    p->workspace = bytes;
    p->usable = 1;
    p->cached = true;
    return true;
}

/* Describes the shape and takes its algorithm from the plan cache
 * (use_cache) or times the algorithms on x, w and y (y is overwritten),
 * and stores what it timed. NULL with the error set. */
static conv_plan *make_plan(cuda_backend *cb, const conv_shape *s, dtype type,
                            const int64_t *key, const void *x, const void *w, void *y,
                            bool use_cache) {
    conv_plan *p = (conv_plan *)calloc(1, sizeof *p);
    if (!p) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "conv2d: out of memory");
        return NULL;
    }
    memcpy(p->key, key, sizeof p->key);
    cudnnDataType_t dt = type == DTYPE_F16    ? CUDNN_DATA_HALF
                         : type == DTYPE_BF16 ? CUDNN_DATA_BFLOAT16
                                              : CUDNN_DATA_FLOAT;
    cudnnMathType_t math = type != DTYPE_F32 ? CUDNN_TENSOR_OP_MATH
                           : cb->allow_tf32  ? CUDNN_DEFAULT_MATH
                                             : CUDNN_FMA_MATH;
    cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
    int found = 0;
    cuda_buf workspace = {};
    cudnnStatus_t st;
    char ck[192];
    legacy_choice chosen = {};
    choice_key(ck, sizeof ck, "conv", key, "");
    const legacy_choice *cached =
        use_cache ? (const legacy_choice *)cuda_choice_get(cb, ck, sizeof *cached) : NULL;
    if (cudnn_ok(cudnnCreateTensorDescriptor(&p->x), "descriptor") ||
        cudnn_ok(cudnnCreateTensorDescriptor(&p->y), "descriptor") ||
        cudnn_ok(cudnnCreateFilterDescriptor(&p->w), "descriptor") ||
        cudnn_ok(cudnnCreateConvolutionDescriptor(&p->conv), "descriptor") ||
        cudnn_ok(cudnnSetTensor4dDescriptor(p->x, CUDNN_TENSOR_NHWC, dt, (int)s->B, (int)s->C,
                                            (int)s->H, (int)s->W),
                 "input descriptor") ||
        cudnn_ok(cudnnSetTensor4dDescriptor(p->y, CUDNN_TENSOR_NHWC, dt, (int)s->B, (int)s->O,
                                            (int)s->Ho, (int)s->Wo),
                 "output descriptor") ||
        cudnn_ok(cudnnSetFilter4dDescriptor(p->w, dt, CUDNN_TENSOR_NHWC, (int)s->O, (int)s->C,
                                            s->k, s->k),
                 "filter descriptor") ||
        /* float accumulation for half data too */
        cudnn_ok(cudnnSetConvolution2dDescriptor(p->conv, s->pad, s->pad, s->stride, s->stride,
                                                 1, 1, CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT),
                 "convolution descriptor") ||
        cudnn_ok(cudnnSetConvolutionMathType(p->conv, math), "math type") ||
        cudnn_ok(cudnnCreateTensorDescriptor(&p->bias), "descriptor") ||
        cudnn_ok(cudnnSetTensor4dDescriptor(p->bias, CUDNN_TENSOR_NHWC, dt, 1, (int)s->O, 1, 1),
                 "bias descriptor") ||
        cudnn_ok(cudnnCreateActivationDescriptor(&p->identity), "descriptor") ||
        cudnn_ok(cudnnSetActivationDescriptor(p->identity, CUDNN_ACTIVATION_IDENTITY,
                                              CUDNN_NOT_PROPAGATE_NAN, 0.0),
                 "activation descriptor"))
        goto fail;
    if (cached && adopt_choice(cb, p, type, cached)) goto done;
    p->timings++;
    if (cudnn_ok(cudnnSetConvolutionMathType(p->conv, math), "math type")) goto fail;
    if (cuda_buf_alloc(cb, &workspace, CONV_WORKSPACE_LIMIT)) sdx4_error_clear(); /* search without */
    st = cudnnFindConvolutionForwardAlgorithmEx(
        cb->cudnn, p->x, x, p->w, w, p->conv, p->y, y, CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &found,
        perf, workspace.ptr, workspace.bytes);
    cuda_buf_free(cb, &workspace);
    if (st == CUDNN_STATUS_NOT_SUPPORTED) found = 0;
    else if (cudnn_ok(st, "cudnnFindConvolutionForwardAlgorithmEx")) goto fail;
    for (int i = 0; cb->profile && i < found; i++) /* what cuDNN measured, for the profile */
        fprintf(stderr, "cudnn %s B%" PRId64 " %" PRId64 "->%" PRId64 " %" PRId64 "x%" PRId64
                " k%d s%d: algo %d math %d status %d %.1f us workspace %zu\n",
                dtype_name(type), s->B, s->C, s->O, s->H, s->W, s->k, s->stride,
                (int)perf[i].algo, (int)perf[i].mathType, (int)perf[i].status,
                perf[i].time * 1e3, perf[i].memory);
    for (int i = 0; i < found && !p->usable; i++) { /* sorted fastest first */
        if (perf[i].status != CUDNN_STATUS_SUCCESS || !math_allowed(type, cb->allow_tf32, perf[i].mathType))
            continue;
        if (cudnn_ok(cudnnSetConvolutionMathType(p->conv, perf[i].mathType), "math type"))
            goto fail;
        p->algo = perf[i].algo;
        p->workspace = perf[i].memory;
        p->usable = 1;
        chosen = (legacy_choice){1, (int32_t)perf[i].algo, (int32_t)perf[i].mathType, 0};
    }
    cuda_choice_put(cb, ck, &chosen, sizeof chosen);
done:
    p->next = cb->plans;
    cb->plans = p;
    return p;
fail:
    plan_free(p);
    return NULL;
}

/* y = conv(x) + bias (+ r) in one call (the identity activation exists
 * only for this algorithm). The residual is cuDNN's z; without one z's
 * weight is 0, so y's old contents are not read. */
static cudnnStatus_t conv_fused(cuda_backend *cb, const conv_plan *p, const void *x,
                                const void *w, const void *bias, const void *r, void *y,
                                void *workspace) {
    const float one = 1.0f, z_weight = r ? 1.0f : 0.0f;
    return cudnnConvolutionBiasActivationForward(cb->cudnn, &one, p->x, x, p->w, w, p->conv,
                                                 p->algo, workspace, p->workspace, &z_weight,
                                                 p->y, r ? r : y, p->bias, bias, p->identity,
                                                 p->y, y);
}

/* y = bias, then y += conv(x) (beta = 1); without a bias just the
 * convolution. */
static int conv_bias_first(cuda_backend *cb, const conv_plan *p, const conv_shape *s, dtype type,
                           const void *x, const void *w, const void *bias, void *y,
                           void *workspace) {
    const float alpha = 1.0f, beta = bias ? 1.0f : 0.0f;
    if (bias && cuda_fill_bias(cb, y, bias, type, s->B * s->Ho * s->Wo, s->O, 1)) return -1;
    return cudnn_ok(cudnnConvolutionForward(cb->cudnn, &alpha, p->x, x, p->w, w, p->conv, p->algo,
                                            workspace, p->workspace, &beta, p->y, y),
                    "cudnnConvolutionForward");
}

/* Times both ways of adding the bias on the real tensors, as the
 * algorithm search does, and returns the faster: 1 fused, -1 bias first
 * (cuDNN's fused kernels are not always its fastest). */
static int choose_bias_path(cuda_backend *cb, conv_plan *p, const conv_shape *s, dtype type,
                            const void *x, const void *w, const void *bias, void *y,
                            void *workspace) {
    if (p->algo != CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM) return -1;
    float fused = cuda_time_runs(cb, [&] {
        return conv_fused(cb, p, x, w, bias, NULL, y, workspace) == CUDNN_STATUS_SUCCESS ? 0 : -1;
    });
    float first = cuda_time_runs(cb, [&] {
        return conv_bias_first(cb, p, s, type, x, w, bias, y, workspace);
    });
    if (cb->profile)
        fprintf(stderr, "cudnn %s B%" PRId64 " %" PRId64 "->%" PRId64 " %" PRId64 "x%" PRId64
                " k%d s%d: bias fused %.1f us, written first %.1f us\n", dtype_name(type), s->B,
                s->C, s->O, s->H, s->W, s->k, s->stride, fused * 1e3f, first * 1e3f);
    return fused >= 0.0f && (first < 0.0f || fused <= first) ? 1 : -1;
}

/* The legacy path: the bias as choose_bias_path found faster, a residual
 * in the same call where the bias is fused, else added after. */
static int conv_legacy(cuda_backend *cb, const conv_plan *p, const conv_shape *s, dtype type,
                       const void *x, const void *w, const void *bias, const void *r, void *y,
                       void *workspace) {
    const bool fused = bias && p->fuse_bias > 0;
    int rc = fused ? cudnn_ok(conv_fused(cb, p, x, w, bias, r, y, workspace),
                              "cudnnConvolutionBiasActivationForward")
                   : conv_bias_first(cb, p, s, type, x, w, bias, y, workspace);
    return !rc && r && !fused ? cuda_add(cb, type, y, r, s->B * s->Ho * s->Wo * s->O, 1.0f) : rc;
}

/* Largest difference, relative to the output's largest value, that a graph
 * plan may show against the legacy path: half's rounding and another
 * order of summation, not a wrong result. */
#define GRAPH_AGREEMENT 1e-2f

/* Whether graph plan g computes what the legacy path does, on these
 * tensors (y is overwritten). */
static bool graph_agrees(cuda_backend *cb, conv_plan *p, const conv_shape *s, dtype type,
                         const conv_graph *g, const void *x, const void *w, const void *bias,
                         const void *r, void *y, void *workspace) {
    const int64_t n = s->B * s->Ho * s->Wo * s->O;
    cuda_buf ref = {};
    float diff = -1.0f;
    if (cuda_buf_alloc(cb, &ref, (size_t)n * dtype_size(type)) == 0 &&
        conv_legacy(cb, p, s, type, x, w, bias, r, ref.ptr, workspace) == 0 &&
        conv_graph_run(cb, g, x, w, bias, r, y) == 0)
        diff = cuda_relative_difference(cb, type, y, ref.ptr, n);
    cuda_buf_free(cb, &ref);
    sdx4_error_clear();
    if (cb->profile) fprintf(stderr, "  graph API against legacy: %.2e\n", diff);
    return diff >= 0.0f && diff <= GRAPH_AGREEMENT;
}

/* Makes the graph API's plan for these operands and keeps it if it beats
 * the legacy path (both timed on the real tensors) and computes the same
 * (checked once, on those tensors). With use_cache, a choice on file
 * replaces the timing, not the check; one that no longer builds or agrees
 * is timed as new, and its record replaced. */
static void try_graph(cuda_backend *cb, conv_plan *p, const conv_shape *s, dtype type,
                      const void *x, const void *w, const void *bias, const void *r, void *y,
                      void *workspace, int slot, bool use_cache) {
    p->graph_tried[slot] = true;
    const int64_t xd[4] = {s->B, s->C, s->H, s->W}, wd[4] = {s->O, s->C, s->k, s->k},
                  yd[4] = {s->B, s->O, s->Ho, s->Wo};
    char ck[192], extra[48];
    snprintf(extra, sizeof extra, " bias %d r %d path %d", bias != NULL, r != NULL, (int)cb->conv);
    choice_key(ck, sizeof ck, "conv-graph", p->key, extra);
    const conv_graph_choice *cached =
        use_cache ? (const conv_graph_choice *)cuda_choice_get(cb, ck, sizeof *cached) : NULL;
    if (cached && !cached->taken) return; /* the legacy call won */
    if (cached) {
        conv_graph *g = conv_graph_build(cb, type, xd, wd, yd, s->stride, s->pad, bias != NULL,
                                         r != NULL, cached);
        if (g && graph_agrees(cb, p, s, type, g, x, w, bias, r, y, workspace)) {
            p->graph[slot] = g;
            p->cached = true;
            return;
        }
        conv_graph_free(g);
    }
    p->timings++;
    conv_graph_choice chosen = {};
    float graph_ms = -1.0f;
    conv_graph *g = conv_graph_plan(cb, type, xd, wd, yd, s->stride, s->pad, x, w, bias, r, y,
                                    &graph_ms);
    if (!g) {
        cuda_choice_put(cb, ck, &chosen, sizeof chosen);
        return;
    }
    float legacy_ms = cuda_time_runs(cb, [&] {
        return conv_legacy(cb, p, s, type, x, w, bias, r, y, workspace);
    });
    if (cb->profile)
        fprintf(stderr, "cudnn %s B%" PRId64 " %" PRId64 "->%" PRId64 " %" PRId64 "x%" PRId64
                " k%d s%d%s%s: graph API %.1f us, legacy %.1f us\n", dtype_name(type), s->B,
                s->C, s->O, s->H, s->W, s->k, s->stride, bias ? " +bias" : "", r ? " +r" : "",
                graph_ms * 1e3f, legacy_ms * 1e3f);
    bool take = legacy_ms < 0.0f || graph_ms < legacy_ms || cb->conv == CONV_CUDNN_GRAPH;
    /* and only if it computes what the legacy path does, on these tensors */
    take = take && graph_agrees(cb, p, s, type, g, x, w, bias, r, y, workspace);
    /* a plan cuDNN will not describe is kept here but not on file */
    if (!take || conv_graph_describe(g, &chosen)) cuda_choice_put(cb, ck, &chosen, sizeof chosen);
    if (take) p->graph[slot] = g;
    else conv_graph_free(g);
}

/* How the bias is added (fuse_bias): cached where the file has a choice
 * for this algorithm, else timed (choose_bias_path) and stored. */
static int bias_path(cuda_backend *cb, conv_plan *p, const conv_shape *s, dtype type,
                     const void *x, const void *w, const void *bias, void *y, void *workspace,
                     bool use_cache) {
    char ck[192], extra[32];
    snprintf(extra, sizeof extra, " algo %d", (int)p->algo);
    choice_key(ck, sizeof ck, "conv-bias", p->key, extra);
    const int32_t *cached = use_cache ? (const int32_t *)cuda_choice_get(cb, ck, sizeof *cached)
                                      : NULL;
    /* fused exists only for IMPLICIT_PRECOMP_GEMM (choose_bias_path) */
    if (cached && (*cached == -1 ||
                   (*cached == 1 && p->algo == CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM))) {
        p->cached = true;
        return *cached;
    }
    p->timings++;
    int32_t chosen = choose_bias_path(cb, p, s, type, x, w, bias, y, workspace);
    cuda_choice_put(cb, ck, &chosen, sizeof chosen);
    return chosen;
}

/* Unlinks and frees a plan of cb->plans. */
static void plan_drop(cuda_backend *cb, conv_plan *p) {
    conv_plan **at = &cb->plans;
    while (*at && *at != p) at = &(*at)->next;
    if (*at) *at = p->next;
    plan_free(p);
}

/* y = conv(x) (+ bias) (+ r): 0 done, 1 no cuDNN algorithm (use im2col),
 * -1 error. A residual goes into the fused call where the bias does, else
 * it is added after (conv_legacy), or into the graph API's plan. use_cache:
 * new choices may come from the plan cache (see the top comment). */
static int conv_cudnn_choosing(cuda_backend *cb, const conv_shape *s, dtype type, const void *x,
                               const void *w, const void *bias, const void *r, void *y,
                               bool use_cache) {
    /* cuDNN describes tensors with int dimensions and counts */
    if (s->B * s->C * s->H * s->W > INT_MAX || s->B * s->O * s->Ho * s->Wo > INT_MAX) return 1;
    int64_t key[PLAN_KEY] = {s->B, s->C, s->H, s->W, s->O, s->k, s->stride, s->pad, type,
                             cb->allow_tf32};
    conv_plan *p = cb->plans;
    while (p && memcmp(p->key, key, sizeof key)) p = p->next;
    const int timings = p ? p->timings : 0;
    if (!p && !(p = make_plan(cb, s, type, key, x, w, y, use_cache))) return -1;
    if (!p->usable) {
        if (p->timings != timings) cuda_profile_label(cb->profile, " (choosing the algorithm)");
        return 1;
    }
    cuda_buf workspace = {};
    if (p->workspace && cuda_buf_alloc(cb, &workspace, p->workspace)) return -1;
    /* the trials wait for the stream: not while recording */
    if (bias && !p->fuse_bias && !cb->recording)
        p->fuse_bias = bias_path(cb, p, s, type, x, w, bias, y, workspace.ptr, use_cache);
    const int slot = (bias != NULL) + 2 * (r != NULL);
    if (!p->graph_tried[slot] && !cb->recording && type != DTYPE_F32 &&
        cb->conv != CONV_CUDNN_LEGACY)
        try_graph(cb, p, s, type, x, w, bias, r, y, workspace.ptr, slot, use_cache);
    if (p->timings != timings) cuda_profile_label(cb->profile, " (choosing the algorithm)");
    int rc = p->graph[slot] ? conv_graph_run(cb, p->graph[slot], x, w, bias, r, y) : 1;
    if (rc != 0 && p->graph[slot] && !cb->recording) { /* drop a plan that fails: legacy */
        if (cb->profile)
            fprintf(stderr, "cudnn: graph API plan failed, legacy from now on: %s\n",
                    sdx4_last_error());
        sdx4_error_clear();
        conv_graph_free(p->graph[slot]);
        p->graph[slot] = NULL;
    }
    if (!p->graph[slot]) rc = conv_legacy(cb, p, s, type, x, w, bias, r, y, workspace.ptr);
    cuda_buf_free(cb, &workspace);
    if (rc != 0 && p->cached && !cb->recording) { /* a cached choice that fails: time anew */
        if (cb->profile)
            fprintf(stderr, "cudnn: a cached choice failed, timing the shape again: %s\n",
                    sdx4_last_error());
        sdx4_error_clear();
        (void)cudaGetLastError();
        plan_drop(cb, p);
        return conv_cudnn_choosing(cb, s, type, x, w, bias, r, y, false);
    }
    if (rc == 0) p->cached = false;
    return rc;
}

static int conv_cudnn(cuda_backend *cb, const conv_shape *s, dtype type, const void *x,
                      const void *w, const void *bias, const void *r, void *y) {
    return conv_cudnn_choosing(cb, s, type, x, w, bias, r, y, true);
}

/* `rows` rows of src_c channels copied into b, widened with zeros to
 * dst_c: b's memory, or NULL with the error set. */
static void *widened(cuda_backend *cb, dtype type, cuda_buf *b, const void *src, int64_t src_c,
                     int64_t dst_c, int64_t rows) {
    if (cuda_buf_alloc(cb, b, (size_t)(rows * dst_c) * dtype_size(type)) ||
        cuda_copy_channels(cb, type, src, src_c, b->ptr, dst_c, rows))
        return NULL;
    return b->ptr;
}

/* cuDNN's tensor-core kernels want channel counts that are multiples of 8
 * (16 bytes of half): the UNet's first convolution has 7 input channels
 * and its last 4 outputs, the VAE's 4 in and 3 out, and those fall back to
 * slow kernels. Such a convolution runs on copies widened with zero
 * channels (which add nothing), and the output's extra channels are
 * dropped. 0 done, 1 no cuDNN algorithm, -1 error. */
static int conv_cudnn_widened(cuda_backend *cb, const conv_shape *s, dtype type, const void *x,
                              const void *w, const void *bias, void *y) {
    conv_shape w8 = *s;
    w8.C = (s->C + 7) / 8 * 8, w8.O = (s->O + 7) / 8 * 8;
    int64_t pixels = s->B * s->H * s->W, out_pixels = s->B * s->Ho * s->Wo, taps = s->k * s->k;
    cuda_buf xb = {}, wb = {}, bb = {}, yb = {};
    const void *xp = x, *bp = bias;
    void *yp = y;
    /* the weights [O, k, k, C] widened, and zero filters for the extra outputs */
    int rc = cuda_buf_alloc(cb, &wb, (size_t)(w8.O * taps * w8.C) * dtype_size(type)) ||
                     cuda_ok(cudaMemsetAsync(wb.ptr, 0, wb.bytes, cb->stream), "conv2d: memset") ||
                     cuda_copy_channels(cb, type, w, s->C, wb.ptr, w8.C, s->O * taps)
                 ? -1
                 : 0;
    if (!rc && w8.C != s->C && !(xp = widened(cb, type, &xb, x, s->C, w8.C, pixels))) rc = -1;
    if (!rc && w8.O != s->O && bias && !(bp = widened(cb, type, &bb, bias, s->O, w8.O, 1)))
        rc = -1;
    if (!rc && w8.O != s->O) {
        rc = cuda_buf_alloc(cb, &yb, (size_t)(out_pixels * w8.O) * dtype_size(type));
        yp = yb.ptr;
    }
    if (!rc) rc = conv_cudnn(cb, &w8, type, xp, wb.ptr, bp, NULL, yp);
    if (!rc && w8.O != s->O) rc = cuda_copy_channels(cb, type, yp, w8.O, y, s->O, out_pixels);
    cuda_buf_free(cb, &xb);
    cuda_buf_free(cb, &wb);
    cuda_buf_free(cb, &bb);
    cuda_buf_free(cb, &yb);
    return rc;
}

#endif

/* ------------------------------------------------------------- operation */

/* conv2d, and conv2d_add with r (else NULL): the residual goes into
 * cuDNN's fused call where the bias does, else it is added after. */
static tensor *conv_residual(backend *be, const char *op, const tensor *x, const tensor *w,
                             const tensor *bias, int stride, int padding, const tensor *r) {
    cuda_lock lock(be, op);
    if (!lock) return NULL;
    cuda_backend *cb = lock.cb;
    if (cuda_check(cb, op, "input", x, 4) || cuda_check(cb, op, "weight", w, 4)) return NULL;
    if (bias && cuda_check(cb, op, "bias", bias, 0)) return NULL;
    if (r && cuda_check(cb, op, "residual", r, 4)) return NULL;
    conv_shape s = {x->shape[0], x->shape[1], x->shape[2], x->shape[3], w->shape[0], 0, 0,
                    (int)w->shape[2], stride, padding};
    if (sdx4_check_conv2d(x, w, bias, stride, padding, "cuBLAS", &s.Ho, &s.Wo)) return NULL;
    int64_t shape[4] = {s.B, s.O, s.Ho, s.Wo};
    if (r && sdx4_check_residual(op, r, 4, shape)) return NULL;
    cuda_profile_label(cb->profile, " %s k%d s%d B%" PRId64 " %" PRId64 "->%" PRId64 " %" PRId64
                       "x%" PRId64, dtype_name(x->type), s.k, stride, s.B, s.C, s.O, s.H, s.W);
    dtype type = x->type;
    cuda_buf w_tmp = {}, b_tmp = {}, r_tmp = {};
    const void *wd = NULL, *bd = NULL, *rd = NULL;
    tensor *y = NULL;
    int rc = -1;
    if ((wd = cuda_data_as(cb, w, type, &w_tmp)) &&
        (!bias || (bd = cuda_data_as(cb, bias, type, &b_tmp))) &&
        (!r || (rd = cuda_data_as(cb, r, type, &r_tmp))) &&
        (y = cuda_tensor_new(cb, 4, shape, type))) {
        rc = 1;
#ifdef SDX4_HAVE_CUDNN
        /* a 1x1 convolution is a GEMM: cuBLAS without cuDNN's overhead */
        bool gemm = s.k == 1 && stride == 1 && padding == 0;
        bool narrow = (s.C % 8 || s.O % 8) && type != DTYPE_F32;
        if (cb->conv != CONV_IM2COL && !gemm && narrow) { /* the residual is added below */
            rc = conv_cudnn_widened(cb, &s, type, x->data, wd, bd, y->data);
        } else if (cb->conv != CONV_IM2COL && !gemm) {
            rc = conv_cudnn(cb, &s, type, x->data, wd, bd, rd, y->data);
            if (rc == 0) rd = NULL; /* added by it */
        }
#endif
        if (rc == 1) rc = conv_im2col(cb, &s, type, x->data, wd, bd, y->data);
        if (!rc && rd) rc = cuda_add(cb, type, y->data, rd, tensor_numel(y), 1.0f);
    }
    if (rc) {
        cuda_tensor_release(cb, y);
        y = NULL;
    }
    cuda_buf_free(cb, &w_tmp);
    cuda_buf_free(cb, &b_tmp);
    cuda_buf_free(cb, &r_tmp);
    return y;
}

tensor *cuda_conv2d(backend *be, const tensor *x, const tensor *w, const tensor *bias, int stride,
                    int padding) {
    return conv_residual(be, "conv2d", x, w, bias, stride, padding, NULL);
}

tensor *cuda_conv2d_add(backend *be, const tensor *x, const tensor *w, const tensor *bias,
                        int stride, int padding, const tensor *r) {
    return conv_residual(be, "conv2d_add", x, w, bias, stride, padding, r);
}
