/*
 * infotext.c - an upscale's parameters in AUTOMATIC1111's text form (see
 * infotext.h).
 *
 * The text is built in a memory stream, key by key, in A1111's order
 * (Steps, Sampler, CFG scale, Seed, Size, Model hash, Model, ...,
 * Version), with sdx4's own keys before Version. A key is written only
 * where it says something the request chose: the sampler and its options
 * when given (else the model's own ran), eta, VAE tiling and the UNet's
 * tile when not their defaults, so that the text reads as the request
 * that made the image, and sending its values back makes the same image.
 */
#include "infotext.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

/* A1111's infotext_utils.quote: a value with a comma, colon or newline
 * becomes a JSON string (ensure_ascii=False: UTF-8 stays as it is). */
static void put_value(FILE *f, const char *v) {
    if (!strpbrk(v, ",:\n")) {
        fputs(v, f);
        return;
    }
    json_t *s = json_string(v);
    char *quoted = s ? json_dumps(s, JSON_ENCODE_ANY) : NULL;
    fputs(quoted ? quoted : "\"\"", f);
    free(quoted);
    json_decref(s);
}

/* ", Key: value" (the first pair without its comma) */
static void pair(FILE *f, bool *first, const char *key, const char *value) {
    fprintf(f, "%s%s: ", *first ? "" : ", ", key);
    put_value(f, value);
    *first = false;
}

static void pair_fmt(FILE *f, bool *first, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void pair_fmt(FILE *f, bool *first, const char *key, const char *fmt, ...) {
    char value[128];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(value, sizeof value, fmt, ap);
    va_end(ap);
    pair(f, first, key, value);
}

/* What a diffusion model's and a GAN's texts share at their end. */
static void sizes_and_version(FILE *f, bool *first, const infotext_facts *x) {
    pair_fmt(f, first, "Input size", "%dx%d", x->input_width, x->input_height);
    pair(f, first, "Version", "sdx4 " SDX4_VERSION);
}

static void tiles(FILE *f, bool *first, const sdx4_upscale_params *p, bool gan) {
    if (p->tile <= 0) return; /* 0: automatic, the default */
    pair_fmt(f, first, "Tile", "%d", p->tile);
    if (!gan) pair_fmt(f, first, "Tile overlap", "%d", p->tile_overlap); /* a GAN's is its own */
}

/* "Model hash" as AUTOMATIC1111 writes it: the first 10 hex digits */
static void model_hash(FILE *f, bool *first, const char *digest) {
    pair_fmt(f, first, "Model hash", "%.10s", digest);
}

char *infotext(const sdx4_upscale_params *p, const infotext_facts *x) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) return NULL;
    bool first = true;
    if (x->gan) {
        pair_fmt(f, &first, "Postprocess upscale by", "%g", (double)x->output_width / x->input_width);
        pair(f, &first, "Postprocess upscaler", x->model);
        if (x->model_hash && *x->model_hash) model_hash(f, &first, x->model_hash);
        tiles(f, &first, p, true);
        pair_fmt(f, &first, "Size", "%dx%d", x->output_width, x->output_height);
        sizes_and_version(f, &first, x);
    } else {
        /* A1111: f"{prompt}{negative}\n{params}".strip() */
        const char *prompt = p->prompt ? p->prompt : "", *negative = p->negative_prompt;
        if (*prompt) fprintf(f, "%s\n", prompt);
        if (negative && *negative) fprintf(f, "Negative prompt: %s\n", negative);
        pair_fmt(f, &first, "Steps", "%d", p->num_inference_steps);
        if (p->scheduler && *p->scheduler) pair(f, &first, "Sampler", p->scheduler);
        if (p->scheduler_options) pair(f, &first, "Scheduler options", p->scheduler_options);
        pair_fmt(f, &first, "CFG scale", "%g", p->guidance_scale);
        pair_fmt(f, &first, "Seed", "%llu", (unsigned long long)p->seed);
        pair_fmt(f, &first, "Size", "%dx%d", x->output_width, x->output_height);
        if (x->model_hash && *x->model_hash) model_hash(f, &first, x->model_hash);
        pair(f, &first, "Model", x->model);
        pair_fmt(f, &first, "Noise level", "%g", p->noise_level);
        if (p->eta != (float)sdx4_param_find("eta")->real_default) pair_fmt(f, &first, "Eta", "%g", p->eta);
        if (p->vae_tiling) pair(f, &first, "VAE tiling", p->vae_tiling);
        tiles(f, &first, p, false);
        sizes_and_version(f, &first, x);
    }
    if (fclose(f)) {
        free(text);
        return NULL;
    }
    return text;
}

size_t infotext_bound(const sdx4_upscale_params *p, const infotext_facts *f) {
    /* the keys and numbers at their longest take under 512 bytes; a value
     * quoted as JSON is at most 6 times as long (\u00XX) with its quotes;
     * the prompts are written as they are, and only for a diffusion model */
    size_t n = 512;
    const char *quoted[] = {p->scheduler, p->scheduler_options, p->vae_tiling, f->model, f->model_hash};
    for (size_t i = 0; i < sizeof quoted / sizeof quoted[0]; i++)
        if (quoted[i]) n += 6 * strlen(quoted[i]) + 2;
    if (!f->gan && p->prompt) n += strlen(p->prompt);
    if (!f->gan && p->negative_prompt) n += strlen(p->negative_prompt);
    return n;
}

void infotext_metadata(const char *text, bool gan, const void *icc, size_t icc_len,
                       imageio_metadata *meta) {
    memset(meta, 0, sizeof *meta);
    if (text) {
        meta->texts[meta->ntexts++] = (imageio_text){gan ? "postprocessing" : "parameters", text};
        if (gan) meta->texts[meta->ntexts++] = (imageio_text){"extras", text};
    }
    meta->icc = icc;
    meta->icc_len = icc_len;
}
