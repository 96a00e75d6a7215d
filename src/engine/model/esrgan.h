/*
 * esrgan.h - the ESRGAN family of single-pass upscalers: RRDBNet (ESRGAN,
 * Real-ESRGAN x4plus, x4plus-anime, x2plus) and SRVGGNetCompact
 * (realesr-general-x4v3, realesr-animevideov3).
 *
 * A model folder holds config.json, whose keys are the arguments of the
 * architectures' constructors in Real-ESRGAN / BasicSR:
 *
 *   {"architecture": "RRDBNet", "num_in_ch": 3, "num_out_ch": 3,
 *    "scale": 4, "num_feat": 64, "num_block": 23, "num_grow_ch": 32}
 *   {"architecture": "SRVGGNetCompact", "num_in_ch": 3, "num_out_ch": 3,
 *    "upscale": 4, "num_feat": 64, "num_conv": 16, "act_type": "prelu"}
 *
 * plus, for either, "outscale" (below).
 *
 * and model.safetensors, the state dict under PyTorch's names
 * ("conv_first.weight", "body.3.rdb2.conv4.bias", "body.1.weight"), in
 * float32 or float16: BasicSR's classes load it with strict=True, and
 * spandrel loads the released models' (it assumes 32 growth channels and
 * PReLU).
 *
 * The networks are convolutions at the input's resolution with a few at
 * the output's: an output pixel depends on the input pixels within a
 * finite radius (sdx4_esrgan_radius), so a large image runs in tiles
 * padded by that radius and gives the same numbers as a whole run.
 */
#ifndef SDX4_ESRGAN_H
#define SDX4_ESRGAN_H

#include "backend/backend.h"
#include "core/config.h"
#include "model/blocks.h"
#include "model/weights.h"

typedef enum { ESRGAN_RRDBNET, ESRGAN_SRVGG } esrgan_arch;

/* SRVGGNetCompact's activations; RRDBNet always uses LeakyReLU(0.2). */
typedef enum { GAN_ACT_PRELU, GAN_ACT_RELU, GAN_ACT_LEAKYRELU } gan_act;

typedef struct {
    esrgan_arch arch;
    int num_in_ch, num_out_ch, num_feat;
    int scale;                  /* RRDBNet's "scale", SRVGGNetCompact's "upscale" */
    int outscale;               /* "outscale" (Real-ESRGAN's option of that name):
                                   the output's side per input side, the
                                   network's output resized down to it with
                                   Pillow's bicubic when below scale
                                   (realesr-animevideov3-x2 and -x3 are the x4
                                   network so resized); scale by default */
    int num_block, num_grow_ch; /* RRDBNet */
    int num_conv;               /* SRVGGNetCompact */
    gan_act act;                /* SRVGGNetCompact */
} gan_config;

/* "RRDBNet", "SRVGGNetCompact"; "prelu", "relu", "leakyrelu". */
const char *sdx4_gan_arch_name(esrgan_arch a);
const char *sdx4_gan_act_name(gan_act a);

/* Reads and checks config.json (refusing values the engine does not run,
 * by name); -1 with the error set. */
int sdx4_gan_config_parse(const config *c, gan_config *cfg);
/* config.json's text for cfg (malloc'd), as the converter writes it. */
char *sdx4_gan_config_json(const gan_config *cfg);

/* A 3x3 convolution with a per-channel or shared negative slope after it
 * (prelu slopes, or NULL and `slope`: 0 for ReLU, 0.2 for LeakyReLU). */
typedef struct {
    conv_p c[5];
} rdb_p;

typedef struct {
    gan_config cfg;
    weight_source ws;
    /* RRDBNet */
    conv_p first, body_conv, up1, up2, hr, last;
    rdb_p *rdb; /* num_block * 3 residual dense blocks */
    /* SRVGGNetCompact: num_conv + 2 convolutions, num_conv + 1 slopes */
    conv_p *convs;
    tensor **slopes; /* PReLU's [num_feat], NULL otherwise */
} esrgan;

/* Loads <dir>/config.json and <dir>/model.safetensors. */
int sdx4_esrgan_load(esrgan *m, backend *be, const char *dir);
/* The tensors the loader asks for, for a config without a file: spec mode
 * of weights.h (the converter checks a state dict against it). */
int sdx4_esrgan_spec(esrgan *m, const gan_config *cfg);
void sdx4_esrgan_free(esrgan *m);

/* The whole network on x [B, num_in_ch, H, W] in [0, 1]: [B, num_out_ch,
 * scale*H, scale*W], not clamped. RRDBNet at scale 2 (1) needs sides that
 * are multiples of 2 (4). */
tensor *sdx4_esrgan_forward(const esrgan *m, backend *be, const tensor *x);

/* Input pixels on each side that an output pixel depends on, rounded up:
 * what a tile is padded by so that it computes what the whole image
 * would. */
int sdx4_esrgan_radius(const gan_config *cfg);

/* The smallest input side: RRDBNet folds 4 / scale pixels into one. */
int sdx4_esrgan_min_side(const gan_config *cfg);

/* float32 activations at the forward's peak per input pixel, counted from
 * the config: what decides whether an image runs whole. */
int64_t sdx4_esrgan_bytes_per_pixel(const gan_config *cfg);

/* Upscales a float CHW image [num_in_ch, h, w] in [0, 1] into *out
 * ([num_out_ch, scale*h, scale*w], malloc'd, clamped to [0, 1]): whole
 * when its activations fit `budget` bytes, else in tiles of `tile` input
 * pixels (0: the largest that fit), padded by the radius so that the
 * numbers are those of a whole run. progress(user, done, total) after each
 * tile (and once with 0 first); nonzero stops with SDX4_ERR_CANCELED.
 * *tiles_run receives the tiles (1 when whole). */
int sdx4_esrgan_run(const esrgan *m, backend *be, const float *image, int h, int w, int tile,
                    int64_t budget, int (*progress)(void *user, int done, int total), void *user,
                    float **out, int *tiles_run);

/* FLOPs of one forward on an h x w input (multiply-adds count 2). */
double sdx4_esrgan_flops(const gan_config *cfg, int h, int w);

#endif
