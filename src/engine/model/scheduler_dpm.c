/*
 * scheduler_dpm.c - DPM-Solver++ multistep, as diffusers computes it.
 *
 * The step converts the model output to the predicted sample x0 (the
 * "data prediction" DPM-Solver++ integrates), keeps it for the next step,
 * and moves the sample from sigma_s to sigma_t in log-SNR time lambda:
 * first order from one output (DDIM's update), second order from the last
 * two, once two exist and unless the last step asks for first order.
 *
 * The steps are one float operation per torch operation of diffusers, in
 * its order: coefficients as 0-dim float32 tensors, then per element.
 * torch's log and exp on 0-dim tensors are logf and expf. A final sigma of
 * zero makes lambda +inf, h +inf and exp(-h) 0, exactly as in torch,
 * which is how the last step lands on the predicted sample.
 */
#include "model/scheduler_dpm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

int sdx4_dpm_from_config(sigma_scheduler *s, const config *c) {
    static const char *const solvers[] = {"midpoint", "heun", NULL};
    int rc = sdx4_cfg_int(c, "solver_order", 2, &s->solver_order) ||
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
    return rc ? -1 : 0;
}

void sdx4_dpm_free(sigma_scheduler *s) {
    free(s->model_outputs[0]);
    free(s->model_outputs[1]);
    s->model_outputs[0] = s->model_outputs[1] = NULL;
}

int sdx4_dpm_start(sigma_scheduler *s, size_t numel) {
    float *outputs[2] = {malloc(numel * sizeof(float)), malloc(numel * sizeof(float))};
    if (!outputs[0] || !outputs[1]) {
        free(outputs[0]), free(outputs[1]);
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "set_timesteps: out of memory");
        return -1;
    }
    sdx4_dpm_free(s);
    s->model_outputs[0] = outputs[0], s->model_outputs[1] = outputs[1];
    s->lower_order_nums = 0;
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

int sdx4_dpm_step(sigma_scheduler *s, int i, const float *mo, const float *x, float *prev) {
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
