/*
 * test_quality.c - sdx4_compare_images() against scikit-image.
 *
 * The goldens of tests/data/quality (tools/quality_goldens.py, scikit-image
 * 0.26.0) are PNG pairs and the PSNR and SSIM skimage gives for each, over
 * RGB and per channel: noise, gradients, edges, a bicubic round trip, flat
 * images (zero variance), a changed channel alone, and the smallest size
 * SSIM takes. Every number must agree within 1e-6 relative: PSNR comes
 * from an exact integer sum of squares and should be bit for bit; SSIM's
 * window sums are exact here where scipy's running float sums round, which
 * moves it by about 1e-13. 1e-6 leaves libm's log10 its last bits while
 * any change of the formula (the covariance's 48 or 49, a window off by a
 * pixel, a border not cropped) moves these cases by far more. The PNGs are
 * read through imageio: a build without libvips (SDX4_NO_IMAGEIO) skips
 * them and runs the rest.
 *
 * The rest need no files: identical images (PSNR +inf, SSIM exactly 1),
 * black against white (PSNR exactly 0 dB), one level of difference
 * everywhere (10 log10 65025), both orders of the arguments, and the
 * errors: different sizes (the message gives both), a side below 7,
 * missing images or result.
 */
#include <jansson.h>
#include <math.h>

#include "sdx4.h"
#include "test.h"
#ifndef SDX4_NO_IMAGEIO
#include "imageio.h"
#endif

static sdx4_image make_image(int w, int h, uint8_t value) {
    sdx4_image im = {w, h, malloc((size_t)w * h * 3)};
    memset(im.pixels, value, (size_t)w * h * 3);
    return im;
}

/* A test card with gradients and a checkerboard, and noise from `seed`. */
static sdx4_image make_card(int w, int h, uint32_t seed) {
    sdx4_image im = make_image(w, h, 0);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            uint8_t *p = im.pixels + 3 * ((size_t)y * w + x);
            seed = seed * 1664525u + 1013904223u;
            p[0] = (uint8_t)(x * 255 / (w - 1));
            p[1] = (uint8_t)(((x / 4 + y / 4) % 2 ? 200 : 40) + (seed >> 28));
            p[2] = (uint8_t)(seed >> 24);
        }
    return im;
}

/* ------------------------------------------------------------------------
 * Against scikit-image
 * ------------------------------------------------------------------------ */

#ifndef SDX4_NO_IMAGEIO
#define DATA SDX4_SOURCE_DIR "/tests/data/quality"

static const double tolerance = 1e-6; /* relative */

/* Whether `ours` is skimage's `theirs` (JSON null: +inf). */
static int agrees(double ours, const json_t *theirs) {
    if (json_is_null(theirs)) return isinf(ours) && ours > 0;
    double t = json_number_value(theirs);
    return fabs(ours - t) <= tolerance * fabs(t);
}

static void check_value(const char *name, const char *what, double ours, const json_t *theirs) {
    CHECK(json_is_null(theirs) || json_is_number(theirs), "%s: no %s in quality.json", name, what);
    CHECK(agrees(ours, theirs), "%s: %s %.17g, skimage %.17g", name, what, ours,
          json_is_null(theirs) ? INFINITY : json_number_value(theirs));
}

static void test_goldens(void) {
    json_error_t jerr;
    json_t *root = json_load_file(DATA "/quality.json", 0, &jerr);
    json_t *cases = json_object_get(root, "cases");
    CHECK(json_array_size(cases) >= 8, "%s/quality.json: %s", DATA, root ? "too few cases" : jerr.text);
    size_t i;
    json_t *c;
    json_array_foreach(cases, i, c) {
        const char *name = json_string_value(json_object_get(c, "name"));
        if (!name) name = "?";
        char path[2][1024], err[256];
        sdx4_image im[2] = {{0}, {0}};
        int read = 1;
        for (int k = 0; k < 2; k++) {
            snprintf(path[k], sizeof path[k], "%s/%s_%c.png", DATA, name, "ab"[k]);
            if (imageio_read_file(path[k], &im[k], err, sizeof err)) {
                CHECK(0, "%s: %s", path[k], err);
                read = 0;
            }
        }
        sdx4_quality q;
        if (read) {
            CHECK(im[0].width == json_integer_value(json_object_get(c, "width")) &&
                      im[0].height == json_integer_value(json_object_get(c, "height")),
                  "%s: read as %dx%d", name, im[0].width, im[0].height);
            sdx4_status s = sdx4_compare_images(&im[0], &im[1], &q);
            CHECK(s == SDX4_OK, "%s: %s", name, sdx4_last_error());
            if (s == SDX4_OK) {
                check_value(name, "psnr", q.psnr, json_object_get(c, "psnr"));
                check_value(name, "ssim", q.ssim, json_object_get(c, "ssim"));
                for (int ch = 0; ch < 3; ch++) {
                    char what[32];
                    snprintf(what, sizeof what, "psnr of channel %d", ch);
                    check_value(name, what, q.psnr_channel[ch],
                                json_array_get(json_object_get(c, "psnr_channel"), ch));
                    snprintf(what, sizeof what, "ssim of channel %d", ch);
                    check_value(name, what, q.ssim_channel[ch],
                                json_array_get(json_object_get(c, "ssim_channel"), ch));
                }
            }
        }
        sdx4_image_free(&im[0]);
        sdx4_image_free(&im[1]);
    }
    json_decref(root);
}
#endif

/* ------------------------------------------------------------------------
 * Exact values
 * ------------------------------------------------------------------------ */

static void test_exact(void) {
    sdx4_image a = make_card(23, 9, 1), b = make_card(23, 9, 1);
    sdx4_quality q;
    CHECK(sdx4_compare_images(&a, &b, &q) == SDX4_OK, "identical: %s", sdx4_last_error());
    CHECK(isinf(q.psnr) && q.psnr > 0, "identical: psnr %g", q.psnr);
    CHECK(q.ssim == 1.0, "identical: ssim %.17g", q.ssim);
    for (int c = 0; c < 3; c++)
        CHECK(isinf(q.psnr_channel[c]) && q.ssim_channel[c] == 1.0, "identical: channel %d: %g %.17g", c,
              q.psnr_channel[c], q.ssim_channel[c]);

    /* one level up everywhere: MSE 1 */
    for (size_t i = 0; i < (size_t)23 * 9 * 3; i++) b.pixels[i] = a.pixels[i] < 255 ? a.pixels[i] + 1 : 254;
    sdx4_quality ab, ba;
    CHECK(sdx4_compare_images(&a, &b, &ab) == SDX4_OK && sdx4_compare_images(&b, &a, &ba) == SDX4_OK,
          "one level: %s", sdx4_last_error());
    CHECK(ab.psnr == 10 * log10(65025.0), "one level: psnr %.17g", ab.psnr);
    CHECK(ab.psnr == ba.psnr && ab.ssim == ba.ssim, "not symmetric: %.17g %.17g, %.17g %.17g", ab.psnr,
          ba.psnr, ab.ssim, ba.ssim);
    CHECK(ab.ssim > 0.99 && ab.ssim < 1, "one level: ssim %.17g", ab.ssim);
    sdx4_image_free(&a);
    sdx4_image_free(&b);

    a = make_image(8, 7, 0), b = make_image(8, 7, 255);
    CHECK(sdx4_compare_images(&a, &b, &q) == SDX4_OK, "black/white: %s", sdx4_last_error());
    CHECK(q.psnr == 0.0, "black/white: psnr %.17g", q.psnr);
    /* flat windows: vx = vy = vxy = 0, S = C1 / (255^2 + C1) */
    double c1 = (0.01 * 255) * (0.01 * 255);
    CHECK(fabs(q.ssim - c1 / (65025 + c1)) <= 1e-15, "black/white: ssim %.17g", q.ssim);
    sdx4_image_free(&a);
    sdx4_image_free(&b);
}

/* ------------------------------------------------------------------------
 * Errors
 * ------------------------------------------------------------------------ */

static void expect_error(const char *what, const sdx4_image *a, const sdx4_image *b, sdx4_quality *q,
                         const char *needle) {
    sdx4_status s = sdx4_compare_images(a, b, q);
    CHECK(s == SDX4_ERR_INVALID_ARGUMENT, "%s: status %d", what, s);
    CHECK(strstr(sdx4_last_error(), needle) != NULL, "%s: message '%s' lacks '%s'", what, sdx4_last_error(),
          needle);
}

static void test_errors(void) {
    sdx4_quality q;
    sdx4_image a = make_card(10, 8, 1), b = make_card(9, 8, 2);
    expect_error("sizes", &a, &b, &q, "10x8 and 9x8");
    expect_error("sizes swapped", &b, &a, &q, "9x8 and 10x8");
    sdx4_image_free(&a);
    sdx4_image_free(&b);

    a = make_image(6, 40, 1), b = make_image(6, 40, 2);
    expect_error("narrow", &a, &b, &q, "6x40 is too small");
    sdx4_image_free(&a);
    sdx4_image_free(&b);
    a = make_image(40, 6, 1), b = make_image(40, 6, 2);
    expect_error("short", &a, &b, &q, "40x6 is too small");

    sdx4_image empty = {0};
    expect_error("NULL a", NULL, &b, &q, "image a is empty");
    expect_error("no pixels b", &a, &empty, &q, "image b is empty");
    expect_error("no result", &a, &b, NULL, "no result");
    sdx4_image_free(&a);
    sdx4_image_free(&b);
}

int main(void) {
#ifndef SDX4_NO_IMAGEIO
    if (imageio_init("test_quality")) {
        fprintf(stderr, "imageio_init failed\n");
        return 1;
    }
    test_goldens();
    imageio_shutdown();
#else
    printf("test_quality: no imageio, the PNG goldens skipped\n");
#endif
    test_exact();
    test_errors();
    return test_finish("test_quality");
}
