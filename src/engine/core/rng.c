/*
 * rng.c - PyTorch's CPU generator: MT19937, torch.rand and torch.randn.
 *
 * See rng.h for the algorithm. Every float operation below stands for one
 * operation of PyTorch's kernel, in the same order; where the kernel is
 * vectorised (the AVX2 Box-Muller of 16 values) the scalar code here does
 * lane by lane what the vector instructions do, with an explicit fmaf()
 * where PyTorch's build fuses a multiply and an add. No expression here
 * pairs a product with a sum outside fmaf(), so the results do not depend
 * on whether this file's compiler contracts into FMA.
 */
#include "core/rng.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- MT19937 */

#define MT_M 397

void sdx4_torch_rng_seed(torch_rng *g, uint64_t seed) {
    g->state[0] = (uint32_t)seed; /* at::mt19937 keeps only the low 32 bits */
    for (uint32_t i = 1; i < TORCH_MT_N; i++)
        g->state[i] = 1812433253u * (g->state[i - 1] ^ (g->state[i - 1] >> 30)) + i;
    g->next = TORCH_MT_N; /* the first draw regenerates, as at::mt19937 does */
    g->has_cached_normal = 0;
    g->cached_normal = 0;
    g->ahead = NULL;
}

static void regenerate(torch_rng *g) {
    uint32_t *s = g->state;
    for (int i = 0; i < TORCH_MT_N; i++) {
        uint32_t y = (s[i] & 0x80000000u) | (s[(i + 1) % TORCH_MT_N] & 0x7fffffffu);
        s[i] = s[(i + MT_M) % TORCH_MT_N] ^ (y >> 1) ^ (y & 1 ? 0x9908b0dfu : 0);
    }
    g->next = 0;
}

uint32_t sdx4_torch_rng_u32(torch_rng *g) {
    if (g->next >= TORCH_MT_N) regenerate(g);
    uint32_t y = g->state[g->next++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

uint64_t sdx4_torch_rng_u64(torch_rng *g) {
    uint64_t hi = sdx4_torch_rng_u32(g);
    return hi << 32 | sdx4_torch_rng_u32(g);
}

/* ------------------------------------------------------------- uniforms */

/* at::uniform_real_distribution<float>(0, 1): 24 random bits. */
static float uniform_float(torch_rng *g) {
    return (float)(sdx4_torch_rng_u32(g) & 0xffffffu) * (1.0f / 16777216.0f);
}

/* at::uniform_real_distribution<double>(0, 1): 53 random bits. */
static double uniform_double(torch_rng *g) {
    return (double)(sdx4_torch_rng_u64(g) & ((UINT64_C(1) << 53) - 1)) * (1.0 / 9007199254740992.0);
}

void sdx4_torch_rand(torch_rng *g, float *out, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = uniform_float(g);
}

/* ------------------------------------------- scalar normals (n < 16) */

/* at::normal_distribution<double>: Box-Muller with the sine cached. */
static double normal_double(torch_rng *g) {
    if (g->has_cached_normal) {
        g->has_cached_normal = 0;
        return g->cached_normal;
    }
    double u1 = uniform_double(g);
    double u2 = uniform_double(g);
    double r = sqrt(-2.0 * log1p(-u2));
    double theta = 2.0 * M_PI * u1;
    g->cached_normal = r * sin(theta);
    g->has_cached_normal = 1;
    return r * cos(theta);
}

/* ------------------------------- vector Box-Muller (n >= 16, AVX2 kernel) */

static float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint32_t float_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* avx_mathfun's log256_ps for one lane, x in (0, 1]: x = m 2^e with m in
 * [sqrt(1/2), sqrt(2)), log(x) = log(m) + e log(2), log(m) by a degree-9
 * polynomial in m - 1 and log(2) split into two parts. The fmaf() calls are
 * where PyTorch's compiled kernel fuses a multiply into the next add (found
 * against the recorded values: every fusable pair is fused, the left
 * product when both operands are products). */
static inline __attribute__((always_inline)) float cephes_logf(float x) {
    uint32_t bits = float_to_bits(x);
    float e = (float)((int)(bits >> 23) - 0x7f) + 1.0f;
    float m = bits_to_float((bits & ~0x7f800000u) | 0x3f000000u); /* [0.5, 1) */
    float small = m < 0.707106781186547524f ? m : 0.0f;
    x = m - 1.0f;
    if (small != 0.0f) e -= 1.0f;
    x += small;

    float z = x * x;
    float y = 7.0376836292E-2f;
    y = fmaf(y, x, -1.1514610310E-1f);
    y = fmaf(y, x, 1.1676998740E-1f);
    y = fmaf(y, x, -1.2420140846E-1f);
    y = fmaf(y, x, 1.4249322787E-1f);
    y = fmaf(y, x, -1.6668057665E-1f);
    y = fmaf(y, x, 2.0000714765E-1f);
    y = fmaf(y, x, -2.4999993993E-1f);
    y = fmaf(y, x, 3.3333331174E-1f);
    y = y * x;
    y = fmaf(y, z, e * -2.12194440e-4f);
    y = fmaf(-z, 0.5f, y);
    x = x + y;
    return fmaf(e, 0.693359375f, x);
}

/* avx_mathfun's sincos256_ps for one lane, x >= 0: reduce by multiples of
 * pi/4 (pi split into three parts), then a sine and a cosine polynomial,
 * each result taking whichever the octant calls for. Fused as above. */
static inline __attribute__((always_inline)) void cephes_sincosf(float x, float *s, float *c) {
    int j = (int)(x * 1.27323954473516f); /* 4 / pi, truncated */
    j = (j + 1) & ~1;
    float y = (float)j;
    uint32_t sign_sin = (uint32_t)(j & 4) << 29;
    uint32_t sign_cos = (uint32_t)(~(j - 2) & 4) << 29;
    int sine_poly_is_sine = (j & 2) == 0;

    x = fmaf(y, -0.78515625f, x);
    x = fmaf(y, -2.4187564849853515625e-4f, x);
    x = fmaf(y, -3.77489497744594108e-8f, x);

    float z = x * x;
    float yc = 2.443315711809948E-005f;
    yc = fmaf(yc, z, -1.388731625493765E-003f);
    yc = fmaf(yc, z, 4.166664568298827E-002f);
    yc = yc * z;
    yc = fmaf(yc, z, -(z * 0.5f));
    yc = yc + 1.0f;

    float ys = -1.9515295891E-4f;
    ys = fmaf(ys, z, 8.3321608736E-3f);
    ys = fmaf(ys, z, -1.6666654611E-1f);
    ys = ys * z;
    ys = fmaf(ys, x, x);

    /* the kernel selects with masks and adds a zero: keep its +0 for -0 */
    float sin_part = sine_poly_is_sine ? ys : 0.0f, cos_part = sine_poly_is_sine ? 0.0f : yc;
    *s = bits_to_float(float_to_bits(cos_part + sin_part) ^ sign_sin);
    *c = bits_to_float(float_to_bits((yc - cos_part) + (ys - sin_part)) ^ sign_cos);
}

/* normal_fill_16_AVX2: data[0..16) uniforms in, normals out. */
static inline __attribute__((always_inline)) void box_muller_16(float *data) {
    const float two_pi = (float)(2.0 * M_PI);
    for (int j = 0; j < 8; j++) {
        float u1 = 1.0f - data[j]; /* [0, 1) -> (0, 1] for the log */
        float u2 = data[j + 8];
        float radius = sqrtf(-2.0f * cephes_logf(u1));
        float sin_t, cos_t;
        cephes_sincosf(two_pi * u2, &sin_t, &cos_t);
        data[j] = radius * cos_t;
        data[j + 8] = radius * sin_t;
    }
}

/* Box-Muller over data[0..n), n a multiple of 16. Built twice on x86-64
 * and chosen when called: with FMA instructions, where fmaf() is one
 * instruction (machines that run PyTorch's AVX2 kernel have them; 3x
 * faster here), and for any x86-64, where fmaf() is a call into libm.
 * fmaf() is exact either way, so both give the same bits. (A branch, not
 * target_clones: an ifunc resolver runs before ThreadSanitizer starts.) */
static void box_muller_all(float *data, size_t n) {
    for (size_t i = 0; i < n; i += 16) box_muller_16(data + i);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("fma"))) static void box_muller_all_fma(float *data, size_t n) {
    for (size_t i = 0; i < n; i += 16) box_muller_16(data + i);
}

static void normals_from_uniforms(float *data, size_t n) {
    if (__builtin_cpu_supports("fma")) box_muller_all_fma(data, n);
    else box_muller_all(data, n);
}
#else
static void normals_from_uniforms(float *data, size_t n) { box_muller_all(data, n); }
#endif

static void randn_now(torch_rng *g, float *out, size_t n) {
    if (n < 16) {
        for (size_t i = 0; i < n; i++) out[i] = (float)normal_double(g);
        return;
    }
    for (size_t i = 0; i < n; i++) out[i] = uniform_float(g);
    normals_from_uniforms(out, n - n % 16);
    if (n % 16) { /* the tail: redraw and redo the last 16 */
        float *tail = out + n - 16;
        for (int i = 0; i < 16; i++) tail[i] = uniform_float(g);
        normals_from_uniforms(tail, 16);
    }
}

/* ------------------------------------------------------- drawing ahead */

struct randn_ahead {
    pthread_mutex_t lock;
    pthread_cond_t changed;
    pthread_t thread;
    int asked, ready, quit;  /* a block is asked for / drawn and waiting */
    torch_rng from, after;   /* the state the block starts from, and after it */
    float *block;
    size_t n, capacity;
};

/* Whether two generators are at the same point of the same stream. */
static int same_state(const torch_rng *a, const torch_rng *b) {
    return a->next == b->next && a->has_cached_normal == b->has_cached_normal &&
           (!a->has_cached_normal || a->cached_normal == b->cached_normal) &&
           !memcmp(a->state, b->state, sizeof a->state);
}

static void *draw_ahead_thread(void *arg) {
    struct randn_ahead *a = arg;
    pthread_mutex_lock(&a->lock);
    for (;;) {
        while (!a->asked && !a->quit) pthread_cond_wait(&a->changed, &a->lock);
        if (a->quit) break;
        /* the block and the states are this thread's until it clears asked */
        pthread_mutex_unlock(&a->lock);
        a->after = a->from;
        randn_now(&a->after, a->block, a->n);
        pthread_mutex_lock(&a->lock);
        a->asked = 0;
        a->ready = 1;
        pthread_cond_broadcast(&a->changed);
    }
    pthread_mutex_unlock(&a->lock);
    return NULL;
}

/* The block drawn ahead, if it is randn(n) from g's state: into out, and g
 * moves past it. Waits for a block still being drawn. */
static int take_ahead(struct randn_ahead *a, torch_rng *g, float *out, size_t n) {
    pthread_mutex_lock(&a->lock);
    while (a->asked) pthread_cond_wait(&a->changed, &a->lock);
    int hit = a->ready && a->n == n && same_state(&a->from, g);
    if (hit) {
        memcpy(out, a->block, n * sizeof *out);
        struct randn_ahead *keep = g->ahead;
        *g = a->after;
        g->ahead = keep;
    }
    a->ready = 0;
    pthread_mutex_unlock(&a->lock);
    return hit;
}

/* Asks the thread for randn(n) from g's state; none when the block's
 * memory cannot grow (the draw then happens when asked, as without). */
static void ask_ahead(struct randn_ahead *a, const torch_rng *g, size_t n) {
    pthread_mutex_lock(&a->lock);
    if (n > a->capacity) {
        float *grown = realloc(a->block, n * sizeof *grown);
        if (!grown) {
            pthread_mutex_unlock(&a->lock);
            return;
        }
        a->block = grown;
        a->capacity = n;
    }
    a->from = *g;
    a->from.ahead = NULL;
    a->n = n;
    a->asked = 1;
    pthread_cond_broadcast(&a->changed);
    pthread_mutex_unlock(&a->lock);
}

void sdx4_torch_randn(torch_rng *g, float *out, size_t n) {
    if (!g->ahead || !take_ahead(g->ahead, g, out, n)) randn_now(g, out, n);
    if (g->ahead && n >= 16) ask_ahead(g->ahead, g, n);
}

int sdx4_torch_rng_draw_ahead(torch_rng *g) {
    if (g->ahead) return 0;
    struct randn_ahead *a = calloc(1, sizeof *a);
    if (!a) return -1;
    pthread_mutex_init(&a->lock, NULL);
    pthread_cond_init(&a->changed, NULL);
    if (pthread_create(&a->thread, NULL, draw_ahead_thread, a)) {
        pthread_cond_destroy(&a->changed);
        pthread_mutex_destroy(&a->lock);
        free(a);
        return -1;
    }
    g->ahead = a;
    return 0;
}

void sdx4_torch_rng_stop_ahead(torch_rng *g) {
    struct randn_ahead *a = g->ahead;
    if (!a) return;
    pthread_mutex_lock(&a->lock);
    a->quit = 1;
    pthread_cond_broadcast(&a->changed);
    pthread_mutex_unlock(&a->lock);
    pthread_join(a->thread, NULL);
    pthread_cond_destroy(&a->changed);
    pthread_mutex_destroy(&a->lock);
    free(a->block);
    free(a);
    g->ahead = NULL;
}
