/*
 * backend.c - what backend.h gives every backend alike: steps on a backend
 * that records none, and the check of the CUDA backend's settings.
 *
 * A step (backend.h) is the backend's to run. A backend without step
 * entries (CUDA with graphs off) runs fn at every call: such a step keeps
 * nothing, and is an allocation only so that NULL still means failure.
 *
 * The CUDA and CPU settings are checked here, in every build, rather than
 * in their backends, so that a bad value is refused where there is no
 * GPU too: the same options then open the same engine, or fail the same
 * way, on every machine.
 */
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/error.h"

backend_step *sdx4_step_new(backend *be) {
    if (be->step_new) return be->step_new(be);
    backend_step *s = malloc(1);
    if (!s) sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
    return s;
}

int sdx4_step_run(backend *be, backend_step *s, int (*fn)(void *ctx), void *ctx) {
    return be->step_run ? be->step_run(be, s, fn, ctx) : fn(ctx);
}

void sdx4_step_free(backend *be, backend_step *s) {
    if (!s) return;
    if (be->step_free) be->step_free(be, s);
    else free(s);
}

int sdx4_step_replays(const backend *be) { return be->replays_steps; }

/* The index of `value` among `choices` (NULL or "": 0, the default), or -1. */
static int choice(const char *value, const char *const *choices, int n) {
    if (!value || !*value) return 0;
    for (int i = 0; i < n; i++)
        if (!strcmp(value, choices[i])) return i;
    return -1;
}

int sdx4_cuda_settings_parse(const sdx4_cuda_options *o, cuda_settings *s) {
    static const char *const modes[] = {"fp16", "fp32"}, *const vaes[] = {"bf16", "fp32"};
    static const char *const convs[] = {"cudnn", "cudnn-graph", "cudnn-legacy", "im2col"};
    static const conv_path paths[] = {CONV_CUDNN, CONV_CUDNN_GRAPH, CONV_CUDNN_LEGACY, CONV_IM2COL};
    const sdx4_cuda_options defaults = {0};
    if (!o) o = &defaults;
    int mode = choice(o->dtype, modes, 2), vae = choice(o->vae, vaes, 2);
    int conv = choice(o->conv, convs, 4);
    if (mode < 0) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "cuda.dtype \"%s\": expected fp16 or fp32", o->dtype);
        return -1;
    }
    if (vae < 0) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "cuda.vae \"%s\": expected bf16 or fp32", o->vae);
        return -1;
    }
    if (conv < 0) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                  "cuda.conv \"%s\": expected cudnn, cudnn-graph, cudnn-legacy or im2col", o->conv);
        return -1;
    }
    *s = (cuda_settings){
        .mode = mode ? DTYPE_F32 : DTYPE_F16,
        .allow_bf16 = vae == 0,
        .conv = paths[conv],
        .use_graphs = !o->no_graphs,
        .use_plans = !o->no_plans,
        .profile = o->profile != 0,
        .plan_cache = o->plan_cache,
    };
    return 0;
}

int sdx4_cpu_settings_parse(const sdx4_cpu_options *o, cpu_dense_path *path) {
    static const char *const dtypes[] = {"fp32", "bf16"};
    int dt = choice(o ? o->dtype : NULL, dtypes, 2);
    if (dt < 0) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "cpu.dtype \"%s\": expected fp32 or bf16", o->dtype);
        return -1;
    }
    *path = dt ? CPU_DENSE_ONEDNN_BF16 : CPU_DENSE_BLAS;
    return 0;
}
