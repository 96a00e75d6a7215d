/*
 * backend_check.c - the shape checks shared by the backends; see
 * backend_check.h. The messages name the operation first, as every other
 * error of the engine does, and print shapes as "[B,C,H,W]".
 */
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>

#include "backend/backend_check.h"
#include "core/error.h"

int64_t sdx4_check_shape(const char *op, int ndim, const int64_t *shape) {
    if (ndim < 1 || ndim > 4 || !shape) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "%s: %d dimensions (1 to 4 supported)", op, ndim);
        return -1;
    }
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 1) {
            sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "%s: dimension %d is %" PRId64, op, i, shape[i]);
            return -1;
        }
        if (shape[i] > (INT64_MAX / 4) / n) {
            sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: tensor too large", op);
            return -1;
        }
        n *= shape[i];
    }
    return n;
}

int64_t sdx4_check_weight(const void *data, dtype type, int ndim, const int64_t *shape) {
    int64_t n = sdx4_check_shape("weight", ndim, shape);
    if (n < 0) return -1;
    if (!data) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "weight: no data");
        return -1;
    }
    if (type != DTYPE_F32 && type != DTYPE_F16 && type != DTYPE_BF16) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "weight: unknown dtype %d", (int)type);
        return -1;
    }
    return n;
}

int sdx4_check_present(const char *op, const char *what, const tensor *t) {
    if (!t || !t->data) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "%s: %s is missing", op, what);
        return -1;
    }
    return 0;
}

int sdx4_check_ndim(const char *op, const char *what, const tensor *t, int ndim) {
    if (ndim && t->ndim != ndim) {
        char s[SHAPE_STR_SIZE];
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "%s: %s has shape %s, expected %d dimensions", op,
                  what, sdx4_shape_str(t, s, sizeof s), ndim);
        return -1;
    }
    return 0;
}

int sdx4_check_host_buffer(const char *op, const char *what, const void *p) {
    if (!p) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "%s: no %s", op, what);
        return -1;
    }
    return 0;
}

const char *sdx4_shape_str(const tensor *t, char *buf, size_t n) {
    size_t used = 0;
    buf[0] = 0;
    for (int i = 0; i < t->ndim && used < n; i++)
        used += (size_t)snprintf(buf + used, n - used, "%s%" PRId64, i ? "," : "[", t->shape[i]);
    if (used < n) snprintf(buf + used, n - used, "]");
    return buf;
}

int sdx4_check_activation(const char *op, activation act) {
    if (act != ACT_NONE && act != ACT_SILU && act != ACT_GELU && act != ACT_QUICK_GELU) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "%s: unknown activation %d", op, (int)act);
        return -1;
    }
    return 0;
}

int sdx4_check_same_shape(const char *op, const tensor *a, const tensor *b) {
    int same = a->ndim == b->ndim;
    for (int i = 0; same && i < a->ndim; i++) same = a->shape[i] == b->shape[i];
    if (!same) {
        char as[SHAPE_STR_SIZE], bs[SHAPE_STR_SIZE];
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "%s: shapes %s and %s differ", op,
                  sdx4_shape_str(a, as, sizeof as), sdx4_shape_str(b, bs, sizeof bs));
        return -1;
    }
    return 0;
}

int sdx4_check_residual(const char *op, const tensor *r, int ndim, const int64_t *shape) {
    int same = r->ndim == ndim;
    for (int i = 0; same && i < ndim; i++) same = r->shape[i] == shape[i];
    if (same) return 0;
    char rs[SHAPE_STR_SIZE];
    sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "%s: the residual's shape %s is not the output's", op,
              sdx4_shape_str(r, rs, sizeof rs));
    return -1;
}

int sdx4_check_bias(const char *op, const tensor *bias, int64_t outputs) {
    if (bias && tensor_numel(bias) != outputs) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                  "%s: bias has %" PRId64 " elements, weight has %" PRId64 " outputs", op,
                  tensor_numel(bias), outputs);
        return -1;
    }
    return 0;
}

int sdx4_check_affine(const char *op, const tensor *gamma, const tensor *beta, int64_t C) {
    if (tensor_numel(gamma) != C || tensor_numel(beta) != C) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                  "%s: gamma has %" PRId64 " and beta %" PRId64 " elements, input has %" PRId64, op,
                  tensor_numel(gamma), tensor_numel(beta), C);
        return -1;
    }
    return 0;
}

int sdx4_check_linear(const tensor *x, const tensor *w) {
    int64_t K = x->shape[x->ndim - 1];
    if (w->shape[1] != K) {
        char xs[SHAPE_STR_SIZE], ws[SHAPE_STR_SIZE];
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                  "linear: input %s has %" PRId64 " features, weight %s expects %" PRId64,
                  sdx4_shape_str(x, xs, sizeof xs), K, sdx4_shape_str(w, ws, sizeof ws), w->shape[1]);
        return -1;
    }
    return 0;
}

int sdx4_check_gemm_size(const char *op, const char *gemm, int64_t M, int64_t N, int64_t K) {
    if (M > INT_MAX || N > INT_MAX || K > INT_MAX) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "%s: dimensions exceed the %s int range", op, gemm);
        return -1;
    }
    return 0;
}

int sdx4_check_conv2d(const tensor *x, const tensor *w, const tensor *bias, int stride, int padding,
                 const char *gemm, int64_t *ho, int64_t *wo) {
    char xs[SHAPE_STR_SIZE], ws[SHAPE_STR_SIZE];
    int64_t C = x->shape[1], H = x->shape[2], W = x->shape[3], k = w->shape[2];
    if (w->shape[2] != w->shape[3] || w->shape[2] > INT_MAX) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "conv2d: weight %s is not a square kernel",
                  sdx4_shape_str(w, ws, sizeof ws));
        return -1;
    }
    if (w->shape[1] != C) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                  "conv2d: input has %" PRId64 " channels, weight expects %" PRId64, C,
                  w->shape[1]);
        return -1;
    }
    if (stride < 1 || padding < 0) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "conv2d: stride %d, padding %d", stride, padding);
        return -1;
    }
    if (sdx4_check_bias("conv2d", bias, w->shape[0])) return -1;
    if (H + 2 * (int64_t)padding < k || W + 2 * (int64_t)padding < k) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "conv2d: input %s is smaller than kernel %s",
                  sdx4_shape_str(x, xs, sizeof xs), sdx4_shape_str(w, ws, sizeof ws));
        return -1;
    }
    *ho = (H + 2 * (int64_t)padding - k) / stride + 1;
    *wo = (W + 2 * (int64_t)padding - k) / stride + 1;
    if (*ho * *wo > INT_MAX || H * W > INT_MAX || C * k * k > INT_MAX || w->shape[0] > INT_MAX) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "conv2d: input %s exceeds the %s int range",
                  sdx4_shape_str(x, xs, sizeof xs), gemm);
        return -1;
    }
    return 0;
}

int sdx4_check_attention(const tensor *q, const tensor *k, const tensor *v, int heads) {
    if (k->shape[0] != q->shape[0] || k->shape[2] != q->shape[2] || v->shape[0] != k->shape[0] ||
        v->shape[1] != k->shape[1] || v->shape[2] != k->shape[2]) {
        char qs[SHAPE_STR_SIZE], ks[SHAPE_STR_SIZE], vs[SHAPE_STR_SIZE];
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "attention: shapes q %s, k %s, v %s do not match",
                  sdx4_shape_str(q, qs, sizeof qs), sdx4_shape_str(k, ks, sizeof ks),
                  sdx4_shape_str(v, vs, sizeof vs));
        return -1;
    }
    if (heads < 1 || q->shape[2] % heads) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                  "attention: %" PRId64 " channels do not split into %d heads", q->shape[2], heads);
        return -1;
    }
    return 0;
}

int sdx4_check_group_norm(const tensor *x, int groups) {
    if (x->ndim < 2) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "group_norm: input has %d dimension", x->ndim);
        return -1;
    }
    if (groups < 1 || x->shape[1] % groups) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                  "group_norm: %" PRId64 " channels do not split into %d groups", x->shape[1],
                  groups);
        return -1;
    }
    return 0;
}

int sdx4_check_geglu(const tensor *x) {
    int64_t two_n = x->shape[x->ndim - 1];
    if (two_n % 2) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "geglu: last dimension %" PRId64 " is odd", two_n);
        return -1;
    }
    return 0;
}

int sdx4_check_channel_bias(const tensor *x, const tensor *v) {
    int64_t B = x->shape[0], C = x->shape[1];
    if (v->shape[0] != B || v->shape[1] != C) {
        char xs[SHAPE_STR_SIZE], vs[SHAPE_STR_SIZE];
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                  "add_channel_bias: x %s needs v [%" PRId64 ",%" PRId64 "], got %s",
                  sdx4_shape_str(x, xs, sizeof xs), B, C, sdx4_shape_str(v, vs, sizeof vs));
        return -1;
    }
    return 0;
}

int sdx4_check_concat_channels(const tensor *a, const tensor *b) {
    if (a->shape[0] != b->shape[0] || a->shape[2] != b->shape[2] || a->shape[3] != b->shape[3]) {
        char as[SHAPE_STR_SIZE], bs[SHAPE_STR_SIZE];
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "concat_channels: %s and %s differ in batch or size",
                  sdx4_shape_str(a, as, sizeof as), sdx4_shape_str(b, bs, sizeof bs));
        return -1;
    }
    return 0;
}

int sdx4_check_upsample(int h, int w) {
    if (h < 1 || w < 1) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "upsample_nearest: size %dx%d", h, w);
        return -1;
    }
    return 0;
}

int sdx4_check_prelu(const tensor *x, const tensor *slopes, float slope) {
    if (!isfinite(slope)) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "prelu: slope %g", slope);
        return -1;
    }
    if (slopes && (slopes->ndim != 1 || slopes->shape[0] != x->shape[1])) {
        char xs[SHAPE_STR_SIZE], ss[SHAPE_STR_SIZE];
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "prelu: x %s needs slopes [%" PRId64 "], got %s",
                       sdx4_shape_str(x, xs, sizeof xs), x->shape[1], sdx4_shape_str(slopes, ss, sizeof ss));
        return -1;
    }
    return 0;
}

int sdx4_check_pixel_shuffle(const tensor *x, int r, int unshuffle) {
    const char *op = unshuffle ? "pixel_unshuffle" : "pixel_shuffle";
    char xs[SHAPE_STR_SIZE];
    int64_t C = x->shape[1], H = x->shape[2], W = x->shape[3];
    if (r < 1 || r > 16) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "%s: factor %d is outside 1..16", op, r);
        return -1;
    }
    if (unshuffle ? H % r || W % r : C % ((int64_t)r * r)) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "%s: %s does not divide by %d%s", op,
                       sdx4_shape_str(x, xs, sizeof xs), r, unshuffle ? " in height and width" : "^2 in channels");
        return -1;
    }
    return 0;
}

int sdx4_check_tokens_to_nchw(const tensor *x, int h, int w) {
    int64_t S = x->shape[1];
    if (h < 1 || w < 1 || (int64_t)h * w != S) {
        char xs[SHAPE_STR_SIZE];
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "tokens_to_nchw: %s has %" PRId64 " tokens, not %dx%d",
                  sdx4_shape_str(x, xs, sizeof xs), S, h, w);
        return -1;
    }
    return 0;
}

int sdx4_check_embedding(int64_t rows, const int32_t *ids, int n) {
    if (!ids || n < 1) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "embedding: %d ids", ids ? n : 0);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= rows) {
            sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                      "embedding: id %" PRId32 " at position %d is outside the table of %" PRId64,
                      ids[i], i, rows);
            return -1;
        }
    }
    return 0;
}
