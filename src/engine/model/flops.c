/*
 * flops.c - what an upscale costs in arithmetic, from the model's
 * configuration (sdx4_count_flops in sdx4.h).
 *
 * The count walks the structures that text_encoder.c, unet.c and vae.c
 * build, in the order their forward passes run them, with the spatial size
 * every layer sees, and adds 2 FLOPs per multiply-add in two kinds:
 *
 *   dense      convolutions (2 * Cin * Cout * k * k per output position)
 *              and linear layers (2 * in * out per token): proportional to
 *              the pixels
 *   attention  the products Q K^T and A V: N queries against M keys of C
 *              channels cost 4 * N * M * C whatever the heads. With M = N
 *              (self-attention: the VAE's mid-block over every latent
 *              position, the UNet's levels without only_cross_attention)
 *              this grows with the square of the pixels, and it is what
 *              makes a 512 px upscale cost far more than 64 times a 64 px
 *              one.
 *
 * Normalizations, activations, the softmax, resampling and element-wise
 * additions are left out: they read and write memory at a cost linear in
 * the positions, which a caller that calibrates seconds per FLOP of each
 * kind (the server's cost.c) absorbs into its rates.
 *
 * Once per upscale or per step, as pipeline.c runs them: the prompts are
 * encoded once, and the cross-attention keys and values of the prompt are
 * computed by the first UNet step and kept for the others (kv_cache), so
 * they are counted in `text`, not in `step`.
 */
#include "model/flops.h"

#include "core/error.h"
#include "engine_internal.h"
#include "text/tokenizer.h"

#define RESNET_KERNEL 3  /* ResnetBlock2D's conv1 and conv2 */
#define SAMPLER_KERNEL 3 /* Downsample2D / Upsample2D convs, conv_in, conv_out */

static double conv(int cin, int cout, int k, int h, int w) {
    return 2.0 * cin * cout * k * k * h * w;
}

static double linear(int in, int out, double tokens) { return 2.0 * in * out * tokens; }

/* Q K^T and A V of n queries against m keys of c channels. */
static double attend(double n, double m, int c) { return 4.0 * n * m * c; }

/* ResnetBlock2D at h x w (temb: the time embedding's width, 0 without). */
static void count_resnet(const resnet_p *r, int temb, int h, int w, int batch,
                         sdx4_flops *f) {
    f->dense += batch * (conv(r->in, r->out, RESNET_KERNEL, h, w) +
                         conv(r->out, r->out, RESNET_KERNEL, h, w));
    if (r->temb.w) f->dense += linear(temb, r->out, batch);
    if (r->shortcut.w) f->dense += batch * conv(r->in, r->out, 1, h, w);
}

/* Transformer2DModel at h x w: per step into `step`, the prompt's keys and
 * values (kept across steps) into `once`. */
static void count_transformer(const transformer2d_p *t, int ctx_dim, int ctx_len, int h,
                              int w, int batch, sdx4_flops *step, sdx4_flops *once) {
    int c = t->channels;
    double n = (double)h * w;
    step->dense += batch * 2 * linear(c, c, n); /* proj_in, proj_out */
    for (int i = 0; i < t->nblocks; i++) {
        /* attn1: self-attention, or cross when only_cross_attention */
        step->dense += batch * 2 * linear(c, c, n); /* to_q, to_out */
        if (t->only_cross_attention) {
            once->dense += batch * 2 * linear(ctx_dim, c, ctx_len);
            step->attention += batch * attend(n, ctx_len, c);
        } else {
            step->dense += batch * 2 * linear(c, c, n);
            step->attention += batch * attend(n, n, c);
        }
        /* attn2: cross-attention to the prompt */
        step->dense += batch * 2 * linear(c, c, n);
        once->dense += batch * 2 * linear(ctx_dim, c, ctx_len);
        step->attention += batch * attend(n, ctx_len, c);
        /* GEGLU feed-forward: c -> 2 * 4c, then 4c -> c */
        step->dense += batch * (linear(c, 8 * c, n) + linear(4 * c, c, n));
    }
}

static void count_text_encoder(const text_encoder *te, int seq, int batch, sdx4_flops *f) {
    int d = te->hidden;
    for (int i = 0; i < te->layers; i++) {
        f->dense += batch * (4 * linear(d, d, seq) + linear(d, te->intermediate, seq) +
                             linear(te->intermediate, d, seq));
        f->attention += batch * attend(seq, seq, d);
    }
}

/* One UNet evaluation at h x w, as unet_fw_embedded runs it. */
static void count_unet(const unet *u, int ctx_len, int h, int w, int batch, sdx4_flops *step,
                       sdx4_flops *once) {
    const int *ch = u->block_channels;
    int temb = 4 * ch[0];
    int hs[UNET_MAX_LEVELS], ws[UNET_MAX_LEVELS]; /* each level's size */
    step->dense += linear(ch[0], temb, batch) + linear(temb, temb, batch); /* time_embedding */
    step->dense += batch * conv(u->in_channels, ch[0], SAMPLER_KERNEL, h, w);
    for (int i = 0; i < u->levels; i++) {
        const unet_block *b = &u->down[i];
        hs[i] = h, ws[i] = w;
        for (int j = 0; j < b->nlayers; j++) {
            count_resnet(&b->resnet[j], temb, h, w, batch, step);
            if (b->cross)
                count_transformer(&b->attn[j], u->context_dim[i], ctx_len, h, w, batch, step,
                                  once);
        }
        if (b->has_sampler) { /* 3x3, stride 2, padding 1 */
            h = (h - 1) / 2 + 1, w = (w - 1) / 2 + 1;
            step->dense += batch * conv(ch[i], ch[i], SAMPLER_KERNEL, h, w);
        }
    }
    int top = u->levels - 1;
    count_resnet(&u->mid_resnet[0], temb, h, w, batch, step);
    count_transformer(&u->mid_attn, u->context_dim[top], ctx_len, h, w, batch, step, once);
    count_resnet(&u->mid_resnet[1], temb, h, w, batch, step);
    for (int i = 0; i < u->levels; i++) {
        const unet_block *b = &u->up[i];
        int r = top - i; /* the level in down order */
        for (int j = 0; j < b->nlayers; j++) {
            count_resnet(&b->resnet[j], temb, hs[r], ws[r], batch, step);
            if (b->cross)
                count_transformer(&b->attn[j], u->context_dim[r], ctx_len, hs[r], ws[r], batch,
                                  step, once);
        }
        if (b->has_sampler) /* upsampled to the next level's size, then a conv */
            step->dense += batch * conv(ch[r], ch[r], SAMPLER_KERNEL, hs[r - 1], ws[r - 1]);
    }
    step->dense += batch * conv(ch[0], u->out_channels, SAMPLER_KERNEL, hs[0], ws[0]);
}

/* The decoder on latents of h x w (batch 1), as sdx4_vae_decode runs it. */
static void count_vae(const vae_decoder *v, int h, int w, sdx4_flops *f) {
    const int *ch = v->block_channels;
    int latent = v->latent_channels, top = ch[v->levels - 1];
    if (v->has_post_quant_conv) f->dense += conv(latent, latent, 1, h, w);
    f->dense += conv(latent, top, SAMPLER_KERNEL, h, w);
    count_resnet(&v->mid_resnet[0], 0, h, w, 1, f);
    if (v->has_mid_attention) { /* one head over all h * w positions */
        double n = (double)h * w;
        f->dense += 4 * linear(top, top, n); /* to_q, to_k, to_v, to_out */
        f->attention += attend(n, n, top);
    }
    count_resnet(&v->mid_resnet[1], 0, h, w, 1, f);
    int c = top;
    for (int i = 0; i < v->levels; i++) {
        const vae_up_block *b = &v->up[i];
        for (int j = 0; j < b->nlayers; j++) count_resnet(&b->resnet[j], 0, h, w, 1, f);
        c = b->resnet[b->nlayers - 1].out;
        if (b->has_upsampler) {
            h *= 2, w *= 2;
            f->dense += conv(c, c, SAMPLER_KERNEL, h, w);
        }
    }
    f->dense += conv(c, v->out_channels, SAMPLER_KERNEL, h, w);
}

void sdx4_model_flops(const model *m, int h, int w, int batch, sdx4_flop_counts *out) {
    *out = (sdx4_flop_counts){{0, 0}, {0, 0}, {0, 0}};
    /* the prompts are padded to the tokenizer's length (77 for CLIP) */
    int seq = m->tok ? sdx4_tokenizer_max_length(m->tok) : m->te.max_positions;
    count_text_encoder(&m->te, seq, batch, &out->text);
    count_unet(&m->unet, seq, h, w, batch, &out->step, &out->text);
    count_vae(&m->vae, h, w, &out->decode);
}

sdx4_status sdx4_count_flops(const sdx4_engine *engine, int width, int height,
                             sdx4_flop_counts *flops) {
    sdx4_error_clear();
    /* the engine's accessors take a mutable handle; nothing here writes */
    const esrgan *g = sdx4_engine_gan((sdx4_engine *)engine);
    if (g) { /* a GAN's one forward is all of its work: counted as `decode` */
        memset(flops, 0, sizeof *flops);
        if (width < 1 || height < 1) {
            sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "%dx%d: no pixels", width, height);
            return SDX4_ERR_INVALID_ARGUMENT;
        }
        flops->decode.dense = sdx4_esrgan_flops(&g->cfg, height, width);
        return SDX4_OK;
    }
    const model *m = sdx4_engine_model((sdx4_engine *)engine);
    int f = sdx4_vae_scale_factor(&m->vae);
    if (width < f || height < f) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "%dx%d: each side needs at least %d pixels", width,
                  height, f);
        return SDX4_ERR_INVALID_ARGUMENT;
    }
    /* the sides sdx4_upscale runs at (sdx4_image_preprocess rounds them down) */
    sdx4_model_flops(m, height / f * f, width / f * f, 2, flops);
    return SDX4_OK;
}
