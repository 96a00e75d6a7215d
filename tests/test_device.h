/*
 * test_device.h - which backend the golden tests run on.
 *
 * SDX4_TEST_DEVICE=cuda runs them on the CUDA backend (the GPU machine's
 * scripts/device-check.sh does), else the CPU, with the settings of
 * SDX4_CUDA_DTYPE, _VAE, _CONV, _GRAPH and _PLAN. In the CUDA
 * backend's fp16 mode (its default; SDX4_CUDA_DTYPE=fp32 for float) the
 * issue's half-precision tolerances apply instead of the reference
 * README's.
 */
#ifndef SDX4_TEST_DEVICE_H
#define SDX4_TEST_DEVICE_H

#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/error.h"

static int test_half_precision; /* set by test_backend() */

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
    backend *be = sdx4_backend_cpu_create(0);
    if (!be) {
        fprintf(stderr, "cpu backend: %s\n", sdx4_last_error());
        exit(1);
    }
    return be;
}

#endif
