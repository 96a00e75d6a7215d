/*
 * imageio.h - image files in and out, for the CLI and the server.
 *
 * Built on libvips. Decoding is two-step so that a server can refuse an
 * image before paying for it: imageio_probe() reads the format from the
 * magic number and the size from the header only (a 100000x100000 PNG
 * costs nothing), then imageio_decode() produces 8-bit sRGB RGB: alpha
 * flattened onto white (transparent areas read as white paper), palette,
 * grey, 16-bit and CMYK converted, and the EXIF orientation applied.
 *
 * Images over 16384 x 16384 pixels (2^28) are refused by imageio_decode()
 * and imageio_encode() before any pixel is touched. Files are read whole,
 * up to 256 MiB. A PNG's text chunks (tEXt, zTXt, iTXt) are skipped, never
 * inflated, and a chunk length the file cannot hold is an error.
 *
 * All functions are thread-safe: calls that use libvips are serialised by
 * one internal lock (libvips keeps one process-wide error buffer), and
 * libvips runs one worker thread, leaving the cores to the engine. Nothing
 * is printed: libvips' warnings are swallowed. Errors: a return of -1 and
 * a message in the caller's buffer `err` (at most errlen bytes, always
 * terminated).
 */
#ifndef SDX4_IMAGEIO_H
#define SDX4_IMAGEIO_H

#include <stddef.h>
#include <stdint.h>

#include "sdx4.h"

typedef enum { IMAGE_UNKNOWN = 0, IMAGE_PNG, IMAGE_JPEG, IMAGE_WEBP } image_format;

/* Call once before any other function (initialises libvips). */
int imageio_init(const char *argv0);
void imageio_shutdown(void);

/* The format by magic number ("png", "jpeg", "webp"); IMAGE_UNKNOWN when
 * the bytes are none of these. */
image_format imageio_sniff(const void *data, size_t len);
const char *imageio_format_name(image_format f);
/* Parse "png"/"jpeg"/"jpg"/"webp" (case-insensitive), or a file name's
 * extension. IMAGE_UNKNOWN if neither. */
image_format imageio_format_from_name(const char *name_or_path);
const char *imageio_mime_type(image_format f);

/* Reads format and size from the header only (after EXIF orientation:
 * width and height are those of the decoded image). format, width and
 * height may be NULL. libpng reads a PNG's chunks up to the first IDAT, so
 * a PNG cut off before its pixel data fails here. */
int imageio_probe(const void *data, size_t len, image_format *format,
                  int *width, int *height, char *err, size_t errlen);

/* Decodes to RGB8. out->pixels is malloc'd; free with sdx4_image_free(). */
int imageio_decode(const void *data, size_t len, sdx4_image *out,
                   char *err, size_t errlen);
int imageio_read_file(const char *path, sdx4_image *out, char *err,
                      size_t errlen);

/* As imageio_decode / imageio_read_file, and *icc the input's embedded ICC
 * profile (malloc'd, *icc_len bytes; free with free()) where it still
 * describes the decoded pixels: an RGB profile ('RGB ' data colour space,
 * its header's size equal to its length, 'acsp' signature) of an RGB image,
 * 8- or 16-bit, whose values decoding keeps, and one that every format's
 * encoder writes (libvips' PNG saver leaves out profiles lcms or libpng
 * refuse). Else (no profile, a grey, CMYK or Lab one, a damaged one) *icc
 * is NULL: not an error, the pixels are the same either way. */
int imageio_decode_keep_icc(const void *data, size_t len, sdx4_image *out, void **icc,
                            size_t *icc_len, char *err, size_t errlen);
int imageio_read_file_keep_icc(const char *path, sdx4_image *out, void **icc, size_t *icc_len,
                               char *err, size_t errlen);

/* Resizes RGB8 `in` to exactly width x height into *out (malloc'd pixels;
 * free with sdx4_image_free()) with libvips' vips_resize: Lanczos-3 where
 * a side shrinks, bicubic where it grows (libvips interpolates enlargements
 * and keeps its kernels for reductions). Sides from 1 to 16384 and at most
 * 2^28 pixels, as imageio_encode() takes. */
int imageio_resize(const sdx4_image *in, int width, int height, sdx4_image *out,
                   char *err, size_t errlen);

/* Encodes RGB8. quality 1..100 for JPEG/WebP (0 = default 90); PNG uses
 * zlib level 6 and ignores it. JPEG keeps libvips' chroma subsampling:
 * 4:2:0 below quality 90, none from 90 up. The same pixels always give the
 * same bytes (no timestamps). *out is malloc'd (free with free()). */
int imageio_encode(const sdx4_image *img, image_format format, int quality,
                   void **out, size_t *out_len, char *err, size_t errlen);
/* Writes by the path's extension (.png, .jpg/.jpeg, .webp). */
int imageio_write_file(const sdx4_image *img, const char *path, int quality,
                       char *err, size_t errlen);

/* What an encode may carry beside the pixels, when asked (imageio_encode
 * writes none of it). A PNG gets each text as a chunk of that keyword,
 * tEXt when the text is ASCII and uncompressed iTXt (UTF-8) otherwise, as
 * Pillow writes them, before the image data; a JPEG or WebP gets the first
 * text as EXIF's UserComment ("UNICODE\0" and UTF-16BE, as AUTOMATIC1111
 * writes it with piexif; the other texts have no place there). Every
 * format gets the ICC profile (PNG iCCP, JPEG APP2, WebP ICCP); a PNG
 * whose saver leaves the profile out is an error, not a file without it
 * (imageio_decode_keep_icc keeps no such profile). Keywords
 * are 1 to 79 Latin-1 letters, digits and spaces as PNG's tEXt allows
 * (checked), texts valid UTF-8 (checked). The same inputs still give the
 * same bytes. */
#define IMAGEIO_MAX_TEXTS 4
/* The most EXIF a JPEG holds (its APP1 segment is at most 65533 bytes,
 * libvips adds some 200 of its own): the UserComment's "UNICODE\0" and
 * 2 bytes per UTF-16 unit must fit in it with the 50 of its IFDs. */
#define IMAGEIO_MAX_EXIF_BYTES 65000
typedef struct {
    const char *keyword, *text;
} imageio_text;

typedef struct {
    imageio_text texts[IMAGEIO_MAX_TEXTS];
    int ntexts;
    const void *icc; /* NULL: none */
    size_t icc_len;
} imageio_metadata;

/* imageio_encode / imageio_write_file with `meta` (NULL: none, the same
 * bytes as imageio_encode). */
int imageio_encode_metadata(const sdx4_image *img, image_format format, int quality,
                            const imageio_metadata *meta, void **out, size_t *out_len, char *err,
                            size_t errlen);
int imageio_write_file_metadata(const sdx4_image *img, const char *path, int quality,
                                const imageio_metadata *meta, char *err, size_t errlen);

#endif
