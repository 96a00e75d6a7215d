/*
 * scheduler_k.c - Heun, KDPM2, KDPM2 ancestral and LMS, the k-diffusion
 * samplers of diffusers, as it computes them.
 *
 * Their schedule starts as Euler's: scheduler_sigma.c computes the n
 * timesteps and n + 1 sigmas of the spacing (or Karras's, which KDPM2
 * rounds to whole timesteps), then sdx4_k_set_timesteps() makes of them
 * what each class's set_timesteps() makes:
 *   - Heun evaluates the model twice per interval, at its start and at its
 *     end: timesteps t0, t1, t1, t2, t2, ... (2n - 1), and the sigmas
 *     repeated alike;
 *   - KDPM2 evaluates the second time at the geometric middle of the
 *     interval, sigmas_interpol = exp(lerp(log sigma, log previous, 0.5)),
 *     whose timesteps come from _sigma_to_t in float32 torch arithmetic;
 *   - KDPM2 ancestral splits each interval's sigma into down and up parts
 *     (as Euler ancestral does), evaluates at the middle of sigma and
 *     sigma_down, and adds noise * sigma_up after the second evaluation;
 *   - LMS keeps Euler's schedule and combines the last four derivatives.
 * The second-order classes keep diffusers' state machine: a first-order
 * step saves the sample, the second one starts again from it. Each
 * second-order interval is one callback of diffusers' pipeline (order 2),
 * whatever the number of UNet evaluations.
 *
 * LMS's coefficients are integrals of Lagrange basis polynomials over the
 * step's interval: diffusers asks scipy's quad for them, but the integral
 * of a polynomial of degree <= 3 has a closed form, which is what is
 * computed here (in double, then rounded to float as torch rounds a Python
 * scalar that multiplies a float32 tensor).
 *
 * The steps are one float operation per torch operation, in diffusers'
 * order, as in scheduler_sigma.c.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "model/scheduler_sigma.h"

static const char *const k_classes[] = {"HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                                        "KDPM2AncestralDiscreteScheduler",
                                        "LMSDiscreteScheduler", NULL};

static int is_kdpm2(const sigma_scheduler *s) {
    return s->method == SIGMA_KDPM2 || s->method == SIGMA_KDPM2_ANCESTRAL;
}

int sdx4_k_is_method(const char *class_name, sigma_method *method) {
    for (int i = 0; k_classes[i]; i++)
        if (!strcmp(class_name, k_classes[i])) {
            if (method) *method = (sigma_method)(SIGMA_HEUN + i);
            return 1;
        }
    return 0;
}

/* ---------------------------------------------------------------- config */

int sdx4_k_from_config(sigma_scheduler *s, const config *c) {
    static const char *const predictions[] = {"epsilon", "v_prediction", "sample", NULL};
    static const char *const eps_or_v[] = {"epsilon", "v_prediction", NULL};
    static const char *const spacings[] = {"leading", "trailing", "linspace", NULL};
    memset(s, 0, sizeof *s);
    int method, prediction, spacing;
    double clip_range = 1.0;
    if (sdx4_cfg_choice(c, "_class_name", "", k_classes, &method)) return -1;
    s->method = (sigma_method)(SIGMA_HEUN + method);
    if (sdx4_noise_schedule_load(c, k_classes[method], &s->num_train_timesteps, &s->alphas_cumprod))
        return -1;
    /* KDPM2's step raises NotImplementedError for "sample" */
    int rc = sdx4_cfg_choice(c, "prediction_type", "epsilon", is_kdpm2(s) ? eps_or_v : predictions,
                             &prediction) ||
             sdx4_cfg_choice(c, "timestep_spacing", "linspace", spacings, &spacing) ||
             sdx4_cfg_int(c, "steps_offset", 0, &s->steps_offset) ||
             sdx4_cfg_bool(c, "use_karras_sigmas", 0, &s->karras) ||
             sdx4_cfg_expect_bool(c, "use_exponential_sigmas", 0) ||
             sdx4_cfg_expect_bool(c, "use_beta_sigmas", 0);
    if (!rc && s->method == SIGMA_HEUN)
        rc = sdx4_cfg_bool(c, "clip_sample", 0, &s->clip_sample) ||
             sdx4_cfg_float(c, "clip_sample_range", 1.0, &clip_range);
    if (rc) {
        sdx4_sigma_free(s);
        return -1;
    }
    s->prediction = (prediction_type)prediction;
    s->spacing = (timestep_spacing)spacing;
    s->clip_sample_range = (float)clip_range;
    s->order = s->method == SIGMA_LMS ? 1 : 2;
    return 0;
}

void sdx4_k_free(sigma_scheduler *s) {
    free(s->k_interpol), free(s->k_up), free(s->k_down), free(s->k_sample);
    for (int i = 0; i < 4; i++) free(s->k_derivs[i]);
}

/* ------------------------------------------------------- set_timesteps */

/* torch's lerp(log a, log b, 0.5).exp(): at weight 0.5 it computes
 * end - (end - start) * 0.5, which is NaN when log b is -inf. */
static float log_middle(float a, float b) {
    float start = logf(a), end = logf(b);
    return expf(end - (end - start) * 0.5f);
}

/* KDPM2's _sigma_to_t of a float32 sigma_interpol against float32
 * log-sigmas: torch ops, so float32 throughout (the Euler schedule's
 * version in scheduler_sigma.c is numpy's, in double). */
static float sigma_to_t_f32(const float *log_sigmas, int T, float sigma) {
    float log_sigma = logf(sigma > 1e-10f ? sigma : 1e-10f);
    int low = 0; /* argmax of the cumulative count: the last j with dists >= 0 */
    for (int j = 0; j < T; j++)
        if (log_sigma - log_sigmas[j] >= 0) low = j;
    if (low > T - 2) low = T - 2;
    float lo = log_sigmas[low], hi = log_sigmas[low + 1];
    float w = (lo - log_sigma) / (lo - hi);
    w = w < 0 ? 0 : w > 1 ? 1 : w;
    return (1.0f - w) * (float)low + w * (float)(low + 1);
}

/* cat([x[:1], x[1:].repeat_interleave(2), x[-1:]]) of n + 1 values. */
static void interleave(const float *x, int n, float *out) {
    out[0] = x[0];
    for (int i = 1; i <= n; i++) out[2 * i - 1] = out[2 * i] = x[i];
    out[2 * n + 1] = x[n];
}

/* The KDPM2s' sigmas_interpol (and the ancestral's up and down) over the
 * n + 1 sigmas, and the timesteps between Euler's. */
static int kdpm2_schedule(sigma_scheduler *s, const float *sig, const float *ts, int n, float *up,
                          float *down, float *interpol, float *timesteps) {
    int T = s->num_train_timesteps;
    float *log_sigmas = malloc((size_t)T * sizeof *log_sigmas);
    if (!log_sigmas) return -1;
    for (int t = 0; t < T; t++) {
        float a = s->alphas_cumprod[t];
        log_sigmas[t] = logf(sqrtf((1.0f - a) / a));
    }
    if (s->method == SIGMA_KDPM2) { /* between each sigma and the one before (rolled) */
        for (int i = 0; i <= n; i++) interpol[i] = log_middle(sig[i], sig[i ? i - 1 : n]);
    } else {
        for (int i = 0; i < n; i++) {
            float next = sig[i + 1], a = next * next, b = sig[i] * sig[i];
            up[i] = sqrtf(a * (b - a) / b);
            down[i] = sqrtf(a - up[i] * up[i]);
        }
        up[n] = NAN, down[n] = 0.0f; /* torch's 0 * 0 / 0; never read */
        for (int i = 0; i <= n; i++) interpol[i] = log_middle(sig[i], down[i]);
        interpol[n - 1] = interpol[n] = 0.0f;
    }
    /* the ancestral one evaluates interval i's middle, KDPM2 interval
     * i - 1's (its interpol is indexed by the interval's end) */
    int shift = s->method == SIGMA_KDPM2 ? 1 : 0;
    timesteps[0] = ts[0];
    for (int k = 1; k < n; k++) {
        timesteps[2 * k - 1] = sigma_to_t_f32(log_sigmas, T, interpol[k - 1 + shift]);
        timesteps[2 * k] = ts[k];
    }
    free(log_sigmas);
    return 0;
}

/* Called by sdx4_sigma_set_timesteps() with Euler's schedule set: n
 * timesteps, n + 1 sigmas. */
int sdx4_k_set_timesteps(sigma_scheduler *s) {
    int n = s->num_timesteps, second = s->method != SIGMA_LMS;
    size_t numel = s->numel, full = (size_t)2 * n + 2;
    sdx4_k_free(s);
    s->k_interpol = s->k_up = s->k_down = s->k_sample = NULL;
    memset(s->k_derivs, 0, sizeof s->k_derivs);
    s->k_second = 0;
    float *timesteps = malloc(full * sizeof *timesteps), *sigmas = malloc(full * sizeof *sigmas);
    float *up = calloc((size_t)n + 1, sizeof *up), *down = calloc((size_t)n + 1, sizeof *down);
    float *interpol = calloc((size_t)n + 1, sizeof *interpol);
    s->k_interpol = malloc(full * sizeof(float));
    s->k_up = malloc(full * sizeof(float)), s->k_down = malloc(full * sizeof(float));
    s->k_sample = malloc(numel * sizeof(float));
    int ok = timesteps && sigmas && up && down && interpol && s->k_interpol && s->k_up &&
             s->k_down && s->k_sample;
    for (int i = 0; i < (s->method == SIGMA_LMS ? 4 : 1); i++)
        ok = ok && (s->k_derivs[i] = malloc(numel * sizeof(float))) != NULL;
    if (is_kdpm2(s) && s->karras) /* KDPM2 rounds its Karras timesteps, half to even */
        for (int i = 0; i < n; i++) s->timesteps[i] = nearbyintf(s->timesteps[i]);
    if (!ok || (is_kdpm2(s) && kdpm2_schedule(s, s->sigmas, s->timesteps, n, up, down, interpol,
                                              timesteps))) {
        free(timesteps), free(sigmas), free(up), free(down), free(interpol);
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "set_timesteps(%d): out of memory", n);
        return -1;
    }
    if (s->method == SIGMA_HEUN) { /* cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]]) */
        timesteps[0] = s->timesteps[0], sigmas[0] = s->sigmas[0];
        for (int k = 1; k < n; k++) {
            timesteps[2 * k - 1] = timesteps[2 * k] = s->timesteps[k];
            sigmas[2 * k - 1] = sigmas[2 * k] = s->sigmas[k];
        }
        sigmas[2 * n - 1] = s->sigmas[n];
    } else if (is_kdpm2(s)) {
        interleave(s->sigmas, n, sigmas);
        interleave(interpol, n, s->k_interpol);
        if (s->method == SIGMA_KDPM2_ANCESTRAL) {
            interleave(up, n, s->k_up);
            interleave(down, n, s->k_down);
        }
    }
    if (second) {
        free(s->timesteps), free(s->sigmas);
        s->timesteps = timesteps, s->sigmas = sigmas;
        s->num_timesteps = 2 * n - 1;
    } else {
        free(timesteps), free(sigmas);
    }
    free(up), free(down), free(interpol);
    return 0;
}

/* ------------------------------------------------------------- stepping */

float sdx4_k_input_scale(const sigma_scheduler *s, int i) {
    float sigma = s->sigmas[i];
    if (s->k_second && s->method == SIGMA_KDPM2) sigma = s->k_interpol[i];
    if (s->k_second && s->method == SIGMA_KDPM2_ANCESTRAL) sigma = s->k_interpol[i - 1];
    return sqrtf(sigma * sigma + 1.0f);
}

/* pred_original_sample at sigma. */
static inline float x0_at(prediction_type prediction, float sigma, float mo, float x) {
    if (prediction == PREDICT_EPSILON) return x - sigma * mo;
    if (prediction == PREDICT_V)
        return mo * (-sigma / sqrtf(sigma * sigma + 1.0f)) + x / (sigma * sigma + 1.0f);
    return mo;
}

/* Heun's first or second half for one prediction type (SDX4_BY_PREDICTION). */
static inline void heun_loop(prediction_type prediction, sigma_scheduler *s, float sigma, float next,
                             const float *mo, const float *x, float *prev) {
    /* the second order's dt is the first's: the same two sigmas */
    const float sigma_input = s->k_second ? next : sigma, r = s->clip_sample_range, dt = next - sigma;
    const int clip = s->clip_sample;
    float *d1 = s->k_derivs[0], *saved = s->k_sample;
    if (!s->k_second) {
#pragma omp simd
        for (size_t k = 0; k < s->numel; k++) {
            float x0 = x0_at(prediction, sigma_input, mo[k], x[k]);
            if (clip) x0 = x0 < -r ? -r : x0 > r ? r : x0;
            d1[k] = (x[k] - x0) / sigma;
            saved[k] = x[k];
            prev[k] = x[k] + d1[k] * dt;
        }
    } else {
#pragma omp simd
        for (size_t k = 0; k < s->numel; k++) {
            float x0 = x0_at(prediction, sigma_input, mo[k], x[k]);
            if (clip) x0 = x0 < -r ? -r : x0 > r ? r : x0;
            float d = (d1[k] + (x[k] - x0) / next) / 2;
            prev[k] = saved[k] + d * dt;
        }
    }
}

static void heun_step(sigma_scheduler *s, int i, const float *mo, const float *x, float *prev) {
    float sigma = s->sigmas[s->k_second ? i - 1 : i], next = s->sigmas[s->k_second ? i : i + 1];
    SDX4_BY_PREDICTION(s->prediction, heun_loop, s, sigma, next, mo, x, prev);
    s->k_second = !s->k_second;
}

/* KDPM2's first or second half for one prediction type (SDX4_BY_PREDICTION). */
static inline void kdpm2_loop(prediction_type prediction, sigma_scheduler *s, int second, float sigma,
                              float interpol, float dt, const float *mo, const float *x, float *prev) {
    float *saved = s->k_sample;
    if (!second) {
#pragma omp simd
        for (size_t k = 0; k < s->numel; k++) {
            float x0 = x0_at(prediction, sigma, mo[k], x[k]), d = (x[k] - x0) / sigma;
            saved[k] = x[k];
            prev[k] = x[k] + d * dt;
        }
    } else {
#pragma omp simd
        for (size_t k = 0; k < s->numel; k++) {
            float x0 = x0_at(prediction, interpol, mo[k], x[k]), d = (x[k] - x0) / interpol;
            prev[k] = saved[k] + d * dt;
        }
    }
}

static int kdpm2_step(sigma_scheduler *s, int i, const float *mo, const float *x, torch_rng *rng,
                      float *prev) {
    int ancestral = s->method == SIGMA_KDPM2_ANCESTRAL, second = s->k_second;
    float sigma, interpol, up = 0, dt;
    if (!ancestral) {
        sigma = s->sigmas[second ? i - 1 : i];
        interpol = s->k_interpol[second ? i : i + 1];
        dt = second ? s->sigmas[i] - sigma : interpol - sigma;
    } else {
        sigma = s->sigmas[second ? i - 1 : i];
        interpol = s->k_interpol[second ? i - 1 : i];
        up = s->k_up[second ? i - 1 : i];
        dt = second ? s->k_down[i - 1] - sigma : interpol - sigma;
    }
    float *noise = ancestral && second ? s->noise : NULL;
    if (noise) sdx4_torch_randn(rng, noise, s->numel);
    SDX4_BY_PREDICTION(s->prediction, kdpm2_loop, s, second, sigma, interpol, dt, mo, x, prev);
    if (noise)
#pragma omp simd
        for (size_t k = 0; k < s->numel; k++) prev[k] = prev[k] + noise[k] * up;
    s->k_second = !second;
    return 0;
}

/* The integral over [s[t], s[t+1]] of the Lagrange basis polynomial that
 * is 1 at s[t - j] and 0 at the other s[t - k], k < order: expanded in
 * u = tau - s[t] and integrated term by term (quad's answer, exactly). */
static double lms_coefficient(const float *sig, int order, int t, int j) {
    double a = sig[t], h = (double)sig[t + 1] - a, poly[4] = {1, 0, 0, 0};
    int degree = 0;
    for (int k = 0; k < order; k++) {
        if (k == j) continue;
        double c = a - sig[t - k], den = (double)sig[t - j] - sig[t - k];
        /* poly *= (u + c) / den */
        for (int m = degree + 1; m > 0; m--) poly[m] = (poly[m - 1] + c * poly[m]) / den;
        poly[0] = c * poly[0] / den;
        degree++;
    }
    double integral = 0, hp = h;
    for (int m = 0; m <= degree; m++, hp *= h) integral += poly[m] * hp / (m + 1);
    return integral;
}

/* LMS's update for one prediction type (SDX4_BY_PREDICTION). */
static inline void lms_loop(prediction_type prediction, sigma_scheduler *s, int order, float sigma,
                            const float coeff[4], const float *mo, const float *x, float *prev) {
    float *d0 = s->k_derivs[0], *d1 = s->k_derivs[1], *d2 = s->k_derivs[2], *d3 = s->k_derivs[3];
#pragma omp simd
    for (size_t k = 0; k < s->numel; k++) {
        float x0 = x0_at(prediction, sigma, mo[k], x[k]);
        d0[k] = (x[k] - x0) / sigma;
        float sum = 0 + coeff[0] * d0[k]; /* the derivatives there are, oldest last */
        if (order > 1) sum = sum + coeff[1] * d1[k];
        if (order > 2) sum = sum + coeff[2] * d2[k];
        if (order > 3) sum = sum + coeff[3] * d3[k];
        prev[k] = x[k] + sum;
    }
}

static void lms_step(sigma_scheduler *s, int i, const float *mo, const float *x, float *prev) {
    float sigma = s->sigmas[i];
    float *oldest = s->k_derivs[3]; /* derivatives.pop(0) when a fifth comes */
    memmove(s->k_derivs + 1, s->k_derivs, 3 * sizeof *s->k_derivs);
    s->k_derivs[0] = oldest;
    int order = i + 1 < 4 ? i + 1 : 4; /* the pipeline's step(order=4) */
    float coeff[4];
    for (int j = 0; j < order; j++) coeff[j] = (float)lms_coefficient(s->sigmas, order, i, j);
    SDX4_BY_PREDICTION(s->prediction, lms_loop, s, order, sigma, coeff, mo, x, prev);
}

int sdx4_k_step(sigma_scheduler *s, int i, const float *model_output, const float *sample,
                torch_rng *rng, float *prev_sample) {
    if (s->method == SIGMA_KDPM2_ANCESTRAL && !rng) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "KDPM2 ancestral step: no generator");
        return -1;
    }
    switch (s->method) {
    case SIGMA_HEUN: heun_step(s, i, model_output, sample, prev_sample); return 0;
    case SIGMA_LMS: lms_step(s, i, model_output, sample, prev_sample); return 0;
    default: return kdpm2_step(s, i, model_output, sample, rng, prev_sample);
    }
}
