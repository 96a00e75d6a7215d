/*
 * vae.c - AutoencoderKL.decode, as diffusers' Decoder:
 *
 *   h = conv_in(post_quant_conv(z))
 *   h = mid: resnet, attention (one head over all h*w positions), resnet
 *   up blocks (block_out_channels reversed): (layers + 1) resnets, then
 *   nearest-upsample x2 and a conv, except after the last
 *   image = conv_out(silu(conv_norm_out(h)))
 *
 * The mid-block attention is where memory goes at large sizes (16384
 * tokens for a 512x512 output): the backend computes it in tiles.
 * Checkpoints from before diffusers 0.14 name that attention's weights
 * query/key/value/proj_attn; both namings load.
 *
 * The decode is the longest single stretch of an upscale (one call, no
 * steps): the caller's cancel flag (core/cancel.h) is read before the
 * attention, every resnet (blocks.c), every upsampler and the output
 * layers, and inside the CPU's kernels.
 */
#include "model/vae.h"

#include <stdio.h>
#include <string.h>

#include "core/cancel.h"
#include "core/error.h"

#define RESNET_EPS 1e-6f /* diffusers' Decoder hard-codes it */

static int load_mid_attention(weight_source *ws, vae_decoder *v, int ch) {
    const char *p = "decoder.mid_block.attentions.0";
    char n[128];
    snprintf(n, sizeof n, "%s.group_norm", p);
    if (sdx4_norm_load(ws, &v->mid_attn_norm, n, ch)) return -1;
    snprintf(n, sizeof n, "%s.query.weight", p);
    if (ws->spec || !sdx4_weight_exists(ws, n)) return sdx4_attention_load(ws, &v->mid_attn, p, ch, ch, 1, 1);
    v->mid_attn.heads = 1;
#define OLD(field, name) (snprintf(n, sizeof n, "%s." name, p), sdx4_linear_load(ws, &v->mid_attn.field, n, ch, ch, 1))
    return OLD(q, "query") || OLD(k, "key") || OLD(v, "value") || OLD(out, "proj_attn") ? -1 : 0;
#undef OLD
}

int sdx4_vae_load(vae_decoder *v, weight_source *ws, const config *c) {
    memset(v, 0, sizeof *v);
    const char *up_types[VAE_MAX_LEVELS];
    int nu, layers;
    double scaling;
    if (sdx4_cfg_expect_str(c, "_class_name", "AutoencoderKL") || sdx4_cfg_expect_str(c, "act_fn", "silu") ||
        sdx4_cfg_str_list(c, "up_block_types", VAE_MAX_LEVELS, up_types, &nu) ||
        sdx4_cfg_int(c, "latent_channels", 4, &v->latent_channels) ||
        sdx4_cfg_int(c, "out_channels", 3, &v->out_channels) ||
        sdx4_cfg_int_list(c, "block_out_channels", nu, v->block_channels) ||
        sdx4_cfg_int(c, "layers_per_block", 1, &layers) ||
        sdx4_cfg_int(c, "norm_num_groups", 32, &v->groups) ||
        sdx4_cfg_float(c, "scaling_factor", 0.18215, &scaling) ||
        sdx4_cfg_bool(c, "use_post_quant_conv", 1, &v->has_post_quant_conv) ||
        sdx4_cfg_bool(c, "mid_block_add_attention", 1, &v->has_mid_attention))
        return -1;
    for (int i = 0; i < nu; i++)
        if (strcmp(up_types[i], "UpDecoderBlock2D")) {
            sdx4_set_error(SDX4_ERR_MODEL, "%s: up_block_types=%s is not supported", c->label,
                      up_types[i]);
            return -1;
        }
    v->levels = nu;
    v->scaling_factor = (float)scaling;
    const int *ch = v->block_channels;
    for (int i = 0; i < nu; i++)
        if (ch[i] <= 0 || v->groups <= 0 || ch[i] % v->groups) {
            sdx4_set_error(SDX4_ERR_MODEL, "%s: block_out_channels %d not divisible by norm_num_groups %d",
                      c->label, ch[i], v->groups);
            return -1;
        }
    if (layers < 1 || layers > VAE_MAX_LAYERS || v->latent_channels <= 0 || v->out_channels <= 0 ||
        scaling == 0) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: inconsistent sizes", c->label);
        return -1;
    }
    int L = v->latent_channels, top = ch[nu - 1];
    if (v->has_post_quant_conv && sdx4_conv_load(ws, &v->post_quant_conv, "post_quant_conv", L, L, 1, 1))
        return -1;
    if (sdx4_conv_load(ws, &v->conv_in, "decoder.conv_in", L, top, 3, 1) ||
        sdx4_resnet_load(ws, &v->mid_resnet[0], "decoder.mid_block.resnets.0", top, top, 0, v->groups,
                    RESNET_EPS) ||
        (v->has_mid_attention && load_mid_attention(ws, v, top)) ||
        sdx4_resnet_load(ws, &v->mid_resnet[1], "decoder.mid_block.resnets.1", top, top, 0, v->groups,
                    RESNET_EPS))
        return -1;
    int out = top;
    char n[128];
    for (int i = 0; i < nu; i++) {
        vae_up_block *b = &v->up[i];
        int prev = out;
        out = ch[nu - 1 - i];
        b->nlayers = layers + 1;
        for (int j = 0; j < b->nlayers; j++) {
            snprintf(n, sizeof n, "decoder.up_blocks.%d.resnets.%d", i, j);
            if (sdx4_resnet_load(ws, &b->resnet[j], n, j ? out : prev, out, 0, v->groups, RESNET_EPS))
                return -1;
        }
        b->has_upsampler = i < nu - 1;
        snprintf(n, sizeof n, "decoder.up_blocks.%d.upsamplers.0.conv", i);
        if (b->has_upsampler && sdx4_conv_load(ws, &b->upsampler, n, out, out, 3, 1)) return -1;
    }
    return sdx4_norm_load(ws, &v->conv_norm_out, "decoder.conv_norm_out", ch[0]) ||
                   sdx4_conv_load(ws, &v->conv_out, "decoder.conv_out", ch[0], v->out_channels, 3, 1)
               ? -1
               : 0;
}

int sdx4_vae_scale_factor(const vae_decoder *v) { return 1 << (v->levels - 1); }

/* Attention(residual_connection=True) over the h*w positions of x. */
static tensor *mid_attention(backend *be, const vae_decoder *v, const tensor *x) {
    int h = (int)x->shape[2], w = (int)x->shape[3];
    tensor *n = NULL, *tok = NULL, *a = NULL, *out = NULL;
    if (sdx4_cancel_check()) return NULL;
    TRY(n = be->group_norm(be, x, v->groups, v->mid_attn_norm.g, v->mid_attn_norm.b, RESNET_EPS,
                           ACT_NONE));
    tok = as_tokens(be, n), n = NULL; /* as_tokens takes n over */
    TRY(tok);
    TRY(a = sdx4_attention_forward(be, &v->mid_attn, tok, NULL, NULL, NULL));
    out = as_image(be, a, h, w), a = NULL; /* as_image takes a over */
    TRY(out);
    if (be->add_inplace(be, out, x, 1.0f)) DROP(out);
fail:
    DROP(n), DROP(tok), DROP(a);
    return out;
}

tensor *sdx4_vae_decode(backend *be, const vae_decoder *v, const tensor *z) {
    if (z->ndim != 4 || z->shape[1] != v->latent_channels) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "vae: latents must be [B, %d, h, w]",
                  v->latent_channels);
        return NULL;
    }
    tensor *h = NULL, *x = NULL, *out = NULL;
    if (v->has_post_quant_conv) {
        TRY(x = conv_forward(be, &v->post_quant_conv, z));
        TRY(h = conv_forward(be, &v->conv_in, x));
        DROP(x);
    } else {
        TRY(h = conv_forward(be, &v->conv_in, z));
    }
    TRY(x = sdx4_resnet_forward(be, &v->mid_resnet[0], h, NULL));
    DROP(h);
    if (v->has_mid_attention) {
        TRY(h = mid_attention(be, v, x));
        DROP(x);
        x = h, h = NULL;
    }
    TRY(h = sdx4_resnet_forward(be, &v->mid_resnet[1], x, NULL));
    DROP(x);
    for (int i = 0; i < v->levels; i++) {
        const vae_up_block *b = &v->up[i];
        for (int j = 0; j < b->nlayers; j++) {
            TRY(x = sdx4_resnet_forward(be, &b->resnet[j], h, NULL));
            DROP(h);
            h = x, x = NULL;
        }
        if (b->has_upsampler) {
            if (sdx4_cancel_check()) goto fail;
            TRY(x = be->upsample_nearest(be, h, 2 * (int)h->shape[2], 2 * (int)h->shape[3]));
            DROP(h);
            TRY(h = conv_forward(be, &b->upsampler, x));
            DROP(x);
        }
    }
    if (sdx4_cancel_check()) goto fail;
    TRY(x = be->group_norm(be, h, v->groups, v->conv_norm_out.g, v->conv_norm_out.b, RESNET_EPS,
                           ACT_SILU));
    TRY(out = conv_forward(be, &v->conv_out, x));
fail:
    DROP(h), DROP(x);
    return out;
}
