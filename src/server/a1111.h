/*
 * a1111.h - AUTOMATIC1111's web UI API, the part an upscaler serves:
 * GET /sdapi/v1/upscalers, POST /sdapi/v1/extra-single-image and
 * /sdapi/v1/extra-batch-images, so that clients of that API work against
 * sdx4 unchanged.
 *
 * These routes are another encoding of the native upscale, not another
 * path: http.c takes their requests through the same checks (API keys,
 * rate limit, body size, upload budget), the same form (images and model
 * into an upscale_form, here instead of form_parse_json), the same image
 * checks, queue, admission and deadlines, and answers with the same
 * problems; only the JSON in and out differ. What A1111 does after the
 * upscaler, resizing its output to the factor or size asked, becomes the
 * task's resize (upscale_options), done where the result is encoded.
 */
#ifndef SDX4_SERVER_A1111_H
#define SDX4_SERVER_A1111_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "form.h"
#include "jobs.h"
#include "problem.h"

/* The size A1111 is asked for (ExtrasBaseRequest). */
typedef struct {
    int resize_mode;  /* 0: upscaling_resize times the input; 1: to width x height */
    double factor;    /* upscaling_resize, (0, 8] */
    int width, height; /* upscaling_resize_w, _h */
    bool crop;        /* upscaling_crop: mode 1 keeps the centre width x height */
} a1111_request;

/* A1111's defaults: by a factor of 2 (512 x 512 and cropped in mode 1). */
void a1111_init(a1111_request *a);

/* A JSON body of extra-single-image (f->kind FORM_UPSCALE) or
 * extra-batch-images (FORM_BATCH) into the form (images, f->model) and
 * `a`. Fields sdx4 cannot honour (face restoration, a second upscaler
 * blended in) and unknown fields are refused by name. -1 with f->error
 * set on the first problem. */
int a1111_parse(upscale_form *f, a1111_request *a, const char *body, size_t len);

/* The resize of an image of width x height into o (resize_*, crop_*):
 * A1111's target size, left out where it is the output of a model of
 * `scale` (0: unknown) as it is. Each side of the resized image must be
 * from 1 to 8 x max_side (at most 16384), else -1 with p naming the field
 * that asked for it. */
int a1111_size(const a1111_request *a, int width, int height, int scale, int max_side, upscale_options *o,
               problem *p);

/* GET /sdapi/v1/upscalers from GET /api/v1/models' document: one UpscalerItem
 * {name, model_name, model_path, model_url, scale} per model. */
json_t *a1111_upscalers(const json_t *models);

/* The answer of a finished job: {html_info, image} (FORM_UPSCALE) or
 * {html_info, images} (FORM_BATCH), `upscaler` the model's name. NULL with
 * p set when the job or one of its images failed: A1111's answers have no
 * place for an image's error, so the first one answers for the request. */
json_t *a1111_answer(const a1111_request *a, const char *upscaler, job *j, problem *p);

#endif
