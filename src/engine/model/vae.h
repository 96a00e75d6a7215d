/*
 * vae.h - the decoder half of diffusers' AutoencoderKL (post_quant_conv +
 * Decoder): latents -> image in [-1, 1]. The encoder is never loaded.
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
} vae_decoder;

int sdx4_vae_load(vae_decoder *v, weight_source *ws, const config *cfg);
/* Output side / latent side: 2^(levels - 1) (the pipeline's vae_scale_factor). */
int sdx4_vae_scale_factor(const vae_decoder *v);
/* vae.decode(z).sample: z [B, latent_channels, h, w] already divided by
 * scaling_factor -> [B, out_channels, h * f, w * f]. */
tensor *sdx4_vae_decode(backend *be, const vae_decoder *v, const tensor *z);

#endif
