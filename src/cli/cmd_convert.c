/*
 * cmd_convert.c - `sdx4 convert`: a GAN upscaler from PyTorch's or ncnn's
 * files into a model folder. The work is sdx4_convert()'s.
 */
#include <stdio.h>

#include "cli.h"
#include "sdx4.h"

static const char help[] =
    "Usage: sdx4 convert IN.safetensors OUT\n"
    "       sdx4 convert IN.param IN.bin OUT\n"
    "\n"
    "Writes to the folder OUT (created) a model of the ESRGAN family that\n"
    "`sdx4 upscale --model OUT` and `sdx4 serve --model OUT` run:\n"
    "config.json and model.safetensors. IN is a PyTorch state dict saved as\n"
    "safetensors (Real-ESRGAN, BasicSR or the original ESRGAN; RRDBNet or\n"
    "SRVGGNetCompact), or an ncnn model (.param and .bin, as\n"
    "realesrgan-ncnn-vulkan ships them). A .pth file is a pickle, which sdx4\n"
    "does not read: the error says how to save it as safetensors.\n"
    "\n"
    "Options:\n"
    "  -h, --help  show this help\n";

int cmd_convert(int argc, char **argv) {
    cli_option options[] = {{NULL, 0, NULL, 0, 0, NULL, 0}};
    cli_command cmd = {"convert", help, "IN [IN.bin] OUT", 2, 3, options};
    const char *args[3];
    int n;
    int status = cli_parse(&cmd, argc, argv, args, &n);
    if (status != CLI_CONTINUE) return status;
    if (sdx4_convert(n - 1, args, args[n - 1]) != SDX4_OK) return cli_fail_engine();
    fprintf(stderr, "%s: converted from %s\n", args[n - 1], args[0]);
    return 0;
}
