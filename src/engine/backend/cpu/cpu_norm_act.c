/*
 * cpu_norm_act.c - normalisations, activations and in-place arithmetic.
 *
 * GroupNorm and LayerNorm take each group's (or row's) mean and variance in
 * double with two passes (mean first, then the squared deviations), so the
 * statistics are exact to float precision even over the million-element
 * groups of the VAE at 512x512. The normalised value is
 * (x - mean) * (rstd * gamma) + beta: subtracting the mean first keeps the
 * result exact to a few ulps even when the mean is large against the
 * spread (PyTorch folds the mean into the shift, which loses digits there).
 * GroupNorm applies the activation that follows it in every ResNet block
 * while the group is still in cache. It is the one operation here that
 * takes seconds (the VAE's 32 groups at 2048x2048, on a busy machine), so
 * each group first reads the caller's cancel flag (core/cancel.h).
 *
 * The activations are PyTorch's formulas: silu x / (1 + e^-x), gelu
 * 0.5 x (1 + erf(x / sqrt 2)) (the erf form, not the tanh approximation),
 * quick_gelu x * sigmoid(1.702 x) as CLIP's, with the vectorisable exp and
 * erf of cpu_math.h.
 */
#include <inttypes.h>
#include <math.h>
#include <string.h>

#include "backend/cpu/cpu_internal.h"
#include "backend/cpu/cpu_math.h"
#include "core/cancel.h"
#include "core/error.h"

/* ----------------------------------------------------------- activations */

static inline v4f silu4(v4f x) { return x / (1.0f + cpu_exp4(-x)); }
static inline v4f gelu4(v4f x) { return 0.5f * x * (1.0f + cpu_erf4(x * (float)M_SQRT1_2)); }
static inline v4f quick_gelu4(v4f x) { return x / (1.0f + cpu_exp4(-1.702f * x)); }

static inline v4f act4(v4f x, activation act) {
    switch (act) {
    case ACT_SILU: return silu4(x);
    case ACT_GELU: return gelu4(x);
    case ACT_QUICK_GELU: return quick_gelu4(x);
    case ACT_NONE: break;
    }
    return x;
}

/* dst[i] = act(src[i]) */
static void activate_span(float *dst, const float *src, int64_t n, activation act) {
    for (int64_t i = 0; i < n; i += 4) v4_store(dst + i, act4(v4_load(src + i, n - i), act), n - i);
}

/* Elements per parallel chunk of the elementwise loops. */
#define CHUNK 16384

tensor *sdx4_cpu_activate(backend *be, const tensor *x, activation act) {
    if (sdx4_cpu_check("activate", "input", x, 0) || sdx4_check_activation("activate", act)) return NULL;
    tensor *y = sdx4_cpu_new_tensor(be, x->ndim, x->shape);
    if (!y) return NULL;
    int64_t n = tensor_numel(x);
    const float *src = x->data;
    float *dst = y->data;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static)
    for (int64_t i = 0; i < n; i += CHUNK)
        activate_span(dst + i, src + i, n - i < CHUNK ? n - i : CHUNK, act);
    return y;
}

tensor *sdx4_cpu_geglu(backend *be, const tensor *x) {
    if (sdx4_cpu_check("geglu", "input", x, 0)) return NULL;
    if (sdx4_check_geglu(x)) return NULL;
    int64_t two_n = x->shape[x->ndim - 1], N = two_n / 2;
    int64_t shape[4];
    memcpy(shape, x->shape, sizeof shape);
    shape[x->ndim - 1] = N;
    tensor *y = sdx4_cpu_new_tensor(be, x->ndim, shape);
    if (!y) return NULL;
    int64_t rows = tensor_numel(y) / N;
    const float *src = x->data;
    float *dst = y->data;
    /* in diffusers: hidden, gate = proj(x).chunk(2, dim=-1); hidden * gelu(gate) */
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *hidden = src + r * two_n, *gate = hidden + N;
        for (int64_t i = 0; i < N; i += 4)
            v4_store(dst + r * N + i, v4_load(hidden + i, N - i) * gelu4(v4_load(gate + i, N - i)),
                     N - i);
    }
    return y;
}

/* ------------------------------------------------------------ in place */

int sdx4_cpu_add_inplace(backend *be, tensor *a, const tensor *b, float scale_b) {
    if (sdx4_cpu_check("add", "a", a, 0) || sdx4_cpu_check("add", "b", b, 0) ||
        sdx4_check_same_shape("add", a, b))
        return -1;
    int64_t n = tensor_numel(a);
    float *ad = a->data;
    const float *bd = b->data;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static)
    for (int64_t i = 0; i < n; i += CHUNK) {
        int64_t end = n - i < CHUNK ? n : i + CHUNK;
        if (scale_b == 1.0f) { /* the residual connections: exactly torch's a + b */
            for (int64_t j = i; j < end; j += 4)
                v4_store(ad + j, v4_load(ad + j, end - j) + v4_load(bd + j, end - j), end - j);
        } else {
            for (int64_t j = i; j < end; j += 4)
                v4_store(ad + j, v4_load(ad + j, end - j) + v4_load(bd + j, end - j) * scale_b,
                         end - j);
        }
    }
    return 0;
}

int sdx4_cpu_add_channel_bias_inplace(backend *be, tensor *x, const tensor *v) {
    if (sdx4_cpu_check("add_channel_bias", "x", x, 4) || sdx4_cpu_check("add_channel_bias", "v", v, 2))
        return -1;
    if (sdx4_check_channel_bias(x, v)) return -1;
    int64_t B = x->shape[0], C = x->shape[1], S = x->shape[2] * x->shape[3];
    float *xd = x->data;
    const float *vd = v->data;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static)
    for (int64_t bc = 0; bc < B * C; bc++) {
        float *row = xd + bc * S;
        for (int64_t i = 0; i < S; i += 4)
            v4_store(row + i, v4_load(row + i, S - i) + vd[bc], S - i);
    }
    return 0;
}

int sdx4_cpu_scale_inplace(backend *be, tensor *x, float s) {
    if (sdx4_cpu_check("scale", "x", x, 0)) return -1;
    int64_t n = tensor_numel(x);
    float *xd = x->data;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static)
    for (int64_t i = 0; i < n; i += CHUNK) {
        int64_t end = n - i < CHUNK ? n : i + CHUNK;
        for (int64_t j = i; j < end; j += 4)
            v4_store(xd + j, v4_load(xd + j, end - j) * s, end - j);
    }
    return 0;
}

int sdx4_cpu_prelu_inplace(backend *be, tensor *x, const tensor *slopes, float slope) {
    if (sdx4_cpu_check("prelu", "x", x, 4) || (slopes && sdx4_cpu_check("prelu", "slopes", slopes, 1)) ||
        sdx4_check_prelu(x, slopes, slope))
        return -1;
    int64_t B = x->shape[0], C = x->shape[1], S = x->shape[2] * x->shape[3];
    float *xd = x->data;
    const float *sd = slopes ? slopes->data : NULL;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static)
    for (int64_t bc = 0; bc < B * C; bc++) {
        float *row = xd + bc * S;
        v4f k = v4_splat(sd ? sd[bc % C] : slope), zero = v4_splat(0.0f);
        for (int64_t i = 0; i < S; i += 4) {
            v4f v = v4_load(row + i, S - i);
            v4_store(row + i, v4_select(v < zero, v * k, v), S - i);
        }
    }
    return 0;
}

/* -------------------------------------------------------- normalisation */

/* Mean and 1/sqrt(biased variance + eps) of n floats. Sums of 64 values
 * are taken in float vector lanes and added up in double; both passes sum
 * deviations from a value near the mean (x[0], then the mean itself), which
 * keeps the float sums small and exact to a few ulps even for data far
 * from zero. */
static void moments(const float *x, int64_t n, float eps, double *mean, double *rstd) {
    float pivot = x[0];
    double sum = 0, sq = 0;
    for (int64_t i = 0; i < n; i += 64) {
        int64_t end = n - i < 64 ? n : i + 64;
        v4f acc = v4_splat(0.0f);
        for (int64_t j = i; j < end; j += 4) acc += v4_load_fill(x + j, end - j, pivot) - pivot;
        sum += v4_sum(acc);
    }
    double m = pivot + sum / (double)n;
    float mf = (float)m;
    for (int64_t i = 0; i < n; i += 64) {
        int64_t end = n - i < 64 ? n : i + 64;
        v4f acc = v4_splat(0.0f);
        for (int64_t j = i; j < end; j += 4) {
            v4f d = v4_load_fill(x + j, end - j, mf) - mf;
            acc += d * d;
        }
        sq += v4_sum(acc);
    }
    /* sq is about mf, not m: the sum of squares about m is smaller by n (m - mf)^2 */
    double offset = m - mf;
    *mean = m;
    *rstd = 1.0 / sqrt(sq / (double)n - offset * offset + eps);
}

static int check_gamma_beta(const char *op, const tensor *gamma, const tensor *beta, int64_t C) {
    if (sdx4_cpu_check(op, "gamma", gamma, 0) || sdx4_cpu_check(op, "beta", beta, 0)) return -1;
    return sdx4_check_affine(op, gamma, beta, C);
}

tensor *sdx4_cpu_group_norm(backend *be, const tensor *x, int groups, const tensor *gamma,
                       const tensor *beta, float eps, activation act) {
    if (sdx4_cpu_check("group_norm", "input", x, 0) || sdx4_check_activation("group_norm", act)) return NULL;
    if (sdx4_check_group_norm(x, groups)) return NULL;
    int64_t B = x->shape[0], C = x->shape[1], S = tensor_numel(x) / (B * C);
    if (check_gamma_beta("group_norm", gamma, beta, C)) return NULL;
    tensor *y = sdx4_cpu_new_tensor(be, x->ndim, x->shape);
    if (!y) return NULL;
    int64_t per_group = C / groups;
    const float *xd = x->data, *g = gamma->data, *bt = beta->data;
    float *yd = y->data;
    const sdx4_atomic_int *cancel = sdx4_cancel_flag(); /* the workers' thread-locals have none */
    int canceled = 0;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(dynamic, 1) reduction(|| : canceled)
    for (int64_t bg = 0; bg < B * groups; bg++) {
        if (canceled || (canceled = cancel_is_set(cancel))) continue;
        int64_t c0 = (bg % groups) * per_group, offset = bg * per_group * S;
        double mean, rstd;
        moments(xd + offset, per_group * S, eps, &mean, &rstd);
        for (int64_t c = 0; c < per_group; c++) {
            float m = (float)mean, scale = (float)(rstd * g[c0 + c]), shift = bt[c0 + c];
            const float *src = xd + offset + c * S;
            float *dst = yd + offset + c * S;
            for (int64_t i = 0; i < S; i += 4)
                v4_store(dst + i, act4((v4_load(src + i, S - i) - m) * scale + shift, act), S - i);
        }
    }
    if (canceled) {
        tensor_free(y);
        sdx4_cancel_stopped();
        return NULL;
    }
    return y;
}

tensor *sdx4_cpu_layer_norm(backend *be, const tensor *x, const tensor *gamma, const tensor *beta,
                       float eps) {
    if (sdx4_cpu_check("layer_norm", "input", x, 0)) return NULL;
    int64_t D = x->shape[x->ndim - 1], rows = tensor_numel(x) / D;
    if (check_gamma_beta("layer_norm", gamma, beta, D)) return NULL;
    tensor *y = sdx4_cpu_new_tensor(be, x->ndim, x->shape);
    if (!y) return NULL;
    const float *xd = x->data, *g = gamma->data, *bt = beta->data;
    float *yd = y->data;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        double mean, rstd;
        moments(xd + r * D, D, eps, &mean, &rstd);
        float m = (float)mean, scale = (float)rstd;
        const float *src = xd + r * D;
        float *dst = yd + r * D;
        for (int64_t i = 0; i < D; i += 4)
            v4_store(dst + i,
                     (v4_load(src + i, D - i) - m) * scale * v4_load(g + i, D - i) +
                         v4_load(bt + i, D - i),
                     D - i);
    }
    return y;
}
