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
 */
#include "status.h"

#include <string.h>

#include "cost.h"
#include "form.h"
#include "queue.h"

static const char *const phase_names[] = {"loading", "warming", "ready", "draining", "failed"};

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
        json_array_append_new(list, json_pack("{s:s,s:f,s:f,s:f}", "request_id", busy[i].request_id,
                                              "running_s", busy[i].seconds, "past_deadline_s",
                                              busy[i].past_deadline, "estimated_s", busy[i].estimate));
    json_object_set_new(h, "busy_workers", list);
    json_object_set_new(h, "demo_model", json_boolean(srv->demo));
    if (srv->demo) json_object_set_new(h, "note", json_string(DEMO_NOTE));
    if (phase == PHASE_FAILED) json_object_set_new(h, "error", json_string(srv->failure));
    return h;
}

json_t *status_model_info(server *srv) {
    const sdx4_model_info *mi = &srv->info;
    const server_config *c = &srv->cfg;
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
    json_object_set_new(m, "defaults",
                        json_pack("{s:s,s:s,s:f,s:i,s:f,s:f,s:s,s:i}", "prompt", "",
                                  "negative_prompt", "", "noise_level", DEFAULT_NOISE_LEVEL,
                                  "num_inference_steps", DEFAULT_STEPS, "guidance_scale",
                                  DEFAULT_GUIDANCE, "eta", DEFAULT_ETA, "output_format", "png",
                                  "quality", 90));
    json_object_set_new(m, "limits",
                        json_pack("{s:I,s:i,s:i,s:i,s:i,s:i,s:f,s:f,s:i,s:i,s:f,s:i}",
                                  "max_upload_bytes", (json_int_t)c->max_upload, "min_side",
                                  c->min_side, "max_side", c->max_side, "max_steps", c->max_steps,
                                  "max_prompt_chars", c->max_prompt_chars, "max_batch", c->max_batch,
                                  "max_guidance_scale", MAX_GUIDANCE, "request_timeout_s",
                                  c->request_timeout, "queue_size", c->queue_size, "workers",
                                  c->workers, "rate_window_s", c->rate_window,
                                  "rate_limit", c->rate_limit));
    if (srv->cost) json_object_set_new(m, "cost", cost_document(srv->cost));
    json_object_set_new(m, "formats",
                        json_pack("{s:[s,s,s],s:[s,s,s]}", "input", "png", "jpeg", "webp",
                                  "output", "png", "jpeg", "webp"));
    return m;
}
