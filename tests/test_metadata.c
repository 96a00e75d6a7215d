/*
 * test_metadata.c - the opt-in output metadata: imageio's text chunks,
 * EXIF UserComment and ICC profiles (src/imageio/imageio.c) and the
 * AUTOMATIC1111-style text (src/imageio/infotext.c).
 *
 * What is written is read back with libvips' own loaders (libpng's text
 * chunks, libexif's EXIF), not with the code that wrote it. Profiles come
 * from libvips' built-in ones (sRGB, CMYK), so no fixture is needed. The
 * default stays as it was: no metadata gives the bytes imageio_encode
 * gives, and the same inputs give the same bytes.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vips/vips.h>

#include "imageio.h"
#include "infotext.h"
#include "test.h"

static sdx4_image card(int w, int h) {
    sdx4_image im = {w, h, malloc((size_t)w * h * 3)};
    for (int i = 0; i < w * h * 3; i++) im.pixels[i] = (uint8_t)(i * 7 + i / 97);
    return im;
}

/* One of libvips' built-in profiles ("srgb", "cmyk"), g_malloc'd. */
static void *profile(const char *name, size_t *len) {
    VipsBlob *blob = NULL;
    if (vips_profile_load(name, &blob, NULL)) return NULL;
    const void *data = vips_blob_get(blob, len);
    void *copy = g_memdup2(data, *len);
    vips_area_unref(VIPS_AREA(blob));
    return copy;
}

static bool same(const void *a, size_t na, const void *b, size_t nb) {
    return na == nb && memcmp(a, b, na) == 0;
}

static const char *ASCII_TEXT = "a cat\nNegative prompt: blurry\nSteps: 20, Seed: 42";
static const char *UTF8_TEXT = "un chat \xc3\xa9t\xc3\xa9, \xe2\x9c\x93 \xf0\x9f\x90\x88";

/* The default is untouched: no metadata, or empty metadata, gives
 * imageio_encode's bytes; metadata gives other bytes, the same each time. */
static void test_default_bytes(void) {
    sdx4_image im = card(24, 16);
    size_t icc_len = 0;
    void *icc = profile("srgb", &icc_len);
    imageio_metadata none = {0}, some = {{{"parameters", ASCII_TEXT}}, 1, icc, icc_len};
    const image_format formats[] = {IMAGE_PNG, IMAGE_JPEG, IMAGE_WEBP};
    for (int f = 0; f < 3; f++) {
        void *plain = NULL, *a = NULL, *b = NULL, *c = NULL, *d = NULL;
        size_t np = 0, na = 0, nb = 0, nc = 0, nd = 0;
        char err[256] = "";
        CHECK(imageio_encode(&im, formats[f], 0, &plain, &np, err, sizeof err) == 0, "%s", err);
        CHECK(imageio_encode_metadata(&im, formats[f], 0, NULL, &a, &na, err, sizeof err) == 0, "%s", err);
        CHECK(imageio_encode_metadata(&im, formats[f], 0, &none, &b, &nb, err, sizeof err) == 0, "%s", err);
        CHECK(imageio_encode_metadata(&im, formats[f], 0, &some, &c, &nc, err, sizeof err) == 0, "%s", err);
        CHECK(imageio_encode_metadata(&im, formats[f], 0, &some, &d, &nd, err, sizeof err) == 0, "%s", err);
        const char *name = imageio_format_name(formats[f]);
        CHECK(same(plain, np, a, na), "%s: NULL metadata changed the bytes", name);
        CHECK(same(plain, np, b, nb), "%s: empty metadata changed the bytes", name);
        CHECK(!same(plain, np, c, nc) && nc > np, "%s: metadata wrote nothing (%zu, %zu bytes)", name, np, nc);
        CHECK(same(c, nc, d, nd), "%s: the same metadata gave other bytes", name);
        free(plain), free(a), free(b), free(c), free(d);
    }
    g_free(icc);
    free(im.pixels);
}

/* libvips' reading of a PNG's text chunk `keyword`, or NULL. */
static const char *png_text(VipsImage *img, const char *keyword) {
    for (int i = 0; i < 8; i++) {
        char field[128];
        const char *v;
        snprintf(field, sizeof field, "png-comment-%d-%s", i, keyword);
        if (vips_image_get_typeof(img, field) && !vips_image_get_string(img, field, &v)) return v;
    }
    return NULL;
}

static void test_png(void) {
    sdx4_image im = card(20, 12);
    size_t icc_len = 0;
    void *icc = profile("srgb", &icc_len);
    CHECK(icc && icc_len > 128, "no sRGB profile from libvips");
    imageio_metadata meta = {{{"parameters", ASCII_TEXT}, {"extras", UTF8_TEXT}}, 2, icc, icc_len};
    void *png = NULL;
    size_t len = 0;
    char err[256] = "";
    CHECK(imageio_encode_metadata(&im, IMAGE_PNG, 0, &meta, &png, &len, err, sizeof err) == 0, "%s", err);
    /* tEXt for ASCII, iTXt for the rest, both before the pixels */
    const char *idat = memmem(png, len, "IDAT", 4), *t = memmem(png, len, "tEXtparameters", 14),
               *it = memmem(png, len, "iTXtextras", 10);
    CHECK(t && it && idat && t < idat && it < idat, "chunks: tEXt %p iTXt %p IDAT %p", (void *)t, (void *)it,
          (void *)idat);
    VipsImage *back = vips_image_new_from_buffer(png, len, "", NULL);
    CHECK(back != NULL, "libvips cannot read it: %s", vips_error_buffer());
    if (back) {
        const char *a = png_text(back, "parameters"), *u = png_text(back, "extras");
        CHECK(a && !strcmp(a, ASCII_TEXT), "parameters read back as %s", a ? a : "(none)");
        CHECK(u && !strcmp(u, UTF8_TEXT), "extras read back as %s", u ? u : "(none)");
        const void *blob;
        size_t n;
        CHECK(!vips_image_get_blob(back, VIPS_META_ICC_NAME, &blob, &n) && same(blob, n, icc, icc_len),
              "the profile did not come back");
        g_object_unref(back);
    }
    /* the pixels are untouched, and decoding keeps the profile when asked */
    sdx4_image out = {0};
    void *kept = NULL;
    size_t kept_len = 0;
    CHECK(imageio_decode_keep_icc(png, len, &out, &kept, &kept_len, err, sizeof err) == 0, "%s", err);
    CHECK(out.pixels && !memcmp(out.pixels, im.pixels, (size_t)im.width * im.height * 3), "pixels changed");
    CHECK(same(kept, kept_len, icc, icc_len), "the kept profile differs (%zu bytes)", kept_len);
    free(kept), sdx4_image_free(&out);
    free(png);
    g_free(icc);
    free(im.pixels);
}

/* JPEG and WebP: the profile, and the first text as EXIF UserComment,
 * "UNICODE\0" then UTF-16BE (piexif's encoding="unicode"). */
static void test_exif(void) {
    sdx4_image im = card(32, 32);
    size_t icc_len = 0;
    void *icc = profile("srgb", &icc_len);
    imageio_metadata meta = {{{"parameters", UTF8_TEXT}}, 1, icc, icc_len};
    /* what UTF8_TEXT is in UTF-16BE */
    glong units = 0;
    gunichar2 *u16 = g_utf8_to_utf16(UTF8_TEXT, -1, NULL, &units, NULL);
    unsigned char expect[256];
    memcpy(expect, "UNICODE\0", 8);
    for (glong i = 0; i < units; i++) expect[8 + 2 * i] = u16[i] >> 8, expect[9 + 2 * i] = u16[i] & 0xff;
    g_free(u16);
    const image_format formats[] = {IMAGE_JPEG, IMAGE_WEBP};
    for (int f = 0; f < 2; f++) {
        const char *name = imageio_format_name(formats[f]);
        void *file = NULL;
        size_t len = 0;
        char err[256] = "";
        CHECK(imageio_encode_metadata(&im, formats[f], 90, &meta, &file, &len, err, sizeof err) == 0, "%s: %s",
              name, err);
        VipsImage *back = file ? vips_image_new_from_buffer(file, len, "", NULL) : NULL;
        CHECK(back != NULL, "%s: libvips cannot read it", name);
        if (!back) continue;
        const void *blob;
        size_t n;
        CHECK(!vips_image_get_blob(back, VIPS_META_ICC_NAME, &blob, &n) && same(blob, n, icc, icc_len),
              "%s: the profile did not come back", name);
        CHECK(!vips_image_get_blob(back, VIPS_META_EXIF_NAME, &blob, &n) &&
                  memmem(blob, n, expect, 8 + 2 * (size_t)units) != NULL,
              "%s: no UserComment of the text in the EXIF", name);
        const char *comment = NULL; /* libexif's reading names the tag */
        CHECK(!vips_image_get_string(back, "exif-ifd2-UserComment", &comment) && comment,
              "%s: libexif finds no UserComment", name);
        g_object_unref(back);
        free(file);
    }
    g_free(icc);
    free(im.pixels);
}

/* Only a profile that still describes the decoded values is kept. */
static void test_keep_icc(void) {
    char err[256] = "";
    sdx4_image out = {0};
    void *kept = (void *)1;
    size_t kept_len = 1;
    /* none */
    sdx4_image im = card(16, 16);
    void *png = NULL;
    size_t len = 0;
    CHECK(imageio_encode(&im, IMAGE_PNG, 0, &png, &len, err, sizeof err) == 0, "%s", err);
    CHECK(imageio_decode_keep_icc(png, len, &out, &kept, &kept_len, err, sizeof err) == 0 && !kept &&
              !kept_len, "a profile from a file without one");
    sdx4_image_free(&out);
    free(png);
    /* a CMYK JPEG's CMYK profile: decoding converts to sRGB, so it goes */
    size_t cmyk_len = 0;
    void *cmyk_icc = profile("cmyk", &cmyk_len);
    uint8_t px[16 * 16 * 4] = {0};
    VipsImage *cmyk = vips_image_new_from_memory_copy(px, sizeof px, 16, 16, 4, VIPS_FORMAT_UCHAR);
    cmyk->Type = VIPS_INTERPRETATION_CMYK;
    vips_image_set_blob_copy(cmyk, VIPS_META_ICC_NAME, cmyk_icc, cmyk_len);
    void *jpg = NULL;
    CHECK(!vips_jpegsave_buffer(cmyk, &jpg, &len, NULL), "cmyk save: %s", vips_error_buffer());
    g_object_unref(cmyk);
    kept = (void *)1;
    CHECK(jpg && imageio_decode_keep_icc(jpg, len, &out, &kept, &kept_len, err, sizeof err) == 0 && !kept,
          "a CMYK profile kept for sRGB pixels: %s", err);
    sdx4_image_free(&out);
    g_free(jpg);
    g_free(cmyk_icc);
    /* an RGB profile of an RGB JPEG that the PNG saver leaves out (its PCS
     * neither XYZ nor Lab): not kept, so that no PNG output lacks it */
    size_t srgb_len = 0;
    unsigned char *bad_pcs = profile("srgb", &srgb_len);
    memcpy(bad_pcs + 20, "XXXX", 4);
    VipsImage *rgb = vips_image_new_from_memory_copy(im.pixels, (size_t)16 * 16 * 3, 16, 16, 3, VIPS_FORMAT_UCHAR);
    rgb->Type = VIPS_INTERPRETATION_sRGB;
    vips_image_set_blob_copy(rgb, VIPS_META_ICC_NAME, bad_pcs, srgb_len);
    jpg = NULL;
    CHECK(!vips_jpegsave_buffer(rgb, &jpg, &len, NULL), "jpeg save: %s", vips_error_buffer());
    vips_error_clear();
    g_object_unref(rgb);
    VipsImage *check = jpg ? vips_image_new_from_buffer(jpg, len, "", NULL) : NULL;
    CHECK(check && vips_image_get_typeof(check, VIPS_META_ICC_NAME), "the JPEG lost its profile");
    if (check) g_object_unref(check);
    kept = (void *)1;
    CHECK(jpg && imageio_decode_keep_icc(jpg, len, &out, &kept, &kept_len, err, sizeof err) == 0 && !kept,
          "a profile libpng refuses was kept: %s", err);
    sdx4_image_free(&out);
    g_free(jpg);
    /* given to the encoder anyway: a clear error, not a PNG without it */
    imageio_metadata meta = {.icc = bad_pcs, .icc_len = srgb_len};
    void *png_out = NULL;
    err[0] = 0;
    CHECK(imageio_encode_metadata(&im, IMAGE_PNG, 0, &meta, &png_out, &len, err, sizeof err) == -1 &&
              strstr(err, "refused"), "a PNG with a profile its saver leaves out: %s", err);
    free(png_out);
    g_free(bad_pcs);
    /* an undecodable file: -1, and no profile to free */
    kept = (void *)1;
    CHECK(imageio_decode_keep_icc("\x89PNG\r\n\x1a\n", 8, &out, &kept, &kept_len, err, sizeof err) == -1 &&
              !kept && err[0], "a broken PNG");
    CHECK(imageio_decode_keep_icc("x", 1, &out, NULL, &kept_len, err, sizeof err) == -1, "no place for it");
    free(im.pixels);
}

static void test_bad_metadata(void) {
    sdx4_image im = card(8, 8);
    void *out = NULL;
    size_t len = 0;
    char err[256];
    char long_key[81];
    memset(long_key, 'k', 80), long_key[80] = 0;
    const imageio_text bad_texts[] = {
        {"", "x"}, {long_key, "x"}, {" lead", "x"}, {"two  spaces", "x"}, {"tab\t", "x"},
        {"caf\xc3\xa9", "x"}, {"ok", "bad \xff utf-8"}, {"ok", "overlong \xc0\xaf"}, {NULL, "x"}, {"ok", NULL},
    };
    for (size_t i = 0; i < sizeof bad_texts / sizeof bad_texts[0]; i++) {
        imageio_metadata m = {{bad_texts[i]}, 1, NULL, 0};
        err[0] = 0;
        CHECK(imageio_encode_metadata(&im, IMAGE_PNG, 0, &m, &out, &len, err, sizeof err) == -1 && err[0],
              "bad text %zu accepted", i);
    }
    imageio_metadata many = {{{"a", "x"}}, IMAGEIO_MAX_TEXTS + 1, NULL, 0};
    CHECK(imageio_encode_metadata(&im, IMAGE_PNG, 0, &many, &out, &len, err, sizeof err) == -1, "too many texts");
    /* a profile that is not a whole RGB one */
    unsigned char junk[200] = "not a profile";
    size_t cmyk_len = 0;
    void *cmyk = profile("cmyk", &cmyk_len);
    imageio_metadata bad_icc[] = {{.icc = junk, .icc_len = sizeof junk}, {.icc = cmyk, .icc_len = cmyk_len},
                                  {.icc = cmyk, .icc_len = cmyk_len - 1}};
    for (int i = 0; i < 3; i++) {
        err[0] = 0;
        CHECK(imageio_encode_metadata(&im, IMAGE_JPEG, 0, &bad_icc[i], &out, &len, err, sizeof err) == -1 &&
                  strstr(err, "ICC"), "bad profile %d accepted: %s", i, err);
    }
    g_free(cmyk);
    /* a text over what a JPEG's EXIF holds: refused by name; a PNG takes it */
    char *huge = malloc(40001);
    memset(huge, 'a', 40000), huge[40000] = 0;
    imageio_metadata big = {{{"parameters", huge}}, 1, NULL, 0};
    err[0] = 0;
    CHECK(imageio_encode_metadata(&im, IMAGE_JPEG, 0, &big, &out, &len, err, sizeof err) == -1 &&
              strstr(err, "EXIF"), "a 40000-character text in a JPEG: %s", err);
    CHECK(imageio_encode_metadata(&im, IMAGE_PNG, 0, &big, &out, &len, err, sizeof err) == 0, "png: %s", err);
    free(out);
    free(huge);
    free(im.pixels);
}

/* The text: A1111's layout, what applies to the model's kind. */
static void test_infotext(void) {
    sdx4_upscale_params p;
    sdx4_upscale_params_default(&p);
    p.prompt = "a cat";
    p.negative_prompt = "blurry";
    p.num_inference_steps = 20;
    p.guidance_scale = 9;
    p.noise_level = 0.2f;
    p.seed = 42;
    p.scheduler = "euler-a";
    p.scheduler_options = "{\"use_karras_sigmas\":true}";
    p.tile = 32;
    p.tile_overlap = 8;
    infotext_facts x = {"x4, upscaler", NULL, false, 128, 96, 512, 384};
    char *t = infotext(&p, &x);
    const char *want = "a cat\nNegative prompt: blurry\n"
                       "Steps: 20, Sampler: euler-a, Scheduler options: \"{\\\"use_karras_sigmas\\\":true}\", "
                       "CFG scale: 9, Seed: 42, Size: 512x384, Model: \"x4, upscaler\", Noise level: 0.2, "
                       "Tile: 32, Tile overlap: 8, Input size: 128x96, Version: sdx4 " SDX4_VERSION;
    CHECK(t && !strcmp(t, want), "diffusion text:\n%s\nwanted:\n%s", t ? t : "(null)", want);
    CHECK(t && infotext_bound(&p, &x) >= strlen(t), "bound %zu under %zu", infotext_bound(&p, &x), strlen(t));
    free(t);
    /* the bound holds at the numbers' longest and with every key */
    sdx4_upscale_params longest = p;
    longest.seed = SDX4_SEED_MAX, longest.eta = 0.123456f, longest.vae_tiling = "on";
    longest.guidance_scale = 12.3456f, longest.noise_level = 0.123456f, longest.num_inference_steps = 1000;
    longest.tile = 2147483647, longest.tile_overlap = 2147483646;
    infotext_facts huge = {"m", "0123456789", false, 2147483647, 2147483647, 2147483647, 2147483647};
    t = infotext(&longest, &huge);
    CHECK(t && infotext_bound(&longest, &huge) >= strlen(t), "bound %zu under %zu", infotext_bound(&longest, &huge),
          t ? strlen(t) : 0);
    free(t);
    /* no prompts, the defaults: no empty lines, no keys for what was not chosen */
    sdx4_upscale_params_default(&p);
    p.seed = 7;
    x.model = "x4-upscaler";
    x.model_hash = "0123abcd";
    t = infotext(&p, &x);
    CHECK(t && !strncmp(t, "Steps: ", 7) && !strchr(t, '\n') && !strstr(t, "Sampler") && !strstr(t, "Tile") &&
              !strstr(t, "Eta") && strstr(t, "Model hash: 0123abcd, Model: x4-upscaler"),
          "default text: %s", t ? t : "(null)");
    free(t);
    /* a GAN: what A1111's extras tab writes, no prompt, steps or seed */
    p.prompt = "ignored";
    p.tile = 64;
    infotext_facts g = {"realesrgan-x4plus", NULL, true, 100, 50, 400, 200};
    t = infotext(&p, &g);
    CHECK(t && !strcmp(t, "Postprocess upscale by: 4, Postprocess upscaler: realesrgan-x4plus, Tile: 64, "
                          "Size: 400x200, Input size: 100x50, Version: sdx4 " SDX4_VERSION),
          "GAN text: %s", t ? t : "(null)");
    imageio_metadata m;
    infotext_metadata(t, true, NULL, 0, &m);
    CHECK(m.ntexts == 2 && !strcmp(m.texts[0].keyword, "postprocessing") && !strcmp(m.texts[1].keyword, "extras"),
          "GAN keywords");
    infotext_metadata(t, false, "icc", 3, &m);
    CHECK(m.ntexts == 1 && !strcmp(m.texts[0].keyword, "parameters") && m.icc_len == 3, "diffusion keyword");
    free(t);
}

int main(int argc, char **argv) {
    (void)argc;
    if (imageio_init(argv[0])) {
        fprintf(stderr, "imageio_init failed\n");
        return 1;
    }
    test_default_bytes();
    test_png();
    test_exif();
    test_keep_icc();
    test_bad_metadata();
    test_infotext();
    imageio_shutdown();
    return test_finish("test_metadata");
}
