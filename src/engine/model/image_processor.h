/*
 * image_processor.h - pixels in and out of the model, as diffusers does it.
 *
 * Mirrors diffusers' VaeImageProcessor as StableDiffusionUpscalePipeline
 * builds it (VaeImageProcessor(vae_scale_factor, resample="bicubic")):
 *
 *   preprocess:  PIL image -> sides rounded down to a multiple of the VAE
 *                scale factor with Image.resize(..., BICUBIC) -> float32
 *                / 255 -> 2 * x - 1, as a [3, h, w] tensor.
 *   postprocess: (x * 0.5 + 0.5).clamp(0, 1) -> (x * 255).round() -> uint8.
 *
 * The resize reproduces Pillow's resampler (libImaging/Resample.c) bit for
 * bit, so that a picture diffusers would shrink gives the same latents
 * here. Pure C; no image library.
 */
#ifndef SDX4_IMAGE_PROCESSOR_H
#define SDX4_IMAGE_PROCESSOR_H

#include <stddef.h>
#include <stdint.h>

#include "sdx4.h"

/* RGB8 -> float CHW [3, h', w'] in [-1, 1], where h' and w' are the sides
 * rounded DOWN to a multiple of scale_factor; when that changes the size,
 * the image is first resized exactly as PIL's
 * Image.resize((w', h'), Image.BICUBIC) does. *out is malloc'd. Error
 * (SDX4_ERR_INVALID_ARGUMENT) if a side would become < scale_factor. */
int sdx4_image_preprocess(const sdx4_image *in, int scale_factor, float **out,
                     int *h, int *w);

/* float CHW [3, h, w] in model space [-1, 1] -> RGB8, as diffusers:
 * (x / 2 + 0.5).clamp(0, 1), then numpy_to_pil's
 * (x * 255).round().astype(uint8) (round half to even, as numpy; NaN
 * gives 0). out->pixels is malloc'd. */
int sdx4_image_postprocess(const float *chw, int h, int w, sdx4_image *out);

/* The float step alone: (x / 2 + 0.5).clamp(0, 1) into out (same layout;
 * out may be chw). */
void sdx4_image_denormalize(const float *chw, size_t n, float *out);

/* The uint8 step alone: float CHW [3, h, w] already in [0, 1] (diffusers'
 * output_type="np" values, as the goldens record them) -> interleaved RGB8
 * in rgb (3 * h * w bytes), rounding as numpy_to_pil does. */
void sdx4_image_quantize(const float *chw, int h, int w, uint8_t *rgb);

/* PIL's Image.resize((width, height), Image.BICUBIC) on an RGB image:
 * separable convolution, horizontal pass then vertical, each rounded and
 * clipped to uint8 in Pillow's 22-bit fixed point. out->pixels is
 * malloc'd. */
int sdx4_image_resize_bicubic(const sdx4_image *in, int width, int height,
                         sdx4_image *out);

#endif
