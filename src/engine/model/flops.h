/*
 * flops.h - the arithmetic of one upscale, counted from a built model
 * (sdx4_count_flops in sdx4.h; the model may be in spec mode, without
 * weights).
 */
#ifndef SDX4_FLOPS_H
#define SDX4_FLOPS_H

#include "model/model.h"
#include "sdx4.h"

/* The counts for a UNet input of h x w positions (the input image after
 * its sides were rounded down to a multiple of the VAE scale factor) and
 * a batch of `batch` (2 with guidance). */
void sdx4_model_flops(const model *m, int h, int w, int batch, sdx4_flop_counts *out);

#endif
