/*
 * test_imageio.c - image files in and out (src/imageio), good and bad.
 *
 * Inputs of every kind the decoder must convert (grey, palette, RGBA,
 * 16-bit, CMYK, EXIF-rotated) are made here with libvips itself, so the
 * test needs no binary fixtures. Malformed input is tested as seriously:
 * each bad file must give -1 and a message, print nothing, and return
 * promptly.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <vips/vips.h>

#include "imageio.h"
#include "test.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* A w x h RGB test card: gradients and a few hard edges. */
static uint8_t *make_rgb(int w, int h) {
    uint8_t *p = malloc((size_t)w * h * 3);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            uint8_t *q = p + 3 * ((size_t)y * w + x);
            q[0] = (uint8_t)(x * 255 / (w - 1));
            q[1] = (uint8_t)(y * 255 / (h - 1));
            q[2] = ((x / 8 + y / 8) % 2) ? 200 : 30;
        }
    return p;
}

/* Saves a libvips image built from memory in the given format (a vips
 * saver name) and returns the file's bytes, g_malloc'd. */
static void *vips_save(VipsImage *img, const char *saver, size_t *len) {
    void *buf = NULL;
    int rc;
    if (strcmp(saver, "png") == 0)
        rc = vips_pngsave_buffer(img, &buf, len, NULL);
    else if (strcmp(saver, "png8") == 0)
        rc = vips_pngsave_buffer(img, &buf, len, "palette", TRUE, "dither", 0.0, NULL);
    else if (strcmp(saver, "jpeg") == 0)
        rc = vips_jpegsave_buffer(img, &buf, len, "Q", 95, NULL);
    else
        rc = vips_webpsave_buffer(img, &buf, len, "Q", 90, NULL);
    if (rc) {
        fprintf(stderr, "vips %s save: %s\n", saver, vips_error_buffer());
        vips_error_clear();
        return NULL;
    }
    return buf;
}

static VipsImage *vips_from(const void *px, int w, int h, int bands, VipsBandFormat fmt,
                            VipsInterpretation interp) {
    size_t size = (size_t)w * h * bands * (fmt == VIPS_FORMAT_USHORT ? 2 : 1);
    VipsImage *img = vips_image_new_from_memory_copy(px, size, w, h, bands, fmt);
    img->Type = interp;
    return img;
}

/* Silences stderr while bad input is fed in; returns how many bytes were
 * written to it meanwhile (libvips or the decoders must print nothing). */
static int saved_stderr = -1;
static FILE *capture;
static void stderr_capture(void) {
    fflush(stderr);
    capture = tmpfile();
    saved_stderr = dup(2);
    dup2(fileno(capture), 2);
}
static long stderr_release(void) {
    fflush(stderr);
    dup2(saved_stderr, 2);
    close(saved_stderr);
    fseek(capture, 0, SEEK_END);
    long n = ftell(capture);
    rewind(capture);
    char line[512];
    while (fgets(line, sizeof line, capture)) fprintf(stderr, "captured: %s", line);
    fclose(capture);
    return n;
}

/* ---- formats ----------------------------------------------------------- */

static void test_formats(void) {
    CHECK(imageio_sniff("\x89PNG\r\n\x1a\n", 8) == IMAGE_PNG, "png magic");
    CHECK(imageio_sniff("\x89PNG\r\n\x1a", 7) == IMAGE_UNKNOWN, "short png magic");
    CHECK(imageio_sniff("\xff\xd8\xff\xe0", 4) == IMAGE_JPEG, "jpeg magic");
    CHECK(imageio_sniff("RIFF\x10\0\0\0WEBPVP8 ", 16) == IMAGE_WEBP, "webp magic");
    CHECK(imageio_sniff("RIFF\x10\0\0\0WAVEfmt ", 16) == IMAGE_UNKNOWN, "wav is not webp");
    CHECK(imageio_sniff("GIF89a", 6) == IMAGE_UNKNOWN, "gif");
    CHECK(imageio_sniff(NULL, 10) == IMAGE_UNKNOWN, "NULL");
    CHECK(imageio_format_from_name("JPG") == IMAGE_JPEG, "JPG");
    CHECK(imageio_format_from_name("out/x.Jpeg") == IMAGE_JPEG, "x.Jpeg");
    CHECK(imageio_format_from_name("a.b/c.webp") == IMAGE_WEBP, "c.webp");
    CHECK(imageio_format_from_name("a.png/c") == IMAGE_UNKNOWN, "folder with a dot");
    CHECK(imageio_format_from_name("png") == IMAGE_PNG, "png");
    CHECK(imageio_format_from_name("x.gif") == IMAGE_UNKNOWN, "gif");
    CHECK(strcmp(imageio_format_name(IMAGE_JPEG), "jpeg") == 0, "name");
    CHECK(strcmp(imageio_mime_type(IMAGE_WEBP), "image/webp") == 0, "mime");
    CHECK(strcmp(imageio_mime_type(IMAGE_PNG), "image/png") == 0, "mime");
}

/* ---- round trips ------------------------------------------------------- */

static void test_round_trips(void) {
    const int w = 64, h = 48;
    uint8_t *px = make_rgb(w, h);
    sdx4_image img = {w, h, px};
    const image_format formats[3] = {IMAGE_PNG, IMAGE_JPEG, IMAGE_WEBP};
    for (int i = 0; i < 3; i++) {
        const char *name = imageio_format_name(formats[i]);
        char err[256] = "";
        void *a = NULL, *b = NULL;
        size_t alen = 0, blen = 0;
        CHECK(imageio_encode(&img, formats[i], 95, &a, &alen, err, sizeof err) == 0, "%s: %s",
              name, err);
        CHECK(imageio_encode(&img, formats[i], 95, &b, &blen, err, sizeof err) == 0, "%s: %s",
              name, err);
        CHECK(a && b && alen == blen && memcmp(a, b, alen) == 0, "%s: output not deterministic",
              name);
        CHECK(a && imageio_sniff(a, alen) == formats[i], "%s: wrong magic", name);
        image_format f = IMAGE_UNKNOWN;
        int pw = 0, ph = 0;
        CHECK(imageio_probe(a, alen, &f, &pw, &ph, err, sizeof err) == 0 && f == formats[i] &&
                  pw == w && ph == h,
              "%s probe: %dx%d %s", name, pw, ph, err);
        sdx4_image back = {0};
        CHECK(imageio_decode(a, alen, &back, err, sizeof err) == 0, "%s decode: %s", name, err);
        if (back.pixels) {
            CHECK(back.width == w && back.height == h, "%s: %dx%d", name, back.width, back.height);
            int worst = 0;
            double sum = 0;
            for (int k = 0; k < w * h * 3; k++) {
                int d = abs((int)back.pixels[k] - px[k]);
                worst = d > worst ? d : worst;
                sum += d;
            }
            if (formats[i] == IMAGE_PNG) CHECK(worst == 0, "png not lossless: %d", worst);
            else /* lossy; WebP halves the chroma even at q95, hence its red/blue edges */
                CHECK(sum / (w * h * 3) < (formats[i] == IMAGE_JPEG ? 2.0 : 8.0),
                      "%s: mean error %.2f", name, sum / (w * h * 3));
            free(back.pixels);
        }
        free(a);
        free(b);
    }
    /* quality: 0 = default, out of range refused */
    char err[256] = "";
    void *buf = NULL;
    size_t len = 0;
    CHECK(imageio_encode(&img, IMAGE_JPEG, 0, &buf, &len, err, sizeof err) == 0, "q0: %s", err);
    free(buf);
    buf = NULL;
    CHECK(imageio_encode(&img, IMAGE_JPEG, 101, &buf, &len, err, sizeof err) == -1 && !buf,
          "quality 101 accepted");
    CHECK(imageio_encode(&img, IMAGE_UNKNOWN, 90, &buf, &len, err, sizeof err) == -1,
          "unknown format accepted");
    sdx4_image empty = {0, 0, NULL};
    CHECK(imageio_encode(&empty, IMAGE_PNG, 90, &buf, &len, err, sizeof err) == -1 && err[0],
          "empty image accepted");

    /* files, by extension */
    char path[64];
    snprintf(path, sizeof path, "test_imageio_%d.webp", (int)getpid());
    CHECK(imageio_write_file(&img, path, 90, err, sizeof err) == 0, "%s: %s", path, err);
    sdx4_image back = {0};
    CHECK(imageio_read_file(path, &back, err, sizeof err) == 0 && back.width == w &&
              back.height == h,
          "read %s: %s", path, err);
    free(back.pixels);
    remove(path);
    CHECK(imageio_write_file(&img, "x.gif", 90, err, sizeof err) == -1 && strstr(err, "x.gif"),
          "gif written: %s", err);
    CHECK(imageio_write_file(&img, "/nonexistent-dir/x.png", 90, err, sizeof err) == -1,
          "write into a missing folder");
    CHECK(imageio_read_file("/nonexistent-dir/x.png", &back, err, sizeof err) == -1 &&
              strstr(err, "x.png"),
          "read of a missing file: %s", err);
    free(px);
}

/* ---- conversions ------------------------------------------------------- */

static int decode_vips(VipsImage *img, const char *saver, sdx4_image *out) {
    size_t len = 0;
    void *buf = vips_save(img, saver, &len);
    g_object_unref(img);
    char err[256] = "";
    int rc = buf ? imageio_decode(buf, len, out, err, sizeof err) : -1;
    if (rc) fprintf(stderr, "decode of %s: %s\n", saver, err);
    g_free(buf);
    return rc;
}

static void test_grey_and_palette(void) {
    const int w = 20, h = 10;
    uint8_t grey[20 * 10];
    for (int i = 0; i < w * h; i++) grey[i] = (uint8_t)(i * 7);
    sdx4_image out = {0};
    CHECK(decode_vips(vips_from(grey, w, h, 1, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_B_W),
                      "png", &out) == 0,
          "grey png");
    if (out.pixels) {
        int bad = 0;
        for (int i = 0; i < w * h; i++)
            for (int c = 0; c < 3; c++) bad += out.pixels[3 * i + c] != grey[i];
        CHECK(bad == 0 && out.width == w, "grey: %d values differ", bad);
        free(out.pixels);
        out.pixels = NULL;
    }
    /* four colours survive a palette PNG exactly */
    uint8_t rgb[20 * 10 * 3];
    const uint8_t colours[4][3] = {{255, 0, 0}, {0, 128, 0}, {10, 20, 250}, {250, 250, 250}};
    for (int i = 0; i < w * h; i++) memcpy(rgb + 3 * i, colours[(i / 3) % 4], 3);
    size_t len = 0;
    VipsImage *img = vips_from(rgb, w, h, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB);
    unsigned char *png = vips_save(img, "png8", &len);
    g_object_unref(img);
    CHECK(png && len > 26 && png[25] == 3, "not a palette PNG (colour type %d)",
          png && len > 26 ? png[25] : -1);
    char err[256];
    CHECK(png && imageio_decode(png, len, &out, err, sizeof err) == 0, "palette: %s", err);
    if (out.pixels) {
        CHECK(memcmp(out.pixels, rgb, sizeof rgb) == 0, "palette colours changed");
        free(out.pixels);
    }
    g_free(png);
}

static void test_alpha_and_16bit(void) {
    /* RGBA: opaque keeps its colour, transparent is white, half blends */
    const uint8_t rgba[4 * 4] = {10, 20, 30, 255, 10, 20, 30, 0, 0, 0, 0, 128, 200, 100, 0, 64};
    sdx4_image out = {0};
    CHECK(decode_vips(vips_from(rgba, 4, 1, 4, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB),
                      "png", &out) == 0,
          "rgba png");
    if (out.pixels) {
        const uint8_t *p = out.pixels;
        CHECK(p[0] == 10 && p[1] == 20 && p[2] == 30, "opaque: %d %d %d", p[0], p[1], p[2]);
        CHECK(p[3] == 255 && p[4] == 255 && p[5] == 255, "clear: %d %d %d", p[3], p[4], p[5]);
        /* black at alpha 128/255 over white: 255 * 127 / 255 = 127 */
        CHECK(abs(p[6] - 127) <= 1 && p[6] == p[7] && p[7] == p[8], "half: %d", p[6]);
        /* (200 * 64 + 255 * 191) / 255 = 241.2 */
        CHECK(abs(p[9] - 241) <= 1, "quarter: %d", p[9]);
        free(out.pixels);
        out.pixels = NULL;
    }
    /* grey + alpha */
    const uint8_t ga[2 * 2] = {50, 255, 50, 0};
    CHECK(decode_vips(vips_from(ga, 2, 1, 2, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_B_W),
                      "png", &out) == 0,
          "grey+alpha png");
    if (out.pixels) {
        CHECK(out.pixels[0] == 50 && out.pixels[2] == 50 && out.pixels[3] == 255,
              "grey+alpha: %d %d", out.pixels[0], out.pixels[3]);
        free(out.pixels);
        out.pixels = NULL;
    }
    /* 16-bit RGB: the high byte */
    uint16_t rgb16[3 * 3] = {0, 65535, 0x1234, 0x80ff, 0x7f00, 0xff80, 256, 255, 32768};
    VipsImage *img = vips_from(rgb16, 3, 1, 3, VIPS_FORMAT_USHORT, VIPS_INTERPRETATION_RGB16);
    size_t len = 0;
    unsigned char *png = vips_save(img, "png", &len);
    g_object_unref(img);
    CHECK(png && len > 26 && png[24] == 16, "not a 16-bit PNG (depth %d)",
          png && len > 26 ? png[24] : -1);
    char err[256];
    CHECK(png && imageio_decode(png, len, &out, err, sizeof err) == 0, "16-bit: %s", err);
    if (out.pixels) {
        int bad = 0;
        for (int i = 0; i < 9; i++) bad += out.pixels[i] != rgb16[i] >> 8;
        CHECK(bad == 0, "16-bit: %d values are not the high byte", bad);
        free(out.pixels);
        out.pixels = NULL;
    }
    g_free(png);
    /* 16-bit grey with alpha */
    uint16_t ga16[2 * 2] = {0x4000, 65535, 0x4000, 0};
    CHECK(decode_vips(vips_from(ga16, 2, 1, 2, VIPS_FORMAT_USHORT, VIPS_INTERPRETATION_GREY16),
                      "png", &out) == 0,
          "16-bit grey+alpha");
    if (out.pixels) {
        CHECK(out.pixels[0] == 0x40 && out.pixels[3] == 255, "16-bit grey+alpha: %d %d",
              out.pixels[0], out.pixels[3]);
        free(out.pixels);
    }
}

static void test_cmyk(void) {
    /* white paper, full black ink, full cyan */
    const uint8_t cmyk[3 * 4] = {0, 0, 0, 0, 0, 0, 0, 255, 255, 0, 0, 0};
    uint8_t px[8 * 8 * 4];
    for (int i = 0; i < 64; i++) memcpy(px + 4 * i, cmyk + 4 * ((i % 8) / 3), 4);
    VipsImage *img = vips_from(px, 8, 8, 4, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_CMYK);
    size_t len = 0;
    void *jpg = vips_save(img, "jpeg", &len);
    g_object_unref(img);
    VipsImage *check = jpg ? vips_image_new_from_buffer(jpg, len, "", NULL) : NULL;
    CHECK(check && check->Bands == 4 && check->Type == VIPS_INTERPRETATION_CMYK,
          "not a CMYK JPEG");
    if (check) g_object_unref(check);
    sdx4_image out = {0};
    char err[256];
    CHECK(jpg && imageio_decode(jpg, len, &out, err, sizeof err) == 0, "cmyk: %s", err);
    if (out.pixels) {
        const uint8_t *white = out.pixels, *black = out.pixels + 3 * 3, *cyan = out.pixels + 3 * 6;
        CHECK(white[0] > 230 && white[1] > 230 && white[2] > 230, "paper: %d %d %d", white[0],
              white[1], white[2]);
        CHECK(black[0] < 60 && black[1] < 60 && black[2] < 60, "ink: %d %d %d", black[0],
              black[1], black[2]);
        CHECK(cyan[0] < 100 && cyan[1] > 120 && cyan[2] > 180, "cyan: %d %d %d", cyan[0],
              cyan[1], cyan[2]);
        free(out.pixels);
    }
    g_free(jpg);
}

static void test_orientation(void) {
    /* 40 wide, 20 high: left half red, right half blue; EXIF 6 = the
     * camera was turned, display rotated 90 degrees clockwise */
    uint8_t px[40 * 20 * 3];
    for (int y = 0; y < 20; y++)
        for (int x = 0; x < 40; x++) {
            uint8_t *q = px + 3 * (y * 40 + x);
            q[0] = x < 20 ? 255 : 0;
            q[1] = 0;
            q[2] = x < 20 ? 0 : 255;
        }
    const char *savers[2] = {"jpeg", "webp"};
    for (int s = 0; s < 2; s++) {
        VipsImage *img = vips_from(px, 40, 20, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB);
        vips_image_set_int(img, VIPS_META_ORIENTATION, 6);
        size_t len = 0;
        void *buf = vips_save(img, savers[s], &len);
        g_object_unref(img);
        char err[256] = "";
        int w = 0, h = 0;
        CHECK(buf && imageio_probe(buf, len, NULL, &w, &h, err, sizeof err) == 0 && w == 20 &&
                  h == 40,
              "%s orientation 6: probe %dx%d %s", savers[s], w, h, err);
        sdx4_image out = {0};
        CHECK(buf && imageio_decode(buf, len, &out, err, sizeof err) == 0, "%s", err);
        if (out.pixels) {
            CHECK(out.width == 20 && out.height == 40, "%s: decoded %dx%d", savers[s], out.width,
                  out.height);
            const uint8_t *top = out.pixels + 3 * (5 * 20 + 10);
            const uint8_t *bottom = out.pixels + 3 * (35 * 20 + 10);
            CHECK(top[0] > 200 && top[2] < 60, "%s: top is not red (%d %d %d)", savers[s],
                  top[0], top[1], top[2]);
            CHECK(bottom[2] > 200 && bottom[0] < 60, "%s: bottom is not blue", savers[s]);
            free(out.pixels);
        }
        g_free(buf);
    }
}

/* ---- bad input --------------------------------------------------------- */

static size_t put_chunk(unsigned char *out, const char *type, const unsigned char *data,
                        uint32_t n) {
    out[0] = n >> 24, out[1] = n >> 16, out[2] = n >> 8, out[3] = (unsigned char)n;
    memcpy(out + 4, type, 4);
    if (n) memcpy(out + 8, data, n);
    uint32_t c = test_png_crc32(out + 4, n + 4);
    unsigned char *t = out + 8 + n;
    t[0] = c >> 24, t[1] = c >> 16, t[2] = c >> 8, t[3] = (unsigned char)c;
    return 12 + n;
}

/* A PNG whose header claims 100000 x 100000 RGB: the signature and IHDR,
 * then (with_idat) the start of a zlib stream, as a real file would have. */
static size_t huge_png(unsigned char *out, int with_idat) {
    unsigned char ihdr[13] = {0, 1, 0x86, 0xa0, 0, 1, 0x86, 0xa0, 8, 2, 0, 0, 0};
    size_t n = 8;
    memcpy(out, "\x89PNG\r\n\x1a\n", 8);
    n += put_chunk(out + n, "IHDR", ihdr, 13);
    if (with_idat) {
        const unsigned char zstart[6] = {0x78, 0x9c, 0x62, 0x60, 0x18, 0x05};
        n += put_chunk(out + n, "IDAT", zstart, sizeof zstart);
    }
    return n;
}

static void expect_refused(const char *what, const void *data, size_t len) {
    char err[256] = "";
    sdx4_image out = {0};
    double t0 = now();
    int rc = imageio_decode(data, len, &out, err, sizeof err);
    double dt = now() - t0;
    CHECK(rc == -1 && out.pixels == NULL, "%s: decoded", what);
    CHECK(err[0] != 0, "%s: no message", what);
    CHECK(dt < 2.0, "%s: took %.2fs", what, dt);
    free(out.pixels);
}

static void test_bad_input(void) {
    const int w = 64, h = 48;
    uint8_t *px = make_rgb(w, h);
    sdx4_image img = {w, h, px};
    char err[256] = "";
    void *png = NULL, *jpg = NULL, *webp = NULL;
    size_t png_len = 0, jpg_len = 0, webp_len = 0;
    imageio_encode(&img, IMAGE_PNG, 0, &png, &png_len, err, sizeof err);
    imageio_encode(&img, IMAGE_JPEG, 0, &jpg, &jpg_len, err, sizeof err);
    imageio_encode(&img, IMAGE_WEBP, 0, &webp, &webp_len, err, sizeof err);
    CHECK(png && jpg && webp, "encode: %s", err);
    if (!png || !jpg || !webp) goto out;

    stderr_capture();
    expect_refused("0 bytes", png, 0);
    expect_refused("NULL", NULL, 10);
    expect_refused("wrong magic", "GIF89a\1\0\1\0\0\0\0", 13);
    expect_refused("png magic only", png, 8);
    expect_refused("truncated png", png, png_len / 2);
    expect_refused("truncated jpeg", jpg, jpg_len / 2);
    expect_refused("jpeg without EOI", jpg, jpg_len - 2);
    expect_refused("truncated webp", webp, webp_len / 2);
    {
        /* a flipped bit in the PNG's compressed data: a CRC error */
        unsigned char *bad = malloc(png_len);
        memcpy(bad, png, png_len);
        bad[png_len / 2] ^= 0x10;
        expect_refused("png with a bad CRC", bad, png_len);
        free(bad);
    }

    /* A lying header: probe answers at once, decode refuses. */
    unsigned char huge[128];
    for (int with_idat = 0; with_idat < 2; with_idat++) {
        size_t n = huge_png(huge, with_idat);
        int pw = 0, ph = 0;
        double t0 = now();
        int rc = imageio_probe(huge, n, NULL, &pw, &ph, err, sizeof err);
        double dt = now() - t0;
        CHECK(dt < 0.5, "100000^2 probe took %.2fs", dt);
        if (with_idat)
            CHECK(rc == 0 && pw == 100000 && ph == 100000, "probe: %dx%d %s", pw, ph, err);
        else /* libpng reads up to the first IDAT before it answers */
            CHECK(rc == 0 ? pw == 100000 : err[0] != 0, "IHDR only: rc %d %dx%d", rc, pw, ph);
        expect_refused(with_idat ? "100000^2 png" : "100000^2 IHDR only", huge, n);
        sdx4_image out = {0};
        if (with_idat)
            CHECK(imageio_decode(huge, n, &out, err, sizeof err) == -1 &&
                      strstr(err, "100000x100000 is over the limit"),
                  "message: %s", err);
    }

    /* garbage, alone and behind each magic number */
    uint32_t seed = 12345;
    unsigned char junk[4096];
    for (int round = 0; round < 64; round++) {
        size_t n = 1 + (size_t)(round * 61) % sizeof junk;
        for (size_t i = 0; i < n; i++) {
            seed = seed * 1664525u + 1013904223u;
            junk[i] = (unsigned char)(seed >> 24);
        }
        if (round % 4 == 1 && n >= 8) memcpy(junk, "\x89PNG\r\n\x1a\n", 8);
        if (round % 4 == 2 && n >= 3) memcpy(junk, "\xff\xd8\xff", 3);
        if (round % 4 == 3 && n >= 12) memcpy(junk, "RIFF\0\1\0\0WEBP", 12);
        sdx4_image out = {0};
        int pw, ph;
        imageio_probe(junk, n, NULL, &pw, &ph, err, sizeof err);
        if (imageio_decode(junk, n, &out, err, sizeof err) == 0) free(out.pixels);
    }
    /* the tail of a good file after a good header */
    for (int k = 1; k < 8; k++) {
        memcpy(junk, png, 33);
        for (size_t i = 33; i < 600; i++) junk[i] = (unsigned char)(i * k * 37);
        expect_refused("png header, garbage body", junk, 600);
    }
    long printed = stderr_release();
    CHECK(printed == 0, "bad input made %ld bytes of output on stderr", printed);

out:
    free(png);
    free(jpg);
    free(webp);
    free(px);
}

/* ---- golden inputs, threads ------------------------------------------- */

static void test_golden_inputs(void) {
    const struct { const char *file; int w, h; } cases[3] = {
        {"small/golden/pipe0_input.png", 48, 40},
        {"small/golden/pipe1_input.png", 44, 36},
        {"small/golden/pipe2_input.png", 32, 32},
    };
    for (int i = 0; i < 3; i++) {
        sdx4_image out = {0};
        char err[512] = "";
        if (imageio_read_file(test_ref(cases[i].file), &out, err, sizeof err)) {
            CHECK(0, "%s", err);
            continue;
        }
        CHECK(out.width == cases[i].w && out.height == cases[i].h, "%s: %dx%d", cases[i].file,
              out.width, out.height);
        free(out.pixels);
    }
}

typedef struct {
    const void *data;
    size_t len;
    const uint8_t *want;
    int failures;
} thread_job;

static void *decode_many(void *arg) {
    thread_job *job = arg;
    for (int i = 0; i < 20; i++) {
        sdx4_image out = {0};
        char err[256];
        if (imageio_decode(job->data, job->len, &out, err, sizeof err) ||
            memcmp(out.pixels, job->want, 64 * 48 * 3) != 0)
            job->failures++;
        free(out.pixels);
        void *buf = NULL;
        size_t len;
        sdx4_image img = {64, 48, (uint8_t *)job->want};
        if (imageio_encode(&img, IMAGE_PNG, 0, &buf, &len, err, sizeof err)) job->failures++;
        free(buf);
        if (imageio_decode(job->data, 7, &out, err, sizeof err) == 0 || !err[0]) job->failures++;
    }
    return NULL;
}

static void test_threads(void) {
    uint8_t *px = make_rgb(64, 48);
    sdx4_image img = {64, 48, px};
    void *png = NULL;
    size_t len = 0;
    char err[256];
    CHECK(imageio_encode(&img, IMAGE_PNG, 0, &png, &len, err, sizeof err) == 0, "%s", err);
    pthread_t th[4];
    thread_job jobs[4];
    for (int i = 0; i < 4; i++) {
        jobs[i] = (thread_job){png, len, px, 0};
        pthread_create(&th[i], NULL, decode_many, &jobs[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        CHECK(jobs[i].failures == 0, "thread %d: %d failures", i, jobs[i].failures);
    }
    free(png);
    free(px);
}

int main(int argc, char **argv) {
    (void)argc;
    char err[64] = "";
    int w, h;
    CHECK(imageio_probe("x", 1, NULL, &w, &h, err, sizeof err) == -1 && err[0],
          "probe before init");
    if (imageio_init(argv[0])) {
        fprintf(stderr, "imageio_init failed\n");
        return 1;
    }
    CHECK(imageio_init(argv[0]) == 0, "second init");
    test_formats();
    test_round_trips();
    test_grey_and_palette();
    test_alpha_and_16bit();
    test_cmyk();
    test_orientation();
    test_bad_input();
    test_golden_inputs();
    test_threads();
    imageio_shutdown();
    return test_finish("test_imageio");
}
