/*
 * vae.h - the decoder half of diffusers' AutoencoderKL (post_quant_conv +
 * Decoder): latents -> image in [-1, 1], whole or in tiles (diffusers'
 * tiled_decode). The encoder is never loaded.
 */
#ifndef SDX4_VAE_H
#define SDX4_VAE_H

#include "core/config.h"
#include "model/blocks.h"

#define VAE_MAX_LEVELS 8
#define VAE_MAX_LAYERS 8

typedef struct {
    int nlayers, has_upsampler;
    resnet_p resnet[VAE_MAX_LAYERS + 1];
    conv_p upsampler;
} vae_up_block;

typedef struct {
    int latent_channels, out_channels, levels, groups, has_mid_attention;
    int block_channels[VAE_MAX_LEVELS];
    float scaling_factor;
    int has_post_quant_conv;
    conv_p post_quant_conv, conv_in, conv_out;
    resnet_p mid_resnet[2];
    norm_p mid_attn_norm;
    attention_p mid_attn;
    vae_up_block up[VAE_MAX_LEVELS];
    norm_p conv_norm_out;
    int sample_size; /* the config's: the tiled decode's tile, output side */
} vae_decoder;

int sdx4_vae_load(vae_decoder *v, weight_source *ws, const config *cfg);
/* Output side / latent side: 2^(levels - 1) (the pipeline's vae_scale_factor). */
int sdx4_vae_scale_factor(const vae_decoder *v);
/* vae.decode(z).sample: z [B, latent_channels, h, w] already divided by
 * scaling_factor -> [B, out_channels, h * f, w * f]. */
tensor *sdx4_vae_decode(backend *be, const vae_decoder *v, const tensor *z);

/* The whole decode of host latents z [latent_channels, h, w] (already
 * divided by scaling_factor) into host out [out_channels, h * f, w * f];
 * 0, or -1 with the error set. */
int sdx4_vae_decode_host(backend *be, const vae_decoder *v, const float *z, int h, int w, float *out);

/* diffusers' tile_latent_min_size: the config's sample_size / the scale
 * factor, the tile side in latents that vae.enable_tiling() uses; 0 when
 * that is no tile sdx4_vae_decode_tiled takes. */
int sdx4_vae_tile(const vae_decoder *v);
/* vae.decode(z) with tiling enabled and tile_latent_min_size = tile
 * (tile_sample_min_size = tile * scale factor): tiled_decode when h or w
 * exceeds the tile, else the whole decode. z [latent_channels, h, w] and
 * out [out_channels, h * f, w * f] are host memory; the backend holds one
 * tile's activations at a time. tile must be a positive multiple of 4 (so
 * that the 25% overlap falls on whole latents). The number of tiles (1:
 * whole), or -1 with the error set. */
int sdx4_vae_decode_tiled(backend *be, const vae_decoder *v, const float *z, int h, int w,
                          int tile, float *out);
/* The bytes of activations that an untiled decode of h x w latents holds
 * at its peak, in float32, counted by walking the decoder as
 * sdx4_vae_decode runs it (the kernels' bounded scratch not included). */
int64_t sdx4_vae_decode_bytes(const vae_decoder *v, int h, int w);

#endif
