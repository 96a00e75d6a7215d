/*
 * test_png_text.c - PNG text chunks cost nothing to decode (imageio.c's
 * "PNG text"), and chunk lengths the file cannot hold are refused.
 *
 * The bomb is a small PNG with a thousand zTXt chunks before its pixels,
 * each inflating to 7.9 MB (about 7.7 MB of file in all): a loader that
 * inflates them spends seconds per open, and the server probes and then
 * decodes every upload. Dropping them must also leave the pixels alone.
 * The compressed text comes from GLib's zlib converter (gio is linked with
 * libvips).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <gio/gio.h>

#include "imageio.h"
#include "test.h"

#define BOMB_CHUNKS 1000
#define BOMB_INFLATED 7900000 /* under libpng's 8 MB limit for one chunk */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void put32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24, p[1] = v >> 16, p[2] = v >> 8, p[3] = (unsigned char)v;
}

/* A growing byte string: the PNG under construction. */
typedef struct {
    unsigned char *p;
    size_t len;
} bytes;

static void append(bytes *b, const void *data, size_t n) {
    if (!n) return; /* an empty chunk's data may be NULL */
    unsigned char *grown = realloc(b->p, b->len + n);
    if (!grown) abort();
    b->p = grown;
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

/* Appends one chunk; `declared` is the length written in it (the true
 * length n unless a test lies). */
static void append_chunk(bytes *b, const char *type, const void *data, uint32_t n,
                         uint32_t declared) {
    unsigned char *c = malloc(12 + (size_t)n);
    put32(c, declared);
    memcpy(c + 4, type, 4);
    if (n) memcpy(c + 8, data, n);
    put32(c + 8 + n, test_png_crc32(c + 4, n + 4));
    append(b, c, 12 + (size_t)n);
    free(c);
}

/* zTXt data: keyword "Comment", method 0, then BOMB_INFLATED letters
 * compressed at zlib's level 9 (about 7.7 KB). */
static unsigned char *ztxt_bomb(size_t *len) {
    char *text = malloc(BOMB_INFLATED);
    memset(text, 'A', BOMB_INFLATED);
    size_t cap = 1 << 16, head = 9;
    unsigned char *out = malloc(head + cap);
    memcpy(out, "Comment\0\0", head);
    GZlibCompressor *z = g_zlib_compressor_new(G_ZLIB_COMPRESSOR_FORMAT_ZLIB, 9);
    size_t in_done = 0, out_done = 0;
    GConverterResult r = G_CONVERTER_CONVERTED;
    while (r == G_CONVERTER_CONVERTED) {
        gsize nread = 0, nwritten = 0;
        r = g_converter_convert(G_CONVERTER(z), text + in_done, BOMB_INFLATED - in_done,
                                out + head + out_done, cap - out_done,
                                G_CONVERTER_INPUT_AT_END, &nread, &nwritten, NULL);
        in_done += nread;
        out_done += nwritten;
    }
    g_object_unref(z);
    free(text);
    CHECK(r == G_CONVERTER_FINISHED, "zlib compression did not finish");
    *len = head + out_done;
    return out;
}

/* `png` (signature, IHDR, IDATs, IEND, as imageio_encode writes it) with
 * chunks inserted: `before` after IHDR, `after` before IEND. */
static bytes with_chunks(const bytes *png, const bytes *before, const bytes *after) {
    const size_t ihdr_end = 8 + 12 + 13, iend = png->len - 12;
    bytes b = {0};
    append(&b, png->p, ihdr_end);
    append(&b, before->p, before->len);
    append(&b, png->p + ihdr_end, iend - ihdr_end);
    append(&b, after->p, after->len);
    append(&b, png->p + iend, 12);
    return b;
}

static void test_text_chunks_are_skipped(const bytes *png, const sdx4_image *plain) {
    size_t zlen;
    unsigned char *z = ztxt_bomb(&zlen);
    bytes before = {0}, after = {0};
    for (int i = 0; i < BOMB_CHUNKS; i++) append_chunk(&before, "zTXt", z, (uint32_t)zlen, (uint32_t)zlen);
    append_chunk(&before, "tEXt", "Title\0a test card", 17, 17);
    static const char itxt[] = "Description\0\0\0en\0\0text after the pixels";
    append_chunk(&after, "iTXt", itxt, sizeof itxt - 1, sizeof itxt - 1);
    append_chunk(&after, "zTXt", z, (uint32_t)zlen, (uint32_t)zlen);
    bytes bomb = with_chunks(png, &before, &after);
    printf("  %zu-byte PNG: %d zTXt chunks of %zu bytes (%.1f MB inflated each)\n", bomb.len,
           BOMB_CHUNKS + 1, zlen + 12, BOMB_INFLATED / 1e6);

    char err[256] = "";
    int w = 0, h = 0;
    sdx4_image out = {0};
    double t0 = now();
    CHECK(imageio_probe(bomb.p, bomb.len, NULL, &w, &h, err, sizeof err) == 0, "probe: %s", err);
    CHECK(imageio_decode(bomb.p, bomb.len, &out, err, sizeof err) == 0, "decode: %s", err);
    double dt = now() - t0;
    printf("  probe + decode: %.3f s\n", dt);
    /* a few milliseconds when the text is skipped; inflating it all costs
     * seconds per call even on a fast idle machine */
    CHECK(dt < 2.0, "probe + decode of text chunks took %.2f s", dt);
    CHECK(w == plain->width && h == plain->height, "probe says %dx%d", w, h);
    CHECK(out.pixels && out.width == plain->width && out.height == plain->height &&
              !memcmp(out.pixels, plain->pixels, (size_t)plain->width * plain->height * 3),
          "the pixels differ from the same PNG without text");
    free(out.pixels);
    free(bomb.p);
    free(before.p);
    free(after.p);
    free(z);
}

/* A chunk length the file cannot hold: one message naming the chunk, from
 * probe and decode alike. */
static void expect_refused(const char *what, const bytes *b, const char *needle) {
    char err[256] = "";
    int w = 0, h = 0;
    sdx4_image out = {0};
    CHECK(imageio_probe(b->p, b->len, NULL, &w, &h, err, sizeof err) == -1, "%s: probed", what);
    CHECK(strstr(err, needle) != NULL, "%s: probe says '%s', not '%s'", what, err, needle);
    err[0] = 0;
    CHECK(imageio_decode(b->p, b->len, &out, err, sizeof err) == -1 && !out.pixels,
          "%s: decoded", what);
    CHECK(strstr(err, needle) != NULL, "%s: decode says '%s', not '%s'", what, err, needle);
    printf("  %-34s -> %s\n", what, err);
    free(out.pixels);
}

static void test_bad_lengths(const bytes *png) {
    bytes none = {0}, chunk = {0};
    /* a text chunk claiming more bytes than follow it */
    append_chunk(&chunk, "tEXt", "k\0v", 3, 1000000);
    bytes b = with_chunks(png, &chunk, &none);
    expect_refused("text length past the end", &b, "past the end of the file");
    free(b.p);
    free(chunk.p);
    chunk = (bytes){0};
    /* a length over the format's 2^31-1 */
    append_chunk(&chunk, "zTXt", "k\0v", 3, 0x80000000u);
    b = with_chunks(png, &chunk, &none);
    expect_refused("length over 2^31-1", &b, "2^31-1");
    free(b.p);
    free(chunk.p);
    /* cut inside a chunk's length and type */
    b = (bytes){0};
    append(&b, png->p, 8 + 6);
    expect_refused("cut inside a chunk header", &b, "cut off");
    free(b.p);
}

int main(int argc, char **argv) {
    (void)argc;
    if (imageio_init(argv[0])) {
        fprintf(stderr, "imageio_init failed\n");
        return 1;
    }
    const int w = 64, h = 48;
    uint8_t *px = malloc((size_t)w * h * 3);
    for (int i = 0; i < w * h * 3; i++) px[i] = (uint8_t)(i * 7 + i / 191);
    sdx4_image card = {w, h, px}, plain = {0};
    bytes png = {0};
    char err[256] = "";
    CHECK(imageio_encode(&card, IMAGE_PNG, 0, (void **)&png.p, &png.len, err, sizeof err) == 0,
          "encode: %s", err);
    CHECK(png.p && imageio_decode(png.p, png.len, &plain, err, sizeof err) == 0, "decode: %s",
          err);
    if (plain.pixels && !memcmp(png.p + 12, "IHDR", 4) &&
        !memcmp(png.p + png.len - 8, "IEND", 4)) {
        test_text_chunks_are_skipped(&png, &plain);
        test_bad_lengths(&png);
    } else {
        CHECK(0, "the encoded PNG is not signature, IHDR, ..., IEND");
    }
    free(plain.pixels);
    free(png.p);
    free(px);
    imageio_shutdown();
    return test_finish("test_png_text");
}
