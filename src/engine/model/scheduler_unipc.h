/*
 * scheduler_unipc.h - diffusers' UniPCMultistepScheduler (Zhao et al.,
 * 2023): a multistep predictor (UniP) and, after each model evaluation,
 * a corrector (UniC) of the previous step's result, on host float arrays
 * with diffusers' float32 arithmetic.
 *
 * Supported config values (anything else is refused, naming the key),
 * besides the noise schedule's (scheduler.h):
 *   solver_order 1 | 2 | 3, solver_type bh1 | bh2 (midpoint, heun and
 *   logrho are bh2, as in diffusers), predict_x0, lower_order_final,
 *   disable_corrector (a list of step indices), use_karras_sigmas,
 *   final_sigmas_type zero | sigma_min, timestep_spacing leading |
 *   trailing | linspace, steps_offset, prediction_type epsilon |
 *   v_prediction | sample, thresholding (with dynamic_thresholding_ratio
 *   and sample_max_value); use_exponential_sigmas, use_beta_sigmas,
 *   use_flow_sigmas, use_dynamic_shifting false and solver_p, sigma_min,
 *   sigma_max, shift_terminal null only.
 * A final sigma of zero makes diffusers' last step NaN or infinite with
 * bh1, with predict_x0 false, and without lower_order_final above order
 * 1; those combinations are refused, naming final_sigmas_type.
 *
 * Like the sigma samplers it keeps state between steps (the last
 * outputs, the last sample): one scheduler serves one run.
 */
#ifndef SDX4_SCHEDULER_UNIPC_H
#define SDX4_SCHEDULER_UNIPC_H

#include <stddef.h>

#include "core/config.h"
#include "model/scheduler_sigma.h"

#define UNIPC_MAX_ORDER 3

typedef struct {
    /* The schedule: DPM-Solver's set_timesteps, which UniPC's repeats,
     * and the noise schedule, prediction type and spacing it reads. */
    sigma_scheduler sigma;
    int solver_order, bh1, predict_x0, lower_order_final;
    int *disable_corrector, n_disable_corrector; /* step indices */
    int thresholding;
    float thresholding_ratio, sample_max_value;
    /* set by sdx4_unipc_set_timesteps(): outputs[0..solver_order - 1]
     * are the last converted model outputs, oldest first (diffusers'
     * model_outputs); outputs[solver_order] is where the next one goes */
    float *outputs[UNIPC_MAX_ORDER + 1]; /* (numel) each */
    float *last_sample;                  /* (numel): the sample the last predictor started from */
    float *scratch;                      /* (numel): thresholding's quantile */
    /* the run so far */
    int step_index, lower_order_nums, this_order;
} unipc_scheduler;

/* From a parsed config whose _class_name is UniPCMultistepScheduler. */
int sdx4_unipc_from_config(unipc_scheduler *s, const config *c);
void sdx4_unipc_free(unipc_scheduler *s);

/* set_timesteps(n) for samples of numel floats; restarts the run. The
 * timesteps and sigmas are s->sigma's. */
int sdx4_unipc_set_timesteps(unipc_scheduler *s, int n, size_t numel);

/* step(model_output, timesteps[i], sample).prev_sample over numel floats;
 * steps must come in order, 0 first. prev_sample may alias sample.
 * scale_model_input is the identity and init_noise_sigma 1. */
int sdx4_unipc_step(unipc_scheduler *s, int i, const float *model_output, const float *sample,
                    float *prev_sample);

#endif
