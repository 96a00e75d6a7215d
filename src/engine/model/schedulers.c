/*
 * schedulers.c - one interface over DDIM (scheduler.c), DDPM and PNDM
 * (scheduler_alpha.c), the sigma samplers (scheduler_sigma.c) and UniPC
 * (scheduler_unipc.c), and the
 * choice of one per run.
 *
 * DDIM is stateless and indexes by timestep; the sigma samplers and PNDM
 * keep a step index. The interface takes the step index i, which is what
 * diffusers' schedulers derive from timesteps[i] on a pipeline's first
 * step, and hands DDIM timesteps[i]. DDIM, DDPM and PNDM have
 * init_noise_sigma 1 and scale_model_input the identity, so the pipeline
 * treats all classes alike and their arithmetic is unchanged (x * 1.0f is
 * x).
 *
 * Choosing: the model's config text is parsed anew for every run (a few
 * hundred bytes), the class and the caller's options set over it, and
 * the scheduler built from the result. Options are checked against the
 * keys of the class's __init__ in diffusers: an unknown one is refused by
 * name, and a known one with a value the engine does not implement is
 * refused by the class's own reading of its config, also by name.
 */
#include "model/schedulers.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "sdx4.h"

#define CONFIG_FILE "scheduler/scheduler_config.json"

/* The noise schedule's keys, read by every class. */
#define NOISE_KEYS                                                                      \
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", \
        "rescale_betas_zero_snr", "prediction_type", "timestep_spacing", "steps_offset"

static const char *const ddim_keys[] = {NOISE_KEYS, "clip_sample", "clip_sample_range",
                                        "set_alpha_to_one", "thresholding",
                                        "dynamic_thresholding_ratio", "sample_max_value", NULL};
static const char *const ddpm_keys[] = {NOISE_KEYS, "variance_type", "clip_sample",
                                        "clip_sample_range", "thresholding",
                                        "dynamic_thresholding_ratio", "sample_max_value", NULL};
/* PNDM's __init__ has no rescale_betas_zero_snr */
static const char *const pndm_keys[] = {
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
    "prediction_type", "timestep_spacing", "steps_offset", "skip_prk_steps", "set_alpha_to_one",
    NULL};
static const char *const euler_keys[] = {
    NOISE_KEYS, "interpolation_type", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "sigma_min", "sigma_max", "timestep_type", "final_sigmas_type", NULL};
static const char *const euler_a_keys[] = {NOISE_KEYS, NULL};
static const char *const dpm_keys[] = {
    NOISE_KEYS, "solver_order", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
    "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "use_karras_sigmas",
    "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
    "flow_shift", "final_sigmas_type", "lambda_min_clipped", "variance_type",
    "use_dynamic_shifting", "time_shift_type", NULL};
/* neither has timestep_spacing, steps_offset or rescale_betas_zero_snr */
static const char *const dpm_single_keys[] = {
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
    "prediction_type", "solver_order", "thresholding", "dynamic_thresholding_ratio",
    "sample_max_value", "algorithm_type", "solver_type", "lower_order_final", "use_karras_sigmas",
    "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "flow_shift",
    "final_sigmas_type", "lambda_min_clipped", "variance_type", "use_dynamic_shifting",
    "time_shift_type", NULL};
static const char *const deis_keys[] = {
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
    "prediction_type", "timestep_spacing", "steps_offset", "solver_order", "thresholding",
    "dynamic_thresholding_ratio", "sample_max_value", "algorithm_type", "solver_type",
    "lower_order_final", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
    "use_flow_sigmas", "flow_shift", "use_dynamic_shifting", "time_shift_type", NULL};
/* Heun, KDPM2, KDPM2 ancestral and LMS: no rescale_betas_zero_snr */
#define K_KEYS                                                                                     \
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",             \
        "prediction_type", "timestep_spacing", "steps_offset", "use_karras_sigmas",                \
        "use_exponential_sigmas", "use_beta_sigmas"
static const char *const heun_keys[] = {K_KEYS, "clip_sample", "clip_sample_range", NULL};
static const char *const k_keys[] = {K_KEYS, NULL};
static const char *const unipc_keys[] = {
    NOISE_KEYS, "solver_order", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
    "predict_x0", "solver_type", "lower_order_final", "disable_corrector", "solver_p",
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas",
    "flow_shift", "final_sigmas_type", "use_dynamic_shifting", "time_shift_type", "sigma_min",
    "sigma_max", "shift_terminal", NULL};

static const struct {
    const char *alias, *class_name;
    const char *const *keys;
    scheduler_family family;
} classes[] = {
    {"ddim", "DDIMScheduler", ddim_keys, SCHED_DDIM},
    {"ddpm", "DDPMScheduler", ddpm_keys, SCHED_DDPM},
    {"pndm", "PNDMScheduler", pndm_keys, SCHED_PNDM},
    {"euler", "EulerDiscreteScheduler", euler_keys, SCHED_SIGMA},
    {"euler-a", "EulerAncestralDiscreteScheduler", euler_a_keys, SCHED_SIGMA},
    {"dpm++2m", "DPMSolverMultistepScheduler", dpm_keys, SCHED_SIGMA},
    {"heun", "HeunDiscreteScheduler", heun_keys, SCHED_SIGMA},
    {"dpm2", "KDPM2DiscreteScheduler", k_keys, SCHED_SIGMA},
    {"dpm2-a", "KDPM2AncestralDiscreteScheduler", k_keys, SCHED_SIGMA},
    {"lms", "LMSDiscreteScheduler", k_keys, SCHED_SIGMA},
    {"dpm++2s", "DPMSolverSinglestepScheduler", dpm_single_keys, SCHED_SIGMA},
    {"deis", "DEISMultistepScheduler", deis_keys, SCHED_SIGMA},
    {"unipc", "UniPCMultistepScheduler", unipc_keys, SCHED_UNIPC},
};
#define N_CLASSES (int)(sizeof classes / sizeof *classes)

static int find_class(const char *name) {
    for (int i = 0; name && i < N_CLASSES; i++)
        if (!strcmp(name, classes[i].alias) || !strcmp(name, classes[i].class_name)) return i;
    return -1;
}

const char *sdx4_scheduler_class(const char *name) {
    int i = find_class(name);
    return i < 0 ? NULL : classes[i].class_name;
}

int sdx4_unet_evaluations(const char *scheduler, int steps) {
    const char *cls = sdx4_scheduler_class(scheduler);
    sigma_method m;
    int second_order = cls && sdx4_k_is_method(cls, &m) && m != SIGMA_LMS;
    if (cls && !strcmp(cls, "PNDMScheduler")) return steps + 10; /* the Runge-Kutta warm-up's 9, and trailing's one */
    return second_order && steps > 0 ? 2 * steps - 1 : steps;
}

static int unknown_class(sdx4_status status, const char *what, const char *name) {
    char known[1024] = "";
    for (int i = 0; i < N_CLASSES; i++) {
        size_t used = strlen(known);
        snprintf(known + used, sizeof known - used, "%s%s (%s)", i ? ", " : "",
                 classes[i].class_name, classes[i].alias);
    }
    sdx4_set_error(status, "%s %s is not supported (supported: %s)", what, name, known);
    return -1;
}

static int is_set(const char *s) { return s && *s; }

int sdx4_scheduler_check_choice(const char *name, const char *options) {
    if (is_set(name) && find_class(name) < 0)
        return unknown_class(SDX4_ERR_INVALID_ARGUMENT, "scheduler", name);
    if (!is_set(options)) return 0;
    json_error_t err;
    json_t *o = json_loads(options, 0, &err);
    int ok = json_is_object(o);
    json_decref(o);
    if (!ok) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "scheduler_options: expected a JSON object%s%s",
                       o ? "" : ": ", o ? "" : err.text);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------ building */

int sdx4_scheduler_from_config(scheduler *s, const config *c) {
    memset(s, 0, sizeof *s);
    const char *name;
    if (sdx4_cfg_str(c, "_class_name", "", &name)) return -1;
    int k = find_class(name);
    if (k < 0 || strcmp(name, classes[k].class_name)) {
        char what[300];
        snprintf(what, sizeof what, "%s: _class_name", c->label);
        return unknown_class(SDX4_ERR_MODEL, what, name);
    }
    switch (s->family = classes[k].family) {
    case SCHED_DDIM: return sdx4_ddim_from_config(&s->ddim, c);
    case SCHED_SIGMA: return sdx4_sigma_from_config(&s->sigma, c);
    case SCHED_UNIPC: return sdx4_unipc_from_config(&s->unipc, c);
    case SCHED_DDPM: return sdx4_ddpm_sampler_from_config(&s->ddpm, c);
    case SCHED_PNDM: return sdx4_pndm_from_config(&s->pndm, c);
    }
    return -1;
}

/* Sets the caller's options over the config, refusing keys the class does
 * not read. */
static int apply_options(config *c, int k, const char *options) {
    json_error_t err;
    json_t *o = json_loads(options, 0, &err);
    if (!json_is_object(o)) {
        json_decref(o);
        return sdx4_scheduler_check_choice(NULL, options);
    }
    const char *key;
    json_t *value;
    int rc = 0;
    json_object_foreach(o, key, value) {
        int known = 0;
        for (int i = 0; classes[k].keys[i] && !known; i++) known = !strcmp(key, classes[k].keys[i]);
        if (!known) {
            sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                           "scheduler option %s is not a setting of %s", key,
                           classes[k].class_name);
            rc = -1;
            break;
        }
        json_object_set(c->root, key, value);
    }
    json_decref(o);
    return rc;
}

int sdx4_scheduler_create(scheduler *s, const scheduler_source *src, const char *name,
                          const char *options) {
    memset(s, 0, sizeof *s);
    if (sdx4_scheduler_check_choice(name, NULL)) return -1;
    config c;
    if (sdx4_cfg_parse(&c, src->json, strlen(src->json), CONFIG_FILE)) return -1;
    int chosen = is_set(name) || is_set(options), rc = -1;
    if (chosen) snprintf(c.label, sizeof c.label, "%s with the chosen scheduler", CONFIG_FILE);
    if (is_set(name)) json_object_set_new(c.root, "_class_name", json_string(sdx4_scheduler_class(name)));
    const char *class_name;
    if (sdx4_cfg_str(&c, "_class_name", "", &class_name)) goto done;
    int k = find_class(class_name);
    if (k < 0) { /* the model's own, checked at load: only a bad choice gets here */
        unknown_class(SDX4_ERR_INVALID_ARGUMENT, "scheduler", class_name);
        goto done;
    }
    if (is_set(options) && apply_options(&c, k, options)) goto done;
    rc = sdx4_scheduler_from_config(s, &c);
    if (rc && chosen && sdx4_error_status() == SDX4_ERR_MODEL) { /* the caller's values */
        char msg[512];
        snprintf(msg, sizeof msg, "%s", sdx4_last_error());
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "%s", msg);
    }
done:
    sdx4_cfg_free(&c);
    return rc;
}

/* The sigma schedule of the classes that have one (UniPC's inside it). */
static const sigma_scheduler *sigma_schedule(const scheduler *s) {
    return s->family == SCHED_UNIPC ? &s->unipc.sigma : s->family == SCHED_SIGMA ? &s->sigma : NULL;
}

void sdx4_scheduler_free(scheduler *s) {
    switch (s->family) {
    case SCHED_DDIM: sdx4_ddim_free(&s->ddim); break;
    case SCHED_SIGMA: sdx4_sigma_free(&s->sigma); break;
    case SCHED_UNIPC: sdx4_unipc_free(&s->unipc); break;
    case SCHED_DDPM: sdx4_ddpm_sampler_free(&s->ddpm); break;
    case SCHED_PNDM: sdx4_pndm_free(&s->pndm); break;
    }
    free(s->timesteps);
    free(s->ddim_noise);
    memset(s, 0, sizeof *s);
}

int sdx4_scheduler_source_load(scheduler_source *src, const char *model_dir) {
    memset(src, 0, sizeof *src);
    config c;
    scheduler s;
    if (sdx4_cfg_load(&c, model_dir, CONFIG_FILE)) return -1;
    int rc = sdx4_scheduler_from_config(&s, &c);
    if (rc == 0) {
        src->num_train_timesteps = s.family == SCHED_DDIM   ? s.ddim.num_train_timesteps
                                   : s.family == SCHED_DDPM ? s.ddpm.num_train_timesteps
                                   : s.family == SCHED_PNDM ? s.pndm.num_train_timesteps
                                                            : sigma_schedule(&s)->num_train_timesteps;
        sdx4_scheduler_free(&s);
        src->json = json_dumps(c.root, JSON_COMPACT);
        if (!src->json) {
            sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory", CONFIG_FILE);
            rc = -1;
        }
    }
    sdx4_cfg_free(&c);
    return rc;
}

void sdx4_scheduler_source_free(scheduler_source *src) {
    free(src->json);
    memset(src, 0, sizeof *src);
}

/* ----------------------------------------------------------- stepping */

int sdx4_scheduler_set_timesteps(scheduler *s, int n, size_t numel) {
    int count = 0;
    switch (s->family) {
    case SCHED_DDIM:
        if (sdx4_ddim_set_timesteps(&s->ddim, n)) return -1;
        count = s->ddim.num_timesteps;
        break;
    case SCHED_SIGMA:
        if (sdx4_sigma_set_timesteps(&s->sigma, n, numel)) return -1;
        count = s->sigma.num_timesteps;
        break;
    case SCHED_UNIPC:
        if (sdx4_unipc_set_timesteps(&s->unipc, n, numel)) return -1;
        count = s->unipc.sigma.num_timesteps;
        break;
    case SCHED_DDPM:
        if (sdx4_ddpm_sampler_set_timesteps(&s->ddpm, n, numel)) return -1;
        count = s->ddpm.num_timesteps;
        break;
    case SCHED_PNDM:
        if (sdx4_pndm_set_timesteps(&s->pndm, n, numel)) return -1;
        count = s->pndm.num_timesteps;
        break;
    }
    float *ts = malloc((size_t)count * sizeof *ts);
    if (!ts) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "set_timesteps(%d): out of memory", n);
        return -1;
    }
    for (int i = 0; i < count; i++)
        ts[i] = s->family == SCHED_DDIM   ? (float)s->ddim.timesteps[i]
                : s->family == SCHED_DDPM ? (float)s->ddpm.timesteps[i]
                : s->family == SCHED_PNDM ? (float)s->pndm.timesteps[i]
                                          : sigma_schedule(s)->timesteps[i];
    free(s->timesteps);
    s->timesteps = ts;
    s->num_timesteps = count;
    s->init_noise_sigma = sigma_schedule(s) ? sigma_schedule(s)->init_noise_sigma : 1.0f;
    s->order = s->family == SCHED_SIGMA && s->sigma.order ? s->sigma.order : 1;
    s->numel = numel;
    free(s->ddim_noise); /* sized for the run before */
    s->ddim_noise = NULL;
    return 0;
}

const float *sdx4_scheduler_sigmas(const scheduler *s) {
    const sigma_scheduler *g = sigma_schedule(s);
    return g ? g->sigmas : NULL;
}

float sdx4_scheduler_input_scale(const scheduler *s, int i) {
    return s->family == SCHED_SIGMA ? sdx4_sigma_input_scale(&s->sigma, i) : 1.0f;
}

int sdx4_scheduler_draws_noise(const scheduler *s, float eta) {
    switch (s->family) {
    case SCHED_DDIM: return eta > 0;
    case SCHED_DDPM: return 1;
    case SCHED_SIGMA: return sdx4_sigma_draws_noise(&s->sigma);
    case SCHED_PNDM:
    case SCHED_UNIPC: break;
    }
    return 0;
}

int sdx4_scheduler_step(scheduler *s, int i, const float *model_output, const float *sample,
                        float eta, torch_rng *rng, float *prev_sample) {
    if (i < 0 || i >= s->num_timesteps) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "scheduler step %d of %d", i, s->num_timesteps);
        return -1;
    }
    switch (s->family) {
    case SCHED_DDIM:
        if (eta > 0 && !s->ddim_noise && !(s->ddim_noise = malloc(s->numel * sizeof *s->ddim_noise))) {
            sdx4_set_error(SDX4_ERR_NO_MEMORY, "DDIM step: out of memory for %zu noise values", s->numel);
            return -1;
        }
        return sdx4_ddim_step(&s->ddim, model_output, s->ddim.timesteps[i], sample, s->numel, eta,
                              rng, s->ddim_noise, prev_sample);
    case SCHED_DDPM:
        return sdx4_ddpm_sampler_step(&s->ddpm, i, model_output, sample, rng, prev_sample);
    case SCHED_PNDM: return sdx4_pndm_step(&s->pndm, i, model_output, sample, prev_sample);
    case SCHED_UNIPC: return sdx4_unipc_step(&s->unipc, i, model_output, sample, prev_sample);
    case SCHED_SIGMA: break;
    }
    return sdx4_sigma_step(&s->sigma, i, model_output, sample, rng, prev_sample);
}
