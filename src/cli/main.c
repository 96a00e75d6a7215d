/*
 * main.c - the `sdx4` program: finds the command and runs it.
 *
 * `sdx4 <command> [options] [args]`. Each command lives in its own file
 * (cmd_*.c) and parses its own options with cli_parse(); `serve` hands
 * its arguments to the HTTP server's serve_main() untouched, with
 * argv[0] = "serve". The image library is initialised once here, before
 * any command runs, and shut down after it returns, so that no command
 * has to care and every exit path of a command goes through the shutdown.
 *
 * A build without libvips (SDX4_NO_IMAGEIO: a GPU machine with only the
 * engine's dependencies) keeps the commands that need no image files:
 * info, make-model and bench.
 */
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "sdx4.h"
#ifndef SDX4_NO_IMAGEIO
#include "imageio.h"
#include "serve.h"
#endif

static const struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
} commands[] = {
#ifndef SDX4_NO_IMAGEIO
    {"upscale", cmd_upscale, "upscale an image 4x (PNG, JPEG or WebP)"},
#endif
    {"info", cmd_info, "describe a model folder"},
#ifndef SDX4_NO_IMAGEIO
    {"compare", cmd_compare, "PSNR and SSIM of two images (as scikit-image)"},
#endif
    {"convert", cmd_convert, "a Real-ESRGAN/ESRGAN model from PyTorch or ncnn files"},
    {"make-model", cmd_make_model, "write a model with random weights"},
    {"bench", cmd_bench, "time the parts of the pipeline (one JSON line)"},
#ifndef SDX4_NO_IMAGEIO
    {"serve", serve_main, "run the HTTP service"},
    {"worker", cmd_worker, "take upscales from a cluster's Redis (cluster mode)"},
#endif
};

static void print_help(FILE *out) {
    fputs("Usage: sdx4 <command> [options] [arguments]\n"
          "\n"
          "Stable Diffusion x4 upscaler.\n"
          "\n"
          "Commands:\n",
          out);
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(out, "  %-11s %s\n", commands[i].name, commands[i].summary);
    fputs("\n"
          "Options:\n"
          "  -h, --help  show this help\n"
          "  --version   show the version\n"
          "\n"
          "Run 'sdx4 <command> --help' for a command's options.\n"
          "The model folder defaults to $SDX4_MODEL.\n",
          out);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        print_help(stderr);
        return EXIT_USAGE;
    }
    const char *name = argv[1];
    if (!strcmp(name, "--help") || !strcmp(name, "-h")) {
        print_help(stdout);
        return 0;
    }
    if (!strcmp(name, "--version")) {
        printf("sdx4 %s\n", SDX4_VERSION);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        if (strcmp(name, commands[i].name)) continue;
#ifdef SDX4_NO_IMAGEIO
        return commands[i].run(argc - 1, argv + 1);
#else
        if (imageio_init(argv[0]) != 0)
            return cli_fail("cannot initialise the image library (libvips)");
        int status = commands[i].run(argc - 1, argv + 1);
        imageio_shutdown();
        return status;
#endif
    }
    fprintf(stderr,
            name[0] == '-' ? "sdx4: unknown option '%s'\n"
                           : "sdx4: unknown command '%s'\n",
            name);
    fputs("Run 'sdx4 --help' for the commands.\n", stderr);
    return EXIT_USAGE;
}
