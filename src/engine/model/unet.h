/*
 * unet.h - diffusers' UNet2DConditionModel, as the x4 upscaler configures it
 * (DownBlock2D / CrossAttnDownBlock2D, UNetMidBlock2DCrossAttn,
 * CrossAttnUpBlock2D / UpBlock2D, a class embedding of the noise level).
 */
#ifndef SDX4_UNET_H
#define SDX4_UNET_H

#include "core/config.h"
#include "model/blocks.h"

#define UNET_MAX_LEVELS 8
#define UNET_MAX_LAYERS 8

typedef struct {
    int cross;                                   /* CrossAttn*Block2D */
    int nlayers;                                 /* resnets in the block */
    resnet_p resnet[UNET_MAX_LAYERS + 1];
    transformer2d_p attn[UNET_MAX_LAYERS + 1];   /* used when cross */
    int has_sampler;                             /* down- or upsampler */
    conv_p sampler;
} unet_block;

typedef struct {
    /* config */
    int in_channels, out_channels, levels, groups, num_class_embeds;
    int block_channels[UNET_MAX_LEVELS];
    int context_dim[UNET_MAX_LEVELS]; /* cross_attention_dim per level */
    int flip_sin_to_cos;
    float freq_shift, norm_eps;
    /* weights */
    linear_p time_linear1, time_linear2; /* time_embedding.linear_{1,2} */
    tensor *class_embedding;             /* [num_class_embeds, temb] or NULL */
    conv_p conv_in, conv_out;
    norm_p conv_norm_out;
    unet_block down[UNET_MAX_LEVELS], up[UNET_MAX_LEVELS];
    resnet_p mid_resnet[2];
    transformer2d_p mid_attn;
} unet;

int sdx4_unet_load(unet *u, weight_source *ws, const config *cfg);
void sdx4_unet_free(unet *u);
/* sample [B, in_channels, H, W], timestep t, class_labels [B] (NULL when
 * the model has no class embedding), context [B, 77, cross_attention_dim]
 * -> [B, out_channels, H, W]. */
tensor *sdx4_unet_forward(backend *be, const unet *u, const tensor *sample, float t,
                const int32_t *class_labels, const tensor *context);

/* sdx4_unet_forward in two parts, for callers that record a step once and replay it
 * (pipeline.c): what the host computes per step (the timestep's sinusoidal
 * projection, uploaded into a [B, block_out_channels[0]] tensor) and per
 * upscale (the class embedding, [B, temb] or NULL without one), and the
 * network on them, which only runs backend operations on device tensors.
 * kv (or NULL) keeps the cross-attention keys and values of `context`
 * from the first call for the next ones (blocks.h). */
tensor *sdx4_unet_new_timestep(backend *be, const unet *u, int batch, float t);
int sdx4_unet_set_timestep(backend *be, const unet *u, tensor *tproj, float t);
tensor *sdx4_unet_class_embedding(backend *be, const unet *u, const int32_t *labels, int batch);
tensor *sdx4_unet_forward_embedded(backend *be, const unet *u, const tensor *sample, const tensor *tproj,
                         const tensor *cls, const tensor *context, kv_cache *kv);

/* Bytes of float32 activations that sdx4_unet_forward holds at its peak,
 * per latent pixel of each batch item: the down path's outputs, kept for
 * the way up, beside the largest layer's temporaries. Attention and
 * convolutions keep their scratch bounded (the CPU backend's tiles), so
 * the peak grows with batch x height x width and nothing else; sides that
 * are not multiples of 2^(levels-1) round up inside and hold a little
 * more. */
int64_t sdx4_unet_bytes_per_pixel(const unet *u);

#endif
