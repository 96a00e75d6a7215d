/*
 * text_encoder.c - CLIPTextModel forward, as transformers' CLIPTextTransformer:
 *
 *   x = token_embedding(ids) + position_embedding(arange(seq))
 *   for each layer:  x = x + self_attn(layer_norm1(x), causal)
 *                    x = x + fc2(act(fc1(layer_norm2(x))))
 *   last_hidden_state = final_layer_norm(x)
 *
 * Checkpoints written by transformers < 5 prefix every name with
 * "text_model."; newer ones do not. Both load.
 */
#include "model/text_encoder.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

static int read_config(text_encoder *te, const config *cfg) {
    const char *act, *arch = NULL;
    double eps;
    json_t *archs = json_object_get(cfg->root, "architectures");
    if (json_is_array(archs) && json_array_size(archs) > 0)
        arch = json_string_value(json_array_get(archs, 0));
    if (arch && strcmp(arch, "CLIPTextModel") && strcmp(arch, "CLIPTextModelWithProjection")) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: architectures=%s is not supported", cfg->label, arch);
        return -1;
    }
    if (sdx4_cfg_int(cfg, "hidden_size", 512, &te->hidden) ||
        sdx4_cfg_int(cfg, "intermediate_size", 2048, &te->intermediate) ||
        sdx4_cfg_int(cfg, "num_hidden_layers", 12, &te->layers) ||
        sdx4_cfg_int(cfg, "num_attention_heads", 8, &te->heads) ||
        sdx4_cfg_int(cfg, "max_position_embeddings", 77, &te->max_positions) ||
        sdx4_cfg_int(cfg, "vocab_size", 49408, &te->vocab) ||
        sdx4_cfg_float(cfg, "layer_norm_eps", 1e-5, &eps) ||
        sdx4_cfg_str(cfg, "hidden_act", "quick_gelu", &act))
        return -1;
    te->eps = (float)eps;
    if (!strcmp(act, "gelu")) te->act = ACT_GELU;
    else if (!strcmp(act, "quick_gelu")) te->act = ACT_QUICK_GELU;
    else return sdx4_cfg_expect_str(cfg, "hidden_act", "gelu");
    if (te->hidden <= 0 || te->heads <= 0 || te->hidden % te->heads || te->layers <= 0 ||
        te->layers > 1000 || te->intermediate <= 0 || te->max_positions <= 0 || te->vocab <= 0) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: inconsistent sizes (hidden_size %d, heads %d, layers %d)",
                  cfg->label, te->hidden, te->heads, te->layers);
        return -1;
    }
    return 0;
}

/* The encoder's layers, shared with the vision tower of the content check
 * (model/safety_checker.c): "encoder.layers.<i>." under ws's prefix. */
int sdx4_clip_layers_load(weight_source *ws, clip_layer *layer, int n, int D, int I) {
    char name[128];
    for (int i = 0; i < n; i++) {
        clip_layer *l = &layer[i];
#define SUB(s) (snprintf(name, sizeof name, "encoder.layers.%d." s, i), name)
        if (sdx4_norm_load(ws, &l->ln1, SUB("layer_norm1"), D) ||
            sdx4_linear_load(ws, &l->q, SUB("self_attn.q_proj"), D, D, 1) ||
            sdx4_linear_load(ws, &l->k, SUB("self_attn.k_proj"), D, D, 1) ||
            sdx4_linear_load(ws, &l->v, SUB("self_attn.v_proj"), D, D, 1) ||
            sdx4_linear_load(ws, &l->out, SUB("self_attn.out_proj"), D, D, 1) ||
            sdx4_norm_load(ws, &l->ln2, SUB("layer_norm2"), D) ||
            sdx4_linear_load(ws, &l->fc1, SUB("mlp.fc1"), D, I, 1) ||
            sdx4_linear_load(ws, &l->fc2, SUB("mlp.fc2"), I, D, 1))
            return -1;
#undef SUB
    }
    return 0;
}

int sdx4_clip_encoder_run(backend *be, const clip_layer *layer, int n, int heads, activation act, float eps,
                          int causal, tensor *x) {
    tensor *h = NULL, *q = NULL, *k = NULL, *v = NULL, *a = NULL, *o = NULL;
    for (int i = 0; i < n; i++) {
        const clip_layer *l = &layer[i];
        /* x = x + self_attn(layer_norm1(x)) */
        TRY(h = be->layer_norm(be, x, l->ln1.g, l->ln1.b, eps));
        TRY(q = linear_forward(be, &l->q, h));
        TRY(k = linear_forward(be, &l->k, h));
        TRY(v = linear_forward(be, &l->v, h));
        TRY(a = be->attention(be, q, k, v, heads, causal));
        TRY(o = linear_forward(be, &l->out, a));
        if (be->add_inplace(be, x, o, 1.0f)) goto fail;
        DROP(h), DROP(q), DROP(k), DROP(v), DROP(a), DROP(o);
        /* x = x + fc2(act(fc1(layer_norm2(x)))) */
        TRY(h = be->layer_norm(be, x, l->ln2.g, l->ln2.b, eps));
        TRY(a = linear_forward(be, &l->fc1, h));
        TRY(o = be->activate(be, a, act));
        DROP(a);
        TRY(a = linear_forward(be, &l->fc2, o));
        if (be->add_inplace(be, x, a, 1.0f)) goto fail;
        DROP(h), DROP(a), DROP(o);
    }
    return 0;
fail:
    DROP(h), DROP(q), DROP(k), DROP(v), DROP(a), DROP(o);
    return -1;
}

int sdx4_text_encoder_load(text_encoder *te, weight_source *ws, const config *cfg) {
    memset(te, 0, sizeof *te);
    if (read_config(te, cfg)) return -1;
    ws->prefix = ws->spec || sdx4_weight_exists(ws, "text_model.final_layer_norm.weight") ? "text_model." : "";
    int D = te->hidden, I = te->intermediate;
    te->token_embedding = W2(ws, te->vocab, D, "embeddings.token_embedding.weight");
    te->position_embedding = W2(ws, te->max_positions, D, "embeddings.position_embedding.weight");
    if (!te->token_embedding || !te->position_embedding) return -1;
    te->layer = calloc(te->layers, sizeof *te->layer);
    if (!te->layer) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        return -1;
    }
    if (sdx4_clip_layers_load(ws, te->layer, te->layers, D, I)) return -1;
    return sdx4_norm_load(ws, &te->final_ln, "final_layer_norm", D);
}

void sdx4_text_encoder_free(text_encoder *te) {
    free(te->layer);
    te->layer = NULL;
}

static tensor *as_3d(tensor *t, int64_t a, int64_t b, int64_t c) {
    t->ndim = 3;
    t->shape[0] = a;
    t->shape[1] = b;
    t->shape[2] = c;
    return t;
}

tensor *sdx4_text_encoder_forward(backend *be, const text_encoder *te, const int32_t *ids, int batch,
                        int seq) {
    if (seq > te->max_positions) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "text encoder: %d tokens, at most %d", seq,
                  te->max_positions);
        return NULL;
    }
    for (int i = 0; i < batch * seq; i++)
        if (ids[i] < 0 || ids[i] >= te->vocab) {
            sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "text encoder: token id %d outside the vocabulary",
                      ids[i]);
            return NULL;
        }
    int32_t *pos = malloc(sizeof *pos * batch * seq);
    tensor *x = NULL, *p = NULL, *n = NULL;
    if (!pos) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        return NULL;
    }
    for (int i = 0; i < batch * seq; i++) pos[i] = i % seq;
    /* inputs_embeds + position_embeds */
    TRY(x = be->embedding(be, te->token_embedding, ids, batch * seq));
    TRY(p = be->embedding(be, te->position_embedding, pos, batch * seq));
    if (be->add_inplace(be, x, p, 1.0f)) goto fail;
    DROP(p);
    as_3d(x, batch, seq, te->hidden);
    if (sdx4_clip_encoder_run(be, te->layer, te->layers, te->heads, te->act, te->eps, 1, x)) goto fail;
    TRY(n = be->layer_norm(be, x, te->final_ln.g, te->final_ln.b, te->eps));
    DROP(x);
    free(pos);
    return n;
fail:
    free(pos);
    DROP(x), DROP(p), DROP(n);
    return NULL;
}
