/*
 * args_precision.c - --dtype and --cpu-dtype of upscale and bench (cli.h).
 *
 * The engine has a precision setting per backend (sdx4.h's cuda.dtype and
 * cpu.dtype), each with its own flag and variable. --dtype is the one flag
 * a user reaches for first, so it names a precision and lands on the
 * setting of the device that has it: fp32 is both devices' float, fp16
 * only CUDA's and bf16 only the CPU's. A value the device named by
 * --device cannot compute in is refused here, before any work, rather than
 * silently run in another precision.
 */
#include <stdlib.h>
#include <string.h>

#include "cli.h"

int cli_precision_settings(const cli_command *cmd, cli_precision *p, const char *device,
                           sdx4_cuda_options *cuda) {
    if (p->dtype) {
        if (cli_given(cmd, "--cpu-dtype") || cli_given(cmd, "--cuda-dtype"))
            return cli_usage_error(cmd, "--dtype sets --cpu-dtype and --cuda-dtype: give one or the others");
        int cpu = device && !strcmp(device, "cpu"), gpu = device && !strcmp(device, "cuda");
        if (!strcmp(p->dtype, "fp16") && cpu)
            return cli_usage_error(cmd, "--dtype fp16: the CPU computes in fp32 or bf16");
        if (!strcmp(p->dtype, "bf16") && gpu)
            return cli_usage_error(cmd, "--dtype bf16: CUDA computes in fp16 or fp32 (bf16 is the CPU's: "
                                        "--device cpu)");
        if (strcmp(p->dtype, "fp16")) p->cpu.dtype = p->dtype;
        if (strcmp(p->dtype, "bf16")) cuda->dtype = p->dtype;
    }
    const char *v = getenv("SDX4_CPU_DTYPE");
    if (p->cpu.dtype || !v || !*v) return CLI_CONTINUE; /* a flag wins; empty is unset */
    if (strcmp(v, "fp32") && strcmp(v, "bf16"))
        return cli_usage_error(cmd, "SDX4_CPU_DTYPE: '%s' is not one of " CLI_CPU_DTYPES, v);
    p->cpu.dtype = v;
    return CLI_CONTINUE;
}
