/*
 * test_rng.c - torch_rng against torch.randn / torch.rand recorded by
 * PyTorch (reference/torch_randn.safetensors).
 *
 * For every case in the file's metadata "keys" ("seed0_17", ...): a fresh
 * generator seeded with the case's seed draws `_first` then `_second` with
 * the recorded shape, so both paths of randn (n < 16 with its cached
 * Box-Muller sample, n >= 16 with its redrawn tail) and the state carried
 * between two calls are covered. Then torch.rand for each seed.
 */
#include <jansson.h>
#include <stdint.h>
#include <string.h>

#include "core/rng.h"
#include "core/safetensors.h"
#include "sdx4.h"
#include "test.h"

static size_t numel(const st_tensor *t) {
    size_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
    return n;
}

/* Draws n values with `draw` and compares with the tensor `name`. */
static void check_draw(const st_file *f, const char *name, torch_rng *g,
                       void (*draw)(torch_rng *, float *, size_t)) {
    const st_tensor *t = sdx4_st_find(f, name);
    CHECK(t && t->type == DTYPE_F32, "%s missing or not F32", name);
    if (!t || t->type != DTYPE_F32) return;
    size_t n = numel(t);
    float *want = malloc(n * sizeof *want), *got = malloc(n * sizeof *got);
    dtype_to_f32(t->type, t->data, want, n);
    draw(g, got, n);
    double err = max_abs_diff(got, want, n);
    size_t differing = 0;
    for (size_t i = 0; i < n; i++) differing += got[i] != want[i];
    CHECK(err <= 1e-5, "%s: max abs diff %g", name, err);
    printf("%-28s n=%-5zu max abs diff %.3g, %zu of %zu values not bit-identical\n",
           name, n, err, differing, n);
    free(want);
    free(got);
}

/* MT19937's published check value: the 10000th output for the default
 * seed 5489 is 4123659995 (C++11 [rand.predef]). */
static void check_mt19937(void) {
    torch_rng g;
    sdx4_torch_rng_seed(&g, 5489);
    uint32_t v = 0;
    for (int i = 0; i < 10000; i++) v = sdx4_torch_rng_u32(&g);
    CHECK(v == 4123659995u, "10000th output %u", v);
}

/* The pipeline goldens record diffusers' first two draws from
 * Generator("cpu").manual_seed(case seed): the low-res image noise, then
 * the initial latents. */
static void check_pipeline_noise(void) {
    static const char *const runs[] = {"tiny/golden/pipe0", "small/golden/pipe0",
                                       "small/golden/pipe1", "small/golden/pipe2"};
    for (int r = 0; r < 4; r++) {
        char rel[128];
        snprintf(rel, sizeof rel, "%s.safetensors", runs[r]);
        st_file f;
        if (sdx4_st_open(&f, test_ref(rel))) {
            printf("%s: skipped (%s)\n", rel, sdx4_last_error());
            continue;
        }
        char *case_text = sdx4_st_metadata(&f, "case");
        json_t *c = case_text ? json_loads(case_text, 0, NULL) : NULL;
        json_t *seed = json_object_get(c, "seed");
        CHECK(json_is_integer(seed), "%s: no seed in metadata case", rel);
        if (json_is_integer(seed)) {
            torch_rng g;
            sdx4_torch_rng_seed(&g, (uint64_t)json_integer_value(seed));
            printf("%s (seed %lld):\n", runs[r], (long long)json_integer_value(seed));
            check_draw(&f, "image_noise", &g, sdx4_torch_randn);
            check_draw(&f, "initial_latents", &g, sdx4_torch_randn);
        }
        json_decref(c);
        free(case_text);
        sdx4_st_close(&f);
    }
}

/* Corners the golden file does not have, printed by torch 2.15.0 (CPU):
 * torch.randn(shape, generator=torch.Generator().manual_seed(seed)). */
static void check_corners(void) {
    torch_rng g;
    float v[32], w[32];
    sdx4_torch_rng_seed(&g, 3); /* one scalar draw */
    sdx4_torch_randn(&g, v, 1);
    CHECK(v[0] == 0.803276062f, "randn(1) %.9g", v[0]);
    sdx4_torch_rng_seed(&g, 3); /* 15: the last size of the scalar path */
    sdx4_torch_randn(&g, v, 15);
    CHECK(v[0] == 0.803276062f && v[14] == 0.419218659f, "randn(15) %.9g %.9g", v[0], v[14]);
    sdx4_torch_rng_seed(&g, 3); /* 31: the redrawn tail overlaps the first 16 */
    sdx4_torch_randn(&g, v, 31);
    CHECK(v[0] == -0.076644294f && v[14] == 0.573984683f && v[15] == -1.80536449f &&
              v[30] == 0.65891391f, "randn(31) %.9g %.9g %.9g %.9g", v[0], v[14], v[15], v[30]);
    sdx4_torch_rng_seed(&g, (UINT64_C(1) << 32) + 5); /* only the low 32 bits seed */
    sdx4_torch_randn(&g, v, 20);
    CHECK(v[0] == 1.84232986f && v[19] == -1.50694036f, "seed 2^32+5: %.9g %.9g", v[0], v[19]);
    /* the cached sample of randn(3) outlives a vector-path randn(32) */
    sdx4_torch_rng_seed(&g, 11);
    sdx4_torch_randn(&g, v, 3);
    sdx4_torch_randn(&g, w, 32);
    sdx4_torch_randn(&g, v + 3, 1);
    CHECK(v[2] == -0.699541628f && w[31] == 0.22552748f && v[3] == -1.30229735f,
          "cache across calls: %.9g %.9g %.9g", v[2], w[31], v[3]);
}

/* A generator drawing ahead gives the numbers one that does not gives,
 * whatever comes between two randn of the same size: the block drawn ahead
 * taken, dropped for another size, or dropped after a rand or a scalar
 * normal moved the state. */
static void check_draw_ahead(void) {
    static const size_t sizes[] = {4096, 4096, 3, 4096, 4096, 100, 4096, 17, 17, 4096};
    torch_rng plain, ahead;
    sdx4_torch_rng_seed(&plain, 42);
    sdx4_torch_rng_seed(&ahead, 42);
    CHECK(sdx4_torch_rng_draw_ahead(&ahead) == 0 && ahead.ahead, "no thread to draw ahead");
    float want[4096], got[4096];
    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
        if (k == 4) { /* a rand between two randn(4096) */
            sdx4_torch_rand(&plain, want, 5);
            sdx4_torch_rand(&ahead, got, 5);
        }
        sdx4_torch_randn(&plain, want, sizes[k]);
        sdx4_torch_randn(&ahead, got, sizes[k]);
        CHECK(!memcmp(want, got, sizes[k] * sizeof *got), "draw %zu (randn(%zu)) differs", k, sizes[k]);
    }
    sdx4_torch_rng_stop_ahead(&ahead);
    CHECK(!ahead.ahead, "stop_ahead left the thread");
    sdx4_torch_randn(&plain, want, 64); /* and it goes on as a plain generator */
    sdx4_torch_randn(&ahead, got, 64);
    CHECK(!memcmp(want, got, sizeof got[0] * 64), "after stop_ahead");
}

int main(void) {
    check_mt19937();
    check_corners();
    check_draw_ahead();
    check_pipeline_noise();

    st_file f;
    if (sdx4_st_open(&f, test_ref("torch_randn.safetensors"))) {
        fprintf(stderr, "skip: %s\n", sdx4_last_error());
        return 77;
    }
    char *keys_text = sdx4_st_metadata(&f, "keys");
    json_t *keys = keys_text ? json_loads(keys_text, 0, NULL) : NULL;
    CHECK(json_is_array(keys) && json_array_size(keys) > 0, "metadata keys: %s",
          keys_text ? keys_text : "(missing)");

    size_t i;
    json_t *k;
    json_array_foreach(keys, i, k) {
        const char *key = json_string_value(k);
        unsigned long long seed;
        CHECK(key && sscanf(key, "seed%llu_", &seed) == 1, "bad key");
        if (!key || sscanf(key, "seed%llu_", &seed) != 1) continue;
        char name[256];
        torch_rng g;
        sdx4_torch_rng_seed(&g, seed);
        snprintf(name, sizeof name, "%s_first", key);
        check_draw(&f, name, &g, sdx4_torch_randn);
        snprintf(name, sizeof name, "%s_second", key);
        check_draw(&f, name, &g, sdx4_torch_randn);
    }
    const unsigned long long rand_seeds[] = {0, 1234};
    for (int s = 0; s < 2; s++) {
        char name[64];
        torch_rng g;
        sdx4_torch_rng_seed(&g, rand_seeds[s]);
        snprintf(name, sizeof name, "seed%llu_rand_1x4x8x8", rand_seeds[s]);
        check_draw(&f, name, &g, sdx4_torch_rand);
    }

    /* Reseeding drops the cached Box-Muller sample: after an odd scalar
     * draw, manual_seed again must replay the first draw exactly. */
    torch_rng g;
    float a[5], b[5];
    sdx4_torch_rng_seed(&g, 7);
    sdx4_torch_randn(&g, a, 5);
    sdx4_torch_rng_seed(&g, 7);
    sdx4_torch_randn(&g, b, 5);
    CHECK(!memcmp(a, b, sizeof a), "reseed did not reset the generator");

    json_decref(keys);
    free(keys_text);
    sdx4_st_close(&f);
    return test_finish("test_rng");
}
