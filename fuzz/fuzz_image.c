/*
 * fuzz_image.c - libFuzzer target for image decoding (src/imageio).
 *
 * Does what the server does with an upload: probe, refuse anything over
 * 4096 x 4096, decode. Any input must end in a clean success or a clean
 * error: no crash, no sanitizer report, no hang, no output.
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
    if (imageio_decode(data, size, &image, err, sizeof err) == 0) {
        /* a decoded image has exactly the size the probe promised */
        if (image.width != width || image.height != height || !image.pixels) abort();
        free(image.pixels);
    }
    return 0;
}
