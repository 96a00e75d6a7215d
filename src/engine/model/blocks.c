/*
 * blocks.c - shared layers (see blocks.h). Each forward mirrors the
 * diffusers module it is named after; comments quote the PyTorch line.
 * A resnet and a transformer block each begin by reading the caller's
 * cancel flag (core/cancel.h): they are the blocks the UNet and the VAE
 * are made of, a few milliseconds of a GPU's work at most.
 */
#include "model/blocks.h"

#include <stdio.h>
#include <stdlib.h>

#include "core/cancel.h"
#include "core/error.h"


int sdx4_linear_load(weight_source *ws, linear_p *p, const char *name, int in, int out, int bias) {
    p->w = W2(ws, out, in, "%s.weight", name);
    p->b = bias ? W1(ws, out, "%s.bias", name) : NULL;
    return p->w && (!bias || p->b) ? 0 : -1;
}

int sdx4_conv_load(weight_source *ws, conv_p *p, const char *name, int in, int out, int k, int stride) {
    p->w = W4(ws, out, in, k, k, "%s.weight", name);
    p->b = W1(ws, out, "%s.bias", name);
    p->stride = stride;
    p->pad = k / 2;
    return p->w && p->b ? 0 : -1;
}

int sdx4_norm_load(weight_source *ws, norm_p *p, const char *name, int channels) {
    p->g = W1(ws, channels, "%s.weight", name);
    p->b = W1(ws, channels, "%s.bias", name);
    return p->g && p->b ? 0 : -1;
}

/* ---------------------------------------------------------------- resnet */

int sdx4_resnet_load(weight_source *ws, resnet_p *r, const char *name, int in, int out,
                int temb_channels, int groups, float eps) {
    char n[256];
    *r = (resnet_p){.in = in, .out = out, .groups = groups, .eps = eps};
#define SUB(s) (snprintf(n, sizeof n, "%s." s, name), n)
    if (sdx4_norm_load(ws, &r->norm1, SUB("norm1"), in) ||
        sdx4_conv_load(ws, &r->conv1, SUB("conv1"), in, out, 3, 1) ||
        sdx4_norm_load(ws, &r->norm2, SUB("norm2"), out) ||
        sdx4_conv_load(ws, &r->conv2, SUB("conv2"), out, out, 3, 1))
        return -1;
    if (temb_channels && sdx4_linear_load(ws, &r->temb, SUB("time_emb_proj"), temb_channels, out, 1))
        return -1;
    if (in != out && sdx4_conv_load(ws, &r->shortcut, SUB("conv_shortcut"), in, out, 1, 1)) return -1;
#undef SUB
    return 0;
}

tensor *sdx4_resnet_forward(backend *be, const resnet_p *r, const tensor *x, const tensor *temb_act) {
    tensor *h = NULL, *t = NULL, *s = NULL, *out = NULL;
    if (sdx4_cancel_check()) return NULL;
    /* hidden_states = conv1(nonlinearity(norm1(input_tensor))) */
    TRY(t = be->group_norm(be, x, r->groups, r->norm1.g, r->norm1.b, r->eps, ACT_SILU));
    TRY(h = conv_forward(be, &r->conv1, t));
    DROP(t);
    /* hidden_states + time_emb_proj(nonlinearity(temb))[:, :, None, None],
     * read only by norm2: added inside it where the backend can */
    if (r->temb.w) TRY(s = linear_forward(be, &r->temb, temb_act));
    /* conv2(dropout(nonlinearity(norm2(hidden_states)))), then
     * (shortcut(input_tensor) + hidden_states) / output_scale_factor (1) */
    TRY(t = group_norm_add_forward(be, h, s, &r->norm2, r->groups, r->eps, ACT_SILU));
    DROP(h);
    DROP(s);
    if (r->shortcut.w) TRY(s = conv_forward(be, &r->shortcut, x));
    TRY(out = conv_add_forward(be, &r->conv2, t, s ? s : x));
    DROP(t);
    DROP(s);
    return out;
fail:
    DROP(h);
    DROP(t);
    DROP(s);
    DROP(out);
    return NULL;
}

/* ------------------------------------------------------------- attention */

int sdx4_attention_load(weight_source *ws, attention_p *a, const char *name, int query_dim,
                   int context_dim, int heads, int qkv_bias) {
    char n[256];
    a->heads = heads;
#define SUB(s) (snprintf(n, sizeof n, "%s." s, name), n)
    return sdx4_linear_load(ws, &a->q, SUB("to_q"), query_dim, query_dim, qkv_bias) ||
                   sdx4_linear_load(ws, &a->k, SUB("to_k"), context_dim, query_dim, qkv_bias) ||
                   sdx4_linear_load(ws, &a->v, SUB("to_v"), context_dim, query_dim, qkv_bias) ||
                   sdx4_linear_load(ws, &a->out, SUB("to_out.0"), query_dim, query_dim, 1)
               ? -1
               : 0;
#undef SUB
}

struct kv_cache {
    int n, cap;
    struct kv_entry {
        const attention_p *layer;
        tensor *k, *v;
    } *e;
};

kv_cache *sdx4_kv_cache_new(void) {
    kv_cache *c = calloc(1, sizeof *c);
    if (!c) sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
    return c;
}

void sdx4_kv_cache_free(kv_cache *c) {
    if (!c) return;
    for (int i = 0; i < c->n; i++) DROP(c->e[i].k), DROP(c->e[i].v);
    free(c->e);
    free(c);
}

/* The cached keys and values of a layer, or a new empty entry for them;
 * NULL on out of memory. */
static struct kv_entry *kv_entry_of(kv_cache *c, const attention_p *a) {
    for (int i = 0; i < c->n; i++)
        if (c->e[i].layer == a) return &c->e[i];
    if (c->n == c->cap) {
        int cap = c->cap ? 2 * c->cap : 32;
        struct kv_entry *e = realloc(c->e, cap * sizeof *e);
        if (!e) {
            sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
            return NULL;
        }
        c->e = e, c->cap = cap;
    }
    c->e[c->n] = (struct kv_entry){a, NULL, NULL};
    return &c->e[c->n++];
}

tensor *sdx4_attention_forward(backend *be, const attention_p *a, const tensor *x, const tensor *context,
                     kv_cache *kv, const tensor *residual) {
    const tensor *ctx = context ? context : x;
    struct kv_entry *cached = NULL;
    tensor *q = NULL, *k = NULL, *v = NULL, *o = NULL, *out = NULL;
    if (context && kv && !(cached = kv_entry_of(kv, a))) return NULL;
    TRY(q = linear_forward(be, &a->q, x));
    if (!cached || !cached->k) {
        TRY(k = linear_forward(be, &a->k, ctx));
        TRY(v = linear_forward(be, &a->v, ctx));
        if (cached) cached->k = k, cached->v = v, k = v = NULL; /* the cache owns them now */
    }
    /* F.scaled_dot_product_attention(query, key, value) over `heads` heads */
    TRY(o = be->attention(be, q, cached ? cached->k : k, cached ? cached->v : v, a->heads, 0));
    TRY(out = residual ? linear_add_forward(be, &a->out, o, residual) : linear_forward(be, &a->out, o));
fail:
    DROP(q);
    DROP(k);
    DROP(v);
    DROP(o);
    return out;
}

/* --------------------------------------------------------- transformer2d */

static int block_load(weight_source *ws, transformer_block_p *b, const char *name, int dim,
                      int heads, int context_dim, int only_cross) {
    char n[256];
    int inner = 4 * dim; /* FeedForward(mult=4) */
#define SUB(s) (snprintf(n, sizeof n, "%s." s, name), n)
    return sdx4_norm_load(ws, &b->ln1, SUB("norm1"), dim) ||
                   sdx4_attention_load(ws, &b->attn1, SUB("attn1"), dim, only_cross ? context_dim : dim,
                                  heads, 0) ||
                   sdx4_norm_load(ws, &b->ln2, SUB("norm2"), dim) ||
                   sdx4_attention_load(ws, &b->attn2, SUB("attn2"), dim, context_dim, heads, 0) ||
                   sdx4_norm_load(ws, &b->ln3, SUB("norm3"), dim) ||
                   sdx4_linear_load(ws, &b->ff_in, SUB("ff.net.0.proj"), dim, 2 * inner, 1) ||
                   sdx4_linear_load(ws, &b->ff_out, SUB("ff.net.2"), inner, dim, 1)
               ? -1
               : 0;
#undef SUB
}

int sdx4_transformer2d_load(weight_source *ws, transformer2d_p *t, const char *name, int channels,
                       int heads, int context_dim, int nblocks, int groups,
                       int only_cross_attention) {
    char n[256];
    *t = (transformer2d_p){.channels = channels, .groups = groups, .nblocks = nblocks,
                           .only_cross_attention = only_cross_attention};
    t->blocks = calloc(nblocks, sizeof *t->blocks);
    if (!t->blocks) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        return -1;
    }
    snprintf(n, sizeof n, "%s.norm", name);
    if (sdx4_norm_load(ws, &t->norm, n, channels)) return -1;
    snprintf(n, sizeof n, "%s.proj_in", name);
    if (sdx4_linear_load(ws, &t->proj_in, n, channels, channels, 1)) return -1;
    for (int i = 0; i < nblocks; i++) {
        snprintf(n, sizeof n, "%s.transformer_blocks.%d", name, i);
        if (block_load(ws, &t->blocks[i], n, channels, heads, context_dim, only_cross_attention))
            return -1;
    }
    snprintf(n, sizeof n, "%s.proj_out", name);
    return sdx4_linear_load(ws, &t->proj_out, n, channels, channels, 1);
}

void sdx4_transformer2d_free(transformer2d_p *t) {
    free(t->blocks);
    t->blocks = NULL;
}

/* BasicTransformerBlock.forward on h [B, T, C]: the new h, h freed. */
static tensor *block_forward(backend *be, const transformer_block_p *b, int only_cross, tensor *h,
                        const tensor *context, kv_cache *kv) {
    tensor *n = NULL, *a = NULL, *g = NULL;
    if (sdx4_cancel_check()) goto fail;
    /* attn1(norm1(h), encoder_hidden_states if only_cross_attention) + h */
    TRY(n = be->layer_norm(be, h, b->ln1.g, b->ln1.b, 1e-5f));
    TRY(a = sdx4_attention_forward(be, &b->attn1, n, only_cross ? context : NULL, kv, h));
    DROP(h), DROP(n);
    h = a, a = NULL;
    /* attn2(norm2(h), encoder_hidden_states) + h */
    TRY(n = be->layer_norm(be, h, b->ln2.g, b->ln2.b, 1e-5f));
    TRY(a = sdx4_attention_forward(be, &b->attn2, n, context, kv, h));
    DROP(h), DROP(n);
    h = a, a = NULL;
    /* ff(norm3(h)) + h, ff = Linear(GEGLU(x)) */
    TRY(n = be->layer_norm(be, h, b->ln3.g, b->ln3.b, 1e-5f));
    TRY(a = linear_forward(be, &b->ff_in, n));
    DROP(n);
    TRY(g = be->geglu(be, a));
    DROP(a);
    TRY(a = linear_add_forward(be, &b->ff_out, g, h));
    DROP(g), DROP(h);
    return a;
fail: /* a may hold ff_in's output: never return it as the block's */
    DROP(h), DROP(n), DROP(g), DROP(a);
    return NULL;
}

tensor *sdx4_transformer2d_forward(backend *be, const transformer2d_p *t, const tensor *x,
                         const tensor *context, kv_cache *kv) {
    int h = (int)x->shape[2], w = (int)x->shape[3];
    tensor *n = NULL, *tok = NULL, *hs = NULL, *out = NULL;
    /* norm (GroupNorm, eps 1e-6), to [B, H*W, C], proj_in */
    TRY(n = be->group_norm(be, x, t->groups, t->norm.g, t->norm.b, 1e-6f, ACT_NONE));
    tok = as_tokens(be, n), n = NULL; /* as_tokens takes n over */
    TRY(tok);
    TRY(hs = linear_forward(be, &t->proj_in, tok));
    DROP(tok);
    for (int i = 0; i < t->nblocks; i++)
        TRY(hs = block_forward(be, &t->blocks[i], t->only_cross_attention, hs, context, kv));
    /* proj_out, back to [B, C, H, W], + residual */
    TRY(tok = linear_forward(be, &t->proj_out, hs));
    DROP(hs);
    out = as_image(be, tok, h, w), tok = NULL; /* as_image takes tok over */
    TRY(out);
    if (be->add_inplace(be, out, x, 1.0f)) goto fail;
    return out;
fail:
    DROP(n);
    DROP(tok);
    DROP(hs);
    DROP(out);
    return NULL;
}
