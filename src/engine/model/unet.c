/*
 * unet.c - UNet2DConditionModel.forward, block by block as in diffusers:
 *
 *   emb    = time_embedding(timestep_proj(t)) + class_embedding(labels)
 *   h      = conv_in(sample)                      skips = [h]
 *   down:  per level: (resnet, transformer?) x layers, then a stride-2 conv,
 *          pushing every output to skips
 *   mid:   resnet, transformer, resnet
 *   up:    per level: (cat(h, skips.pop()), resnet, transformer?) x
 *          (layers + 1), then nearest-upsample x2 (or to the next skip's size
 *          when the input is not a multiple of 2^levels) and a conv
 *   out    = conv_out(silu(conv_norm_out(h)))
 *
 * Configuration values that change the arithmetic and are not implemented
 * are refused by name when the model loads (see check_config()). A set
 * cancel flag (core/cancel.h) stops a step at its next resnet or
 * transformer block (blocks.c), or inside a CPU kernel.
 */
#include "model/unet.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

/* Keys whose diffusers default is the only supported value. */
static int check_config(const config *c) {
    static const char *null_keys[] = {
        "reverse_transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type",
        "class_embed_type", "addition_embed_type", "time_embedding_dim", "time_embedding_act_fn",
        "timestep_post_act", "time_cond_proj_dim", "projection_class_embeddings_input_dim",
        "cross_attention_norm", "num_attention_heads", "addition_time_embed_dim"};
    for (size_t i = 0; i < sizeof null_keys / sizeof *null_keys; i++)
        if (sdx4_cfg_expect_null(c, null_keys[i])) return -1;
    return sdx4_cfg_expect_str(c, "_class_name", "UNet2DConditionModel") ||
           sdx4_cfg_expect_bool(c, "center_input_sample", 0) ||
           sdx4_cfg_expect_str(c, "mid_block_type", "UNetMidBlock2DCrossAttn") ||
           sdx4_cfg_expect_int(c, "downsample_padding", 1) ||
           sdx4_cfg_expect_float(c, "mid_block_scale_factor", 1.0) ||
           sdx4_cfg_expect_str(c, "act_fn", "silu") ||
           sdx4_cfg_expect_bool(c, "dual_cross_attention", 0) ||
           sdx4_cfg_expect_bool(c, "use_linear_projection", 1) ||
           sdx4_cfg_expect_str(c, "resnet_time_scale_shift", "default") ||
           sdx4_cfg_expect_bool(c, "resnet_skip_time_act", 0) ||
           sdx4_cfg_expect_float(c, "resnet_out_scale_factor", 1.0) ||
           sdx4_cfg_expect_str(c, "time_embedding_type", "positional") ||
           sdx4_cfg_expect_int(c, "conv_in_kernel", 3) || sdx4_cfg_expect_int(c, "conv_out_kernel", 3) ||
           sdx4_cfg_expect_str(c, "attention_type", "default") ||
           sdx4_cfg_expect_bool(c, "class_embeddings_concat", 0);
}

static int block_type(const config *c, const char *key, const char *type, const char *plain,
                      const char *cross, int *is_cross) {
    if (!strcmp(type, plain)) *is_cross = 0;
    else if (!strcmp(type, cross)) *is_cross = 1;
    else {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: %s=%s is not supported (%s, %s)", c->label, key, type,
                  plain, cross);
        return -1;
    }
    return 0;
}

int sdx4_unet_load(unet *u, weight_source *ws, const config *c) {
    memset(u, 0, sizeof *u);
    const char *down_types[UNET_MAX_LEVELS], *up_types[UNET_MAX_LEVELS];
    int nd, nu, layers[UNET_MAX_LEVELS], heads[UNET_MAX_LEVELS];
    int *ctx_dim = u->context_dim;
    int tlayers[UNET_MAX_LEVELS], only_cross[UNET_MAX_LEVELS];
    double freq_shift, eps;
    if (check_config(c) ||
        sdx4_cfg_str_list(c, "down_block_types", UNET_MAX_LEVELS, down_types, &nd) ||
        sdx4_cfg_str_list(c, "up_block_types", UNET_MAX_LEVELS, up_types, &nu))
        return -1;
    if (nd != nu) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: %d down blocks but %d up blocks", c->label, nd, nu);
        return -1;
    }
    u->levels = nd;
    if (sdx4_cfg_int(c, "in_channels", 4, &u->in_channels) ||
        sdx4_cfg_int(c, "out_channels", 4, &u->out_channels) ||
        sdx4_cfg_int_list(c, "block_out_channels", nd, u->block_channels) ||
        sdx4_cfg_int_list(c, "layers_per_block", nd, layers) ||
        sdx4_cfg_int_list(c, "attention_head_dim", nd, heads) ||
        sdx4_cfg_int_list(c, "cross_attention_dim", nd, ctx_dim) ||
        sdx4_cfg_int_list(c, "transformer_layers_per_block", nd, tlayers) ||
        sdx4_cfg_bool_list(c, "only_cross_attention", nd, only_cross) ||
        sdx4_cfg_int(c, "norm_num_groups", 32, &u->groups) ||
        sdx4_cfg_float(c, "norm_eps", 1e-5, &eps) ||
        sdx4_cfg_bool(c, "flip_sin_to_cos", 1, &u->flip_sin_to_cos) ||
        sdx4_cfg_float(c, "freq_shift", 0, &freq_shift) ||
        sdx4_cfg_int(c, "num_class_embeds", 0, &u->num_class_embeds))
        return -1;
    u->norm_eps = (float)eps;
    u->freq_shift = (float)freq_shift;
    const int *ch = u->block_channels;
    for (int i = 0; i < nd; i++) {
        if (ch[i] <= 0 || ch[i] % u->groups || heads[i] <= 0 || ch[i] % heads[i] ||
            layers[i] < 1 || layers[i] > UNET_MAX_LAYERS || tlayers[i] < 1 || tlayers[i] > 64 ||
            ctx_dim[i] <= 0) {
            sdx4_set_error(SDX4_ERR_MODEL, "%s: level %d: inconsistent sizes (channels %d, groups %d, "
                      "heads %d, layers %d)", c->label, i, ch[i], u->groups, heads[i], layers[i]);
            return -1;
        }
    }
    if (u->in_channels <= 0 || u->out_channels <= 0 || u->groups <= 0 || ch[0] % 2) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: inconsistent sizes", c->label);
        return -1;
    }
    int temb = ch[0] * 4;
    char n[256];

    if (sdx4_linear_load(ws, &u->time_linear1, "time_embedding.linear_1", ch[0], temb, 1) ||
        sdx4_linear_load(ws, &u->time_linear2, "time_embedding.linear_2", temb, temb, 1))
        return -1;
    if (u->num_class_embeds > 0 &&
        !(u->class_embedding = W2(ws, u->num_class_embeds, temb, "class_embedding.weight")))
        return -1;
    if (sdx4_conv_load(ws, &u->conv_in, "conv_in", u->in_channels, ch[0], 3, 1)) return -1;

    /* down blocks */
    int out = ch[0];
    for (int i = 0; i < nd; i++) {
        unet_block *b = &u->down[i];
        int in = out;
        out = ch[i];
        if (block_type(c, "down_block_types", down_types[i], "DownBlock2D", "CrossAttnDownBlock2D",
                       &b->cross))
            return -1;
        b->nlayers = layers[i];
        for (int j = 0; j < b->nlayers; j++) {
            snprintf(n, sizeof n, "down_blocks.%d.resnets.%d", i, j);
            if (sdx4_resnet_load(ws, &b->resnet[j], n, j ? out : in, out, temb, u->groups, u->norm_eps))
                return -1;
            snprintf(n, sizeof n, "down_blocks.%d.attentions.%d", i, j);
            if (b->cross && sdx4_transformer2d_load(ws, &b->attn[j], n, out, heads[i], ctx_dim[i],
                                               tlayers[i], u->groups, only_cross[i]))
                return -1;
        }
        b->has_sampler = i < nd - 1;
        snprintf(n, sizeof n, "down_blocks.%d.downsamplers.0.conv", i);
        if (b->has_sampler && sdx4_conv_load(ws, &b->sampler, n, out, out, 3, 2)) return -1;
    }

    /* mid block: no only_cross_attention there, in diffusers either */
    int top = ch[nd - 1];
    if (sdx4_resnet_load(ws, &u->mid_resnet[0], "mid_block.resnets.0", top, top, temb, u->groups,
                    u->norm_eps) ||
        sdx4_transformer2d_load(ws, &u->mid_attn, "mid_block.attentions.0", top, heads[nd - 1],
                           ctx_dim[nd - 1], tlayers[nd - 1], u->groups, 0) ||
        sdx4_resnet_load(ws, &u->mid_resnet[1], "mid_block.resnets.1", top, top, temb, u->groups,
                    u->norm_eps))
        return -1;

    /* up blocks: the per-level lists reversed */
    out = ch[nd - 1];
    for (int i = 0; i < nd; i++) {
        unet_block *b = &u->up[i];
        int r = nd - 1 - i; /* level in down order */
        int prev = out;
        out = ch[r];
        int skip_in = ch[r > 0 ? r - 1 : 0];
        if (block_type(c, "up_block_types", up_types[i], "UpBlock2D", "CrossAttnUpBlock2D",
                       &b->cross))
            return -1;
        b->nlayers = layers[r] + 1;
        for (int j = 0; j < b->nlayers; j++) {
            int skip = j == b->nlayers - 1 ? skip_in : out;
            int res_in = j == 0 ? prev : out;
            snprintf(n, sizeof n, "up_blocks.%d.resnets.%d", i, j);
            if (sdx4_resnet_load(ws, &b->resnet[j], n, res_in + skip, out, temb, u->groups, u->norm_eps))
                return -1;
            snprintf(n, sizeof n, "up_blocks.%d.attentions.%d", i, j);
            if (b->cross && sdx4_transformer2d_load(ws, &b->attn[j], n, out, heads[r], ctx_dim[r],
                                               tlayers[r], u->groups, only_cross[r]))
                return -1;
        }
        b->has_sampler = i < nd - 1;
        snprintf(n, sizeof n, "up_blocks.%d.upsamplers.0.conv", i);
        if (b->has_sampler && sdx4_conv_load(ws, &b->sampler, n, out, out, 3, 1)) return -1;
    }
    return sdx4_norm_load(ws, &u->conv_norm_out, "conv_norm_out", ch[0]) ||
                   sdx4_conv_load(ws, &u->conv_out, "conv_out", ch[0], u->out_channels, 3, 1)
               ? -1
               : 0;
}

void sdx4_unet_free(unet *u) {
    for (int i = 0; i < u->levels; i++)
        for (int j = 0; j < UNET_MAX_LAYERS + 1; j++) {
            sdx4_transformer2d_free(&u->down[i].attn[j]);
            sdx4_transformer2d_free(&u->up[i].attn[j]);
        }
    sdx4_transformer2d_free(&u->mid_attn);
}

/* diffusers get_timestep_embedding, in float32 as torch computes it. */
static void timestep_embedding(float t, int dim, int flip, float shift, float *out) {
    int half = dim / 2;
    for (int i = 0; i < half; i++) {
        float exponent = (float)(-log(10000.0)) * (float)i / ((float)half - shift);
        float arg = t * expf(exponent);
        float s = (float)sin((double)arg), co = (float)cos((double)arg);
        out[i] = flip ? co : s;
        out[half + i] = flip ? s : co;
    }
}

int sdx4_unet_set_timestep(backend *be, const unet *u, tensor *tproj, float t) {
    int batch = (int)tproj->shape[0], dim = u->block_channels[0];
    if (tproj->ndim != 2 || tproj->shape[1] != dim) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "unet: timestep tensor must be [B, %d]", dim);
        return -1;
    }
    float *host = malloc(sizeof *host * batch * dim);
    if (!host) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        return -1;
    }
    for (int b = 0; b < batch; b++)
        timestep_embedding(t, dim, u->flip_sin_to_cos, u->freq_shift, host + b * dim);
    int rc = be->upload(be, tproj, host);
    free(host);
    return rc;
}

tensor *sdx4_unet_new_timestep(backend *be, const unet *u, int batch, float t) {
    tensor *tproj = be->new_tensor(be, 2, (const int64_t[]){batch, u->block_channels[0]});
    if (tproj && sdx4_unet_set_timestep(be, u, tproj, t)) DROP(tproj);
    return tproj;
}

tensor *sdx4_unet_class_embedding(backend *be, const unet *u, const int32_t *labels, int batch) {
    if (!u->class_embedding) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "unet: the model has no class embedding");
        return NULL;
    }
    for (int b = 0; b < batch; b++)
        if (labels[b] < 0 || labels[b] >= u->num_class_embeds) {
            sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "unet: class label %d outside 0..%d", labels[b],
                      u->num_class_embeds - 1);
            return NULL;
        }
    return be->embedding(be, u->class_embedding, labels, batch);
}

/* emb = time_embedding(t_emb) + class_embedding(class_labels) -> silu(emb):
 * every resnet applies silu to it before its projection. */
static tensor *time_embedding(backend *be, const unet *u, const tensor *tproj, const tensor *cls) {
    tensor *h = NULL, *e = NULL;
    TRY(h = linear_forward(be, &u->time_linear1, tproj));
    TRY(e = be->activate(be, h, ACT_SILU));
    DROP(h);
    TRY(h = linear_forward(be, &u->time_linear2, e));
    DROP(e);
    if (cls && be->add_inplace(be, h, cls, 1.0f)) goto fail;
    e = be->activate(be, h, ACT_SILU);
    DROP(h);
    return e;
fail: /* e may hold the first SiLU's output: never return it as the embedding */
    DROP(h);
    DROP(e);
    return NULL;
}

/* resnet then, in cross-attention blocks, transformer: a new tensor. */
static tensor *layer_forward(backend *be, const unet_block *b, int j, const tensor *h,
                        const tensor *temb, const tensor *ctx, kv_cache *kv) {
    tensor *r = sdx4_resnet_forward(be, &b->resnet[j], h, temb);
    if (!r || !b->cross) return r;
    tensor *a = sdx4_transformer2d_forward(be, &b->attn[j], r, ctx, kv);
    tensor_free(r);
    return a;
}

tensor *sdx4_unet_forward(backend *be, const unet *u, const tensor *sample, float t,
                const int32_t *class_labels, const tensor *ctx) {
    int batch = sample->ndim == 4 ? (int)sample->shape[0] : 1;
    tensor *tproj = NULL, *cls = NULL, *out = NULL;
    TRY(tproj = sdx4_unet_new_timestep(be, u, batch, t));
    if (u->class_embedding) TRY(cls = sdx4_unet_class_embedding(be, u, class_labels, batch));
    out = sdx4_unet_forward_embedded(be, u, sample, tproj, cls, ctx, NULL);
fail:
    DROP(tproj), DROP(cls);
    return out;
}

tensor *sdx4_unet_forward_embedded(backend *be, const unet *u, const tensor *sample, const tensor *tproj,
                         const tensor *cls, const tensor *ctx, kv_cache *kv) {
    if (sample->ndim != 4 || sample->shape[1] != u->in_channels) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "unet: sample must be [B, %d, H, W]", u->in_channels);
        return NULL;
    }
    if (!cls != !u->class_embedding) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "unet: class embedding %s", cls ? "given to a model without one" : "missing");
        return NULL;
    }
    int up_factor = 1 << (u->levels - 1);
    int odd_size = sample->shape[2] % up_factor || sample->shape[3] % up_factor;
    /* down_block_res_samples: every down-path output, owned here */
    tensor *skips[1 + UNET_MAX_LEVELS * (UNET_MAX_LAYERS + 1)];
    int nskips = 0;
    tensor *temb = NULL, *h = NULL, *x = NULL, *out = NULL;

    TRY(temb = time_embedding(be, u, tproj, cls));
    TRY(skips[nskips++] = conv_forward(be, &u->conv_in, sample));
    for (int i = 0; i < u->levels; i++) {
        const unet_block *b = &u->down[i];
        for (int j = 0; j < b->nlayers; j++, nskips++)
            TRY(skips[nskips] = layer_forward(be, b, j, skips[nskips - 1], temb, ctx, kv));
        if (b->has_sampler) {
            TRY(skips[nskips] = conv_forward(be, &b->sampler, skips[nskips - 1]));
            nskips++;
        }
    }

    TRY(x = sdx4_resnet_forward(be, &u->mid_resnet[0], skips[nskips - 1], temb));
    TRY(h = sdx4_transformer2d_forward(be, &u->mid_attn, x, ctx, kv));
    DROP(x);
    TRY(x = sdx4_resnet_forward(be, &u->mid_resnet[1], h, temb));
    DROP(h);
    h = x, x = NULL;

    for (int i = 0; i < u->levels; i++) {
        const unet_block *b = &u->up[i];
        for (int j = 0; j < b->nlayers; j++) {
            /* torch.cat([hidden_states, res_hidden_states], dim=1) */
            TRY(x = be->concat_channels(be, h, skips[nskips - 1]));
            DROP(skips[nskips - 1]), nskips--;
            DROP(h);
            TRY(h = layer_forward(be, b, j, x, temb, ctx, kv));
            DROP(x);
        }
        if (b->has_sampler) {
            /* upsample_size: the next skip's size when the input is odd */
            int th = (int)h->shape[2] * 2, tw = (int)h->shape[3] * 2;
            if (odd_size) {
                th = (int)skips[nskips - 1]->shape[2];
                tw = (int)skips[nskips - 1]->shape[3];
            }
            TRY(x = be->upsample_nearest(be, h, th, tw));
            DROP(h);
            TRY(h = conv_forward(be, &b->sampler, x));
            DROP(x);
        }
    }

    TRY(x = be->group_norm(be, h, u->groups, u->conv_norm_out.g, u->conv_norm_out.b, u->norm_eps,
                           ACT_SILU));
    TRY(out = conv_forward(be, &u->conv_out, x));
fail:
    while (nskips > 0) DROP(skips[nskips - 1]), nskips--;
    DROP(temb), DROP(h), DROP(x);
    return out;
}

/* ------------------------------------------------------ the forward's memory */

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Elements alive at once in sdx4_resnet_forward on x [cin, px] besides x:
 * norm1 + conv1, then norm2 + conv1, then norm2 + shortcut + conv2. */
static int64_t resnet_live(int64_t px, int cin, int cout) {
    return px * max64(cin + cout, (cin != cout ? 3 : 2) * cout);
}

/* The same for layer_forward: the resnet, then (cross) its output beside
 * the transformer's feed-forward, whose residual, GEGLU projection (8 C)
 * and GEGLU output (4 C) are alive at once: more than attention's
 * residual, normed input, q, k, v, output and projection (7 C). */
static int64_t layer_live(const unet_block *b, int64_t px, int cin, int cout) {
    int64_t live = resnet_live(px, cin, cout);
    return b->cross ? max64(live, px * cout + 13 * px * cout) : live;
}

int64_t sdx4_unet_bytes_per_pixel(const unet *u) {
    /* one batch item of 2^(levels-1) pixels a side: every level has whole pixels */
    int64_t unit = (int64_t)1 << 2 * (u->levels - 1), px = unit;
    int64_t skips[1 + UNET_MAX_LEVELS * (UNET_MAX_LAYERS + 1)], held = 0;
    int n = 0, ch = u->block_channels[0];
    int64_t peak = px * (u->in_channels + ch); /* the sample and conv_in's output */
    held += skips[n++] = px * ch;
    for (int i = 0; i < u->levels; i++) { /* every output is kept for the way up */
        const unet_block *b = &u->down[i];
        for (int j = 0; j < b->nlayers; j++, ch = u->block_channels[i]) {
            peak = max64(peak, held + layer_live(b, px, ch, u->block_channels[i]));
            held += skips[n++] = px * u->block_channels[i];
        }
        if (b->has_sampler) {
            px /= 4;
            held += skips[n++] = px * ch;
            peak = max64(peak, held);
        }
    }
    /* the mid block: x, then h beside the transformer, then h beside a resnet */
    peak = max64(peak, held + resnet_live(px, ch, ch));
    peak = max64(peak, held + px * ch + max64(13 * px * ch, resnet_live(px, ch, ch)));
    for (int i = 0; i < u->levels; i++) {
        const unet_block *b = &u->up[i];
        int out = u->block_channels[u->levels - 1 - i];
        for (int j = 0; j < b->nlayers && n > 0; j++, ch = out) {
            int cin = ch + (int)(skips[n - 1] / px); /* torch.cat: h, the skip and x at once */
            peak = max64(peak, held + px * ch + px * cin);
            held -= skips[--n];
            peak = max64(peak, held + px * cin + layer_live(b, px, cin, out));
        }
        if (b->has_sampler) { /* h beside its upsampled copy, that beside the conv */
            peak = max64(peak, held + 5 * px * ch);
            px *= 4;
            peak = max64(peak, held + 2 * px * ch);
        }
    }
    peak = max64(peak, px * (2 * ch + u->out_channels)); /* h, norm_out's, conv_out's */
    peak += unit * u->in_channels;                                 /* the caller's sample */
    return (peak * (int64_t)sizeof(float) + unit - 1) / unit;
}
