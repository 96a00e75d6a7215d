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
 * Several models. Health lists each model and whether it is ready; the
 * model list (GET /api/v1/models) gives each one's kind, scale, size and
 * the upscale parameters that change its output; model-info describes one
 * model, the default unless a name is given. Model-info's limits,
 * defaults and parameter table are the server's, the same for every
 * model: a GAN accepts the diffusion parameters and ignores them.
 *
 * In cluster mode health also says whether Redis answers and which live
 * workers serve each of this node's models (by name, from their
 * registrations: cluster_worker_model), from the dispatcher's look once a
 * second: a node is ready when Redis answers and a live worker serves its
 * default model (or, with --ready-without-workers, while Redis answers:
 * workers that scale from zero are woken by the tasks waiting for them,
 * which must be able to reach the node). An API-only node (no model of its own) answers
 * model-info with the model facts of the first worker by name that
 * serves the model, its own limits and defaults (it enforces them), and
 * the list of those workers.
 */
#include "status.h"

#include <string.h>

#include "cluster.h"
#include "cost.h"
#include "dispatch_redis.h"
#include "form.h"
#include "models.h"
#include "queue.h"
#include "redis.h"

static const char *const phase_names[] = {"loading", "warming", "ready", "draining", "failed"};
static const char *const model_state_names[] = {"loading", "warming", "ready", "failed"};

/* Cluster mode: the live workers serving `model`, sorted by name (a new
 * array); *up whether Redis answered, `why` what failed. `all` (or NULL:
 * read here) is the dispatcher's list. */
static json_t *serving_workers(server *srv, const char *model, bool *up, char *why, size_t n) {
    json_t *all = NULL, *serving = json_array();
    *up = dispatch_redis_status(srv->cluster, &all, why, n);
    size_t i;
    json_t *w;
    json_array_foreach(all, i, w) {
        if (!cluster_worker_model(w, model)) continue;
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

/* Health's entry of each model: its name, whether it is the default, its
 * loading state (an API-only node: whether a live worker serves it). */
static json_t *health_models(server *srv, bool *default_served) {
    json_t *list = json_array();
    *default_served = true;
    for (int i = 0; i < srv->nmodels; i++) {
        served_model *m = &srv->models[i];
        json_t *e = json_pack("{s:s,s:b}", "name", m->name, "default", i == 0);
        if (srv->cluster && !srv->cfg.workers) {
            bool up;
            char why[256];
            json_t *workers = serving_workers(srv, m->name, &up, why, sizeof why);
            size_t live = json_array_size(workers);
            json_decref(workers);
            json_object_set_new(e, "status", json_string(live ? "ready" : "unavailable"));
            json_object_set_new(e, "workers", json_integer((json_int_t)live));
            if (i == 0) *default_served = live > 0;
        } else {
            int state = atomic_load(&m->state);
            json_object_set_new(e, "status", json_string(model_state_names[state]));
            model_version *v = state == MODEL_LOADING ? NULL : models_acquire(m);
            if (v) json_object_set_new(e, "kind", json_string(v->info.kind));
            models_release(v);
        }
        json_array_append_new(list, e);
    }
    return list;
}

static bool any_demo(const server *srv) {
    for (int i = 0; i < srv->nmodels; i++)
        if (srv->models[i].demo) return true;
    return false;
}

/* Whether outputs go through the content check (--safety-checker), and
 * what a flagged one gets. */
static json_t *content_check(const server_config *c) {
    if (!c->safety_checker) return json_pack("{s:b}", "enabled", false);
    return json_pack("{s:b,s:s}", "enabled", true, "action", c->safety_action);
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
                          "model", srv->models[0].name, "version", SDX4_VERSION,
                          "uptime_s", mono_now() - srv->started,
                          "queue", "depth", qs.depth, "capacity", qs.capacity,
                          "running", qs.running, "workers", qs.workers);
    bool default_served;
    json_object_set_new(h, "models", health_models(srv, &default_served));
    json_object_set_new(h, "content_check", content_check(&srv->cfg));
    queue_worker busy[MAX_WORKERS];
    int nbusy = srv->queue ? queue_get_workers(srv->queue, busy, 64) : 0;
    json_t *list = json_array();
    for (int i = 0; i < nbusy; i++)
        json_array_append_new(list, json_pack("{s:s,s:s,s:i,s:f,s:f,s:f}", "request_id", busy[i].request_id,
                                              "model", srv->models[busy[i].model].name, "tasks", busy[i].tasks,
                                              "running_s", busy[i].seconds, "past_deadline_s",
                                              busy[i].past_deadline, "estimated_s", busy[i].estimate));
    json_object_set_new(h, "busy_workers", list);
    bool demo = any_demo(srv);
    json_object_set_new(h, "demo_model", json_boolean(demo));
    if (demo) json_object_set_new(h, "note", json_string(DEMO_NOTE));
    if (phase == PHASE_FAILED) json_object_set_new(h, "error", json_string(srv->failure));
    if (srv->cluster) {
        bool up;
        char why[256];
        json_t *workers = serving_workers(srv, srv->models[0].name, &up, why, sizeof why), *brief = json_array();
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
        bool served = json_array_size(workers) && default_served;
        /* scale from zero: the tasks wait in Redis, and their queue is what
         * wakes the workers, so the node must stay in its Service */
        if (!served) json_object_set_new(cluster, "waiting_for_workers", json_true());
        const char *problem = !up                                               ? "Redis cannot be reached"
                              : served || srv->cfg.ready_without_workers ? NULL
                                                                                : "no live worker serves this model";
        json_decref(workers);
        if (problem && phase == PHASE_READY) {
            *status = 503;
            json_object_set_new(h, "status", json_string("unavailable"));
            json_object_set_new(h, "ready", json_false());
            json_object_set_new(h, "error", json_string(problem));
        }
    }
    bool drained = atomic_load(&srv->drained);
    json_object_set_new(h, "drained", json_boolean(drained));
    if (drained && phase == PHASE_READY) { /* the admin API's drain (admin.h): no new upscales */
        *status = 503;
        json_object_set_new(h, "status", json_string("drained"));
        json_object_set_new(h, "ready", json_false());
    }
    return h;
}

/* What this node enforces, into model-info: the parameters (the engine's
 * table as this node narrows it), defaults, limits, formats. */
static void set_settings(const server *srv, json_t *m) {
    const server_config *c = &srv->cfg;
    form_limits form = {c->max_steps, c->max_prompt_chars, c->max_batch, srv->model_names, srv->nmodels};
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
    json_object_set_new(m, "content_check", content_check(c));
}

/* An API-only node: the first serving worker's facts of the model (NULL
 * none). */
static json_t *served_model_info(server *srv, int model) {
    bool up;
    char why[256];
    const char *name = srv->models[model].name;
    json_t *workers = serving_workers(srv, name, &up, why, sizeof why);
    json_t *m = json_deep_copy(json_object_get(cluster_worker_model(json_array_get(workers, 0), name), "model"));
    if (!json_is_object(m)) {
        json_decref(m);
        json_decref(workers);
        return NULL;
    }
    json_object_set_new(m, "model_id", json_string(name));
    json_object_set_new(m, "default", json_boolean(model == 0));
    set_settings(srv, m);
    json_object_set_new(m, "workers", workers);
    return m;
}

/* The facts of a loaded model: model-info without this node's settings
 * (what a worker registers). A GAN has no components, noise levels nor
 * prompt tokens. */
static json_t *model_facts(const served_model *sm, const model_version *v, bool is_default) {
    const sdx4_model_info *mi = &v->info;
    const char *backend = strncmp(mi->device, "cuda", 4) == 0 ? "cuda" : "cpu";
    json_t *m = json_pack("{s:s,s:b,s:s,s:s,s:b,s:I,s:{s:s,s:s},s:s,s:s,s:i,s:I,s:o}", "model_id", sm->name,
                          "default", is_default, "kind", mi->kind, "architecture", mi->architecture, "demo_model",
                          v->demo, "parameters_total", (json_int_t)models_parameters(mi), "dtype", "compute",
                          mi->compute_dtype, "weights", mi->weights_dtype, "backend", backend, "device", mi->device,
                          "scale_factor", mi->vae_scale_factor, "device_memory_bytes",
                          (json_int_t)mi->device_memory_bytes, "applicable_parameters",
                          models_applicable_parameters(mi));
    if (strcmp(mi->kind, "gan") != 0) {
        json_object_set_new(m, "components",
                            json_pack("{s:{s:I},s:{s:I},s:{s:I}}", "text_encoder", "parameters",
                                      (json_int_t)mi->text_encoder_params, "unet", "parameters",
                                      (json_int_t)mi->unet_params, "vae", "parameters", (json_int_t)mi->vae_params));
        json_object_set_new(m, "max_noise_level", json_integer(mi->max_noise_level));
        json_object_set_new(m, "max_prompt_tokens", json_integer(mi->max_prompt_tokens));
    }
    if (v->demo) json_object_set_new(m, "note", json_string(DEMO_NOTE));
    json_object_set_new(m, "model_hash", json_string(v->hash));
    return m;
}

/* A reload under way, or the last one's failure (the admin API). */
static void set_reload(served_model *sm, json_t *doc) {
    pthread_mutex_lock(&sm->lock);
    if (atomic_load(&sm->reloading)) json_object_set_new(doc, "reloading", json_true());
    if (sm->reload_error[0]) json_object_set_new(doc, "reload_error", json_string(sm->reload_error));
    pthread_mutex_unlock(&sm->lock);
}

json_t *status_model_info(server *srv, int model) {
    served_model *sm = &srv->models[model];
    model_version *v = models_acquire(sm);
    if (!v) return srv->cluster ? served_model_info(srv, model) : NULL;
    json_t *m = model_facts(sm, v, model == 0);
    set_settings(srv, m);
    if (v->cost) json_object_set_new(m, "cost", cost_document(v->cost));
    models_release(v);
    set_reload(sm, m);
    return m;
}

json_t *status_models(server *srv) {
    json_t *list = json_array();
    for (int i = 0; i < srv->nmodels; i++) {
        served_model *m = &srv->models[i];
        json_t *e = NULL;
        model_version *v = models_acquire(m);
        if (v) {
            e = models_entry(m, v, i == 0);
            models_release(v);
            set_reload(m, e);
        } else { /* an API-only node: the facts a live worker registered */
            json_t *info = srv->cluster ? served_model_info(srv, i) : NULL;
            if (info) {
                e = json_pack("{s:s,s:O?,s:b,s:b,s:O?,s:O?,s:O?,s:O?,s:O?,s:O?}", "name", m->name, "model_hash",
                              json_object_get(info, "model_hash"), "default", i == 0,
                              "ready", true, "kind", json_object_get(info, "kind"), "architecture",
                              json_object_get(info, "architecture"), "scale", json_object_get(info, "scale_factor"),
                              "parameters", json_object_get(info, "parameters_total"), "dtype",
                              json_object_get(info, "dtype"), "applicable_parameters",
                              json_object_get(info, "applicable_parameters"));
                json_decref(info);
            } else {
                e = json_pack("{s:s,s:b,s:b}", "name", m->name, "default", i == 0, "ready", false);
            }
        }
        json_array_append_new(list, e);
    }
    return json_pack("{s:o}", "models", list);
}

json_t *status_registration(server *srv, const char *name) {
    served_model *first = &srv->models[0];
    json_t *models = json_object();
    for (int i = 0; i < srv->nmodels; i++)
        json_object_set_new(models, srv->models[i].name,
                            json_pack("{s:o}", "model", status_model_info(srv, i)));
    model_version *v = models_acquire(first); /* a worker registers once its models are loaded */
    json_t *doc = json_pack("{s:s,s:s,s:s,s:s?,s:o,s:o,s:f}", "name", name, "model_id", first->name, "device",
                            v->info.device, "variant", srv->cfg.variant, "model", status_model_info(srv, 0),
                            "models", models, "started", wall_now());
    models_release(v);
    return doc;
}
