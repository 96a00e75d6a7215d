/*
 * test_cpu_dtype.c - the CPU's precision setting (sdx4.h's cpu.dtype) at
 * each door: the engine's options, the CLI's --dtype, --cpu-dtype and
 * $SDX4_CPU_DTYPE, and `sdx4 serve --cpu-dtype`.
 *
 * A bad value is refused by name whatever the device. "bf16" opens where
 * the CPU has AVX512-BF16 or AMX and the build has oneDNN, and is refused
 * at engine open otherwise, naming what is missing, before the model
 * folder is read: so a folder that is not there tells which happened (its
 * error comes next when the CPU path opened). No model needed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "backend/backend.h"
#include "core/error.h"
#include "sdx4.h"
#include "test.h"

#define NO_MODEL "/nonexistent/sdx4-test-model"

/* Whether this build and CPU run bfloat16 (the flags read apart from
 * oneDNN's dispatch, which the backend asks). */
static int bf16_runs_here(void) {
#ifndef SDX4_HAVE_ONEDNN
    return 0;
#else
    return test_cpu_has_bf16();
#endif
}

/* What refusing bf16 says here: the build's lack, or the CPU's. */
static const char *refusal(void) {
#ifdef SDX4_HAVE_ONEDNN
    return "no AVX512-BF16 or AMX";
#else
    return "no oneDNN";
#endif
}

static void test_parse(void) {
    cpu_dense_path p = CPU_DENSE_ONEDNN_F32;
    CHECK(sdx4_cpu_settings_parse(NULL, &p) == 0 && p == CPU_DENSE_BLAS, "NULL: the default");
    CHECK(sdx4_cpu_settings_parse(&(sdx4_cpu_options){.dtype = ""}, &p) == 0 && p == CPU_DENSE_BLAS,
          "empty: the default");
    CHECK(sdx4_cpu_settings_parse(&(sdx4_cpu_options){.dtype = "fp32"}, &p) == 0 && p == CPU_DENSE_BLAS,
          "fp32");
    CHECK(sdx4_cpu_settings_parse(&(sdx4_cpu_options){.dtype = "bf16"}, &p) == 0 &&
              p == CPU_DENSE_ONEDNN_BF16,
          "bf16");
    CHECK(sdx4_cpu_settings_parse(&(sdx4_cpu_options){.dtype = "fp16"}, &p) == -1 &&
              strstr(sdx4_last_error(), "cpu.dtype \"fp16\": expected fp32 or bf16"),
          "fp16: %s", sdx4_last_error());
}

static void expect_open(const char *what, const char *device, const char *dtype, sdx4_status want,
                        const char *needle) {
    sdx4_engine_options o;
    sdx4_engine_options_default(&o);
    o.model_dir = NO_MODEL;
    o.device = device;
    o.threads = 1;
    o.cpu.dtype = dtype;
    test_expect_open(what, &o, want, needle);
}

static void test_engine(void) {
    expect_open("cpu.dtype fp16", "cpu", "fp16", SDX4_ERR_INVALID_ARGUMENT, "cpu.dtype \"fp16\"");
    expect_open("cpu.dtype fp16 on cuda", "cuda", "fp16", SDX4_ERR_INVALID_ARGUMENT, "cpu.dtype");
    expect_open("cpu.dtype fp32", "cpu", "fp32", SDX4_ERR_MODEL, NO_MODEL);
    if (bf16_runs_here())
        expect_open("cpu.dtype bf16 (runs here)", "cpu", "bf16", SDX4_ERR_MODEL, NO_MODEL);
    else
        expect_open("cpu.dtype bf16 (refused here)", "cpu", "bf16", SDX4_ERR_DEVICE, refusal());
}

static void test_cli(void) {
    char bin[4096];
    snprintf(bin, sizeof bin, "%s/sdx4", getenv("SDX4_BIN") ? getenv("SDX4_BIN") : ".");
    if (access(bin, X_OK) != 0) {
        printf("  %s not built: CLI cases skipped\n", bin);
        return;
    }
    const char *cpu = "bench --device cpu --model " NO_MODEL;
    char args[512];
    /* bf16 runs or is refused at engine open (status 1) */
    int runs = bf16_runs_here();
    snprintf(args, sizeof args, "%s --dtype bf16", cpu);
    test_expect_cli("", args, 1, runs ? NO_MODEL : refusal());
    snprintf(args, sizeof args, "%s --cpu-dtype bf16", cpu);
    test_expect_cli("", args, 1, runs ? NO_MODEL : refusal());
    test_expect_cli("SDX4_CPU_DTYPE=bf16", cpu, 1, runs ? NO_MODEL : refusal());
    /* what --dtype maps to, and what it refuses */
    snprintf(args, sizeof args, "%s --dtype fp32", cpu);
    test_expect_cli("SDX4_CPU_DTYPE=bf16", args, 1, NO_MODEL); /* the flag wins */
    snprintf(args, sizeof args, "%s --cpu-dtype fp32", cpu);
    test_expect_cli("SDX4_CPU_DTYPE=bf16", args, 1, NO_MODEL);
    snprintf(args, sizeof args, "%s --dtype fp16", cpu);
    test_expect_cli("", args, 2, "--dtype fp16: the CPU computes in fp32 or bf16");
    test_expect_cli("", "bench --device cuda --dtype bf16 --model " NO_MODEL, 2,
               "--dtype bf16: CUDA computes in fp16 or fp32");
    snprintf(args, sizeof args, "%s --dtype bf16 --cpu-dtype fp32", cpu);
    test_expect_cli("", args, 2, "give one or the others");
    snprintf(args, sizeof args, "%s --dtype fp32 --cuda-dtype fp16", cpu);
    test_expect_cli("", args, 2, "give one or the others");
    snprintf(args, sizeof args, "%s --cpu-dtype fp16", cpu);
    test_expect_cli("", args, 2, "--cpu-dtype");
    test_expect_cli("SDX4_CPU_DTYPE=fp16", cpu, 2, "SDX4_CPU_DTYPE: 'fp16' is not one of fp32|bf16");
    test_expect_cli("SDX4_CPU_DTYPE=", cpu, 1, NO_MODEL); /* empty: unset */
#ifndef SDX4_NO_IMAGEIO
    test_expect_cli("", "upscale --device cpu --dtype fp16 --model " NO_MODEL " /nonexistent.png out.png", 2,
               "--dtype fp16");
    /* the server refuses to start, naming the setting (it reads the model
     * folder first: the reference's tiny model) */
    char model[4096];
    snprintf(model, sizeof model, "%s/tiny/model", test_reference_dir());
    if (access(model, R_OK) != 0) {
        printf("  %s missing: serve cases skipped\n", model);
        return;
    }
    snprintf(args, sizeof args, "serve --device cpu --cpu-dtype fp16 --port 0 --model '%s'", model);
    test_expect_cli("", args, 1, "fp16\\\": expected fp32 or bf16"); /* in JSON: \" */
    snprintf(args, sizeof args, "serve --device cpu --port 0 --model '%s'", model);
    if (!runs) test_expect_cli("SDX4_CPU_DTYPE=bf16", args, 1, refusal());
#endif
}

int main(void) {
    test_parse();
    test_engine();
    test_cli();
    return test_finish("test_cpu_dtype");
}
