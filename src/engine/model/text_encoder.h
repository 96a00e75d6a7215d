/*
 * text_encoder.h - transformers' CLIPTextModel (what the pipeline uses of
 * it: the last hidden state, after the final layer norm).
 */
#ifndef SDX4_TEXT_ENCODER_H
#define SDX4_TEXT_ENCODER_H

#include "core/config.h"
#include "model/blocks.h"

typedef struct {
    norm_p ln1, ln2;
    linear_p q, k, v, out; /* self_attn.{q,k,v,out}_proj */
    linear_p fc1, fc2;     /* mlp */
} clip_layer;

typedef struct {
    int hidden, intermediate, layers, heads, max_positions, vocab;
    activation act; /* hidden_act: gelu or quick_gelu */
    float eps;
    tensor *token_embedding;    /* [vocab, hidden] */
    tensor *position_embedding; /* [max_positions, hidden] */
    clip_layer *layer;          /* [layers] */
    norm_p final_ln;
} text_encoder;

/* CLIP's encoder, which the text model and the vision tower of the
 * content check (model/safety_checker.h) share. Loads n layers named
 * "encoder.layers.<i>." (under ws's prefix) of width D, MLP width I. */
int sdx4_clip_layers_load(weight_source *ws, clip_layer *layer, int n, int D, int I);
/* For each layer, transformers' CLIPEncoderLayer on x [B, T, D] in place:
 *   x = x + self_attn(layer_norm1(x));  x = x + fc2(act(fc1(layer_norm2(x))))
 * causal: the text model's mask (the vision tower has none). */
int sdx4_clip_encoder_run(backend *be, const clip_layer *layer, int n, int heads, activation act, float eps,
                          int causal, tensor *x);

/* Reads text_encoder/config.json (cfg) and takes the weights from ws
 * (which may be in spec mode). */
int sdx4_text_encoder_load(text_encoder *te, weight_source *ws, const config *cfg);
void sdx4_text_encoder_free(text_encoder *te);
/* ids [batch, seq] -> last_hidden_state [batch, seq, hidden]. */
tensor *sdx4_text_encoder_forward(backend *be, const text_encoder *te, const int32_t *ids, int batch,
                        int seq);

#endif
