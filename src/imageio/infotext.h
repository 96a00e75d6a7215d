/*
 * infotext.h - an upscale's parameters as text in its output file, the
 * way AUTOMATIC1111 writes them ("infotext"), for the opt-in output
 * metadata of the CLI (--metadata) and the server (metadata=true).
 *
 * A diffusion model's upscale is a generation: its text is A1111's
 * `parameters` (create_infotext in modules/processing.py): the prompt,
 * "Negative prompt: ..." when there is one, then one line of
 * "Key: value" pairs, values with a comma, colon or newline quoted as
 * JSON strings (infotext_utils.quote):
 *
 *   a photo of a cat
 *   Negative prompt: blurry
 *   Steps: 20, Sampler: ddim, CFG scale: 9, Seed: 42, Size: 512x512,
 *   Model: x4-upscaler, Noise level: 0.2, Input size: 128x128, Version: sdx4 0.1.0
 *
 * (one line in the file). A GAN takes no prompt, steps or seed: its text
 * is what A1111's extras tab writes for its upscalers
 * (modules/postprocessing.py), "Postprocess upscale by: 4, Postprocess
 * upscaler: NAME", with the tile and sizes. Keys A1111 does not know
 * (Noise level, Tile, Input size) are kept as they are by its reader,
 * which parses every "Key: value" pair.
 */
#ifndef SDX4_INFOTEXT_H
#define SDX4_INFOTEXT_H

#include <stdbool.h>
#include <stddef.h>

#include "imageio.h"
#include "sdx4.h"

typedef struct {
    const char *model;      /* the model's name */
    const char *model_hash; /* the SHA-256 of its weights in hex (10 digits
                               are written); NULL: none known */
    bool gan;               /* a GAN: no prompt, steps, sampler or seed */
    int input_width, input_height, output_width, output_height;
} infotext_facts;

/* The text of an upscale with parameters p (malloc'd; NULL when out of
 * memory). */
char *infotext(const sdx4_upscale_params *p, const infotext_facts *f);

/* At least the length in bytes of any text infotext() makes of p and f
 * (f's sizes not read: their numbers counted at their longest), so that a
 * request whose text cannot fit a JPEG's EXIF is refused before it runs. */
size_t infotext_bound(const sdx4_upscale_params *p, const infotext_facts *f);

/* The metadata of an output with that text and that ICC profile (NULL:
 * none): a diffusion model's text under the keyword "parameters", a
 * GAN's under "postprocessing" and "extras", as A1111 writes both there.
 * meta points into text and icc, which must outlive it. */
void infotext_metadata(const char *text, bool gan, const void *icc, size_t icc_len,
                       imageio_metadata *meta);

#endif
