/*
 * test_safety.c - the content check (model/safety_checker.h, sdx4_safety_*)
 * against diffusers' StableDiffusionSafetyChecker, and its refusals.
 *
 * Goldens: tests/data/safety (tools/safety_goldens.py): a random-weight
 * checker of the real shape family, five images, and what diffusers and
 * transformers compute for them: the preprocessed pixels (some rows), the
 * pooled output, the projected embeddings, the cosines and the decisions
 * (image 0 flagged by a concept, image 2 only through the special-care
 * adjustment, the others not).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/safetensors.h"
#include "engine_internal.h"
#include "model/safety_checker.h"
#include "test.h"

#ifndef SDX4_NO_IMAGEIO
#include "imageio.h"

#define DATA SDX4_SOURCE_DIR "/tests/data/safety/"
#define NIMAGES 5
static const int golden_rows[] = {0, 1, 111, 112, 223}; /* pixel_values_rows */

/* SDX4_TEST_DEVICE=cuda runs the check on the GPU (test.h). */
static sdx4_status try_open(const char *dir, sdx4_safety **s) {
    sdx4_engine_options o;
    test_engine_options(&o, dir);
    return sdx4_safety_open(&o, s);
}

static int read_png(const char *path, sdx4_image *img) {
    char err[256];
    if (imageio_read_file(path, img, err, sizeof err) == 0) return 0;
    fprintf(stderr, "%s: %s\n", path, err);
    return -1;
}

static const float *golden(const st_file *g, const char *name, size_t n) {
    const st_tensor *t = sdx4_st_find(g, name);
    if (!t || t->type != DTYPE_F32 || t->nbytes != n * sizeof(float)) {
        fprintf(stderr, "golden %s missing or of another size\n", name);
        return NULL;
    }
    return t->data;
}

/* Preprocessing, the tower and the decision, each against diffusers, on
 * the CPU backend through the model code (the tower in one batch of 5). */
static void test_goldens(void) {
    st_file g;
    if (sdx4_st_open(&g, DATA "golden.safetensors")) {
        CHECK(0, "%s", sdx4_last_error());
        return;
    }
    backend *be = sdx4_backend_cpu_create(2);
    safety_checker sc;
    if (!be || sdx4_safety_checker_load(&sc, be, DATA "checker")) {
        CHECK(0, "load: %s", sdx4_last_error());
        if (be) be->destroy(be);
        sdx4_st_close(&g);
        return;
    }
    int S = sc.image_size, D = sc.hidden, P = sc.projection, R = sizeof golden_rows / sizeof *golden_rows;
    CHECK(S == 224 && sc.grid == 16 && sc.tokens == 257 && D == 64 && P == 32 && sc.layers == 2,
          "config read as S %d grid %d tokens %d D %d P %d layers %d", S, sc.grid, sc.tokens, D, P, sc.layers);
    const float *rows = golden(&g, "pixel_values_rows", (size_t)NIMAGES * 3 * R * S);
    const float *pooled_ref = golden(&g, "pooled_output", (size_t)NIMAGES * D);
    const float *embeds_ref = golden(&g, "image_embeds", (size_t)NIMAGES * P);
    const float *cos_ref = golden(&g, "cos_dist", (size_t)NIMAGES * SDX4_SAFETY_CONCEPTS);
    const float *scos_ref = golden(&g, "special_cos_dist", (size_t)NIMAGES * SDX4_SAFETY_SPECIAL);
    const float *nsfw = golden(&g, "has_nsfw_concepts", NIMAGES);
    float *pixels = malloc(sizeof *pixels * NIMAGES * 3 * S * S);
    float *pooled = malloc(sizeof *pooled * NIMAGES * D), *embeds = malloc(sizeof *embeds * NIMAGES * P);
    if (!rows || !pooled_ref || !embeds_ref || !cos_ref || !scos_ref || !nsfw || !pixels || !pooled || !embeds) {
        CHECK(0, "golden data or memory missing");
        goto out;
    }
    for (int k = 0; k < NIMAGES; k++) {
        char path[4096];
        snprintf(path, sizeof path, DATA "image%d.png", k);
        sdx4_image img = {0};
        CHECK(!read_png(path, &img), "%s", path);
        CHECK(!sdx4_safety_preprocess(&sc, &img, pixels + (size_t)k * 3 * S * S), "%s", sdx4_last_error());
        sdx4_image_free(&img);
        double d = 0;
        for (int c = 0; c < 3; c++)
            for (int r = 0; r < R; r++) {
                const float *mine = pixels + (((size_t)k * 3 + c) * S + golden_rows[r]) * S;
                const float *ref = rows + (((size_t)k * 3 + c) * R + r) * S;
                double m = max_abs_diff(mine, ref, S);
                if (m > d) d = m;
            }
        /* Pillow's bytes exactly, then numpy's float32 arithmetic */
        CHECK(d <= 1e-6, "image %d: pixel_values differ by %g", k, d);
    }
    CHECK(!sdx4_safety_embed(&sc, be, pixels, NIMAGES, pooled, embeds), "%s", sdx4_last_error());
    double dp = max_abs_diff(pooled, pooled_ref, (size_t)NIMAGES * D);
    double de = max_abs_diff(embeds, embeds_ref, (size_t)NIMAGES * P);
    printf("pooled output max abs diff %.3g, image embeds %.3g\n", dp, de);
    CHECK(dp <= 2e-4, "pooled_output differs by %g", dp);
    CHECK(de <= 2e-4, "image_embeds differ by %g", de);
    for (int k = 0; k < NIMAGES; k++) {
        sdx4_safety_result r;
        sdx4_safety_decide(&sc, embeds + (size_t)k * P, &r);
        double dc = max_abs_diff(r.concept_cos, cos_ref + k * SDX4_SAFETY_CONCEPTS, SDX4_SAFETY_CONCEPTS);
        double ds = max_abs_diff(r.special_cos, scos_ref + k * SDX4_SAFETY_SPECIAL, SDX4_SAFETY_SPECIAL);
        CHECK(dc <= 1e-4 && ds <= 1e-4, "image %d: cosines differ by %g, special %g", k, dc, ds);
        CHECK(r.flagged == (nsfw[k] != 0), "image %d: flagged %d, diffusers %g", k, r.flagged, nsfw[k]);
        CHECK(r.special_care == (k == 2), "image %d: special care %d", k, r.special_care);
        /* the decision on diffusers' own embeddings is the same */
        sdx4_safety_result rr;
        sdx4_safety_decide(&sc, embeds_ref + (size_t)k * P, &rr);
        CHECK(rr.flagged == r.flagged, "image %d: decision on diffusers' embeddings differs", k);
        if (k == 2) { /* flagged by the 0.01 alone: its concept score without it is below 0 */
            int only_adjusted = 0;
            for (int c = 0; c < SDX4_SAFETY_CONCEPTS; c++)
                if (r.concept_scores[c] > 0 && r.concept_scores[c] < 0.0105f) only_adjusted = 1;
            CHECK(only_adjusted, "image 2 is not flagged through the adjustment alone");
        }
    }
out:
    free(pixels), free(pooled), free(embeds);
    sdx4_safety_checker_free(&sc);
    be->destroy(be);
    sdx4_st_close(&g);
}

/* The public API on SDX4_TEST_DEVICE: the same decisions and cosines. */
static void test_public_api(void) {
    st_file g;
    sdx4_safety *s = NULL;
    if (sdx4_st_open(&g, DATA "golden.safetensors")) return;
    sdx4_status st = try_open(DATA "checker", &s);
    CHECK(st == SDX4_OK, "open: %s", sdx4_last_error());
    const float *cos_ref = golden(&g, "cos_dist", (size_t)NIMAGES * SDX4_SAFETY_CONCEPTS);
    const float *nsfw = golden(&g, "has_nsfw_concepts", NIMAGES);
    double tol = test_in_half_precision() ? 2e-2 : 1e-4;
    for (int k = 0; s && cos_ref && nsfw && k < NIMAGES; k++) {
        char path[4096];
        snprintf(path, sizeof path, DATA "image%d.png", k);
        sdx4_image img = {0};
        sdx4_safety_result r;
        if (read_png(path, &img)) continue;
        st = sdx4_safety_check(s, &img, &r);
        sdx4_image_free(&img);
        CHECK(st == SDX4_OK, "check image %d: %s", k, sdx4_last_error());
        double dc = max_abs_diff(r.concept_cos, cos_ref + k * SDX4_SAFETY_CONCEPTS, SDX4_SAFETY_CONCEPTS);
        CHECK(dc <= tol, "image %d on %s: cosines differ by %g", k, test_device(), dc);
        /* image 2's decision is 0.004 from its edge, within half precision's error */
        if (!test_in_half_precision() || k != 2)
            CHECK(r.flagged == (nsfw[k] != 0), "image %d on %s: flagged %d", k, test_device(), r.flagged);
        CHECK(r.seconds > 0, "image %d: no time", k);
    }
    /* bad images: a clear error, no crash */
    sdx4_safety_result r;
    sdx4_image empty = {0, 0, NULL};
    if (s) {
        CHECK(sdx4_safety_check(s, &empty, &r) == SDX4_ERR_INVALID_ARGUMENT, "empty image accepted");
        uint8_t px[3 * 2000] = {0};
        sdx4_image thin = {2000, 1, px};
        CHECK(sdx4_safety_check(s, &thin, &r) == SDX4_ERR_INVALID_ARGUMENT &&
                  strstr(sdx4_last_error(), "aspect ratio"),
              "2000x1 image: %s", sdx4_last_error());
        sdx4_image small = {5, 3, px};
        CHECK(sdx4_safety_check(s, &small, &r) == SDX4_OK, "5x3 image: %s", sdx4_last_error());
    }
    sdx4_safety_close(s);
    sdx4_safety_close(NULL);
    sdx4_st_close(&g);
}

/* ------------------------------------------------------------ bad folders */

static char tmpdir[64];

static int copy_file(const char *from, const char *to, long limit) {
    FILE *a = fopen(from, "rb"), *b = fopen(to, "wb");
    if (!a || !b) {
        if (a) fclose(a);
        if (b) fclose(b);
        return -1;
    }
    char buf[65536];
    size_t n;
    long total = 0;
    while ((n = fread(buf, 1, sizeof buf, a)) > 0 && (limit < 0 || total < limit)) {
        if (limit >= 0 && total + (long)n > limit) n = (size_t)(limit - total);
        fwrite(buf, 1, n, b);
        total += (long)n;
    }
    fclose(a);
    return fclose(b);
}

/* A copy of the test checker with `file` replaced by `text` (NULL: the
 * file removed), or model.safetensors cut to `truncate` bytes (>= 0). */
static void make_folder(const char *file, const char *text, long truncate) {
    static const char *const files[] = {"config.json", "preprocessor_config.json", "model.safetensors"};
    char from[4096], to[4096];
    for (int i = 0; i < 3; i++) {
        snprintf(from, sizeof from, DATA "checker/%s", files[i]);
        snprintf(to, sizeof to, "%s/%s", tmpdir, files[i]);
        unlink(to);
        if (file && !strcmp(file, files[i])) continue;
        copy_file(from, to, i == 2 ? truncate : -1);
    }
    if (file && text) {
        snprintf(to, sizeof to, "%s/%s", tmpdir, file);
        FILE *f = fopen(to, "w");
        if (f) fputs(text, f), fclose(f);
    }
}

/* The file's text with the first `from` replaced by `to`. */
static char *edited(const char *file, const char *from, const char *to) {
    char path[4096];
    snprintf(path, sizeof path, DATA "checker/%s", file);
    FILE *f = fopen(path, "rb");
    static char text[8192], out[8192];
    size_t n = f ? fread(text, 1, sizeof text - 1, f) : 0;
    if (f) fclose(f);
    text[n] = 0;
    char *at = strstr(text, from);
    if (!at) {
        fprintf(stderr, "%s has no %s\n", file, from);
        return text;
    }
    snprintf(out, sizeof out, "%.*s%s%s", (int)(at - text), text, to, at + strlen(from));
    return out;
}

static void refused(const char *what, const char *expect) {
    sdx4_safety *s = NULL;
    sdx4_status st = try_open(tmpdir, &s);
    CHECK(st != SDX4_OK && s == NULL, "%s: opened", what);
    CHECK(strstr(sdx4_last_error(), expect) != NULL, "%s: error \"%s\" does not say \"%s\"", what,
          sdx4_last_error(), expect);
    sdx4_safety_close(s);
}

static void test_bad_folders(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/sdx4-safety-XXXXXX");
    if (!mkdtemp(tmpdir)) {
        CHECK(0, "mkdtemp");
        return;
    }
    make_folder("model.safetensors", NULL, -1);
    refused("no weights", "model.safetensors");
    make_folder(NULL, NULL, 100000);
    refused("truncated weights", "model.safetensors");
    make_folder(NULL, NULL, 4);
    refused("4-byte weights", "model.safetensors");
    make_folder("config.json", NULL, -1);
    refused("no config", "config.json: missing");
    make_folder("config.json", "{\"architectures\": [", -1);
    refused("malformed config", "malformed JSON");
    make_folder("config.json", edited("config.json", "StableDiffusionSafetyChecker", "CLIPModel"), -1);
    refused("another architecture", "architectures=CLIPModel is not supported");
    make_folder("config.json", edited("config.json", "\"hidden_act\": \"quick_gelu\",\n    \"hidden_size\": 64",
                                      "\"hidden_act\": \"relu\",\n    \"hidden_size\": 64"),
                -1);
    refused("hidden_act relu", "hidden_act=relu is not supported");
    make_folder("config.json", edited("config.json", "\"patch_size\": 14", "\"patch_size\": 15"), -1);
    refused("patch 15", "not a multiple of patch_size 15");
    make_folder("config.json", edited("config.json", "\"patch_size\": 14", "\"patch_size\": 16"), -1);
    refused("patch 16 against a file of 14", "patch_embedding.weight has shape");
    make_folder("config.json", edited("config.json", "\"projection_dim\": 32", "\"projection_dim\": 48"), -1);
    refused("projection 48", "visual_projection.weight has shape");
    make_folder("config.json", edited("config.json", "\"num_channels\": 3", "\"num_channels\": 4"), -1);
    refused("4 channels", "num_channels=4 is not supported");
    make_folder("preprocessor_config.json", NULL, -1);
    refused("no preprocessor config", "preprocessor_config.json: missing");
    make_folder("preprocessor_config.json", edited("preprocessor_config.json", "\"resample\": 3", "\"resample\": 2"),
                -1);
    refused("bilinear", "resample=2 is not supported");
    make_folder("preprocessor_config.json",
                edited("preprocessor_config.json", "\"do_center_crop\": true", "\"do_center_crop\": false"), -1);
    refused("no crop", "do_center_crop=false is not supported");
    make_folder("preprocessor_config.json", edited("preprocessor_config.json", "\"crop_size\": 224", "\"crop_size\": 200"),
                -1);
    refused("crop 200", "crop_size 200 differs from config.json's image_size 224");
    make_folder("preprocessor_config.json",
                edited("preprocessor_config.json", "\"crop_size\": 224", "\"crop_size\": {\"height\": 224, \"width\": 200}"),
                -1);
    refused("crop 224x200", "crop_size must be");
    make_folder("preprocessor_config.json",
                edited("preprocessor_config.json", "\"size\": 224", "\"size\": {\"shortest_edge\": 224}"), -1);
    sdx4_safety *s = NULL;
    CHECK(try_open(tmpdir, &s) == SDX4_OK, "size as {shortest_edge}: %s", sdx4_last_error());
    sdx4_safety_close(s);
    make_folder("preprocessor_config.json",
                edited("preprocessor_config.json", "\"image_std\": [", "\"image_std\": [0, "), -1);
    refused("4 stds", "image_std must be a list of 3 numbers");
    make_folder(NULL, NULL, -1);
    CHECK(try_open(tmpdir, &s) == SDX4_OK, "the copy itself: %s", sdx4_last_error());
    sdx4_safety_close(s);
    sdx4_engine_options o;
    sdx4_engine_options_default(&o);
    CHECK(sdx4_safety_open(&o, &s) == SDX4_ERR_INVALID_ARGUMENT, "no folder accepted");
    o.model_dir = tmpdir;
    o.device = "tpu";
    CHECK(sdx4_safety_open(&o, &s) == SDX4_ERR_INVALID_ARGUMENT, "device tpu accepted");
    make_folder("model.safetensors", NULL, -1);
    for (int i = 0; i < 3; i++) {
        static const char *const files[] = {"config.json", "preprocessor_config.json", "model.safetensors"};
        char p[4096];
        snprintf(p, sizeof p, "%s/%s", tmpdir, files[i]);
        unlink(p);
    }
    rmdir(tmpdir);
}

int main(int argc, char **argv) {
    (void)argc;
    imageio_init(argv[0]);
    test_goldens();
    test_public_api();
    test_bad_folders();
    imageio_shutdown();
    return test_finish("test_safety");
}
#else
int main(void) {
    puts("test_safety: built without imageio, skipped");
    return 77;
}
#endif
