/*
 * test_backend_onednn.c - the CPU backend's oneDNN path (cpu_onednn.c) on
 * any CPU.
 *
 * The bfloat16 path needs AMX or AVX512-BF16; its code with float32 data
 * types runs anywhere, so the plumbing (descriptors, reorders in and out of
 * oneDNN's layouts, bias and the residual's sum post-op, weights prepared
 * once, primitives kept per shape, user scratchpads, threads) is held here
 * to a double-precision reference at float32's tolerance. The paths on
 * rounded operands (bfloat16: the bf16 arithmetic, up to summation order;
 * FP8 E4M3 with per-tensor scales, for both kinds of operation or one) are
 * held to the same reference computed on operands rounded here, by code
 * written apart from the backend's, and must differ from the unrounded
 * one: the error figures test_models and test_pipeline measure with them
 * are the format's and nothing else's, on the operations they name.
 * Opening the bf16 path is refused where the CPU lacks it
 * (test_backend_bf16 runs it where it does not).
 *
 * Skipped (77) in builds without oneDNN.
 */
#include <inttypes.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/error.h"
#include "test.h"

#ifndef SDX4_HAVE_ONEDNN
int main(void) {
    backend *be = sdx4_backend_cpu_open(1, CPU_DENSE_ONEDNN_BF16);
    CHECK(be == NULL && strstr(sdx4_last_error(), "no oneDNN"), "bf16 without oneDNN: %s",
          sdx4_last_error());
    if (be) be->destroy(be);
    if (test_failures) return test_finish("test_backend_onednn");
    puts("test_backend_onednn: skipped: this build has no oneDNN (libdnnl-dev, SDX4_ONEDNN=ON)");
    return 77;
}
#else

/* Relative tolerance (max |error| over max |reference|) of float32
 * products against the double reference: OpenBLAS's paths are held to
 * 1e-5 (test_backend_cpu.c) and oneDNN's direct convolutions and matmul
 * round no worse. */
#define TOL 1e-5

static uint64_t rng = 0x2545F4914F6CDD1Dull;

/* How a path rounds the operands of one kind of operation. */
typedef enum { EXACT, BF16, E4M3 } format;

/* x to bfloat16 to nearest even and back, written independently of
 * float_round.h's (by the spacing of bfloat16 values around x). */
static float bf16_round(float x) {
    if (x == 0 || !isfinite(x)) return x;
    int e;
    frexpf(x, &e);                      /* |x| in [2^(e-1), 2^e) */
    double ulp = ldexp(1.0, e - 8);     /* 8 significant bits */
    double q = x / ulp, r = nearbyint(q); /* nearest, ties to even */
    return (float)(r * ulp);
}

/* x to FP8 E4M3 and back, likewise: 4 significant bits down to 2^-6, a
 * spacing of 2^-9 below, saturating at 448. */
static float e4m3_round(float x) {
    if (x == 0 || isnan(x)) return x;
    int e;
    frexpf(x, &e);
    double ulp = ldexp(1.0, (e - 1 < -6 ? -6 : e - 1) - 3);
    double r = isinf(x) ? x : nearbyint(x / ulp) * ulp;
    return (float)(fabs(r) > 448 ? copysign(448, x) : r);
}

/* The n operands at x as a path of format f reads them; E4M3's scale is
 * the tensor's amax / 448, 1 for a tensor of zeros. */
static void quantize(float *x, int64_t n, format f) {
    if (f == EXACT) return;
    double amax = 0;
    for (int64_t i = 0; i < n; i++) amax = fmax(amax, fabs(x[i]));
    float s = amax > 0 ? (float)amax / 448 : 1;
    for (int64_t i = 0; i < n; i++) x[i] = f == BF16 ? bf16_round(x[i]) : e4m3_round(x[i] / s) * s;
}

static const char *const format_names[] = {"", " (bf16 operands)", " (fp8 operands)"};

/* A copy of n floats. */
static float *copy(const float *x, int64_t n) {
    float *y = malloc((size_t)n * sizeof *y);
    memcpy(y, x, (size_t)n * sizeof *y);
    return y;
}

static tensor *make(backend *be, int ndim, const int64_t *shape, const float *data) {
    tensor *t = be->new_tensor(be, ndim, shape);
    if (!t) {
        fprintf(stderr, "new_tensor failed: %s\n", sdx4_last_error());
        exit(1);
    }
    be->upload(be, t, data);
    return t;
}

static tensor *weight(backend *be, int ndim, const int64_t *shape, const float *data) {
    tensor *t = be->weight(be, data, DTYPE_F32, ndim, shape);
    if (!t) {
        fprintf(stderr, "weight failed: %s\n", sdx4_last_error());
        exit(1);
    }
    return t;
}

static double rel_err(const float *got, const double *ref, int64_t n) {
    double err = 0, scale = 1e-30;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs(got[i] - ref[i]);
        if (!(d <= err)) err = d;
        if (fabs(ref[i]) > scale) scale = fabs(ref[i]);
    }
    return err / scale;
}

/* ------------------------------------------------------------ references */

typedef struct {
    int64_t B, C, H, W, O;
    int k, stride, pad, bias, residual;
} conv_case;

static void ref_conv(const conv_case *c, const float *x, const float *w, const float *b,
                     const float *r, int64_t Ho, int64_t Wo, double *y) {
    for (int64_t n = 0; n < c->B; n++)
        for (int64_t o = 0; o < c->O; o++)
            for (int64_t oy = 0; oy < Ho; oy++)
                for (int64_t ox = 0; ox < Wo; ox++) {
                    double s = b ? b[o] : 0;
                    for (int64_t ch = 0; ch < c->C; ch++)
                        for (int ky = 0; ky < c->k; ky++)
                            for (int kx = 0; kx < c->k; kx++) {
                                int64_t iy = oy * c->stride - c->pad + ky;
                                int64_t ix = ox * c->stride - c->pad + kx;
                                if (iy < 0 || iy >= c->H || ix < 0 || ix >= c->W) continue;
                                s += (double)x[((n * c->C + ch) * c->H + iy) * c->W + ix] *
                                     w[((o * c->C + ch) * c->k + ky) * c->k + kx];
                            }
                    int64_t at = ((n * c->O + o) * Ho + oy) * Wo + ox;
                    y[at] = s + (r ? r[at] : 0);
                }
}

static void ref_linear(int64_t M, int64_t K, int64_t N, const float *x, const float *w,
                       const float *b, const float *r, double *y) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            double s = b ? b[n] : 0;
            for (int64_t k = 0; k < K; k++) s += (double)x[m * K + k] * w[n * K + k];
            y[m * N + n] = s + (r ? r[m * N + n] : 0);
        }
}

/* ------------------------------------------------------------- operations */

/* One convolution on `be` against the reference, with its operands
 * rounded to format f as be rounds them; a rounding path must also be off
 * the unrounded reference (or it rounded nothing). */
static void test_conv(backend *be, const conv_case *c, format f) {
    int64_t Ho = (c->H + 2 * c->pad - c->k) / c->stride + 1;
    int64_t Wo = (c->W + 2 * c->pad - c->k) / c->stride + 1;
    int64_t nx = c->B * c->C * c->H * c->W, nw = c->O * c->C * c->k * c->k;
    int64_t ny = c->B * c->O * Ho * Wo;
    float *x = test_rand_buf(&rng, nx, -1, 1), *w = test_rand_buf(&rng, nw, -0.5f, 0.5f);
    float *b = c->bias ? test_rand_buf(&rng, c->O, -1, 1) : NULL;
    float *r = c->residual ? test_rand_buf(&rng, ny, -2, 2) : NULL;
    tensor *tx = make(be, 4, (int64_t[]){c->B, c->C, c->H, c->W}, x);
    tensor *tw = weight(be, 4, (int64_t[]){c->O, c->C, c->k, c->k}, w);
    tensor *tb = b ? weight(be, 1, (int64_t[]){c->O}, b) : NULL;
    tensor *tr = r ? make(be, 4, (int64_t[]){c->B, c->O, Ho, Wo}, r) : NULL;
    float *xq = copy(x, nx), *wq = copy(w, nw);
    quantize(xq, nx, f);
    quantize(wq, nw, f);
    double *ref = malloc((size_t)ny * sizeof *ref), *exact = malloc((size_t)ny * sizeof *exact);
    ref_conv(c, xq, wq, b, r, Ho, Wo, ref);
    ref_conv(c, x, w, b, r, Ho, Wo, exact);
    char what[160];
    snprintf(what, sizeof what,
             "conv2d%s B%" PRId64 " %" PRId64 "->%" PRId64 " %" PRId64 "x%" PRId64
             " k%d s%d p%d%s%s",
             r ? "_add" : "", c->B, c->C, c->O, c->H, c->W, c->k, c->stride, c->pad,
             b ? " bias" : "", format_names[f]);
    /* twice: the second call runs the kept primitive and prepared weights */
    for (int pass = 0; pass < 2; pass++) {
        tensor *y = r ? be->conv2d_add(be, tx, tw, tb, c->stride, c->pad, tr)
                      : be->conv2d(be, tx, tw, tb, c->stride, c->pad);
        CHECK(y != NULL, "%s: %s", what, sdx4_last_error());
        if (!y) break;
        CHECK(y->shape[2] == Ho && y->shape[3] == Wo, "%s: output %" PRId64 "x%" PRId64, what,
              y->shape[2], y->shape[3]);
        double e = rel_err(y->data, ref, ny), off = rel_err(y->data, exact, ny);
        CHECK(e <= TOL, "%s, pass %d: relative error %g", what, pass, e);
        CHECK(f == EXACT || off > TOL, "%s: no further from exact operands' result (%g) than %g", what,
              off, TOL);
        tensor_free(y);
    }
    CHECK(tw->prepared != NULL && tw->data == NULL,
          "%s: the weight was not prepared once and its float copy freed", what);
    tensor_free(tx), tensor_free(tw), tensor_free(tb), tensor_free(tr);
    free(x), free(w), free(b), free(r), free(ref), free(exact), free(xq), free(wq);
}

static void test_linear(backend *be, int ndim, const int64_t *xshape, int64_t N, int bias,
                        int residual, format f) {
    int64_t K = xshape[ndim - 1], M = 1;
    for (int i = 0; i < ndim - 1; i++) M *= xshape[i];
    float *x = test_rand_buf(&rng, M * K, -1, 1), *w = test_rand_buf(&rng, N * K, -0.5f, 0.5f);
    float *b = bias ? test_rand_buf(&rng, N, -1, 1) : NULL;
    float *r = residual ? test_rand_buf(&rng, M * N, -2, 2) : NULL;
    int64_t yshape[4];
    memcpy(yshape, xshape, (size_t)ndim * sizeof *yshape);
    yshape[ndim - 1] = N;
    tensor *tx = make(be, ndim, xshape, x), *tw = weight(be, 2, (int64_t[]){N, K}, w);
    tensor *tb = b ? weight(be, 1, (int64_t[]){N}, b) : NULL;
    tensor *tr = r ? make(be, ndim, yshape, r) : NULL;
    float *xq = copy(x, M * K), *wq = copy(w, N * K);
    quantize(xq, M * K, f);
    quantize(wq, N * K, f);
    double *ref = malloc((size_t)(M * N) * sizeof *ref), *exact = malloc((size_t)(M * N) * sizeof *exact);
    ref_linear(M, K, N, xq, wq, b, r, ref);
    ref_linear(M, K, N, x, w, b, r, exact);
    char what[128];
    snprintf(what, sizeof what, "linear%s [%" PRId64 ", %" PRId64 "] -> %" PRId64 "%s%s",
             r ? "_add" : "", M, K, N, b ? " bias" : "", format_names[f]);
    for (int pass = 0; pass < 2; pass++) {
        tensor *y = r ? be->linear_add(be, tx, tw, tb, tr) : be->linear(be, tx, tw, tb);
        CHECK(y != NULL, "%s: %s", what, sdx4_last_error());
        if (!y) break;
        CHECK(y->ndim == ndim && y->shape[ndim - 1] == N, "%s: output shape", what);
        double e = rel_err(y->data, ref, M * N), off = rel_err(y->data, exact, M * N);
        CHECK(e <= TOL, "%s, pass %d: relative error %g", what, pass, e);
        CHECK(f == EXACT || off > TOL, "%s: no further from exact operands' result (%g) than %g", what,
              off, TOL);
        tensor_free(y);
    }
    tensor_free(tx), tensor_free(tw), tensor_free(tb), tensor_free(tr);
    free(x), free(w), free(b), free(r), free(ref), free(exact), free(xq), free(wq);
}

static const conv_case conv_cases[] = {
    /* B, C, H, W, O, k, stride, pad, bias, residual */
    {1, 3, 9, 11, 5, 3, 1, 1, 1, 0},   /* few channels, odd sizes */
    {2, 16, 12, 10, 8, 1, 1, 0, 0, 1}, /* 1x1 with a residual (a resnet's shortcut) */
    {2, 8, 13, 13, 16, 3, 2, 1, 1, 0}, /* stride 2 on an odd side */
    {1, 4, 8, 8, 4, 3, 2, 0, 1, 0},    /* stride 2 without padding: right padding -1 */
    {2, 32, 16, 12, 64, 3, 1, 1, 1, 1}, /* the UNet's 3x3 with the resnet's residual */
    {1, 64, 10, 10, 32, 3, 1, 1, 0, 0},
};

static void test_ops(backend *be, format conv, format linear) {
    for (size_t i = 0; i < sizeof conv_cases / sizeof *conv_cases; i++)
        test_conv(be, &conv_cases[i], conv);
    test_linear(be, 2, (int64_t[]){5, 33}, 17, 0, 0, linear);
    test_linear(be, 3, (int64_t[]){2, 77, 64}, 96, 1, 0, linear);    /* CLIP-like */
    test_linear(be, 3, (int64_t[]){2, 300, 128}, 128, 1, 1, linear); /* attention's out projection */
    test_linear(be, 2, (int64_t[]){1, 320}, 1280, 1, 0, linear);     /* time embedding: one row */
}

/* FP8's per-tensor scales: operands far outside E4M3's range (inputs
 * to 1000, past its 448; weights below 1e-3, under its smallest normal
 * 2^-6 and mostly under its smallest subnormal 2^-9) come out as the
 * reference scaled by amax / 448 has them; and a tensor of zeros keeps
 * scale 1 (amax / 448 would divide 0 by 0): the output is the bias. */
static void test_fp8_scales(backend *be) {
    const int64_t M = 6, K = 40, N = 24;
    float *x = test_rand_buf(&rng, M * K, -1000, 1000), *w = test_rand_buf(&rng, N * K, -1e-3f, 1e-3f);
    float *b = test_rand_buf(&rng, N, -1, 1);
    float *xq = copy(x, M * K), *wq = copy(w, N * K);
    quantize(xq, M * K, E4M3);
    quantize(wq, N * K, E4M3);
    double *ref = malloc((size_t)(M * N) * sizeof *ref);
    ref_linear(M, K, N, xq, wq, b, NULL, ref);
    tensor *tx = make(be, 2, (int64_t[]){M, K}, x), *tw = weight(be, 2, (int64_t[]){N, K}, w);
    tensor *tb = weight(be, 1, (int64_t[]){N}, b);
    tensor *y = be->linear(be, tx, tw, tb);
    CHECK(y != NULL, "fp8 scales: %s", sdx4_last_error());
    if (y) {
        double e = rel_err(y->data, ref, M * N);
        CHECK(e <= TOL, "fp8 scales: inputs to 1000, weights to 1e-3: relative error %g", e);
    }
    tensor_free(y);
    /* zero inputs, then zero weights */
    float *zeros = calloc((size_t)(N * K), sizeof *zeros);
    tensor *tz = make(be, 2, (int64_t[]){M, K}, zeros), *twz = weight(be, 2, (int64_t[]){N, K}, zeros);
    tensor *ys[2] = {be->linear(be, tz, tw, tb), be->linear(be, tx, twz, tb)};
    for (int i = 0; i < 2; i++) {
        int exact = ys[i] != NULL;
        for (int64_t j = 0; exact && j < M * N; j++) exact = ((const float *)ys[i]->data)[j] == b[j % N];
        CHECK(exact, "fp8: zero %s: the output is not the bias (%s)", i ? "weights" : "inputs",
              ys[i] ? "a value differs" : sdx4_last_error());
        tensor_free(ys[i]);
    }
    tensor_free(tx), tensor_free(tw), tensor_free(tb), tensor_free(tz), tensor_free(twz);
    free(x), free(w), free(b), free(xq), free(wq), free(ref), free(zeros);
}

/* One weight, several shapes: each shape's primitive reads the weights
 * prepared at the first use (in another layout, reordered per call). */
static void test_shapes_share_weights(backend *be) {
    conv_case c = {1, 32, 8, 8, 32, 3, 1, 1, 1, 0};
    int64_t nw = 32 * 32 * 9;
    float *w = test_rand_buf(&rng, nw, -0.5f, 0.5f), *b = test_rand_buf(&rng, 32, -1, 1);
    tensor *tw = weight(be, 4, (int64_t[]){32, 32, 3, 3}, w), *tb = weight(be, 1, (int64_t[]){32}, b);
    const int64_t sizes[][2] = {{1, 8}, {2, 8}, {1, 33}, {3, 5}, {1, 8}};
    for (int i = 0; i < 5; i++) {
        c.B = sizes[i][0];
        c.H = c.W = sizes[i][1];
        int64_t nx = c.B * 32 * c.H * c.W;
        float *x = test_rand_buf(&rng, nx, -1, 1);
        double *ref = malloc((size_t)nx * sizeof *ref);
        ref_conv(&c, x, w, b, NULL, c.H, c.W, ref);
        tensor *tx = make(be, 4, (int64_t[]){c.B, 32, c.H, c.W}, x);
        tensor *y = be->conv2d(be, tx, tw, tb, 1, 1);
        CHECK(y != NULL, "shared weight, B%" PRId64 " %" PRId64 "x%" PRId64 ": %s", c.B, c.H, c.W,
              sdx4_last_error());
        if (y) {
            double e = rel_err(y->data, ref, nx);
            CHECK(e <= TOL, "shared weight, B%" PRId64 " %" PRId64 ": relative error %g", c.B, c.H, e);
        }
        tensor_free(y), tensor_free(tx);
        free(x), free(ref);
    }
    /* a prepared weight is for convolutions and linear layers only */
    tensor *a = be->activate(be, tw, ACT_SILU);
    CHECK(a == NULL && strstr(sdx4_last_error(), "oneDNN's layout"), "activate on a prepared weight: %s",
          sdx4_last_error());
    tensor_free(a);
    tensor_free(tw), tensor_free(tb);
    free(w), free(b);
}

/* Threads that run the same shapes with the same weights at once, the
 * weights' first use among them. */
typedef struct {
    backend *be;
    const tensor *x, *w, *b;
    const double *ref;
    int64_t n;
    double err;
    int failed;
} caller;

static void *call_conv(void *arg) {
    caller *c = arg;
    for (int i = 0; i < 3 && !c->failed; i++) {
        tensor *y = c->be->conv2d(c->be, c->x, c->w, c->b, 1, 1);
        if (!y) {
            c->failed = 1;
            break;
        }
        double e = rel_err(y->data, c->ref, c->n);
        if (e > c->err) c->err = e;
        tensor_free(y);
    }
    return NULL;
}

static void test_concurrent_callers(backend *be) {
    conv_case c = {2, 48, 20, 20, 48, 3, 1, 1, 1, 0};
    int64_t nx = 2 * 48 * 400;
    float *x = test_rand_buf(&rng, nx, -1, 1), *w = test_rand_buf(&rng, 48 * 48 * 9, -0.5f, 0.5f), *b = test_rand_buf(&rng, 48, -1, 1);
    double *ref = malloc((size_t)nx * sizeof *ref);
    ref_conv(&c, x, w, b, NULL, 20, 20, ref);
    tensor *tx = make(be, 4, (int64_t[]){2, 48, 20, 20}, x);
    tensor *tw = weight(be, 4, (int64_t[]){48, 48, 3, 3}, w), *tb = weight(be, 1, (int64_t[]){48}, b);
    caller callers[4];
    pthread_t threads[4];
    for (int i = 0; i < 4; i++) {
        callers[i] = (caller){be, tx, tw, tb, ref, nx, 0, 0};
        pthread_create(&threads[i], NULL, call_conv, &callers[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(threads[i], NULL);
        CHECK(!callers[i].failed && callers[i].err <= TOL, "concurrent caller %d: %s, error %g", i,
              callers[i].failed ? "failed" : "ran", callers[i].err);
    }
    tensor_free(tx), tensor_free(tw), tensor_free(tb);
    free(x), free(w), free(b), free(ref);
}

static void test_errors(backend *be) {
    float *x = test_rand_buf(&rng, 2 * 8 * 6 * 6, -1, 1), *w = test_rand_buf(&rng, 4 * 8 * 9, -1, 1);
    tensor *tx = make(be, 4, (int64_t[]){2, 8, 6, 6}, x);
    tensor *tw = weight(be, 4, (int64_t[]){4, 7, 3, 3}, w); /* 7 channels: wrong */
    tensor *y = be->conv2d(be, tx, tw, NULL, 1, 1);
    CHECK(y == NULL && strstr(sdx4_last_error(), "channels"), "conv2d channels: %s", sdx4_last_error());
    tensor_free(tw);
    tw = weight(be, 4, (int64_t[]){4, 8, 3, 3}, w);
    tensor *r = make(be, 4, (int64_t[]){2, 4, 5, 6}, x); /* not the output's 6x6 */
    y = be->conv2d_add(be, tx, tw, NULL, 1, 1, r);
    CHECK(y == NULL && strstr(sdx4_last_error(), "residual"), "conv2d_add residual: %s",
          sdx4_last_error());
    y = be->conv2d_add(be, tx, tw, NULL, 1, 1, NULL);
    CHECK(y == NULL && strstr(sdx4_last_error(), "residual is missing"), "conv2d_add no residual: %s",
          sdx4_last_error());
    tensor *lw = weight(be, 2, (int64_t[]){3, 5}, w);
    y = be->linear(be, tx, lw, NULL); /* 6 features, the weight expects 5 */
    CHECK(y == NULL && strstr(sdx4_last_error(), "features"), "linear features: %s", sdx4_last_error());
    tensor_free(y), tensor_free(r), tensor_free(lw), tensor_free(tw), tensor_free(tx);
    free(x), free(w);
}

static void test_bf16_open(void) {
    backend *be = sdx4_backend_cpu_open(2, CPU_DENSE_ONEDNN_BF16);
    if (test_cpu_has_bf16()) {
        CHECK(be != NULL, "bf16 on a CPU with avx512_bf16 or amx_bf16: %s", sdx4_last_error());
        if (be) CHECK(be->dense_type == DTYPE_BF16 && strstr(be->description, "bf16"), "%s", be->description);
    } else {
        CHECK(be == NULL && sdx4_error_status() == SDX4_ERR_DEVICE &&
                  strstr(sdx4_last_error(), "no AVX512-BF16 or AMX") &&
                  strstr(sdx4_last_error(), "refused rather than emulated"),
              "bf16 on a CPU without it: %s", be ? "opened" : sdx4_last_error());
    }
    if (be) be->destroy(be);
}

static void run_path(cpu_dense_path path, int threads) {
    backend *be = sdx4_backend_cpu_open(threads, path);
    CHECK(be != NULL, "open: %s", sdx4_last_error());
    if (!be) return;
    /* what each path rounds, convolutions' and linear layers' operands */
    static const struct {
        cpu_dense_path path;
        format conv, linear;
    } formats[] = {{CPU_DENSE_ONEDNN_F32_BF16_OPERANDS, BF16, BF16},
                   {CPU_DENSE_ONEDNN_F32_FP8_OPERANDS, E4M3, E4M3},
                   {CPU_DENSE_ONEDNN_F32_FP8_LINEAR_OPERANDS, EXACT, E4M3},
                   {CPU_DENSE_ONEDNN_F32_FP8_CONV_OPERANDS, E4M3, EXACT}};
    format conv = EXACT, linear = EXACT;
    for (size_t i = 0; i < sizeof formats / sizeof *formats; i++)
        if (formats[i].path == path) conv = formats[i].conv, linear = formats[i].linear;
    CHECK(be->dense_type == DTYPE_F32 && strstr(be->description, "oneDNN"), "description %s",
          be->description);
    int omp_default = omp_get_max_threads();
    test_ops(be, conv, linear);
    CHECK(omp_get_max_threads() == omp_default, "the backend changed this thread's OpenMP default");
    if (linear == E4M3) test_fp8_scales(be);
    if (conv == EXACT && linear == EXACT) {
        test_shapes_share_weights(be);
        test_concurrent_callers(be);
        test_errors(be);
    }
    int64_t in_use;
    be->memory(be, &in_use, NULL);
    CHECK(in_use == 0, "%" PRId64 " bytes leaked by the backend", in_use);
    be->destroy(be);
}

int main(void) {
    run_path(CPU_DENSE_ONEDNN_F32, 2);
    run_path(CPU_DENSE_ONEDNN_F32, 1);
    run_path(CPU_DENSE_ONEDNN_F32_BF16_OPERANDS, 2);
    run_path(CPU_DENSE_ONEDNN_F32_FP8_OPERANDS, 2);
    run_path(CPU_DENSE_ONEDNN_F32_FP8_LINEAR_OPERANDS, 2);
    run_path(CPU_DENSE_ONEDNN_F32_FP8_CONV_OPERANDS, 2);
    test_bf16_open();
    return test_finish("test_backend_onednn");
}
#endif
