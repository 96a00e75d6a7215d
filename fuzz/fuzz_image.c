/*
 * fuzz_image.c - libFuzzer target for image decoding (src/imageio).
 *
 * Does what the server does with an upload: probe, refuse anything over
 * 4096 x 4096, decode (keeping the ICC profile, as metadata=true does).
 * Any input must end in a clean success or a clean error: no crash, no
 * sanitizer report, no hang, no output. A profile kept must be one the
 * encoder writes: a 1-pixel PNG with it must encode.
 */
#include <stdint.h>
#include <stdlib.h>

#include "imageio.h"

#define MAX_SIDE 4096

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    return imageio_init(argc && *argc > 0 ? (*argv)[0] : "fuzz_image");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char err[256];
    image_format format;
    int width, height;
    if (imageio_probe(data, size, &format, &width, &height, err, sizeof err)) return 0;
    if (width <= 0 || height <= 0 || width > MAX_SIDE || height > MAX_SIDE) return 0;
    sdx4_image image = {0};
    void *icc = NULL;
    size_t icc_len = 0;
    if (imageio_decode_keep_icc(data, size, &image, &icc, &icc_len, err, sizeof err) == 0) {
        /* a decoded image has exactly the size the probe promised */
        if (image.width != width || image.height != height || !image.pixels) abort();
        free(image.pixels);
    }
    if (icc) {
        uint8_t pixel[3] = {0};
        sdx4_image one = {1, 1, pixel};
        imageio_metadata meta = {.icc = icc, .icc_len = icc_len};
        void *png = NULL;
        size_t len = 0;
        if (imageio_encode_metadata(&one, IMAGE_PNG, 0, &meta, &png, &len, err, sizeof err)) abort();
        free(png);
        free(icc);
    }
    return 0;
}
