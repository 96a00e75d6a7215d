/*
 * test_device.h - which backend the golden tests run on.
 *
 * SDX4_TEST_DEVICE=cuda runs them on the CUDA backend (the GPU machine's
 * scripts/device-check.sh does), else the CPU, with the settings of
 * SDX4_CUDA_DTYPE, _VAE, _CONV, _GRAPH and _PLAN. In the CUDA
 * backend's fp16 mode (its default; SDX4_CUDA_DTYPE=fp32 for float) the
 * issue's half-precision tolerances apply instead of the reference
 * README's.
 *
 * On the CPU, SDX4_TEST_CPU_DENSE picks how convolutions and linear
 * layers compute (backend.h's cpu_dense_path): unset, the float32 OpenBLAS
 * path; "onednn-fp32", oneDNN in float32 (the README's tolerances hold);
 * "bf16", oneDNN in bfloat16 (skipped, 77, where the CPU has none); and
 * "bf16-operands", float32 oneDNN on operands rounded to bfloat16: the bf16
 * path's arithmetic on any CPU, with which the bfloat16 tolerances were
 * measured. Both bf16 settings set test_bf16, which the golden tests read
 * for their bfloat16 tolerances. "fp8-operands", "fp8-operands-linear"
 * and "fp8-operands-conv": float32 oneDNN on operands quantized to FP8
 * E4M3 with per-tensor scales, of every dense operation, the linear
 * layers only or the convolutions only: FP8's error, emulated (there is
 * no FP8 path to run). They set test_fp8, and test_dense says which.
 */
#ifndef SDX4_TEST_DEVICE_H
#define SDX4_TEST_DEVICE_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/error.h"

static int test_half_precision; /* set by test_backend() */
static int test_bf16;           /* likewise: the CPU's bfloat16 products */
static int test_fp8;            /* likewise: FP8 operands, emulated */
static cpu_dense_path test_dense; /* likewise: the CPU's path (CPU_DENSE_BLAS) */

/* The CPU path SDX4_TEST_CPU_DENSE names (exits 1 on an unknown name). */
static inline cpu_dense_path test_cpu_dense(void) {
    static const struct {
        const char *name;
        cpu_dense_path path;
    } paths[] = {{"onednn-fp32", CPU_DENSE_ONEDNN_F32},
                 {"bf16", CPU_DENSE_ONEDNN_BF16},
                 {"bf16-operands", CPU_DENSE_ONEDNN_F32_BF16_OPERANDS},
                 {"fp8-operands", CPU_DENSE_ONEDNN_F32_FP8_OPERANDS},
                 {"fp8-operands-linear", CPU_DENSE_ONEDNN_F32_FP8_LINEAR_OPERANDS},
                 {"fp8-operands-conv", CPU_DENSE_ONEDNN_F32_FP8_CONV_OPERANDS}};
    const char *v = getenv("SDX4_TEST_CPU_DENSE");
    if (!v || !*v) return CPU_DENSE_BLAS;
    for (size_t i = 0; i < sizeof paths / sizeof *paths; i++)
        if (!strcmp(v, paths[i].name)) return paths[i].path;
    fprintf(stderr, "SDX4_TEST_CPU_DENSE=%s: expected onednn-fp32, bf16, bf16-operands, fp8-operands, "
            "fp8-operands-linear or fp8-operands-conv\n", v);
    exit(1);
}

/* Exits 77 (skip) when a CUDA run was asked for and no device is there. */
static inline backend *test_backend(void) {
    const char *dev = getenv("SDX4_TEST_DEVICE");
    if (dev && !strcmp(dev, "cuda")) {
#ifdef SDX4_HAVE_CUDA
        /* the variables the CLI maps onto the engine's options */
        const char *graph = getenv("SDX4_CUDA_GRAPH"), *plan = getenv("SDX4_CUDA_PLAN");
        sdx4_cuda_options o = {.dtype = getenv("SDX4_CUDA_DTYPE"), .vae = getenv("SDX4_CUDA_VAE"),
                               .conv = getenv("SDX4_CUDA_CONV"),
                               .no_graphs = graph && !strcmp(graph, "0"),
                               .no_plans = plan && !strcmp(plan, "0")};
        cuda_settings settings;
        if (sdx4_cuda_settings_parse(&o, &settings)) {
            fprintf(stderr, "%s\n", sdx4_last_error());
            exit(1);
        }
        backend *be = sdx4_backend_cuda_create(0, &settings);
        if (!be) {
            printf("skipped: %s\n", sdx4_last_error());
            exit(77);
        }
        test_half_precision = settings.mode == DTYPE_F16;
        printf("device: %s\n", be->description);
        return be;
#else
        printf("skipped: this build has no CUDA backend\n");
        exit(77);
#endif
    }
    cpu_dense_path dense = test_cpu_dense();
    backend *be = sdx4_backend_cpu_open(0, dense);
    if (!be && dense == CPU_DENSE_ONEDNN_BF16 && sdx4_error_status() == SDX4_ERR_DEVICE) {
        printf("skipped: %s\n", sdx4_last_error());
        exit(77);
    }
    if (!be) {
        fprintf(stderr, "cpu backend: %s\n", sdx4_last_error());
        exit(1);
    }
    test_bf16 = dense == CPU_DENSE_ONEDNN_BF16 || dense == CPU_DENSE_ONEDNN_F32_BF16_OPERANDS;
    test_fp8 = dense == CPU_DENSE_ONEDNN_F32_FP8_OPERANDS ||
               dense == CPU_DENSE_ONEDNN_F32_FP8_LINEAR_OPERANDS ||
               dense == CPU_DENSE_ONEDNN_F32_FP8_CONV_OPERANDS;
    test_dense = dense;
    if (dense != CPU_DENSE_BLAS) printf("device: %s\n", be->description);
    return be;
}

#endif
