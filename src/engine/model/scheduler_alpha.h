/*
 * scheduler_alpha.h - diffusers' DDPMScheduler and PNDMScheduler as the
 * pipeline's sampler, on host float arrays, with diffusers' float32
 * arithmetic (scheduler.c's rules). Like DDIM they walk alphas_cumprod:
 * init_noise_sigma is 1 and scale_model_input the identity.
 *
 * Supported config values (anything else is refused, naming the key),
 * besides the noise schedule's (scheduler.h):
 *   both  timestep_spacing leading | trailing | linspace, steps_offset
 *   DDPM  prediction_type epsilon | v_prediction | sample,
 *         variance_type fixed_small | fixed_small_log | fixed_large
 *         (learned and learned_range need a UNet that predicts its
 *         variance, 8 output channels where the upscaler's has 4;
 *         fixed_large_log takes the square root of a negative log in
 *         diffusers' step, every value NaN), clip_sample (+
 *         clip_sample_range), thresholding (+ dynamic_thresholding_ratio,
 *         sample_max_value)
 *   PNDM  prediction_type epsilon | v_prediction, skip_prk_steps,
 *         set_alpha_to_one
 *
 * DDPM is stateless, like DDIM; PNDM keeps its past model outputs and
 * steps in order: one scheduler serves one run.
 *
 * PNDM's timesteps are not n: with skip_prk_steps false (the class's
 * default) 12 Runge-Kutta warm-up steps replace the first 3 of n, so a
 * run takes m + 9 UNet evaluations and needs m >= 4; with skip_prk_steps
 * true (PLMS alone) the second step is evaluated twice, m + 1 (1 when
 * m is 1). m is n, or n + 1 where "trailing" spacing's np.arange yields
 * one more (as DDIM's). DDPM takes m.
 */
#ifndef SDX4_SCHEDULER_ALPHA_H
#define SDX4_SCHEDULER_ALPHA_H

#include <stddef.h>

#include "core/config.h"
#include "core/rng.h"
#include "model/scheduler.h"

typedef enum { VARIANCE_FIXED_SMALL, VARIANCE_FIXED_SMALL_LOG, VARIANCE_FIXED_LARGE } variance_type;

typedef struct {
    int num_train_timesteps; /* T */
    float *alphas_cumprod;   /* (T) */
    prediction_type prediction;
    timestep_spacing spacing;
    int steps_offset;
    variance_type variance;
    int clip_sample;
    float clip_sample_range;
    int thresholding;
    float dynamic_thresholding_ratio, sample_max_value;
    /* set by sdx4_ddpm_sampler_set_timesteps() */
    int num_timesteps;
    int *timesteps;          /* (num_timesteps), descending */
    size_t numel;
    float *noise, *x0, *scratch; /* (numel): the step's noise; x_0 and the sort when thresholding */
} ddpm_sampler;

int sdx4_ddpm_sampler_from_config(ddpm_sampler *s, const config *c);
void sdx4_ddpm_sampler_free(ddpm_sampler *s);
/* Fails when n < 1 or n > T. */
int sdx4_ddpm_sampler_set_timesteps(ddpm_sampler *s, int n, size_t numel);
/* step(model_output, timesteps[i], sample, generator).prev_sample over
 * numel floats: for timesteps above 0, numel normal values drawn from rng
 * (never NULL then). prev_sample may alias sample. */
int sdx4_ddpm_sampler_step(const ddpm_sampler *s, int i, const float *model_output,
                           const float *sample, torch_rng *rng, float *prev_sample);

typedef struct {
    int num_train_timesteps; /* T */
    float *alphas_cumprod;   /* (T) */
    float final_alpha_cumprod;
    prediction_type prediction;
    timestep_spacing spacing;
    int steps_offset;
    int skip_prk_steps;
    /* set by sdx4_pndm_set_timesteps() */
    int num_inference_steps;
    int num_timesteps, num_prk; /* the first num_prk are Runge-Kutta steps */
    int *timesteps;             /* (num_timesteps) */
    /* the run so far (diffusers' counter, ets, cur_model_output, cur_sample) */
    int counter, num_ets;
    size_t numel;
    float *ets[4];              /* the last model outputs, oldest first */
    float *cur_model_output, *cur_sample;
    float *combined;            /* a step's combined model output (warm-up steps) */
} pndm_sampler;

int sdx4_pndm_from_config(pndm_sampler *s, const config *c);
void sdx4_pndm_free(pndm_sampler *s);
/* set_timesteps(n) for samples of numel floats; restarts the run. Fails
 * when n < 1 or n > T, or with the Runge-Kutta warm-up under 4 steps
 * (diffusers fails too). */
int sdx4_pndm_set_timesteps(pndm_sampler *s, int n, size_t numel);
/* step(model_output, timesteps[i], sample).prev_sample; steps in order, 0
 * first. prev_sample may alias sample. */
int sdx4_pndm_step(pndm_sampler *s, int i, const float *model_output, const float *sample,
                   float *prev_sample);


#endif
