/*
 * scheduler_dpm.h - the DPM-Solver family over the sigma_scheduler state
 * of scheduler_sigma.h (which calls these for its DPM methods; the
 * pipeline never does): diffusers' DPMSolverMultistepScheduler,
 * DPMSolverSinglestepScheduler and DEISMultistepScheduler.
 *
 * Supported config values (anything else is refused, naming the key),
 * besides scheduler_sigma.h's:
 *   all          solver_order 1 | 2 | 3, thresholding with
 *                dynamic_thresholding_ratio and sample_max_value,
 *                use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas
 *                (one at most), lower_order_final; use_flow_sigmas and
 *                use_dynamic_shifting false only
 *   multistep    algorithm_type dpmsolver++ | dpmsolver | sde-dpmsolver++ |
 *                sde-dpmsolver (deis reads as dpmsolver++, as in
 *                diffusers), solver_type midpoint | heun (logrho, bh1,
 *                bh2 read as midpoint), euler_at_final, use_lu_lambdas,
 *                final_sigmas_type zero | sigma_min (sigma_min only for
 *                dpmsolver and sde-dpmsolver), lambda_min_clipped;
 *                variance_type null only; sde-dpmsolver to order 2 (diffusers
 *                has no third-order update for it)
 *   singlestep   algorithm_type dpmsolver++ | dpmsolver | sde-dpmsolver++
 *                (deis as dpmsolver++), solver_type as multistep's,
 *                final_sigmas_type, lambda_min_clipped; variance_type null
 *                only; no thresholding with dpmsolver (diffusers indexes
 *                its alphas by a timestep it no longer has)
 *   DEIS         algorithm_type deis (dpmsolver and dpmsolver++ read as
 *                deis), solver_type logrho (midpoint, heun, bh1, bh2 read
 *                as logrho)
 * Thresholding takes the quantile over the whole sample: the engine's
 * latents are one image (batch 1).
 */
#ifndef SDX4_SCHEDULER_DPM_H
#define SDX4_SCHEDULER_DPM_H

#include <stddef.h>

#include "core/config.h"
#include "core/rng.h"
#include "model/scheduler_sigma.h"

typedef enum { DPM_PLUSPLUS, DPM_SOLVER, DPM_SDE_PLUSPLUS, DPM_SDE_SOLVER } dpm_algorithm;

/* Reads the class's own keys, after the ones all sigma samplers share. */
int sdx4_dpm_from_config(sigma_scheduler *s, const config *c);

/* set_timesteps(n)'s schedule: count timesteps into ts and count + 1
 * sigmas into sig (the last one final), as doubles holding what diffusers'
 * arrays hold; log_sigmas are np.log of the T float32 training sigmas.
 * ts has room for n + 1 values, sig for n + 2. Returns count. */
int sdx4_dpm_schedule(sigma_scheduler *s, int n, const float *log_sigmas, double *ts,
                      double *sig);

/* Allocates the run's buffers for samples of numel floats after
 * set_timesteps, and restarts the run. */
int sdx4_dpm_start(sigma_scheduler *s, int count, size_t numel);
void sdx4_dpm_free(sigma_scheduler *s);

/* step(model_output, timesteps[i], sample, generator).prev_sample over
 * numel floats, i being the step index; the SDE variants draw numel
 * normal values from rng. prev may alias x. */
int sdx4_dpm_step(sigma_scheduler *s, int i, const float *mo, const float *x, torch_rng *rng,
                  float *prev);

#endif
