/*
 * scheduler_sigma.c - Euler and Euler ancestral as diffusers computes
 * them, and the sigma schedules every sigma sampler shares (the DPM-Solver
 * family's steps are in scheduler_dpm.c).
 *
 * All of them turn the noise schedule into sigmas, sigma(t) =
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
 */
#include "model/scheduler_sigma.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "model/scheduler_dpm.h"

/* ---------------------------------------------------------------- config */

static int is_dpm(const sigma_scheduler *s) {
    return s->method == SIGMA_DPM_MULTISTEP || s->method == SIGMA_DPM_SINGLESTEP ||
           s->method == SIGMA_DEIS;
}
static int is_k(const sigma_scheduler *s) { /* scheduler_k.c's */
    return s->method >= SIGMA_HEUN && s->method <= SIGMA_LMS;
}

int sdx4_sigma_read_spread(sigma_scheduler *s, const config *c) {
    if (sdx4_cfg_bool(c, "use_karras_sigmas", 0, &s->karras) ||
        sdx4_cfg_bool(c, "use_exponential_sigmas", 0, &s->exponential) ||
        sdx4_cfg_bool(c, "use_beta_sigmas", 0, &s->beta))
        return -1;
    if (s->karras + s->exponential + s->beta > 1) {
        sdx4_set_error(SDX4_ERR_MODEL,
                       "%s: only one of use_karras_sigmas, use_exponential_sigmas and "
                       "use_beta_sigmas can be true",
                       c->label);
        return -1;
    }
    return 0;
}

int sdx4_sigma_from_config(sigma_scheduler *s, const config *c) {
    static const char *const classes[] = {
        "EulerDiscreteScheduler",       "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",  "DPMSolverSinglestepScheduler",
        "DEISMultistepScheduler",       NULL};
    static const char *const predictions[] = {"epsilon", "v_prediction", "sample", NULL};
    static const char *const eps_or_v[] = {"epsilon", "v_prediction", NULL};
    static const char *const spacings[] = {"leading", "trailing", "linspace", NULL};
    static const char *const finals[] = {"zero", "sigma_min", NULL};
    static const char *const schedules[] = {"linear", "scaled_linear", "squaredcos_cap_v2", NULL};
    const char *name;
    if (!sdx4_cfg_str(c, "_class_name", "", &name) && sdx4_k_is_method(name, NULL))
        return sdx4_k_from_config(s, c);
    memset(s, 0, sizeof *s);
    int method, prediction = PREDICT_EPSILON, spacing = SPACING_LINSPACE, schedule = 0;
    if (sdx4_cfg_choice(c, "_class_name", "", classes, &method)) return -1;
    s->method = (sigma_method)method;
    if (sdx4_noise_schedule_load(c, classes[method], &s->num_train_timesteps, &s->alphas_cumprod))
        return -1;
    int rc = sdx4_cfg_choice(c, "beta_schedule", "linear", schedules, &schedule) ||
             sdx4_cfg_choice(c, "prediction_type", "epsilon",
                             method == SIGMA_EULER_ANCESTRAL ? eps_or_v : predictions,
                             &prediction);
    if (!rc && method != SIGMA_DPM_SINGLESTEP) /* which has neither key */
        rc = sdx4_cfg_choice(c, "timestep_spacing", "linspace", spacings, &spacing) ||
             sdx4_cfg_int(c, "steps_offset", 0, &s->steps_offset);
    if (!rc && method == SIGMA_EULER)
        rc = sdx4_sigma_read_spread(s, c) ||
             sdx4_cfg_choice(c, "final_sigmas_type", "zero", finals, &s->final_sigma_min) ||
             sdx4_cfg_expect_str(c, "interpolation_type", "linear") ||
             sdx4_cfg_expect_str(c, "timestep_type", "discrete") ||
             sdx4_cfg_expect_null(c, "sigma_min") || sdx4_cfg_expect_null(c, "sigma_max");
    s->prediction = (prediction_type)prediction;
    s->spacing = (timestep_spacing)spacing;
    s->cosine_betas = schedule == 2;
    if (!rc && is_dpm(s)) rc = sdx4_dpm_from_config(s, c);
    if (rc) {
        sdx4_sigma_free(s);
        return -1;
    }
    return 0;
}

void sdx4_sigma_free(sigma_scheduler *s) {
    free(s->alphas_cumprod);
    free(s->timesteps);
    free(s->sigmas);
    sdx4_dpm_free(s);
    sdx4_k_free(s);
    memset(s, 0, sizeof *s);
}

/* ------------------------------------------------------- set_timesteps */

/* ((1 - acp[t]) / acp[t]) ** 0.5 in float32. */
float sdx4_sigma_train(const sigma_scheduler *s, int t) {
    float a = s->alphas_cumprod[t];
    return sqrtf((1.0f - a) / a);
}

/* np.interp(t, arange(T), train sigmas): clamped to the ends, as numpy
 * does for a "trailing" -1 or a steps_offset past T - 1. */
double sdx4_sigma_interp(const sigma_scheduler *s, double t) {
    int T = s->num_train_timesteps;
    if (t <= 0) return sdx4_sigma_train(s, 0);
    if (t >= T - 1) return sdx4_sigma_train(s, T - 1);
    int j = (int)floor(t);
    double lo = sdx4_sigma_train(s, j), hi = sdx4_sigma_train(s, j + 1);
    if (t == (double)j) return lo;
    double slope = (hi - lo) / 1.0; /* numpy divides by xp[j + 1] - xp[j] */
    return slope * (t - (double)j) + lo;
}

/* _sigma_to_t: the fractional timestep whose log-sigma interpolates to
 * log(sigma); log_sigmas are np.log of the float32 train sigmas. */
double sdx4_sigma_to_t(const float *log_sigmas, int T, double sigma) {
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
void sdx4_sigma_karras(double sigma_min, double sigma_max, int n, double *out) {
    const double rho = 7.0;
    double min_inv_rho = pow(sigma_min, 1 / rho), max_inv_rho = pow(sigma_max, 1 / rho);
    for (int i = 0; i < n; i++) {
        double ramp = n > 1 ? (i == n - 1 ? 1.0 : i * (1.0 / (n - 1))) : 0.0;
        out[i] = pow(max_inv_rho + ramp * (min_inv_rho - max_inv_rho), rho);
    }
}

void sdx4_sigma_exponential(double sigma_min, double sigma_max, int n, double *out) {
    double start = log(sigma_max), step = n > 1 ? (log(sigma_min) - start) / (n - 1) : 0;
    for (int i = 0; i < n; i++) out[i] = exp(i == n - 1 && n > 1 ? log(sigma_min) : i * step + start);
}

/* I_x(a, b), the regularized incomplete beta function, by its continued
 * fraction evaluated with the modified Lentz method, on the side of the
 * mean where it converges in a few dozen terms (the other side by
 * I_x(a, b) = 1 - I_(1-x)(b, a)). */
static double incomplete_beta(double x, double a, double b) {
    if (x <= 0) return 0;
    if (x >= 1) return 1;
    if (x > (a + 1) / (a + b + 2)) return 1 - incomplete_beta(1 - x, b, a);
    const double tiny = 1e-300;
    double front = exp(lgamma(a + b) - lgamma(a) - lgamma(b) + a * log(x) + b * log1p(-x)) / a;
    double f = 1, c = 1, d = 0;
    for (int i = 0; i < 1000; i++) {
        int m = i / 2;
        double num = i == 0       ? 1
                     : i % 2 == 0 ? m * (b - m) * x / ((a + 2.0 * m - 1) * (a + 2.0 * m))
                                  : -((a + m) * (a + b + m) * x) / ((a + 2.0 * m) * (a + 2.0 * m + 1));
        d = 1 + num * d;
        d = 1 / (fabs(d) < tiny ? tiny : d);
        c = 1 + num / c;
        c = fabs(c) < tiny ? tiny : c;
        f *= c * d;
        if (fabs(1 - c * d) < 1e-15) break;
    }
    return front * (f - 1);
}

/* Bisection on I_x until the bracket is two adjacent doubles: slower than
 * Newton's method but it cannot leave [0, 1] where the density is
 * infinite (a, b < 1, as here), and a schedule needs only n of them. */
double sdx4_beta_ppf(double p, double a, double b) {
    if (!(p > 0)) return 0;
    if (p >= 1) return 1;
    double lo = 0, hi = 1;
    for (;;) {
        double mid = lo + (hi - lo) / 2;
        if (mid <= lo || mid >= hi) break;
        if (incomplete_beta(mid, a, b) < p) lo = mid;
        else hi = mid;
    }
    return fabs(incomplete_beta(lo, a, b) - p) < fabs(incomplete_beta(hi, a, b) - p) ? lo : hi;
}

/* scipy.stats.beta.ppf(1 - ramp, 0.6, 0.6) spread between the extremes. */
void sdx4_sigma_beta(double sigma_min, double sigma_max, int n, double *out) {
    for (int i = 0; i < n; i++) {
        double ramp = n > 1 ? (i == n - 1 ? 1.0 : i * (1.0 / (n - 1))) : 0.0;
        out[i] = sigma_min + sdx4_beta_ppf(1 - ramp, 0.6, 0.6) * (sigma_max - sigma_min);
    }
}

int sdx4_sigma_convert(const sigma_scheduler *s, double sigma_min, double sigma_max, int n,
                       double *out) {
    if (s->karras) sdx4_sigma_karras(sigma_min, sigma_max, n, out);
    else if (s->exponential) sdx4_sigma_exponential(sigma_min, sigma_max, n, out);
    else if (s->beta) sdx4_sigma_beta(sigma_min, sigma_max, n, out);
    return s->karras || s->exponential || s->beta;
}

/* Euler's and Euler ancestral's timesteps of the spacing, as doubles (the
 * DPM family's are in scheduler_dpm.c). */
static int spaced_timesteps(const sigma_scheduler *s, int n, double *out) {
    int T = s->num_train_timesteps;
    if (s->spacing == SPACING_TRAILING) {
        int count = sdx4_trailing_arange(T, n, out);
        for (int i = 0; i < count; i++) out[i] = nearbyint(out[i]) - 1;
        return count;
    }
    for (int i = 0; i < n; i++) {
        int k = n - 1 - i; /* reversed */
        if (s->spacing == SPACING_LEADING) {
            out[i] = (double)(k * (T / n)) + s->steps_offset;
        } else { /* np.linspace(0, T - 1, n), float32 */
            double v = n > 1 ? (k == n - 1 ? (double)(T - 1) : k * ((double)(T - 1) / (n - 1))) : 0;
            out[i] = (double)(float)v;
        }
    }
    return n;
}

/* Euler's sigmas (count + 1 of them, the last one final) at its timesteps;
 * Karras, exponential and beta sigmas lie between the interpolated ones,
 * their timesteps kept fractional. */
static int euler_schedule(const sigma_scheduler *s, int n, const float *log_sigmas, double *ts,
                          double *sig) {
    int count = spaced_timesteps(s, n, ts);
    for (int i = 0; i < count; i++) sig[i] = sdx4_sigma_interp(s, ts[i]);
    if (sdx4_sigma_convert(s, sig[count - 1], sig[0], n, sig)) {
        count = n;
        for (int i = 0; i < n; i++) ts[i] = sdx4_sigma_to_t(log_sigmas, s->num_train_timesteps, sig[i]);
    }
    sig[count] = s->final_sigma_min ? sdx4_sigma_train(s, 0) : 0.0;
    return count;
}

int sdx4_sigma_set_timesteps(sigma_scheduler *s, int n, size_t numel) {
    int T = s->num_train_timesteps;
    if (n < 1 || n > T) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                       "num_inference_steps=%d: must be between 1 and num_train_timesteps=%d", n, T);
        return -1;
    }
    double *ts = malloc((size_t)(n + 1) * sizeof *ts), *sig = malloc((size_t)(n + 2) * sizeof *sig);
    float *log_sigmas = malloc((size_t)T * sizeof *log_sigmas);
    float *timesteps = malloc((size_t)(n + 1) * sizeof *timesteps);
    float *sigmas = malloc((size_t)(n + 2) * sizeof *sigmas);
    int rc = -1;
    if (!ts || !sig || !log_sigmas || !timesteps || !sigmas) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "set_timesteps(%d): out of memory", n);
        goto done;
    }
    for (int t = 0; t < T; t++) log_sigmas[t] = logf(sdx4_sigma_train(s, t));
    int count = is_dpm(s) ? sdx4_dpm_schedule(s, n, log_sigmas, ts, sig)
                          : euler_schedule(s, n, log_sigmas, ts, sig);
    for (int i = 0; i < count; i++) timesteps[i] = (float)ts[i];
    for (int i = 0; i <= count; i++) sigmas[i] = (float)sig[i];
    float max_sigma = 0;
    for (int i = 0; i <= count; i++)
        if (sigmas[i] > max_sigma) max_sigma = sigmas[i];
    s->init_noise_sigma = is_dpm(s) ? 1.0f
                          : s->spacing == SPACING_LEADING ? sqrtf(max_sigma * max_sigma + 1.0f)
                                                          : max_sigma;
    if (is_dpm(s) && sdx4_dpm_start(s, count, numel)) goto done;
    free(s->timesteps), free(s->sigmas);
    s->timesteps = timesteps, s->sigmas = sigmas;
    timesteps = NULL, sigmas = NULL;
    s->num_timesteps = count;
    s->numel = numel;
    s->step_index = 0;
    s->lower_order_nums = 0;
    rc = is_k(s) ? sdx4_k_set_timesteps(s) : 0; /* from Euler's schedule */
    if (!rc && !is_dpm(s) && (s->method == SIGMA_EULER_ANCESTRAL || s->method == SIGMA_KDPM2_ANCESTRAL)) {
        free(s->noise); /* the ancestral samplers' noise: one buffer for the run, not one a step */
        if (!(s->noise = malloc(numel * sizeof *s->noise))) {
            sdx4_set_error(SDX4_ERR_NO_MEMORY, "set_timesteps(%d): out of memory", n);
            rc = -1;
        }
    }
done:
    free(ts), free(sig), free(log_sigmas), free(timesteps), free(sigmas);
    return rc;
}

/* ------------------------------------------------------------- stepping */

int sdx4_sigma_draws_noise(const sigma_scheduler *s) {
    return s->method == SIGMA_EULER_ANCESTRAL || s->method == SIGMA_KDPM2_ANCESTRAL ||
           (is_dpm(s) && (s->algorithm == DPM_SDE_PLUSPLUS || s->algorithm == DPM_SDE_SOLVER));
}

float sdx4_sigma_input_scale(const sigma_scheduler *s, int i) {
    if (is_dpm(s)) return 1.0f;
    if (is_k(s)) return sdx4_k_input_scale(s, i);
    float sigma = s->sigmas[i];
    return sqrtf(sigma * sigma + 1.0f);
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
#pragma omp simd
        for (size_t k = 0; k < n; k++) {
            float x0 = euler_x0(s, sigma, c_out, c_in, mo[k], x[k]);
            prev[k] = x[k] + (x[k] - x0) / sigma * dt;
        }
        return 0;
    }
    float to2 = sigma_next * sigma_next;
    float sigma_up = sqrtf(to2 * (sigma * sigma - to2) / (sigma * sigma));
    float sigma_down = sqrtf(to2 - sigma_up * sigma_up), dt = sigma_down - sigma;
    float *noise = s->noise;
    sdx4_torch_randn(rng, noise, n);
#pragma omp simd
    for (size_t k = 0; k < n; k++) {
        float x0 = euler_x0(s, sigma, c_out, c_in, mo[k], x[k]);
        float p = x[k] + (x[k] - x0) / sigma * dt;
        prev[k] = p + noise[k] * sigma_up;
    }
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
             : is_dpm(s) ? sdx4_dpm_step(s, i, model_output, sample, rng, prev_sample)
                         : euler_step(s, i, model_output, sample, rng, prev_sample);
    if (rc == 0) s->step_index++;
    return rc;
}
