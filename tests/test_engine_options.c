/*
 * test_engine_options.c - the CUDA settings of sdx4_engine_options at each
 * door, and steps on a backend that records none; no GPU needed.
 *
 * The engine refuses a bad setting by name whatever the device, before it
 * reads the model folder, and takes the good ones (here with a folder that
 * is not there, so that the error that follows is the folder's). The CLI
 * maps flags and SDX4_CUDA_* variables onto the settings, flags first, and
 * refuses a bad variable by name with the usage status (2) before any
 * work. On the CPU a step runs its function at every call (backend.h).
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

static void expect_open(const char *what, const char *device, sdx4_cuda_options cuda,
                        sdx4_status want, const char *needle) {
    sdx4_engine_options o;
    sdx4_engine_options_default(&o);
    o.model_dir = NO_MODEL;
    o.device = device;
    o.cuda = cuda;
    test_expect_open(what, &o, want, needle);
}

static void test_engine(void) {
    expect_open("dtype bf16", "cpu", (sdx4_cuda_options){.dtype = "bf16"},
                SDX4_ERR_INVALID_ARGUMENT, "cuda.dtype \"bf16\": expected fp16 or fp32");
    expect_open("dtype bf16 on auto", "auto", (sdx4_cuda_options){.dtype = "bf16"},
                SDX4_ERR_INVALID_ARGUMENT, "cuda.dtype");
    expect_open("vae fp16", "cpu", (sdx4_cuda_options){.vae = "fp16"},
                SDX4_ERR_INVALID_ARGUMENT, "cuda.vae \"fp16\": expected bf16 or fp32");
    expect_open("conv winograd", "cpu", (sdx4_cuda_options){.conv = "winograd"},
                SDX4_ERR_INVALID_ARGUMENT,
                "cuda.conv \"winograd\": expected cudnn, cudnn-graph, cudnn-legacy or im2col");
    expect_open("conv CUDNN (case matters)", "cpu", (sdx4_cuda_options){.conv = "CUDNN"},
                SDX4_ERR_INVALID_ARGUMENT, "cuda.conv");
    /* good settings pass: what fails next is the folder */
    expect_open("every setting, good", "cpu",
                (sdx4_cuda_options){.dtype = "fp32", .vae = "fp32", .conv = "im2col",
                                    .no_graphs = 1, .no_plans = 1, .profile = 1},
                SDX4_ERR_MODEL, NO_MODEL);
    expect_open("empty strings are the defaults", "cpu",
                (sdx4_cuda_options){.dtype = "", .vae = "", .conv = ""}, SDX4_ERR_MODEL,
                NO_MODEL);

    cuda_settings s;
    CHECK(sdx4_cuda_settings_parse(NULL, &s) == 0 && s.mode == DTYPE_F16 && s.allow_bf16 &&
              s.conv == CONV_CUDNN && s.use_graphs && s.use_plans && !s.profile,
          "the defaults");
    CHECK(sdx4_cuda_settings_parse(&(sdx4_cuda_options){.dtype = "fp32", .vae = "fp32",
                                                   .conv = "cudnn-legacy", .no_graphs = 1,
                                                   .no_plans = 1, .profile = 1},
                              &s) == 0 &&
              s.mode == DTYPE_F32 && !s.allow_bf16 && s.conv == CONV_CUDNN_LEGACY &&
              !s.use_graphs && !s.use_plans && s.profile,
          "every setting");
    const char *convs[] = {"cudnn", "cudnn-graph", "cudnn-legacy", "im2col"};
    const conv_path paths[] = {CONV_CUDNN, CONV_CUDNN_GRAPH, CONV_CUDNN_LEGACY, CONV_IM2COL};
    for (int i = 0; i < 4; i++)
        CHECK(sdx4_cuda_settings_parse(&(sdx4_cuda_options){.conv = convs[i]}, &s) == 0 &&
                  s.conv == paths[i],
              "conv %s", convs[i]);
}

static void test_cli(void) {
    char bin[4096];
    snprintf(bin, sizeof bin, "%s/sdx4", getenv("SDX4_BIN") ? getenv("SDX4_BIN") : ".");
    if (access(bin, X_OK) != 0) {
        printf("  %s not built: CLI cases skipped\n", bin);
        return;
    }
    const char *bench = "bench --model " NO_MODEL;
    test_expect_cli("SDX4_CUDA_DTYPE=bf16", bench, 2, "SDX4_CUDA_DTYPE: 'bf16' is not one of fp16|fp32");
    test_expect_cli("SDX4_CUDA_VAE=half", bench, 2, "SDX4_CUDA_VAE");
    test_expect_cli("SDX4_CUDA_CONV=winograd", bench, 2, "SDX4_CUDA_CONV");
    test_expect_cli("SDX4_CUDA_GRAPH=maybe", bench, 2, "SDX4_CUDA_GRAPH: 'maybe'");
    test_expect_cli("SDX4_CUDA_PLAN=2", bench, 2, "SDX4_CUDA_PLAN");
    test_expect_cli("SDX4_CUDA_PROFILE=x", bench, 2, "SDX4_CUDA_PROFILE");
    test_expect_cli("", "bench --cuda-dtype bf16 --model " NO_MODEL, 2, "--cuda-dtype");
    test_expect_cli("", "bench --cuda-conv winograd --model " NO_MODEL, 2, "--cuda-conv");
    /* a flag wins over its variable; good values reach the model folder */
    test_expect_cli("SDX4_CUDA_DTYPE=bf16", "bench --cuda-dtype fp32 --model " NO_MODEL, 1, NO_MODEL);
    test_expect_cli("SDX4_CUDA_DTYPE=fp32 SDX4_CUDA_VAE=fp32 SDX4_CUDA_CONV=im2col SDX4_CUDA_GRAPH=0 "
               "SDX4_CUDA_PLAN=false SDX4_CUDA_PROFILE=1",
               bench, 1, NO_MODEL);
    test_expect_cli("SDX4_CUDA_DTYPE=", bench, 1, NO_MODEL); /* empty: unset */
#ifndef SDX4_NO_IMAGEIO
    /* upscale refuses before it reads its input */
    test_expect_cli("SDX4_CUDA_DTYPE=bf16", "upscale --model " NO_MODEL " /nonexistent.png out.png", 2,
               "SDX4_CUDA_DTYPE");
#endif
}

/* A step's function that counts its calls and fails when told to. */
typedef struct {
    int calls, fail_at;
} counter;

static int count_call(void *arg) {
    counter *c = arg;
    if (++c->calls == c->fail_at) {
        sdx4_set_error(SDX4_ERR_DEVICE, "step failed on purpose");
        return -1;
    }
    return 0;
}

static void test_cpu_steps(void) {
    backend *cpu = sdx4_backend_cpu_create(1);
    CHECK(cpu && !sdx4_step_replays(cpu), "the cpu backend replays no step");
    backend_step *s = sdx4_step_new(cpu);
    counter c = {0, 4};
    CHECK(s != NULL, "step_new: %s", sdx4_last_error());
    for (int i = 0; i < 3; i++) CHECK(sdx4_step_run(cpu, s, count_call, &c) == 0, "run %d", i);
    CHECK(c.calls == 3, "%d calls in 3 runs", c.calls);
    CHECK(sdx4_step_run(cpu, s, count_call, &c) == -1 && strstr(sdx4_last_error(), "on purpose"),
          "a failing function fails the run: %s", sdx4_last_error());
    sdx4_step_free(cpu, s);
    sdx4_step_free(cpu, NULL);
    cpu->destroy(cpu);
}

int main(void) {
    test_engine();
    test_cli();
    test_cpu_steps();
    return test_finish("test_engine_options");
}
