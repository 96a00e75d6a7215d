/*
 * cmd_compare.c - `sdx4 compare A B`: how close image B is to image A.
 *
 * Decodes both files (PNG, JPEG or WebP, to 8-bit RGB as every command
 * reads images) and prints sdx4_compare_images(): PSNR and SSIM as
 * scikit-image computes them, over the whole image and per channel, as
 * text, or with --json as one JSON object with every digit (what
 * bench/gan_quality.py reads to cross-check its Python numbers). JSON has
 * no infinity: the PSNR of identical images, +inf, is written as null
 * there and "inf" in the text.
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "imageio.h"
#include "sdx4.h"

static const char help[] =
    "Usage: sdx4 compare [options] A B\n"
    "\n"
    "Compares image B with image A (the reference; PNG, JPEG or WebP, of the\n"
    "same size, at least 7x7): PSNR (dB, 'inf' when identical) and SSIM\n"
    "(1 when identical), over RGB and per channel, as scikit-image's\n"
    "peak_signal_noise_ratio(data_range=255) and\n"
    "structural_similarity(channel_axis=2, data_range=255) compute them.\n"
    "\n"
    "Options:\n"
    "  --json      print one JSON object instead of text (psnr null when\n"
    "              the images are identical)\n"
    "  -h, --help  show this help\n";

static const char *const channel_names[3] = {"r", "g", "b"};

static void print_text(const sdx4_quality *q) {
    printf("psnr %.3f dB  ssim %.4f\n", q->psnr, q->ssim);
    for (int c = 0; c < 3; c++)
        printf("  %s  psnr %.3f dB  ssim %.4f\n", channel_names[c], q->psnr_channel[c], q->ssim_channel[c]);
}

/* A PSNR as JSON: null for +inf, which JSON cannot write. */
static json_t *json_psnr(double psnr) { return isinf(psnr) ? json_null() : json_real(psnr); }

static int print_json(const char *a, const char *b, const sdx4_image *im, const sdx4_quality *q) {
    json_t *psnr = json_array(), *ssim = json_array();
    for (int c = 0; c < 3; c++) {
        json_array_append_new(psnr, json_psnr(q->psnr_channel[c]));
        json_array_append_new(ssim, json_real(q->ssim_channel[c]));
    }
    json_t *root = json_pack("{s:s, s:s, s:i, s:i, s:o, s:f, s:o, s:o}", "a", a, "b", b, "width", im->width,
                             "height", im->height, "psnr", json_psnr(q->psnr), "ssim", q->ssim, "psnr_channel",
                             psnr, "ssim_channel", ssim);
    char *text = root ? json_dumps(root, JSON_COMPACT) : NULL;
    json_decref(root);
    if (!text) return cli_fail("cannot format the comparison as JSON");
    puts(text);
    free(text);
    return 0;
}

/* imageio's messages usually name the file already; say it once. */
static int read_image(const char *path, sdx4_image *im) {
    char err[512];
    if (imageio_read_file(path, im, err, sizeof err) == 0) return 0;
    if (strstr(err, path))
        cli_fail("%s", err);
    else
        cli_fail("%s: %s", path, err);
    return -1;
}

int cmd_compare(int argc, char **argv) {
    int json = 0;
    cli_option options[] = {
        {"--json", OPT_FLAG, &json, 0, 0, NULL, 0},
        {NULL, 0, NULL, 0, 0, NULL, 0},
    };
    cli_command cmd = {"compare", help, "A B", 2, 2, options};
    const char *paths[2];
    int npaths;
    int status = cli_parse(&cmd, argc, argv, paths, &npaths);
    if (status != CLI_CONTINUE) return status;

    sdx4_image a = {0}, b = {0};
    sdx4_quality q;
    status = EXIT_RUNTIME;
    if (read_image(paths[0], &a) || read_image(paths[1], &b)) goto done;
    if (sdx4_compare_images(&a, &b, &q) != SDX4_OK) {
        cli_fail("%s and %s: %s", paths[0], paths[1], sdx4_last_error());
        goto done;
    }
    if (json) {
        status = print_json(paths[0], paths[1], &a, &q);
    } else {
        print_text(&q);
        status = 0;
    }
done:
    sdx4_image_free(&a);
    sdx4_image_free(&b);
    return status;
}
