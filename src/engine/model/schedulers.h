/*
 * schedulers.h - the scheduler interface the pipeline calls, over every
 * implemented class: set_timesteps, init_noise_sigma, scale_model_input
 * and step, as diffusers' schedulers have them.
 *
 * A model keeps its scheduler/scheduler_config.json (scheduler_source);
 * each run builds its own scheduler from it, as diffusers'
 * X.from_config(config, **options) does: the class is the caller's
 * choice (a diffusers class name or an alias) or the config's
 * _class_name, the options a JSON object whose keys override the
 * config's. A key the chosen class does not read is ignored when it
 * comes from the model's config (a DDIM config's clip_sample means
 * nothing to Euler, as in diffusers) but refused by name when a caller
 * sets it, so that a typo never passes silently.
 */
#ifndef SDX4_SCHEDULERS_H
#define SDX4_SCHEDULERS_H

#include <stddef.h>

#include "core/rng.h"
#include "model/scheduler.h"
#include "model/scheduler_alpha.h"
#include "model/scheduler_sigma.h"
#include "model/scheduler_unipc.h"

/* A model's scheduler config, validated at load. */
typedef struct {
    char *json;              /* the file's text */
    int num_train_timesteps; /* of the model's own scheduler */
} scheduler_source;

/* Reads and checks <model_dir>/scheduler/scheduler_config.json: its class
 * must be one the engine implements, with supported values. */
int sdx4_scheduler_source_load(scheduler_source *src, const char *model_dir);
void sdx4_scheduler_source_free(scheduler_source *src);

/* The diffusers class an alias or class name stands for (ddim, ddpm,
 * pndm, euler, euler-a, heun, dpm2, dpm2-a, lms, dpm++2m, dpm++2s, deis,
 * unipc, or the class name itself); NULL if none. */
const char *sdx4_scheduler_class(const char *name);

/* Checks a caller's choice without a model: a known name (or NULL) and
 * options that are NULL or a JSON object. */
int sdx4_scheduler_check_choice(const char *name, const char *options);

/* The implementation a class belongs to; one member of the scheduler
 * below is in use, the family's. */
typedef enum { SCHED_DDIM, SCHED_SIGMA, SCHED_UNIPC, SCHED_DDPM, SCHED_PNDM } scheduler_family;

typedef struct {
    scheduler_family family;
    ddim_scheduler ddim;
    sigma_scheduler sigma;
    unipc_scheduler unipc;
    ddpm_sampler ddpm;
    pndm_sampler pndm;
    /* set by sdx4_scheduler_set_timesteps() */
    int num_timesteps;
    float *timesteps; /* (num_timesteps): what the UNet is given */
    float init_noise_sigma;
    size_t numel;
    float *ddim_noise; /* (numel): DDIM's noise with eta > 0, from its first such step */
    int order; /* UNet evaluations per step of diffusers' progress (2 for
                  Heun and the KDPM2s): its pipeline calls back after
                  every order-th one and after the last */
} scheduler;

/* Builds a scheduler from the model's config with a caller's choice:
 * name and options may be NULL (the model's own). */
int sdx4_scheduler_create(scheduler *s, const scheduler_source *src, const char *name,
                          const char *options);
/* The same from a parsed config, by its _class_name. */
int sdx4_scheduler_from_config(scheduler *s, const config *c);
void sdx4_scheduler_free(scheduler *s);

/* set_timesteps(n) for samples of numel floats. */
int sdx4_scheduler_set_timesteps(scheduler *s, int n, size_t numel);

/* The sigmas after set_timesteps (num_timesteps + 1, the last one final),
 * for the classes that have them in diffusers; NULL for the others. */
const float *sdx4_scheduler_sigmas(const scheduler *s);

/* scale_model_input(sample, timesteps[i]) is sample / this scalar, element
 * by element in float as diffusers divides (1: the identity, DDIM's and
 * the DPM family's). A scalar rather than a pass over the latents: the
 * pipeline divides as it copies them into the UNet's input. */
float sdx4_scheduler_input_scale(const scheduler *s, int i);

/* Whether its steps draw noise from the generator (ancestral and SDE
 * samplers, DDPM, DDIM with eta above 0): the pipeline then draws each
 * next block ahead, while the UNet runs (rng.h). */
int sdx4_scheduler_draws_noise(const scheduler *s, float eta);

/* step(model_output, timesteps[i], sample, eta, generator).prev_sample:
 * steps in order, 0 first. eta is DDIM's (others ignore it, as diffusers'
 * pipelines do); samplers that draw noise draw it from rng. prev_sample
 * may alias sample. */
int sdx4_scheduler_step(scheduler *s, int i, const float *model_output, const float *sample,
                        float eta, torch_rng *rng, float *prev_sample);

#endif
