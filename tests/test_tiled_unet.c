/*
 * test_tiled_unet.c - the tiled UNet (MultiDiffusion, model/tiling.h).
 *
 *   - the layout: windows from edge to edge, neighbours overlapping by at
 *     least the overlap, weights 1 at the image's border and in a window's
 *     middle, every pixel covered; bad settings refused by name;
 *   - no seams: the largest step of a blend of disagreeing windows;
 *   - a tile at least as large as the image runs through the tiled path
 *     (one window, weight 1) and gives the untiled latents exactly;
 *   - two tiled settings on the tiny model against tools/
 *     tiled_unet_goldens.py's PyTorch reference built from diffusers'
 *     components (tests/data/tiled_unet): the latents at the pipeline's
 *     callbacks (steps 0, 1 and the last), at the pipeline tolerance, 2e-3.
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
#include "model/tiling.h"
#include "test.h"
#include "test_device.h"

#define DATA SDX4_SOURCE_DIR "/tests/data/tiled_unet"
#define H 16
#define W 32
#define STEPS 5

static void check_layout(int length, int tile, int overlap) {
    tiling t;
    if (sdx4_tiling_plan(&t, length, 5, tile, overlap)) {
        CHECK(0, "plan %d/%d/%d: %s", length, tile, overlap, sdx4_last_error());
        return;
    }
    int size = tile < length ? tile : length;
    CHECK(t.th == size && t.ys[0] == 0 && t.ys[t.ny - 1] + size == length, "%d/%d/%d: windows do not span the axis",
          length, tile, overlap);
    for (int i = 1; i < t.ny; i++)
        CHECK(t.ys[i] > t.ys[i - 1] && t.ys[i - 1] + size - t.ys[i] >= overlap, "%d/%d/%d: windows %d and %d "
              "overlap by %d", length, tile, overlap, i - 1, i, t.ys[i - 1] + size - t.ys[i]);
    CHECK(t.ny == 1 || (t.ny - 2) * (size - overlap) + size < length, "%d/%d/%d: %d windows where fewer cover it",
          length, tile, overlap, t.ny);
    for (int i = 0; i < t.ny; i++)
        for (int k = 0; k < size; k++) {
            float w = t.wy[i * size + k];
            int border = (i == 0 && k == 0) || (i == t.ny - 1 && k == size - 1);
            CHECK(w > 0 && w <= 1 && (!border || w == 1), "%d/%d/%d: window %d weight %g at %d", length, tile,
                  overlap, i, w, k);
        }
    for (int p = 0; p < length * 5; p++) CHECK(t.sum[p] > 0, "%d/%d/%d: pixel %d uncovered", length, tile, overlap, p);
    sdx4_tiling_free(&t);
}

typedef struct {
    const st_file *g;
    float *latents[STEPS + 1];
    int steps;
    int reports, last, total, in_order; /* the progress calls, in units */
    int stop_at;                         /* > 0: cancel at that unit */
} run_record;

/* Keeps the latents after each step. A tiled step reports one unit per
 * UNet call (sdx4.h's progress): total is STEPS x calls, the calls in
 * between a step's end come with that step's input. */
static int record(void *user, int step, int total, const float *latents) {
    run_record *r = user;
    if (r->reports == 0) r->total = total;
    r->in_order = (r->reports == 0 ? step == 0 : r->in_order && step == r->last + 1) && total == r->total;
    r->reports++, r->last = step;
    if (r->stop_at > 0 && step == r->stop_at) return 1;
    int units = total / STEPS;
    if (units < 1 || step % units) return 0;
    step /= units;
    if (step > 0 && step <= STEPS) {
        r->latents[step] = malloc(4 * H * W * sizeof(float));
        if (r->latents[step]) memcpy(r->latents[step], latents, 4 * H * W * sizeof(float));
        r->steps++;
    }
    return 0;
}

static int run(const model *m, backend *be, const float *image, int tile, int overlap, run_record *r) {
    pipeline_args a = {.image = image, .height = H, .width = W, .prompt = "a white cat", .steps = STEPS,
                       .guidance = 6.0f, .noise_level = 20, .seed = 0, .tile = tile, .tile_overlap = overlap,
                       .on_step = record, .user = r};
    float *out = NULL;
    int rc = sdx4_pipeline_run(m, be, &a, &out, NULL);
    free(out);
    return rc;
}

/* Seams. The tiny model's random weights give latents with no spatial
 * smoothness to break (measured: the gradient energy across window edges
 * is 0.94-1.12 of the interior's, with or without overlap, as for the
 * untiled run), so a seam is measured on the blend itself: windows whose
 * predictions disagree by a constant (+1 and -1, alternating: the worst
 * case of inconsistent windows) are blended, and the largest step between
 * neighbouring pixels is what a seam would show. A hard cut (overlap 0)
 * steps by the whole disagreement, 2; the ramps spread it over the
 * overlap, so no step exceeds 2 / overlap (the bound, with float's
 * rounding). */
static double largest_step(int length, int tile, int overlap) {
    tiling t;
    if (sdx4_tiling_plan(&t, 1, length, tile, overlap)) return INFINITY;
    double prev = 0, step = 0;
    for (int x = 0; x < length; x++) {
        double sum = 0;
        for (int k = 0; k < t.count; k++)
            if (x >= t.xs[k] && x < t.xs[k] + t.tw) sum += sdx4_tiling_weight(&t, k, 0, x - t.xs[k]) * (k % 2 ? -1 : 1);
        double blended = sum / t.sum[x];
        if (x > 0) step = fmax(step, fabs(blended - prev));
        prev = blended;
    }
    sdx4_tiling_free(&t);
    return step;
}

static void check_seams(void) {
    double cut = largest_step(64, 16, 0);
    CHECK(cut > 1.99, "windows without overlap: a step of %g (a hard cut is 2)", cut);
    static const int overlaps[] = {2, 4, 8};
    for (int i = 0; i < 3; i++) {
        double step = largest_step(64, 16, overlaps[i]);
        printf("  disagreeing windows, tile 16, overlap %d: largest step %.3f (a cut: %.3f)\n", overlaps[i], step, cut);
        CHECK(step <= 2.0 / overlaps[i] * 1.0001, "overlap %d: a step of %g, over 2/%d", overlaps[i], step,
              overlaps[i]);
    }
}

/* sdx4_unet_bytes_per_pixel against what the CPU backend counts (its
 * tensors and scratch) at the forward's peak, sizes ascending so that each
 * peak is that size's own. The scratch (convolution columns, attention
 * scores) is bounded per thread, so the peaks grow by the activations
 * alone: measured, 951 bytes a pixel from the third size to the fourth
 * against the estimate's 1,020 (it counts a few temporaries that the
 * backend writes in place), and up to 20 MiB of scratch above the
 * estimate with 2 threads (Winograd's units on the tiny model's 32- and
 * 64-channel layers). */
static void check_memory_estimate(const model *m, backend *be) {
    static const int runs[][3] = {{1, 64, 64}, {2, 64, 96}, {2, 128, 128}, {2, 192, 160}};
    enum { RUNS = sizeof runs / sizeof *runs };
    int64_t per_pixel = sdx4_unet_bytes_per_pixel(&m->unet), measured[RUNS] = {0}, pixels[RUNS];
    if (strncmp(be->description, "CPU", 3)) return; /* another device's memory and dtype */
    for (size_t k = 0; k < RUNS; k++) {
        int b = runs[k][0], h = runs[k][1], w = runs[k][2];
        int32_t labels[2] = {20, 20};
        tensor *x = be->new_tensor(be, 4, (int64_t[]){b, m->unet.in_channels, h, w});
        tensor *ctx = be->new_tensor(be, 3, (int64_t[]){b, 77, m->unet.context_dim[0]}), *y = NULL;
        float *zeros = calloc((size_t)b * m->unet.in_channels * h * w, sizeof *zeros);
        int64_t before, peak;
        be->memory(be, &before, &peak);
        if (x && ctx && zeros && !be->upload(be, x, zeros))
            y = sdx4_unet_forward(be, &m->unet, x, 500, labels, ctx);
        be->memory(be, &peak, &peak);
        pixels[k] = (int64_t)b * h * w;
        measured[k] = peak - before + pixels[k] * m->unet.in_channels * (int64_t)sizeof(float); /* with the sample */
        printf("  unet memory, batch %d, %dx%d: estimate %.2f MiB, measured %.2f MiB\n", b, h, w,
               per_pixel * pixels[k] / 1048576.0, measured[k] / 1048576.0);
        CHECK(y, "unet forward: %s", sdx4_last_error());
        tensor_free(x), tensor_free(ctx), tensor_free(y), free(zeros);
    }
    double growth = (double)(measured[RUNS - 1] - measured[RUNS - 2]) / (pixels[RUNS - 1] - pixels[RUNS - 2]);
    CHECK(growth > 0.8 * per_pixel && growth < 1.05 * per_pixel, "the peak grows by %.0f bytes a pixel, the estimate "
          "says %lld", growth, (long long)per_pixel);
    /* the convolutions' scratch is bounded, not counted: a Winograd unit of
     * up to 16 MB per thread and one call's transformed weights (cpu_conv.c) */
    CHECK(measured[RUNS - 1] < per_pixel * pixels[RUNS - 1] + (48 << 20), "%.2f MiB measured over the estimate",
          (measured[RUNS - 1] - per_pixel * pixels[RUNS - 1]) / 1048576.0);
}

/* Automatic tiles (tile 0): whole within the budget, above it the windows
 * sdx4_tiling_auto chooses, the same latents as those windows asked for
 * by size. On a 64 x 192 latent of a smooth image, 2 steps, guided. */
static void check_auto_tiles(const model *m, backend *be) {
    enum { AH = 64, AW = 192 };
    float *image = malloc(3 * AH * AW * sizeof *image), *out[3] = {0};
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < AH; y++)
            for (int x = 0; x < AW; x++) image[(c * AH + y) * AW + x] = sinf(x / 17.0f + c) * cosf(y / 11.0f);
    int64_t whole = sdx4_unet_bytes_per_pixel(&m->unet) * 2 * AH * AW;
    /* budget below the whole latent's: windows; explicit, the same tile; at the budget: whole */
    const int64_t budgets[3] = {whole * 3 / 4, whole * 3 / 4, whole};
    pipeline_report rep[3] = {{0}};
    for (int k = 0; k < 3; k++) {
        pipeline_args a = {.image = image, .height = AH, .width = AW, .prompt = "a smooth wave", .steps = 2,
                           .guidance = 6.0f, .noise_level = 20, .tile = k == 1 ? rep[0].unet_tile : 0,
                           .tile_overlap = 16, .unet_budget = budgets[k]};
        CHECK(!sdx4_pipeline_run(m, be, &a, &out[k], &rep[k]), "auto tiles %d: %s", k, sdx4_last_error());
    }
    int tile = rep[0].unet_tile;
    printf("  automatic tiles on 64x192, budget %.2f MiB: %d windows of %d; at %.2f MiB: %d window\n",
           budgets[0] / 1048576.0, rep[0].unet_windows, tile, budgets[2] / 1048576.0, rep[2].unet_windows);
    CHECK(tile >= SDX4_MIN_TILE && tile % 8 == 0 && rep[0].unet_windows > 1, "over the budget: %d windows of %d",
          rep[0].unet_windows, tile);
    int group = sdx4_tiling_windows_per_call(rep[0].unet_windows), th = tile < AH ? tile : AH;
    CHECK(sdx4_unet_bytes_per_pixel(&m->unet) * 2 * group * th * tile <= budgets[0],
          "%d windows of %dx%d a call exceed the budget", group, th, tile);
    CHECK(rep[2].unet_tile == 0 && rep[2].unet_windows == 1, "within the budget: %d windows", rep[2].unet_windows);
    size_t n = (size_t)3 * AH * 4 * AW * 4;
    CHECK(out[0] && out[1] && !memcmp(out[0], out[1], n * sizeof(float)),
          "automatic windows of %d differ from the same windows asked for", tile);
    CHECK(out[0] && out[2] && memcmp(out[0], out[2], n * sizeof(float)), "windows gave the whole latent's image");
    for (int k = 0; k < 3; k++) free(out[k]);
    free(image);
}

static void free_record(run_record *r) {
    for (int i = 0; i <= STEPS; i++) free(r->latents[i]);
}

int main(void) {
    check_layout(37, 16, 4);
    check_layout(16, 8, 2);
    check_layout(100, 30, 0);
    check_layout(12, 16, 4);
    check_layout(64, 63, 62);
    check_seams();
    tiling t;
    CHECK(sdx4_tiling_plan(&t, 16, 16, 8, 8) != 0 && strstr(sdx4_last_error(), "tile_overlap"),
          "an overlap as large as the tile accepted");
    CHECK(sdx4_tiling_plan(&t, 16, 16, 0, 0) != 0, "a tile of 0 accepted");

    backend *be = test_backend();
    char dir[512];
    snprintf(dir, sizeof dir, "%s/model", test_ref("tiny"));
    model m;
    if (sdx4_model_load(&m, be, dir, NULL)) {
        CHECK(0, "tiny: %s", sdx4_last_error());
        be->destroy(be);
        return test_finish("test_tiled_unet");
    }
    check_memory_estimate(&m, be);
    check_auto_tiles(&m, be);
    unsigned char rgb[H * W * 3];
    FILE *f = fopen(DATA "/input.rgb", "rb");
    CHECK(f && fread(rgb, 1, sizeof rgb, f) == sizeof rgb, "%s/input.rgb unreadable", DATA);
    if (f) fclose(f);
    sdx4_image in = {.width = W, .height = H, .pixels = rgb};
    float *image = NULL;
    int h, w;
    CHECK(!sdx4_image_preprocess(&in, sdx4_vae_scale_factor(&m.vae), &image, &h, &w), "preprocess: %s",
          sdx4_last_error());

    /* one window as large as the image: the untiled run, exactly */
    run_record plain = {0}, whole = {0};
    CHECK(!run(&m, be, image, 0, 0, &plain) && !run(&m, be, image, 32, 8, &whole), "%s", sdx4_last_error());
    int same = plain.steps == STEPS && whole.steps == STEPS;
    for (int s = 1; same && s <= STEPS; s++)
        for (int i = 0; i < 4 * H * W; i++) same &= plain.latents[s][i] == whole.latents[s][i];
    CHECK(same, "a tile as large as the image changed the latents");
    free_record(&plain), free_record(&whole);

    static const char *const files[] = {"tile8_overlap2", "tile12_overlap4"};
    for (size_t k = 0; k < sizeof files / sizeof *files; k++) {
        char path[600];
        snprintf(path, sizeof path, "%s/%s.safetensors", DATA, files[k]);
        st_file g;
        if (sdx4_st_open(&g, path)) {
            CHECK(0, "%s", sdx4_last_error());
            continue;
        }
        char *tile = sdx4_st_metadata(&g, "tile"), *overlap = sdx4_st_metadata(&g, "tile_overlap");
        run_record r = {0};
        CHECK(tile && overlap && !run(&m, be, image, atoi(tile), atoi(overlap), &r), "%s: %s", files[k],
              sdx4_last_error());
        double worst = 0;
        int checked = 0;
        for (int s = 1; s <= r.steps; s++) {
            char name[32];
            snprintf(name, sizeof name, "latents_step%d", s - 1);
            const st_tensor *want = sdx4_st_find(&g, name);
            if (!want || want->nbytes != 4 * H * W * sizeof(float) || !r.latents[s]) continue;
            worst = fmax(worst, max_abs_diff(r.latents[s], want->data, 4 * H * W));
            checked++;
        }
        printf("  %s: %d steps, %d checked, latents max diff %.3g, progress 0..%d\n", files[k], r.steps, checked,
               worst, r.total);
        CHECK(r.steps == STEPS && checked == 3, "%s: %d steps, %d checked", files[k], r.steps, checked);
        CHECK(r.in_order && r.reports == r.total + 1 && r.total > STEPS && r.total % STEPS == 0,
              "%s: progress %d reports to %d, in order %d: not one unit per UNet call", files[k], r.reports,
              r.total, r.in_order);
        CHECK(test_half_precision || worst <= 2e-3, "%s: latents differ by %g", files[k], worst);
        free_record(&r);
        free(tile), free(overlap);
        sdx4_st_close(&g);
    }
    /* a cancel between two calls of a step ends the run there */
    run_record stopped = {.stop_at = 1};
    CHECK(run(&m, be, image, 8, 2, &stopped) != 0 && sdx4_error_status() == SDX4_ERR_CANCELED &&
              stopped.reports == 2 && stopped.steps == 0,
          "canceled between windows: %d reports, %d steps, %s", stopped.reports, stopped.steps, sdx4_last_error());
    free_record(&stopped);
    free(image);
    sdx4_model_free(&m);
    be->destroy(be);
    return test_finish("test_tiled_unet");
}
