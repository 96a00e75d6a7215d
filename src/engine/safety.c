/*
 * safety.c - the content check of include/sdx4.h (sdx4_safety_*) on top of
 * model/safety_checker.c.
 *
 * A checker is its own backend plus the loaded model, opened from the
 * same options as an engine, so that it runs on the engine's device
 * without sharing its state: a server holds one beside its models and
 * checks every output with it. Each check owns its activations (one
 * image, 3 x 224 x 224 in), so checks may run concurrently.
 */
#include <stdlib.h>

#include "backend/backend.h"
#include "core/clock.h"
#include "core/error.h"
#include "engine_internal.h"
#include "model/safety_checker.h"
#include "sdx4.h"

struct sdx4_safety {
    backend *be;
    safety_checker sc;
};

sdx4_status sdx4_safety_open(const sdx4_engine_options *o, sdx4_safety **out) {
    sdx4_error_clear();
    *out = NULL;
    sdx4_safety *s = calloc(1, sizeof *s);
    if (!s) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        return SDX4_ERR_NO_MEMORY;
    }
    if (!(s->be = sdx4_backend_open(o, "content checker"))) goto fail;
    if (sdx4_safety_checker_load(&s->sc, s->be, o->model_dir)) {
        sdx4_error_prefix("%s", o->model_dir);
        goto fail;
    }
    *out = s;
    return SDX4_OK;
fail:;
    sdx4_status st = sdx4_error_status() ? sdx4_error_status() : SDX4_ERR_MODEL;
    if (s->be) s->be->destroy(s->be);
    free(s);
    return st;
}

void sdx4_safety_close(sdx4_safety *s) {
    if (!s) return;
    sdx4_safety_checker_free(&s->sc);
    s->be->destroy(s->be);
    free(s);
}

sdx4_status sdx4_safety_check(sdx4_safety *s, const sdx4_image *image, sdx4_safety_result *r) {
    sdx4_error_clear();
    if (!s || !r) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "content check: no checker or result");
        return SDX4_ERR_INVALID_ARGUMENT;
    }
    double t0 = mono_seconds();
    int S = s->sc.image_size;
    float *pixels = malloc((size_t)3 * S * S * sizeof *pixels);
    float *embeds = malloc((size_t)s->sc.projection * sizeof *embeds);
    sdx4_status st = SDX4_OK;
    if (!pixels || !embeds) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "content check: out of memory");
        st = SDX4_ERR_NO_MEMORY;
    } else if (sdx4_safety_preprocess(&s->sc, image, pixels) ||
               sdx4_safety_embed(&s->sc, s->be, pixels, 1, NULL, embeds)) {
        st = sdx4_error_status() ? sdx4_error_status() : SDX4_ERR_DEVICE;
    } else {
        sdx4_safety_decide(&s->sc, embeds, r);
        r->seconds = mono_seconds() - t0;
    }
    free(pixels);
    free(embeds);
    return st;
}
