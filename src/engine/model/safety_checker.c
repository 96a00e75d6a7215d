/*
 * safety_checker.c - StableDiffusionSafetyChecker, as diffusers runs it.
 *
 * Three parts, each a mirror of its Python:
 *
 *   CLIPImageProcessor (transformers 4's, the Pillow one that diffusers'
 *   pipelines were written against): the shorter side resized to
 *   shortest_edge with Pillow's bicubic (image_processor.c's, bit for bit),
 *   the longer to int(edge * long / short); the centre crop_size square
 *   (offsets (side - crop) // 2); x * (1/255) in double, rounded to float;
 *   (x - mean) / std in float.
 *
 *   CLIPVisionModel's pooled output, then visual_projection:
 *     x = cat(class_embedding, patch_embedding(pixels) as tokens) + position_embedding
 *     x = pre_layrnorm(x); x = encoder(x)      (text_encoder.c's layers, no mask)
 *     image_embeds = visual_projection(post_layernorm(x[:, 0]))
 *   on the backend, so it runs wherever the engine does. The class token
 *   is joined to the patches on the host: the patch tokens come down
 *   (257 x 1024 floats for ViT-L/14), the class and position embeddings
 *   (kept on the host for this) are added in PyTorch's order, and the sum
 *   goes back up; the backend needs no concatenation along tokens for
 *   it. post_layernorm and the projection run on every token (the
 *   backend has no row slice either; it costs 0.5% of the tower) and
 *   the class token's row is read back.
 *
 *   forward()'s decision on the host: cosine_distance to the normalised
 *   concept and special-care embeddings, then per concept
 *   round(cos - threshold + adjustment, 3) > 0, in numpy's float32;
 *   adjustment starts at 0 and becomes 0.01 once a special-care score is
 *   above 0 (for the special concepts after it too, as diffusers' loop
 *   has it). diffusers also has forward_onnx, which applies the
 *   adjustment to the concepts only and does not round: pipelines call
 *   forward.
 *
 * Weight names: transformers 4 saved the tower as
 * "vision_model.vision_model.*" (CompVis's file), transformers 5 as
 * "vision_model.*"; both load. Other tensors in the file (position_ids,
 * a text model) are not read.
 */
#include "model/safety_checker.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/config.h"
#include "core/error.h"
#include "model/image_processor.h"

#define MODEL_ERROR(...) (sdx4_set_error(SDX4_ERR_MODEL, __VA_ARGS__), -1)

/* ---------------------------------------------------------------- configs */

/* An int given as N or as {key: N} (transformers' old and new forms of
 * size and crop_size). */
static int int_or_dict(const config *c, const char *key, const char *inner, const char *inner2, int *out) {
    json_t *v = json_object_get(c->root, key);
    if (json_is_integer(v)) {
        *out = (int)json_integer_value(v);
    } else if (json_is_object(v) && json_is_integer(json_object_get(v, inner)) &&
               (!inner2 || json_equal(json_object_get(v, inner), json_object_get(v, inner2)))) {
        *out = (int)json_integer_value(json_object_get(v, inner));
    } else {
        return MODEL_ERROR("%s: %s must be an integer or {\"%s\": N%s}", c->label, key, inner,
                           inner2 ? " with equal sides" : "");
    }
    if (*out < 1 || *out > 4096) return MODEL_ERROR("%s: %s=%d is outside 1..4096", c->label, key, *out);
    return 0;
}

static int float3(const config *c, const char *key, float *out) {
    json_t *v = json_object_get(c->root, key);
    if (!json_is_array(v) || json_array_size(v) != 3)
        return MODEL_ERROR("%s: %s must be a list of 3 numbers (R, G, B)", c->label, key);
    for (int i = 0; i < 3; i++) {
        json_t *x = json_array_get(v, i);
        if (!json_is_number(x)) return MODEL_ERROR("%s: %s[%d] is not a number", c->label, key, i);
        out[i] = (float)json_number_value(x);
    }
    return 0;
}

static int read_preprocessor(safety_checker *sc, const char *dir) {
    config c;
    if (sdx4_cfg_load(&c, dir, "preprocessor_config.json")) return -1;
    int resample, rc = -1;
    double rescale;
    /* what CLIPImageProcessor does by default is all the engine does */
    if (sdx4_cfg_expect_bool(&c, "do_resize", 1) || sdx4_cfg_expect_bool(&c, "do_center_crop", 1) ||
        sdx4_cfg_expect_bool(&c, "do_rescale", 1) || sdx4_cfg_expect_bool(&c, "do_normalize", 1) ||
        sdx4_cfg_expect_bool(&c, "do_convert_rgb", 1) || sdx4_cfg_int(&c, "resample", 3, &resample) ||
        sdx4_cfg_float(&c, "rescale_factor", 1 / 255.0, &rescale))
        goto out;
    if (resample != 3) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: resample=%d is not supported (3, bicubic)", c.label, resample);
        goto out;
    }
    if (rescale != 1 / 255.0) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: rescale_factor=%g is not supported (1/255)", c.label, rescale);
        goto out;
    }
    if (int_or_dict(&c, "size", "shortest_edge", NULL, &sc->shortest_edge) ||
        int_or_dict(&c, "crop_size", "height", "width", &sc->crop) || float3(&c, "image_mean", sc->mean) ||
        float3(&c, "image_std", sc->std))
        goto out;
    for (int i = 0; i < 3; i++)
        if (!(sc->std[i] > 0)) {
            sdx4_set_error(SDX4_ERR_MODEL, "%s: image_std[%d]=%g must be above 0", c.label, i, sc->std[i]);
            goto out;
        }
    if (sc->crop > sc->shortest_edge) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: crop_size %d is larger than size %d (the crop would pad)", c.label, sc->crop,
                    sc->shortest_edge);
        goto out;
    }
    rc = 0;
out:
    sdx4_cfg_free(&c);
    return rc;
}

static int read_config(safety_checker *sc, const char *dir) {
    config c;
    if (sdx4_cfg_load(&c, dir, "config.json")) return -1;
    int rc = -1;
    const char *arch = NULL, *act;
    double eps;
    json_t *archs = json_object_get(c.root, "architectures");
    if (json_is_array(archs) && json_array_size(archs) > 0) arch = json_string_value(json_array_get(archs, 0));
    if (!arch || strcmp(arch, "StableDiffusionSafetyChecker")) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: architectures=%s is not supported (StableDiffusionSafetyChecker)", c.label,
                    arch ? arch : "(none)");
        goto out;
    }
    if (sdx4_cfg_int(&c, "projection_dim", 512, &sc->projection)) goto out;
    config v = {.root = json_object_get(c.root, "vision_config")};
    snprintf(v.label, sizeof v.label, "%s: vision_config", c.label);
    if (!json_is_object(v.root)) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: vision_config is missing", c.label);
        goto out;
    }
    /* CLIPVisionConfig's defaults */
    if (sdx4_cfg_int(&v, "hidden_size", 768, &sc->hidden) ||
        sdx4_cfg_int(&v, "intermediate_size", 3072, &sc->intermediate) ||
        sdx4_cfg_int(&v, "num_hidden_layers", 12, &sc->layers) ||
        sdx4_cfg_int(&v, "num_attention_heads", 12, &sc->heads) ||
        sdx4_cfg_int(&v, "image_size", 224, &sc->image_size) || sdx4_cfg_int(&v, "patch_size", 32, &sc->patch) ||
        sdx4_cfg_expect_int(&v, "num_channels", 3) || sdx4_cfg_float(&v, "layer_norm_eps", 1e-5, &eps) ||
        sdx4_cfg_str(&v, "hidden_act", "quick_gelu", &act))
        goto out;
    sc->eps = (float)eps;
    if (!strcmp(act, "quick_gelu")) sc->act = ACT_QUICK_GELU;
    else if (!strcmp(act, "gelu")) sc->act = ACT_GELU;
    else {
        sdx4_cfg_expect_str(&v, "hidden_act", "quick_gelu");
        goto out;
    }
    if (sc->hidden <= 0 || sc->hidden > 8192 || sc->heads <= 0 || sc->hidden % sc->heads || sc->layers <= 0 ||
        sc->layers > 1000 || sc->intermediate <= 0 || sc->intermediate > 65536 || sc->projection <= 0 ||
        sc->projection > 8192) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: inconsistent sizes (hidden_size %d, num_attention_heads %d, num_hidden_layers %d, "
                    "intermediate_size %d, projection_dim %d)",
                    v.label, sc->hidden, sc->heads, sc->layers, sc->intermediate, sc->projection);
        goto out;
    }
    if (sc->patch <= 0 || sc->image_size <= 0 || sc->image_size > 4096 || sc->image_size % sc->patch) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: image_size %d is not a multiple of patch_size %d", v.label, sc->image_size, sc->patch);
        goto out;
    }
    sc->grid = sc->image_size / sc->patch;
    sc->tokens = sc->grid * sc->grid + 1;
    rc = 0;
out:
    sdx4_cfg_free(&c);
    return rc;
}

/* ---------------------------------------------------------------- weights */

/* A tensor of the file as host floats, [n0] or [n0, n1] (n1 0). */
static float *host_tensor(weight_source *ws, const char *name, int64_t n0, int64_t n1) {
    char full[512];
    snprintf(full, sizeof full, "%s%s", ws->prefix, name);
    const st_tensor *t = sdx4_st_find(&ws->file, full);
    int ndim = n1 ? 2 : 1;
    if (!t) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: tensor %s is missing", ws->label, full);
        return NULL;
    }
    if (t->ndim != ndim || t->shape[0] != n0 || (n1 && t->shape[1] != n1)) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: tensor %s has %d dimensions, [%lld, ...], the config implies [%lld%s]",
                       ws->label, full, t->ndim, (long long)(t->ndim ? t->shape[0] : 0), (long long)n0,
                       n1 ? ", projection_dim" : "");
        return NULL;
    }
    if (!dtype_is_float(t->type)) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: tensor %s has dtype %s, expected F32, F16 or BF16", ws->label, full,
                       dtype_name(t->type));
        return NULL;
    }
    size_t n = (size_t)n0 * (size_t)(n1 ? n1 : 1);
    void *bytes = malloc(t->nbytes ? t->nbytes : 1);
    float *out = malloc(n * sizeof *out);
    if (!bytes || !out) {
        free(bytes), free(out);
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: tensor %s: out of memory", ws->label, full);
        return NULL;
    }
    if (sdx4_st_read(&ws->file, t, bytes)) {
        free(bytes), free(out);
        return NULL;
    }
    dtype_to_f32(t->type, bytes, out, n);
    free(bytes);
    return out;
}

/* F.normalize(rows, dim=1): each row over max(its norm, 1e-12). */
static void normalize_rows(float *x, int rows, int cols) {
    for (int r = 0; r < rows; r++) {
        double s = 0;
        for (int c = 0; c < cols; c++) s += (double)x[r * cols + c] * x[r * cols + c];
        float norm = fmaxf((float)sqrt(s), 1e-12f);
        for (int c = 0; c < cols; c++) x[r * cols + c] /= norm;
    }
}

static int load_weights(safety_checker *sc) {
    weight_source *ws = &sc->ws;
    int D = sc->hidden, P = sc->projection;
    ws->prefix = sdx4_weight_exists(ws, "vision_model.vision_model.post_layernorm.weight")
                     ? "vision_model.vision_model."
                     : "vision_model.";
    float *cls = NULL;
    if (!(sc->patch_embedding = W4(ws, D, 3, sc->patch, sc->patch, "embeddings.patch_embedding.weight")) ||
        !(cls = host_tensor(ws, "embeddings.class_embedding", D, 0)) ||
        !(sc->class_pos = host_tensor(ws, "embeddings.position_embedding.weight", sc->tokens, D))) {
        free(cls);
        return -1;
    }
    for (int i = 0; i < D; i++) sc->class_pos[i] = cls[i] + sc->class_pos[i]; /* cat(class, ...) + pos */
    free(cls);
    if (!(sc->layer = calloc(sc->layers, sizeof *sc->layer)))
        return sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory"), -1;
    if (sdx4_norm_load(ws, &sc->pre_ln, "pre_layrnorm", D) ||
        sdx4_clip_layers_load(ws, sc->layer, sc->layers, D, sc->intermediate) ||
        sdx4_norm_load(ws, &sc->post_ln, "post_layernorm", D))
        return -1;
    ws->prefix = "";
    if (sdx4_linear_load(ws, &sc->visual_projection, "visual_projection", D, P, 0) ||
        !(sc->concept_embeds = host_tensor(ws, "concept_embeds", SAFETY_CONCEPTS, P)) ||
        !(sc->special_embeds = host_tensor(ws, "special_care_embeds", SAFETY_SPECIAL, P)))
        return -1;
    float *cw = host_tensor(ws, "concept_embeds_weights", SAFETY_CONCEPTS, 0);
    float *sw = cw ? host_tensor(ws, "special_care_embeds_weights", SAFETY_SPECIAL, 0) : NULL;
    if (!cw || !sw) {
        free(cw);
        return -1;
    }
    memcpy(sc->concept_thresholds, cw, sizeof sc->concept_thresholds);
    memcpy(sc->special_thresholds, sw, sizeof sc->special_thresholds);
    free(cw), free(sw);
    normalize_rows(sc->concept_embeds, SAFETY_CONCEPTS, P);
    normalize_rows(sc->special_embeds, SAFETY_SPECIAL, P);
    return 0;
}

int sdx4_safety_checker_load(safety_checker *sc, backend *be, const char *dir) {
    memset(sc, 0, sizeof *sc);
    if (read_config(sc, dir) || read_preprocessor(sc, dir)) return -1;
    if (sc->crop != sc->image_size)
        return MODEL_ERROR("preprocessor_config.json: crop_size %d differs from config.json's image_size %d",
                           sc->crop, sc->image_size);
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (sdx4_weights_open_file(&sc->ws, be, path, "model.safetensors") || load_weights(sc)) {
        sdx4_safety_checker_free(sc);
        return -1;
    }
    sdx4_weights_finish(&sc->ws);
    return 0;
}

void sdx4_safety_checker_free(safety_checker *sc) {
    sdx4_weights_close(&sc->ws); /* the backend tensors are ones it served */
    free(sc->layer);
    free(sc->class_pos);
    free(sc->concept_embeds);
    free(sc->special_embeds);
    memset(sc, 0, sizeof *sc);
}

/* ---------------------------------------------------------- preprocessing */

/* The resize before the crop keeps the aspect ratio, so a long thin image
 * would become huge (1 x 8192 -> 224 x 1.8M): refused above this side,
 * which every upscale output (sides 8192 at most, ratio 32 at most with
 * the server's 64 px minimum) stays far below. */
#define SAFETY_MAX_RESIZED_SIDE 65536

int sdx4_safety_preprocess(const safety_checker *sc, const sdx4_image *in, float *out) {
    if (!in || !in->pixels || in->width <= 0 || in->height <= 0) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "content check: empty image");
        return -1;
    }
    /* get_resize_output_image_size(default_to_square=False) */
    int w = in->width, h = in->height, e = sc->shortest_edge;
    int short_side = w <= h ? w : h, long_side = w <= h ? h : w;
    double new_long_d = (double)e * long_side / short_side;
    if (new_long_d > SAFETY_MAX_RESIZED_SIDE) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                       "content check: a %dx%d image would be resized to %.0f px a side (at most %d): its "
                       "aspect ratio is too extreme",
                       w, h, new_long_d, SAFETY_MAX_RESIZED_SIDE);
        return -1;
    }
    int new_long = (int)new_long_d;
    int rw = w <= h ? e : new_long, rh = w <= h ? new_long : e;
    sdx4_image r = {0};
    if (sdx4_image_resize_bicubic(in, rw, rh, &r)) return -1;
    int top = (rh - sc->crop) / 2, left = (rw - sc->crop) / 2, S = sc->crop;
    const double rescale = 1 / 255.0;
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < S; y++)
            for (int x = 0; x < S; x++) {
                float v = (float)(r.pixels[((size_t)(top + y) * rw + left + x) * 3 + c] * rescale);
                out[((size_t)c * S + y) * S + x] = (v - sc->mean[c]) / sc->std[c];
            }
    sdx4_image_free(&r);
    return 0;
}

/* ----------------------------------------------------------------- forward */

int sdx4_safety_embed(const safety_checker *sc, backend *be, const float *pixels, int n, float *pooled,
                      float *image_embeds) {
    int S = sc->image_size, D = sc->hidden, T = sc->tokens, G = sc->grid * sc->grid, P = sc->projection;
    tensor *x = NULL, *p = NULL, *h = NULL;
    float *host = malloc((size_t)n * T * (size_t)(D > P ? D : P) * sizeof *host);
    if (!host) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "content check: out of memory");
        return -1;
    }
    /* patch_embedding(pixel_values).flatten(2).transpose(1, 2): [n, G, D] */
    TRY(x = be->new_tensor(be, 4, (const int64_t[]){n, 3, S, S}));
    if (be->upload(be, x, pixels)) goto fail;
    TRY(p = conv_forward(be, &(conv_p){.w = sc->patch_embedding, .stride = sc->patch}, x));
    DROP(x);
    TRY(p = as_tokens(be, p));
    if (be->download(be, p, host + (size_t)n * D)) goto fail; /* room for the class rows below */
    DROP(p);
    /* embeddings = cat(class_embedding, patches) + position_embedding: [n, T, D] */
    for (int b = 0; b < n; b++) {
        float *dst = host + (size_t)b * T * D;
        const float *src = host + (size_t)n * D + (size_t)b * G * D;
        memmove(dst + D, src, (size_t)G * D * sizeof *dst); /* b's patches move up by b + 1 rows */
        memcpy(dst, sc->class_pos, (size_t)D * sizeof *dst);
        for (int64_t i = D; i < (int64_t)T * D; i++) dst[i] += sc->class_pos[i];
    }
    TRY(x = be->new_tensor(be, 3, (const int64_t[]){n, T, D}));
    if (be->upload(be, x, host)) goto fail;
    /* pre_layrnorm, encoder */
    TRY(h = be->layer_norm(be, x, sc->pre_ln.g, sc->pre_ln.b, sc->eps));
    DROP(x);
    if (sdx4_clip_encoder_run(be, sc->layer, sc->layers, sc->heads, sc->act, sc->eps, 0, h)) goto fail;
    /* pooled = post_layernorm(x[:, 0]); image_embeds = visual_projection(pooled) */
    TRY(x = be->layer_norm(be, h, sc->post_ln.g, sc->post_ln.b, sc->eps));
    DROP(h);
    if (pooled) {
        if (be->download(be, x, host)) goto fail;
        for (int b = 0; b < n; b++) memcpy(pooled + (size_t)b * D, host + (size_t)b * T * D, D * sizeof *host);
    }
    TRY(p = linear_forward(be, &sc->visual_projection, x));
    DROP(x);
    if (be->download(be, p, host)) goto fail;
    DROP(p);
    for (int b = 0; b < n; b++) memcpy(image_embeds + (size_t)b * P, host + (size_t)b * T * P, P * sizeof *host);
    free(host);
    return 0;
fail:
    free(host);
    DROP(x), DROP(p), DROP(h);
    return -1;
}

/* numpy's round(x, 3) on a float32: x * 1000 in float, to even, / 1000. */
static float round3(float x) { return rintf(x * 1000.0f) / 1000.0f; }

void sdx4_safety_decide(const safety_checker *sc, const float *image_embeds, sdx4_safety_result *r) {
    int P = sc->projection;
    double s = 0;
    for (int i = 0; i < P; i++) s += (double)image_embeds[i] * image_embeds[i];
    float norm = fmaxf((float)sqrt(s), 1e-12f);
    for (int k = 0; k < SAFETY_CONCEPTS + SAFETY_SPECIAL; k++) {
        const float *e = k < SAFETY_SPECIAL ? sc->special_embeds + (size_t)k * P
                                            : sc->concept_embeds + (size_t)(k - SAFETY_SPECIAL) * P;
        double dot = 0;
        for (int i = 0; i < P; i++) dot += (double)(image_embeds[i] / norm) * e[i];
        if (k < SAFETY_SPECIAL) r->special_cos[k] = (float)dot;
        else r->concept_cos[k - SAFETY_SPECIAL] = (float)dot;
    }
    float adjustment = 0.0f;
    r->special_care = r->flagged = 0;
    for (int k = 0; k < SAFETY_SPECIAL; k++) {
        r->special_scores[k] = round3(r->special_cos[k] - sc->special_thresholds[k] + adjustment);
        if (r->special_scores[k] > 0) {
            r->special_care = 1;
            adjustment = 0.01f;
        }
    }
    for (int k = 0; k < SAFETY_CONCEPTS; k++) {
        r->concept_scores[k] = round3(r->concept_cos[k] - sc->concept_thresholds[k] + adjustment);
        if (r->concept_scores[k] > 0) r->flagged = 1;
    }
}
