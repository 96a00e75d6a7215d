/*
 * scheduler_dpm.h - the DPM-Solver family's config and steps, over the
 * sigma_scheduler state of scheduler_sigma.h (which calls these for its
 * DPM methods; the pipeline never does).
 */
#ifndef SDX4_SCHEDULER_DPM_H
#define SDX4_SCHEDULER_DPM_H

#include <stddef.h>

#include "core/config.h"
#include "model/scheduler_sigma.h"

/* Reads the class's own keys, after the keys all sigma samplers share. */
int sdx4_dpm_from_config(sigma_scheduler *s, const config *c);

/* Allocates the run's buffers for samples of numel floats after
 * set_timesteps, and restarts the run. */
int sdx4_dpm_start(sigma_scheduler *s, size_t numel);
void sdx4_dpm_free(sigma_scheduler *s);

/* step(model_output, timesteps[i], sample).prev_sample over numel floats,
 * i being the step index. */
int sdx4_dpm_step(sigma_scheduler *s, int i, const float *mo, const float *x, float *prev);

#endif
