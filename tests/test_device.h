/*
 * test_device.h - which backend the golden tests run on.
 *
 * SDX4_TEST_DEVICE=cuda runs them on the CUDA backend (the GPU machine's
 * scripts/device-check.sh does), else the CPU. In the CUDA backend's fp16
 * mode (its default; SDX4_CUDA_DTYPE=fp32 for float) the half-
 * precision tolerances apply instead of the reference README's.
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
        backend *be = backend_cuda_create(0);
        if (!be) {
            printf("skipped: %s\n", sdx4_last_error());
            exit(77);
        }
        const char *mode = getenv("SDX4_CUDA_DTYPE");
        test_half_precision = !(mode && !strcmp(mode, "fp32"));
        printf("device: %s\n", be->description);
        return be;
#else
        printf("skipped: this build has no CUDA backend\n");
        exit(77);
#endif
    }
    backend *be = backend_cpu_create(0);
    if (!be) {
        fprintf(stderr, "cpu backend: %s\n", sdx4_last_error());
        exit(1);
    }
    return be;
}

#endif
