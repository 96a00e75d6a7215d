/*
 * form.h - the inputs of an upscale request, from any encoding.
 *
 * One parser for the three ways parameters arrive: multipart/form-data
 * fields and query values (text, through form_set_text), JSON bodies
 * (typed, through form_parse_json), and image bytes (multipart file parts
 * streamed through form_image_*, or base64 / data URLs inside JSON). Each
 * field is checked as it arrives: the first problem is kept and names the
 * field and its allowed range. Nothing here touches the network, the
 * engine or an image decoder, so it can be fuzzed on its own
 * (fuzz/fuzz_request.c).
 */
#ifndef SDX4_SERVER_FORM_H
#define SDX4_SERVER_FORM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "imageio.h"
#include "problem.h"
#include "sdx4.h"

#define FORM_MAX_IMAGES 64

typedef struct {
    int max_steps, max_prompt_chars, max_batch;
    /* the names a request's `model` field may take (the server's models,
     * the first the default); none: the field is refused whatever it says */
    const char *const *models;
    int nmodels;
} form_limits;

/* Parameters of one upscale; `given` has bit (1 << field) for each field
 * the client set, the others hold defaults once resolved. */
typedef struct {
    char *prompt, *negative_prompt; /* valid UTF-8, no control characters */
    double noise_level;             /* 0..1 of the model's max noise level */
    int steps;
    double guidance_scale, eta;
    uint64_t seed;
    image_format format;
    int quality; /* 1..100, 0 = the encoder's default */
    /* NULL: the model's own; else a checked class name or alias, and a
     * JSON object with sorted keys (the engine's scheduler_options) */
    char *scheduler, *scheduler_options;
    char *vae_tiling; /* NULL: the engine's default (auto); else "off" or "on" */
    int tile, tile_overlap; /* the UNet's windows: 0 (untiled), or checked with the overlap */
    /* After the model (AUTOMATIC1111's routes, a1111.c; no field of the
     * native forms): its output resized to resize_width x resize_height
     * (imageio_resize), then its centre crop_width x crop_height kept.
     * 0 leaves the size as it is. */
    int resize_width, resize_height, crop_width, crop_height;
    /* The parameters (AUTOMATIC1111's text) and the input's ICC profile
     * written into the output (runner.c, imageio.h): off by default, as it
     * changes the output's bytes. */
    bool metadata;
    unsigned given;
} upscale_options;

typedef struct {
    void *data;
    size_t len, cap;
} form_blob;

typedef enum {
    FORM_UPSCALE, /* one image, answered with the image */
    FORM_JOB,     /* one image, as a job: webhook_url allowed */
    FORM_BATCH    /* several images, per-image fields "name[i]", async */
} form_kind;

typedef struct {
    form_limits limits;
    form_kind kind;
    bool batch; /* kind == FORM_BATCH */
    upscale_options shared;
    upscale_options *per; /* batch: per-image overrides, FORM_MAX_IMAGES */
    form_blob images[FORM_MAX_IMAGES];
    int nimages;
    char *webhook_url;
    bool async;
    int model;     /* the `model` field: an index into limits.models (0, the default, without it) */
    problem error; /* the first problem seen (kind PROBLEM_NONE if none) */
} upscale_form;

/* Field bits of upscale_options.given. */
enum {
    FIELD_PROMPT, FIELD_NEGATIVE_PROMPT, FIELD_NOISE_LEVEL, FIELD_STEPS,
    FIELD_GUIDANCE, FIELD_SEED, FIELD_ETA, FIELD_FORMAT, FIELD_QUALITY,
    FIELD_SCHEDULER, FIELD_SCHEDULER_OPTIONS, FIELD_VAE_TILING, FIELD_TILE, FIELD_TILE_OVERLAP,
    FIELD_METADATA, FIELD_OPTION_COUNT
};

int form_init(upscale_form *f, const form_limits *limits, form_kind kind);
void form_free(upscale_form *f);

/* A text value (multipart field or query argument); `name` may carry an
 * image index in a batch: "seed[2]". Returns -1 and sets f->error on the
 * first problem; later calls then do nothing. */
int form_set_text(upscale_form *f, const char *name, const char *value, size_t len);
/* The same for a value of which only the first `len` bytes were kept and
 * `more_chars` characters followed (multipart fields are not held whole
 * past the longest prompt): refused with its whole length. */
int form_set_cut_text(upscale_form *f, const char *name, const char *value, size_t len, size_t more_chars);

/* Streaming image parts: begin one per part, then append its bytes. */
int form_image_begin(upscale_form *f);
int form_image_append(upscale_form *f, const void *data, size_t len);

/* An image from JSON text: bare base64 or a base64 data URL
 * ("data:image/png;base64,..."); problems name it `field`. */
int form_image_base64(upscale_form *f, const char *field, const char *text, size_t len);

/* A whole JSON body. */
int form_parse_json(upscale_form *f, const char *body, size_t len);

/* After all the input: at least one image, and a webhook only where a job
 * will call it. */
int form_finish(upscale_form *f);

/* The options of image i: defaults, then shared values, then image i's. */
void form_resolve(const upscale_form *f, int i, upscale_options *out);
void options_free(upscale_options *o);

/* The text every output-changing parameter hashes through for the cache
 * (malloc'd). */
char *options_canonical(const upscale_options *o);

/* The engine's parameters as this server accepts them, for model-info:
 * [{name, type, description, minimum, maximum, default}], with JSON
 * Schema's type names, num_inference_steps within max-steps and the
 * prompts' max_length instead of a range. The seed has no default. */
json_t *form_parameters(const form_limits *limits);

/* The preferred output format in an Accept header: 0 and *format set (or
 * left alone when Accept is absent or accepts any image), -1 when it
 * accepts none of PNG, JPEG and WebP. */
int form_accept_format(const char *accept, image_format *format);

#endif
