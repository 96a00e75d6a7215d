/*
 * status.c - the health and model-info documents (see status.h).
 *
 * Health is cheap and never touches the engine or a lock held during
 * inference, so probes stay fast while every worker is busy. It reports
 * the phase (loading, warming, ready, draining, failed), the queue with
 * what each busy worker runs (by request id, which is no capability,
 * unlike a job id: health needs no key) and whether it is past its
 * deadline, and the demo-model flag. Model-info reads the engine's
 * sdx4_model_info, taken once at load, plus the limits and defaults
 * clients need to build a valid request, and the time estimator's
 * calibration.
 *
 * In cluster mode health also says whether Redis answers and which live
 * workers serve this node's model (by model id), from the dispatcher's
 * look once a second: a node is ready when Redis answers and one does.
 * An API-only node (no model of its own) answers model-info with the
 * model facts of the first such worker by name, its own limits and
 * defaults (it enforces them), and the list of them all.
 */
#include "status.h"

#include <string.h>

#include "cost.h"
#include "dispatch_redis.h"
#include "form.h"
#include "redis.h"
#include "queue.h"

static const char *const phase_names[] = {"loading", "warming", "ready", "draining", "failed"};

/* Cluster mode: the live workers serving this node's model, sorted by
 * name (a new array); *up whether Redis answered, `why` what failed. */
static json_t *serving_workers(server *srv, bool *up, char *why, size_t n) {
    json_t *all = NULL, *serving = json_array();
    *up = dispatch_redis_status(srv->cluster, &all, why, n);
    size_t i;
    json_t *w;
    json_array_foreach(all, i, w) {
        const char *model = json_string_value(json_object_get(w, "model_id"));
        if (!model || strcmp(model, srv->model_id) != 0) continue;
        const char *name = json_string_value(json_object_get(w, "name"));
        size_t at = 0;
        while (at < json_array_size(serving) &&
               strcmp(json_string_value(json_object_get(json_array_get(serving, at), "name")), name ? name : "") < 0)
            at++;
        json_array_insert(serving, at, w);
    }
    json_decref(all);
    return serving;
}

json_t *status_health(server *srv, int *status) {
    int phase = atomic_load(&srv->phase);
    *status = phase == PHASE_READY ? 200 : 503;
    dispatch_stats qs;
    dispatch_stats_get(&srv->dispatch, &qs);
    json_t *h = json_pack("{s:s,s:b,s:b,s:b,s:s,s:s,s:f,s:{s:i,s:i,s:i,s:i}}",
                          "status", phase_names[phase], "ready", phase == PHASE_READY,
                          "model_loaded", phase >= PHASE_WARMING && phase != PHASE_FAILED,
                          "warmed_up", phase == PHASE_READY || phase == PHASE_DRAINING,
                          "model", srv->model_id, "version", SDX4_VERSION,
                          "uptime_s", mono_now() - srv->started,
                          "queue", "depth", qs.depth, "capacity", qs.capacity,
                          "running", qs.running, "workers", qs.workers);
    queue_worker busy[MAX_WORKERS];
    int nbusy = srv->queue ? queue_get_workers(srv->queue, busy, 64) : 0;
    json_t *list = json_array();
    for (int i = 0; i < nbusy; i++)
        json_array_append_new(list, json_pack("{s:s,s:i,s:f,s:f,s:f}", "request_id", busy[i].request_id,
                                              "tasks", busy[i].tasks, "running_s", busy[i].seconds, "past_deadline_s",
                                              busy[i].past_deadline, "estimated_s", busy[i].estimate));
    json_object_set_new(h, "busy_workers", list);
    json_object_set_new(h, "demo_model", json_boolean(srv->demo));
    if (srv->demo) json_object_set_new(h, "note", json_string(DEMO_NOTE));
    if (phase == PHASE_FAILED) json_object_set_new(h, "error", json_string(srv->failure));
    if (srv->cluster) {
        bool up;
        char why[256];
        json_t *workers = serving_workers(srv, &up, why, sizeof why), *brief = json_array();
        size_t i;
        json_t *w;
        json_array_foreach(workers, i, w) /* model-info has the rest */
            json_array_append_new(brief, json_pack("{s:O?,s:O?,s:O?,s:O?}", "name", json_object_get(w, "name"),
                                                   "device", json_object_get(w, "device"), "busy",
                                                   json_object_get(w, "busy"), "started",
                                                   json_object_get(w, "started")));
        json_t *cluster = json_pack("{s:s,s:b,s:o}", "redis", redis_where(srv->redis), "redis_up", up,
                                    "workers", brief);
        if (!up) json_object_set_new(cluster, "error", json_string(why));
        json_object_set_new(h, "cluster", cluster);
        const char *problem = !up ? "Redis cannot be reached"
                              : json_array_size(workers) ? NULL
                                                         : "no live worker serves this model";
        json_decref(workers);
        if (problem && phase == PHASE_READY) {
            *status = 503;
            json_object_set_new(h, "status", json_string("unavailable"));
            json_object_set_new(h, "ready", json_false());
            json_object_set_new(h, "error", json_string(problem));
        }
    }
    return h;
}

/* What this node enforces, into model-info: the parameters (the engine's
 * table as this node narrows it), defaults, limits, formats. */
static void set_settings(const server *srv, json_t *m) {
    const server_config *c = &srv->cfg;
    form_limits form = {c->max_steps, c->max_prompt_chars, c->max_batch};
    json_t *parameters = form_parameters(&form), *p;
    json_t *defaults = json_object();
    size_t i;
    json_array_foreach(parameters, i, p) {
        json_t *d = json_object_get(p, "default");
        if (d) json_object_set(defaults, json_string_value(json_object_get(p, "name")), d);
    }
    json_object_set_new(defaults, "output_format", json_string("png"));
    json_object_set_new(defaults, "quality", json_integer(90));
    json_object_set_new(m, "upscale_parameters", parameters);
    json_object_set_new(m, "defaults", defaults);
    json_object_set_new(m, "limits",
                        json_pack("{s:I,s:i,s:i,s:i,s:i,s:i,s:f,s:f,s:i,s:i,s:f,s:i}",
                                  "max_upload_bytes", (json_int_t)c->max_upload, "min_side",
                                  c->min_side, "max_side", c->max_side, "max_steps", c->max_steps,
                                  "max_prompt_chars", c->max_prompt_chars, "max_batch", c->max_batch,
                                  "max_guidance_scale", sdx4_param_find("guidance_scale")->real_max,
                                  "request_timeout_s", c->request_timeout, "queue_size", c->queue_size,
                                  "workers", c->workers, "rate_window_s", c->rate_window,
                                  "rate_limit", c->rate_limit));
    json_object_set_new(m, "formats",
                        json_pack("{s:[s,s,s],s:[s,s,s]}", "input", "png", "jpeg", "webp",
                                  "output", "png", "jpeg", "webp"));
}

/* An API-only node: the first serving worker's model facts (NULL none). */
static json_t *served_model_info(server *srv) {
    bool up;
    char why[256];
    json_t *workers = serving_workers(srv, &up, why, sizeof why);
    json_t *m = json_deep_copy(json_object_get(json_array_get(workers, 0), "model"));
    if (!json_is_object(m)) {
        json_decref(m);
        json_decref(workers);
        return NULL;
    }
    json_object_set_new(m, "model_id", json_string(srv->model_id));
    set_settings(srv, m);
    json_object_set_new(m, "workers", workers);
    return m;
}

json_t *status_model_info(server *srv) {
    if (srv->cluster && !srv->engine) return served_model_info(srv);
    const sdx4_model_info *mi = &srv->info;
    const char *backend = strncmp(mi->device, "cuda", 4) == 0 ? "cuda" : "cpu";
    json_t *m = json_pack(
        "{s:s,s:b,s:{s:{s:I},s:{s:I},s:{s:I}},s:I,s:{s:s,s:s},s:s,s:s,s:i,s:i,s:i,s:I}",
        "model_id", srv->model_id, "demo_model", srv->demo,
        "components", "text_encoder", "parameters", (json_int_t)mi->text_encoder_params,
        "unet", "parameters", (json_int_t)mi->unet_params,
        "vae", "parameters", (json_int_t)mi->vae_params,
        "parameters_total", (json_int_t)(mi->text_encoder_params + mi->unet_params + mi->vae_params),
        "dtype", "compute", mi->compute_dtype, "weights", mi->weights_dtype,
        "backend", backend, "device", mi->device,
        "max_noise_level", mi->max_noise_level, "scale_factor", mi->vae_scale_factor,
        "max_prompt_tokens", mi->max_prompt_tokens,
        "device_memory_bytes", (json_int_t)mi->device_memory_bytes);
    if (srv->demo) json_object_set_new(m, "note", json_string(DEMO_NOTE));
    set_settings(srv, m);
    if (srv->cost) json_object_set_new(m, "cost", cost_document(srv->cost));
    return m;
}
