/*
 * scheduler_alpha.c - DDPM and PNDM as samplers, as diffusers computes
 * them: the coefficients are 0-dim float32 tensors there (one float
 * operation each here), the tensors one float operation per element per
 * torch operation, in diffusers' order; scalars diffusers writes as Python
 * numbers (1 / 6, 23, 1 / 24) are rounded to float first, as torch does
 * when it multiplies a float32 tensor by one.
 *
 * DDPM's step is DDIM's with eta 1 and its own variance: the posterior
 * mean of x_{t-1} from the predicted x_0 (clipped or thresholded) and x_t,
 * plus sqrt(variance) times noise drawn for every timestep above 0. Its
 * previous timestep is the next entry of the timesteps (diffusers looks t
 * up in them), -1 after the last, where alpha_prod is 1.
 *
 * PNDM (pseudo numerical methods) reuses each model output across steps.
 * Its warm-up is a Runge-Kutta method (step_prk): four UNet evaluations
 * per step, at t, t - ratio/2 twice and t - ratio, for the first three
 * steps, whose outputs are combined 1/6, 1/3, 1/3, 1/6; then the linear
 * multistep method (step_plms) combines the last four outputs with the
 * Adams-Bashforth weights 55, -59, 37, -9 over 24. With skip_prk_steps
 * there is no warm-up: PLMS starts at order 1, evaluates the second step
 * twice (the second time at the first step's t, averaging, a Heun step)
 * and rises an order per step. diffusers keys all of this on a counter
 * of steps taken; so does this file, and the timestep the pipeline passes
 * in is what diffusers' pipeline passes: timesteps[i].
 */
#include "model/scheduler_alpha.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

static const char *const spacings[] = {"leading", "trailing", "linspace", NULL};

/* alphas_cumprod[t], a negative t from the end as a torch index. */
static float alpha_at(const float *acp, int T, int t) { return acp[t < 0 ? t + T : t]; }

/* ----------------------------------------------------------------- DDPM */

int sdx4_ddpm_sampler_from_config(ddpm_sampler *s, const config *c) {
    static const char *const predictions[] = {"epsilon", "v_prediction", "sample", NULL};
    static const char *const variances[] = {"fixed_small", "fixed_small_log", "fixed_large", NULL};
    memset(s, 0, sizeof *s);
    double clip_range, ratio, max_value;
    int prediction, spacing, variance;
    if (sdx4_noise_schedule_load(c, "DDPMScheduler", &s->num_train_timesteps, &s->alphas_cumprod))
        return -1;
    if (sdx4_cfg_choice(c, "prediction_type", "epsilon", predictions, &prediction) ||
        sdx4_cfg_choice(c, "timestep_spacing", "leading", spacings, &spacing) ||
        sdx4_cfg_int(c, "steps_offset", 0, &s->steps_offset) ||
        sdx4_cfg_choice(c, "variance_type", "fixed_small", variances, &variance) ||
        sdx4_cfg_bool(c, "clip_sample", 1, &s->clip_sample) ||
        sdx4_cfg_float(c, "clip_sample_range", 1.0, &clip_range) ||
        sdx4_cfg_bool(c, "thresholding", 0, &s->thresholding) ||
        sdx4_cfg_float(c, "dynamic_thresholding_ratio", 0.995, &ratio) ||
        sdx4_cfg_float(c, "sample_max_value", 1.0, &max_value)) {
        sdx4_ddpm_sampler_free(s);
        return -1;
    }
    if (s->thresholding && !(ratio >= 0 && ratio <= 1)) { /* torch.quantile's range */
        sdx4_set_error(SDX4_ERR_MODEL, "%s: dynamic_thresholding_ratio=%g is outside [0, 1]",
                       c->label, ratio);
        sdx4_ddpm_sampler_free(s);
        return -1;
    }
    s->prediction = (prediction_type)prediction;
    s->spacing = (timestep_spacing)spacing;
    s->variance = (variance_type)variance;
    s->clip_sample_range = (float)clip_range;
    s->dynamic_thresholding_ratio = (float)ratio;
    s->sample_max_value = (float)max_value;
    return 0;
}

void sdx4_ddpm_sampler_free(ddpm_sampler *s) {
    free(s->alphas_cumprod);
    free(s->timesteps);
    free(s->x0), free(s->noise), free(s->scratch);
    memset(s, 0, sizeof *s);
}

int sdx4_ddpm_sampler_set_timesteps(ddpm_sampler *s, int n, size_t numel) {
    int count, *ts = sdx4_spaced_timesteps(s->num_train_timesteps, n, s->spacing, s->steps_offset,
                                           &count);
    if (!ts) return -1;
    free(s->timesteps);
    s->timesteps = ts;
    s->num_timesteps = count;
    /* the step's buffers, once for the run rather than at every step */
    free(s->x0), free(s->noise), free(s->scratch);
    s->x0 = s->scratch = NULL;
    s->noise = malloc(numel * sizeof *s->noise);
    if (s->thresholding) /* x_0 whole before its quantile; else the step is one pass */
        s->x0 = malloc(numel * sizeof *s->x0), s->scratch = malloc(numel * sizeof *s->scratch);
    s->numel = numel;
    if (!s->noise || (s->thresholding && (!s->x0 || !s->scratch))) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "DDPM set_timesteps: out of memory for %zu values", numel);
        return -1;
    }
    return 0;
}

typedef struct {
    float sqrt_alpha, sqrt_beta, x0_coeff, sample_coeff, lo, hi;
    int clip;
} ddpm_coefs;

/* The predicted x_0 for one prediction type (SDX4_BY_PREDICTION). */
static inline float ddpm_x0_at(prediction_type prediction, const ddpm_coefs *k, float out, float x) {
    return prediction == PREDICT_EPSILON  ? (x - k->sqrt_beta * out) / k->sqrt_alpha
           : prediction == PREDICT_SAMPLE ? out
                                          : k->sqrt_alpha * x - k->sqrt_beta * out;
}

static inline void ddpm_x0(prediction_type prediction, const ddpm_coefs *k, const float *model_output,
                           const float *sample, size_t n, float *x0) {
#pragma omp simd
    for (size_t e = 0; e < n; e++) x0[e] = ddpm_x0_at(prediction, k, model_output[e], sample[e]);
}

/* x_0, clipped when asked, and the posterior mean, in one pass. */
static inline void ddpm_mean(prediction_type prediction, const ddpm_coefs *k, const float *model_output,
                             const float *sample, size_t n, float *prev_sample) {
    const float lo = k->lo, hi = k->hi, x0_coeff = k->x0_coeff, sample_coeff = k->sample_coeff;
    const int clip = k->clip;
#pragma omp simd
    for (size_t e = 0; e < n; e++) {
        float x0 = ddpm_x0_at(prediction, k, model_output[e], sample[e]);
        if (clip) x0 = x0 < lo ? lo : x0 > hi ? hi : x0;
        prev_sample[e] = x0_coeff * x0 + sample_coeff * sample[e];
    }
}

int sdx4_ddpm_sampler_step(const ddpm_sampler *s, int i, const float *model_output,
                           const float *sample, torch_rng *rng, float *prev_sample) {
    int T = s->num_train_timesteps;
    if (!s->timesteps || i < 0 || i >= s->num_timesteps) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "DDPM step %d of %d", i, s->num_timesteps);
        return -1;
    }
    size_t n = s->numel;
    int t = s->timesteps[i], prev_t = i + 1 < s->num_timesteps ? s->timesteps[i + 1] : -1;
    float *x0 = s->x0, *noise = t > 0 ? s->noise : NULL;

    /* 1. alphas and betas, 0-dim float32 tensors in diffusers */
    float alpha_prod_t = alpha_at(s->alphas_cumprod, T, t);
    float alpha_prod_t_prev = prev_t >= 0 ? s->alphas_cumprod[prev_t] : 1.0f;
    float beta_prod_t = 1.0f - alpha_prod_t, beta_prod_t_prev = 1.0f - alpha_prod_t_prev;
    float current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
    float current_beta_t = 1.0f - current_alpha_t;
    float sqrt_alpha = sqrtf(alpha_prod_t), sqrt_beta = sqrtf(beta_prod_t);

    /* 4-6. the posterior mean's coefficients, and the noise for t > 0 */
    float x0_coeff = (sqrtf(alpha_prod_t_prev) * current_beta_t) / beta_prod_t;
    float sample_coeff = sqrtf(current_alpha_t) * beta_prod_t_prev / beta_prod_t;
    float stddev = 0;
    if (noise) {
        sdx4_torch_randn(rng, noise, n);
        float variance = (1.0f - alpha_prod_t_prev) / (1.0f - alpha_prod_t) * current_beta_t;
        variance = variance < 1e-20f ? 1e-20f : variance; /* torch.clamp(min=1e-20) */
        stddev = s->variance == VARIANCE_FIXED_SMALL_LOG ? expf(0.5f * logf(variance))
                 : s->variance == VARIANCE_FIXED_LARGE   ? sqrtf(current_beta_t)
                                                         : sqrtf(variance);
    }
    ddpm_coefs k = {sqrt_alpha, sqrt_beta, x0_coeff, sample_coeff, -s->clip_sample_range,
                    s->clip_sample_range, s->clip_sample && !s->thresholding};

    /* 2-3. the predicted x_0, clipped or thresholded; thresholding needs
     * all of x_0 first (a quantile), the rest is one pass */
    if (s->thresholding) {
        SDX4_BY_PREDICTION(s->prediction, ddpm_x0, &k, model_output, sample, n, x0);
        sdx4_threshold_sample(x0, n, s->dynamic_thresholding_ratio, s->sample_max_value, s->scratch);
        ddpm_mean(PREDICT_SAMPLE, &k, x0, sample, n, prev_sample); /* x0 as it stands: no clip */
    } else {
        SDX4_BY_PREDICTION(s->prediction, ddpm_mean, &k, model_output, sample, n, prev_sample);
    }
    if (noise)
#pragma omp simd
        for (size_t e = 0; e < n; e++) prev_sample[e] = prev_sample[e] + stddev * noise[e];
    return 0;
}

/* ----------------------------------------------------------------- PNDM */

int sdx4_pndm_from_config(pndm_sampler *s, const config *c) {
    static const char *const predictions[] = {"epsilon", "v_prediction", NULL};
    memset(s, 0, sizeof *s);
    int prediction, spacing, set_alpha_to_one;
    if (sdx4_noise_schedule_load(c, "PNDMScheduler", &s->num_train_timesteps, &s->alphas_cumprod))
        return -1;
    if (sdx4_cfg_choice(c, "prediction_type", "epsilon", predictions, &prediction) ||
        sdx4_cfg_choice(c, "timestep_spacing", "leading", spacings, &spacing) ||
        sdx4_cfg_int(c, "steps_offset", 0, &s->steps_offset) ||
        sdx4_cfg_bool(c, "skip_prk_steps", 0, &s->skip_prk_steps) ||
        sdx4_cfg_bool(c, "set_alpha_to_one", 0, &set_alpha_to_one)) {
        sdx4_pndm_free(s);
        return -1;
    }
    s->prediction = (prediction_type)prediction;
    s->spacing = (timestep_spacing)spacing;
    s->final_alpha_cumprod = set_alpha_to_one ? 1.0f : s->alphas_cumprod[0];
    return 0;
}

static void free_run(pndm_sampler *s) {
    for (int k = 0; k < 4; k++) free(s->ets[k]);
    free(s->cur_model_output);
    free(s->cur_sample);
    free(s->combined);
}

void sdx4_pndm_free(pndm_sampler *s) {
    free(s->alphas_cumprod);
    free(s->timesteps);
    free_run(s);
    memset(s, 0, sizeof *s);
}

int sdx4_pndm_set_timesteps(pndm_sampler *s, int n, size_t numel) {
    int T = s->num_train_timesteps, m;
    int *desc = sdx4_spaced_timesteps(T, n, s->spacing, s->steps_offset, &m);
    if (!desc) return -1;
    if (!s->skip_prk_steps && m < 4) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                       "scheduler PNDMScheduler: num_inference_steps=%d is too few for its "
                       "Runge-Kutta warm-up (at least 4; or skip_prk_steps true)", n);
        free(desc);
        return -1;
    }
    int *ts = malloc((size_t)(m + 9) * sizeof *ts), count = 0, prk = 0;
    if (!ts) {
        free(desc);
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "set_timesteps(%d): out of memory", n);
        return -1;
    }
    if (s->skip_prk_steps) { /* cat([_t[:-1], _t[-2:-1], _t[-1:]])[::-1], _t ascending */
        ts[count++] = desc[0];
        for (int k = 1; k < m; k++) {
            if (k == 1) ts[count++] = desc[1];
            ts[count++] = desc[k];
        }
    } else {
        /* _t[-4:].repeat(2) + tile([0, T // n // 2], 4): the four largest
         * and their midpoints; then [:-1].repeat(2)[1:-1][::-1] */
        int half = T / n / 2, pairs[8];
        for (int k = 0; k < 4; k++) {
            pairs[2 * k] = desc[3 - k];
            pairs[2 * k + 1] = desc[3 - k] + half;
        }
        for (int k = 12; k >= 1; k--) ts[count++] = pairs[k / 2]; /* 14 copies less both ends */
        prk = count;
        for (int k = 3; k < m; k++) ts[count++] = desc[k]; /* _t[:-3][::-1] */
    }
    free(desc);
    free_run(s);
    free(s->timesteps);
    s->timesteps = ts;
    s->num_timesteps = count;
    s->num_prk = prk;
    s->num_inference_steps = n;
    s->counter = s->num_ets = 0;
    s->numel = numel;
    memset(s->ets, 0, sizeof s->ets);
    s->cur_model_output = malloc(numel * sizeof(float));
    s->cur_sample = malloc(numel * sizeof(float));
    s->combined = malloc(numel * sizeof(float));
    for (int k = 0; k < 4; k++) s->ets[k] = malloc(numel * sizeof(float));
    int ok = s->cur_model_output && s->cur_sample && s->combined;
    for (int k = 0; k < 4; k++) ok = ok && s->ets[k];
    if (!ok) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "set_timesteps(%d): out of memory", n);
        return -1;
    }
    return 0;
}

/* _get_prev_sample's coefficients for x_t -> x_{prev_t}, formula (9) of
 * the PNDM paper; prev_value applies them to one element. */
typedef struct {
    float sample_coeff, diff, denom, sqrt_alpha, sqrt_beta;
    prediction_type prediction;
} pndm_coefs;

static pndm_coefs coefs_of(const pndm_sampler *s, int t, int prev_t) {
    float alpha_prod_t = alpha_at(s->alphas_cumprod, s->num_train_timesteps, t);
    float alpha_prod_t_prev = prev_t >= 0 ? s->alphas_cumprod[prev_t] : s->final_alpha_cumprod;
    float beta_prod_t = 1.0f - alpha_prod_t, beta_prod_t_prev = 1.0f - alpha_prod_t_prev;
    return (pndm_coefs){
        .sample_coeff = sqrtf(alpha_prod_t_prev / alpha_prod_t),
        .diff = alpha_prod_t_prev - alpha_prod_t,
        .denom = alpha_prod_t * sqrtf(beta_prod_t_prev) + sqrtf(alpha_prod_t * beta_prod_t * alpha_prod_t_prev),
        .sqrt_alpha = sqrtf(alpha_prod_t),
        .sqrt_beta = sqrtf(beta_prod_t),
        .prediction = s->prediction,
    };
}

static inline float prev_value(const pndm_coefs *c, float x, float eps) {
    if (c->prediction == PREDICT_V) eps = c->sqrt_alpha * eps + c->sqrt_beta * x;
    return c->sample_coeff * x - c->diff * eps / c->denom;
}

static void prev_sample_of(const pndm_sampler *s, const float *sample, int t, int prev_t,
                           const float *model_output, float *out) {
    pndm_coefs c = coefs_of(s, t, prev_t);
#pragma omp simd
    for (size_t k = 0; k < s->numel; k++) out[k] = prev_value(&c, sample[k], model_output[k]);
}

/* Makes room for a newest output among the last four and returns its
 * buffer (the oldest one's, when there are four). */
static float *next_output_slot(pndm_sampler *s) {
    if (s->num_ets == 4) {
        float *oldest = s->ets[0];
        memmove(s->ets, s->ets + 1, 3 * sizeof *s->ets);
        s->ets[3] = oldest;
        s->num_ets = 3;
    }
    return s->ets[s->num_ets++];
}

/* Keeps model_output as the newest of the last four outputs. */
static void push_output(pndm_sampler *s, const float *model_output) {
    memcpy(next_output_slot(s), model_output, s->numel * sizeof(float));
}

static void step_prk(pndm_sampler *s, int t_in, const float *model_output, const float *sample,
                     float *prev_sample) {
    int T = s->num_train_timesteps, phase = s->counter % 4;
    int prev_t = t_in - (s->counter % 2 ? 0 : T / s->num_inference_steps / 2);
    int t = s->timesteps[s->counter / 4 * 4];
    const float *mo = model_output;
    size_t n = s->numel;
    if (phase == 0) {
#pragma omp simd
        for (size_t k = 0; k < n; k++) s->cur_model_output[k] = (float)(1.0 / 6) * model_output[k];
        push_output(s, model_output);
        memcpy(s->cur_sample, sample, n * sizeof *sample);
    } else if (phase < 3) {
#pragma omp simd
        for (size_t k = 0; k < n; k++)
            s->cur_model_output[k] = s->cur_model_output[k] + (float)(1.0 / 3) * model_output[k];
    } else {
#pragma omp simd
        for (size_t k = 0; k < n; k++)
            s->combined[k] = s->cur_model_output[k] + (float)(1.0 / 6) * model_output[k];
        mo = s->combined;
    }
    prev_sample_of(s, s->cur_sample, t, prev_t, mo, prev_sample);
}

/* A linear multistep step. Once it has four outputs (every step but the
 * first three) it is one pass: the model output is kept, combined with
 * the three before it, and applied to the sample, element by element. */
static void step_plms(pndm_sampler *s, int t, const float *model_output, const float *sample,
                      float *prev_sample) {
    int ratio = s->num_train_timesteps / s->num_inference_steps, prev_t = t - ratio;
    size_t n = s->numel;
    if (s->num_ets >= 3 && s->counter != 1) {
        float *newest = next_output_slot(s), *const *e = s->ets + 3;
        pndm_coefs c = coefs_of(s, t, prev_t);
#pragma omp simd
        for (size_t k = 0; k < n; k++) {
            float m = model_output[k];
            newest[k] = m;
            float combined = (float)(1.0 / 24) * (55.0f * m - 59.0f * e[-1][k] + 37.0f * e[-2][k] - 9.0f * e[-3][k]);
            prev_sample[k] = prev_value(&c, sample[k], combined);
        }
        return;
    }
    float *combined = s->combined;
    if (s->counter != 1) {
        push_output(s, model_output);
    } else { /* the second evaluation of the first step: from t + ratio again */
        prev_t = t;
        t = t + ratio;
    }
    float *const *e = s->ets + s->num_ets - 1; /* e[0] the newest, e[-1] the one before */
    const float *x = sample, *mo = combined;
    if (s->num_ets == 1 && s->counter == 0) {
        mo = model_output;
        memcpy(s->cur_sample, sample, n * sizeof *sample);
    } else if (s->num_ets == 1 && s->counter == 1) {
#pragma omp simd
        for (size_t k = 0; k < n; k++) combined[k] = (model_output[k] + e[0][k]) / 2;
        x = s->cur_sample;
    } else if (s->num_ets == 2) {
#pragma omp simd
        for (size_t k = 0; k < n; k++) combined[k] = (3.0f * e[0][k] - e[-1][k]) / 2;
    } else {
#pragma omp simd
        for (size_t k = 0; k < n; k++)
            combined[k] = (23.0f * e[0][k] - 16.0f * e[-1][k] + 5.0f * e[-2][k]) / 12;
    }
    prev_sample_of(s, x, t, prev_t, mo, prev_sample);
}

int sdx4_pndm_step(pndm_sampler *s, int i, const float *model_output, const float *sample,
                   float *prev_sample) {
    if (!s->timesteps || i != s->counter || i >= s->num_timesteps) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "PNDM step %d: expected step %d of %d", i,
                       s->counter, s->num_timesteps);
        return -1;
    }
    if (s->counter < s->num_prk) step_prk(s, s->timesteps[i], model_output, sample, prev_sample);
    else step_plms(s, s->timesteps[i], model_output, sample, prev_sample);
    s->counter++;
    return 0;
}
