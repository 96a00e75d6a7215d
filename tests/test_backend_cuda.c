/*
 * test_backend_cuda.c - every operation of the CUDA backend against the CPU
 * backend on the same random inputs, in the four ways the CUDA backend
 * computes:
 *   fp32        dtype "fp32": float everywhere, no TF32
 *   fp16        half weights and activations, float accumulation
 *   fp16+f32    the fp16 backend with float activations
 *               (set_activation_type): half weights meet float
 *               tensors, GEMMs may use TF32
 *   fp16+bf16   the fp16 backend with bfloat16 activations, as for the
 *               VAE decode (inputs rounded to bfloat16 first)
 * Inputs are rounded to half precision first, so every mode computes on
 * the same numbers and the differences measure the arithmetic alone; the
 * operations that only move values must then match exactly. Also: weights
 * from F16 and BF16 files, operands of mixed types, the im2col path of
 * convolutions (conv "im2col"), cuDNN's graph API plans ("cudnn-graph")
 * and its legacy call alone ("cudnn-legacy"), steps recorded with and
 * without planning and run as called with graphs off, memory accounting,
 * errors, and two threads calling one backend at once. (The settings'
 * refusals are test_engine_options's: they need no GPU.)
 *
 * Without a CUDA device, or in a build without the CUDA backend, it skips
 * (exit 77) and says why.
 */
#ifndef SDX4_HAVE_CUDA
#include <stdio.h>

int main(void) {
    puts("test_backend_cuda: skipped: this build has no CUDA backend (cmake -DSDX4_CUDA=ON)");
    return 77;
}
#else

#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sys/stat.h>
#include <unistd.h>

#include "backend/backend.h"
#include "core/error.h"
#include "core/plan_cache.h"
#include "test.h"

/* Error over max |reference| allowed in each mode (see the top comment):
 * fp16 stores each result with 11 significant bits (5e-4). */
#define TOL_FP32 1e-4
#define TOL_FP16 1e-2
#define TOL_TF32 5e-3
#define TOL_BF16 3e-2 /* 8 significant bits (4e-3) per rounding */

/* ------------------------------------------------------------ helpers */

/* per thread: test_threads draws from two threads */
static _Thread_local uint64_t rng = 0x9E3779B97F4A7C15ull;

/* n random values that half precision holds exactly. */
static float *rand_half(int64_t n, float lo, float hi) {
    float *p = malloc((size_t)n * sizeof *p);
    for (int64_t i = 0; i < n; i++) p[i] = f16_to_f32(f32_to_f16(test_frand(&rng, lo, hi)));
    return p;
}

static int64_t numel(int ndim, const int64_t *shape) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    return n;
}

typedef struct {
    backend *cpu, *gpu;
    const char *mode;
    double tol;
    dtype act; /* the type of the CUDA backend's results */
} suite;

/* The same values on both backends; host keeps them alive for weights,
 * which the CPU backend may point into. */
typedef struct {
    tensor *c, *g;
    float *host;
} pair;

static tensor *must(tensor *t, const char *what) {
    if (!t) {
        fprintf(stderr, "%s failed: %s\n", what, sdx4_last_error());
        exit(1);
    }
    return t;
}

/* Rounds the values to bfloat16 when the suite's results are bfloat16, so
 * that the operations that only move values stay exact there too. */
static float *suite_values(const suite *s, int64_t n, float lo, float hi) {
    float *p = rand_half(n, lo, hi);
    for (int64_t i = 0; s->act == DTYPE_BF16 && i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &p[i], 4);
        bits = (bits + 0x7fff + (bits >> 16 & 1)) & 0xffff0000u; /* to nearest even */
        memcpy(&p[i], &bits, 4);
    }
    return p;
}

static pair act(const suite *s, int ndim, const int64_t *shape, float lo, float hi) {
    pair p = {NULL, NULL, suite_values(s, numel(ndim, shape), lo, hi)};
    p.c = must(s->cpu->new_tensor(s->cpu, ndim, shape), "cpu new_tensor");
    p.g = must(s->gpu->new_tensor(s->gpu, ndim, shape), "cuda new_tensor");
    if (s->cpu->upload(s->cpu, p.c, p.host) || s->gpu->upload(s->gpu, p.g, p.host)) {
        fprintf(stderr, "upload failed: %s\n", sdx4_last_error());
        exit(1);
    }
    return p;
}

static pair wgt(const suite *s, int ndim, const int64_t *shape, float lo, float hi) {
    pair p = {NULL, NULL, suite_values(s, numel(ndim, shape), lo, hi)};
    p.c = must(s->cpu->weight(s->cpu, p.host, DTYPE_F32, ndim, shape), "cpu weight");
    p.g = must(s->gpu->weight(s->gpu, p.host, DTYPE_F32, ndim, shape), "cuda weight");
    return p;
}

static void pair_free(pair *p) {
    tensor_free(p->c);
    tensor_free(p->g);
    free(p->host);
}

static float *fetch(backend *be, const tensor *t) {
    float *p = malloc((size_t)tensor_numel(t) * sizeof *p);
    if (be->download(be, t, p)) {
        fprintf(stderr, "download failed: %s\n", sdx4_last_error());
        exit(1);
    }
    return p;
}

/* Checks the CUDA result g against the CPU result c: shape, type, and
 * max |g - c| / max |c| within tol. */
static void expect_close(const suite *s, const char *what, const tensor *g, const tensor *c,
                         double tol) {
    CHECK(g != NULL, "%s: %s: cuda failed: %s", s->mode, what, sdx4_last_error());
    CHECK(c != NULL, "%s: %s: cpu failed: %s", s->mode, what, sdx4_last_error());
    if (!g || !c) return;
    int same = g->ndim == c->ndim;
    for (int i = 0; same && i < g->ndim; i++) same = g->shape[i] == c->shape[i];
    CHECK(same, "%s: %s: shapes differ", s->mode, what);
    CHECK(g->type == s->act, "%s: %s: result is %s, expected %s", s->mode, what,
          dtype_name(g->type), dtype_name(s->act));
    if (!same) return;
    int64_t n = tensor_numel(c);
    float *gv = fetch(s->gpu, g), *cv = fetch(s->cpu, c);
    double err = 0, scale = 1e-30;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)gv[i] - cv[i]);
        if (!(d <= err)) err = d; /* NaN counts as failure */
        if (fabs(cv[i]) > scale) scale = fabs(cv[i]);
    }
    printf("  %-8s %-52s %.2e\n", s->mode, what, err / scale);
    CHECK(err / scale <= tol, "%s: %s: relative error %.3g > %.1g", s->mode, what, err / scale,
          tol);
    free(gv);
    free(cv);
}

/* expect_close, then frees both results. */
static void expect(const suite *s, const char *what, tensor *g, tensor *c, double tol) {
    expect_close(s, what, g, c, tol);
    tensor_free(g);
    tensor_free(c);
}

/* ---------------------------------------------------------- operations */

static void test_linear(const suite *s, int ndim, const int64_t *xshape, int64_t N,
                        int with_bias) {
    int64_t K = xshape[ndim - 1];
    pair x = act(s, ndim, xshape, -1, 1), w = wgt(s, 2, (int64_t[]){N, K}, -1, 1);
    pair b = wgt(s, 1, &N, -1, 1);
    char what[96];
    snprintf(what, sizeof what, "linear %" PRId64 "x%" PRId64 " -> %" PRId64 "%s",
             tensor_numel(x.c) / K, K, N, with_bias ? " +bias" : "");
    expect(s, what, s->gpu->linear(s->gpu, x.g, w.g, with_bias ? b.g : NULL),
           s->cpu->linear(s->cpu, x.c, w.c, with_bias ? b.c : NULL), s->tol);
    pair_free(&x), pair_free(&w), pair_free(&b);
}

/* The CPU's product + r against linear_add: the residual in the GEMM. */
static void test_linear_add(const suite *s, int64_t M, int64_t K, int64_t N) {
    pair x = act(s, 2, (int64_t[]){M, K}, -1, 1), w = wgt(s, 2, (int64_t[]){N, K}, -1, 1);
    pair b = wgt(s, 1, &N, -1, 1), r = act(s, 2, (int64_t[]){M, N}, -4, 4);
    char what[96];
    snprintf(what, sizeof what, "linear_add %" PRId64 "x%" PRId64 " -> %" PRId64, M, K, N);
    tensor *c = s->cpu->linear(s->cpu, x.c, w.c, b.c);
    if (c && s->cpu->add_inplace(s->cpu, c, r.c, 1.0f)) tensor_free(c), c = NULL;
    expect(s, what, s->gpu->linear_add(s->gpu, x.g, w.g, b.g, r.g), c, s->tol);
    pair_free(&x), pair_free(&w), pair_free(&b), pair_free(&r);
}

/* conv2d + r against conv2d_add: the residual in cuDNN's fused call, or
 * added after where the convolution cannot take it. */
static void test_conv_add(const suite *s, int64_t B, int64_t C, int64_t H, int64_t W, int64_t O,
                          int k) {
    pair x = act(s, 4, (int64_t[]){B, C, H, W}, -1, 1), r = act(s, 4, (int64_t[]){B, O, H, W}, -4, 4);
    pair w = wgt(s, 4, (int64_t[]){O, C, k, k}, -1, 1), b = wgt(s, 1, &O, -1, 1);
    char what[96];
    snprintf(what, sizeof what, "conv2d_add [%" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64
             "] -> %" PRId64 " k%d", B, C, H, W, O, k);
    tensor *c = s->cpu->conv2d(s->cpu, x.c, w.c, b.c, 1, k / 2);
    if (c && s->cpu->add_inplace(s->cpu, c, r.c, 1.0f)) tensor_free(c), c = NULL;
    expect(s, what, s->gpu->conv2d_add(s->gpu, x.g, w.g, b.g, 1, k / 2, r.g), c, s->tol);
    pair_free(&x), pair_free(&w), pair_free(&b), pair_free(&r);
}

/* The CPU's x += v[b, c], then group norm, against group_norm_add. */
static void test_group_norm_add(const suite *s, const int64_t *shape, int groups, float offset) {
    pair x = act(s, 4, shape, -1 + offset, 1 + offset), v = act(s, 2, shape, -3, 3);
    pair g = wgt(s, 1, &shape[1], 0.5f, 1.5f), b = wgt(s, 1, &shape[1], -0.5f, 0.5f);
    char what[96];
    snprintf(what, sizeof what, "group_norm_add %" PRId64 "x%" PRId64 "x%" PRId64 "x%" PRId64
             " g%d off%g", shape[0], shape[1], shape[2], shape[3], groups, offset);
    tensor *c = s->cpu->add_channel_bias_inplace(s->cpu, x.c, v.c)
                    ? NULL
                    : s->cpu->group_norm(s->cpu, x.c, groups, g.c, b.c, 1e-5f, ACT_SILU);
    expect(s, what, s->gpu->group_norm_add(s->gpu, x.g, v.g, groups, g.g, b.g, 1e-5f, ACT_SILU),
           c, s->tol);
    pair_free(&x), pair_free(&v), pair_free(&g), pair_free(&b);
}

static void test_conv(const suite *s, int64_t B, int64_t C, int64_t H, int64_t W, int64_t O,
                      int k, int stride, int pad, int with_bias) {
    pair x = act(s, 4, (int64_t[]){B, C, H, W}, -1, 1);
    pair w = wgt(s, 4, (int64_t[]){O, C, k, k}, -1, 1), b = wgt(s, 1, &O, -1, 1);
    char what[96];
    snprintf(what, sizeof what,
             "conv2d [%" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64 "] -> %" PRId64
             " k%d s%d p%d%s",
             B, C, H, W, O, k, stride, pad, with_bias ? " +bias" : "");
    expect(s, what, s->gpu->conv2d(s->gpu, x.g, w.g, with_bias ? b.g : NULL, stride, pad),
           s->cpu->conv2d(s->cpu, x.c, w.c, with_bias ? b.c : NULL, stride, pad), s->tol);
    pair_free(&x), pair_free(&w), pair_free(&b);
}

static void test_convs(const suite *s) {
    test_conv(s, 2, 3, 7, 9, 5, 3, 1, 1, 1);      /* odd sizes */
    test_conv(s, 1, 4, 8, 8, 6, 3, 2, 1, 1);      /* downsampling: stride 2, padding 1 */
    test_conv(s, 1, 3, 9, 11, 2, 3, 2, 1, 0);     /* stride 2 on odd sizes, no bias */
    test_conv(s, 2, 5, 6, 7, 4, 1, 1, 0, 1);      /* 1x1: the direct GEMM */
    test_conv(s, 1, 3, 5, 6, 4, 1, 2, 0, 1);      /* 1x1 with stride */
    test_conv(s, 1, 2, 5, 5, 3, 3, 1, 0, 1);      /* no padding */
    test_conv(s, 1, 3, 6, 9, 2, 5, 1, 2, 1);      /* 5x5 */
    test_conv(s, 2, 7, 16, 24, 32, 3, 1, 1, 1);   /* the UNet's conv_in */
    test_conv(s, 1, 512, 23, 23, 8, 3, 1, 1, 1);  /* im2col tiles split rows */
    test_conv(s, 1, 128, 64, 64, 128, 3, 1, 1, 1); /* a VAE layer in small */
    test_conv(s, 2, 64, 16, 16, 128, 1, 1, 0, 1); /* a resnet shortcut */
    test_conv_add(s, 2, 64, 16, 16, 64, 3);       /* a resnet's conv2 + its input */
    test_conv_add(s, 1, 128, 40, 24, 256, 3);     /* wider output, in the VAE's dtype too */
    test_conv_add(s, 2, 3, 9, 7, 5, 3);           /* widened channels: added after */
    test_conv_add(s, 2, 32, 8, 8, 16, 1);         /* 1x1: the GEMM, added after */
}

static void test_attention(const suite *s, int64_t B, int64_t Tq, int64_t Tk, int heads,
                           int64_t D, int causal) {
    int64_t HD = heads * D;
    pair q = act(s, 3, (int64_t[]){B, Tq, HD}, -2, 2), k = act(s, 3, (int64_t[]){B, Tk, HD}, -2, 2);
    pair v = act(s, 3, (int64_t[]){B, Tk, HD}, -1, 1);
    char what[96];
    snprintf(what, sizeof what,
             "attention B%" PRId64 " Tq%" PRId64 " Tk%" PRId64 " H%d D%" PRId64 "%s", B, Tq, Tk,
             heads, D, causal ? " causal" : "");
    expect(s, what, s->gpu->attention(s->gpu, q.g, k.g, v.g, heads, causal),
           s->cpu->attention(s->cpu, q.c, k.c, v.c, heads, causal), s->tol);
    pair_free(&q), pair_free(&k), pair_free(&v);
}

static void test_attentions(const suite *s) {
    test_attention(s, 2, 5, 7, 3, 4, 0);         /* Tq != Tk, several heads */
    test_attention(s, 1, 77, 77, 16, 64, 1);     /* CLIP: causal, D 64 */
    test_attention(s, 2, 9, 6, 2, 8, 1);         /* causal with Tq > Tk */
    test_attention(s, 2, 300, 77, 8, 64, 0);     /* UNet cross-attention */
    test_attention(s, 2, 256, 256, 8, 128, 0);   /* UNet mid-block: D 128 */
    test_attention(s, 1, 50, 33, 2, 40, 1);      /* D not a power of two, causal */
    test_attention(s, 1, 20, 45, 2, 200, 0);     /* D 200: the 256 kernel, partly used */
    test_attention(s, 1, 1, 5, 1, 256, 0);       /* one query */
    test_attention(s, 1, 300, 300, 1, 512, 0);   /* VAE mid-block: one head of 512 */
    test_attention(s, 1, 1000, 1500, 1, 512, 0); /* many key tiles, partial last tiles */
    test_attention(s, 2, 1030, 77, 8, 64, 1);    /* causal with Tq > Tk on tensor cores */
    test_attention(s, 1, 130, 5000, 1, 4, 0);    /* long keys */
    test_attention(s, 1, 100, 300, 2, 256, 0);   /* D 256: its 2-stage ring refilled */
    test_attention(s, 1, 150, 150, 1, 256, 1);   /* D 256, causal, several key tiles */
    test_attention(s, 1, 100, 111, 2, 128, 0);   /* D 128 with a partial last key tile */
}

static void test_group_norm(const suite *s, int ndim, const int64_t *shape, int groups,
                            float offset, activation a) {
    pair x = act(s, ndim, shape, offset - 1, offset + 1);
    pair g = wgt(s, 1, &shape[1], 0.5f, 1.5f), b = wgt(s, 1, &shape[1], -0.5f, 0.5f);
    char what[96];
    snprintf(what, sizeof what, "group_norm %" PRId64 "x%" PRId64 "x%" PRId64 " g%d act%d off%g",
             shape[0], shape[1], numel(ndim, shape) / (shape[0] * shape[1]), groups, (int)a,
             offset);
    expect(s, what, s->gpu->group_norm(s->gpu, x.g, groups, g.g, b.g, 1e-5f, a),
           s->cpu->group_norm(s->cpu, x.c, groups, g.c, b.c, 1e-5f, a), s->tol);
    pair_free(&x), pair_free(&g), pair_free(&b);
}

static void test_layer_norm(const suite *s, int64_t rows, int64_t D, float offset) {
    pair x = act(s, 2, (int64_t[]){rows, D}, offset - 1, offset + 1);
    pair g = wgt(s, 1, &D, 0.5f, 1.5f), b = wgt(s, 1, &D, -0.5f, 0.5f);
    char what[96];
    snprintf(what, sizeof what, "layer_norm %" PRId64 "x%" PRId64 " off%g", rows, D, offset);
    expect(s, what, s->gpu->layer_norm(s->gpu, x.g, g.g, b.g, 1e-5f),
           s->cpu->layer_norm(s->cpu, x.c, g.c, b.c, 1e-5f), s->tol);
    pair_free(&x), pair_free(&g), pair_free(&b);
}

static void test_norms(const suite *s) {
    test_group_norm(s, 4, (int64_t[]){2, 6, 5, 7}, 3, 0, ACT_NONE);
    test_group_norm(s, 4, (int64_t[]){2, 64, 17, 17}, 32, 0, ACT_SILU);
    test_group_norm(s, 4, (int64_t[]){1, 8, 3, 3}, 8, 0, ACT_GELU);
    test_group_norm(s, 3, (int64_t[]){2, 8, 10}, 4, 0, ACT_QUICK_GELU);
    test_group_norm(s, 4, (int64_t[]){1, 128, 64, 64}, 32, 20, ACT_SILU); /* several chunks */
    test_group_norm(s, 4, (int64_t[]){1, 4, 256, 256}, 2, 50, ACT_NONE);  /* big, off-centre */
    test_group_norm(s, 4, (int64_t[]){2, 320, 5, 5}, 32, 0, ACT_SILU);  /* 10-channel groups */
    test_group_norm(s, 4, (int64_t[]){1, 2304, 3, 3}, 32, 0, ACT_SILU); /* over 2048: other path */
    /* the channels-last path: 8-channel units, a group of several */
    test_group_norm(s, 4, (int64_t[]){2, 512, 16, 16}, 32, 10, ACT_SILU);
    test_group_norm(s, 4, (int64_t[]){2, 256, 96, 96}, 32, 30, ACT_SILU); /* many blocks an image */
    test_group_norm(s, 4, (int64_t[]){2, 768, 9, 11}, 32, 0, ACT_SILU);   /* idle threads */
    test_group_norm(s, 4, (int64_t[]){2, 2048, 5, 3}, 32, 0, ACT_NONE);   /* one pixel a round */
    test_group_norm(s, 4, (int64_t[]){3, 1024, 2, 2}, 32, 5, ACT_SILU);   /* one block an image */
    test_group_norm_add(s, (int64_t[]){2, 256, 24, 20}, 32, 0);  /* channels-last path */
    test_group_norm_add(s, (int64_t[]){2, 128, 9, 7}, 32, 20);   /* two groups a unit */
    test_group_norm_add(s, (int64_t[]){2, 64, 5, 6}, 32, 0);     /* the other path */
    test_layer_norm(s, 3, 33, 0);
    test_layer_norm(s, 154, 1024, 20);
    test_layer_norm(s, 5, 1, 0);
    test_layer_norm(s, 64, 320, 0);     /* a warp a row, lanes past the row idle */
    test_layer_norm(s, 600, 512, 30);   /* the UNet's rows, off-centre */
    test_layer_norm(s, 9, 1000, 0);     /* four vectors a lane, the last partly */
    test_layer_norm(s, 4, 1032, 0);     /* over the warp kernel's width */
}

static void test_elementwise(const suite *s) {
    int64_t shape[3] = {3, 7, 333};
    static const activation acts[] = {ACT_NONE, ACT_SILU, ACT_GELU, ACT_QUICK_GELU};
    pair x = act(s, 3, shape, -6, 6);
    for (size_t i = 0; i < sizeof acts / sizeof acts[0]; i++) {
        char what[48];
        snprintf(what, sizeof what, "activate %d", (int)acts[i]);
        expect(s, what, s->gpu->activate(s->gpu, x.g, acts[i]),
               s->cpu->activate(s->cpu, x.c, acts[i]), s->tol);
    }
    pair gg = act(s, 3, (int64_t[]){2, 50, 320}, -4, 4);
    expect(s, "geglu", s->gpu->geglu(s->gpu, gg.g), s->cpu->geglu(s->cpu, gg.c), s->tol);
    pair go = act(s, 3, (int64_t[]){3, 7, 74}, -4, 4); /* 37 outputs a row: one a thread */
    expect(s, "geglu odd width", s->gpu->geglu(s->gpu, go.g), s->cpu->geglu(s->cpu, go.c), s->tol);
    pair_free(&go);

    pair y = act(s, 3, shape, -1, 1);
    CHECK(!s->gpu->add_inplace(s->gpu, x.g, y.g, 1.0f), "%s: add: %s", s->mode, sdx4_last_error());
    s->cpu->add_inplace(s->cpu, x.c, y.c, 1.0f);
    expect_close(s, "add_inplace", x.g, x.c, s->tol);
    CHECK(!s->gpu->add_inplace(s->gpu, x.g, y.g, -0.25f), "%s: add: %s", s->mode, sdx4_last_error());
    s->cpu->add_inplace(s->cpu, x.c, y.c, -0.25f);
    expect_close(s, "add_inplace scaled", x.g, x.c, s->tol);
    CHECK(!s->gpu->scale_inplace(s->gpu, x.g, 0.375f), "%s: scale: %s", s->mode, sdx4_last_error());
    s->cpu->scale_inplace(s->cpu, x.c, 0.375f);
    expect_close(s, "scale_inplace", x.g, x.c, s->tol);

    pair img = act(s, 4, (int64_t[]){2, 64, 9, 11}, -1, 1), v = act(s, 2, (int64_t[]){2, 64}, -1, 1);
    CHECK(!s->gpu->add_channel_bias_inplace(s->gpu, img.g, v.g), "%s: add_channel_bias: %s",
          s->mode, sdx4_last_error());
    s->cpu->add_channel_bias_inplace(s->cpu, img.c, v.c);
    expect_close(s, "add_channel_bias_inplace", img.g, img.c, s->tol);
    pair_free(&x), pair_free(&gg), pair_free(&y), pair_free(&img), pair_free(&v);

    /* the GAN upscalers' activations: per channel (PReLU), one slope, ReLU */
    pair p = act(s, 4, (int64_t[]){2, 64, 9, 11}, -2, 2), k = wgt(s, 1, (int64_t[]){64}, -0.5, 0.5);
    static const float slopes[] = {0.2f, 0.0f};
    CHECK(!s->gpu->prelu_inplace(s->gpu, p.g, k.g, 0.0f), "%s: prelu: %s", s->mode, sdx4_last_error());
    s->cpu->prelu_inplace(s->cpu, p.c, k.c, 0.0f);
    expect_close(s, "prelu_inplace per channel", p.g, p.c, s->tol);
    for (size_t i = 0; i < sizeof slopes / sizeof slopes[0]; i++) {
        s->gpu->prelu_inplace(s->gpu, p.g, NULL, slopes[i]);
        s->cpu->prelu_inplace(s->cpu, p.c, NULL, slopes[i]);
        expect_close(s, slopes[i] ? "prelu_inplace slope 0.2" : "prelu_inplace relu", p.g, p.c, s->tol);
    }
    pair_free(&p), pair_free(&k);
}

/* Operations that only move values: exact in every mode. */
static void test_layout(const suite *s) {
    pair a = act(s, 4, (int64_t[]){2, 3, 5, 7}, -1, 1), b = act(s, 4, (int64_t[]){2, 4, 5, 7}, -1, 1);
    expect(s, "concat_channels", s->gpu->concat_channels(s->gpu, a.g, b.g),
           s->cpu->concat_channels(s->cpu, a.c, b.c), 0);
    static const int sizes[][2] = {{10, 14}, {13, 9}, {5, 7}, {3, 20}, {2, 3}, {7, 1}};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        char what[48];
        snprintf(what, sizeof what, "upsample_nearest 5x7 -> %dx%d", sizes[i][0], sizes[i][1]);
        expect(s, what, s->gpu->upsample_nearest(s->gpu, a.g, sizes[i][0], sizes[i][1]),
               s->cpu->upsample_nearest(s->cpu, a.c, sizes[i][0], sizes[i][1]), 0);
    }
    /* channel counts of whole 16-byte units: the vectorised kernels */
    pair a16 = act(s, 4, (int64_t[]){2, 16, 5, 7}, -1, 1), b16 = act(s, 4, (int64_t[]){2, 32, 5, 7}, -1, 1);
    expect(s, "concat_channels 16+32", s->gpu->concat_channels(s->gpu, a16.g, b16.g),
           s->cpu->concat_channels(s->cpu, a16.c, b16.c), 0);
    expect(s, "upsample_nearest 16 channels 5x7 -> 10x14",
           s->gpu->upsample_nearest(s->gpu, a16.g, 10, 14), s->cpu->upsample_nearest(s->cpu, a16.c, 10, 14), 0);
    expect(s, "upsample_nearest 32 channels 5x7 -> 13x9",
           s->gpu->upsample_nearest(s->gpu, b16.g, 13, 9), s->cpu->upsample_nearest(s->cpu, b16.c, 13, 9), 0);
    pair_free(&a16), pair_free(&b16);
    pair sh = act(s, 4, (int64_t[]){2, 48, 5, 7}, -1, 1), un = act(s, 4, (int64_t[]){2, 3, 12, 8}, -1, 1);
    expect(s, "pixel_shuffle 48 channels by 4", s->gpu->pixel_shuffle(s->gpu, sh.g, 4),
           s->cpu->pixel_shuffle(s->cpu, sh.c, 4), 0);
    expect(s, "pixel_shuffle 48 channels by 2", s->gpu->pixel_shuffle(s->gpu, sh.g, 2),
           s->cpu->pixel_shuffle(s->cpu, sh.c, 2), 0);
    expect(s, "pixel_unshuffle 12x8 by 2", s->gpu->pixel_unshuffle(s->gpu, un.g, 2),
           s->cpu->pixel_unshuffle(s->cpu, un.c, 2), 0);
    expect(s, "pixel_unshuffle 12x8 by 4", s->gpu->pixel_unshuffle(s->gpu, un.g, 4),
           s->cpu->pixel_unshuffle(s->cpu, un.c, 4), 0);
    pair_free(&sh), pair_free(&un);
    pair x = act(s, 4, (int64_t[]){2, 37, 33, 35}, -1, 1);
    tensor *tg = s->gpu->nchw_to_tokens(s->gpu, x.g), *tc = s->cpu->nchw_to_tokens(s->cpu, x.c);
    expect_close(s, "nchw_to_tokens", tg, tc, 0);
    if (tg && tc)
        expect(s, "tokens_to_nchw", s->gpu->tokens_to_nchw(s->gpu, tg, 33, 35),
               s->cpu->tokens_to_nchw(s->cpu, tc, 33, 35), 0);
    tensor_free(tg), tensor_free(tc);
    /* in place: the GPU tensor relaid as tokens and back against the CPU's copies */
    tc = s->cpu->nchw_to_tokens(s->cpu, x.c);
    CHECK(s->gpu->relayout_tokens(s->gpu, x.g, 0, 0) == 0, "%s: relayout_tokens", s->mode);
    expect_close(s, "relayout_tokens to tokens", x.g, tc, 0);
    tensor_free(tc);
    CHECK(s->gpu->relayout_tokens(s->gpu, x.g, 3, 5) == -1, "%s: relayout 33x35 as 3x5", s->mode);
    CHECK(s->gpu->relayout_tokens(s->gpu, x.g, 33, 35) == 0, "%s: relayout back", s->mode);
    expect_close(s, "relayout_tokens to an image", x.g, x.c, 0);

    pair table = wgt(s, 2, (int64_t[]){100, 64}, -1, 1);
    int32_t ids[20];
    for (int i = 0; i < 20; i++) ids[i] = (i * 37 + 11) % 100;
    expect(s, "embedding", s->gpu->embedding(s->gpu, table.g, ids, 20),
           s->cpu->embedding(s->cpu, table.c, ids, 20), 0);
    pair_free(&a), pair_free(&b), pair_free(&x), pair_free(&table);
}

static void test_all(const suite *s) {
    test_linear(s, 3, (int64_t[]){2, 5, 37}, 23, 1);
    test_linear(s, 1, (int64_t[]){37}, 11, 0);
    test_linear(s, 3, (int64_t[]){2, 77, 1024}, 320, 1);
    test_linear(s, 3, (int64_t[]){2, 300, 320}, 2560, 1);
    test_linear_add(s, 300, 320, 320);
    test_linear_add(s, 7, 37, 23);
    test_convs(s);
    test_attentions(s);
    test_norms(s);
    test_elementwise(s);
    test_layout(s);
}

/* ---------------------------------------------------- weights and types */

/* Weights stored as F16 and BF16 in the file: both backends convert. */
static void test_weight_types(const suite *s) {
    int64_t N = 48, K = 80;
    float *values = rand_half(N * K, -1, 1);
    uint16_t *half = malloc((size_t)(N * K) * 2), *bf = malloc((size_t)(N * K) * 2);
    for (int64_t i = 0; i < N * K; i++) {
        half[i] = f32_to_f16(values[i]);
        uint32_t bits;
        memcpy(&bits, &values[i], 4);
        bf[i] = (uint16_t)(bits >> 16); /* truncation: what the file holds */
    }
    pair x = act(s, 2, (int64_t[]){9, K}, -1, 1);
    const struct { dtype type; const void *data; const char *name; } files[] = {
        {DTYPE_F16, half, "linear with F16 file weights"},
        {DTYPE_BF16, bf, "linear with BF16 file weights"},
    };
    for (size_t i = 0; i < 2; i++) {
        int64_t shape[2] = {N, K};
        tensor *wc = s->cpu->weight(s->cpu, files[i].data, files[i].type, 2, shape);
        tensor *wg = s->gpu->weight(s->gpu, files[i].data, files[i].type, 2, shape);
        CHECK(wg != NULL, "%s: %s: %s", s->mode, files[i].name, sdx4_last_error());
        if (wc && wg)
            expect(s, files[i].name, s->gpu->linear(s->gpu, x.g, wg, NULL),
                   s->cpu->linear(s->cpu, x.c, wc, NULL), s->tol);
        tensor_free(wc), tensor_free(wg);
    }
    pair_free(&x);
    free(values), free(half), free(bf);
}

/* In fp16 mode: float tensors and half tensors meet in one operation. */
static void test_mixed_types(suite *s) {
    s->gpu->set_activation_type(s->gpu, DTYPE_F32);
    pair a = act(s, 4, (int64_t[]){2, 3, 5, 7}, -1, 1);
    s->gpu->set_activation_type(s->gpu, DTYPE_F16);
    pair b = act(s, 4, (int64_t[]){2, 3, 5, 7}, -1, 1), c = act(s, 4, (int64_t[]){2, 4, 5, 7}, -1, 1);
    CHECK(a.g->type == DTYPE_F32 && b.g->type == DTYPE_F16, "%s: precision switch: %s and %s",
          s->mode, dtype_name(a.g->type), dtype_name(b.g->type));
    s->act = DTYPE_F32; /* results take the type of the first operand */
    CHECK(!s->gpu->add_inplace(s->gpu, a.g, b.g, 1.0f), "mixed add: %s", sdx4_last_error());
    s->cpu->add_inplace(s->cpu, a.c, b.c, 1.0f);
    expect_close(s, "add_inplace F32 += F16", a.g, a.c, 0);
    expect(s, "concat_channels F32, F16", s->gpu->concat_channels(s->gpu, a.g, c.g),
           s->cpu->concat_channels(s->cpu, a.c, c.c), 0);
    s->act = DTYPE_F16;
    expect(s, "concat_channels F16, F32", s->gpu->concat_channels(s->gpu, c.g, a.g),
           s->cpu->concat_channels(s->cpu, c.c, a.c), TOL_FP16);
    pair_free(&a), pair_free(&b), pair_free(&c);
}

/* ------------------------------------------------------ memory, errors */

/* How a step's recording gets its memory: from the allocator's cache (a
 * backend with no_plans), from the plan of a planning pass that ran what
 * the recording runs, or of one that allocated something more first. */
typedef enum { UNPLANNED, PLANNED, PLANNED_OTHERWISE } planning;

typedef struct {
    pair w, gamma, beta, lw;
} sequence_weights;

static sequence_weights sequence_weights_new(const suite *s) {
    return (sequence_weights){wgt(s, 4, (int64_t[]){16, 8, 3, 3}, -0.3f, 0.3f),
                              wgt(s, 1, (int64_t[]){16}, 0.5f, 1.5f),
                              wgt(s, 1, (int64_t[]){16}, -1, 1),
                              wgt(s, 2, (int64_t[]){12, 16}, -0.3f, 0.3f)};
}

static void sequence_weights_free(sequence_weights *sw) {
    pair_free(&sw->w), pair_free(&sw->gamma), pair_free(&sw->beta), pair_free(&sw->lw);
}

/* The sequence that test_record's step runs (conv, group norm, linear on
 * the tokens); each intermediate is freed once used, so that a plan can
 * reuse its place. */
static tensor *sequence(backend *be, int on_gpu, const tensor *in, const sequence_weights *sw) {
#define W(p) (on_gpu ? sw->p.g : sw->p.c)
    tensor *c = be->conv2d(be, in, W(w), NULL, 1, 1), *t = NULL, *out = NULL;
    tensor *n = c ? be->group_norm(be, c, 4, W(gamma), W(beta), 1e-5f, ACT_SILU) : NULL;
    if (n && be->add_inplace(be, n, c, 1.0f)) tensor_free(n), n = NULL;
    tensor_free(c);
    t = n ? be->nchw_to_tokens(be, n) : NULL;
    tensor_free(n);
    out = t ? be->linear(be, t, W(lw), NULL) : NULL;
    tensor_free(t);
    return out;
#undef W
}

/* test_record's step function, and what it saw. */
typedef struct {
    backend *gpu;
    planning plan;
    const tensor *x; /* the step's input */
    const sequence_weights *sw;
    tensor *out[3];  /* the results of the calls: as called, planned, recorded */
    int calls;
    int64_t begun, recorded; /* memory in use as the recorded call began and ended */
} record_step;

static int record_step_forward(void *arg) {
    record_step *r = arg;
    backend *gpu = r->gpu;
    int call = r->calls++;
    if (call > 2) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "the step ran its function on a replay");
        return -1;
    }
    if (call == 2) gpu->memory(gpu, &r->begun, NULL);
    tensor *extra = call == 1 && r->plan == PLANNED_OTHERWISE
                        ? gpu->new_tensor(gpu, 1, (int64_t[]){77}) : NULL;
    r->out[call] = sequence(gpu, 1, r->x, r->sw);
    tensor_free(extra);
    if (call == 2) gpu->memory(gpu, &r->recorded, NULL);
    return r->out[call] ? 0 : -1;
}

/* A step (backend.h) runs its function as called, then as a planning
 * pass, then records it, and from then on replays the recording without
 * calling it: a replay on a new input gives what running the sequence on
 * that input gives, and its intermediate memory is not handed to tensors
 * made between replays. With a planning pass of the same sequence, the
 * recording's memory is the plan's arena; with a pass that allocates
 * something more first, the recording leaves the plan at once; on a
 * backend without plans, it takes memory from the cache. Either way the
 * results are the same, and all memory is back once the step and its
 * output are freed. */
static void test_record(const suite *s, planning plan) {
    const int64_t shape[4] = {2, 8, 6, 5};
    pair x = act(s, 4, shape, -1, 1), x2 = act(s, 4, shape, -1, 1);
    sequence_weights sw = sequence_weights_new(s);
    backend *gpu = s->gpu;
    record_step r = {.gpu = gpu, .plan = plan, .x = x.g, .sw = &sw};
    tensor *want = NULL;
    int64_t before, after;
    CHECK(sdx4_step_replays(gpu), "%s: the backend replays steps", s->mode);
    backend_step *step = sdx4_step_new(gpu);
    CHECK(step != NULL, "%s: step_new: %s", s->mode, sdx4_last_error());
    if (!step) return;
    /* the first run chooses the algorithms */
    CHECK(!sdx4_step_run(gpu, step, record_step_forward, &r), "%s: first run: %s", s->mode,
          sdx4_last_error());
    tensor_free(r.out[0]);
    gpu->memory(gpu, &before, NULL);
    CHECK(!sdx4_step_run(gpu, step, record_step_forward, &r), "%s: planning pass: %s", s->mode,
          sdx4_last_error());
    tensor_free(r.out[1]);
    CHECK(!sdx4_step_run(gpu, step, record_step_forward, &r), "%s: recorded run: %s", s->mode,
          sdx4_last_error());
    tensor *y = r.out[2];
    CHECK(r.calls == 3 && y, "%s: %d calls of the step's function", s->mode, r.calls);
    /* a plan's arena is taken at record_begin; a recording that follows
     * the plan takes every buffer from it, so it counts nothing more */
    CHECK((r.begun > before) == (plan != UNPLANNED), "%s, plan %d: %" PRId64 " -> %" PRId64
          " bytes at record_begin", s->mode, (int)plan, before, r.begun);
    CHECK((r.recorded == r.begun) == (plan == PLANNED), "%s, plan %d: %" PRId64 " -> %" PRId64
          " bytes while recording", s->mode, (int)plan, r.begun, r.recorded);
    if (y) {
        /* new input in the step's input tensor; a tensor made now must
         * not share memory with the replay's intermediates */
        float *h2 = fetch(s->cpu, x2.c);
        CHECK(!gpu->upload(gpu, x.g, h2), "upload: %s", sdx4_last_error());
        pair other = act(s, 4, shape, 5, 6);
        CHECK(!sdx4_step_run(gpu, step, record_step_forward, &r), "%s: replay: %s", s->mode,
              sdx4_last_error());
        want = sequence(s->cpu, 0, x2.c, &sw);
        expect_close(s, "recorded sequence, replayed", y, want, s->tol);
        expect_close(s, "tensor made between replays", other.g, other.c, 0);
        CHECK(!sdx4_step_run(gpu, step, record_step_forward, &r), "%s: second replay: %s", s->mode,
              sdx4_last_error());
        expect_close(s, "recorded sequence, replayed again", y, want, s->tol);
        CHECK(r.calls == 3, "%s: the replays called the step's function", s->mode);
        pair_free(&other);
        free(h2);
    }
    sdx4_step_free(gpu, step);
    tensor_free(y), tensor_free(want);
    gpu->memory(gpu, &after, NULL);
    CHECK(after == before, "%s, plan %d: %" PRId64 " bytes in use after freeing the step, %" PRId64
          " before", s->mode, (int)plan, after, before);
    pair_free(&x), pair_free(&x2);
    sequence_weights_free(&sw);
}

/* test_step_as_called's step function. */
typedef struct {
    backend *gpu;
    const tensor *x;
    const sequence_weights *sw;
    tensor *y;
    int calls;
} plain_step;

static int plain_step_forward(void *arg) {
    plain_step *p = arg;
    p->calls++;
    tensor_free(p->y);
    p->y = sequence(p->gpu, 1, p->x, p->sw);
    return p->y ? 0 : -1;
}

/* With graphs off (no_graphs), every run of a step calls its function,
 * on the input of that run. */
static void test_step_as_called(const suite *s) {
    const int64_t shape[4] = {1, 8, 5, 4};
    pair x = act(s, 4, shape, -1, 1);
    sequence_weights sw = sequence_weights_new(s);
    plain_step p = {.gpu = s->gpu, .x = x.g, .sw = &sw};
    CHECK(!sdx4_step_replays(s->gpu), "%s: steps replayed with graphs off", s->mode);
    backend_step *step = sdx4_step_new(s->gpu);
    CHECK(step != NULL, "%s: step_new: %s", s->mode, sdx4_last_error());
    for (int i = 0; step && i < 4; i++) {
        float *h = suite_values(s, tensor_numel(x.c), -1, 1);
        CHECK(!s->cpu->upload(s->cpu, x.c, h) && !s->gpu->upload(s->gpu, x.g, h), "upload: %s",
              sdx4_last_error());
        free(h);
        CHECK(!sdx4_step_run(s->gpu, step, plain_step_forward, &p), "%s: run %d: %s", s->mode, i,
              sdx4_last_error());
        tensor *want = sequence(s->cpu, 0, x.c, &sw);
        expect_close(s, "step run as called", p.y, want, s->tol);
        tensor_free(want);
    }
    CHECK(p.calls == 4, "%s: %d calls in 4 runs", s->mode, p.calls);
    sdx4_step_free(s->gpu, step);
    tensor_free(p.y);
    pair_free(&x);
    sequence_weights_free(&sw);
}

static void test_memory(backend *gpu) {
    int64_t before, now, peak;
    gpu->memory(gpu, &before, &peak);
    tensor *t = gpu->new_tensor(gpu, 2, (int64_t[]){1000, 1000});
    CHECK(t != NULL, "new_tensor: %s", sdx4_last_error());
    gpu->memory(gpu, &now, &peak);
    CHECK(t && now - before >= 1000000 * (int64_t)dtype_size(t->type),
          "memory: %" PRId64 " -> %" PRId64 " after a 1e6-element tensor", before, now);
    CHECK(peak >= now, "memory: peak %" PRId64 " < in use %" PRId64, peak, now);
    tensor_free(t);
    gpu->memory(gpu, &now, NULL);
    CHECK(now == before, "memory: %" PRId64 " in use after freeing, %" PRId64 " before", now,
          before);
    /* a reused block: the same size class comes back from the cache */
    t = gpu->new_tensor(gpu, 2, (int64_t[]){999, 1000});
    CHECK(t != NULL, "new_tensor again: %s", sdx4_last_error());
    tensor_free(t);

    /* more than any GPU has: an error, and the backend still works */
    t = gpu->new_tensor(gpu, 2, (int64_t[]){(int64_t)1 << 22, (int64_t)1 << 22});
    CHECK(t == NULL && sdx4_error_status() == SDX4_ERR_NO_MEMORY, "64 TiB tensor: %s",
          t ? "allocated" : sdx4_last_error());
    tensor_free(t);
    float one = 1.5f, back = 0;
    t = gpu->new_tensor(gpu, 1, (int64_t[]){1});
    CHECK(t && !gpu->upload(gpu, t, &one) && !gpu->download(gpu, t, &back) && back == 1.5f,
          "after out of memory: %s", sdx4_last_error());
    tensor_free(t);
}

static void expect_error(tensor *t, sdx4_status status, const char *needle) {
    CHECK(t == NULL, "expected an error containing \"%s\"", needle);
    CHECK(sdx4_error_status() == status, "status %d, expected %d (%s)", sdx4_error_status(), status,
          sdx4_last_error());
    CHECK(strstr(sdx4_last_error(), needle) != NULL, "message \"%s\" lacks \"%s\"",
          sdx4_last_error(), needle);
    tensor_free(t);
}

static void test_errors(backend *gpu, backend *cpu) {
    tensor *x = gpu->new_tensor(gpu, 3, (int64_t[]){1, 4, 8});
    tensor *w = gpu->new_tensor(gpu, 2, (int64_t[]){3, 7});
    tensor *big = gpu->new_tensor(gpu, 3, (int64_t[]){1, 2, 1024});
    tensor *on_cpu = cpu->new_tensor(cpu, 2, (int64_t[]){3, 8});
    expect_error(gpu->linear(gpu, x, w, NULL), SDX4_ERR_INVALID_ARGUMENT, "8 features");
    expect_error(gpu->linear(gpu, x, on_cpu, NULL), SDX4_ERR_INVALID_ARGUMENT, "another backend");
    expect_error(gpu->attention(gpu, big, big, big, 1, 0), SDX4_ERR_INVALID_ARGUMENT,
                 "head dimension 1024");
    expect_error(gpu->attention(gpu, x, x, x, 3, 0), SDX4_ERR_INVALID_ARGUMENT, "3 heads");
    expect_error(gpu->embedding(gpu, w, (const int32_t[]){0, 3}, 2), SDX4_ERR_INVALID_ARGUMENT,
                 "id 3 at position 1");
    expect_error(gpu->group_norm(gpu, x, 3, w, w, 1e-5f, ACT_NONE), SDX4_ERR_INVALID_ARGUMENT,
                 "4 channels do not split into 3 groups");
    expect_error(gpu->upsample_nearest(gpu, big, 2, 2), SDX4_ERR_INVALID_ARGUMENT,
                 "expected 4 dimensions");
    expect_error(gpu->tokens_to_nchw(gpu, x, 3, 3), SDX4_ERR_INVALID_ARGUMENT, "not 3x3");
    expect_error(gpu->new_tensor(gpu, 5, (int64_t[]){1, 1, 1, 1, 1}), SDX4_ERR_INVALID_ARGUMENT,
                 "5 dimensions");
    CHECK(gpu->add_inplace(gpu, x, w, 1.0f) == -1 && strstr(sdx4_last_error(), "differ"),
          "add of different shapes: %s", sdx4_last_error());
    CHECK(cpu->set_activation_type == NULL, "the cpu backend computes in float32 only");
    tensor_free(x), tensor_free(w), tensor_free(big), tensor_free(on_cpu);
}

/* Two threads run linears on one backend at once; each checks its own. */
typedef struct {
    const suite *s;
    int failures;
} thread_job;

static void *thread_main(void *arg) {
    thread_job *job = arg;
    const suite *s = job->s;
    int64_t N = 64, K = 256;
    for (int round = 0; round < 20; round++) {
        float *xh = rand_half(33 * K, -1, 1), *wh = rand_half(N * K, -1, 1);
        tensor *x = s->gpu->new_tensor(s->gpu, 2, (int64_t[]){33, K});
        tensor *w = s->gpu->new_tensor(s->gpu, 2, (int64_t[]){N, K});
        tensor *y = NULL;
        float *got = malloc(33 * N * sizeof *got);
        if (!x || !w || s->gpu->upload(s->gpu, x, xh) || s->gpu->upload(s->gpu, w, wh) ||
            !(y = s->gpu->linear(s->gpu, x, w, NULL)) || s->gpu->download(s->gpu, y, got)) {
            job->failures++;
        } else {
            for (int m = 0; m < 33; m++)
                for (int n = 0; n < N; n++) {
                    double ref = 0;
                    for (int k = 0; k < K; k++) ref += (double)xh[m * K + k] * wh[n * K + k];
                    if (!(fabs(got[m * N + n] - ref) <= 0.1)) job->failures++;
                }
        }
        tensor_free(x), tensor_free(w), tensor_free(y);
        free(xh), free(wh), free(got);
    }
    return NULL;
}

static void test_threads(const suite *s) {
    pthread_t threads[2];
    thread_job jobs[2] = {{s, 0}, {s, 0}};
    for (int i = 0; i < 2; i++) pthread_create(&threads[i], NULL, thread_main, &jobs[i]);
    for (int i = 0; i < 2; i++) pthread_join(threads[i], NULL);
    CHECK(jobs[0].failures == 0 && jobs[1].failures == 0, "%s: threads: %d and %d wrong values",
          s->mode, jobs[0].failures, jobs[1].failures);
}

/* ------------------------------------------------------------------ main */

/* A CUDA backend with the settings `o` asks for, as the engine opens one;
 * without the plan cache unless `o` names one, so that every backend
 * times its choices and the user's cache stays untouched. */
static backend *open_cuda(sdx4_cuda_options o) {
    if (!o.plan_cache) o.plan_cache = "off";
    cuda_settings settings;
    if (sdx4_cuda_settings_parse(&o, &settings)) return NULL;
    return sdx4_backend_cuda_create(0, &settings);
}

/* Runs convolutions of several kinds (legacy and graph-API choices, the
 * bias fused or not, a residual, stride 2, widened channels) and a linear
 * layer on a backend with plan cache `path`, all on the same inputs;
 * their results into out[i] (malloc'd), and how many in *n. */
#define CACHE_OPS 6
static void run_cached_ops(const char *mode, const char *path, float *out[CACHE_OPS]) {
    backend *gpu = open_cuda((sdx4_cuda_options){.dtype = mode, .plan_cache = path});
    CHECK(gpu != NULL, "backend with plan cache %s: %s", path, sdx4_last_error());
    if (!gpu) return;
    rng = 0x9E3779B97F4A7C15ull; /* the same inputs every time */
    const int64_t xs[4] = {2, 64, 16, 16}, ws[4] = {64, 64, 3, 3}, narrow[4] = {1, 3, 9, 7},
                  nw[4] = {8, 3, 3, 3}, ls[2] = {77, 64}, lw[2] = {128, 64}, O = 64, NO = 8;
    float *hx = rand_half(numel(4, xs), -1, 1), *hw = rand_half(numel(4, ws), -1, 1),
          *hb = rand_half(O, -1, 1), *hn = rand_half(numel(4, narrow), -1, 1),
          *hnw = rand_half(numel(4, nw), -1, 1), *hl = rand_half(numel(2, ls), -1, 1),
          *hlw = rand_half(numel(2, lw), -1, 1);
    tensor *x = must(gpu->new_tensor(gpu, 4, xs), "new_tensor"),
           *n = must(gpu->new_tensor(gpu, 4, narrow), "new_tensor"),
           *l = must(gpu->new_tensor(gpu, 2, ls), "new_tensor");
    if (gpu->upload(gpu, x, hx) || gpu->upload(gpu, n, hn) || gpu->upload(gpu, l, hl)) exit(1);
    tensor *w = must(gpu->weight(gpu, hw, DTYPE_F32, 4, ws), "weight"),
           *b = must(gpu->weight(gpu, hb, DTYPE_F32, 1, &O), "weight"),
           *wn = must(gpu->weight(gpu, hnw, DTYPE_F32, 4, nw), "weight"),
           *bn = must(gpu->weight(gpu, hb, DTYPE_F32, 1, &NO), "weight"),
           *lwt = must(gpu->weight(gpu, hlw, DTYPE_F32, 2, lw), "weight");
    tensor *y[CACHE_OPS] = {
        must(gpu->conv2d(gpu, x, w, b, 1, 1), "conv2d +bias"),
        must(gpu->conv2d(gpu, x, w, NULL, 1, 1), "conv2d"),
        must(gpu->conv2d_add(gpu, x, w, b, 1, 1, x), "conv2d_add"),
        must(gpu->conv2d(gpu, x, w, b, 2, 1), "conv2d stride 2"),
        must(gpu->conv2d(gpu, n, wn, bn, 1, 1), "conv2d widened"),
        must(gpu->linear(gpu, l, lwt, NULL), "linear"),
    };
    for (int i = 0; i < CACHE_OPS; i++) {
        out[i] = fetch(gpu, y[i]);
        tensor_free(y[i]);
    }
    tensor_free(x), tensor_free(n), tensor_free(l), tensor_free(w), tensor_free(b);
    tensor_free(wn), tensor_free(bn), tensor_free(lwt);
    free(hx), free(hw), free(hb), free(hn), free(hnw), free(hl), free(hlw);
    gpu->destroy(gpu);
}

/* The plan cache (cuda_internal.h): the first backend times its choices
 * and writes them, the second takes them from the file and must compute
 * the very same bits; a damaged file is a warning, and the backend times
 * again and computes the same too. */
static void test_plan_cache(const char *mode) {
    char path[] = "/tmp/test_backend_cuda_plans.XXXXXX";
    int fd = mkstemp(path);
    if (fd >= 0) close(fd);
    unlink(path); /* a fresh name: the first backend finds no file */
    float *timed[CACHE_OPS] = {NULL}, *cached[CACHE_OPS] = {NULL}, *again[CACHE_OPS] = {NULL};
    const int64_t sizes[CACHE_OPS] = {2 * 64 * 16 * 16, 2 * 64 * 16 * 16, 2 * 64 * 16 * 16,
                                      2 * 64 * 8 * 8, 8 * 9 * 7, 77 * 128};
    run_cached_ops(mode, path, timed);
    struct stat st;
    CHECK(stat(path, &st) == 0 && st.st_size > 100, "%s: the plan cache was written", mode);
    plan_cache *c = sdx4_plan_cache_open(path, "a device of no record");
    CHECK(c && sdx4_plan_cache_records(c) >= CACHE_OPS, "%s: %d records", mode,
          c ? sdx4_plan_cache_records(c) : -1);
    sdx4_plan_cache_close(c);
    run_cached_ops(mode, path, cached);
    FILE *f = fopen(path, "r+b"); /* damaged: its checksum fails */
    if (f) {
        fseek(f, 40, SEEK_SET);
        fputc('!', f);
        fclose(f);
    }
    run_cached_ops(mode, path, again);
    for (int i = 0; i < CACHE_OPS; i++) {
        CHECK(timed[i] && cached[i] &&
                  !memcmp(timed[i], cached[i], (size_t)sizes[i] * sizeof(float)),
              "%s: operation %d computes the same with its choice from the file", mode, i);
        double scale = 0;
        for (int64_t j = 0; timed[i] && j < sizes[i]; j++)
            scale = fmax(scale, fabs((double)timed[i][j]));
        CHECK(timed[i] && again[i] &&
                  max_abs_diff(timed[i], again[i], (size_t)sizes[i]) <= TOL_FP16 * scale,
              "%s: operation %d after a damaged file", mode, i);
        free(timed[i]), free(cached[i]), free(again[i]);
    }
    unlink(path);
}

/* A step recorded without a planning pass, on a backend without plans. */
static void test_unplanned(backend *cpu, const char *mode, double tol, dtype act) {
    backend *gpu = open_cuda((sdx4_cuda_options){.dtype = mode, .no_plans = 1});
    CHECK(gpu != NULL, "%s backend without plans: %s", mode, sdx4_last_error());
    if (!gpu) return;
    suite s = {cpu, gpu, mode, tol, act};
    test_record(&s, UNPLANNED);
    gpu->destroy(gpu);
}

int main(void) {
    backend *cpu = sdx4_backend_cpu_create(1);
    backend *gpu = open_cuda((sdx4_cuda_options){.dtype = "fp32", .conv = "cudnn"});
    if (!gpu) {
        printf("test_backend_cuda: skipped: %s\n", sdx4_last_error());
        cpu->destroy(cpu);
        return 77;
    }
    printf("device: %s\n", gpu->description);
    CHECK(strstr(gpu->description, "fp32") != NULL, "description: %s", gpu->description);

    CHECK(gpu->set_activation_type(gpu, DTYPE_BF16) == DTYPE_F32 &&
              gpu->set_activation_type(gpu, DTYPE_F16) == DTYPE_F32 &&
              gpu->set_activation_type(gpu, DTYPE_F32) == DTYPE_F32,
          "fp32 mode stays in float whatever is asked");
    suite s = {cpu, gpu, "fp32", TOL_FP32, DTYPE_F32};
    test_all(&s);
    test_weight_types(&s);
    test_record(&s, PLANNED);
    test_record(&s, PLANNED_OTHERWISE);
    test_memory(gpu);
    test_errors(gpu, cpu);
    test_threads(&s);
    gpu->destroy(gpu);
    test_unplanned(cpu, "fp32", TOL_FP32, DTYPE_F32);
    /* graphs off: steps run as called */
    gpu = open_cuda((sdx4_cuda_options){.dtype = "fp32", .no_graphs = 1});
    CHECK(gpu != NULL, "fp32 backend without graphs: %s", sdx4_last_error());
    if (gpu) {
        s = (suite){cpu, gpu, "fp32", TOL_FP32, DTYPE_F32};
        test_step_as_called(&s);
        gpu->destroy(gpu);
    }

    gpu = open_cuda((sdx4_cuda_options){.dtype = "fp16", .conv = "cudnn"});
    CHECK(gpu != NULL, "fp16 backend: %s", sdx4_last_error());
    if (gpu) {
        printf("device: %s\n", gpu->description);
        s = (suite){cpu, gpu, "fp16", TOL_FP16, DTYPE_F16};
        test_all(&s);
        test_weight_types(&s);
        test_mixed_types(&s);
        test_record(&s, PLANNED);
        test_record(&s, PLANNED_OTHERWISE);
        test_memory(gpu);
        test_threads(&s);
        CHECK(gpu->set_activation_type(gpu, DTYPE_F32) == DTYPE_F16, "fp16 mode default");
        s = (suite){cpu, gpu, "fp16+f32", TOL_TF32, DTYPE_F32};
        test_all(&s);
        test_weight_types(&s);
        /* the VAE's bfloat16: fp16 weights meet bfloat16 tensors */
        CHECK(gpu->set_activation_type(gpu, DTYPE_BF16) == DTYPE_F32, "bf16 granted");
        s = (suite){cpu, gpu, "fp16+bf16", TOL_BF16, DTYPE_BF16};
        test_all(&s);
        test_record(&s, PLANNED);
        CHECK(gpu->set_activation_type(gpu, DTYPE_F16) == DTYPE_BF16, "precision restored");
        gpu->destroy(gpu);
    }
    test_unplanned(cpu, "fp16", TOL_FP16, DTYPE_F16);

    /* the im2col path of convolutions, used where cuDNN is missing */
    gpu = open_cuda((sdx4_cuda_options){.dtype = "fp32", .conv = "im2col"});
    CHECK(gpu != NULL, "im2col backend: %s", sdx4_last_error());
    if (gpu) {
        s = (suite){cpu, gpu, "im2col", TOL_FP32, DTYPE_F32};
        test_convs(&s);
        gpu->destroy(gpu);
    }
    gpu = open_cuda((sdx4_cuda_options){.dtype = "fp16", .conv = "im2col"});
    if (gpu) {
        s = (suite){cpu, gpu, "im2col16", TOL_FP16, DTYPE_F16};
        test_convs(&s);
        gpu->destroy(gpu);
    }
    /* cuDNN's graph API plans, kept where they agree even when slower, so
     * that their path runs whatever cuDNN's timings say: also recorded */
    gpu = open_cuda((sdx4_cuda_options){.dtype = "fp16", .conv = "cudnn-graph"});
    CHECK(gpu != NULL, "cudnn-graph backend: %s", sdx4_last_error());
    if (gpu) {
        s = (suite){cpu, gpu, "graph16", TOL_FP16, DTYPE_F16};
        test_convs(&s);
        test_record(&s, PLANNED);
        gpu->destroy(gpu);
    }

    test_plan_cache("fp16");
    test_plan_cache("fp32");

    /* and the legacy call alone: in fp16 mode the graph API takes the
     * shapes where it is faster, so the legacy call in half is tested here */
    gpu = open_cuda((sdx4_cuda_options){.dtype = "fp16", .conv = "cudnn-legacy"});
    CHECK(gpu != NULL, "cudnn-legacy backend: %s", sdx4_last_error());
    if (gpu) {
        s = (suite){cpu, gpu, "legacy16", TOL_FP16, DTYPE_F16};
        test_convs(&s);
        test_record(&s, PLANNED);
        gpu->destroy(gpu);
    }

    cpu->destroy(cpu);
    return test_finish("test_backend_cuda");
}

#endif
