/*
 * scheduler.h - diffusers' DDIMScheduler (the denoising loop) and
 * DDPMScheduler (the noise added to the low-resolution image), on host
 * float arrays.
 *
 * Both are built from a diffusers scheduler_config.json and reproduce
 * diffusers' float32 arithmetic: betas from torch.linspace in float32,
 * alphas_cumprod from torch.cumprod (accumulated in double, stored as
 * float), and every step one float operation per tensor operation of
 * diffusers, in its order, so results match to the last bit or nearly.
 *
 * Supported config values (anything else is refused, naming the key):
 *   beta_schedule       linear | scaled_linear | squaredcos_cap_v2
 *   trained_betas       null only
 *   rescale_betas_zero_snr, thresholding   false only
 *   DDIM: prediction_type epsilon | v_prediction | sample,
 *         timestep_spacing leading | trailing | linspace,
 *         clip_sample (+ clip_sample_range), set_alpha_to_one, steps_offset
 *
 * Thread safety: a scheduler is read-only after set_timesteps(), so
 * several threads may step one scheduler at once with their own buffers
 * and generators; set_timesteps() must not race with anything.
 */
#ifndef SDX4_SCHEDULER_H
#define SDX4_SCHEDULER_H

#include <stddef.h>

#include "core/config.h"
#include "core/rng.h"

typedef enum { PREDICT_EPSILON, PREDICT_V, PREDICT_SAMPLE } prediction_type;

/* loop(type, ...) with the prediction type as a constant: each copy of a
 * sampler's loops is then straight-line code that the compiler vectorizes
 * (a type read inside the loop keeps it scalar: BENCHMARKS.md "Samplers"). */
#define SDX4_BY_PREDICTION(type, loop, ...)                      \
    ((type) == PREDICT_EPSILON ? loop(PREDICT_EPSILON, __VA_ARGS__) \
     : (type) == PREDICT_V     ? loop(PREDICT_V, __VA_ARGS__)       \
                               : loop(PREDICT_SAMPLE, __VA_ARGS__))
typedef enum { SPACING_LEADING, SPACING_TRAILING, SPACING_LINSPACE } timestep_spacing;

typedef struct {
    int num_train_timesteps;   /* T */
    float *alphas_cumprod;     /* (T) */
    float final_alpha_cumprod; /* alpha_prod_t_prev past the last step */
    int clip_sample;
    float clip_sample_range;
    int steps_offset;
    prediction_type prediction;
    timestep_spacing spacing;
    /* set by sdx4_ddim_set_timesteps() */
    int num_inference_steps;   /* n as asked */
    int num_timesteps;         /* entries in timesteps: n, or n + 1 where
                                  diffusers' "trailing" yields one more */
    int *timesteps;            /* (num_timesteps), descending */
} ddim_scheduler;

/* Reads <model_dir>/scheduler/scheduler_config.json. */
int sdx4_ddim_load(ddim_scheduler *s, const char *model_dir);
/* The same from a config already parsed (its label names it in errors). */
int sdx4_ddim_from_config(ddim_scheduler *s, const config *c);
void sdx4_ddim_free(ddim_scheduler *s);

/* DDIMScheduler.set_timesteps(n): fails when n < 1 or n > T. */
int sdx4_ddim_set_timesteps(ddim_scheduler *s, int num_inference_steps);

/* DDIMScheduler.step(model_output, timestep, sample, eta).prev_sample over
 * n floats (use_clipped_model_output=False). With eta > 0 the variance
 * noise is torch.randn of n values drawn from rng, as diffusers' randn_tensor
 * draws it from a CPU generator; rng may be NULL when eta == 0. A negative
 * timestep indexes from the end, as a torch index does. Fails before
 * set_timesteps() or for a timestep outside [-T, T). noise_buffer: n
 * floats where the step draws its noise when eta > 0 (NULL: it allocates
 * them).
 * prev_sample may alias sample or model_output. */
int sdx4_ddim_step(const ddim_scheduler *s, const float *model_output, int timestep,
              const float *sample, size_t n, float eta, torch_rng *rng, float *noise_buffer,
              float *prev_sample);

typedef struct {
    int num_train_timesteps; /* T */
    float *alphas_cumprod;   /* (T) */
} ddpm_scheduler;

/* Reads <model_dir>/low_res_scheduler/scheduler_config.json. */
int sdx4_ddpm_load(ddpm_scheduler *s, const char *model_dir);
int sdx4_ddpm_from_config(ddpm_scheduler *s, const config *c);
void sdx4_ddpm_free(ddpm_scheduler *s);

/* DDPMScheduler.add_noise(original, noise, [timestep]) over n floats:
 * sqrt(acp[t]) * original + sqrt(1 - acp[t]) * noise. Fails unless
 * 0 <= timestep < T. out may alias either input. */
int sdx4_ddpm_add_noise(const ddpm_scheduler *s, const float *original, const float *noise,
                   size_t n, int timestep, float *out);

/* Shared with the other schedulers (scheduler_sigma.c). */

/* Reads a string key that must be one of `names` (NULL-terminated) and
 * stores its index; otherwise names the key, the value and the choices. */
int sdx4_cfg_choice(const config *c, const char *key, const char *def, const char *const *names,
                    int *out);
/* Checks _class_name and reads the noise schedule's keys (num_train_timesteps,
 * beta_*, trained_betas, rescale_betas_zero_snr); *acp receives the T
 * alphas_cumprod, malloc'd. */
int sdx4_noise_schedule_load(const config *c, const char *class_name, int *T, float **acp);
/* np.arange(T, 0, -T / n) as numpy fills it ("trailing" spacing); returns
 * its length, n or n + 1. out has room for n + 1. */
int sdx4_trailing_arange(int T, int n, double *out);
/* The timesteps of DDIM and DDPM (PNDM's, reversed) for n steps,
 * descending, malloc'd; *count receives their number, n or n + 1
 * ("trailing"). NULL when n < 1 or n > T. */
int *sdx4_spaced_timesteps(int T, int n, timestep_spacing spacing, int steps_offset, int *count);
/* diffusers' _threshold_sample (DDPM, DPM-Solver, UniPC) on one batch
 * entry of n floats, in place: s = clamp(torch.quantile(|x|, ratio), 1,
 * max_value), x = clamp(x, -s, s) / s; a NaN makes every value NaN, as it
 * does the quantile. The quantile is found by selection, O(n), in
 * `scratch` (n floats). */
void sdx4_threshold_sample(float *x, size_t n, float ratio, float max_value, float *scratch);

#endif
