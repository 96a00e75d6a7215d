/*
 * scheduler_sigma.h - the samplers that walk a sigma schedule:
 * diffusers' EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, the
 * DPM-Solver family (DPMSolverMultistepScheduler,
 * DPMSolverSinglestepScheduler, DEISMultistepScheduler; their steps in
 * scheduler_dpm.h) and in scheduler_k.c HeunDiscreteScheduler,
 * KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler and
 * LMSDiscreteScheduler, on host float arrays, with diffusers' float32
 * arithmetic.
 *
 * Supported config values (anything else is refused, naming the key),
 * besides the noise schedule's (scheduler.h):
 *   all      prediction_type epsilon | v_prediction | sample (not Euler
 *            ancestral's), timestep_spacing leading | trailing | linspace,
 *            steps_offset (neither is a DPM singlestep key: it spaces
 *            linspace)
 *   Euler    use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas
 *            (one at most), final_sigmas_type zero | sigma_min;
 *            interpolation_type linear, timestep_type discrete,
 *            sigma_min / sigma_max null
 *   DPM family: scheduler_dpm.h
 *   Heun, KDPM2, KDPM2 ancestral, LMS
 *            use_karras_sigmas; use_exponential_sigmas and use_beta_sigmas
 *            false only; Heun: clip_sample, clip_sample_range; KDPM2s:
 *            prediction_type epsilon | v_prediction (diffusers' step
 *            raises for sample)
 *
 * Unlike DDIM, these keep state between steps (the step index, DPM's
 * previous model outputs): one scheduler serves one run.
 */
#ifndef SDX4_SCHEDULER_SIGMA_H
#define SDX4_SCHEDULER_SIGMA_H

#include <math.h>
#include <stddef.h>

#include "core/config.h"
#include "core/rng.h"
#include "model/scheduler.h"

typedef enum {
    SIGMA_EULER,
    SIGMA_EULER_ANCESTRAL,
    SIGMA_DPM_MULTISTEP,
    SIGMA_DPM_SINGLESTEP,
    SIGMA_DEIS,
    /* scheduler_k.c's */
    SIGMA_HEUN,
    SIGMA_KDPM2,
    SIGMA_KDPM2_ANCESTRAL,
    SIGMA_LMS
} sigma_method;

typedef struct {
    sigma_method method;
    int num_train_timesteps; /* T */
    float *alphas_cumprod;   /* (T) */
    prediction_type prediction;
    timestep_spacing spacing;
    int steps_offset;
    int karras;              /* use_karras_sigmas */
    int exponential, beta;   /* use_exponential_sigmas, use_beta_sigmas */
    int final_sigma_min;     /* final_sigmas_type: sigma_min, else zero */
    int cosine_betas;        /* beta_schedule squaredcos_cap_v2 (DPM's
                                Karras timesteps are not rounded then) */
    /* the DPM family's (scheduler_dpm.h) */
    int solver_order, heun, lower_order_final, euler_at_final;
    int algorithm;           /* dpm_algorithm */
    int lu_lambdas;          /* use_lu_lambdas */
    int thresholding;
    float threshold_ratio, sample_max_value; /* dynamic_thresholding_ratio */
    double lambda_min_clipped;
    /* set by sdx4_sigma_set_timesteps() */
    int num_timesteps;
    float *timesteps;        /* (num_timesteps), descending */
    float *sigmas;           /* (num_timesteps + 1), the last one final */
    float init_noise_sigma;
    /* the run so far */
    int step_index, lower_order_nums;
    size_t numel;            /* of a sample */
    float *model_outputs[3]; /* DPM: the last three converted outputs,
                                the newest last */
    float *first_sample;     /* DPM singlestep: the sample its update
                                started from (at its first-order step) */
    float *noise, *scratch;  /* (numel): SDE and ancestral noise; thresholding's sort */
    int *orders;             /* DPM singlestep: each step's order */
    /* scheduler_k.c's classes; sigmas above is diffusers' whole array
       (2n for Heun, 2n + 2 for the KDPM2s, n + 1 for LMS, n steps) */
    int order;               /* UNet evaluations per diffusers callback */
    int clip_sample;         /* Heun's */
    float clip_sample_range;
    float *k_interpol;       /* (2n + 2) KDPM2's sigmas_interpol */
    float *k_up, *k_down;    /* (2n + 2) KDPM2 ancestral's sigmas_up/down */
    float *k_sample;         /* (numel) saved by a first-order step */
    float *k_derivs[4];      /* (numel) Heun's first derivative; LMS's
                                last four, newest first */
    int k_second;            /* the next step is the second order's */
} sigma_scheduler;

/* From a parsed config whose _class_name is one of the three classes. */
int sdx4_sigma_from_config(sigma_scheduler *s, const config *c);
void sdx4_sigma_free(sigma_scheduler *s);

/* set_timesteps(n) for samples of numel floats; restarts the run. Fails
 * when n < 1 or n > T. */
int sdx4_sigma_set_timesteps(sigma_scheduler *s, int n, size_t numel);

/* scale_model_input(sample, timesteps[i]) is sample / this: 1 for the DPM
 * family (the identity), sqrt(sigma^2 + 1) for the others. */
float sdx4_sigma_input_scale(const sigma_scheduler *s, int i);

/* Whether its steps draw noise: Euler ancestral, KDPM2 ancestral and the
 * SDE variants of DPM-Solver. */
int sdx4_sigma_draws_noise(const sigma_scheduler *s);

/* step(model_output, timesteps[i], sample, generator).prev_sample over
 * numel floats; steps must come in order, 0 first. Euler ancestral and
 * the SDE variants of DPM-Solver draw numel normal values from rng (never
 * NULL for them). prev_sample may alias sample. */
int sdx4_sigma_step(sigma_scheduler *s, int i, const float *model_output, const float *sample,
                    torch_rng *rng, float *prev_sample);

/* _sigma_to_alpha_sigma_t and the log-SNR lambda = log(alpha) -
 * log(sigma) of one sigma, in float32 (DPM-Solver, DEIS, UniPC). */
typedef struct {
    float alpha, sigma, lambda;
} sigma_point;

static inline sigma_point sdx4_sigma_point(float sigma) {
    sigma_point p;
    p.alpha = 1.0f / sqrtf(sigma * sigma + 1.0f);
    p.sigma = sigma * p.alpha;
    p.lambda = logf(p.alpha) - logf(p.sigma);
    return p;
}

/* The schedule's parts, shared by the samplers' files. */
/* sigma(t) of the training schedule, ((1 - acp[t]) / acp[t]) ** 0.5 in float32. */
float sdx4_sigma_train(const sigma_scheduler *s, int t);
/* np.interp of the training sigmas at a fractional timestep. */
double sdx4_sigma_interp(const sigma_scheduler *s, double t);
/* _sigma_to_t: the fractional timestep of a sigma, from np.log of the
 * float32 training sigmas (T of them). */
double sdx4_sigma_to_t(const float *log_sigmas, int T, double sigma);
/* _convert_to_karras: n sigmas from sigma_max down to sigma_min. */
void sdx4_sigma_karras(double sigma_min, double sigma_max, int n, double *out);
/* _convert_to_exponential: n sigmas evenly spaced in log sigma. */
void sdx4_sigma_exponential(double sigma_min, double sigma_max, int n, double *out);
/* _convert_to_beta: n sigmas at the quantiles of Beta(0.6, 0.6). */
void sdx4_sigma_beta(double sigma_min, double sigma_max, int n, double *out);
/* Reads use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas,
 * refusing more than one. */
int sdx4_sigma_read_spread(sigma_scheduler *s, const config *c);
/* Whichever of the three the config chose into out (n sigmas); 0 when it
 * chose none. */
int sdx4_sigma_convert(const sigma_scheduler *s, double sigma_min, double sigma_max, int n,
                       double *out);
/* scipy.stats.beta.ppf(p, a, b): the inverse regularized incomplete beta
 * function, to double precision. */
double sdx4_beta_ppf(double p, double a, double b);

/* scheduler_k.c: Heun, KDPM2, KDPM2 ancestral and LMS, called by the
 * functions above for their methods. */
int sdx4_k_is_method(const char *class_name, sigma_method *method);
int sdx4_k_from_config(sigma_scheduler *s, const config *c);
int sdx4_k_set_timesteps(sigma_scheduler *s);
float sdx4_k_input_scale(const sigma_scheduler *s, int i);
int sdx4_k_step(sigma_scheduler *s, int i, const float *model_output, const float *sample,
                torch_rng *rng, float *prev_sample);
void sdx4_k_free(sigma_scheduler *s);

#endif
