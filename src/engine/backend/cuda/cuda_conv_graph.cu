/*
 * cuda_conv_graph.cu - convolutions through cuDNN's graph (backend) API.
 *
 * The legacy cudnnConvolutionForward reaches only the engines behind its
 * algorithms; the graph API's heuristics also offer the engines built for
 * the GPU at hand, and take the bias and a residual as pointwise additions
 * in the convolution's epilogue:
 *
 *     y = conv(x, w) [+ bias[c]] [+ r]        (float until y is written)
 *
 * A plan for one shape takes the heuristics' (mode A) first candidates
 * whose numerics are allowed (float accumulation, inputs not converted)
 * and that finalize, times each on the real tensors as cudnnFind does, and
 * keeps the fastest; cuda_conv.cu keeps it only where it beats the legacy
 * plan. Half and bfloat16 tensors only: fp32 mode stays on the legacy
 * path, whose math type excludes TF32.
 *
 * A plan's choice (the engine's global index and its knob choices) goes
 * to the plan cache (cuda_internal.h), and conv_graph_build makes the same
 * plan from it in a later process without the heuristics or the timing;
 * cuDNN's JSON serialization of plans would do it too, but only for its
 * runtime-compiled engines.
 *
 * Tensors are described in cuDNN's logical [N, C, H, W] order with the
 * strides of channels-last memory (cuda_internal.h), the weights as
 * [O, C, k, k] stored [O, k, k, C].
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "backend/cuda/cuda_internal.h"

#ifdef SDX4_HAVE_CUDNN

#define GRAPH_CANDIDATES 8 /* engine configurations timed per shape */

enum { UID_X = 1, UID_W, UID_Y, UID_BIAS, UID_R, UID_CONV_OUT, UID_BIASED };

/* made_from: the graph's 15 descriptors (see conv_graph_plan), then the
 * engine configurations, then, for a plan rebuilt from a cached choice,
 * its knob choices */
#define MADE_FROM (15 + GRAPH_CANDIDATES + GRAPH_KNOBS)

struct conv_graph {
    cudnnBackendDescriptor_t plan;
    /* what the plan was made from, kept while it lives: whether cuDNN's
     * backend copies them into a finalized plan is not documented, and
     * cudnn-frontend keeps them */
    cudnnBackendDescriptor_t made_from[MADE_FROM];
    cudnnBackendDescriptor_t cfg; /* the plan's engine configuration (in made_from) */
    int64_t workspace;
    int bias, residual;
};

typedef cudnnBackendDescriptor_t desc_t;

/* The host's clock, for the profile: building a plan (compiling its
 * kernel, for some engines) is host time that GPU events do not see. */
static double host_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e3 * (double)ts.tv_sec + 1e-6 * (double)ts.tv_nsec;
}

/* A chain of attribute settings that stops at the first failure. */
struct attrs {
    desc_t d;
    cudnnStatus_t st;
    attrs &set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, int64_t n,
               const void *v) {
        if (st == CUDNN_STATUS_SUCCESS) st = cudnnBackendSetAttribute(d, name, type, n, v);
        return *this;
    }
    cudnnStatus_t finalize() {
        return st == CUDNN_STATUS_SUCCESS ? cudnnBackendFinalize(d) : st;
    }
};

static void destroy(desc_t *d, int n) {
    for (int i = 0; i < n; i++)
        if (d[i]) (void)cudnnBackendDestroyDescriptor(d[i]), d[i] = NULL;
}

/* A finalized tensor descriptor, or NULL. dims [N, C, H, W]; channels-last
 * strides; virtual tensors are the epilogue's float intermediates. */
static desc_t tensor_desc(int64_t uid, cudnnDataType_t dt, const int64_t dims[4], bool virt) {
    const int64_t strides[4] = {dims[1] * dims[2] * dims[3], 1, dims[3] * dims[1], dims[1]};
    const int64_t align = 16;
    desc_t d = NULL;
    if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_TENSOR_DESCRIPTOR, &d) != CUDNN_STATUS_SUCCESS)
        return NULL;
    attrs a = {d, CUDNN_STATUS_SUCCESS};
    a.set(CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &dt)
        .set(CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims)
        .set(CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides)
        .set(CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid)
        .set(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &align)
        .set(CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &virt);
    if (a.finalize() != CUDNN_STATUS_SUCCESS) destroy(&d, 1);
    return d;
}

/* out = in + addend (float math), a finalized operation or NULL. */
static desc_t add_op(desc_t in, desc_t addend, desc_t out, desc_t *pw) {
    cudnnPointwiseMode_t mode = CUDNN_POINTWISE_ADD;
    cudnnDataType_t prec = CUDNN_DATA_FLOAT;
    desc_t op = NULL;
    if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_POINTWISE_DESCRIPTOR, pw) !=
            CUDNN_STATUS_SUCCESS ||
        attrs{*pw, CUDNN_STATUS_SUCCESS}
                .set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode)
                .set(CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &prec)
                .finalize() != CUDNN_STATUS_SUCCESS ||
        cudnnBackendCreateDescriptor(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, &op) !=
            CUDNN_STATUS_SUCCESS)
        return NULL;
    attrs a = {op, CUDNN_STATUS_SUCCESS};
    a.set(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, pw)
        .set(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &in)
        .set(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &addend)
        .set(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &out);
    if (a.finalize() != CUDNN_STATUS_SUCCESS) destroy(&op, 1);
    return op;
}

/* Whether an engine configuration's numerics are allowed: float
 * accumulation, inputs used as they are. */
static bool numerics_allowed(desc_t cfg) {
    desc_t engine = NULL;
    cudnnBackendNumericalNote_t notes[CUDNN_NUMERICAL_NOTE_TYPE_COUNT];
    int64_t n = 0;
    bool ok = cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINE_DESCRIPTOR, &engine) ==
                  CUDNN_STATUS_SUCCESS &&
              cudnnBackendGetAttribute(cfg, CUDNN_ATTR_ENGINECFG_ENGINE,
                                       CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &n, &engine) ==
                  CUDNN_STATUS_SUCCESS &&
              cudnnBackendGetAttribute(engine, CUDNN_ATTR_ENGINE_NUMERICAL_NOTE,
                                       CUDNN_TYPE_NUMERICAL_NOTE, CUDNN_NUMERICAL_NOTE_TYPE_COUNT,
                                       &n, notes) == CUDNN_STATUS_SUCCESS;
    for (int64_t i = 0; ok && i < n; i++)
        ok = notes[i] != CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS &&
             notes[i] != CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION;
    destroy(&engine, 1);
    return ok;
}

static int run_plan(cuda_backend *cb, desc_t plan, const void *x, const void *w, const void *bias,
                    const void *r, void *y, void *workspace) {
    int64_t uids[5] = {UID_X, UID_W, UID_Y, 0, 0};
    void *ptrs[5] = {(void *)x, (void *)w, y, NULL, NULL};
    int n = 3;
    if (bias) uids[n] = UID_BIAS, ptrs[n++] = (void *)bias;
    if (r) uids[n] = UID_R, ptrs[n++] = (void *)r;
    desc_t pack = NULL;
    cudnnStatus_t st = cudnnBackendCreateDescriptor(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &pack);
    if (st == CUDNN_STATUS_SUCCESS)
        st = attrs{pack, st}
                 .set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, n, uids)
                 .set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, n, ptrs)
                 .set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &workspace)
                 .finalize();
    if (st == CUDNN_STATUS_SUCCESS) st = cudnnBackendExecute(cb->cudnn, plan, pack);
    destroy(&pack, 1);
    if (st == CUDNN_STATUS_SUCCESS) return 0;
    sdx4_set_error(SDX4_ERR_DEVICE, "conv2d: cudnnBackendExecute: %s", cudnnGetErrorString(st));
    return -1;
}

/* The operation graph of y = conv(x, w) [+ bias] [+ r] into d[0..13]
 * (see conv_graph_plan for which is which); false if cuDNN refuses it. */
static bool describe(cuda_backend *cb, dtype type, const int64_t xdims[4], const int64_t wdims[4],
                     const int64_t ydims[4], int stride, int pad, bool bias, bool r, desc_t d[15]) {
    cudnnDataType_t dt = type == DTYPE_F16 ? CUDNN_DATA_HALF : CUDNN_DATA_BFLOAT16;
    cudnnDataType_t fl = CUDNN_DATA_FLOAT;
    const int64_t bdims[4] = {1, ydims[1], 1, 1};
    const bool fused = bias || r;
    d[0] = tensor_desc(UID_X, dt, xdims, false);
    d[1] = tensor_desc(UID_W, dt, wdims, false);
    d[2] = tensor_desc(UID_Y, dt, ydims, false);
    if (bias) d[3] = tensor_desc(UID_BIAS, dt, bdims, false);
    if (r) d[4] = tensor_desc(UID_R, dt, ydims, false);
    if (fused) d[5] = tensor_desc(UID_CONV_OUT, fl, ydims, true);
    if (bias && r) d[6] = tensor_desc(UID_BIASED, fl, ydims, true);
    if (!d[0] || !d[1] || !d[2] || (bias && !d[3]) || (r && !d[4]) || (fused && !d[5]) ||
        (bias && r && !d[6]))
        return false;
    {
        const int64_t dims = 2, one[2] = {1, 1}, strides[2] = {stride, stride},
                      pads[2] = {pad, pad};
        cudnnConvolutionMode_t mode = CUDNN_CROSS_CORRELATION;
        if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR, &d[7]) !=
                CUDNN_STATUS_SUCCESS ||
            attrs{d[7], CUDNN_STATUS_SUCCESS}
                    .set(CUDNN_ATTR_CONVOLUTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &fl)
                    .set(CUDNN_ATTR_CONVOLUTION_CONV_MODE, CUDNN_TYPE_CONVOLUTION_MODE, 1, &mode)
                    .set(CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, CUDNN_TYPE_INT64, 1, &dims)
                    .set(CUDNN_ATTR_CONVOLUTION_DILATIONS, CUDNN_TYPE_INT64, 2, one)
                    .set(CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES, CUDNN_TYPE_INT64, 2, strides)
                    .set(CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, CUDNN_TYPE_INT64, 2, pads)
                    .set(CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, CUDNN_TYPE_INT64, 2, pads)
                    .finalize() != CUDNN_STATUS_SUCCESS)
            return false;
    }
    {
        const float alpha = 1.0f, beta = 0.0f;
        desc_t conv_out = fused ? d[5] : d[2];
        if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR,
                                         &d[8]) != CUDNN_STATUS_SUCCESS ||
            attrs{d[8], CUDNN_STATUS_SUCCESS}
                    .set(CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                         1, &d[0])
                    .set(CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                         1, &d[1])
                    .set(CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                         1, &conv_out)
                    .set(CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
                         CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &d[7])
                    .set(CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA, CUDNN_TYPE_FLOAT, 1, &alpha)
                    .set(CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA, CUDNN_TYPE_FLOAT, 1, &beta)
                    .finalize() != CUDNN_STATUS_SUCCESS)
            return false;
    }
    {
        desc_t ops[3] = {d[8], NULL, NULL};
        int64_t nops = 1;
        if (bias && !(ops[nops++] = d[10] = add_op(d[5], d[3], r ? d[6] : d[2], &d[9]))) return false;
        if (r && !(ops[nops++] = d[12] = add_op(bias ? d[6] : d[5], d[4], d[2], &d[11])))
            return false;
        if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, &d[13]) !=
                CUDNN_STATUS_SUCCESS ||
            attrs{d[13], CUDNN_STATUS_SUCCESS}
                    .set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, nops, ops)
                    .set(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &cb->cudnn)
                    .finalize() != CUDNN_STATUS_SUCCESS)
            return false;
    }
    return true;
}

conv_graph *conv_graph_plan(cuda_backend *cb, dtype type, const int64_t xdims[4],
                            const int64_t wdims[4], const int64_t ydims[4], int stride, int pad,
                            const void *x, const void *w, const void *bias, const void *r,
                            void *y, float *best_ms) {
    if (type == DTYPE_F32) return NULL;
    /* descriptors: 0-4 tensors x w y bias r, 5-6 intermediates, 7 conv,
     * 8 conv op, 9-12 pointwise descs and ops, 13 graph, 14 heuristics */
    desc_t d[15] = {NULL};
    desc_t cfgs[GRAPH_CANDIDATES] = {NULL};
    conv_graph *best = NULL;
    cuda_buf workspace = {};
    if (!describe(cb, type, xdims, wdims, ydims, stride, pad, bias, r, d)) goto done;
    {
        cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
        if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, &d[14]) !=
                CUDNN_STATUS_SUCCESS ||
            attrs{d[14], CUDNN_STATUS_SUCCESS}
                    .set(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1,
                         &d[13])
                    .set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode)
                    .finalize() != CUDNN_STATUS_SUCCESS)
            goto done;
    }
    {
        int64_t found = 0;
        for (int i = 0; i < GRAPH_CANDIDATES; i++)
            if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, &cfgs[i]) !=
                CUDNN_STATUS_SUCCESS)
                goto done;
        if (cudnnBackendGetAttribute(d[14], CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                     CUDNN_TYPE_BACKEND_DESCRIPTOR, GRAPH_CANDIDATES, &found,
                                     cfgs) != CUDNN_STATUS_SUCCESS)
            goto done;
        for (int64_t i = 0; i < found; i++) {
            desc_t plan = NULL;
            int64_t ws = 0, n = 0;
            const double build_start = host_ms();
            if (!numerics_allowed(cfgs[i]) ||
                cudnnBackendCreateDescriptor(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, &plan) !=
                    CUDNN_STATUS_SUCCESS)
                continue;
            bool ok =
                attrs{plan, CUDNN_STATUS_SUCCESS}
                        .set(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &cb->cudnn)
                        .set(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG,
                             CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &cfgs[i])
                        .finalize() == CUDNN_STATUS_SUCCESS &&
                cudnnBackendGetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                         CUDNN_TYPE_INT64, 1, &n, &ws) == CUDNN_STATUS_SUCCESS &&
                ws <= CONV_GRAPH_WORKSPACE_LIMIT;
            const double built_ms = host_ms() - build_start;
            if (ok && (size_t)ws > workspace.bytes) {
                cuda_buf_free(cb, &workspace);
                ok = cuda_buf_alloc(cb, &workspace, (size_t)ws) == 0;
            }
            const float ms = ok ? cuda_time_runs(cb, [&] {
                return run_plan(cb, plan, x, w, bias, r, y, workspace.ptr);
            }) : -1.0f;
            ok = ms >= 0.0f;
            if (cb->profile)
                fprintf(stderr, "cudnn graph %s [%" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64
                        "] -> %" PRId64 " k%" PRId64 "%s%s: candidate %" PRId64
                        " %s %.1f us, built in %.1f ms\n",
                        dtype_name(type), xdims[0], xdims[1], xdims[2], xdims[3], ydims[1],
                        wdims[2], bias ? " +bias" : "", r ? " +r" : "", i,
                        ok ? "ran" : "failed", ok ? ms * 1e3f : 0.0f, built_ms);
            if (ok && (!best || ms < *best_ms)) {
                if (!best && !(best = (conv_graph *)calloc(1, sizeof *best))) ok = false;
                if (ok) {
                    if (best->plan) (void)cudnnBackendDestroyDescriptor(best->plan);
                    best->plan = plan, plan = NULL;
                    best->cfg = cfgs[i]; /* moved into made_from below, not destroyed */
                    best->workspace = ws, best->bias = bias != NULL, best->residual = r != NULL;
                    *best_ms = ms;
                }
            }
            destroy(&plan, 1);
        }
    }
    if (best) { /* the descriptors go with the plan */
        for (int i = 0; i < 15; i++) best->made_from[i] = d[i], d[i] = NULL;
        for (int i = 0; i < GRAPH_CANDIDATES; i++)
            best->made_from[15 + i] = cfgs[i], cfgs[i] = NULL;
    }
done:
    (void)cudaGetLastError();
    sdx4_error_clear(); /* a candidate that fails is only not taken */
    cuda_buf_free(cb, &workspace);
    destroy(cfgs, GRAPH_CANDIDATES);
    destroy(d, 15);
    return best;
}

int conv_graph_run(cuda_backend *cb, const conv_graph *g, const void *x, const void *w,
                   const void *bias, const void *r, void *y) {
    if ((bias != NULL) != g->bias || (r != NULL) != g->residual) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "conv2d: the plan was made for other operands");
        return -1;
    }
    cuda_buf workspace = {};
    if (g->workspace && cuda_buf_alloc(cb, &workspace, (size_t)g->workspace)) return -1;
    int rc = run_plan(cb, g->plan, x, w, bias, r, y, workspace.ptr);
    cuda_buf_free(cb, &workspace);
    return rc;
}

void conv_graph_free(conv_graph *g) {
    if (!g) return;
    if (g->plan) (void)cudnnBackendDestroyDescriptor(g->plan);
    destroy(g->made_from, MADE_FROM);
    free(g);
}

/* ------------------------------------------- a plan's choice, for the file */

bool conv_graph_describe(const conv_graph *g, conv_graph_choice *c) {
    memset(c, 0, sizeof *c);
    desc_t engine = NULL, knobs[GRAPH_KNOBS] = {NULL};
    int64_t n = 0, count = 0;
    bool ok = g->cfg &&
              cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINE_DESCRIPTOR, &engine) ==
                  CUDNN_STATUS_SUCCESS &&
              cudnnBackendGetAttribute(g->cfg, CUDNN_ATTR_ENGINECFG_ENGINE,
                                       CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &n, &engine) ==
                  CUDNN_STATUS_SUCCESS &&
              cudnnBackendGetAttribute(engine, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64,
                                       1, &n, &c->engine) == CUDNN_STATUS_SUCCESS;
    for (int i = 0; ok && i < GRAPH_KNOBS; i++)
        ok = cudnnBackendCreateDescriptor(CUDNN_BACKEND_KNOB_CHOICE_DESCRIPTOR, &knobs[i]) ==
             CUDNN_STATUS_SUCCESS;
    ok = ok &&
         cudnnBackendGetAttribute(g->cfg, CUDNN_ATTR_ENGINECFG_KNOB_CHOICES,
                                  CUDNN_TYPE_BACKEND_DESCRIPTOR, GRAPH_KNOBS, &count, knobs) ==
             CUDNN_STATUS_SUCCESS &&
         count >= 0 && count <= GRAPH_KNOBS;
    for (int64_t i = 0; ok && i < count; i++) {
        cudnnBackendKnobType_t type;
        ok = cudnnBackendGetAttribute(knobs[i], CUDNN_ATTR_KNOB_CHOICE_KNOB_TYPE,
                                      CUDNN_TYPE_KNOB_TYPE, 1, &n, &type) == CUDNN_STATUS_SUCCESS &&
             cudnnBackendGetAttribute(knobs[i], CUDNN_ATTR_KNOB_CHOICE_KNOB_VALUE,
                                      CUDNN_TYPE_INT64, 1, &n, &c->knob[i][1]) ==
                 CUDNN_STATUS_SUCCESS;
        c->knob[i][0] = (int64_t)type;
    }
    c->knobs = count;
    c->taken = ok;
    destroy(knobs, GRAPH_KNOBS);
    destroy(&engine, 1);
    return ok;
}

conv_graph *conv_graph_build(cuda_backend *cb, dtype type, const int64_t xdims[4],
                             const int64_t wdims[4], const int64_t ydims[4], int stride, int pad,
                             bool bias, bool r, const conv_graph_choice *c) {
    if (type == DTYPE_F32 || !c->taken || c->knobs < 0 || c->knobs > GRAPH_KNOBS) return NULL;
    conv_graph *g = (conv_graph *)calloc(1, sizeof *g);
    if (!g) return NULL;
    desc_t *d = g->made_from, *engine = &d[14], *cfg = &d[15];
    desc_t *knobs = d + 15 + GRAPH_CANDIDATES;
    bool ok = describe(cb, type, xdims, wdims, ydims, stride, pad, bias, r, d) &&
              cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINE_DESCRIPTOR, engine) ==
                  CUDNN_STATUS_SUCCESS &&
              attrs{*engine, CUDNN_STATUS_SUCCESS}
                      .set(CUDNN_ATTR_ENGINE_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1,
                           &d[13])
                      .set(CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &c->engine)
                      .finalize() == CUDNN_STATUS_SUCCESS;
    for (int64_t i = 0; ok && i < c->knobs; i++) {
        cudnnBackendKnobType_t knob = (cudnnBackendKnobType_t)c->knob[i][0];
        ok = cudnnBackendCreateDescriptor(CUDNN_BACKEND_KNOB_CHOICE_DESCRIPTOR, &knobs[i]) ==
                 CUDNN_STATUS_SUCCESS &&
             attrs{knobs[i], CUDNN_STATUS_SUCCESS}
                     .set(CUDNN_ATTR_KNOB_CHOICE_KNOB_TYPE, CUDNN_TYPE_KNOB_TYPE, 1, &knob)
                     .set(CUDNN_ATTR_KNOB_CHOICE_KNOB_VALUE, CUDNN_TYPE_INT64, 1, &c->knob[i][1])
                     .finalize() == CUDNN_STATUS_SUCCESS;
    }
    if (ok) {
        ok = cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, cfg) ==
             CUDNN_STATUS_SUCCESS;
        attrs a = {*cfg, ok ? CUDNN_STATUS_SUCCESS : CUDNN_STATUS_NOT_INITIALIZED};
        a.set(CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, engine);
        if (c->knobs)
            a.set(CUDNN_ATTR_ENGINECFG_KNOB_CHOICES, CUDNN_TYPE_BACKEND_DESCRIPTOR, c->knobs,
                  knobs);
        ok = a.finalize() == CUDNN_STATUS_SUCCESS && numerics_allowed(*cfg);
    }
    int64_t n = 0;
    ok = ok &&
         cudnnBackendCreateDescriptor(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, &g->plan) ==
             CUDNN_STATUS_SUCCESS &&
         attrs{g->plan, CUDNN_STATUS_SUCCESS}
                 .set(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &cb->cudnn)
                 .set(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1,
                      cfg)
                 .finalize() == CUDNN_STATUS_SUCCESS &&
         cudnnBackendGetAttribute(g->plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                  CUDNN_TYPE_INT64, 1, &n, &g->workspace) == CUDNN_STATUS_SUCCESS &&
         g->workspace <= CONV_GRAPH_WORKSPACE_LIMIT;
    (void)cudaGetLastError();
    if (!ok) {
        conv_graph_free(g);
        return NULL;
    }
    g->cfg = *cfg, g->bias = bias, g->residual = r;
    return g;
}

#endif
