/*
 * test_vae_tiling.c - the tiled VAE decode against diffusers'
 * AutoencoderKL.tiled_decode (tests/data/vae_tiling, made by
 * tools/vae_tiling_goldens.py on the tiny reference model):
 *   - recorded latents [1, 4, 13, 14] decoded with tiles of 8 latents (the
 *     config's: 9 tiles, the last tile rows 7 and 1 latents high) and of 12
 *     (4 tiles), at the VAE tolerance of ../shared/reference (2e-4);
 *   - a whole 3-step upscale with the VAE tiling (6 tiles), 2e-3;
 *   - a tile at least as large as the latents gives the untiled decode bit
 *     for bit, in the decoder and through the pipeline; "auto" tiles when
 *     the estimate exceeds the budget and not otherwise;
 *   - the backend's peak memory does not grow with the image when tiled;
 *   - blending softens the seams between tiles (test_seams); tiles that
 *     are no multiple of 4 are refused.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "model/image_processor.h"
#include "model/pipeline.h"
#include "test.h"
#include "test_device.h"

#define DATA SDX4_SOURCE_DIR "/tests/data/vae_tiling"

static const float *golden_f32(const st_file *f, const char *name, size_t want) {
    const st_tensor *t = sdx4_st_find(f, name);
    CHECK(t && t->type == DTYPE_F32 && t->nbytes == want * sizeof(float), "%s missing or not F32[%zu]", name,
          want);
    return t && t->type == DTYPE_F32 && t->nbytes == want * sizeof(float) ? t->data : NULL;
}

/* The decode the pipeline runs (bfloat16 activations where the backend
 * keeps half ones), on z as given: the tile count, or -1. */
static int decode_tiled(backend *be, const model *m, const float *z, int h, int w, int tile, float *out) {
    dtype saved = be->set_activation_type ? be->set_activation_type(be, DTYPE_BF16) : DTYPE_F32;
    int tiles = sdx4_vae_decode_tiled(be, &m->vae, z, h, w, tile, out);
    if (be->set_activation_type) be->set_activation_type(be, saved);
    return tiles;
}

/* ---- against diffusers ---------------------------------------------------- */

static void test_decode_goldens(backend *be, const model *m) {
    st_file g;
    if (sdx4_st_open(&g, DATA "/decode.safetensors")) {
        CHECK(0, "%s", sdx4_last_error());
        return;
    }
    enum { H = 13, W = 14 };
    size_t n_out = (size_t)3 * H * 4 * W * 4;
    const float *z = golden_f32(&g, "latents", (size_t)4 * H * W);
    float *out = malloc(n_out * sizeof *out);
    static const struct {
        int tile, tiles;
        const char *name;
    } cases[] = {{8, 9, "image_tile8"}, {12, 4, "image_tile12"}};
    double tol = test_half_precision ? 1e-1 : 2e-4; /* bfloat16 activations on a GPU */
    for (size_t i = 0; z && i < sizeof cases / sizeof *cases; i++) {
        const float *want = golden_f32(&g, cases[i].name, n_out);
        int tiles = decode_tiled(be, m, z, H, W, cases[i].tile, out);
        CHECK(tiles == cases[i].tiles, "tile %d: %d tiles (%s)", cases[i].tile, tiles, sdx4_last_error());
        if (!want || tiles < 0) continue;
        double d = max_abs_diff(out, want, n_out);
        printf("  decode 13x14 in tiles of %d: %d tiles, max diff %.3g\n", cases[i].tile, tiles, d);
        CHECK(d <= tol, "tile %d: differs from diffusers by %g", cases[i].tile, d);
    }
    free(out);
    sdx4_st_close(&g);
}

static int run(const model *m, backend *be, const float *image, vae_tiling_mode mode, int tile,
               int64_t budget, float **out, int *tiles) {
    pipeline_args a = {
        .image = image, .height = 12, .width = 16, .prompt = "a white cat", .steps = 3, .guidance = 6.0f,
        .noise_level = 20, .seed = 0, .vae_tiling = mode, .vae_tile = tile, .vae_budget = budget,
    };
    pipeline_report rep = {0};
    int rc = sdx4_pipeline_run(m, be, &a, out, &rep);
    CHECK(rc == 0, "pipeline: %s", sdx4_last_error());
    *tiles = rep.vae_tiles;
    return rc;
}

static void test_pipeline(backend *be, const model *m) {
    unsigned char rgb[12 * 16 * 3];
    FILE *f = fopen(DATA "/input.rgb", "rb");
    CHECK(f && fread(rgb, 1, sizeof rgb, f) == sizeof rgb, "%s/input.rgb unreadable", DATA);
    if (f) fclose(f);
    sdx4_image in = {.width = 16, .height = 12, .pixels = rgb};
    float *image = NULL, *on = NULL, *off = NULL, *big = NULL, *low = NULL, *dflt = NULL;
    int h, w, t_on = 0, t_off = 0, t_big = 0, t_low = 0, t_dflt = 0;
    st_file g;
    if (sdx4_image_preprocess(&in, sdx4_vae_scale_factor(&m->vae), &image, &h, &w) ||
        sdx4_st_open(&g, DATA "/pipeline.safetensors")) {
        CHECK(0, "%s", sdx4_last_error());
        free(image);
        return;
    }
    size_t n = (size_t)3 * 48 * 64;
    const float *want = golden_f32(&g, "output", n);
    if (!run(m, be, image, VAE_TILING_ON, 0, 0, &on, &t_on) && want) {
        CHECK(t_on == 6, "the config's tiles of 8 on 12x16 latents: %d tiles, not 6", t_on);
        float *img = malloc(n * sizeof *img);
        sdx4_image_denormalize(on, n, img);
        double d = max_abs_diff(img, want, n);
        printf("  3-step upscale 12x16 -> 48x64, VAE in %d tiles: max diff %.3g\n", t_on, d);
        CHECK(test_half_precision || d <= 2e-3, "tiled pipeline output differs from diffusers' by %g", d);
        free(img);
    }
    /* a tile as large as the latents, or no tiling: the same bits */
    if (!run(m, be, image, VAE_TILING_OFF, 0, 0, &off, &t_off) &&
        !run(m, be, image, VAE_TILING_ON, 16, 0, &big, &t_big))
        CHECK(t_off == 1 && t_big == 1 && !memcmp(off, big, n * sizeof *off),
              "a tile of 16 on 12x16 latents is not the untiled decode (%d, %d tiles)", t_off, t_big);
    /* auto: tiled past the budget (the tiny decode of 12x16 holds ~0.5 MB),
     * whole under it */
    int64_t est = sdx4_vae_decode_bytes(&m->vae, 12, 16);
    CHECK(est > 100000 && est < SDX4_VAE_TILING_BUDGET, "decode estimate %lld bytes", (long long)est);
    if (!run(m, be, image, VAE_TILING_AUTO, 0, est - 1, &low, &t_low) && on)
        CHECK(t_low == 6 && !memcmp(low, on, n * sizeof *on), "auto over the budget: %d tiles", t_low);
    if (!run(m, be, image, VAE_TILING_AUTO, 0, est, &dflt, &t_dflt) && off)
        CHECK(t_dflt == 1 && !memcmp(dflt, off, n * sizeof *off), "auto within the budget: %d tiles", t_dflt);
    free(image), free(on), free(off), free(big), free(low), free(dflt);
    sdx4_st_close(&g);
}

/* ---- exactness, refusals, memory ---------------------------------------------- */

/* A smooth latent [4, h, w]: slow waves, about the range of real ones. */
static float *smooth_latent(int h, int w) {
    float *z = malloc((size_t)4 * h * w * sizeof *z);
    for (int c = 0; c < 4; c++)
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++)
                z[((size_t)c * h + y) * w + x] =
                    (float)(4.0 * sin(6.2832 * x / 37.0 + c) * cos(6.2832 * y / 29.0 + 0.5 * c) + 0.3 * c);
    return z;
}

static void test_whole_and_refusals(backend *be, const model *m) {
    enum { H = 13, W = 14 };
    size_t n = (size_t)3 * H * 4 * W * 4;
    float *z = smooth_latent(H, W), *tiled = malloc(n * sizeof *tiled), *whole = malloc(n * sizeof *whole);
    tensor *x = be->new_tensor(be, 4, (int64_t[]){1, 4, H, W}), *y = NULL;
    CHECK(x && !be->upload(be, x, z) && (y = sdx4_vae_decode(be, &m->vae, x)) && !be->download(be, y, whole),
          "untiled decode: %s", sdx4_last_error());
    /* diffusers decodes whole when the latents are no larger than a tile */
    CHECK(sdx4_vae_decode_tiled(be, &m->vae, z, H, W, 16, tiled) == 1 && !memcmp(tiled, whole, n * sizeof *tiled),
          "a tile of 16 on 13x14 latents is not the untiled decode");
    CHECK(sdx4_vae_tile(&m->vae) == 8, "the tiny config's sample_size 32 is tiles of %d", sdx4_vae_tile(&m->vae));
    static const int bad[] = {0, -4, 6, 10};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        sdx4_error_clear();
        CHECK(sdx4_vae_decode_tiled(be, &m->vae, z, H, W, bad[i], tiled) < 0 && strstr(sdx4_last_error(), "tile"),
              "a tile of %d: %s", bad[i], sdx4_last_error());
    }
    tensor_free(x), tensor_free(y);
    free(z), free(tiled), free(whole);
}

/* The backend's peak while tiled decodes of growing latents run: it stays
 * one tile's, while the untiled decode of the largest grows past it. The
 * peak is the process's so far: this runs first, and counts from what the
 * backend holds before (the weights it copied). */
static void test_memory(backend *be, const model *m) {
    static const int sides[] = {13, 40};
    int64_t base, in_use, peak[2], untiled;
    float *z = smooth_latent(40, 40), *out = malloc((size_t)3 * 160 * 160 * sizeof *out);
    be->memory(be, &base, NULL);
    for (int i = 0; i < 2; i++) {
        CHECK(decode_tiled(be, m, z, sides[i], sides[i], 8, out) > 0, "%s", sdx4_last_error());
        be->memory(be, &in_use, &peak[i]);
        peak[i] -= base;
    }
    tensor *x = be->new_tensor(be, 4, (int64_t[]){1, 4, 40, 40}), *y = NULL;
    CHECK(x && !be->upload(be, x, z) && (y = sdx4_vae_decode(be, &m->vae, x)), "%s", sdx4_last_error());
    be->memory(be, &in_use, &untiled);
    untiled -= base;
    printf("  decode peak over the weights: tiled 13x14 %.2f MiB, tiled 40x40 %.2f MiB, untiled 40x40 %.2f MiB "
           "(estimate of the untiled decode's activations %.2f MiB)\n",
           peak[0] / 1048576.0, peak[1] / 1048576.0, untiled / 1048576.0,
           sdx4_vae_decode_bytes(&m->vae, 40, 40) / 1048576.0);
    CHECK(peak[1] == peak[0], "the tiled decode's peak grew with the image: %lld -> %lld bytes",
          (long long)peak[0], (long long)peak[1]);
    CHECK(untiled > 2 * peak[1], "the untiled decode of 40x40 peaks at %lld bytes, tiled %lld", (long long)untiled,
          (long long)peak[1]);
    tensor_free(x), tensor_free(y);
    free(z), free(out);
}

/* ---- seams ------------------------------------------------------------------------ */

/* Mean squared difference between neighbours across the line before
 * column (or row) k of img [3, n, n], over the whole line. */
static double gradient_energy(const float *img, int n, int k, int rows) {
    double e = 0;
    for (int c = 0; c < 3; c++)
        for (int i = 0; i < n; i++) {
            const float *p = img + (size_t)c * n * n;
            double d = rows ? p[(size_t)k * n + i] - p[(size_t)(k - 1) * n + i]
                            : p[(size_t)i * n + k] - p[(size_t)i * n + k - 1];
            e += d * d;
        }
    return e / (3.0 * n);
}

/* Gradient energy in the bands where tiles meet (the `blend` lines from
 * each place where a crop of `keep` pixels ends: the blend's ramp, and
 * where pasted tiles would jump) over the energy of every other line, away
 * from the image's own edge, in both directions. */
static double seam_ratio(const float *img, int n, int keep, int blend) {
    double border = 0, interior = 0;
    int nb = 0, ni = 0;
    for (int rows = 0; rows < 2; rows++)
        for (int k = 8; k < n - 8; k++) {
            int off = k % keep, at_border = k >= keep && off < blend;
            double e = gradient_energy(img, n, k, rows);
            if (at_border) border += e, nb++;
            else interior += e, ni++;
        }
    return (border / nb) / (interior / ni);
}

/* The smooth latents decoded whole, tiled, and as tiles pasted side by
 * side without blending (what tiling without the blend gives, to show the
 * measure sees seams), on the tiny model with tiles of 16 latents (64 px:
 * crops of 48 px, ramps of 16; 25 tiles). Measured (CPU): whole 0.88,
 * tiled 2.47, pasted 7.49. Each tile's decode carries the edge effects of
 * its convolutions' zero padding (random weights make them strong: the
 * energy is highest in a tile's first lines), and diffusers' linear ramp
 * over a quarter tile spreads them rather than removing them: the tiled
 * image has a third of the pasted tiles' border energy. The thresholds:
 * tiled under 3 (a margin over 2.47 for other backends' rounding) and the
 * pasted tiles over twice the tiled, so that a blend gone wrong (missing,
 * reversed, misplaced) fails; the whole decode under 1.3 says the measure
 * itself sees nothing where there are no tiles. */
static void test_seams(backend *be, const model *m) {
    enum { L = 52, N = 4 * L, TILE = 16, KEEP = 48, BLEND = 16, OV = 12 };
    float *z = smooth_latent(L, L), *whole = malloc((size_t)3 * N * N * sizeof *whole);
    float *tiled = malloc((size_t)3 * N * N * sizeof *tiled), *pasted = malloc((size_t)3 * N * N * sizeof *pasted);
    float *zt = malloc((size_t)4 * TILE * TILE * sizeof *zt), *t = malloc((size_t)3 * 64 * 64 * sizeof *t);
    CHECK(decode_tiled(be, m, z, L, L, 64, whole) == 1 && decode_tiled(be, m, z, L, L, TILE, tiled) == 25,
          "%s", sdx4_last_error());
    for (int y0 = 0, i = 0; y0 < L; y0 += OV, i++)
        for (int x0 = 0, j = 0; x0 < L; x0 += OV, j++) {
            int lh = L - y0 < TILE ? L - y0 : TILE, lw = L - x0 < TILE ? L - x0 : TILE;
            for (int c = 0; c < 4; c++)
                for (int y = 0; y < lh; y++)
                    memcpy(zt + ((size_t)c * lh + y) * lw, z + ((size_t)c * L + y0 + y) * L + x0, lw * sizeof *zt);
            CHECK(decode_tiled(be, m, zt, lh, lw, 64, t) == 1, "%s", sdx4_last_error());
            int rows = 4 * lh < KEEP ? 4 * lh : KEEP, cols = 4 * lw < KEEP ? 4 * lw : KEEP;
            for (int c = 0; c < 3; c++)
                for (int y = 0; y < rows; y++)
                    memcpy(pasted + ((size_t)c * N + i * KEEP + y) * N + j * KEEP, t + ((size_t)c * 4 * lh + y) * 4 * lw,
                           cols * sizeof *t);
        }
    /* Away from the blends the tiled image is each tile's own decode, bit
     * for bit: the tiles are cut, placed and cropped where diffusers puts
     * them, and each decodes as it would alone. */
    size_t differ = 0;
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < N; y++)
            for (int x = 0; x < N; x++) {
                size_t at = ((size_t)c * N + y) * N + x;
                if ((y < KEEP || y % KEEP >= BLEND) && (x < KEEP || x % KEEP >= BLEND))
                    differ += tiled[at] != pasted[at];
            }
    CHECK(differ == 0, "%zu values of the tiled decode, away from its blends, differ from the tiles' own decodes",
          differ);
    double r_whole = seam_ratio(whole, N, KEEP, BLEND), r_tiled = seam_ratio(tiled, N, KEEP, BLEND),
           r_pasted = seam_ratio(pasted, N, KEEP, BLEND);
    printf("  seams (border / interior gradient energy): whole %.3f, tiled %.3f, pasted without blending %.3f\n",
           r_whole, r_tiled, r_pasted);
    CHECK(r_tiled < 3.0, "the tiled decode shows seams: ratio %.3f", r_tiled);
    CHECK(r_pasted > 2 * r_tiled, "blending does not soften the seams: ratio %.3f pasted, %.3f tiled", r_pasted,
          r_tiled);
    CHECK(r_whole < 1.3, "the whole decode's own ratio %.3f", r_whole);
    free(z), free(whole), free(tiled), free(pasted), free(zt), free(t);
}

int main(void) {
    backend *be = test_backend();
    char dir[512];
    snprintf(dir, sizeof dir, "%s/model", test_ref("tiny"));
    model m;
    if (sdx4_model_load(&m, be, dir, NULL)) {
        CHECK(0, "tiny: %s", sdx4_last_error());
        be->destroy(be);
        return test_finish("test_vae_tiling");
    }
    test_memory(be, &m); /* first: the backend's peak is that of this process so far */
    test_decode_goldens(be, &m);
    test_whole_and_refusals(be, &m);
    test_pipeline(be, &m);
    test_seams(be, &m);
    sdx4_model_free(&m);
    be->destroy(be);
    return test_finish("test_vae_tiling");
}
