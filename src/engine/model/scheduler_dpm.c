/*
 * scheduler_dpm.c - the DPM-Solver family as diffusers computes it:
 * DPM-Solver multistep and singlestep (orders 1-3; dpmsolver++,
 * dpmsolver and their SDE variants) and DEIS (orders 1-3, log-rho).
 *
 * Each step converts the model output to what the algorithm integrates in
 * log-SNR time lambda = log(alpha / sigma): the predicted sample x0 for
 * the "++" algorithms, the predicted noise for dpmsolver and DEIS (DEIS
 * and thresholding go through x0 to get it). It keeps the last three and
 * moves the sample from sigma_s to sigma_t:
 *   - multistep (DPM-Solver, DEIS): from the current sample, with as many
 *     previous outputs as the order allows (fewer at the start, and at
 *     the end of short runs when lower_order_final asks);
 *   - singlestep: in cycles of 1, 2, 3 steps (get_order_list) from the
 *     sample at the cycle's first step, each step one order higher.
 * The SDE variants add noise drawn from the pipeline's generator at every
 * step, after the conversion, as diffusers draws it.
 *
 * set_timesteps spaces n + 1 timesteps and drops the last (zero), or
 * spreads sigmas between the extreme training sigmas (Karras,
 * exponential, beta, or Lu's uniform log-SNR) and maps them back to
 * timesteps, rounded or not as each class does and then truncated to
 * int64 as torch's cast does. lambda_min_clipped shortens the span at the
 * high-noise end.
 *
 * The steps are one float operation per torch operation of diffusers, in
 * its order: coefficients as 0-dim float32 tensors, then per element;
 * a - b * d is computed as a + (-b) * d, which is the same float. torch's
 * log and exp on 0-dim tensors are logf and expf; DEIS's coefficients are
 * numpy float32 logs, logf here (within an ulp). A final sigma of zero
 * makes lambda +inf, h +inf and exp(-h) 0, exactly as in torch, which is
 * how a last first-order step lands on the predicted sample.
 *
 * Thresholding is torch.quantile's linear interpolation: the rank
 * q * (n - 1) in float32, the order statistics below and above it, and
 * torch's lerp between them.
 */
#include "model/scheduler_dpm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

/* ---------------------------------------------------------------- config */

/* torch.searchsorted(flip(lambda_t), lambda_min_clipped): the number of
 * training timesteps whose log-SNR is below the clip (the noisiest). */
static int clipped_index(const sigma_scheduler *s) {
    int count = 0;
    for (int t = 0; t < s->num_train_timesteps; t++) {
        float a = s->alphas_cumprod[t];
        float lambda = logf(sqrtf(a)) - logf(sqrtf(1.0f - a));
        count += (double)lambda < s->lambda_min_clipped;
    }
    return count;
}

static int refuse(const config *c, const char *what) {
    sdx4_set_error(SDX4_ERR_MODEL, "%s: %s", c->label, what);
    return -1;
}

int sdx4_dpm_from_config(sigma_scheduler *s, const config *c) {
    /* diffusers reads the names after the first few as the first one */
    static const char *const multi_algorithms[] = {"dpmsolver++", "dpmsolver", "sde-dpmsolver++",
                                                   "sde-dpmsolver", "deis", NULL};
    static const char *const single_algorithms[] = {"dpmsolver++", "dpmsolver",
                                                    "sde-dpmsolver++", "deis", NULL};
    static const char *const deis_algorithms[] = {"deis", "dpmsolver", "dpmsolver++", NULL};
    static const char *const solvers[] = {"midpoint", "heun", "logrho", "bh1", "bh2", NULL};
    static const char *const deis_solvers[] = {"logrho", "midpoint", "heun", "bh1", "bh2", NULL};
    static const char *const finals[] = {"zero", "sigma_min", NULL};
    int multistep = s->method == SIGMA_DPM_MULTISTEP, single = s->method == SIGMA_DPM_SINGLESTEP;
    int algorithm = 0, solver = 0;
    double ratio, max_value;
    s->lambda_min_clipped = -INFINITY;
    int rc = sdx4_cfg_int(c, "solver_order", 2, &s->solver_order) ||
             sdx4_cfg_bool(c, "lower_order_final", !single, &s->lower_order_final) ||
             sdx4_cfg_bool(c, "thresholding", 0, &s->thresholding) ||
             sdx4_cfg_float(c, "dynamic_thresholding_ratio", 0.995, &ratio) ||
             sdx4_cfg_float(c, "sample_max_value", 1.0, &max_value) ||
             sdx4_sigma_read_spread(s, c) || sdx4_cfg_expect_bool(c, "use_flow_sigmas", 0) ||
             sdx4_cfg_expect_bool(c, "use_dynamic_shifting", 0);
    if (rc) return -1;
    if (s->method == SIGMA_DEIS) {
        if (sdx4_cfg_choice(c, "algorithm_type", "deis", deis_algorithms, &algorithm) ||
            sdx4_cfg_choice(c, "solver_type", "logrho", deis_solvers, &solver))
            return -1;
        algorithm = DPM_SOLVER; /* its first-order update is dpmsolver's */
    } else {
        if (sdx4_cfg_choice(c, "algorithm_type", "dpmsolver++",
                            multistep ? multi_algorithms : single_algorithms, &algorithm) ||
            sdx4_cfg_choice(c, "solver_type", "midpoint", solvers, &solver) ||
            sdx4_cfg_choice(c, "final_sigmas_type", "zero", finals, &s->final_sigma_min) ||
            sdx4_cfg_float(c, "lambda_min_clipped", -INFINITY, &s->lambda_min_clipped) ||
            sdx4_cfg_expect_null(c, "variance_type"))
            return -1;
        if (!strcmp(multistep ? multi_algorithms[algorithm] : single_algorithms[algorithm], "deis"))
            algorithm = DPM_PLUSPLUS;
        s->heun = solver == 1;
        if (multistep && (sdx4_cfg_bool(c, "euler_at_final", 0, &s->euler_at_final) ||
                          sdx4_cfg_bool(c, "use_lu_lambdas", 0, &s->lu_lambdas)))
            return -1;
    }
    s->algorithm = algorithm;
    s->threshold_ratio = (float)ratio;
    s->sample_max_value = (float)max_value;
    if (s->solver_order < 1 || s->solver_order > 3) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: solver_order=%d is not supported (supported: 1, 2, 3)",
                       c->label, s->solver_order);
        return -1;
    }
    if (s->thresholding && !(ratio >= 0 && ratio <= 1))
        return refuse(c, "dynamic_thresholding_ratio must be between 0 and 1");
    if ((algorithm == DPM_SOLVER || algorithm == DPM_SDE_SOLVER) && s->method != SIGMA_DEIS &&
        !s->final_sigma_min)
        return refuse(c, "final_sigmas_type=zero is not supported with algorithm_type dpmsolver "
                         "or sde-dpmsolver (use sigma_min)");
    if (algorithm == DPM_SDE_SOLVER && s->solver_order == 3)
        return refuse(c, "solver_order=3 is not supported with algorithm_type sde-dpmsolver "
                         "(diffusers has no third-order update for it)");
    if (clipped_index(s) >= s->num_train_timesteps)
        return refuse(c, "lambda_min_clipped clips every training timestep");
    if (single && algorithm == DPM_SOLVER && s->thresholding)
        return refuse(c, "thresholding is not supported with algorithm_type dpmsolver in "
                         "DPMSolverSinglestepScheduler (diffusers fails on it)");
    return 0;
}

/* ----------------------------------------------------------- schedule */

/* np.arange(start, 0, step) for a negative step, at most max values. */
static int arange_down(double start, double step, int max, double *out) {
    int length = (int)ceil(-start / step);
    length = length < 0 ? 0 : length > max ? max : length;
    double second = start + step, delta = second - start;
    for (int i = 0; i < length; i++) out[i] = i == 0 ? start : i == 1 ? second : start + i * delta;
    return length;
}

int sdx4_dpm_schedule(sigma_scheduler *s, int n, const float *log_sigmas, double *ts,
                      double *sig) {
    int T = s->num_train_timesteps, last = T - clipped_index(s), count = n;
    if (s->spacing == SPACING_TRAILING) {
        count = arange_down(last, -((double)T / n), n + 1, ts);
        for (int i = 0; i < count; i++) ts[i] = nearbyint(ts[i]) - 1;
    } else { /* n + 1 points, reversed, the last (0) dropped */
        for (int i = 0; i < n; i++) {
            int k = n - i;
            if (s->spacing == SPACING_LEADING)
                ts[i] = (double)(k * (last / (n + 1))) + s->steps_offset;
            else /* np.linspace(0, last - 1, n + 1).round() */
                ts[i] = nearbyint(k == n ? (double)(last - 1) : k * ((double)(last - 1) / n));
        }
    }
    double lo = sdx4_sigma_train(s, 0), hi = sdx4_sigma_train(s, T - 1);
    int spread = 1;
    if (s->lu_lambdas && !s->karras) { /* _convert_to_lu: rho 1 in log sigma */
        double lambda_min = log_sigmas[0], lambda_max = log_sigmas[T - 1];
        for (int i = 0; i < n; i++) {
            double ramp = n > 1 ? (i == n - 1 ? 1.0 : i * (1.0 / (n - 1))) : 0.0;
            sig[i] = exp(lambda_max + ramp * (lambda_min - lambda_max));
        }
    } else {
        spread = sdx4_sigma_convert(s, lo, hi, n, sig);
    }
    if (spread) {
        /* Karras and Lu timesteps are rounded (multistep's not on a cosine
         * schedule), exponential and beta ones not; all then cast */
        int round = (s->karras || s->lu_lambdas) &&
                    !(s->method == SIGMA_DPM_MULTISTEP && s->cosine_betas);
        count = n;
        for (int i = 0; i < n; i++) {
            double t = sdx4_sigma_to_t(log_sigmas, T, sig[i]);
            ts[i] = trunc(round ? nearbyint(t) : t);
        }
    } else {
        for (int i = 0; i < count; i++) sig[i] = sdx4_sigma_interp(s, ts[i]);
    }
    if (s->method == SIGMA_DEIS) /* the last sigma again, or the training's smallest */
        sig[count] = spread ? (double)(float)sig[count - 1] : sdx4_sigma_train(s, 0);
    else
        sig[count] = s->final_sigma_min ? sdx4_sigma_train(s, 0) : 0.0;
    return count;
}

/* -------------------------------------------------------------- the run */

void sdx4_dpm_free(sigma_scheduler *s) {
    for (int k = 0; k < 3; k++) free(s->model_outputs[k]), s->model_outputs[k] = NULL;
    free(s->first_sample), free(s->noise), free(s->scratch), free(s->orders);
    s->first_sample = s->noise = s->scratch = NULL;
    s->orders = NULL;
}

/* get_order_list: singlestep's order at each of n steps. */
static void order_list(const sigma_scheduler *s, int n, int *orders) {
    int order = s->solver_order, k = 0;
    int cycles = s->lower_order_final && n % order == 0 ? n / order - 1 : n / order;
    for (int c = 0; c < cycles; c++)
        for (int j = 1; j <= order; j++) orders[k++] = j;
    if (s->lower_order_final) {
        if (order == 3 && n % 3 == 0) orders[k++] = 1, orders[k++] = 2, orders[k++] = 1;
        else if (order == 2 && n % 2 == 0) orders[k++] = 1, orders[k++] = 1;
        else
            for (int j = 1; k < n; j++) orders[k++] = j; /* 1 or 1, 2 */
    }
    if (!s->final_sigma_min) orders[n - 1] = 1;
}

int sdx4_dpm_start(sigma_scheduler *s, int count, size_t numel) {
    float *buf[6];
    int ok = 1;
    for (int k = 0; k < 6; k++) ok &= (buf[k] = malloc(numel * sizeof(float))) != NULL;
    int *orders = malloc((size_t)count * sizeof *orders);
    if (!ok || !orders) {
        for (int k = 0; k < 6; k++) free(buf[k]);
        free(orders);
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "set_timesteps: out of memory");
        return -1;
    }
    sdx4_dpm_free(s);
    for (int k = 0; k < 3; k++) s->model_outputs[k] = buf[k];
    s->first_sample = buf[3], s->noise = buf[4], s->scratch = buf[5];
    s->orders = orders;
    if (s->method == SIGMA_DPM_SINGLESTEP) {
        /* diffusers changes its config so, for this and later runs */
        if (!s->lower_order_final && (count % s->solver_order || !s->final_sigma_min))
            s->lower_order_final = 1;
        order_list(s, count, orders);
    }
    s->lower_order_nums = 0;
    return 0;
}

/* ------------------------------------------------------------- stepping */

/* convert_model_output at step i into out: x0 for dpmsolver++ and
 * sde-dpmsolver++, the noise for dpmsolver, sde-dpmsolver and DEIS. */
static void convert(const sigma_scheduler *s, int i, const float *mo, const float *x, float *out) {
    size_t n = s->numel;
    sigma_point p = sdx4_sigma_point(s->sigmas[i]);
    int deis = s->method == SIGMA_DEIS;
    int data = !deis && (s->algorithm == DPM_PLUSPLUS || s->algorithm == DPM_SDE_PLUSPLUS);
    if (data || deis) {
#pragma omp simd
        for (size_t k = 0; k < n; k++) {
            if (s->prediction == PREDICT_EPSILON) out[k] = (x[k] - p.sigma * mo[k]) / p.alpha;
            else if (s->prediction == PREDICT_V) out[k] = p.alpha * x[k] - p.sigma * mo[k];
            else out[k] = mo[k];
        }
        if (s->thresholding) sdx4_threshold_sample(out, s->numel, s->threshold_ratio, s->sample_max_value, s->scratch);
        if (deis)
#pragma omp simd
            for (size_t k = 0; k < n; k++) out[k] = (x[k] - p.alpha * out[k]) / p.sigma;
        return;
    }
#pragma omp simd
    for (size_t k = 0; k < n; k++) {
        if (s->prediction == PREDICT_EPSILON) out[k] = mo[k];
        else if (s->prediction == PREDICT_V) out[k] = p.alpha * mo[k] + p.sigma * x[k];
        else out[k] = (x[k] - p.alpha * mo[k]) / p.sigma;
    }
    if (s->thresholding) {
#pragma omp simd
        for (size_t k = 0; k < n; k++) out[k] = (x[k] - p.sigma * out[k]) / p.alpha;
        sdx4_threshold_sample(out, s->numel, s->threshold_ratio, s->sample_max_value, s->scratch);
#pragma omp simd
        for (size_t k = 0; k < n; k++) out[k] = (x[k] - p.alpha * out[k]) / p.sigma;
    }
}

/* One update: prev = a * x + b * D0 (+ c * D1) (+ e * D2) (+ f * noise),
 * summed left to right, with the D's of the form below from the newest
 * outputs m0, m1, m2. */
typedef enum {
    D_FIRST,       /* D0 = m0 */
    D_MULTI2,      /* D0 = m0, D1 = (m0 - m1) / r0 */
    D_MULTI3,      /* and the third-order differences of m0, m1, m2 */
    D_SINGLE2,     /* D0 = m1, D1 = (m0 - m1) / r0 */
    D_SINGLE3_MID, /* D0 = m2, D1 = D1_1 = (m0 - m2) / r0 */
    D_SINGLE3      /* D0 = m2, D1 and D2 from D1_0 and D1_1 */
} d_form;

typedef struct {
    d_form form; /* its terms: D0 (D_FIRST), to D2 (the third orders), else to D1 */
    float a, b, c, e, f;
    float r0, r1, inv_r0, inv_r1;
} dpm_update;

/* The coefficients from the base point s to t, h = lambda_t - lambda_s:
 * b; c of the midpoint's second order (c_mid) and of heun's and the third
 * order (c); e, D2's; f, the noise's. */
typedef struct {
    float a, b, c_mid, c, e, f;
} dpm_coefs;

static dpm_coefs coefs(int algorithm, sigma_point t, sigma_point s, float h) {
    dpm_coefs k = {0};
    if (algorithm == DPM_PLUSPLUS) {
        float em = expf(-h) - 1.0f;
        k.a = t.sigma / s.sigma;
        k.b = -(t.alpha * em);
        k.c_mid = -(0.5f * (t.alpha * em));
        k.c = t.alpha * (em / h + 1.0f);
        k.e = -(t.alpha * ((em + h) / (h * h) - 0.5f));
    } else if (algorithm == DPM_SOLVER) {
        float ep = expf(h) - 1.0f;
        k.a = t.alpha / s.alpha;
        k.b = -(t.sigma * ep);
        k.c_mid = -(0.5f * (t.sigma * ep));
        k.c = -(t.sigma * (ep / h - 1.0f));
        k.e = -(t.sigma * ((ep - h) / (h * h) - 0.5f));
    } else if (algorithm == DPM_SDE_PLUSPLUS) {
        float e2 = 1.0f - expf(-2.0f * h), h2 = 2.0f * h;
        k.a = t.sigma / s.sigma * expf(-h);
        k.b = t.alpha * e2;
        k.c_mid = 0.5f * (t.alpha * e2);
        k.c = t.alpha * (e2 / (-2.0f * h) + 1.0f);
        k.e = t.alpha * ((e2 - h2) / (h2 * h2) - 0.5f);
        k.f = t.sigma * sqrtf(e2);
    } else { /* sde-dpmsolver */
        float ep = expf(h) - 1.0f;
        k.a = t.alpha / s.alpha;
        k.b = -(2.0f * (t.sigma * ep));
        k.c_mid = -(t.sigma * ep);
        k.c = -(2.0f * (t.sigma * (ep / h - 1.0f)));
        k.f = t.sigma * sqrtf(expf(2.0f * h) - 1.0f);
    }
    return k;
}

/* apply() for one form, a constant where it is called: a straight-line
 * body that vectorizes (the pipeline's host time per step). */
static inline void apply_form(d_form form, const dpm_update *u, const float *m0, const float *m1,
                              const float *m2, const float *x, size_t n, float *prev) {
    const float k1 = u->r0 / (u->r0 + u->r1), k2 = 1.0f / (u->r0 + u->r1), rdiff = u->r0 - u->r1;
    const float a = u->a, b = u->b, c = u->c, e = u->e, inv_r0 = u->inv_r0, inv_r1 = u->inv_r1;
    const float r0 = u->r0, r1 = u->r1;
#pragma omp simd
    for (size_t k = 0; k < n; k++) {
        float d0, d1 = 0, d2 = 0, d10, d11;
        switch (form) {
        case D_FIRST: d0 = m0[k]; break;
        case D_MULTI2: d0 = m0[k], d1 = inv_r0 * (m0[k] - m1[k]); break;
        case D_MULTI3:
            d0 = m0[k];
            d10 = inv_r0 * (m0[k] - m1[k]), d11 = inv_r1 * (m1[k] - m2[k]);
            d1 = d10 + k1 * (d10 - d11), d2 = k2 * (d10 - d11);
            break;
        case D_SINGLE2: d0 = m1[k], d1 = inv_r0 * (m0[k] - m1[k]); break;
        case D_SINGLE3_MID: d0 = m2[k], d1 = inv_r0 * (m0[k] - m2[k]); break;
        default: /* D_SINGLE3 */
            d0 = m2[k];
            d10 = inv_r1 * (m1[k] - m2[k]), d11 = inv_r0 * (m0[k] - m2[k]);
            d1 = (r0 * d10 - r1 * d11) / rdiff, d2 = 2.0f * (d11 - d10) / rdiff;
            break;
        }
        float v = a * x[k] + b * d0;
        if (form != D_FIRST) v = v + c * d1;
        if (form == D_MULTI3 || form == D_SINGLE3) v = v + e * d2;
        prev[k] = v;
    }
}

static void apply(const sigma_scheduler *s, const dpm_update *u, const float *x, float *prev) {
    const float *m0 = s->model_outputs[2], *m1 = s->model_outputs[1], *m2 = s->model_outputs[0];
    size_t n = s->numel;
    switch (u->form) {
    case D_FIRST: apply_form(D_FIRST, u, m0, m1, m2, x, n, prev); break;
    case D_MULTI2: apply_form(D_MULTI2, u, m0, m1, m2, x, n, prev); break;
    case D_MULTI3: apply_form(D_MULTI3, u, m0, m1, m2, x, n, prev); break;
    case D_SINGLE2: apply_form(D_SINGLE2, u, m0, m1, m2, x, n, prev); break;
    case D_SINGLE3_MID: apply_form(D_SINGLE3_MID, u, m0, m1, m2, x, n, prev); break;
    default: apply_form(D_SINGLE3, u, m0, m1, m2, x, n, prev); break;
    }
    if (s->algorithm == DPM_SDE_PLUSPLUS || s->algorithm == DPM_SDE_SOLVER) /* the last term */
#pragma omp simd
        for (size_t k = 0; k < n; k++) prev[k] = prev[k] + u->f * s->noise[k];
}

/* One multistep DPM-Solver or singlestep update of the given order. */
static void dpm_update_at(const sigma_scheduler *s, int i, int order, const float *x, float *prev) {
    const float *sig = s->sigmas;
    int single = s->method == SIGMA_DPM_SINGLESTEP;
    sigma_point t = sdx4_sigma_point(sig[i + 1]), s0 = sdx4_sigma_point(sig[i]);
    dpm_update u = {.form = D_FIRST};
    dpm_coefs k;
    if (order == 1) {
        k = coefs(s->algorithm, t, s0, t.lambda - s0.lambda);
    } else if (order == 2) {
        sigma_point s1 = sdx4_sigma_point(sig[i - 1]);
        /* multistep steps from s0 with the slope from s1; singlestep
         * from s1, where its cycle began */
        float h = single ? t.lambda - s1.lambda : t.lambda - s0.lambda;
        float h0 = s0.lambda - s1.lambda;
        k = coefs(s->algorithm, t, single ? s1 : s0, h);
        u.r0 = h0 / h, u.inv_r0 = 1.0f / u.r0;
        u.form = single ? D_SINGLE2 : D_MULTI2;
        u.c = s->heun ? k.c : k.c_mid;
    } else {
        sigma_point s1 = sdx4_sigma_point(sig[i - 1]), s2 = sdx4_sigma_point(sig[i - 2]);
        float h, h0, h1;
        if (single)
            h = t.lambda - s2.lambda, h0 = s0.lambda - s2.lambda, h1 = s1.lambda - s2.lambda;
        else
            h = t.lambda - s0.lambda, h0 = s0.lambda - s1.lambda, h1 = s1.lambda - s2.lambda;
        k = coefs(s->algorithm, t, single ? s2 : s0, h);
        u.r0 = h0 / h, u.r1 = h1 / h;
        u.inv_r0 = 1.0f / u.r0, u.inv_r1 = 1.0f / u.r1;
        u.c = k.c, u.e = k.e;
        u.form = !single ? D_MULTI3 : s->heun ? D_SINGLE3 : D_SINGLE3_MID;
    }
    u.a = k.a, u.b = k.b, u.f = k.f;
    apply(s, &u, x, prev);
}

/* DEIS's log-rho integrals of the Lagrange basis (ind_fn). */
static float deis_ind2(float t, float b, float c) {
    float lt = logf(t), lb = logf(b), lc = logf(c);
    return t * (-lc + lt - 1.0f) / (lb - lc);
}

static float deis_ind3(float t, float b, float c, float d) {
    float lt = logf(t), lb = logf(b), lc = logf(c), ld = logf(d);
    float num = t * (lc * (ld - lt + 1.0f) - ld * lt + ld + lt * lt - 2.0f * lt + 2.0f);
    return num / ((lb - lc) * (lb - ld));
}

static void deis_update(const sigma_scheduler *s, int i, int order, const float *x, float *prev) {
    if (order == 1) {
        dpm_update_at(s, i, 1, x, prev); /* dpmsolver's first order */
        return;
    }
    const float *sig = s->sigmas;
    sigma_point t = sdx4_sigma_point(sig[i + 1]), s0 = sdx4_sigma_point(sig[i]), s1 = sdx4_sigma_point(sig[i - 1]);
    float rt = t.sigma / t.alpha, r0 = s0.sigma / s0.alpha, r1 = s1.sigma / s1.alpha;
    float c1, c2, c3 = 0;
    if (order == 2) {
        c1 = deis_ind2(rt, r0, r1) - deis_ind2(r0, r0, r1);
        c2 = deis_ind2(rt, r1, r0) - deis_ind2(r0, r1, r0);
    } else {
        sigma_point s2 = sdx4_sigma_point(sig[i - 2]);
        float r2 = s2.sigma / s2.alpha;
        c1 = deis_ind3(rt, r0, r1, r2) - deis_ind3(r0, r0, r1, r2);
        c2 = deis_ind3(rt, r1, r2, r0) - deis_ind3(r0, r1, r2, r0);
        c3 = deis_ind3(rt, r2, r0, r1) - deis_ind3(r0, r2, r0, r1);
    }
    const float *m0 = s->model_outputs[2], *m1 = s->model_outputs[1], *m2 = s->model_outputs[0];
#pragma omp simd
    for (size_t k = 0; k < s->numel; k++) {
        float v = x[k] / s0.alpha + c1 * m0[k] + c2 * m1[k];
        if (order == 3) v = v + c3 * m2[k];
        prev[k] = t.alpha * v;
    }
}

int sdx4_dpm_step(sigma_scheduler *s, int i, const float *mo, const float *x, torch_rng *rng,
                  float *prev) {
    int N = s->num_timesteps;
    int sde = s->algorithm == DPM_SDE_PLUSPLUS || s->algorithm == DPM_SDE_SOLVER;
    if (sde && !rng) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "DPM-Solver SDE step: no generator");
        return -1;
    }
    float *reused = s->model_outputs[0]; /* the oldest output's buffer takes the newest */
    s->model_outputs[0] = s->model_outputs[1];
    s->model_outputs[1] = s->model_outputs[2];
    s->model_outputs[2] = reused;
    convert(s, i, mo, x, reused);
    if (sde) sdx4_torch_randn(rng, s->noise, s->numel);
    if (s->method == SIGMA_DPM_SINGLESTEP) {
        int order = s->orders[i];
        while (order > i + 1) order--; /* fewer outputs than the order so far */
        if (order == 1 && s->first_sample != x)
            memcpy(s->first_sample, x, s->numel * sizeof *x);
        dpm_update_at(s, i, order, s->first_sample, prev);
        return 0;
    }
    int short_run = s->lower_order_final && N < 15;
    int lower_final = i == N - 1 && (short_run || (s->method == SIGMA_DPM_MULTISTEP &&
                                                   (s->euler_at_final || !s->final_sigma_min)));
    int lower_second = i == N - 2 && short_run;
    int order = s->solver_order == 1 || s->lower_order_nums < 1 || lower_final   ? 1
                : s->solver_order == 2 || s->lower_order_nums < 2 || lower_second ? 2
                                                                                  : 3;
    if (s->method == SIGMA_DEIS) deis_update(s, i, order, x, prev);
    else dpm_update_at(s, i, order, x, prev);
    if (s->lower_order_nums < s->solver_order) s->lower_order_nums++;
    return 0;
}
