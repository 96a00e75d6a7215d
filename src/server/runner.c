/*
 * runner.c - one upscale task from its options to its encoded image (see
 * runner.h): the engine's parameters from the request's, and the engine's
 * errors as problems. An invalid argument is a limit of this model that
 * the generic checks of form.c cannot know (e.g. a test model's few
 * noise-level classes): the client's to fix (422), not the server's (500).
 * Before encoding, the image is resized and cropped where the options ask
 * (AUTOMATIC1111's routes, a1111.c), so that a cluster's worker does it
 * as the single process does. The content check runs here too, on the
 * model's output before any resize, as diffusers checks the pipeline's
 * output: every task of every route and mode passes through it. Where the
 * request asks for metadata, the text is made here from the options and
 * the sizes after the resize, so that it describes the file it is in.
 */
#include "runner.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "imageio.h"
#include "infotext.h"
#include "log.h"
#include "metrics.h"

static sdx4_safety *content_checker; /* NULL: no content check */
static bool content_blackout;

int runner_content_check_open(const server_config *cfg, char *err, size_t errlen) {
    if (!cfg->safety_checker) return 0;
    sdx4_engine_options o;
    config_engine_options(cfg, cfg->safety_checker, &o);
    if (sdx4_safety_open(&o, &content_checker) != SDX4_OK) {
        snprintf(err, errlen, "the content checker %s could not be loaded: %s", cfg->safety_checker,
                 sdx4_last_error());
        return -1;
    }
    content_blackout = !strcmp(cfg->safety_action, "blackout");
    log_event(LOG_INFO, "content_check",
              json_pack("{s:s,s:s}", "checker", cfg->safety_checker, "action", cfg->safety_action));
    return 0;
}

const char *runner_content_check_policy(void) {
    return !content_checker ? "" : content_blackout ? "blackout" : "refuse";
}

void runner_content_check_close(void) {
    sdx4_safety_close(content_checker);
    content_checker = NULL;
}

/* A succeeded upscale's image through the content check: kept, blacked
 * out, or freed with the task failed. */
static void content_check(sdx4_image *image, task_outcome *out) {
    sdx4_safety_result r;
    if (sdx4_safety_check(content_checker, image, &r) != SDX4_OK) {
        problem_set(&out->error, PROBLEM_UPSCALE_FAILED, "the content check failed: %s", sdx4_last_error());
        log_event(LOG_ERROR, "content_check_failed", json_pack("{s:s}", "error", sdx4_last_error()));
        sdx4_image_free(image);
        out->state = JOB_FAILED;
        return;
    }
    metrics_content_check(r.flagged, r.seconds);
    if (!r.flagged) return;
    log_event(LOG_WARN, "content_flagged", json_pack("{s:s}", "action", content_blackout ? "blackout" : "refuse"));
    if (content_blackout) {
        memset(image->pixels, 0, (size_t)image->width * (size_t)image->height * 3);
        return;
    }
    sdx4_image_free(image);
    problem_set(&out->error, PROBLEM_CONTENT_FLAGGED,
                "the upscaled image was flagged by the server's content check and is not returned");
    out->state = JOB_FAILED;
}

void runner_params(const upscale_options *opts, sdx4_upscale_params *p) {
    sdx4_upscale_params_default(p);
    p->prompt = opts->prompt;
    p->negative_prompt = opts->negative_prompt;
    p->num_inference_steps = opts->steps;
    p->guidance_scale = (float)opts->guidance_scale;
    p->noise_level = (float)opts->noise_level;
    p->seed = opts->seed;
    p->eta = (float)opts->eta;
    p->scheduler = opts->scheduler;
    p->scheduler_options = opts->scheduler_options;
    p->vae_tiling = opts->vae_tiling;
    p->tile = opts->tile;
    p->tile_overlap = opts->tile_overlap;
}

bool runner_batchable(sdx4_engine *engine, const sdx4_image *a, const upscale_options *oa, const sdx4_image *b,
                      const upscale_options *ob) {
    sdx4_upscale_params pa, pb;
    runner_params(oa, &pa);
    runner_params(ob, &pb);
    return sdx4_batchable(engine, a->width, a->height, &pa, b->width, b->height, &pb);
}

int runner_batch_room(sdx4_engine *engine, const sdx4_image *input, const upscale_options *opts, int most) {
    if (most <= 1) return 1;
    sdx4_upscale_params p;
    runner_params(opts, &p);
    int fits = sdx4_batch_capacity(engine, input->width, input->height, &p);
    return fits < most ? fits : most;
}

/* The outcome of one upscale from the engine's status. */
static job_state outcome(sdx4_status st, task_outcome *out) {
    if (st == SDX4_OK) return out->state = JOB_SUCCEEDED;
    if (st == SDX4_ERR_CANCELED) return out->state = JOB_CANCELED;
    if (st == SDX4_ERR_INVALID_ARGUMENT)
        problem_set(&out->error, PROBLEM_MODEL_REFUSED, "the model refused the inputs: %s", sdx4_last_error());
    else
        problem_set(&out->error, PROBLEM_UPSCALE_FAILED, "the engine failed: %s: %s", sdx4_status_name(st),
                    sdx4_last_error());
    log_event(LOG_ERROR, "upscale_failed",
              json_pack("{s:s,s:s}", "status", sdx4_status_name(st), "error", sdx4_last_error()));
    return out->state = JOB_FAILED;
}

void runner_upscale_batch(sdx4_engine *engine, runner_item *items, int n, sdx4_progress_fn progress) {
    sdx4_image inputs[SDX4_MAX_BATCH] = {{0}}, images[SDX4_MAX_BATCH];
    sdx4_upscale_params p[SDX4_MAX_BATCH] = {{0}};
    sdx4_upscale_report reports[SDX4_MAX_BATCH] = {{0}}; /* stored with a failed job too (cluster.c) */
    sdx4_status statuses[SDX4_MAX_BATCH];
    for (int k = 0; k < n; k++) {
        runner_params(items[k].opts, &p[k]);
        p[k].progress = progress;
        p[k].progress_user = items[k].user;
        p[k].cancel = items[k].stop;
        inputs[k] = *items[k].input;
    }
    double t0 = mono_now();
    sdx4_upscale_batch(engine, n, inputs, p, images, reports, statuses);
    for (int k = 0; k < n; k++) {
        *items[k].image = images[k];
        items[k].out->report = reports[k];
        if (outcome(statuses[k], items[k].out) == JOB_SUCCEEDED && content_checker)
            content_check(items[k].image, items[k].out);
    }
    /* the device was theirs together: each pays its share, a stopped one too */
    double share = (mono_now() - t0) / n;
    for (int k = 0; k < n; k++) items[k].out->compute_seconds = share;
}

/* The resize and crop after the model (upscale_options, a1111.c): the
 * image resized, then its centre kept where the crop asks, as
 * AUTOMATIC1111 pastes the resized image centred on a canvas of the crop's
 * size (left = its width / 2 - the crop's / 2). A crop larger than the
 * image is refused: a1111.c makes the resized image cover it. */
static int fit(sdx4_image *image, const upscale_options *o, char *err, size_t errlen) {
    if (o->resize_width && (image->width != o->resize_width || image->height != o->resize_height)) {
        sdx4_image resized;
        if (imageio_resize(image, o->resize_width, o->resize_height, &resized, err, errlen)) return -1;
        sdx4_image_free(image);
        *image = resized;
    }
    if (!o->crop_width || (image->width == o->crop_width && image->height == o->crop_height)) return 0;
    if (o->crop_width > image->width || o->crop_height > image->height) {
        snprintf(err, errlen, "a crop of %dx%d from %dx%d", o->crop_width, o->crop_height, image->width,
                 image->height);
        return -1;
    }
    size_t row = (size_t)o->crop_width * 3;
    uint8_t *pixels = malloc(row * (size_t)o->crop_height);
    if (!pixels) return snprintf(err, errlen, "out of memory"), -1;
    int left = image->width / 2 - o->crop_width / 2, top = image->height / 2 - o->crop_height / 2;
    for (int y = 0; y < o->crop_height; y++)
        memcpy(pixels + row * (size_t)y, image->pixels + ((size_t)(top + y) * (size_t)image->width + (size_t)left) * 3,
               row);
    sdx4_image_free(image);
    *image = (sdx4_image){.width = o->crop_width, .height = o->crop_height, .pixels = pixels};
    return 0;
}

int runner_check_metadata(const upscale_options *opts, const char *model, bool gan, problem *p) {
    if (!opts->metadata || opts->format == IMAGE_PNG) return 0;
    sdx4_upscale_params params;
    runner_params(opts, &params);
    infotext_facts facts = {model, "0123456789", gan, 0, 0, 0, 0}; /* a hash's length, as written */
    /* UTF-16 takes at most 2 bytes per byte of UTF-8; "UNICODE\0" and the
     * IFDs 58 more */
    size_t text = infotext_bound(&params, &facts), exif = 58 + 2 * text;
    if (exif <= IMAGEIO_MAX_EXIF_BYTES) return 0;
    return problem_field(p, "metadata", "false, or with output_format png",
                         "the parameters (up to %zu bytes of text) may not fit a %s's EXIF (%d bytes): ask for "
                         "png, or send shorter prompts", text, imageio_format_name(opts->format),
                         IMAGEIO_MAX_EXIF_BYTES);
}

/* The file's metadata (opts->metadata): the text, malloc'd into *text. */
static int metadata(const sdx4_image *image, const upscale_options *opts, const runner_origin *origin,
                    imageio_metadata *meta, char **text) {
    sdx4_upscale_params p;
    runner_params(opts, &p);
    infotext_facts facts = {origin->model, origin->model_hash, origin->gan, origin->input_width,
                            origin->input_height, image->width, image->height};
    if (!(*text = infotext(&p, &facts))) return -1;
    infotext_metadata(*text, origin->gan, origin->icc, origin->icc_len, meta);
    return 0;
}

void runner_encode(sdx4_image *image, const upscale_options *opts, const runner_origin *origin,
                   task_outcome *out) {
    char err[256];
    imageio_metadata meta;
    char *text = NULL;
    if (fit(image, opts, err, sizeof err)) {
        out->state = JOB_FAILED;
        problem_set(&out->error, PROBLEM_INTERNAL, "resizing the result failed: %s", err);
    } else if (opts->metadata && metadata(image, opts, origin, &meta, &text)) {
        out->state = JOB_FAILED;
        problem_set(&out->error, PROBLEM_INTERNAL, "out of memory for the result's metadata");
    } else if (imageio_encode_metadata(image, opts->format, opts->quality, opts->metadata ? &meta : NULL,
                                       &out->output, &out->len, err, sizeof err) == 0) {
        out->state = JOB_SUCCEEDED;
        out->width = image->width;
        out->height = image->height;
    } else {
        out->state = JOB_FAILED;
        problem_set(&out->error, PROBLEM_INTERNAL, "encoding the result failed: %s", err);
    }
    free(text);
    sdx4_image_free(image);
}
