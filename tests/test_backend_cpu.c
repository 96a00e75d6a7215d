/*
 * test_backend_cpu.c - every operation of the CPU backend against a naive
 * double-precision reference written here, on small random shapes chosen
 * to hit the edges of the kernels (odd sizes, stride 2 with padding, 1x1,
 * im2col tiles that split output rows, Winograd tiles clipped at odd edges
 * and units that split tile rows, attention with Tq != Tk, several heads,
 * causal masks, several query tiles); weights in place and converted;
 * memory accounting; scratch that stays bounded on the model's biggest
 * shapes (checked at sampled outputs); two application threads calling at
 * once; and the errors a wrong model file causes. Ends by printing (not
 * checking) sgemm and conv speed.
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

#ifdef __SANITIZE_ADDRESS__
/* The out-of-memory test asks for petabytes: let malloc fail as without ASan. */
const char *__asan_default_options(void);
const char *__asan_default_options(void) { return "allocator_may_return_null=1"; }
#endif

/* Relative tolerance of float32 kernels against the double reference. */
#define TOL 1e-5

/* ------------------------------------------------------------ helpers */

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static tensor *make(backend *be, int ndim, const int64_t *shape, const float *data) {
    tensor *t = be->new_tensor(be, ndim, shape);
    if (!t) {
        fprintf(stderr, "new_tensor failed: %s\n", sdx4_last_error());
        exit(1);
    }
    be->upload(be, t, data);
    return t;
}

static float *fetch(backend *be, const tensor *t) {
    float *p = malloc((size_t)tensor_numel(t) * sizeof *p);
    be->download(be, t, p);
    return p;
}

/* max |got - ref| over max |ref|: the error relative to the tensor's scale. */
static double rel_err(const float *got, const double *ref, int64_t n) {
    double err = 0, scale = 1e-30;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs(got[i] - ref[i]);
        if (!(d <= err)) err = d; /* NaN counts as failure */
        if (fabs(ref[i]) > scale) scale = fabs(ref[i]);
    }
    return err / scale;
}

/* Checks a result tensor's shape and values, then frees it and ref. */
static void expect(backend *be, const char *what, tensor *t, int ndim, const int64_t *shape,
                   double *ref, double tol) {
    CHECK(t != NULL, "%s: %s", what, sdx4_last_error());
    if (t) {
        int same = t->ndim == ndim;
        for (int i = 0; same && i < ndim; i++) same = t->shape[i] == shape[i];
        CHECK(same, "%s: wrong output shape", what);
        if (same) {
            float *got = fetch(be, t);
            double e = rel_err(got, ref, tensor_numel(t));
            CHECK(e <= tol, "%s: relative error %.3g > %.1g", what, e, tol);
            free(got);
        }
        tensor_free(t);
    }
    free(ref);
}

static double *dalloc(int64_t n) { return calloc((size_t)n, sizeof(double)); }

/* ------------------------------------------------------------- linear */

static void test_linear(backend *be, int ndim, const int64_t *xshape, int64_t N, int with_bias) {
    int64_t K = xshape[ndim - 1], M = 1;
    for (int i = 0; i < ndim - 1; i++) M *= xshape[i];
    float *x = test_rand_buf(&rng, M * K, -1, 1), *w = test_rand_buf(&rng, N * K, -1, 1), *b = test_rand_buf(&rng, N, -1, 1);
    tensor *tx = make(be, ndim, xshape, x), *tw = make(be, 2, (int64_t[]){N, K}, w);
    tensor *tb = make(be, 1, &N, b);
    double *ref = dalloc(M * N);
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            double s = with_bias ? b[n] : 0;
            for (int64_t k = 0; k < K; k++) s += (double)x[m * K + k] * w[n * K + k];
            ref[m * N + n] = s;
        }
    int64_t yshape[4];
    memcpy(yshape, xshape, (size_t)ndim * sizeof *yshape);
    yshape[ndim - 1] = N;
    char what[64];
    snprintf(what, sizeof what, "linear M=%" PRId64 " K=%" PRId64 " N=%" PRId64 "%s", M, K, N,
             with_bias ? " +bias" : "");
    expect(be, what, be->linear(be, tx, tw, with_bias ? tb : NULL), ndim, yshape, ref, TOL);
    tensor_free(tx), tensor_free(tw), tensor_free(tb);
    free(x), free(w), free(b);
}

/* ------------------------------------------------------------- conv2d */

/* The oracle: a direct convolution in double. It is not what is under
 * test, so it is built without the sanitizers' checks, which made it 3/4
 * of this test's time under ASan; its loops put each weight outside a row
 * of output pixels. */
__attribute__((no_sanitize("address", "undefined")))
static void reference_conv(const float *x, const float *w, const float *b, double *ref, int64_t B, int64_t C,
                           int64_t H, int64_t W, int64_t O, int k, int stride, int pad, int64_t Ho, int64_t Wo) {
    for (int64_t n = 0; n < B; n++)
        for (int64_t o = 0; o < O; o++) {
            double *out = ref + (n * O + o) * Ho * Wo;
            for (int64_t i = 0; i < Ho * Wo; i++) out[i] = b ? b[o] : 0;
            for (int64_t c = 0; c < C; c++)
                for (int ky = 0; ky < k; ky++)
                    for (int kx = 0; kx < k; kx++) {
                        double wv = w[((o * C + c) * k + ky) * k + kx];
                        for (int64_t oy = 0; oy < Ho; oy++) {
                            int64_t iy = oy * stride - pad + ky;
                            if (iy < 0 || iy >= H) continue;
                            const float *row = x + ((n * C + c) * H + iy) * W;
                            for (int64_t ox = 0; ox < Wo; ox++) {
                                int64_t ix = ox * stride - pad + kx;
                                if (ix >= 0 && ix < W) out[oy * Wo + ox] += row[ix] * wv;
                            }
                        }
                    }
        }
}

static void test_conv(backend *be, int64_t B, int64_t C, int64_t H, int64_t W, int64_t O, int k,
                      int stride, int pad, int with_bias) {
    float *x = test_rand_buf(&rng, B * C * H * W, -1, 1), *w = test_rand_buf(&rng, O * C * k * k, -1, 1);
    float *b = test_rand_buf(&rng, O, -1, 1);
    tensor *tx = make(be, 4, (int64_t[]){B, C, H, W}, x);
    tensor *tw = make(be, 4, (int64_t[]){O, C, k, k}, w), *tb = make(be, 1, &O, b);
    int64_t Ho = (H + 2 * pad - k) / stride + 1, Wo = (W + 2 * pad - k) / stride + 1;
    double *ref = dalloc(B * O * Ho * Wo);
    reference_conv(x, w, with_bias ? b : NULL, ref, B, C, H, W, O, k, stride, pad, Ho, Wo);
    char what[96];
    snprintf(what, sizeof what,
             "conv2d [%" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64 "] -> %" PRId64
             " k%d s%d p%d%s",
             B, C, H, W, O, k, stride, pad, with_bias ? " +bias" : "");
    expect(be, what, be->conv2d(be, tx, tw, with_bias ? tb : NULL, stride, pad), 4,
           (int64_t[]){B, O, Ho, Wo}, ref, TOL);
    tensor_free(tx), tensor_free(tw), tensor_free(tb);
    free(x), free(w), free(b);
}

/* ---------------------------------------------------------- attention */

static void test_attention(backend *be, int64_t B, int64_t Tq, int64_t Tk, int heads, int64_t D,
                           int causal) {
    int64_t HD = heads * D;
    /* scores of a few units: the softmax is neither flat nor one-hot */
    float *q = test_rand_buf(&rng, B * Tq * HD, -1.5f, 1.5f), *k = test_rand_buf(&rng, B * Tk * HD, -1.5f, 1.5f);
    float *v = test_rand_buf(&rng, B * Tk * HD, -1, 1);
    tensor *tq = make(be, 3, (int64_t[]){B, Tq, HD}, q);
    tensor *tk = make(be, 3, (int64_t[]){B, Tk, HD}, k);
    tensor *tv = make(be, 3, (int64_t[]){B, Tk, HD}, v);
    double *ref = dalloc(B * Tq * HD), *p = dalloc(Tk);
    for (int64_t b = 0; b < B; b++)
        for (int h = 0; h < heads; h++)
            for (int64_t i = 0; i < Tq; i++) {
                int64_t visible = causal && i + 1 < Tk ? i + 1 : Tk;
                double max = -INFINITY, sum = 0;
                for (int64_t j = 0; j < visible; j++) {
                    double s = 0;
                    for (int64_t d = 0; d < D; d++)
                        s += (double)q[(b * Tq + i) * HD + h * D + d] *
                             k[(b * Tk + j) * HD + h * D + d];
                    p[j] = s / sqrt((double)D);
                    if (p[j] > max) max = p[j];
                }
                for (int64_t j = 0; j < visible; j++) sum += p[j] = exp(p[j] - max);
                for (int64_t d = 0; d < D; d++) {
                    double o = 0;
                    for (int64_t j = 0; j < visible; j++)
                        o += p[j] * v[(b * Tk + j) * HD + h * D + d];
                    ref[(b * Tq + i) * HD + h * D + d] = o / sum;
                }
            }
    free(p);
    char what[96];
    snprintf(what, sizeof what,
             "attention B%" PRId64 " Tq%" PRId64 " Tk%" PRId64 " H%d D%" PRId64 "%s", B, Tq, Tk,
             heads, D, causal ? " causal" : "");
    expect(be, what, be->attention(be, tq, tk, tv, heads, causal), 3, (int64_t[]){B, Tq, HD}, ref,
           TOL);
    tensor_free(tq), tensor_free(tk), tensor_free(tv);
    free(q), free(k), free(v);
}

/* ------------------------------------------------------ normalisation */

static double act_ref(double x, activation act) {
    switch (act) {
    case ACT_SILU: return x / (1 + exp(-x));
    case ACT_GELU: return 0.5 * x * (1 + erf(x / sqrt(2.0)));
    case ACT_QUICK_GELU: return x / (1 + exp(-1.702 * x));
    case ACT_NONE: break;
    }
    return x;
}

static void test_group_norm(backend *be, int ndim, const int64_t *shape, int groups, float offset,
                            activation act) {
    tensor probe = {.ndim = ndim};
    memcpy(probe.shape, shape, (size_t)ndim * sizeof *shape);
    int64_t n = tensor_numel(&probe), B = shape[0], C = shape[1], S = n / (B * C);
    float *x = test_rand_buf(&rng, n, offset - 1, offset + 1);
    float *g = test_rand_buf(&rng, C, 0.5f, 1.5f), *bt = test_rand_buf(&rng, C, -0.5f, 0.5f);
    tensor *tx = make(be, ndim, shape, x), *tg = make(be, 1, &C, g), *tb = make(be, 1, &C, bt);
    double *ref = dalloc(n);
    int64_t cg = C / groups;
    for (int64_t b = 0; b < B; b++)
        for (int gi = 0; gi < groups; gi++) {
            const float *xs = x + (b * C + gi * cg) * S;
            double mean = 0, var = 0;
            for (int64_t i = 0; i < cg * S; i++) mean += xs[i];
            mean /= (double)(cg * S);
            for (int64_t i = 0; i < cg * S; i++) var += (xs[i] - mean) * (xs[i] - mean);
            var /= (double)(cg * S);
            for (int64_t i = 0; i < cg * S; i++) {
                int64_t c = gi * cg + i / S;
                double y = (xs[i] - mean) / sqrt(var + 1e-5) * g[c] + bt[c];
                ref[(b * C + gi * cg) * S + i] = act_ref(y, act);
            }
        }
    char what[64];
    snprintf(what, sizeof what, "group_norm C%" PRId64 " S%" PRId64 " G%d offset %g act %d", C, S,
             groups, offset, (int)act);
    expect(be, what, be->group_norm(be, tx, groups, tg, tb, 1e-5f, act), ndim, shape, ref, TOL);
    tensor_free(tx), tensor_free(tg), tensor_free(tb);
    free(x), free(g), free(bt);
}

static void test_layer_norm(backend *be, int64_t rows, int64_t D, float offset) {
    float *x = test_rand_buf(&rng, rows * D, offset - 1, offset + 1);
    float *g = test_rand_buf(&rng, D, 0.5f, 1.5f), *bt = test_rand_buf(&rng, D, -0.5f, 0.5f);
    tensor *tx = make(be, 3, (int64_t[]){1, rows, D}, x);
    tensor *tg = make(be, 1, &D, g), *tb = make(be, 1, &D, bt);
    double *ref = dalloc(rows * D);
    for (int64_t r = 0; r < rows; r++) {
        double mean = 0, var = 0;
        for (int64_t i = 0; i < D; i++) mean += x[r * D + i];
        mean /= (double)D;
        for (int64_t i = 0; i < D; i++) var += (x[r * D + i] - mean) * (x[r * D + i] - mean);
        var /= (double)D;
        for (int64_t i = 0; i < D; i++)
            ref[r * D + i] = (x[r * D + i] - mean) / sqrt(var + 1e-5) * g[i] + bt[i];
    }
    char what[64];
    snprintf(what, sizeof what, "layer_norm %" PRId64 "x%" PRId64 " offset %g", rows, D, offset);
    expect(be, what, be->layer_norm(be, tx, tg, tb, 1e-5f), 3, (int64_t[]){1, rows, D}, ref, TOL);
    tensor_free(tx), tensor_free(tg), tensor_free(tb);
    free(x), free(g), free(bt);
}

/* -------------------------------------------------------- elementwise */

static void test_elementwise(backend *be) {
    const int64_t n = 40000; /* several parallel chunks, the last one partial */
    float *x = test_rand_buf(&rng, n, -9, 9);
    tensor *tx = make(be, 2, (int64_t[]){200, 200}, x);
    for (int a = ACT_NONE; a <= ACT_QUICK_GELU; a++) {
        double *ref = dalloc(n);
        for (int64_t i = 0; i < n; i++) ref[i] = act_ref(x[i], (activation)a);
        /* per element, not per tensor, so small outputs count; the 0.1 floor
         * allows gelu's float cancellation at large negative x, which
         * PyTorch's formula has too */
        tensor *y = be->activate(be, tx, (activation)a);
        CHECK(y != NULL, "activate %d: %s", a, sdx4_last_error());
        if (y) {
            float *got = fetch(be, y);
            double worst = 0;
            for (int64_t i = 0; i < n; i++) {
                double e = fabs(got[i] - ref[i]) / (fabs(ref[i]) + 0.1);
                if (!(e <= worst)) worst = e;
            }
            CHECK(worst <= 1e-5, "activate %d: element relative error %.3g", a, worst);
            free(got);
            tensor_free(y);
        }
        free(ref);
    }

    /* GEGLU: [2, 3, 2*17] -> [2, 3, 17] */
    int64_t gshape[3] = {2, 3, 34};
    float *gx = test_rand_buf(&rng, 2 * 3 * 34, -3, 3);
    tensor *tg = make(be, 3, gshape, gx);
    double *gref = dalloc(2 * 3 * 17);
    for (int64_t r = 0; r < 6; r++)
        for (int64_t i = 0; i < 17; i++)
            gref[r * 17 + i] = gx[r * 34 + i] * act_ref(gx[r * 34 + 17 + i], ACT_GELU);
    expect(be, "geglu", be->geglu(be, tg), 3, (int64_t[]){2, 3, 17}, gref, TOL);
    tensor_free(tg);
    free(gx);

    /* a += b * s, x += v[b, c], x *= s */
    int64_t shape[4] = {2, 3, 5, 7}, m = 2 * 3 * 5 * 7;
    float *a = test_rand_buf(&rng, m, -1, 1), *b = test_rand_buf(&rng, m, -1, 1), *v = test_rand_buf(&rng, 6, -1, 1);
    tensor *ta = make(be, 4, shape, a), *tb = make(be, 4, shape, b);
    tensor *tv = make(be, 2, (int64_t[]){2, 3}, v);
    CHECK(be->add_inplace(be, ta, tb, 1.0f) == 0, "add");
    CHECK(be->add_inplace(be, ta, tb, -0.25f) == 0, "add scaled");
    CHECK(be->add_channel_bias_inplace(be, ta, tv) == 0, "add_channel_bias");
    CHECK(be->scale_inplace(be, ta, 0.5f) == 0, "scale");
    float *got = fetch(be, ta);
    double worst = 0;
    for (int64_t i = 0; i < m; i++) {
        double want = ((double)a[i] + b[i] - 0.25 * b[i] + v[i / 35]) * 0.5;
        if (fabs(got[i] - want) > worst) worst = fabs(got[i] - want);
    }
    CHECK(worst <= 1e-6, "add/bias/scale: error %.3g", worst);
    tensor_free(ta), tensor_free(tb), tensor_free(tv);
    free(a), free(b), free(v), free(got), free(x);
    tensor_free(tx);
}

/* ------------------------------------------------------------- layout */

static void test_layout(backend *be) {
    /* concat along channels */
    float *a = test_rand_buf(&rng, 2 * 3 * 5 * 7, -1, 1), *b = test_rand_buf(&rng, 2 * 4 * 5 * 7, -1, 1);
    tensor *ta = make(be, 4, (int64_t[]){2, 3, 5, 7}, a);
    tensor *tb = make(be, 4, (int64_t[]){2, 4, 5, 7}, b);
    double *ref = dalloc(2 * 7 * 35);
    for (int n = 0; n < 2; n++)
        for (int c = 0; c < 7; c++)
            for (int i = 0; i < 35; i++)
                ref[(n * 7 + c) * 35 + i] =
                    c < 3 ? a[(n * 3 + c) * 35 + i] : b[(n * 4 + c - 3) * 35 + i];
    expect(be, "concat_channels", be->concat_channels(be, ta, tb), 4, (int64_t[]){2, 7, 5, 7}, ref,
           0);

    /* nearest upsampling, PyTorch's floor(dst * (in / out)) in float */
    static const int sizes[][2] = {{10, 14}, {13, 9}, {5, 7}, {3, 20}, {2, 3}};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        int h = sizes[s][0], w = sizes[s][1];
        double *uref = dalloc(2 * 3 * h * w);
        for (int n = 0; n < 6; n++)
            for (int oy = 0; oy < h; oy++)
                for (int ox = 0; ox < w; ox++) {
                    int iy = (int)floorf((float)oy * (5.0f / (float)h));
                    int ix = (int)floorf((float)ox * (7.0f / (float)w));
                    iy = iy < 4 ? iy : 4;
                    ix = ix < 6 ? ix : 6;
                    uref[(n * h + oy) * w + ox] = a[(n * 5 + iy) * 7 + ix];
                }
        char what[48];
        snprintf(what, sizeof what, "upsample_nearest 5x7 -> %dx%d", h, w);
        expect(be, what, be->upsample_nearest(be, ta, h, w), 4, (int64_t[]){2, 3, h, w}, uref, 0);
    }
    /* hand-checked: 3 -> 7 takes rows 0,0,0,1,1,2,2 */
    float col3[3] = {10, 20, 30};
    tensor *t3 = make(be, 4, (int64_t[]){1, 1, 3, 1}, col3);
    tensor *u7 = be->upsample_nearest(be, t3, 7, 1);
    float *g7 = fetch(be, u7);
    static const float want7[7] = {10, 10, 10, 20, 20, 30, 30};
    CHECK(memcmp(g7, want7, sizeof want7) == 0, "upsample 3 -> 7: %g %g %g %g %g %g %g", g7[0],
          g7[1], g7[2], g7[3], g7[4], g7[5], g7[6]);
    free(g7), tensor_free(u7), tensor_free(t3);

    /* tokens: [2, 37, 5, 7] -> [2, 35, 37] -> back (block edges on both sides) */
    int64_t C = 37, S = 35;
    float *x = test_rand_buf(&rng, 2 * C * S, -1, 1);
    tensor *tx = make(be, 4, (int64_t[]){2, C, 5, 7}, x);
    tensor *tok = be->nchw_to_tokens(be, tx);
    CHECK(tok && tok->ndim == 3 && tok->shape[1] == S && tok->shape[2] == C,
          "nchw_to_tokens shape");
    if (tok) {
        float *g = fetch(be, tok);
        int ok = 1;
        for (int n = 0; n < 2; n++)
            for (int64_t c = 0; c < C; c++)
                for (int64_t i = 0; i < S; i++)
                    ok &= g[(n * S + i) * C + c] == x[(n * C + c) * S + i];
        CHECK(ok, "nchw_to_tokens values");
        free(g);
        tensor *back = be->tokens_to_nchw(be, tok, 5, 7);
        CHECK(back && back->ndim == 4 && back->shape[1] == C && back->shape[2] == 5,
              "tokens_to_nchw shape");
        if (back) {
            float *gb = fetch(be, back);
            CHECK(memcmp(gb, x, (size_t)(2 * C * S) * sizeof(float)) == 0, "tokens_to_nchw values");
            free(gb);
            tensor_free(back);
        }
        tensor_free(tok);
    }

    /* embedding rows */
    float *table = test_rand_buf(&rng, 10 * 6, -1, 1);
    tensor *tt = make(be, 2, (int64_t[]){10, 6}, table);
    int32_t ids[4] = {3, 0, 9, 3};
    double *eref = dalloc(4 * 6);
    for (int i = 0; i < 4; i++)
        for (int d = 0; d < 6; d++) eref[i * 6 + d] = table[ids[i] * 6 + d];
    expect(be, "embedding", be->embedding(be, tt, ids, 4), 2, (int64_t[]){4, 6}, eref, 0);

    tensor_free(ta), tensor_free(tb), tensor_free(tx), tensor_free(tt);
    free(a), free(b), free(x), free(table);
}

/* ------------------------------------------------- weights and memory */

static void test_weights_and_memory(backend *be) {
    int64_t before, peak;
    be->memory(be, &before, &peak);

    float *f32 = malloc(8 * sizeof(float) + 1);
    for (int i = 0; i < 8; i++) f32[i] = (float)i - 3.5f;
    tensor *w = be->weight(be, f32, DTYPE_F32, 2, (int64_t[]){2, 4});
    CHECK(w && w->data == f32 && !w->owns_data && w->type == DTYPE_F32,
          "aligned F32 weight is not a view");
    int64_t now;
    be->memory(be, &now, NULL);
    CHECK(now == before, "a view allocates nothing (%" PRId64 " -> %" PRId64 ")", before, now);
    tensor_free(w);

    /* the same values at an odd address are copied */
    unsigned char *odd = (unsigned char *)malloc(8 * sizeof(float) + 1) + 1;
    memcpy(odd, f32, 8 * sizeof(float));
    w = be->weight(be, odd, DTYPE_F32, 1, (int64_t[]){8});
    CHECK(w && w->owns_data && (void *)w->data != (void *)odd, "misaligned F32 weight is copied");
    if (w) {
        CHECK(memcmp(w->data, f32, 8 * sizeof(float)) == 0, "misaligned F32 values");
        CHECK((uintptr_t)w->data % 64 == 0, "converted weight is 64-byte aligned");
    }
    tensor_free(w);
    free(odd - 1);
    free(f32);

    /* F16: 1, -2.5, 65504 (max), 2^-24 (smallest subnormal), -0, inf */
    static const uint16_t h[6] = {0x3C00, 0xC100, 0x7BFF, 0x0001, 0x8000, 0x7C00};
    static const float hf[6] = {1.0f, -2.5f, 65504.0f, 5.9604644775390625e-8f, -0.0f, INFINITY};
    w = be->weight(be, h, DTYPE_F16, 2, (int64_t[]){3, 2});
    CHECK(w && w->owns_data && w->type == DTYPE_F32, "F16 weight converted to F32");
    if (w) CHECK(memcmp(w->data, hf, sizeof hf) == 0, "F16 values");
    be->memory(be, &now, &peak);
    CHECK(now == before + 6 * 4 && peak >= now, "memory counts the converted weight");
    tensor_free(w);

    /* BF16: 1, -2.5, 3.140625 */
    static const uint16_t bf[3] = {0x3F80, 0xC020, 0x4049};
    static const float bff[3] = {1.0f, -2.5f, 3.140625f};
    w = be->weight(be, bf, DTYPE_BF16, 1, (int64_t[]){3});
    CHECK(w && w->owns_data, "BF16 weight converted");
    if (w) CHECK(memcmp(w->data, bff, sizeof bff) == 0, "BF16 values");
    tensor_free(w);

    tensor *t = be->new_tensor(be, 3, (int64_t[]){5, 6, 7});
    CHECK(t && (uintptr_t)t->data % 64 == 0, "new_tensor is 64-byte aligned");
    be->memory(be, &now, &peak);
    CHECK(now == before + 5 * 6 * 7 * 4, "memory in use counts the tensor");
    tensor_free(t);
    be->memory(be, &now, NULL);
    CHECK(now == before, "memory returns to %" PRId64 " after free (%" PRId64 ")", before, now);
}

/* ------------------------------------------------------------- errors */

static void expect_error(tensor *t, sdx4_status status, const char *message) {
    CHECK(t == NULL, "expected failure: %s", message);
    CHECK(sdx4_error_status() == status, "status %d for %s", (int)sdx4_error_status(), message);
    CHECK(strstr(sdx4_last_error(), message) != NULL, "message \"%s\" lacks \"%s\"",
          sdx4_last_error(), message);
    tensor_free(t);
}

static void test_errors(backend *be) {
    float zeros[4 * 7 * 9 * 9] = {0};
    tensor *x7 = make(be, 4, (int64_t[]){1, 7, 4, 4}, zeros);
    tensor *w4 = make(be, 4, (int64_t[]){8, 4, 3, 3}, zeros);
    tensor *b8 = make(be, 1, (int64_t[]){8}, zeros), *b5 = make(be, 1, (int64_t[]){5}, zeros);
    tensor *x4 = make(be, 4, (int64_t[]){1, 4, 4, 4}, zeros);
    tensor *x4h5 = make(be, 4, (int64_t[]){1, 4, 5, 4}, zeros);
    tensor *lin_x = make(be, 2, (int64_t[]){3, 10}, zeros);
    tensor *lin_w = make(be, 2, (int64_t[]){5, 9}, zeros);
    tensor *q = make(be, 3, (int64_t[]){1, 4, 10}, zeros);
    tensor *k3 = make(be, 3, (int64_t[]){1, 4, 12}, zeros);

    expect_error(be->conv2d(be, x7, w4, b8, 1, 1), SDX4_ERR_INVALID_ARGUMENT,
                 "conv2d: input has 7 channels, weight expects 4");
    expect_error(be->conv2d(be, x4, w4, b5, 1, 1), SDX4_ERR_INVALID_ARGUMENT, "conv2d: bias has 5");
    expect_error(be->conv2d(be, x4, w4, NULL, 0, 1), SDX4_ERR_INVALID_ARGUMENT, "conv2d: stride 0");
    tensor *w_big = make(be, 4, (int64_t[]){1, 4, 7, 7}, zeros);
    expect_error(be->conv2d(be, x4, w_big, NULL, 1, 1), SDX4_ERR_INVALID_ARGUMENT,
                 "smaller than kernel");
    expect_error(be->conv2d(be, lin_x, w4, NULL, 1, 1), SDX4_ERR_INVALID_ARGUMENT,
                 "expected 4 dimensions");
    expect_error(be->conv2d(be, NULL, w4, NULL, 1, 1), SDX4_ERR_INVALID_ARGUMENT,
                 "input is missing");
    expect_error(be->linear(be, lin_x, lin_w, NULL), SDX4_ERR_INVALID_ARGUMENT,
                 "linear: input [3,10] has 10 features, weight [5,9] expects 9");
    expect_error(be->concat_channels(be, x4, x4h5), SDX4_ERR_INVALID_ARGUMENT, "concat_channels");
    expect_error(be->attention(be, q, q, q, 3, 0), SDX4_ERR_INVALID_ARGUMENT,
                 "do not split into 3 heads");
    expect_error(be->attention(be, q, k3, k3, 2, 0), SDX4_ERR_INVALID_ARGUMENT, "do not match");
    expect_error(be->group_norm(be, x7, 2, b8, b8, 1e-5f, ACT_NONE), SDX4_ERR_INVALID_ARGUMENT,
                 "7 channels do not split into 2 groups");
    expect_error(be->group_norm(be, x4, 2, b8, b8, 1e-5f, ACT_NONE), SDX4_ERR_INVALID_ARGUMENT,
                 "gamma has 8");
    expect_error(be->layer_norm(be, lin_x, b8, b8, 1e-5f), SDX4_ERR_INVALID_ARGUMENT, "layer_norm");
    expect_error(be->activate(be, x4, (activation)42), SDX4_ERR_INVALID_ARGUMENT,
                 "unknown activation");
    tensor *odd = make(be, 1, (int64_t[]){5}, zeros);
    expect_error(be->geglu(be, odd), SDX4_ERR_INVALID_ARGUMENT, "odd");
    tensor_free(odd);
    expect_error(be->tokens_to_nchw(be, q, 3, 2), SDX4_ERR_INVALID_ARGUMENT, "not 3x2");
    expect_error(be->upsample_nearest(be, x4, 0, 8), SDX4_ERR_INVALID_ARGUMENT, "size 0x8");
    int32_t bad_ids[2] = {1, 10};
    expect_error(be->embedding(be, q, bad_ids, 2), SDX4_ERR_INVALID_ARGUMENT,
                 "expected 2 dimensions");
    expect_error(be->embedding(be, lin_x, bad_ids, 2), SDX4_ERR_INVALID_ARGUMENT,
                 "id 10 at position 1 is outside the table of 3");
    expect_error(be->new_tensor(be, 5, (int64_t[]){1, 1, 1, 1, 1}), SDX4_ERR_INVALID_ARGUMENT,
                 "5 dimensions");
    expect_error(be->new_tensor(be, 2, (int64_t[]){3, 0}), SDX4_ERR_INVALID_ARGUMENT,
                 "dimension 1 is 0");
    expect_error(be->new_tensor(be, 3, (int64_t[]){1 << 20, 1 << 20, 1 << 12}), SDX4_ERR_NO_MEMORY,
                 "cannot allocate");
    expect_error(be->weight(be, NULL, DTYPE_F32, 1, (int64_t[]){3}), SDX4_ERR_INVALID_ARGUMENT,
                 "no data");

    CHECK(be->add_inplace(be, x4, x4h5, 1.0f) == -1 && strstr(sdx4_last_error(), "differ"),
          "add shape mismatch: %s", sdx4_last_error());
    CHECK(be->add_channel_bias_inplace(be, x4, lin_x) == -1 &&
              strstr(sdx4_last_error(), "needs v [1,4]"),
          "channel bias mismatch: %s", sdx4_last_error());
    CHECK(sdx4_backend_cpu_create(-1) == NULL, "negative thread count");

    tensor_free(x7), tensor_free(w4), tensor_free(b8), tensor_free(b5), tensor_free(x4);
    tensor_free(x4h5), tensor_free(lin_x), tensor_free(lin_w), tensor_free(q), tensor_free(k3);
    tensor_free(w_big);
}

/* ------------------------------------------------ bounded scratch memory */

/* A few outputs of a big convolution against double sums: the error must be
 * within TOL of the sum of the products' magnitudes. */
static void spot_check_conv(backend *be, const char *what, const tensor *x, const tensor *w,
                            const tensor *y, int stride, int pad) {
    float *xd = x->data, *wd = w->data, *yd = y->data;
    int64_t C = x->shape[1], H = x->shape[2], W = x->shape[3], O = w->shape[0], k = w->shape[2];
    int64_t Ho = y->shape[2], Wo = y->shape[3];
    (void)be;
    for (int i = 0; i < 6; i++) {
        int64_t o = (int64_t)(test_frand(&rng, 0, 1) * O), oy = (int64_t)(test_frand(&rng, 0, 1) * Ho);
        int64_t ox = i < 3 ? (int64_t)(test_frand(&rng, 0, 1) * Wo) : (i - 3) * (Wo - 1) / 2; /* edges too */
        double sum = 0, mag = 0;
        for (int64_t c = 0; c < C; c++)
            for (int64_t ky = 0; ky < k; ky++)
                for (int64_t kx = 0; kx < k; kx++) {
                    int64_t iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
                    if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                    double p =
                        (double)xd[(c * H + iy) * W + ix] * wd[((o * C + c) * k + ky) * k + kx];
                    sum += p, mag += fabs(p);
                }
        double got = yd[(o * Ho + oy) * Wo + ox];
        CHECK(fabs(got - sum) <= TOL * mag,
              "%s: output [%" PRId64 ",%" PRId64 ",%" PRId64 "] is %.7g, expected %.7g", what, o,
              oy, ox, got, sum);
    }
}

/* Runs one big convolution on a fresh two-thread backend, so memory()'s
 * peak is this call's, and checks the scratch beyond inputs and output. */
static void test_conv_scratch(int64_t C, int64_t H, int64_t O, int stride, int64_t limit_mb) {
    backend *be = sdx4_backend_cpu_create(2);
    float *x = test_rand_buf(&rng, C * H * H, -1, 1), *w = test_rand_buf(&rng, O * C * 9, -1, 1);
    tensor *tx = make(be, 4, (int64_t[]){1, C, H, H}, x);
    tensor *tw = make(be, 4, (int64_t[]){O, C, 3, 3}, w);
    tensor *y = be->conv2d(be, tx, tw, NULL, stride, 1);
    char what[96];
    snprintf(what, sizeof what, "conv2d %" PRId64 "->%" PRId64 " 3x3 s%d at %" PRId64 "x%" PRId64,
             C, O, stride, H, H);
    CHECK(y != NULL, "%s: %s", what, sdx4_last_error());
    if (y) {
        int64_t peak;
        be->memory(be, NULL, &peak);
        int64_t scratch = peak - (tensor_numel(tx) + tensor_numel(tw) + tensor_numel(y)) * 4;
        CHECK(scratch <= limit_mb << 20, "%s: %.1f MB of scratch, limit %" PRId64, what,
              scratch / 1048576.0, limit_mb);
        spot_check_conv(be, what, tx, tw, y, stride, 1);
        tensor_free(y);
    }
    tensor_free(tx), tensor_free(tw);
    be->destroy(be);
    free(x), free(w);
}

/* The VAE's self-attention shape, narrowed to D = 8 to stay quick: 16384
 * tokens attend to 16384 without a 1 GB score matrix. */
static void test_attention_scratch(void) {
    backend *be = sdx4_backend_cpu_create(2);
    const int64_t T = 16384, D = 8;
    float *q = test_rand_buf(&rng, T * D, -1.5f, 1.5f), *k = test_rand_buf(&rng, T * D, -1.5f, 1.5f),
          *v = test_rand_buf(&rng, T * D, -1, 1);
    int64_t shape[3] = {1, T, D};
    tensor *tq = make(be, 3, shape, q), *tk = make(be, 3, shape, k), *tv = make(be, 3, shape, v);
    tensor *out = be->attention(be, tq, tk, tv, 1, 0);
    CHECK(out != NULL, "attention 16384 tokens: %s", sdx4_last_error());
    if (out) {
        int64_t peak;
        be->memory(be, NULL, &peak);
        int64_t scratch = peak - 4 * T * D * 4;
        CHECK(scratch <= 24 << 20, "attention 16384 tokens: %.1f MB of scratch",
              scratch / 1048576.0);
        const float *o = out->data;
        double *p = dalloc(T);
        for (int64_t i = 0; i < T; i += 4099) {
            double max = -INFINITY, sum = 0;
            for (int64_t j = 0; j < T; j++) {
                double s = 0;
                for (int64_t d = 0; d < D; d++) s += (double)q[i * D + d] * k[j * D + d];
                p[j] = s / sqrt((double)D);
                if (p[j] > max) max = p[j];
            }
            for (int64_t j = 0; j < T; j++) sum += p[j] = exp(p[j] - max);
            for (int64_t d = 0; d < D; d++) {
                double want = 0;
                for (int64_t j = 0; j < T; j++) want += p[j] * v[j * D + d];
                want /= sum;
                CHECK(fabs(o[i * D + d] - want) <= TOL,
                      "attention 16384 tokens: out[%" PRId64 ",%" PRId64 "] = %.7g, expected %.7g",
                      i, d, o[i * D + d], want);
            }
        }
        free(p);
        tensor_free(out);
    }
    tensor_free(tq), tensor_free(tk), tensor_free(tv);
    be->destroy(be);
    free(q), free(k), free(v);
}

/* ------------------------------------------------------- several callers */

/* One caller's work: a Winograd convolution, a causal attention and a
 * linear layer on its own tensors; returns the three results concatenated. */
typedef struct {
    backend *be;
    const float *x, *w, *qkv; /* inputs, shared read-only */
    float *result;            /* conv [1,128,35,35], attention [1,300,64], linear [300,96] */
} caller;

#define CALLER_FLOATS (128 * 35 * 35 + 300 * 64 + 300 * 96)

static void *caller_run(void *arg) {
    caller *c = arg;
    backend *be = c->be;
    tensor *x = make(be, 4, (int64_t[]){1, 128, 35, 35}, c->x);
    tensor *w = make(be, 4, (int64_t[]){128, 128, 3, 3}, c->w);
    tensor *q = make(be, 3, (int64_t[]){1, 300, 64}, c->qkv);
    tensor *lw = make(be, 2, (int64_t[]){96, 64}, c->w);
    tensor *y = be->conv2d(be, x, w, NULL, 1, 1);
    tensor *a = be->attention(be, q, q, q, 4, 1);
    tensor *l = be->linear(be, a, lw, NULL);
    if (y && a && l) {
        be->download(be, y, c->result);
        be->download(be, a, c->result + 128 * 35 * 35);
        be->download(be, l, c->result + 128 * 35 * 35 + 300 * 64);
    }
    tensor_free(x), tensor_free(w), tensor_free(q), tensor_free(lw);
    tensor_free(y), tensor_free(a), tensor_free(l);
    return NULL;
}

/* The same work from two application threads at once gives the same bits
 * as from one. */
static void test_concurrent_callers(backend *be) {
    float *x = test_rand_buf(&rng, 128 * 35 * 35, -1, 1), *w = test_rand_buf(&rng, 128 * 128 * 9, -1, 1);
    float *qkv = test_rand_buf(&rng, 300 * 64, -1, 1);
    caller alone = {be, x, w, qkv, calloc(CALLER_FLOATS, sizeof(float))};
    caller_run(&alone);
    caller both[2];
    pthread_t threads[2];
    for (int i = 0; i < 2; i++) {
        both[i] = (caller){be, x, w, qkv, calloc(CALLER_FLOATS, sizeof(float))};
        pthread_create(&threads[i], NULL, caller_run, &both[i]);
    }
    for (int i = 0; i < 2; i++) {
        pthread_join(threads[i], NULL);
        CHECK(memcmp(both[i].result, alone.result, CALLER_FLOATS * sizeof(float)) == 0,
              "caller %d of 2 differs from a lone caller", i);
        free(both[i].result);
    }
    free(alone.result), free(x), free(w), free(qkv);
}

/* ----------------------------------------------------------- the suite */

static void test_ops(backend *be) {
    test_linear(be, 3, (int64_t[]){2, 5, 37}, 23, 1);
    test_linear(be, 1, (int64_t[]){37}, 11, 0);
    test_linear(be, 3, (int64_t[]){3, 100, 64}, 129, 1); /* parallel, split by rows */
    test_linear(be, 2, (int64_t[]){2, 2048}, 1283, 1);   /* parallel, split by outputs */

    test_conv(be, 2, 3, 7, 9, 5, 3, 1, 1, 1);     /* odd sizes */
    test_conv(be, 1, 4, 8, 8, 6, 3, 2, 1, 1);     /* downsampling: stride 2, padding 1 */
    test_conv(be, 1, 3, 9, 11, 2, 3, 2, 1, 0);    /* stride 2 on odd sizes, no bias */
    test_conv(be, 2, 5, 6, 7, 4, 1, 1, 0, 1);     /* 1x1: the direct sgemm */
    test_conv(be, 2, 64, 40, 41, 32, 1, 1, 0, 1); /* 1x1 split by pixels */
    test_conv(be, 1, 256, 6, 6, 512, 1, 1, 0, 0); /* 1x1 split by output channels */
    test_conv(be, 1, 3, 5, 6, 4, 1, 2, 0, 1);     /* 1x1 with stride: im2col */
    test_conv(be, 1, 2, 5, 5, 3, 3, 1, 0, 1);     /* no padding */
    test_conv(be, 1, 3, 6, 9, 2, 5, 1, 2, 1);     /* 5x5 */
    test_conv(be, 2, 6, 33, 35, 8, 3, 1, 1, 1);   /* two tiles per image */
    test_conv(be, 1, 512, 23, 23, 8, 3, 1, 1, 1); /* tiles of 133 pixels split rows of 23 */
    /* 3x3 stride 1 with 128+ channels and 64+ 4x4 tiles: the Winograd path
     * (units as with two threads, CI's machine) */
    test_conv(be, 1, 128, 35, 35, 128, 3, 1, 1, 1); /* clipped tiles, units split tile rows */
    test_conv(be, 1, 128, 34, 38, 136, 3, 1, 0, 0); /* no padding, no bias */
    test_conv(be, 2, 160, 13, 31, 128, 3, 1, 1, 1); /* one unit per image */
    test_conv(be, 1, 128, 3, 280, 128, 3, 1, 1, 1); /* a single row of tiles, 3 rows of 4 */
    test_conv(be, 1, 128, 6, 402, 128, 3, 1, 0, 1); /* units inside the row: the fast load */
    test_conv(be, 1, 128, 260, 1, 128, 3, 1, 1, 0); /* one output column */
    test_conv(be, 1, 128, 31, 31, 128, 3, 1, 2, 1); /* padding 2 */
    test_conv(be, 2, 1024, 16, 31, 257, 3, 1, 1, 1); /* two images, output channels in 2 blocks */

    test_attention(be, 2, 5, 7, 3, 4, 0);       /* Tq != Tk, several heads */
    test_attention(be, 1, 77, 77, 4, 16, 1);    /* CLIP-like causal */
    test_attention(be, 2, 9, 6, 2, 8, 1);       /* causal with Tq > Tk */
    test_attention(be, 1, 700, 300, 2, 8, 0);   /* several query tiles */
    test_attention(be, 1, 600, 600, 1, 40, 1);  /* causal over tiles */
    test_attention(be, 1, 130, 40000, 1, 4, 0); /* long keys: small tiles */

    test_group_norm(be, 4, (int64_t[]){2, 6, 5, 7}, 3, 0, ACT_NONE);
    test_group_norm(be, 4, (int64_t[]){2, 6, 5, 7}, 3, 0, ACT_SILU);
    test_group_norm(be, 4, (int64_t[]){1, 8, 3, 3}, 8, 0, ACT_GELU);
    test_group_norm(be, 3, (int64_t[]){2, 8, 10}, 4, 0, ACT_QUICK_GELU);
    test_group_norm(be, 4, (int64_t[]){1, 4, 256, 256}, 2, 100,
                    ACT_NONE); /* big, off-centre groups */
    test_layer_norm(be, 3, 33, 0);
    test_layer_norm(be, 77, 1024, 50);

    test_elementwise(be);
    test_layout(be);
}

/* --------------------------------------------------------------- speed */

static void print_speed(backend *be) {
    /* sgemm through linear: [4096, 1280] @ [1280, 1280]^T */
    int64_t M = 4096, K = 1280, N = 1280;
    float *x = test_rand_buf(&rng, M * K, -1, 1), *w = test_rand_buf(&rng, N * K, -1, 1);
    tensor *tx = make(be, 2, (int64_t[]){M, K}, x), *tw = make(be, 2, (int64_t[]){N, K}, w);
    tensor_free(be->linear(be, tx, tw, NULL));
    double t0 = omp_get_wtime();
    for (int i = 0; i < 3; i++) tensor_free(be->linear(be, tx, tw, NULL));
    double t = (omp_get_wtime() - t0) / 3;
    printf("speed: linear %" PRId64 "x%" PRId64 "x%" PRId64 ": %.1f ms, %.1f GFLOP/s\n", M, K, N,
           t * 1e3, 2.0 * M * N * K / t / 1e9);
    tensor_free(tx), tensor_free(tw);
    free(x), free(w);

    /* the UNet's conv: 320 -> 320, 3x3, 64x64, batch 2 */
    int64_t B = 2, C = 320, H = 64;
    x = test_rand_buf(&rng, B * C * H * H, -1, 1), w = test_rand_buf(&rng, C * C * 9, -1, 1);
    float *b = test_rand_buf(&rng, C, -1, 1);
    tx = make(be, 4, (int64_t[]){B, C, H, H}, x), tw = make(be, 4, (int64_t[]){C, C, 3, 3}, w);
    tensor *tb = make(be, 1, &C, b);
    tensor_free(be->conv2d(be, tx, tw, tb, 1, 1));
    t0 = omp_get_wtime();
    for (int i = 0; i < 3; i++) tensor_free(be->conv2d(be, tx, tw, tb, 1, 1));
    t = (omp_get_wtime() - t0) / 3;
    printf("speed: conv2d 320->320 3x3 64x64 batch 2: %.1f ms, %.1f GFLOP/s (%s)\n", t * 1e3,
           2.0 * B * C * C * 9 * H * H / t / 1e9, be->description);
    tensor_free(tx), tensor_free(tw), tensor_free(tb);
    free(x), free(w), free(b);
}

int main(void) {
    backend *be = sdx4_backend_cpu_create(0);
    CHECK(be != NULL, "sdx4_backend_cpu_create: %s", sdx4_last_error());
    if (!be) return test_finish("test_backend_cpu");
    CHECK(strcmp(be->name, "cpu") == 0, "name %s", be->name);

    int omp_default = omp_get_max_threads();
    test_ops(be);
    CHECK(omp_get_max_threads() == omp_default, "the backend changed this thread's OpenMP default");
    test_weights_and_memory(be);
    test_errors(be);
    test_concurrent_callers(be);
    int64_t in_use;
    be->memory(be, &in_use, NULL);
    CHECK(in_use == 0, "%" PRId64 " bytes leaked by the backend", in_use);

    /* one thread: the same kernels without parallel splits */
    backend *one = sdx4_backend_cpu_create(1);
    CHECK(one != NULL, "sdx4_backend_cpu_create(1): %s", sdx4_last_error());
    if (one) {
        test_conv(one, 1, 512, 23, 23, 8, 3, 1, 1, 1);
        test_conv(one, 1, 128, 35, 35, 128, 3, 1, 1, 1);
        test_attention(one, 1, 600, 600, 1, 40, 1);
        test_group_norm(one, 4, (int64_t[]){2, 6, 5, 7}, 3, 0, ACT_SILU);
        one->destroy(one);
    }

    /* the brief's bound: tens of MB of scratch even for 768 channels at
     * 128x128 (im2col) or 64x64 (Winograd, its output channels in two
     * blocks), and for 16384-token attention */
    test_conv_scratch(768, 128, 128, 2, 24);
    test_conv_scratch(768, 64, 384, 1, 48);
    test_attention_scratch();

    print_speed(be);
    be->destroy(be);
    return test_finish("test_backend_cpu");
}
