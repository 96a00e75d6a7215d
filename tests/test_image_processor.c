/*
 * test_image_processor.c - diffusers' image pre/post-processing, to the bit.
 *
 * The expected bytes in tests/data were made by Pillow and numpy (see
 * tests/data/README.md); every comparison here is exact equality. The
 * golden pipeline output checks the uint8 step against the PNG diffusers
 * wrote from the same floats.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/safetensors.h"
#include "imageio.h"
#include "model/image_processor.h"
#include "test.h"

/* tests/data lives beside this file (__FILE__ is absolute under CMake). */
static const char *data_path(const char *name) {
    static char buf[4096];
    const char *slash = strrchr(__FILE__, '/');
    int dir_len = slash ? (int)(slash - __FILE__) : 1;
    snprintf(buf, sizeof buf, "%.*s/data/%s", dir_len, slash ? __FILE__ : ".", name);
    return buf;
}

static unsigned char *read_all(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    unsigned char *buf = NULL;
    if (fseek(f, 0, SEEK_END) == 0) {
        long n = ftell(f);
        if (n >= 0 && fseek(f, 0, SEEK_SET) == 0 && (buf = malloc(n ? n : 1))) {
            if (fread(buf, 1, n, f) != (size_t)n) {
                free(buf);
                buf = NULL;
            }
            *len = (size_t)n;
        }
    }
    fclose(f);
    return buf;
}

/* ---- PIL-exact bicubic resize ------------------------------------------ */

static void test_resize_case(int w, int h, int ow, int oh) {
    char name[64];
    snprintf(name, sizeof name, "resize_%dx%d_%dx%d.bin", w, h, ow, oh);
    size_t len = 0;
    unsigned char *data = read_all(data_path(name), &len);
    size_t in_bytes = (size_t)w * h * 3, out_bytes = (size_t)ow * oh * 3;
    CHECK(data && len == in_bytes + out_bytes, "%s: missing or wrong size", name);
    if (!data || len != in_bytes + out_bytes) {
        free(data);
        return;
    }
    sdx4_image in = {w, h, data}, out = {0};
    CHECK(sdx4_image_resize_bicubic(&in, ow, oh, &out) == 0, "%s: %s", name, sdx4_last_error());
    if (out.pixels) {
        CHECK(out.width == ow && out.height == oh, "%s: got %dx%d", name, out.width, out.height);
        size_t diff = 0, first = 0;
        for (size_t i = 0; i < out_bytes; i++)
            if (out.pixels[i] != data[in_bytes + i] && !diff++) first = i;
        CHECK(diff == 0, "%s: %zu bytes differ from PIL, first at %zu (%d vs %d)", name,
              diff, first, out.pixels[first], data[in_bytes + first]);
        free(out.pixels);
    }
    free(data);
}

/* sdx4_image_preprocess resizes when the sides are not multiples of the scale
 * factor: its floats must be PIL's bytes, normalised. */
static void test_preprocess_resizes(int w, int h, int ow, int oh, int scale) {
    char name[64];
    snprintf(name, sizeof name, "resize_%dx%d_%dx%d.bin", w, h, ow, oh);
    size_t len = 0;
    unsigned char *data = read_all(data_path(name), &len);
    CHECK(data && len == (size_t)(w * h + ow * oh) * 3, "%s missing", name);
    if (!data || len != (size_t)(w * h + ow * oh) * 3) {
        free(data);
        return;
    }
    sdx4_image in = {w, h, data};
    float *chw = NULL;
    int gh = 0, gw = 0;
    CHECK(sdx4_image_preprocess(&in, scale, &chw, &gh, &gw) == 0, "%s", sdx4_last_error());
    CHECK(gh == oh && gw == ow, "%s: scale %d gave %dx%d", name, scale, gw, gh);
    if (chw && gh == oh && gw == ow) {
        const unsigned char *pil = data + w * h * 3;
        int bad = 0, plane = ow * oh;
        for (int i = 0; i < plane; i++)
            for (int c = 0; c < 3; c++) {
                float want = 2.0f * ((float)pil[3 * i + c] / 255.0f) - 1.0f;
                bad += chw[c * plane + i] != want;
            }
        CHECK(bad == 0, "%s: %d floats differ from PIL-resized bytes", name, bad);
    }
    free(chw);
    free(data);
}

/* ---- float steps against numpy's float32 ----------------------------- */

static void test_normalize(void) {
    size_t len = 0;
    unsigned char *want = read_all(data_path("normalize.bin"), &len);
    CHECK(want && len == 256 * 4, "normalize.bin missing");
    if (!want) return;
    /* a 256x4 image holding every byte value in every channel */
    uint8_t px[256 * 4 * 3];
    for (int i = 0; i < 256 * 4; i++)
        for (int c = 0; c < 3; c++) px[3 * i + c] = (uint8_t)((i + 85 * c) % 256);
    sdx4_image in = {256, 4, px};
    float *chw = NULL;
    int h, w;
    CHECK(sdx4_image_preprocess(&in, 4, &chw, &h, &w) == 0 && h == 4 && w == 256, "%s",
          sdx4_last_error());
    if (chw) {
        int bad = 0;
        for (int c = 0; c < 3; c++)
            for (int i = 0; i < 256 * 4; i++) {
                float expect;
                memcpy(&expect, want + 4 * ((i + 85 * c) % 256), 4);
                bad += memcmp(&chw[c * 1024 + i], &expect, 4) != 0;
            }
        CHECK(bad == 0, "%d values differ from numpy's 2 * (v / 255) - 1", bad);
        CHECK(chw[0] == -1.0f, "0 -> %g", chw[0]);
        free(chw);
    }
    free(want);
}

static void test_postprocess_rounding(void) {
    size_t len = 0;
    unsigned char *data = read_all(data_path("postprocess.bin"), &len);
    int32_t n = 0, nu = 0;
    if (data && len >= 8) {
        memcpy(&n, data, 4);
        memcpy(&nu, data + 4, 4);
    }
    CHECK(data && n > 0 && nu > 0 && len == 8 + (size_t)n * 9 + (size_t)nu * 5,
          "postprocess.bin missing or malformed");
    if (!data || n <= 0 || nu <= 0 || len != 8 + (size_t)n * 9 + (size_t)nu * 5) {
        free(data);
        return;
    }
    float *x = malloc(n * 4 * 3), *want_d = malloc(n * 4), *d = malloc(n * 4 * 3);
    float *unit = malloc((size_t)nu * 4 * 3);
    uint8_t *rgb = malloc((size_t)nu * 3);
    memcpy(want_d, data + 8 + (size_t)n * 4, n * 4);
    const uint8_t *want_q = data + 8 + (size_t)n * 8;
    const uint8_t *want_qu = data + 8 + (size_t)n * 9 + (size_t)nu * 4;

    /* denormalize, value by value (bitwise, so -0 and 0 count apart) */
    memcpy(x, data + 8, n * 4);
    sdx4_image_denormalize(x, n, d);
    int bad = 0;
    for (int i = 0; i < n; i++) bad += memcmp(&d[i], &want_d[i], 4) != 0;
    CHECK(bad == 0, "denormalize: %d of %d differ from numpy", bad, n);

    /* postprocess on a [3, 1, n] image: each channel holds the same values */
    for (int c = 1; c < 3; c++) memcpy(x + c * n, x, n * 4);
    sdx4_image out = {0};
    CHECK(sdx4_image_postprocess(x, 1, n, &out) == 0, "%s", sdx4_last_error());
    if (out.pixels) {
        bad = 0;
        for (int i = 0; i < n; i++)
            for (int c = 0; c < 3; c++) bad += out.pixels[3 * i + c] != want_q[i];
        CHECK(bad == 0, "postprocess: %d of %d bytes differ from numpy", bad, 3 * n);
        free(out.pixels);
    }

    /* quantize on [0, 1] values, around every k / 255 and (k + 0.5) / 255 */
    for (int c = 0; c < 3; c++)
        memcpy(unit + (size_t)c * nu, data + 8 + (size_t)n * 9, (size_t)nu * 4);
    sdx4_image_quantize(unit, 1, nu, rgb);
    bad = 0;
    for (int i = 0; i < nu; i++) bad += rgb[3 * i] != want_qu[i] || rgb[3 * i + 2] != want_qu[i];
    CHECK(bad == 0, "quantize: %d of %d differ from numpy", bad, nu);

    /* round half to even: values whose x * 255 is exactly k + 0.5 */
    float halves[3] = {0.5f / 255.0f, 1.5f / 255.0f, 2.5f / 255.0f}, one[3];
    const uint8_t even[3] = {0, 2, 2};
    for (int k = 0; k < 3; k++) {
        uint8_t q[3];
        for (int c = 0; c < 3; c++) one[c] = halves[k];
        sdx4_image_quantize(one, 1, 1, q);
        if (halves[k] * 255.0f == 0.5f + k) CHECK(q[0] == even[k], "%g/255 -> %d", 0.5 + k, q[0]);
    }
    /* clamping of values outside model space, NaN to 0 */
    float odd[3] = {-3.0f, 3.0f, NAN};
    CHECK(sdx4_image_postprocess(odd, 1, 1, &out) == 0, "%s", sdx4_last_error());
    if (out.pixels) {
        CHECK(out.pixels[0] == 0 && out.pixels[1] == 255 && out.pixels[2] == 0,
              "clamp: %d %d %d", out.pixels[0], out.pixels[1], out.pixels[2]);
        free(out.pixels);
    }
    free(x);
    free(want_d);
    free(d);
    free(unit);
    free(rgb);
    free(data);
}

/* ---- argument errors --------------------------------------------------- */

static void test_errors(void) {
    uint8_t px[7 * 9 * 3] = {0};
    sdx4_image small = {7, 9, px};
    float *chw = NULL;
    int h, w;
    sdx4_error_clear();
    CHECK(sdx4_image_preprocess(&small, 8, &chw, &h, &w) == -1 && chw == NULL,
          "7x9 with scale 8 accepted");
    CHECK(sdx4_error_status() == SDX4_ERR_INVALID_ARGUMENT, "status %d", sdx4_error_status());
    CHECK(strstr(sdx4_last_error(), "7x9") != NULL, "message: %s", sdx4_last_error());
    CHECK(sdx4_image_preprocess(&small, 4, &chw, &h, &w) == 0 && h == 8 && w == 4,
          "7x9 scale 4: %s", sdx4_last_error());
    free(chw);
    chw = NULL;
    CHECK(sdx4_image_preprocess(&small, 0, &chw, &h, &w) == -1, "scale 0 accepted");
    sdx4_image empty = {0, 0, NULL}, out = {0};
    CHECK(sdx4_image_preprocess(&empty, 4, &chw, &h, &w) == -1, "empty image accepted");
    CHECK(sdx4_image_preprocess(NULL, 4, &chw, &h, &w) == -1, "NULL image accepted");
    CHECK(sdx4_image_resize_bicubic(&small, 0, 5, &out) == -1, "0 width accepted");
    CHECK(sdx4_image_postprocess(NULL, 1, 1, &out) == -1, "NULL floats accepted");
    float zero[3] = {0};
    CHECK(sdx4_image_postprocess(zero, 0, 1, &out) == -1, "height 0 accepted");
}

/* ---- the golden pipeline --------------------------------------------- */

static void test_golden_output(void) {
    st_file f;
    if (sdx4_st_open(&f, test_ref("small/golden/pipe0.safetensors"))) {
        printf("skip golden: %s\n", sdx4_last_error());
        return;
    }
    const st_tensor *t = sdx4_st_find(&f, "output");
    CHECK(t && t->type == DTYPE_F32 && t->ndim == 4 && t->shape[0] == 1 && t->shape[1] == 3,
          "pipe0.safetensors: no [1,3,H,W] float32 output");
    char err[256];
    sdx4_image png = {0};
    int rc = imageio_read_file(test_ref("small/golden/pipe0_output.png"), &png, err, sizeof err);
    CHECK(rc == 0, "pipe0_output.png: %s", err);
    if (t && rc == 0) {
        int h = (int)t->shape[2], w = (int)t->shape[3];
        CHECK(png.width == w && png.height == h, "png %dx%d vs output %dx%d", png.width,
              png.height, w, h);
        size_t n = (size_t)3 * h * w;
        float *unit = malloc(n * 4), *model = malloc(n * 4);
        uint8_t *rgb = malloc(n);
        dtype_to_f32(t->type, t->data, unit, n);

        /* The PNG is numpy_to_pil(output): sdx4_image_quantize must give it. */
        sdx4_image_quantize(unit, h, w, rgb);
        size_t bad = 0;
        for (size_t i = 0; i < n && png.width == w && png.height == h; i++)
            bad += rgb[i] != png.pixels[i];
        CHECK(bad == 0, "quantize(output): %zu of %zu bytes differ from the PNG", bad, n);

        /* Through model space: output = denormalize(x) for x = 2 * output - 1
         * (exact for output >= 0.5, within one float32 step below). */
        for (size_t i = 0; i < n; i++) model[i] = 2.0f * unit[i] - 1.0f;
        sdx4_image post = {0};
        CHECK(sdx4_image_postprocess(model, h, w, &post) == 0, "%s", sdx4_last_error());
        if (post.pixels) {
            size_t off = 0, worst = 0;
            for (size_t i = 0; i < n && png.width == w; i++) {
                int d = abs((int)post.pixels[i] - (int)png.pixels[i]);
                off += d != 0;
                if ((size_t)d > worst) worst = d;
            }
            CHECK(worst <= 1 && off * 1000 <= n, "postprocess: %zu values off, max %zu", off,
                  worst);
            free(post.pixels);
        }
        free(unit);
        free(model);
        free(rgb);
    }
    free(png.pixels);
    sdx4_st_close(&f);

    /* The input decodes to a size that needs no resize (48x40, scale 4). */
    sdx4_image in = {0};
    rc = imageio_read_file(test_ref("small/golden/pipe0_input.png"), &in, err, sizeof err);
    CHECK(rc == 0, "pipe0_input.png: %s", err);
    if (rc == 0) {
        float *chw = NULL;
        int h, w;
        CHECK(sdx4_image_preprocess(&in, 4, &chw, &h, &w) == 0 && h == in.height && w == in.width,
              "preprocess %dx%d -> %dx%d", in.width, in.height, w, h);
        if (chw) CHECK(chw[0] == 2.0f * (in.pixels[0] / 255.0f) - 1.0f, "first value %g", chw[0]);
        free(chw);
        free(in.pixels);
    }
}

int main(int argc, char **argv) {
    (void)argc;
    if (imageio_init(argv[0])) return 1;
    test_resize_case(37, 45, 36, 44);
    test_resize_case(66, 65, 64, 64);
    test_resize_case(130, 9, 128, 8);
    test_resize_case(41, 40, 40, 40);
    test_resize_case(40, 43, 40, 40);
    test_resize_case(50, 30, 13, 7);
    test_resize_case(9, 6, 20, 15);
    test_resize_case(41, 47, 40, 40); /* Pillow 13: vertical pass first */
    test_resize_case(52, 47, 59, 40);
    test_preprocess_resizes(37, 45, 36, 44, 4);
    test_preprocess_resizes(130, 9, 128, 8, 8);
    test_preprocess_resizes(41, 47, 40, 40, 8);
    test_normalize();
    test_postprocess_rounding();
    test_errors();
    test_golden_output();
    imageio_shutdown();
    return test_finish("test_image_processor");
}
