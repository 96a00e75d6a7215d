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
 *
 * The untiled decode's memory grows with the image: at 2048 px out every
 * top-level activation is 2 GiB in float. The tiled decode is diffusers'
 * AutoencoderKL.tiled_decode, to the float: the latents are cut into
 * tiles of tile_latent_min_size (the config's sample_size / f) that
 * overlap by a quarter, each tile is decoded alone, and in raster order
 * each decoded tile is blended with the tile above it (its first quarter
 * of rows, linearly: blend_v) and then with the tile to its left (blend_h),
 * both as already blended, and cropped to three quarters of its side.
 * Tiles at the right and bottom edges are decoded as diffusers slices
 * them, shorter. Blending runs on the host in float32, one rounding per
 * torch operation (a * (1 - y/e) rounds the weight to float first, as
 * torch does with a Python scalar). diffusers keeps every decoded tile;
 * here only what a later tile reads is kept: the last quarter of rows of
 * each tile of the row above and the last quarter of columns of the tile
 * to the left. So the backend holds one tile's activations at a time,
 * always of the same few shapes, and the host the latents, the image and
 * one row of quarter tiles.
 */
#include "model/vae.h"

#include <stdio.h>
#include <stdlib.h>
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
    /* diffusers' default 32; a [h, w] list gives no tile (its tiled_decode
     * cannot use one either) */
    json_t *ss = json_object_get(c->root, "sample_size");
    v->sample_size = !ss || json_is_null(ss) ? 32
                     : json_is_integer(ss) && json_integer_value(ss) > 0 && json_integer_value(ss) <= 1 << 20
                         ? (int)json_integer_value(ss)
                         : 0;
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

/* ------------------------------------------------------------ tiled decode */

int sdx4_vae_tile(const vae_decoder *v) {
    int tile = v->sample_size / sdx4_vae_scale_factor(v);
    return tile >= 4 && tile % 4 == 0 ? tile : 0;
}

int sdx4_vae_decode_host(backend *be, const vae_decoder *v, const float *z, int h, int w, float *out) {
    tensor *x = NULL, *y = NULL;
    int rc = -1;
    TRY(x = be->new_tensor(be, 4, (int64_t[]){1, v->latent_channels, h, w}));
    if (be->upload(be, x, z)) goto fail;
    TRY(y = sdx4_vae_decode(be, v, x));
    rc = be->download(be, y, out);
fail:
    DROP(x), DROP(y);
    return rc;
}

/* blend_v: the first e rows of b [C, bh, bw] from the last rows of the tile
 * above, of which `a` [C, ak, bw] holds the last ak = min(E, its height). */
static void blend_v(const float *a, int ak, float *b, int bh, int bw, int E, int C) {
    int e = ak < bh ? ak : bh;
    e = e < E ? e : E;
    for (int c = 0; c < C; c++)
        for (int y = 0; y < e; y++) {
            float wa = (float)(1.0 - (double)y / e), wb = (float)((double)y / e);
            const float *ar = a + ((size_t)c * ak + ak - e + y) * bw;
            float *br = b + ((size_t)c * bh + y) * bw;
            for (int x = 0; x < bw; x++) br[x] = ar[x] * wa + br[x] * wb;
        }
}

/* blend_h: the first e columns of b [C, bh, bw] from the last columns of
 * the tile to the left, of which `a` [C, bh, ak] holds the last ak. */
static void blend_h(const float *a, int ak, float *b, int bh, int bw, int E, int C) {
    int e = ak < bw ? ak : bw;
    e = e < E ? e : E;
    for (int c = 0; c < C; c++)
        for (int y = 0; y < bh; y++) {
            const float *ar = a + ((size_t)c * bh + y) * ak + ak - e;
            float *br = b + ((size_t)c * bh + y) * bw;
            for (int x = 0; x < e; x++) {
                float wa = (float)(1.0 - (double)x / e), wb = (float)((double)x / e);
                br[x] = ar[x] * wa + br[x] * wb;
            }
        }
}

int sdx4_vae_decode_tiled(backend *be, const vae_decoder *v, const float *z, int h, int w, int tile,
                          float *out) {
    if (tile < 4 || tile % 4 || tile > 1 << 16) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                       "vae: a tile of %d latents; tiles are a positive multiple of 4 (the config's "
                       "sample_size %d gives %d)", tile, v->sample_size, sdx4_vae_tile(v));
        return -1;
    }
    if (h <= tile && w <= tile) return sdx4_vae_decode_host(be, v, z, h, w, out) ? -1 : 1;
    int f = sdx4_vae_scale_factor(v), C = v->latent_channels, OC = v->out_channels;
    int overlap = tile - tile / 4;              /* overlap_size: the stride between tiles */
    int S = tile * f, E = S / 4, keep = S - E;  /* tile_sample_min_size, blend_extent, row_limit */
    int nx = (w + overlap - 1) / overlap, ny = (h + overlap - 1) / overlap, W = w * f;
    int left_cols = 0, rc = -1;
    float *zt = malloc((size_t)C * tile * tile * sizeof *zt);
    float *cur = malloc((size_t)OC * S * S * sizeof *cur);
    float *left = malloc((size_t)OC * S * E * sizeof *left);
    float *above = malloc((size_t)nx * OC * E * S * sizeof *above);
    int *above_rows = calloc(nx, sizeof *above_rows);
    if (!zt || !cur || !left || !above || !above_rows) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        goto done;
    }
    for (int i = 0, y0 = 0; y0 < h; i++, y0 += overlap) {
        int lh = h - y0 < tile ? h - y0 : tile, th = lh * f;
        for (int j = 0, x0 = 0; x0 < w; j++, x0 += overlap) {
            int lw = w - x0 < tile ? w - x0 : tile, tw = lw * f;
            if (sdx4_cancel_check()) goto done;
            for (int c = 0; c < C; c++) /* z[:, :, y0:y0 + tile, x0:x0 + tile] */
                for (int y = 0; y < lh; y++)
                    memcpy(zt + ((size_t)c * lh + y) * lw, z + ((size_t)c * h + y0 + y) * w + x0,
                           lw * sizeof *zt);
            if (sdx4_vae_decode_host(be, v, zt, lh, lw, cur)) goto done;
            float *a = above + (size_t)j * OC * E * S;
            if (i > 0) blend_v(a, above_rows[j], cur, th, tw, E, OC);
            if (j > 0) blend_h(left, left_cols, cur, th, tw, E, OC);
            /* what the tile below and the tile to the right will read */
            above_rows[j] = th < E ? th : E;
            for (int c = 0; c < OC; c++)
                memcpy(a + (size_t)c * above_rows[j] * tw, cur + ((size_t)c * th + th - above_rows[j]) * tw,
                       (size_t)above_rows[j] * tw * sizeof *a);
            left_cols = tw < E ? tw : E;
            for (int c = 0; c < OC; c++)
                for (int y = 0; y < th; y++)
                    memcpy(left + ((size_t)c * th + y) * left_cols,
                           cur + ((size_t)c * th + y) * tw + tw - left_cols, left_cols * sizeof *left);
            /* tile[:, :, :row_limit, :row_limit] at its place in the image */
            int rows = th < keep ? th : keep, cols = tw < keep ? tw : keep;
            for (int c = 0; c < OC; c++)
                for (int y = 0; y < rows; y++)
                    memcpy(out + ((size_t)c * h * f + (size_t)i * keep + y) * W + (size_t)j * keep,
                           cur + ((size_t)c * th + y) * tw, cols * sizeof *out);
        }
    }
    rc = nx * ny;
done:
    free(zt), free(cur), free(left), free(above), free(above_rows);
    return rc;
}

/* ------------------------------------------------ untiled decode's memory */

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Elements alive at once in sdx4_resnet_forward on x [cin, px] besides x:
 * norm1 + conv1, conv1 + norm2, then norm2 + shortcut + conv2. */
static int64_t resnet_live(int64_t px, int cin, int cout) {
    int64_t later = cin != cout ? 3 : 2;
    return px * max64(cin + cout, later * cout);
}

int64_t sdx4_vae_decode_bytes(const vae_decoder *v, int h, int w) {
    int nu = v->levels, L = v->latent_channels, top = v->block_channels[nu - 1];
    int64_t px = (int64_t)h * w;
    /* the latents stay alive through the whole decode (the caller's) */
    int64_t peak = px * (2 * L + top);                          /* post_quant_conv, conv_in */
    peak = max64(peak, px * top + resnet_live(px, top, top));   /* mid resnets */
    if (v->has_mid_attention) peak = max64(peak, px * 6 * top); /* x, tokens, q, k, v, output */
    int ch = top;
    for (int i = 0; i < nu; i++, px *= 4) {
        int out = v->block_channels[nu - 1 - i];
        peak = max64(peak, px * ch + resnet_live(px, ch, out));
        peak = max64(peak, px * out + resnet_live(px, out, out));
        ch = out;
        if (i < nu - 1) peak = max64(peak, 8 * px * ch); /* upsampled + its conv */
    }
    px /= 4;                                                     /* the output's pixels */
    peak = max64(peak, px * (2 * ch + v->out_channels));        /* norm_out, conv_out */
    return (peak + (int64_t)h * w * L) * (int64_t)sizeof(float);
}
