/*
 * scheduler_sigma.c - Euler, Euler ancestral and DPM-Solver++ multistep,
 * as diffusers computes them.
 *
 * All three turn the noise schedule into sigmas, sigma(t) =
 * sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]) in float32 (a torch
 * expression), and walk them from large to small. set_timesteps() is numpy
 * in diffusers, so it is done in double here and rounded to float where
 * numpy's arrays are float32: the timesteps of each spacing, np.interp of
 * the sigmas at them (exact at the integer timesteps the spacings give),
 * the Karras schedule (rho = 7 between the extreme sigmas) and its
 * _sigma_to_t, which interpolates log-sigmas to map each Karras sigma back
 * to a fractional timestep (DPM rounds it half to even, Euler keeps it).
 *
 * Not everything is bit for bit. torch's CPU sqrt is not always correctly
 * rounded: the tiny model's sigma at t=142 is one ulp above sqrtf's. And
 * np.log over float32 is numpy's own vectorized log, which _sigma_to_t
 * reads for the Karras timesteps. Both stay far inside the goldens'
 * tolerances (test_samplers.c measures them).
 *
 * The steps are one float operation per torch operation of diffusers, in
 * its order: coefficients as 0-dim float32 tensors, then per element.
 * torch's log and exp on 0-dim tensors are logf and expf. A final sigma of
 * zero makes DPM's lambda +inf, h +inf and exp(-h) 0, exactly as in torch,
 * which is how its last step lands on the predicted sample.
 */
#include "model/scheduler_sigma.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

/* ---------------------------------------------------------------- config */

static int is_dpm(const sigma_scheduler *s) { return s->method == SIGMA_DPM_MULTISTEP; }
static int is_k(const sigma_scheduler *s) { /* scheduler_k.c's */
    return s->method >= SIGMA_HEUN && s->method <= SIGMA_LMS;
}

int sdx4_sigma_from_config(sigma_scheduler *s, const config *c) {
    static const char *const classes[] = {"EulerDiscreteScheduler",
                                          "EulerAncestralDiscreteScheduler",
                                          "DPMSolverMultistepScheduler", NULL};
    static const char *const predictions[] = {"epsilon", "v_prediction", "sample", NULL};
    static const char *const eps_or_v[] = {"epsilon", "v_prediction", NULL};
    static const char *const spacings[] = {"leading", "trailing", "linspace", NULL};
    static const char *const finals[] = {"zero", "sigma_min", NULL};
    static const char *const solvers[] = {"midpoint", "heun", NULL};
    static const char *const schedules[] = {"linear", "scaled_linear", "squaredcos_cap_v2", NULL};
    const char *name;
    if (!sdx4_cfg_str(c, "_class_name", "", &name) && sdx4_k_is_method(name, NULL))
        return sdx4_k_from_config(s, c);
    memset(s, 0, sizeof *s);
    int method, prediction, spacing, schedule;
    if (sdx4_cfg_choice(c, "_class_name", "", classes, &method)) return -1;
    s->method = (sigma_method)method;
    if (sdx4_noise_schedule_load(c, classes[method], &s->num_train_timesteps, &s->alphas_cumprod))
        return -1;
    int rc = sdx4_cfg_choice(c, "beta_schedule", "linear", schedules, &schedule) ||
             sdx4_cfg_choice(c, "prediction_type", "epsilon",
                             method == SIGMA_EULER_ANCESTRAL ? eps_or_v : predictions,
                             &prediction) ||
             sdx4_cfg_choice(c, "timestep_spacing", "linspace", spacings, &spacing) ||
             sdx4_cfg_int(c, "steps_offset", 0, &s->steps_offset);
    if (!rc && method != SIGMA_EULER_ANCESTRAL)
        rc = sdx4_cfg_bool(c, "use_karras_sigmas", 0, &s->karras) ||
             sdx4_cfg_choice(c, "final_sigmas_type", "zero", finals, &s->final_sigma_min) ||
             sdx4_cfg_expect_bool(c, "use_exponential_sigmas", 0) ||
             sdx4_cfg_expect_bool(c, "use_beta_sigmas", 0);
    if (!rc && method == SIGMA_EULER)
        rc = sdx4_cfg_expect_str(c, "interpolation_type", "linear") ||
             sdx4_cfg_expect_str(c, "timestep_type", "discrete") ||
             sdx4_cfg_expect_null(c, "sigma_min") || sdx4_cfg_expect_null(c, "sigma_max");
    if (!rc && is_dpm(s)) {
        rc = sdx4_cfg_int(c, "solver_order", 2, &s->solver_order) ||
             sdx4_cfg_choice(c, "solver_type", "midpoint", solvers, &s->heun) ||
             sdx4_cfg_bool(c, "lower_order_final", 1, &s->lower_order_final) ||
             sdx4_cfg_bool(c, "euler_at_final", 0, &s->euler_at_final) ||
             sdx4_cfg_expect_str(c, "algorithm_type", "dpmsolver++") ||
             sdx4_cfg_expect_bool(c, "thresholding", 0) ||
             sdx4_cfg_expect_bool(c, "use_lu_lambdas", 0) ||
             sdx4_cfg_expect_bool(c, "use_flow_sigmas", 0) ||
             sdx4_cfg_expect_bool(c, "use_dynamic_shifting", 0) ||
             sdx4_cfg_expect_null(c, "variance_type") ||
             sdx4_cfg_expect_null(c, "lambda_min_clipped");
        if (!rc && (s->solver_order < 1 || s->solver_order > 2)) {
            sdx4_set_error(SDX4_ERR_MODEL, "%s: solver_order=%d is not supported (supported: 1, 2)",
                           c->label, s->solver_order);
            rc = -1;
        }
    }
    if (rc) {
        sdx4_sigma_free(s);
        return -1;
    }
    s->prediction = (prediction_type)prediction;
    s->spacing = (timestep_spacing)spacing;
    s->cosine_betas = schedule == 2;
    return 0;
}

void sdx4_sigma_free(sigma_scheduler *s) {
    free(s->alphas_cumprod);
    free(s->timesteps);
    free(s->sigmas);
    free(s->model_outputs[0]);
    free(s->model_outputs[1]);
    sdx4_k_free(s);
    memset(s, 0, sizeof *s);
}

/* ------------------------------------------------------- set_timesteps */

/* ((1 - acp[t]) / acp[t]) ** 0.5 in float32. */
static float train_sigma(const sigma_scheduler *s, int t) {
    float a = s->alphas_cumprod[t];
    return sqrtf((1.0f - a) / a);
}

/* np.interp(t, arange(T), train sigmas): clamped to the ends, as numpy
 * does for a "trailing" -1 or a steps_offset past T - 1. */
static double interp_sigma(const sigma_scheduler *s, double t) {
    int T = s->num_train_timesteps;
    if (t <= 0) return train_sigma(s, 0);
    if (t >= T - 1) return train_sigma(s, T - 1);
    int j = (int)floor(t);
    double lo = train_sigma(s, j), hi = train_sigma(s, j + 1);
    if (t == (double)j) return lo;
    double slope = (hi - lo) / 1.0; /* numpy divides by xp[j + 1] - xp[j] */
    return slope * (t - (double)j) + lo;
}

/* _sigma_to_t: the fractional timestep whose log-sigma interpolates to
 * log(sigma); log_sigmas are np.log of the float32 train sigmas. */
static double sigma_to_t(const float *log_sigmas, int T, double sigma) {
    double log_sigma = log(sigma > 1e-10 ? sigma : 1e-10);
    int low = 0; /* the last index whose log-sigma is <= log_sigma */
    for (int j = 0; j < T; j++)
        if (log_sigma - (double)log_sigmas[j] >= 0) low = j;
    if (low > T - 2) low = T - 2;
    float lo = log_sigmas[low], hi = log_sigmas[low + 1];
    double w = ((double)lo - log_sigma) / (double)(lo - hi);
    w = w < 0 ? 0 : w > 1 ? 1 : w;
    return (1 - w) * low + w * (low + 1);
}

/* _convert_to_karras: n sigmas from sigma_max down to sigma_min, rho 7. */
static void karras(double sigma_min, double sigma_max, int n, double *out) {
    const double rho = 7.0;
    double min_inv_rho = pow(sigma_min, 1 / rho), max_inv_rho = pow(sigma_max, 1 / rho);
    for (int i = 0; i < n; i++) {
        double ramp = n > 1 ? (i == n - 1 ? 1.0 : i * (1.0 / (n - 1))) : 0.0;
        out[i] = pow(max_inv_rho + ramp * (min_inv_rho - max_inv_rho), rho);
    }
}

/* The timesteps of the spacing, as doubles. Euler and Euler ancestral
 * space n timesteps over [0, T); DPM spaces n + 1 and drops the last. */
static int spaced_timesteps(const sigma_scheduler *s, int n, double *out) {
    int T = s->num_train_timesteps;
    if (s->spacing == SPACING_TRAILING) {
        int count = sdx4_trailing_arange(T, n, out);
        for (int i = 0; i < count; i++) out[i] = nearbyint(out[i]) - 1;
        return count;
    }
    int m = is_dpm(s) ? n + 1 : n; /* points spaced; the first n are used */
    for (int i = 0; i < n; i++) {
        int k = m - 1 - i; /* reversed */
        if (s->spacing == SPACING_LEADING) {
            out[i] = (double)(k * (T / m)) + s->steps_offset;
        } else { /* np.linspace(0, T - 1, m) */
            double v = m > 1 ? (k == m - 1 ? (double)(T - 1) : k * ((double)(T - 1) / (m - 1))) : 0;
            /* Euler's linspace is float32; DPM's is rounded to int64 */
            out[i] = is_dpm(s) ? nearbyint(v) : (double)(float)v;
        }
    }
    return n;
}

int sdx4_sigma_set_timesteps(sigma_scheduler *s, int n, size_t numel) {
    int T = s->num_train_timesteps;
    if (n < 1 || n > T) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                       "num_inference_steps=%d: must be between 1 and num_train_timesteps=%d", n, T);
        return -1;
    }
    double *ts = malloc((size_t)(n + 1) * sizeof *ts), *sig = malloc((size_t)(n + 1) * sizeof *sig);
    float *log_sigmas = malloc((size_t)T * sizeof *log_sigmas);
    float *timesteps = malloc((size_t)(n + 1) * sizeof *timesteps);
    float *sigmas = malloc((size_t)(n + 2) * sizeof *sigmas);
    float *outputs[2] = {malloc(numel * sizeof(float)), malloc(numel * sizeof(float))};
    int rc = -1;
    if (!ts || !sig || !log_sigmas || !timesteps || !sigmas || !outputs[0] || !outputs[1]) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "set_timesteps(%d): out of memory", n);
        goto done;
    }
    int count = spaced_timesteps(s, n, ts);
    for (int i = 0; i < count; i++) sig[i] = interp_sigma(s, ts[i]);
    if (s->karras) {
        /* Euler: between its interpolated sigmas; DPM: the whole schedule */
        double lo = is_dpm(s) ? train_sigma(s, 0) : sig[count - 1];
        double hi = is_dpm(s) ? train_sigma(s, T - 1) : sig[0];
        for (int t = 0; t < T; t++) log_sigmas[t] = logf(train_sigma(s, t));
        count = n;
        karras(lo, hi, n, sig);
        for (int i = 0; i < n; i++) {
            double t = sigma_to_t(log_sigmas, T, sig[i]);
            ts[i] = is_dpm(s) && !s->cosine_betas ? nearbyint(t) : t;
        }
    }
    for (int i = 0; i < count; i++) {
        timesteps[i] = (float)ts[i];
        sigmas[i] = (float)sig[i];
    }
    sigmas[count] = s->final_sigma_min ? train_sigma(s, 0) : 0.0f;
    float max_sigma = 0;
    for (int i = 0; i <= count; i++)
        if (sigmas[i] > max_sigma) max_sigma = sigmas[i];
    s->init_noise_sigma = is_dpm(s) ? 1.0f
                          : s->spacing == SPACING_LEADING ? sqrtf(max_sigma * max_sigma + 1.0f)
                                                          : max_sigma;
    free(s->timesteps), free(s->sigmas), free(s->model_outputs[0]), free(s->model_outputs[1]);
    s->timesteps = timesteps, s->sigmas = sigmas;
    s->model_outputs[0] = outputs[0], s->model_outputs[1] = outputs[1];
    timesteps = NULL, sigmas = NULL, outputs[0] = outputs[1] = NULL;
    s->num_timesteps = count;
    s->numel = numel;
    s->step_index = 0;
    s->lower_order_nums = 0;
    rc = is_k(s) ? sdx4_k_set_timesteps(s) : 0; /* from Euler's schedule */
done:
    free(ts), free(sig), free(log_sigmas), free(timesteps), free(sigmas);
    free(outputs[0]), free(outputs[1]);
    return rc;
}

/* ------------------------------------------------------------- stepping */

void sdx4_sigma_scale_model_input(const sigma_scheduler *s, int i, const float *sample,
                                  float *out) {
    if (is_k(s)) {
        sdx4_k_scale_model_input(s, i, sample, out);
        return;
    }
    if (is_dpm(s)) {
        if (out != sample) memcpy(out, sample, s->numel * sizeof *out);
        return;
    }
    float sigma = s->sigmas[i], scale = sqrtf(sigma * sigma + 1.0f);
    for (size_t k = 0; k < s->numel; k++) out[k] = sample[k] / scale;
}

/* Euler's pred_original_sample from the model output. */
static float euler_x0(const sigma_scheduler *s, float sigma, float c_out, float c_in, float mo,
                      float x) {
    if (s->prediction == PREDICT_EPSILON) return x - sigma * mo;
    if (s->prediction == PREDICT_V) return mo * c_out + x / c_in;
    return mo;
}

static int euler_step(sigma_scheduler *s, int i, const float *mo, const float *x, torch_rng *rng,
                      float *prev) {
    size_t n = s->numel;
    float sigma = s->sigmas[i], sigma_next = s->sigmas[i + 1];
    float c_in = sigma * sigma + 1.0f, c_out = -sigma / sqrtf(sigma * sigma + 1.0f);
    if (s->method == SIGMA_EULER) { /* s_churn = 0: sigma_hat = sigma */
        float dt = sigma_next - sigma;
        for (size_t k = 0; k < n; k++) {
            float x0 = euler_x0(s, sigma, c_out, c_in, mo[k], x[k]);
            prev[k] = x[k] + (x[k] - x0) / sigma * dt;
        }
        return 0;
    }
    float to2 = sigma_next * sigma_next;
    float sigma_up = sqrtf(to2 * (sigma * sigma - to2) / (sigma * sigma));
    float sigma_down = sqrtf(to2 - sigma_up * sigma_up), dt = sigma_down - sigma;
    float *noise = malloc(n * sizeof *noise);
    if (!noise) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "Euler ancestral step: out of memory");
        return -1;
    }
    sdx4_torch_randn(rng, noise, n);
    for (size_t k = 0; k < n; k++) {
        float x0 = euler_x0(s, sigma, c_out, c_in, mo[k], x[k]);
        float p = x[k] + (x[k] - x0) / sigma * dt;
        prev[k] = p + noise[k] * sigma_up;
    }
    free(noise);
    return 0;
}

/* _sigma_to_alpha_sigma_t and the log-SNR lambda of one sigma. */
typedef struct {
    float alpha, sigma, lambda;
} dpm_point;

static dpm_point dpm_at(float sigma) {
    dpm_point p;
    p.alpha = 1.0f / sqrtf(sigma * sigma + 1.0f);
    p.sigma = sigma * p.alpha;
    p.lambda = logf(p.alpha) - logf(p.sigma);
    return p;
}

static int dpm_step(sigma_scheduler *s, int i, const float *mo, const float *x, float *prev) {
    size_t n = s->numel;
    int N = s->num_timesteps;
    int lower_final = i == N - 1 && (s->euler_at_final || (s->lower_order_final && N < 15) ||
                                     !s->final_sigma_min);
    /* convert_model_output: the predicted x0, kept for the next step */
    float *older = s->model_outputs[0], *x0 = older;
    s->model_outputs[0] = s->model_outputs[1];
    s->model_outputs[1] = x0;
    dpm_point s0 = dpm_at(s->sigmas[i]), t = dpm_at(s->sigmas[i + 1]);
    for (size_t k = 0; k < n; k++) {
        if (s->prediction == PREDICT_EPSILON) x0[k] = (x[k] - s0.sigma * mo[k]) / s0.alpha;
        else if (s->prediction == PREDICT_V) x0[k] = s0.alpha * x[k] - s0.sigma * mo[k];
        else x0[k] = mo[k];
    }
    float h = t.lambda - s0.lambda;
    float ratio = t.sigma / s0.sigma, c0 = t.alpha * (expf(-h) - 1.0f);
    if (s->solver_order == 1 || s->lower_order_nums < 1 || lower_final) {
        for (size_t k = 0; k < n; k++) prev[k] = ratio * x[k] - c0 * x0[k];
    } else { /* second order (diffusers' lower_order_second matters from order 3) */
        dpm_point s1 = dpm_at(s->sigmas[i - 1]);
        float h0 = s0.lambda - s1.lambda, r0 = h0 / h, inv_r0 = 1.0f / r0;
        const float *m0 = x0, *m1 = s->model_outputs[0];
        float c1 = s->heun ? t.alpha * ((expf(-h) - 1.0f) / h + 1.0f) : 0.5f * c0;
        for (size_t k = 0; k < n; k++) {
            float d1 = inv_r0 * (m0[k] - m1[k]), a = ratio * x[k] - c0 * m0[k];
            prev[k] = s->heun ? a + c1 * d1 : a - c1 * d1;
        }
    }
    if (s->lower_order_nums < s->solver_order) s->lower_order_nums++;
    return 0;
}

int sdx4_sigma_step(sigma_scheduler *s, int i, const float *model_output, const float *sample,
                    torch_rng *rng, float *prev_sample) {
    if (!s->timesteps || i != s->step_index || i >= s->num_timesteps) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "scheduler step %d: expected step %d of %d", i,
                       s->step_index, s->num_timesteps);
        return -1;
    }
    if (s->method == SIGMA_EULER_ANCESTRAL && !rng) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "Euler ancestral step: no generator");
        return -1;
    }
    int rc = is_k(s)     ? sdx4_k_step(s, i, model_output, sample, rng, prev_sample)
             : is_dpm(s) ? dpm_step(s, i, model_output, sample, prev_sample)
                         : euler_step(s, i, model_output, sample, rng, prev_sample);
    if (rc == 0) s->step_index++;
    return rc;
}
