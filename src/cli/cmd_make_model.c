/*
 * cmd_make_model.c - `sdx4 make-model`: a model folder with random weights.
 *
 * Real weights cannot be downloaded everywhere; a random-weight model with
 * the real layout, names and shapes is enough to benchmark, to exercise the
 * loader and to demo the service. The work is sdx4_make_model()'s; this
 * command only checks its arguments.
 */
#include <stdio.h>

#include "cli.h"
#include "sdx4.h"

static const char help[] =
    "Usage: sdx4 make-model --config DIR [options] OUT\n"
    "\n"
    "Writes to OUT a diffusers model folder with random weights, built from\n"
    "the configuration files in DIR (a model folder without weights, such\n"
    "as models/x4-upscaler). The images such a model produces are noise.\n"
    "OUT's missing parent folders are created.\n"
    "\n"
    "Options:\n"
    "  --config DIR        the configuration folder (required)\n"
    "  --dtype fp16|fp32   weight type; fp16 is written as the\n"
    "                      *.fp16.safetensors variant (default: fp32)\n"
    "  --seed S            random seed, 0..2^63-1 (default: 0)\n"
    "  -h, --help          show this help\n";

int cmd_make_model(int argc, char **argv) {
    const char *config = NULL, *dtype = "fp32";
    uint64_t seed = 0;
    cli_option options[] = {
        {"--config", OPT_STRING, &config, 0, 0, NULL, 0},
        {"--dtype", OPT_CHOICE, &dtype, 0, 0, "fp16|fp32", 0},
        {"--seed", OPT_SEED, &seed, 0, 0, NULL, 0},
        {NULL, 0, NULL, 0, 0, NULL, 0},
    };
    cli_command cmd = {"make-model", help, "OUT", 1, 1, options};
    const char *out;
    int nout;
    int status = cli_parse(&cmd, argc, argv, &out, &nout);
    if (status != CLI_CONTINUE) return status;
    if (!config) return cli_usage_error(&cmd, "--config is required");

    if (sdx4_make_model(config, out, dtype, seed) != SDX4_OK)
        return cli_fail_engine();
    fprintf(stderr, "%s: random %s model from %s (seed %llu)\n", out, dtype,
            config, (unsigned long long)seed);
    return 0;
}
