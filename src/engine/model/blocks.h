/*
 * blocks.h - the layers that the UNet, the VAE decoder and the text encoder
 * share: linear, conv, norms, diffusers' ResnetBlock2D and Attention, and
 * the UNet's Transformer2DModel with its BasicTransformerBlocks.
 *
 * Each layer is a struct of weight tensors plus the few numbers that its
 * forward pass needs; *_load() fills it from a weight_source under a name
 * prefix ("down_blocks.1.resnets.0"), *_forward() runs it on the backend.
 * Forward functions leave their input alone and return a new tensor.
 */
#ifndef SDX4_BLOCKS_H
#define SDX4_BLOCKS_H

#include "backend/backend.h"
#include "model/weights.h"

/* Error plumbing for forward passes: TRY jumps to `fail` on NULL, DROP
 * frees a tensor and forgets it so that `fail` may free everything. */
#define TRY(x) do { if ((x) == NULL) goto fail; } while (0)
#define DROP(t) (tensor_free(t), (t) = NULL)

typedef struct { tensor *w, *b; } linear_p;     /* w [out, in], b [out] or NULL */
typedef struct { tensor *w, *b; int stride, pad; } conv_p; /* w [out, in, k, k] */
typedef struct { tensor *g, *b; } norm_p;       /* gamma, beta [C] */

int sdx4_linear_load(weight_source *ws, linear_p *p, const char *name, int in, int out, int bias);
int sdx4_conv_load(weight_source *ws, conv_p *p, const char *name, int in, int out, int k, int stride);
int sdx4_norm_load(weight_source *ws, norm_p *p, const char *name, int channels);

static inline tensor *linear_forward(backend *be, const linear_p *p, const tensor *x) {
    return be->linear(be, x, p->w, p->b);
}
static inline tensor *conv_forward(backend *be, const conv_p *p, const tensor *x) {
    return be->conv2d(be, x, p->w, p->b, p->stride, p->pad);
}
/* The layer's output + r (a residual connection): in one operation where
 * the backend has it, else as two. */
static inline tensor *residual_added(backend *be, tensor *y, const tensor *r) {
    if (y && be->add_inplace(be, y, r, 1.0f)) DROP(y);
    return y;
}
/* x [B, C, H, W] as tokens [B, H*W, C] (h = 0), or tokens as [B, C, h, w];
 * takes x over (freed, or the result itself when the backend relayouts in
 * place). */
static inline tensor *relaid(backend *be, tensor *x, int h, int w) {
    int rc = be->relayout_tokens ? be->relayout_tokens(be, x, h, w) : 1;
    if (rc <= 0) {
        if (rc < 0) DROP(x);
        return x;
    }
    tensor *t = h ? be->tokens_to_nchw(be, x, h, w) : be->nchw_to_tokens(be, x);
    DROP(x);
    return t;
}
static inline tensor *as_tokens(backend *be, tensor *x) { return relaid(be, x, 0, 0); }
static inline tensor *as_image(backend *be, tensor *x, int h, int w) { return relaid(be, x, h, w); }

/* group_norm(x + v[b, c]) (v NULL: group_norm(x)): in one operation
 * where the backend has it, else the sum written into x first. */
static inline tensor *group_norm_add_forward(backend *be, tensor *x, const tensor *v,
                                        const norm_p *n, int groups, float eps, activation act) {
    if (v && be->group_norm_add) return be->group_norm_add(be, x, v, groups, n->g, n->b, eps, act);
    if (v && be->add_channel_bias_inplace(be, x, v)) return NULL;
    return be->group_norm(be, x, groups, n->g, n->b, eps, act);
}
static inline tensor *linear_add_forward(backend *be, const linear_p *p, const tensor *x,
                                    const tensor *r) {
    if (be->linear_add) return be->linear_add(be, x, p->w, p->b, r);
    return residual_added(be, linear_forward(be, p, x), r);
}
static inline tensor *conv_add_forward(backend *be, const conv_p *p, const tensor *x, const tensor *r) {
    if (be->conv2d_add) return be->conv2d_add(be, x, p->w, p->b, p->stride, p->pad, r);
    return residual_added(be, conv_forward(be, p, x), r);
}

/* diffusers ResnetBlock2D (pre-norm, "default" time embedding):
 *   h = conv1(silu(norm1(x))) + time_emb_proj(silu(temb))[:, :, None, None]
 *   h = conv2(silu(norm2(h)));  out = shortcut(x) + h                     */
typedef struct {
    int in, out, groups;
    float eps;
    norm_p norm1, norm2;
    conv_p conv1, conv2, shortcut; /* shortcut.w NULL when in == out */
    linear_p temb;                 /* temb.w NULL without time embedding */
} resnet_p;

int sdx4_resnet_load(weight_source *ws, resnet_p *r, const char *name, int in, int out,
                int temb_channels, int groups, float eps);
/* temb_act: silu(temb) [B, temb_channels], computed once per UNet call.
 * Like sdx4_transformer2d_forward's blocks, NULL with SDX4_ERR_CANCELED once this
 * thread's cancel flag is set (core/cancel.h). */
tensor *sdx4_resnet_forward(backend *be, const resnet_p *r, const tensor *x, const tensor *temb_act);

/* diffusers Attention (to_q, to_k, to_v, to_out.0) on token tensors. */
typedef struct {
    int heads;
    linear_p q, k, v, out;
} attention_p;

int sdx4_attention_load(weight_source *ws, attention_p *a, const char *name, int query_dim,
                   int context_dim, int heads, int qkv_bias);
/* The keys and values that cross-attention layers compute from one
 * context (the prompt's embeddings): every step of an upscale would
 * compute the same ones, so the pipeline keeps them for the whole loop.
 * One cache serves one context; its tensors live until sdx4_kv_cache_free. */
typedef struct kv_cache kv_cache;
kv_cache *sdx4_kv_cache_new(void); /* NULL with the error set */
void sdx4_kv_cache_free(kv_cache *c);

/* x [B, T, C]; context [B, S, Cc], or NULL for self-attention; kv: the
 * context's cache, or NULL to compute keys and values on every call;
 * residual: added to the output (the output projection's linear_add_forward),
 * or NULL. */
tensor *sdx4_attention_forward(backend *be, const attention_p *a, const tensor *x, const tensor *context,
                     kv_cache *kv, const tensor *residual);

/* Transformer2DModel with use_linear_projection and BasicTransformerBlocks
 * (layer norms, attn1 (cross when only_cross_attention), attn2 (cross),
 * GEGLU feed-forward). Residual included: returns x + transformer(x). */
typedef struct {
    norm_p ln1, ln2, ln3;
    attention_p attn1, attn2;
    linear_p ff_in, ff_out; /* ff.net.0.proj [2*inner, dim], ff.net.2 */
} transformer_block_p;

typedef struct {
    int channels, groups, nblocks, only_cross_attention;
    norm_p norm;
    linear_p proj_in, proj_out;
    transformer_block_p *blocks;
} transformer2d_p;

int sdx4_transformer2d_load(weight_source *ws, transformer2d_p *t, const char *name, int channels,
                       int heads, int context_dim, int nblocks, int groups,
                       int only_cross_attention);
void sdx4_transformer2d_free(transformer2d_p *t);
tensor *sdx4_transformer2d_forward(backend *be, const transformer2d_p *t, const tensor *x,
                         const tensor *context, kv_cache *kv);

#endif
