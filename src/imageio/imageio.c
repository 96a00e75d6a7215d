/*
 * imageio.c - PNG, JPEG and WebP files through libvips (see imageio.h).
 *
 * Decoding. The format comes from the magic number, and only that
 * format's loader is called (never libvips' "try every loader" path, which
 * would let ImageMagick or PDF loaders parse untrusted bytes). Loaders run
 * with sequential access, so opening an image reads its header and nothing
 * else: that is all imageio_probe() does. imageio_decode() then builds one
 * libvips pipeline, run once into a buffer we malloc:
 *
 *   load (fail_on=error: truncation and corrupt data are errors, not
 *   grey rows) -> colourspace to sRGB (grey, palette, CMYK, Lab, 16-bit;
 *   16-bit drops to 8 by a shift, alpha included) -> flatten alpha onto
 *   white -> first 3 bands -> [EXIF orientation 2..8: to memory, autorot]
 *
 * Rotation needs random access, so only oriented images pay for the extra
 * copy.
 *
 * PNG text. A PNG's tEXt, zTXt and iTXt chunks carry no pixels, yet the
 * loader inflates every zTXt/iTXt one (up to 8 MB each, a thousand of
 * them) while holding the lock below: 9.4 MB of them cost 20-30 s of
 * decoding. Before libvips sees a PNG, its chunk list (length, type, data,
 * CRC) is walked and, when it has text chunks, libvips gets a copy without
 * them: whole ancillary chunks dropped leave a valid PNG with the same
 * pixels. The walk also refuses chunk lengths past the end of the file or
 * over the format's 2^31-1, so a lying length is one clear error. Embedded ICC profiles of RGB images are not applied: PIL, which
 * gives diffusers its pixels, does not apply them either. Images over IMAGEIO_MAX_PIXELS are refused before any pixel is
 * decoded, so a file whose header lies about its size costs nothing.
 *
 * Metadata, only when asked (imageio_encode_metadata; nothing else writes
 * any, so that equal pixels give equal files). The ICC profile goes
 * through libvips ("icc-profile-data", saved unstripped). A PNG's texts
 * are chunks spliced in here before the first IDAT, not libvips' own
 * "png-comment-" fields: libvips 8.14 writes those as zTXt of raw UTF-8,
 * which the format defines as Latin-1 and Pillow decodes so (mojibake for
 * any accented prompt); here ASCII is tEXt and the rest iTXt, as Pillow
 * writes them. A JPEG's or WebP's text is EXIF UserComment as
 * AUTOMATIC1111 writes it, a blob built here (libvips' own UserComment
 * field transliterates to ASCII) that libvips' saver completes with its
 * resolution tags. Decoding keeps the input's profile only when asked
 * (imageio_decode_keep_icc) and only where it still describes the decoded
 * values: an RGB profile of an RGB image.
 *
 * Resizing. imageio_resize() is vips_resize() with the Lanczos-3 kernel
 * (the server's AUTOMATIC1111 routes resize a model's output to the size
 * asked, as A1111 does with Pillow's Lanczos): libvips reduces with the
 * kernel and enlarges by bicubic interpolation. libvips rounds the scaled
 * size, so a side could come out a pixel off the target: it is then cut,
 * or its edge repeated, to the exact size asked.
 *
 * Errors and quiet. libvips reports into one process-wide error buffer and
 * sends warnings (libpng's complaints, bad EXIF) to g_log. Every call here
 * holds one mutex while it uses libvips, so the buffer read after a
 * failure holds that call's own messages; warnings of the "VIPS" log
 * domain are kept (the last one completes a message), never printed. Holding the mutex serialises image I/O, which is
 * tiny next to an upscale and keeps libvips to one worker thread
 * (vips_concurrency_set(1)) instead of competing with the engine's cores.
 * The operation cache is off (vips_cache_set_max(0)): nothing is decoded
 * twice here, and a cache would only hold memory.
 */
#include "imageio.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <vips/vips.h>
#include <zlib.h>

/* 16384 x 16384: a decode allocates at most 768 MiB of RGB. */
#define IMAGEIO_MAX_PIXELS ((int64_t)1 << 28)
/* Files are read whole; no PNG/JPEG/WebP within the pixel limit is near. */
#define IMAGEIO_MAX_FILE_BYTES ((long)256 << 20)
#define DEFAULT_QUALITY 90
#define PNG_COMPRESSION 6

static pthread_mutex_t vips_lock = PTHREAD_MUTEX_INITIALIZER;
static int vips_state; /* 0 never started, 1 running, 2 shut down */

static void put_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void put_err(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* The last warning libvips logged: libpng reports some failures (a file
 * that ends inside the header) only as a warning, with nothing in the
 * error buffer. Workers of a call may log it, so it has its own lock. */
static pthread_mutex_t warning_lock = PTHREAD_MUTEX_INITIALIZER;
static char last_warning[256];

static void keep_warning(const gchar *domain, GLogLevelFlags level,
                         const gchar *message, gpointer user) {
    (void)domain, (void)level, (void)user;
    pthread_mutex_lock(&warning_lock);
    snprintf(last_warning, sizeof last_warning, "%s", message ? message : "");
    pthread_mutex_unlock(&warning_lock);
}

/* "<what>: <libvips' messages, one line>", then clears libvips' buffer.
 * Called with vips_lock held. */
static int vips_fail(char *err, size_t errlen, const char *what) {
    char detail[512];
    snprintf(detail, sizeof detail, "%s", vips_error_buffer());
    vips_error_clear();
    if (!detail[0]) {
        pthread_mutex_lock(&warning_lock);
        snprintf(detail, sizeof detail, "%s", last_warning);
        pthread_mutex_unlock(&warning_lock);
    }
    size_t n = strlen(detail);
    while (n > 0 && (detail[n - 1] == '\n' || detail[n - 1] == ' ')) detail[--n] = 0;
    for (char *p = detail; *p; p++)
        if (*p == '\n') *p = ';';
    if (n) put_err(err, errlen, "%s: %s", what, detail);
    else put_err(err, errlen, "%s", what);
    return -1;
}

int imageio_init(const char *argv0) {
    pthread_mutex_lock(&vips_lock);
    int rc = 0;
    if (vips_state == 0) {
        if (vips_init(argv0 ? argv0 : "sdx4")) {
            vips_error_clear();
            rc = -1;
        } else {
            vips_state = 1;
            g_log_set_handler("VIPS",
                              G_LOG_LEVEL_CRITICAL | G_LOG_LEVEL_WARNING |
                                  G_LOG_LEVEL_MESSAGE | G_LOG_LEVEL_INFO |
                                  G_LOG_LEVEL_DEBUG,
                              keep_warning, NULL);
            vips_cache_set_max(0);
            vips_concurrency_set(1);
        }
    } else if (vips_state == 2) {
        rc = -1; /* libvips cannot start again after vips_shutdown() */
    }
    pthread_mutex_unlock(&vips_lock);
    return rc;
}

void imageio_shutdown(void) {
    pthread_mutex_lock(&vips_lock);
    if (vips_state == 1) {
        vips_shutdown();
        vips_state = 2;
    }
    pthread_mutex_unlock(&vips_lock);
}

/* Takes vips_lock; fails (and releases it) if libvips is not running. */
static int lock_vips(char *err, size_t errlen) {
    pthread_mutex_lock(&vips_lock);
    if (vips_state != 1) {
        pthread_mutex_unlock(&vips_lock);
        put_err(err, errlen, "imageio: imageio_init() has not been called");
        return -1;
    }
    vips_error_clear();
    pthread_mutex_lock(&warning_lock);
    last_warning[0] = 0;
    pthread_mutex_unlock(&warning_lock);
    return 0;
}

/* ------------------------------------------------------------------------
 * Formats
 * ------------------------------------------------------------------------ */

image_format imageio_sniff(const void *data, size_t len) {
    const unsigned char *p = data;
    if (!p) return IMAGE_UNKNOWN;
    if (len >= 8 && memcmp(p, "\x89PNG\r\n\x1a\n", 8) == 0) return IMAGE_PNG;
    if (len >= 3 && p[0] == 0xFF && p[1] == 0xD8 && p[2] == 0xFF) return IMAGE_JPEG;
    if (len >= 12 && memcmp(p, "RIFF", 4) == 0 && memcmp(p + 8, "WEBP", 4) == 0)
        return IMAGE_WEBP;
    return IMAGE_UNKNOWN;
}

const char *imageio_format_name(image_format f) {
    switch (f) {
    case IMAGE_PNG: return "png";
    case IMAGE_JPEG: return "jpeg";
    case IMAGE_WEBP: return "webp";
    case IMAGE_UNKNOWN: break;
    }
    return "unknown";
}

image_format imageio_format_from_name(const char *name_or_path) {
    if (!name_or_path) return IMAGE_UNKNOWN;
    const char *base = strrchr(name_or_path, '/');
    base = base ? base + 1 : name_or_path;
    const char *dot = strrchr(base, '.');
    const char *ext = dot ? dot + 1 : base;
    if (strcasecmp(ext, "png") == 0) return IMAGE_PNG;
    if (strcasecmp(ext, "jpeg") == 0 || strcasecmp(ext, "jpg") == 0) return IMAGE_JPEG;
    if (strcasecmp(ext, "webp") == 0) return IMAGE_WEBP;
    return IMAGE_UNKNOWN;
}

const char *imageio_mime_type(image_format f) {
    switch (f) {
    case IMAGE_PNG: return "image/png";
    case IMAGE_JPEG: return "image/jpeg";
    case IMAGE_WEBP: return "image/webp";
    case IMAGE_UNKNOWN: break;
    }
    return "application/octet-stream";
}

/* ------------------------------------------------------------------------
 * Decoding
 * ------------------------------------------------------------------------ */

static int is_text_chunk(const unsigned char *type) {
    return !memcmp(type, "tEXt", 4) || !memcmp(type, "zTXt", 4) || !memcmp(type, "iTXt", 4);
}

/* The data length of the PNG chunk at p + off, or -1 (with a message)
 * when the file cannot hold the chunk. */
static int64_t chunk_length(const unsigned char *p, size_t len, size_t off, char *err,
                            size_t errlen) {
    if (len - off < 12) {
        put_err(err, errlen, "png: the chunk at byte %zu is cut off (truncated file?)", off);
        return -1;
    }
    const unsigned char *c = p + off;
    uint32_t n = (uint32_t)c[0] << 24 | (uint32_t)c[1] << 16 | (uint32_t)c[2] << 8 | c[3];
    if (n > 0x7fffffffu) {
        put_err(err, errlen, "png: the chunk at byte %zu says %lu bytes, over the format's "
                "limit of 2^31-1", off, (unsigned long)n);
        return -1;
    }
    if (n > len - off - 12) {
        put_err(err, errlen, "png: the chunk at byte %zu says %lu bytes, past the end of the "
                "file (truncated file?)", off, (unsigned long)n);
        return -1;
    }
    return n;
}

/* Walks a PNG's chunks up to IEND. With text chunks, *copy is a malloc'd
 * copy of the file without them (IEND and anything after it kept as is);
 * without, *copy is NULL. -1 for a chunk length the file cannot hold. */
static int png_without_text(const unsigned char *p, size_t len, unsigned char **copy,
                            size_t *copy_len, char *err, size_t errlen) {
    *copy = NULL;
    size_t text_bytes = 0, off;
    int64_t n;
    for (off = 8; off < len; off += 12 + (size_t)n) {
        if ((n = chunk_length(p, len, off, err, errlen)) < 0) return -1;
        if (!memcmp(p + off + 4, "IEND", 4)) break;
        if (is_text_chunk(p + off + 4)) text_bytes += 12 + (size_t)n;
    }
    if (text_bytes == 0) return 0;
    unsigned char *q = malloc(len - text_bytes);
    if (!q) {
        put_err(err, errlen, "png: out of memory for %zu bytes", len - text_bytes);
        return -1;
    }
    memcpy(q, p, 8);
    size_t out = 8;
    for (off = 8; off < len; off += 12 + (size_t)n) { /* the chunks checked above */
        n = chunk_length(p, len, off, NULL, 0);
        if (!memcmp(p + off + 4, "IEND", 4)) break;
        if (!is_text_chunk(p + off + 4)) {
            memcpy(q + out, p + off, 12 + (size_t)n);
            out += 12 + (size_t)n;
        }
    }
    memcpy(q + out, p + off, len - off);
    *copy = q;
    *copy_len = out + len - off;
    return 0;
}

/* Opens the image lazily: the header is parsed, no pixel is decoded.
 * `data` must outlive the image, and so must *owned, a copy this makes
 * of a PNG with text chunks (NULL otherwise; the caller frees it after
 * the image). Called with vips_lock held. */
static VipsImage *open_image(const void *data, size_t len, image_format *format,
                             void **owned, char *err, size_t errlen) {
    *owned = NULL;
    if (!data || len == 0) {
        put_err(err, errlen, "empty image data");
        return NULL;
    }
    image_format f = imageio_sniff(data, len);
    void *buf = (void *)data; /* the loaders read it and never write */
    VipsImage *img = NULL;
    int rc = -1;
    switch (f) {
    case IMAGE_PNG: {
        unsigned char *copy = NULL;
        if (png_without_text(data, len, &copy, &len, err, errlen)) return NULL;
        if (copy) *owned = buf = copy;
        rc = vips_pngload_buffer(buf, len, &img, "access", VIPS_ACCESS_SEQUENTIAL,
                                 "fail_on", VIPS_FAIL_ON_ERROR, NULL);
        break;
    }
    case IMAGE_JPEG:
        rc = vips_jpegload_buffer(buf, len, &img, "access", VIPS_ACCESS_SEQUENTIAL,
                                  "fail_on", VIPS_FAIL_ON_ERROR, NULL);
        break;
    case IMAGE_WEBP:
        rc = vips_webpload_buffer(buf, len, &img, "access", VIPS_ACCESS_SEQUENTIAL,
                                  "fail_on", VIPS_FAIL_ON_ERROR, NULL);
        break;
    case IMAGE_UNKNOWN:
        put_err(err, errlen, "not a PNG, JPEG or WebP image");
        return NULL;
    }
    if (rc) {
        char what[64];
        snprintf(what, sizeof what, "%s: unreadable header", imageio_format_name(f));
        vips_fail(err, errlen, what);
        return NULL;
    }
    if (format) *format = f;
    return img;
}

/* Width and height after the EXIF orientation (5..8 turn by 90 degrees). */
static void oriented_size(VipsImage *img, int *width, int *height) {
    int swap = vips_image_get_orientation_swap(img);
    if (width) *width = swap ? img->Ysize : img->Xsize;
    if (height) *height = swap ? img->Xsize : img->Ysize;
}

int imageio_probe(const void *data, size_t len, image_format *format,
                  int *width, int *height, char *err, size_t errlen) {
    if (lock_vips(err, errlen)) return -1;
    void *owned;
    VipsImage *img = open_image(data, len, format, &owned, err, errlen);
    if (img) {
        oriented_size(img, width, height);
        g_object_unref(img);
    }
    pthread_mutex_unlock(&vips_lock);
    free(owned);
    return img ? 0 : -1;
}

/* The decode pipeline after the loader, up to (not including) rotation:
 * 8-bit sRGB, 3 bands, alpha flattened onto white. Each step replaces
 * *img, dropping our reference to the one before (the pipeline keeps
 * what it needs). */
static int to_srgb8(VipsImage **img) {
    VipsImage *in = *img, *out = NULL;
#define STEP(call)                  \
    do {                            \
        if (call) return -1;        \
        g_object_unref(in);         \
        *img = in = out;            \
    } while (0)

    STEP(vips_colourspace(in, &out, VIPS_INTERPRETATION_sRGB, "source_space",
                          vips_image_guess_interpretation(in), NULL));
    if (in->BandFmt != VIPS_FORMAT_UCHAR)
        STEP(vips_cast(in, &out, VIPS_FORMAT_UCHAR, "shift",
                       in->BandFmt == VIPS_FORMAT_USHORT, NULL));
    if (vips_image_hasalpha(in)) {
        /* transparent pixels read as white paper */
        VipsArrayDouble *white = vips_array_double_newv(1, 255.0);
        int rc = vips_flatten(in, &out, "background", white, "max_alpha", 255.0, NULL);
        vips_area_unref(VIPS_AREA(white));
        STEP(rc);
    }
    if (in->Bands > 3) STEP(vips_extract_band(in, &out, 0, "n", 3, NULL));
    if (in->Bands != 3) {
        vips_error("imageio", "%d bands after conversion to sRGB", in->Bands);
        return -1;
    }
#undef STEP
    return 0;
}

/* Runs the pipeline into a malloc'd RGB buffer of width x height. Takes
 * over the reference to img. Called with vips_lock held. */
static uint8_t *decode_pixels(VipsImage *img, int width, int height,
                              const char *what, char *err, size_t errlen) {
    uint8_t *pixels = NULL;
    VipsImage *dst = NULL;
    if (to_srgb8(&img)) goto fail;
    if (vips_image_get_orientation(img) > 1) {
        /* autorot turns by 90 degrees, which reads out of order: decode
         * to memory first */
        VipsImage *mem = vips_image_copy_memory(img), *rot = NULL;
        g_object_unref(img);
        img = mem;
        if (!mem || vips_autorot(mem, &rot, NULL)) goto fail;
        g_object_unref(mem);
        img = rot;
    }
    if (img->Xsize != width || img->Ysize != height) {
        vips_error("imageio", "decoded %dx%d, expected %dx%d", img->Xsize, img->Ysize,
                   width, height);
        goto fail;
    }
    size_t size = (size_t)width * height * 3;
    if (!(pixels = malloc(size))) {
        vips_error("imageio", "out of memory for %dx%d pixels", width, height);
        goto fail;
    }
    dst = vips_image_new_from_memory(pixels, size, width, height, 3, VIPS_FORMAT_UCHAR);
    if (!dst || vips_image_write(img, dst)) goto fail;
    g_object_unref(dst);
    g_object_unref(img);
    return pixels;

fail:
    vips_fail(err, errlen, what);
    if (dst) g_object_unref(dst);
    if (img) g_object_unref(img);
    free(pixels);
    return NULL;
}

/* Whether `icc` is a whole ICC profile of RGB data: its header's size
 * field equal to its length, the 'acsp' signature, the 'RGB ' colour
 * space (ICC.1, 7.2). */
static bool rgb_profile(const unsigned char *icc, size_t len) {
    if (!icc || len < 128) return false;
    uint32_t size = (uint32_t)icc[0] << 24 | (uint32_t)icc[1] << 16 | (uint32_t)icc[2] << 8 | icc[3];
    return size == len && !memcmp(icc + 36, "acsp", 4) && !memcmp(icc + 16, "RGB ", 4);
}

/* Whether a PNG gets the profile: libvips' PNG saver checks a profile's
 * header and tag table further than rgb_profile does (lcms, libpng) and
 * leaves out one it refuses, with only a warning, where the JPEG and WebP
 * savers write any. A 1-pixel PNG tells. Called with vips_lock held. */
static bool png_writes_profile(const void *icc, size_t len) {
    static const unsigned char pixel[3] = {0};
    VipsImage *one = vips_image_new_from_memory(pixel, sizeof pixel, 1, 1, 3, VIPS_FORMAT_UCHAR);
    void *buf = NULL;
    size_t n = 0;
    bool ok = false;
    if (one) {
        one->Type = VIPS_INTERPRETATION_sRGB;
        vips_image_set_blob_copy(one, VIPS_META_ICC_NAME, icc, len);
        ok = vips_pngsave_buffer(one, &buf, &n, "strip", FALSE, NULL) == 0 && memmem(buf, n, "iCCP", 4);
        g_object_unref(one);
        g_free(buf);
    }
    vips_error_clear(); /* its complaints are not the decode's */
    pthread_mutex_lock(&warning_lock);
    last_warning[0] = 0;
    pthread_mutex_unlock(&warning_lock);
    return ok;
}

/* A malloc'd copy of the loaded image's ICC profile where decoding keeps
 * the values it describes (an RGB image, RGB profile) and every saver
 * writes it, else NULL (out of memory too: the pixels are the same with or
 * without it). Called with vips_lock held, before the pipeline. */
static void *kept_icc(VipsImage *img, size_t *icc_len) {
    const void *blob;
    size_t n;
    VipsInterpretation kind = vips_image_guess_interpretation(img);
    if ((kind != VIPS_INTERPRETATION_sRGB && kind != VIPS_INTERPRETATION_RGB16) || img->Bands < 3 ||
        !vips_image_get_typeof(img, VIPS_META_ICC_NAME) ||
        vips_image_get_blob(img, VIPS_META_ICC_NAME, &blob, &n) || !rgb_profile(blob, n) ||
        !png_writes_profile(blob, n)) {
        vips_error_clear();
        return NULL;
    }
    void *copy = malloc(n);
    if (copy) memcpy(copy, blob, n), *icc_len = n;
    return copy;
}

/* imageio_decode, and the ICC profile where icc is not NULL. */
static int decode(const void *data, size_t len, sdx4_image *out, void **icc, size_t *icc_len,
                  char *err, size_t errlen) {
    if (icc) *icc = NULL, *icc_len = 0;
    if (!out) {
        put_err(err, errlen, "imageio_decode: no output image");
        return -1;
    }
    if (lock_vips(err, errlen)) return -1;
    image_format format = IMAGE_UNKNOWN;
    int width = 0, height = 0;
    uint8_t *pixels = NULL;
    void *owned;
    VipsImage *img = open_image(data, len, &format, &owned, err, errlen);
    if (img) {
        oriented_size(img, &width, &height);
        if ((int64_t)width * height > IMAGEIO_MAX_PIXELS) {
            put_err(err, errlen, "%s: %dx%d is over the limit of %lld pixels",
                    imageio_format_name(format), width, height,
                    (long long)IMAGEIO_MAX_PIXELS);
            g_object_unref(img);
        } else {
            char what[64];
            snprintf(what, sizeof what, "%s: decoding failed", imageio_format_name(format));
            if (icc) *icc = kept_icc(img, icc_len);
            pixels = decode_pixels(img, width, height, what, err, errlen);
        }
    }
    pthread_mutex_unlock(&vips_lock);
    free(owned); /* after the image that read it */
    if (!pixels && icc) {
        free(*icc);
        *icc = NULL, *icc_len = 0;
    }
    if (!pixels) return -1;
    out->width = width;
    out->height = height;
    out->pixels = pixels;
    return 0;
}

int imageio_decode(const void *data, size_t len, sdx4_image *out, char *err, size_t errlen) {
    return decode(data, len, out, NULL, NULL, err, errlen);
}

int imageio_decode_keep_icc(const void *data, size_t len, sdx4_image *out, void **icc,
                            size_t *icc_len, char *err, size_t errlen) {
    if (!icc || !icc_len) {
        put_err(err, errlen, "imageio_decode_keep_icc: nowhere to put the profile");
        return -1;
    }
    return decode(data, len, out, icc, icc_len, err, errlen);
}

/* imageio_read_file, and the ICC profile where icc is not NULL. */
static int read_file(const char *path, sdx4_image *out, void **icc, size_t *icc_len, char *err,
                     size_t errlen) {
    FILE *f = path ? fopen(path, "rb") : NULL;
    if (!f) {
        put_err(err, errlen, "%s: %s", path ? path : "(null)", strerror(path ? errno : EINVAL));
        return -1;
    }
    long size = -1;
    if (fseek(f, 0, SEEK_END) == 0) size = ftell(f);
    if (size < 0 || fseek(f, 0, SEEK_SET) != 0) {
        put_err(err, errlen, "%s: cannot tell the file's size", path);
        fclose(f);
        return -1;
    }
    if (size > IMAGEIO_MAX_FILE_BYTES) {
        put_err(err, errlen, "%s: %ld bytes is over the limit of %ld", path, size,
                IMAGEIO_MAX_FILE_BYTES);
        fclose(f);
        return -1;
    }
    unsigned char *buf = malloc(size ? (size_t)size : 1);
    if (!buf || fread(buf, 1, (size_t)size, f) != (size_t)size) {
        put_err(err, errlen, "%s: %s", path, buf ? "read failed" : "out of memory");
        free(buf);
        fclose(f);
        return -1;
    }
    fclose(f);
    char inner[512];
    int rc = decode(buf, (size_t)size, out, icc, icc_len, inner, sizeof inner);
    if (rc) put_err(err, errlen, "%s: %s", path, inner);
    free(buf);
    return rc;
}

int imageio_read_file(const char *path, sdx4_image *out, char *err, size_t errlen) {
    return read_file(path, out, NULL, NULL, err, errlen);
}

int imageio_read_file_keep_icc(const char *path, sdx4_image *out, void **icc, size_t *icc_len,
                               char *err, size_t errlen) {
    if (!icc || !icc_len) {
        put_err(err, errlen, "imageio_read_file_keep_icc: nowhere to put the profile");
        return -1;
    }
    return read_file(path, out, icc, icc_len, err, errlen);
}

/* ------------------------------------------------------------------------
 * Resizing
 * ------------------------------------------------------------------------ */

int imageio_resize(const sdx4_image *in, int width, int height, sdx4_image *out,
                   char *err, size_t errlen) {
    if (!in || !in->pixels || in->width <= 0 || in->height <= 0 || !out) {
        put_err(err, errlen, "imageio_resize: empty image");
        return -1;
    }
    if (width < 1 || height < 1 || width > 16384 || height > 16384 ||
        (int64_t)width * height > IMAGEIO_MAX_PIXELS) {
        put_err(err, errlen, "imageio_resize: %dx%d is outside 1..16384 per side or over %lld pixels",
                width, height, (long long)IMAGEIO_MAX_PIXELS);
        return -1;
    }
    size_t size = (size_t)width * height * 3;
    uint8_t *pixels = malloc(size);
    if (!pixels) {
        put_err(err, errlen, "imageio_resize: out of memory for %dx%d pixels", width, height);
        return -1;
    }
    if (lock_vips(err, errlen)) {
        free(pixels);
        return -1;
    }
    VipsImage *src = vips_image_new_from_memory(in->pixels, (size_t)in->width * in->height * 3,
                                                in->width, in->height, 3, VIPS_FORMAT_UCHAR);
    VipsImage *scaled = NULL, *exact = NULL, *dst = NULL;
    int rc = -1;
    if (src) {
        src->Type = VIPS_INTERPRETATION_sRGB;
        /* the output side is the input's times the scale, rounded: within
         * one pixel of the target; the edge is repeated or cut to hit it */
        rc = vips_resize(src, &scaled, (double)width / in->width, "vscale", (double)height / in->height,
                         "kernel", VIPS_KERNEL_LANCZOS3, NULL);
        if (!rc && (scaled->Xsize != width || scaled->Ysize != height))
            rc = vips_embed(scaled, &exact, 0, 0, width, height, "extend", VIPS_EXTEND_COPY, NULL);
        if (!rc) {
            dst = vips_image_new_from_memory(pixels, size, width, height, 3, VIPS_FORMAT_UCHAR);
            rc = !dst || vips_image_write(exact ? exact : scaled, dst);
        }
    }
    if (rc) vips_fail(err, errlen, "resize failed");
    if (dst) g_object_unref(dst);
    if (exact) g_object_unref(exact);
    if (scaled) g_object_unref(scaled);
    if (src) g_object_unref(src);
    pthread_mutex_unlock(&vips_lock);
    if (rc) {
        free(pixels);
        return -1;
    }
    out->width = width;
    out->height = height;
    out->pixels = pixels;
    return 0;
}

/* ------------------------------------------------------------------------
 * Encoding
 * ------------------------------------------------------------------------ */

/* PNG text keywords as tEXt allows them (1-79 Latin-1 characters, no
 * leading, trailing or double space), narrowed to printable ASCII. */
static bool good_keyword(const char *k) {
    size_t n = k ? strlen(k) : 0;
    if (n < 1 || n > 79 || k[0] == ' ' || k[n - 1] == ' ' || strstr(k, "  ")) return false;
    for (size_t i = 0; i < n; i++)
        if (k[i] < 0x20 || k[i] > 0x7e) return false;
    return true;
}

static int check_metadata(const imageio_metadata *m, char *err, size_t errlen) {
    if (m->ntexts < 0 || m->ntexts > IMAGEIO_MAX_TEXTS) {
        put_err(err, errlen, "imageio: %d texts, at most %d", m->ntexts, IMAGEIO_MAX_TEXTS);
        return -1;
    }
    for (int i = 0; i < m->ntexts; i++) {
        if (!good_keyword(m->texts[i].keyword)) {
            put_err(err, errlen, "imageio: text keyword %d is not 1 to 79 printable ASCII characters "
                    "without leading, trailing or double spaces", i);
            return -1;
        }
        if (!m->texts[i].text || !g_utf8_validate(m->texts[i].text, -1, NULL)) {
            put_err(err, errlen, "imageio: the text of \"%s\" is not UTF-8", m->texts[i].keyword);
            return -1;
        }
    }
    if (m->icc && !rgb_profile(m->icc, m->icc_len)) {
        put_err(err, errlen, "imageio: the ICC profile (%zu bytes) is not a whole RGB profile", m->icc_len);
        return -1;
    }
    return 0;
}

/* ---- PNG text chunks ---- */

static void put_be32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24), p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8), p[3] = (unsigned char)v;
}

static size_t text_chunk_size(const imageio_text *t) {
    /* iTXt: keyword NUL, compression flag and method, empty language and
     * translated keyword with their NULs; tEXt: keyword NUL */
    bool ascii = true;
    for (const char *c = t->text; *c; c++) ascii &= (unsigned char)*c < 0x80;
    return 12 + strlen(t->keyword) + 1 + (ascii ? 0 : 4) + strlen(t->text);
}

/* Writes text chunk t at p (text_chunk_size(t) bytes). */
static void write_text_chunk(unsigned char *p, const imageio_text *t) {
    size_t size = text_chunk_size(t), klen = strlen(t->keyword), tlen = strlen(t->text);
    bool ascii = size == 12 + klen + 1 + tlen;
    put_be32(p, (uint32_t)(size - 12));
    memcpy(p + 4, ascii ? "tEXt" : "iTXt", 4);
    unsigned char *d = p + 8;
    memcpy(d, t->keyword, klen + 1);
    d += klen + 1;
    if (!ascii) memcpy(d, "\0\0\0\0", 4), d += 4; /* uncompressed, no language, no translation */
    memcpy(d, t->text, tlen);
    d += tlen;
    put_be32(d, (uint32_t)crc32(crc32(0, NULL, 0), p + 4, (uInt)(size - 8)));
}

/* A copy of the PNG png[len] (from libvips' saver) with the text chunks
 * before its first IDAT; NULL when out of memory. */
static unsigned char *png_with_texts(const unsigned char *png, size_t len, const imageio_metadata *m,
                                     size_t *out_len) {
    size_t at = 8, extra = 0;
    while (at + 8 <= len && memcmp(png + at + 4, "IDAT", 4))
        at += 12 + ((size_t)png[at] << 24 | (size_t)png[at + 1] << 16 | (size_t)png[at + 2] << 8 | png[at + 3]);
    if (at + 8 > len) at = len; /* not from libvips' saver: cannot happen */
    for (int i = 0; i < m->ntexts; i++) extra += text_chunk_size(&m->texts[i]);
    unsigned char *q = malloc(len + extra);
    if (!q) return NULL;
    memcpy(q, png, at);
    size_t o = at;
    for (int i = 0; i < m->ntexts; i++) {
        write_text_chunk(q + o, &m->texts[i]);
        o += text_chunk_size(&m->texts[i]);
    }
    memcpy(q + o, png + at, len - at);
    *out_len = len + extra;
    return q;
}

/* ---- EXIF UserComment ---- */

/* "Exif\0\0" and a big-endian TIFF of two IFDs, IFD0 pointing to the EXIF
 * IFD, which holds UserComment: "UNICODE\0" and the text in UTF-16BE, as
 * piexif's UserComment.dump(text, encoding="unicode") gives it (big-endian
 * throughout, so that readers that take the TIFF's byte order for the
 * text agree). g_malloc'd; NULL with a message when it does not fit. */
static unsigned char *exif_user_comment(const char *text, size_t *len, char *err, size_t errlen) {
    glong units = 0;
    gunichar2 *utf16 = g_utf8_to_utf16(text, -1, NULL, &units, NULL); /* checked UTF-8 */
    if (!utf16) {
        put_err(err, errlen, "imageio: the text could not be converted to UTF-16");
        return NULL;
    }
    size_t comment = 8 + 2 * (size_t)units, total = 6 + 44 + comment;
    if (total > IMAGEIO_MAX_EXIF_BYTES) {
        g_free(utf16);
        put_err(err, errlen, "imageio: the text is %zu bytes of EXIF, over the %d a JPEG holds",
                total, IMAGEIO_MAX_EXIF_BYTES);
        return NULL;
    }
    unsigned char *e = g_malloc0(total), *t = e + 6;
    memcpy(e, "Exif\0\0", 6);
    memcpy(t, "MM\0\x2a", 4);
    put_be32(t + 4, 8);                       /* IFD0 */
    t[9] = 1;                                 /* one entry: */
    memcpy(t + 10, "\x87\x69\0\x04", 4);      /* ExifIFDPointer, LONG */
    put_be32(t + 14, 1), put_be32(t + 18, 26); /* the EXIF IFD; next IFD 0 */
    t[27] = 1;                                /* one entry: */
    memcpy(t + 28, "\x92\x86\0\x07", 4);      /* UserComment, UNDEFINED */
    put_be32(t + 32, (uint32_t)comment), put_be32(t + 36, 44); /* next IFD 0 */
    memcpy(t + 44, "UNICODE\0", 8);
    for (glong i = 0; i < units; i++) {
        t[52 + 2 * i] = (unsigned char)(utf16[i] >> 8);
        t[53 + 2 * i] = (unsigned char)utf16[i];
    }
    g_free(utf16);
    *len = total;
    return e;
}

int imageio_encode(const sdx4_image *img, image_format format, int quality,
                   void **out, size_t *out_len, char *err, size_t errlen) {
    return imageio_encode_metadata(img, format, quality, NULL, out, out_len, err, errlen);
}

int imageio_encode_metadata(const sdx4_image *img, image_format format, int quality,
                            const imageio_metadata *meta, void **out, size_t *out_len, char *err,
                            size_t errlen) {
    if (!img || !img->pixels || img->width <= 0 || img->height <= 0 || !out || !out_len) {
        put_err(err, errlen, "imageio_encode: empty image");
        return -1;
    }
    if ((int64_t)img->width * img->height > IMAGEIO_MAX_PIXELS) {
        put_err(err, errlen, "imageio_encode: %dx%d is over the limit of %lld pixels",
                img->width, img->height, (long long)IMAGEIO_MAX_PIXELS);
        return -1;
    }
    if (quality == 0) quality = DEFAULT_QUALITY;
    if (quality < 1 || quality > 100) {
        put_err(err, errlen, "imageio_encode: quality %d is not in 1..100", quality);
        return -1;
    }
    if (format == IMAGE_UNKNOWN) {
        put_err(err, errlen, "imageio_encode: unknown format");
        return -1;
    }
    if (meta && check_metadata(meta, err, errlen)) return -1;
    if (meta && !meta->ntexts && !meta->icc) meta = NULL;
    /* a JPEG's or WebP's text is EXIF; a PNG's, chunks added after libvips */
    unsigned char *exif = NULL;
    size_t exif_len = 0;
    if (meta && meta->ntexts && format != IMAGE_PNG &&
        !(exif = exif_user_comment(meta->texts[0].text, &exif_len, err, errlen)))
        return -1;
    if (lock_vips(err, errlen)) {
        g_free(exif);
        return -1;
    }
    size_t size = (size_t)img->width * img->height * 3;
    /* libvips only reads an image made from memory */
    VipsImage *src = vips_image_new_from_memory(img->pixels, size, img->width,
                                                img->height, 3, VIPS_FORMAT_UCHAR);
    void *buf = NULL;
    size_t len = 0;
    int rc = -1;
    if (src) {
        src->Type = VIPS_INTERPRETATION_sRGB;
        /* No metadata is written ("strip"; libvips 8.14's WebP saver
         * still adds a small EXIF block of resolution tags): equal pixels
         * give equal files. With metadata, the saver writes what the image
         * holds: the profile, the EXIF (to which libvips adds its
         * resolution tags) and, for a PNG, a pHYs chunk. JPEG keeps
         * libvips' default chroma subsampling: 4:2:0 below quality 90,
         * none (4:4:4) from 90 up. */
        gboolean strip = !(meta && (meta->icc || exif));
        if (meta && meta->icc) vips_image_set_blob_copy(src, VIPS_META_ICC_NAME, meta->icc, meta->icc_len);
        if (exif) vips_image_set_blob_copy(src, VIPS_META_EXIF_NAME, exif, exif_len);
        switch (format) {
        case IMAGE_PNG:
            rc = vips_pngsave_buffer(src, &buf, &len, "compression", PNG_COMPRESSION,
                                     "strip", strip, NULL);
            break;
        case IMAGE_JPEG:
            rc = vips_jpegsave_buffer(src, &buf, &len, "Q", quality, "optimize_coding", TRUE,
                                      "strip", strip, NULL);
            break;
        case IMAGE_WEBP:
            rc = vips_webpsave_buffer(src, &buf, &len, "Q", quality, "strip", strip, NULL);
            break;
        case IMAGE_UNKNOWN:
            break;
        }
        g_object_unref(src);
    }
    if (rc) {
        char what[64];
        snprintf(what, sizeof what, "%s: encoding failed", imageio_format_name(format));
        vips_fail(err, errlen, what);
    } else if (format == IMAGE_PNG && meta && meta->icc && !memmem(buf, len, "iCCP", 4)) {
        /* left out with a warning (png_writes_profile): said, not hidden */
        put_err(err, errlen, "png: the ICC profile (%zu bytes) was refused by the PNG encoder", meta->icc_len);
        g_free(buf);
        rc = -1;
    }
    pthread_mutex_unlock(&vips_lock);
    g_free(exif);
    if (rc) return -1;
    /* hand back malloc'd memory, as the header promises, not g_malloc'd */
    void *copy;
    if (meta && meta->ntexts && format == IMAGE_PNG) {
        copy = png_with_texts(buf, len, meta, &len);
    } else if ((copy = malloc(len ? len : 1))) {
        memcpy(copy, buf, len);
    }
    g_free(buf);
    if (!copy) {
        put_err(err, errlen, "%s: out of memory for %zu bytes", imageio_format_name(format), len);
        return -1;
    }
    *out = copy;
    *out_len = len;
    return 0;
}

int imageio_write_file(const sdx4_image *img, const char *path, int quality,
                       char *err, size_t errlen) {
    return imageio_write_file_metadata(img, path, quality, NULL, err, errlen);
}

int imageio_write_file_metadata(const sdx4_image *img, const char *path, int quality,
                                const imageio_metadata *meta, char *err, size_t errlen) {
    image_format format = imageio_format_from_name(path);
    if (!path || format == IMAGE_UNKNOWN) {
        put_err(err, errlen, "%s: unknown extension (use .png, .jpg, .jpeg or .webp)",
                path ? path : "(null)");
        return -1;
    }
    void *buf = NULL;
    size_t len = 0;
    char inner[512];
    if (imageio_encode_metadata(img, format, quality, meta, &buf, &len, inner, sizeof inner)) {
        put_err(err, errlen, "%s: %s", path, inner);
        return -1;
    }
    FILE *f = fopen(path, "wb");
    int ok = f && fwrite(buf, 1, len, f) == len;
    int saved = errno;
    if (f && fclose(f) != 0 && ok) {
        ok = 0;
        saved = errno;
    }
    free(buf);
    if (!ok) {
        put_err(err, errlen, "%s: %s", path, strerror(saved));
        if (f) remove(path);
        return -1;
    }
    return 0;
}
