/*
 * safety_checker.h - diffusers' StableDiffusionSafetyChecker (CompVis/
 * stable-diffusion-safety-checker): CLIP's vision tower, a projection,
 * and cosine distances to 17 concept and 3 special-care embeddings, each
 * with its threshold. What the engine's content check (sdx4_safety_*)
 * runs; safety_checker.c says how.
 */
#ifndef SDX4_SAFETY_CHECKER_H
#define SDX4_SAFETY_CHECKER_H

#include "model/text_encoder.h"
#include "sdx4.h"

/* diffusers hard-codes both counts (nn.Parameter(torch.ones(17, ...))). */
#define SAFETY_CONCEPTS SDX4_SAFETY_CONCEPTS
#define SAFETY_SPECIAL SDX4_SAFETY_SPECIAL

typedef struct {
    /* preprocessor_config.json: CLIPImageProcessor */
    int shortest_edge;  /* size: the shorter side is resized to this (Pillow bicubic) */
    int crop;           /* crop_size: the centre square kept; = image_size */
    float mean[3], std[3];

    /* config.json: vision_config (CLIPVisionConfig) and projection_dim */
    int hidden, intermediate, layers, heads, image_size, patch, projection;
    int grid, tokens;   /* image_size / patch; grid^2 + 1 (the class token) */
    activation act;
    float eps;

    weight_source ws;
    tensor *patch_embedding;     /* [hidden, 3, patch, patch], no bias */
    float *class_pos;            /* host [tokens, hidden]: position_embedding, plus
                                    class_embedding in row 0 */
    norm_p pre_ln, post_ln;      /* pre_layrnorm, post_layernorm */
    clip_layer *layer;           /* [layers] */
    linear_p visual_projection;  /* [projection, hidden], no bias */
    float *concept_embeds;       /* host [17, projection], each row normalised */
    float *special_embeds;       /* host [3, projection], each row normalised */
    float concept_thresholds[SAFETY_CONCEPTS]; /* concept_embeds_weights */
    float special_thresholds[SAFETY_SPECIAL];  /* special_care_embeds_weights */
} safety_checker;

/* Reads dir's config.json and preprocessor_config.json (refusing by name
 * what it does not implement) and model.safetensors. */
int sdx4_safety_checker_load(safety_checker *sc, backend *be, const char *dir);
void sdx4_safety_checker_free(safety_checker *sc);

/* CLIPImageProcessor on an RGB8 image: shorter side to shortest_edge with
 * Pillow's bicubic (the longer int(edge * long / short)), centre crop,
 * * (1/255) in double rounded to float, (x - mean) / std in float. out:
 * [3, crop, crop]. */
int sdx4_safety_preprocess(const safety_checker *sc, const sdx4_image *in, float *out);

/* The vision tower and the projection on pixel values [n, 3, S, S]:
 * pooled [n, hidden] (post_layernorm of the class token; may be NULL) and
 * image_embeds [n, projection]. */
int sdx4_safety_embed(const safety_checker *sc, backend *be, const float *pixels, int n, float *pooled,
                      float *image_embeds);

/* cosine_distance() of one image's embeds to the concepts, then the
 * decision of diffusers' forward, with its arithmetic: scores in float32
 * (numpy's), rounded to 3 decimals, > 0 flags; a special score > 0 adds
 * 0.01 to the scores that follow it. */
void sdx4_safety_decide(const safety_checker *sc, const float *image_embeds, sdx4_safety_result *r);

#endif
