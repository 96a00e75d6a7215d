/*
 * scheduler.c - DDIM and DDPM schedulers, as diffusers computes them.
 *
 * Both schedulers start from the same noise schedule: betas (T of them)
 * from beta_schedule, alphas = 1 - betas, alphas_cumprod = their running
 * product. diffusers does this with torch in float32, and the last bits
 * matter (alphas_cumprod feeds every step), so each helper below names the
 * torch operation it reproduces and keeps its precision: torch.linspace
 * evaluates start + step * i from the front and end - step * (T - 1 - i)
 * from the back, each one fused multiply-add in float; torch.cumprod on
 * CPU accumulates in double. The result is bit-identical to diffusers'.
 *
 * DDIM's timesteps come from numpy (integer arithmetic for "leading",
 * np.linspace and np.arange in double for the others, np.round rounding
 * half to even), and are reproduced down to numpy's quirks: "trailing"
 * builds np.arange(T, 0, -T/n), whose length is ceil(T / (T/n)) and so for
 * some n is n + 1, ending in timestep -1. diffusers then steps n + 1 times
 * and indexes alphas_cumprod[-1] from the end; so does sdx4_ddim_step().
 *
 * DDIMScheduler.step is one float operation per torch operation on 0-dim
 * float32 tensors (the coefficients) and then per element (the tensors), in
 * diffusers' order. On targets whose compiler contracts a * b + c into one
 * FMA (not x86-64's baseline), build with -ffp-contract=off to keep that.
 */
#include "model/scheduler.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

/* Bounds the allocation a config can ask for; real models use 1000. */
#define MAX_TRAIN_TIMESTEPS 100000

/* ------------------------------------------------------ config helpers */

/* Reads a string key that must be one of `names` (NULL-terminated) and
 * stores its index; otherwise names the key, the value and the choices. */
int sdx4_cfg_choice(const config *c, const char *key, const char *def,
                      const char *const *names, int *out) {
    const char *v;
    if (sdx4_cfg_str(c, key, def, &v)) return -1;
    char choices[256] = "";
    for (int i = 0; names[i]; i++) {
        if (!strcmp(v, names[i])) {
            *out = i;
            return 0;
        }
        size_t used = strlen(choices);
        snprintf(choices + used, sizeof choices - used, "%s%s", i ? ", " : "", names[i]);
    }
    sdx4_set_error(SDX4_ERR_MODEL, "%s: %s=%s is not supported (supported: %s)", c->label, key, v,
              choices);
    return -1;
}

/* ------------------------------------------------- the noise schedule */

enum { BETA_LINEAR, BETA_SCALED_LINEAR, BETA_SQUAREDCOS_CAP_V2 };

/* torch.linspace(start, end, steps, dtype=torch.float32) on CPU. PyTorch's
 * build fuses each multiply-add (the recorded alphas_cumprod match only
 * so), hence fmaf(). */
static void linspace_f32(double start, double end, int steps, float *out) {
    float a = (float)start, b = (float)end;
    if (steps == 1) {
        out[0] = a;
        return;
    }
    float step = (b - a) / (float)(steps - 1);
    int halfway = steps / 2;
    for (int i = 0; i < steps; i++)
        out[i] = i < halfway ? fmaf(step, (float)i, a) : fmaf(-step, (float)(steps - i - 1), b);
}

/* diffusers' betas_for_alpha_bar (cosine): Python floats, then float32. */
static void squaredcos_cap_v2(int steps, float *out) {
    for (int i = 0; i < steps; i++) {
        double t1 = (double)i / steps, t2 = (double)(i + 1) / steps;
        double c1 = cos((t1 + 0.008) / 1.008 * M_PI / 2), c2 = cos((t2 + 0.008) / 1.008 * M_PI / 2);
        double beta = 1 - (c2 * c2) / (c1 * c1);
        out[i] = (float)(beta < 0.999 ? beta : 0.999);
    }
}

/* Reads the keys shared by DDIM and DDPM, checks the class, and computes
 * alphas_cumprod (malloc'd, *T entries). */
int sdx4_noise_schedule_load(const config *c, const char *class_name, int *T, float **acp) {
    static const char *const schedules[] = {"linear", "scaled_linear", "squaredcos_cap_v2", NULL};
    double beta_start, beta_end;
    int schedule;
    if (sdx4_cfg_expect_str(c, "_class_name", class_name) ||
        sdx4_cfg_int(c, "num_train_timesteps", 1000, T) ||
        sdx4_cfg_float(c, "beta_start", 0.0001, &beta_start) ||
        sdx4_cfg_float(c, "beta_end", 0.02, &beta_end) ||
        sdx4_cfg_choice(c, "beta_schedule", "linear", schedules, &schedule) ||
        sdx4_cfg_expect_null(c, "trained_betas") ||
        sdx4_cfg_expect_bool(c, "rescale_betas_zero_snr", 0))
        return -1;
    if (*T < 1 || *T > MAX_TRAIN_TIMESTEPS) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: num_train_timesteps=%d is out of range [1, %d]", c->label,
                  *T, MAX_TRAIN_TIMESTEPS);
        return -1;
    }
    float *betas = malloc((size_t)*T * sizeof *betas);
    *acp = malloc((size_t)*T * sizeof **acp);
    if (!betas || !*acp) {
        free(betas);
        free(*acp);
        *acp = NULL;
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory", c->label);
        return -1;
    }
    if (schedule == BETA_LINEAR) {
        linspace_f32(beta_start, beta_end, *T, betas);
    } else if (schedule == BETA_SCALED_LINEAR) { /* linspace of square roots, squared */
        linspace_f32(sqrt(beta_start), sqrt(beta_end), *T, betas);
        for (int i = 0; i < *T; i++) betas[i] = betas[i] * betas[i];
    } else {
        squaredcos_cap_v2(*T, betas);
    }
    double product = 1; /* torch.cumprod(1.0 - betas) */
    for (int i = 0; i < *T; i++) {
        product *= (double)(1.0f - betas[i]);
        (*acp)[i] = (float)product;
    }
    free(betas);
    return 0;
}

/* --------------------------------------------------------------- DDIM */

int sdx4_ddim_from_config(ddim_scheduler *s, const config *c) {
    static const char *const predictions[] = {"epsilon", "v_prediction", "sample", NULL};
    static const char *const spacings[] = {"leading", "trailing", "linspace", NULL};
    memset(s, 0, sizeof *s);
    double clip_range;
    int set_alpha_to_one, prediction, spacing;
    if (sdx4_noise_schedule_load(c, "DDIMScheduler", &s->num_train_timesteps, &s->alphas_cumprod))
        return -1;
    if (sdx4_cfg_bool(c, "clip_sample", 1, &s->clip_sample) ||
        sdx4_cfg_float(c, "clip_sample_range", 1.0, &clip_range) ||
        sdx4_cfg_bool(c, "set_alpha_to_one", 1, &set_alpha_to_one) ||
        sdx4_cfg_int(c, "steps_offset", 0, &s->steps_offset) ||
        sdx4_cfg_choice(c, "prediction_type", "epsilon", predictions, &prediction) ||
        sdx4_cfg_choice(c, "timestep_spacing", "leading", spacings, &spacing) ||
        sdx4_cfg_expect_bool(c, "thresholding", 0)) {
        sdx4_ddim_free(s);
        return -1;
    }
    s->clip_sample_range = (float)clip_range;
    s->prediction = (prediction_type)prediction;
    s->spacing = (timestep_spacing)spacing;
    s->final_alpha_cumprod = set_alpha_to_one ? 1.0f : s->alphas_cumprod[0];
    return 0;
}

int sdx4_ddim_load(ddim_scheduler *s, const char *model_dir) {
    config c;
    memset(s, 0, sizeof *s);
    if (sdx4_cfg_load(&c, model_dir, "scheduler/scheduler_config.json")) return -1;
    int rc = sdx4_ddim_from_config(s, &c);
    sdx4_cfg_free(&c);
    return rc;
}

void sdx4_ddim_free(ddim_scheduler *s) {
    free(s->alphas_cumprod);
    free(s->timesteps);
    memset(s, 0, sizeof *s);
}

/* np.arange(T, 0, -T / n) as numpy fills it: start, start + step, then
 * start + i * (second - first). Returns the length (n or n + 1). */
int sdx4_trailing_arange(int T, int n, double *out) {
    double step = -((double)T / n);
    int length = (int)ceil((double)(0 - T) / step);
    if (length > n + 1) length = n + 1; /* T / (T/n) is within an ulp of n */
    double second = (double)T + step, delta = second - (double)T;
    for (int i = 0; i < length; i++)
        out[i] = i == 0 ? (double)T : i == 1 ? second : (double)T + i * delta;
    return length;
}

int *sdx4_spaced_timesteps(int T, int n, timestep_spacing spacing, int steps_offset, int *count) {
    if (n < 1 || n > T) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                  "num_inference_steps=%d: must be between 1 and num_train_timesteps=%d", n, T);
        return NULL;
    }
    int *ts = malloc((size_t)(n + 1) * sizeof *ts);
    double *values = malloc((size_t)(n + 1) * sizeof *values);
    if (!ts || !values) {
        free(ts);
        free(values);
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "set_timesteps(%d): out of memory", n);
        return NULL;
    }
    *count = n;
    if (spacing == SPACING_LEADING) {
        int ratio = T / n;
        for (int i = 0; i < n; i++) ts[i] = (n - 1 - i) * ratio + steps_offset;
    } else if (spacing == SPACING_LINSPACE) { /* np.linspace(0, T - 1, n).round()[::-1] */
        double step = n > 1 ? (double)(T - 1) / (n - 1) : 0;
        for (int i = 0; i < n; i++) {
            double v = n > 1 && i == n - 1 ? (double)(T - 1) : i * step;
            ts[n - 1 - i] = (int)nearbyint(v);
        }
    } else { /* np.round(np.arange(T, 0, -T / n)) - 1 */
        *count = sdx4_trailing_arange(T, n, values);
        for (int i = 0; i < *count; i++) ts[i] = (int)nearbyint(values[i]) - 1;
    }
    free(values);
    return ts;
}

int sdx4_ddim_set_timesteps(ddim_scheduler *s, int n) {
    int count, *ts = sdx4_spaced_timesteps(s->num_train_timesteps, n, s->spacing, s->steps_offset,
                                           &count);
    if (!ts) return -1;
    free(s->timesteps);
    s->timesteps = ts;
    s->num_timesteps = count;
    s->num_inference_steps = n;
    return 0;
}

typedef struct {
    float sqrt_alpha, sqrt_beta, sqrt_alpha_prev, direction, std_dev_t, lo, hi;
    int clip;
} ddim_coefs;

/* DDIM's update for one prediction type (SDX4_BY_PREDICTION). */
static inline void ddim_loop(prediction_type prediction, const ddim_coefs *k, const float *model_output,
                             const float *sample, const float *noise, size_t n, float *prev_sample) {
    const float sqrt_alpha = k->sqrt_alpha, sqrt_beta = k->sqrt_beta, lo = k->lo, hi = k->hi;
    const int clip = k->clip;
#pragma omp simd
    for (size_t i = 0; i < n; i++) {
        float out = model_output[i], x = sample[i], x0, eps;
        if (prediction == PREDICT_EPSILON) {
            x0 = (x - sqrt_beta * out) / sqrt_alpha;
            eps = out;
        } else if (prediction == PREDICT_SAMPLE) {
            x0 = out;
            eps = (x - sqrt_alpha * x0) / sqrt_beta;
        } else { /* v_prediction */
            x0 = sqrt_alpha * x - sqrt_beta * out;
            eps = sqrt_alpha * out + sqrt_beta * x;
        }
        if (clip) x0 = x0 < lo ? lo : x0 > hi ? hi : x0; /* clamp keeps NaN */
        prev_sample[i] = k->sqrt_alpha_prev * x0 + k->direction * eps;
    }
    if (noise) /* a pass of its own: a load under a condition keeps a loop scalar */
#pragma omp simd
        for (size_t i = 0; i < n; i++) prev_sample[i] = prev_sample[i] + k->std_dev_t * noise[i];
}

int sdx4_ddim_step(const ddim_scheduler *s, const float *model_output, int timestep,
              const float *sample, size_t n, float eta, torch_rng *rng, float *noise_buffer,
              float *prev_sample) {
    int T = s->num_train_timesteps;
    if (!s->timesteps) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "DDIM step before set_timesteps");
        return -1;
    }
    if (timestep < -T || timestep >= T) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "DDIM step: timestep %d is outside [0, %d)", timestep, T);
        return -1;
    }
    if (!isfinite(eta) || (eta > 0 && !rng)) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "DDIM step: eta=%g needs a finite value%s", eta,
                  eta > 0 ? " and a generator" : "");
        return -1;
    }
    float *noise = NULL, *owned = NULL;
    if (eta > 0) {
        noise = noise_buffer ? noise_buffer : (owned = malloc(n * sizeof *noise));
        if (!noise) {
            sdx4_set_error(SDX4_ERR_NO_MEMORY, "DDIM step: out of memory for %zu noise values", n);
            return -1;
        }
        sdx4_torch_randn(rng, noise, n);
    }

    /* The coefficients: 0-dim float32 tensors in diffusers. */
    int prev_timestep = timestep - T / s->num_inference_steps;
    float alpha_prod_t = s->alphas_cumprod[timestep < 0 ? timestep + T : timestep];
    float alpha_prod_t_prev = prev_timestep >= 0 ? s->alphas_cumprod[prev_timestep]
                                                 : s->final_alpha_cumprod;
    float beta_prod_t = 1.0f - alpha_prod_t;
    float beta_prod_t_prev = 1.0f - alpha_prod_t_prev;
    float sqrt_alpha = sqrtf(alpha_prod_t), sqrt_beta = sqrtf(beta_prod_t);
    float variance = (beta_prod_t_prev / beta_prod_t) * (1.0f - alpha_prod_t / alpha_prod_t_prev);
    float std_dev_t = eta * sqrtf(variance);
    float direction = sqrtf(1.0f - alpha_prod_t_prev - std_dev_t * std_dev_t);
    float sqrt_alpha_prev = sqrtf(alpha_prod_t_prev);

    ddim_coefs k = {sqrt_alpha, sqrt_beta, sqrt_alpha_prev, direction, std_dev_t,
                    -s->clip_sample_range, s->clip_sample_range, s->clip_sample};
    SDX4_BY_PREDICTION(s->prediction, ddim_loop, &k, model_output, sample, noise, n, prev_sample);
    free(owned);
    return 0;
}

/* --------------------------------------------------------------- DDPM */

/* Only the noise schedule is read: add_noise() depends on nothing else
 * (variance_type, prediction_type, clip_sample... shape DDPM's step(),
 * which the upscaler does not use). */
int sdx4_ddpm_from_config(ddpm_scheduler *s, const config *c) {
    memset(s, 0, sizeof *s);
    return sdx4_noise_schedule_load(c, "DDPMScheduler", &s->num_train_timesteps, &s->alphas_cumprod);
}

int sdx4_ddpm_load(ddpm_scheduler *s, const char *model_dir) {
    config c;
    memset(s, 0, sizeof *s);
    if (sdx4_cfg_load(&c, model_dir, "low_res_scheduler/scheduler_config.json")) return -1;
    int rc = sdx4_ddpm_from_config(s, &c);
    sdx4_cfg_free(&c);
    return rc;
}

void sdx4_ddpm_free(ddpm_scheduler *s) {
    free(s->alphas_cumprod);
    memset(s, 0, sizeof *s);
}

int sdx4_ddpm_add_noise(const ddpm_scheduler *s, const float *original, const float *noise, size_t n,
                   int timestep, float *out) {
    if (timestep < 0 || timestep >= s->num_train_timesteps) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "add_noise: timestep %d is outside [0, %d)", timestep,
                  s->num_train_timesteps);
        return -1;
    }
    float alpha_prod = s->alphas_cumprod[timestep];
    float sqrt_alpha = sqrtf(alpha_prod), sqrt_one_minus_alpha = sqrtf(1.0f - alpha_prod);
#pragma omp simd
    for (size_t i = 0; i < n; i++) out[i] = sqrt_alpha * original[i] + sqrt_one_minus_alpha * noise[i];
    return 0;
}

/* -------------------------------------------------------- thresholding */

/* The k-th smallest of v[0..n) (0-based, no NaN), leaving no smaller value
 * after index k: Hoare's selection. */
static float select_kth(float *v, size_t n, size_t k) {
    ptrdiff_t lo = 0, hi = (ptrdiff_t)n - 1, want = (ptrdiff_t)k;
    while (lo < hi) {
        float pivot = v[lo + (hi - lo) / 2];
        ptrdiff_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] < pivot) i++;
            while (v[j] > pivot) j--;
            if (i <= j) {
                float t = v[i];
                v[i++] = v[j];
                v[j--] = t;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else break; /* between j and i every value is the pivot */
    }
    return v[k];
}

void sdx4_threshold_sample(float *x, size_t n, float ratio, float max_value, float *scratch) {
    if (n == 0) return;
    for (size_t i = 0; i < n; i++)
        if (isnan(x[i])) {
            for (size_t j = 0; j < n; j++) x[j] = NAN;
            return;
        }
    float *a = scratch;
#pragma omp simd
    for (size_t i = 0; i < n; i++) a[i] = fabsf(x[i]);
    /* torch.quantile, linear: rank q * (n - 1) in float, then lerp between
     * the values around it */
    float rank = ratio * (float)(n - 1);
    size_t below = (size_t)rank, above = (size_t)ceilf(rank);
    float lo = select_kth(a, n, below), hi = lo;
    for (size_t i = below + 1; above > below && i < n; i++) hi = i == below + 1 || a[i] < hi ? a[i] : hi;
    float w = rank - (float)below;
    float s = fabsf(w) < 0.5f ? lo + w * (hi - lo) : hi - (hi - lo) * (1.0f - w); /* torch.lerp */
    s = s < 1.0f ? 1.0f : s; /* torch.clamp(s, min=1, max=max_value) */
    s = s > max_value ? max_value : s;
#pragma omp simd
    for (size_t i = 0; i < n; i++) x[i] = (x[i] < -s ? -s : x[i] > s ? s : x[i]) / s;
}
