/*
 * scheduler_unipc.c - UniPC multistep, as diffusers computes it.
 *
 * The schedule is DPM-Solver's (UniPC's set_timesteps is a copy of it,
 * except that its Karras timesteps are always rounded), so it comes from
 * a sigma_scheduler of the DPM kind that this scheduler owns.
 *
 * Each step, in diffusers' order:
 *   m_t  = convert_model_output(model_output, sample): the predicted x0
 *          (predict_x0, the default) or the predicted noise;
 *   UniC: unless the step before is in disable_corrector, the sample the
 *         last predictor reached is recomputed from the sample that
 *         predictor started from, now that m_t is known (order: the last
 *         predictor's);
 *   UniP: prev = the predictor of this step's order (1 while the history
 *         fills, then solver_order, lowered near the end by
 *         lower_order_final), from the corrected sample.
 * Both updates are one formula in the log-SNR lambda: with h the step in
 * lambda, rk the earlier points' offsets over h and the last outputs'
 * differences D1 = (m_k - m_0) / rk, the sample moves by the exponential
 * integrator's first-order term plus B(h) * sum(rho_k * D1_k), where the
 * rhos solve R rho = b (R[i][k] = rk^i, b from h*phi_i(h) over B(h)).
 * bh1 takes B(h) = h, bh2 expm1(h).
 *
 * Exactness: one float operation per torch operation, as in
 * scheduler_sigma.c (its einsum over K = 2 products rounds each product,
 * then their sum). torch's CPU log and expm1 are vectorized library
 * routines, not always correctly rounded: logf agrees with torch's log on
 * 94% of the noise schedules' alphas and sigmas (one ulp off otherwise),
 * expm1 in double rounded to float with torch's expm1 on all but ~0.1% of
 * arguments (expm1f: 92%). The rhos come from torch.linalg.solve,
 * LAPACK's LU with partial pivoting in MKL: solve() below is LU with
 * reciprocal pivots, its triangular solves as a sum of products, one
 * subtraction and a multiply by the reciprocal diagonal. On UniPC's
 * matrices it gives MKL's bits for every 2x2 system tried and for 84% of
 * 3x3 ones, the rest within 4.2e-7 relative (1500 random systems each,
 * shaped as UniPC's); the 3x3 system is only order 3's corrector. The
 * goldens' three recorded steps come out bit for bit in every case.
 */
#include "model/scheduler_unipc.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

#define CLASS "UniPCMultistepScheduler"

/* ---------------------------------------------------------------- config */

/* disable_corrector: a list of step indices. */
static int read_disable_corrector(unipc_scheduler *s, const config *c) {
    json_t *v = json_object_get(c->root, "disable_corrector");
    if (!v || json_is_null(v)) return 0;
    size_t n = json_is_array(v) ? json_array_size(v) : 0;
    for (size_t k = 0; k < n; k++)
        if (!json_is_integer(json_array_get(v, k))) v = NULL;
    if (!json_is_array(v)) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: disable_corrector must be a list of step indices",
                       c->label);
        return -1;
    }
    if (n == 0) return 0;
    s->disable_corrector = malloc(n * sizeof *s->disable_corrector);
    if (!s->disable_corrector) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory", c->label);
        return -1;
    }
    for (size_t k = 0; k < n; k++) {
        json_int_t i = json_integer_value(json_array_get(v, k));
        /* an index no run reaches disables nothing */
        s->disable_corrector[k] = i < -1 || i > (1 << 30) ? -1 : (int)i;
    }
    s->n_disable_corrector = (int)n;
    return 0;
}

/* The combinations whose last step diffusers computes as NaN or inf. */
static int check_final_step(const unipc_scheduler *s, const config *c) {
    if (s->sigma.final_sigma_min) return 0;
    const char *why = s->bh1            ? "solver_type=bh1"
                      : !s->predict_x0 ? "predict_x0=false"
                      : !s->lower_order_final && s->solver_order > 1
                          ? "lower_order_final=false above solver_order 1"
                          : NULL;
    if (!why) return 0;
    sdx4_set_error(SDX4_ERR_MODEL,
                   "%s: %s needs final_sigmas_type=sigma_min (with a final sigma of zero the last "
                   "step is NaN or infinite)",
                   c->label, why);
    return -1;
}

int sdx4_unipc_from_config(unipc_scheduler *s, const config *c) {
    static const char *const predictions[] = {"epsilon", "v_prediction", "sample", NULL};
    static const char *const spacings[] = {"leading", "trailing", "linspace", NULL};
    static const char *const finals[] = {"zero", "sigma_min", NULL};
    static const char *const solvers[] = {"bh1", "bh2", "midpoint", "heun", "logrho", NULL};
    memset(s, 0, sizeof *s);
    sigma_scheduler *sg = &s->sigma;
    sg->method = SIGMA_DPM_MULTISTEP; /* its schedule (sdx4_dpm_schedule), unclipped */
    sg->lambda_min_clipped = -INFINITY;
    if (sdx4_noise_schedule_load(c, CLASS, &sg->num_train_timesteps, &sg->alphas_cumprod))
        return -1;
    int prediction = PREDICT_EPSILON, spacing = SPACING_LINSPACE, solver = 0;
    double ratio, max_value;
    int rc = sdx4_cfg_choice(c, "prediction_type", "epsilon", predictions, &prediction) ||
             sdx4_cfg_choice(c, "timestep_spacing", "linspace", spacings, &spacing) ||
             sdx4_cfg_int(c, "steps_offset", 0, &sg->steps_offset) ||
             sdx4_cfg_bool(c, "use_karras_sigmas", 0, &sg->karras) ||
             sdx4_cfg_choice(c, "final_sigmas_type", "zero", finals, &sg->final_sigma_min) ||
             sdx4_cfg_int(c, "solver_order", 2, &s->solver_order) ||
             sdx4_cfg_choice(c, "solver_type", "bh2", solvers, &solver) ||
             sdx4_cfg_bool(c, "predict_x0", 1, &s->predict_x0) ||
             sdx4_cfg_bool(c, "lower_order_final", 1, &s->lower_order_final) ||
             sdx4_cfg_bool(c, "thresholding", 0, &s->thresholding) ||
             sdx4_cfg_float(c, "dynamic_thresholding_ratio", 0.995, &ratio) ||
             sdx4_cfg_float(c, "sample_max_value", 1.0, &max_value) ||
             sdx4_cfg_expect_bool(c, "use_exponential_sigmas", 0) ||
             sdx4_cfg_expect_bool(c, "use_beta_sigmas", 0) ||
             sdx4_cfg_expect_bool(c, "use_flow_sigmas", 0) ||
             sdx4_cfg_expect_bool(c, "use_dynamic_shifting", 0) ||
             sdx4_cfg_expect_null(c, "solver_p") || sdx4_cfg_expect_null(c, "sigma_min") ||
             sdx4_cfg_expect_null(c, "sigma_max") || sdx4_cfg_expect_null(c, "shift_terminal") ||
             read_disable_corrector(s, c);
    if (!rc && (s->solver_order < 1 || s->solver_order > UNIPC_MAX_ORDER)) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: solver_order=%d is not supported (supported: 1, 2, 3)",
                       c->label, s->solver_order);
        rc = -1;
    }
    if (!rc && s->thresholding && !(ratio >= 0 && ratio <= 1)) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: dynamic_thresholding_ratio=%g is not in [0, 1]",
                       c->label, ratio);
        rc = -1;
    }
    if (!rc && s->thresholding && !(max_value > 0)) { /* diffusers divides by it */
        sdx4_set_error(SDX4_ERR_MODEL, "%s: sample_max_value=%g must be above 0", c->label,
                       max_value);
        rc = -1;
    }
    s->bh1 = solver == 0;
    if (!rc) rc = check_final_step(s, c);
    if (rc) {
        sdx4_unipc_free(s);
        return -1;
    }
    sg->prediction = (prediction_type)prediction;
    sg->spacing = (timestep_spacing)spacing;
    s->thresholding_ratio = (float)ratio;
    s->sample_max_value = (float)max_value;
    return 0;
}

static void free_buffers(unipc_scheduler *s) {
    for (int k = 0; k <= UNIPC_MAX_ORDER; k++) free(s->outputs[k]), s->outputs[k] = NULL;
    free(s->last_sample), free(s->scratch);
    s->last_sample = s->scratch = NULL;
}

void sdx4_unipc_free(unipc_scheduler *s) {
    sdx4_sigma_free(&s->sigma);
    free(s->disable_corrector);
    free_buffers(s);
    memset(s, 0, sizeof *s);
}

int sdx4_unipc_set_timesteps(unipc_scheduler *s, int n, size_t numel) {
    if (sdx4_sigma_set_timesteps(&s->sigma, n, numel)) return -1;
    free_buffers(s);
    int ok = 1;
    for (int k = 0; k <= s->solver_order; k++)
        ok &= (s->outputs[k] = malloc(numel * sizeof(float))) != NULL;
    ok &= (s->last_sample = malloc(numel * sizeof(float))) != NULL;
    if (s->thresholding) ok &= (s->scratch = malloc(numel * sizeof(float))) != NULL;
    if (!ok) {
        free_buffers(s);
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "set_timesteps(%d): out of memory", n);
        return -1;
    }
    s->step_index = s->lower_order_nums = s->this_order = 0;
    return 0;
}

/* ------------------------------------------------------------ the math */

/* torch.expm1 on a float tensor (see the opening comment). */
static float torch_expm1(float x) { return (float)expm1((double)x); }

/* torch.linalg.solve(a, b) for n <= 3 (see the opening comment). */
static void solve(int n, float a[3][3], float b[3]) {
    int perm[3] = {0, 1, 2};
    for (int j = 0; j < n; j++) {
        int p = j;
        for (int i = j + 1; i < n; i++)
            if (fabsf(a[i][j]) > fabsf(a[p][j])) p = i;
        for (int k = 0; k < n; k++) {
            float t = a[j][k];
            a[j][k] = a[p][k], a[p][k] = t;
        }
        int t = perm[j];
        perm[j] = perm[p], perm[p] = t;
        float inv = 1.0f / a[j][j];
        for (int i = j + 1; i < n; i++) {
            a[i][j] *= inv;
            for (int k = j + 1; k < n; k++) a[i][k] -= a[i][j] * a[j][k];
        }
    }
    float y[3];
    for (int i = 0; i < n; i++) { /* L y = P b, L unit lower */
        float sum = 0.0f;
        for (int k = 0; k < i; k++) sum += a[i][k] * y[k];
        y[i] = b[perm[i]] - sum;
    }
    for (int i = n - 1; i >= 0; i--) { /* U x = y */
        float sum = 0.0f;
        for (int k = i + 1; k < n; k++) sum += a[i][k] * b[k];
        b[i] = (y[i] - sum) * (1.0f / a[i][i]);
    }
}

/* What one UniP or UniC update of order p needs, from sigma indices t
 * (where it lands) and s0 (where it starts; s0 - k are the earlier
 * outputs' points):
 *   next = ratio * x - c_m0 * m0 - c_b * (sum_k rho[k] * D1_k [+ rho[p-1] * D1_t])
 * with D1_k = (m_k - m0) / rk[k]. */
typedef struct {
    float ratio, c_m0, c_b;
    float rk[UNIPC_MAX_ORDER - 1];
    float rho[UNIPC_MAX_ORDER];
} unipc_update;

static unipc_update update_at(const unipc_scheduler *s, int p, int t_index, int s0_index,
                              int corrector) {
    const float *sigmas = s->sigma.sigmas;
    sigma_point t = sdx4_sigma_point(sigmas[t_index]), s0 = sdx4_sigma_point(sigmas[s0_index]);
    float h = t.lambda - s0.lambda;
    unipc_update u = {0};
    float rks[UNIPC_MAX_ORDER];
    for (int k = 1; k < p; k++) {
        sigma_point sk = sdx4_sigma_point(sigmas[s0_index - k]);
        u.rk[k - 1] = rks[k - 1] = (sk.lambda - s0.lambda) / h;
    }
    rks[p - 1] = 1.0f;
    float hh = s->predict_x0 ? -h : h;
    float h_phi_1 = torch_expm1(hh), h_phi_k = h_phi_1 / hh - 1.0f;
    float B_h = s->bh1 ? hh : torch_expm1(hh);
    float R[3][3], b[3];
    int factorial = 1;
    for (int i = 1; i <= p; i++) {
        for (int k = 0; k < p; k++)
            R[i - 1][k] = i == 1 ? 1.0f : i == 2 ? rks[k] : rks[k] * rks[k];
        b[i - 1] = h_phi_k * (float)factorial / B_h;
        factorial *= i + 1;
        h_phi_k = h_phi_k / hh - (float)(1.0 / factorial);
    }
    /* diffusers' shortcuts: 0.5 for the predictor's order 2 and the
     * corrector's order 1 */
    if (corrector) {
        if (p == 1) u.rho[0] = 0.5f;
        else solve(p, R, b), memcpy(u.rho, b, (size_t)p * sizeof *b);
    } else if (p == 2) {
        u.rho[0] = 0.5f;
    } else if (p == 3) {
        solve(2, R, b), memcpy(u.rho, b, 2 * sizeof *b);
    }
    if (s->predict_x0) {
        u.ratio = t.sigma / s0.sigma;
        u.c_m0 = t.alpha * h_phi_1;
        u.c_b = t.alpha * B_h;
    } else {
        u.ratio = t.alpha / s0.alpha;
        u.c_m0 = t.sigma * h_phi_1;
        u.c_b = t.sigma * B_h;
    }
    return u;
}

/* The newest stored output is m0, the one before m1 and so on; m0 again
 * past the history's end (a value no update of that order reads). */
static const float *history(const unipc_scheduler *s, int k) {
    return s->outputs[s->solver_order - 1 - (k < s->solver_order ? k : 0)];
}

/* One element of each update (correct_and_predict applies them). */

/* sum_k rho[k] * D1_k over the p - 1 earlier outputs m1 and m2 (p <= 3). */
static inline float earlier_terms(const unipc_update *u, int p, float m0, float m1, float m2) {
    float sum = u->rho[0] * ((m1 - m0) / u->rk[0]);
    if (p > 2) sum = sum + u->rho[1] * ((m2 - m0) / u->rk[1]);
    return sum;
}

/* multistep_uni_p_bh_update: x at sigmas[i] to sigmas[i + 1]. */
static inline float predicted(const unipc_update *u, int p, float x, float m0, float m1, float m2) {
    float x_t = u->ratio * x - u->c_m0 * m0;
    return p == 1 ? x_t : x_t - u->c_b * earlier_terms(u, p, m0, m1, m2);
}

/* multistep_uni_c_bh_update: the sample at sigmas[i] again, from the one
 * at sigmas[i - 1] (x), with m_t the output at sigmas[i]. */
static inline float corrected(const unipc_update *u, int p, float x, float m0, float m1, float m2, float m_t) {
    float x_t = u->ratio * x - u->c_m0 * m0;
    if (p == 1) return x_t - u->c_b * (u->rho[0] * (m_t - m0));
    float d1_t = u->rho[p - 1] * (m_t - m0);
    return x_t - u->c_b * (earlier_terms(u, p, m0, m1, m2) + d1_t);
}

/* convert_model_output at sigmas[i]. */
static void convert(const unipc_scheduler *s, int i, const float *mo, const float *x, float *out,
                    size_t n) {
    sigma_point p = sdx4_sigma_point(s->sigma.sigmas[i]);
    prediction_type type = s->sigma.prediction;
#pragma omp simd
    for (size_t e = 0; e < n; e++) {
        if (s->predict_x0) {
            out[e] = type == PREDICT_EPSILON ? (x[e] - p.sigma * mo[e]) / p.alpha
                     : type == PREDICT_V     ? p.alpha * x[e] - p.sigma * mo[e]
                                             : mo[e];
        } else {
            out[e] = type == PREDICT_EPSILON ? mo[e]
                     : type == PREDICT_V     ? p.alpha * mo[e] + p.sigma * x[e]
                                             : (x[e] - p.alpha * mo[e]) / p.sigma;
        }
    }
    if (s->predict_x0 && s->thresholding)
        sdx4_threshold_sample(out, n, s->thresholding_ratio, s->sample_max_value, s->scratch);
}

/* ------------------------------------------------------------- stepping */

static int corrector_disabled(const unipc_scheduler *s, int i) {
    for (int k = 0; k < s->n_disable_corrector; k++)
        if (s->disable_corrector[k] == i) return 1;
    return 0;
}

/* The step's second pass: correct the last predictor's sample with m_t
 * (corrector order pc, 0 for none), then predict from it (order pp).
 * Always inlined with pc and pp constant, so that each shape's loop is
 * free of branches and vectorizes (m_t's conversion, with its branches
 * on the prediction type, keeps a pass of its own for the same reason). */
static inline __attribute__((always_inline)) void correct_and_predict(
    int pc, int pp, const unipc_update *uc, const unipc_update *up, const float *sample, const float *m_t,
    const float *m0, const float *m1, const float *m2, float *last, float *prev_sample, size_t n) {
#pragma omp simd
    for (size_t e = 0; e < n; e++) {
        float x = pc ? corrected(uc, pc, last[e], m0[e], m1[e], m2[e], m_t[e]) : sample[e];
        last[e] = x;
        prev_sample[e] = predicted(up, pp, x, m_t[e], m0[e], m1[e]);
    }
}

/* A step in two passes over the elements: m_t, then the corrector and
 * the predictor together; m0.. are the history before m_t joins it. */
int sdx4_unipc_step(unipc_scheduler *s, int i, const float *model_output, const float *sample,
                    float *prev_sample) {
    int N = s->sigma.num_timesteps, order = s->solver_order;
    if (!s->last_sample || i != s->step_index || i >= N) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "scheduler step %d: expected step %d of %d", i,
                       s->step_index, N);
        return -1;
    }
    size_t n = s->sigma.numel;
    float *model_t = s->outputs[order], *last = s->last_sample;
    convert(s, i, model_output, sample, model_t, n);
    /* the corrector's sample replaces this one as the predictor's start */
    int pc = i > 0 && !corrector_disabled(s, i - 1) ? s->this_order : 0;
    unipc_update uc = pc ? update_at(s, pc, i, i - 1, 1) : (unipc_update){0};
    int this_order = s->lower_order_final && N - i < order ? N - i : order;
    int pp = this_order < s->lower_order_nums + 1 ? this_order : s->lower_order_nums + 1;
    unipc_update up = update_at(s, pp, i + 1, i, 0);
    const float *m0 = history(s, 0), *m1 = history(s, 1), *m2 = history(s, 2);
#define PASS(PC, PP) correct_and_predict(PC, PP, &uc, &up, sample, model_t, m0, m1, m2, last, prev_sample, n)
    switch (pc * 4 + pp) {
    case 0 * 4 + 1: PASS(0, 1); break;
    case 0 * 4 + 2: PASS(0, 2); break;
    case 0 * 4 + 3: PASS(0, 3); break;
    case 1 * 4 + 1: PASS(1, 1); break;
    case 1 * 4 + 2: PASS(1, 2); break;
    case 1 * 4 + 3: PASS(1, 3); break;
    case 2 * 4 + 1: PASS(2, 1); break;
    case 2 * 4 + 2: PASS(2, 2); break;
    case 2 * 4 + 3: PASS(2, 3); break;
    case 3 * 4 + 1: PASS(3, 1); break;
    case 3 * 4 + 2: PASS(3, 2); break;
    default: PASS(3, 3); break;
    }
#undef PASS
    float *oldest = s->outputs[0];
    memmove(s->outputs, s->outputs + 1, (size_t)order * sizeof *s->outputs);
    s->outputs[order] = oldest;
    s->this_order = pp;
    if (s->lower_order_nums < order) s->lower_order_nums++;
    s->step_index++;
    return 0;
}
