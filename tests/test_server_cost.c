/*
 * test_server_cost.c - cost.c's curve: the estimator without the model,
 * as workers publish it for API nodes (cluster mode).
 *
 * The tiny reference model's FLOP counts with synthetic timings (no
 * upscale runs): the curve gives cost_estimate's seconds back exactly at
 * square sizes and within the sides' rounding elsewhere, guided or not;
 * it travels through JSON unchanged, and a bad one is refused by name.
 * A tiled UNet's steps cost its windows times one window's, by the model
 * and by the curve alike. A GAN (tests/data/gan/rrdb_x4) is calibrated by
 * real one-step upscales, its forward measured as the decode.
 */
#include <math.h>
#include <string.h>

#include "cost.h"
#include "sdx4.h"
#include "test.h"
#include "test_engine.h"

/* A report of `seconds` per part, as if measured. */
static sdx4_upscale_report timed(double text, double unet, double vae) {
    sdx4_upscale_report r;
    memset(&r, 0, sizeof r);
    r.seconds_text = text, r.seconds_unet = unet, r.seconds_vae = vae;
    return r;
}

static int near(double a, double b, double relative) { return fabs(a - b) <= relative * fabs(b); }

static void test_curve(sdx4_engine *e) {
    cost_model *c = cost_create(e, 32, 512);
    cost_curve k;
    CHECK(cost_get_curve(c, &k) == -1, "a curve before any measurement");
    sdx4_upscale_report small = timed(0.01, 0.02, 0.03), large = timed(0.012, 0.09, 0.4);
    cost_observe(c, 32, 32, 0, 0, 1, true, &small, 1.0, true);
    cost_observe(c, 64, 64, 0, 0, 1, true, &large, 1.0, true);
    CHECK(cost_calibrated(c) && cost_get_curve(c, &k) == 0 && k.calibrated, "calibrated curve");
    CHECK(k.pixels[0] == 32 * 32 && k.pixels[1] == 272 * 272 && k.pixels[2] == 512 * 512, "sides %g %g %g",
          k.pixels[0], k.pixels[1], k.pixels[2]);
    static const int sizes[][2] = {{32, 32}, {64, 64}, {128, 128}, {200, 200}, {512, 512}, {64, 256}, {300, 100}};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        for (int guided = 0; guided < 2; guided++) {
            int w = sizes[i][0], h = sizes[i][1];
            double direct = cost_estimate(c, w, h, 0, 0, 20, guided),
                   curve = cost_curve_estimate(&k, w, h, 0, 0, 20, guided);
            /* squares of multiples of 8 exactly (the counts' rounding), the rest within 2% */
            CHECK(direct > 0 && near(curve, direct, w == h && w % 8 == 0 ? 1e-6 : 0.02),
                  "%dx%d guided %d: curve %.6g, estimator %.6g", w, h, guided, curve, direct);
        }

    json_t *j = cost_curve_to_json(&k);
    cost_curve back;
    char err[160];
    CHECK(cost_curve_from_json(j, &back, err, sizeof err) == 0 && memcmp(&back, &k, sizeof k) == 0,
          "round trip: %s", err);
    CHECK(back.unet_bytes_per_pixel == 1020, "the tiny UNet's %lld bytes a pixel", (long long)back.unet_bytes_per_pixel);
    json_object_set_new(j, "step", json_pack("[f,f]", 1.0, 2.0));
    CHECK(cost_curve_from_json(j, &back, err, sizeof err) == -1 && strstr(err, "\"step\""), "short: %s", err);
    json_object_set_new(j, "step", json_pack("[f,f,f]", 1.0, -2.0, 3.0));
    CHECK(cost_curve_from_json(j, &back, err, sizeof err) == -1 && strstr(err, "\"step\""), "negative: %s", err);
    json_object_set_new(j, "step", json_pack("[f,f,f]", 1.0, 2.0, 3.0));
    json_object_set_new(j, "unet_bytes_per_pixel", json_integer(0));
    CHECK(cost_curve_from_json(j, &back, err, sizeof err) == -1 && strstr(err, "\"unet_bytes_per_pixel\""), "0: %s", err);
    json_object_del(j, "unet_bytes_per_pixel"); /* an earlier version's worker */
    CHECK(cost_curve_from_json(j, &back, err, sizeof err) == 0 && back.unet_bytes_per_pixel == 0, "none: %s", err);
    json_object_set_new(j, "unet_bytes_per_pixel", json_integer(1020));
    json_object_set_new(j, "pixels", json_pack("[f,f,f]", 4.0, 4.0, 9.0));
    CHECK(cost_curve_from_json(j, &back, err, sizeof err) == -1 && strstr(err, "\"pixels\""), "flat: %s", err);
    json_object_del(j, "calibrated");
    CHECK(cost_curve_from_json(j, &back, err, sizeof err) == -1 && strstr(err, "\"calibrated\""), "no flag: %s", err);
    CHECK(cost_curve_from_json(NULL, &back, err, sizeof err) == -1, "no curve");
    json_decref(j);
    cost_destroy(c);
}

/* One step's seconds of a width x height upscale, tiled or not. */
static double one_step(cost_model *c, int width, int height, int tile, int overlap) {
    return cost_estimate(c, width, height, tile, overlap, 21, true) -
           cost_estimate(c, width, height, tile, overlap, 20, true);
}

static void test_tiles(sdx4_engine *e) {
    cost_model *c = cost_create(e, 64, SDX4_MAX_INPUT_SIDE);
    sdx4_upscale_report small = timed(0.01, 0.02, 0.03), large = timed(0.012, 0.09, 0.4);
    cost_observe(c, 64, 64, 0, 0, 1, true, &small, 1.0, true);
    cost_observe(c, 128, 128, 0, 0, 1, true, &large, 1.0, true);
    cost_curve k;
    CHECK(cost_get_curve(c, &k) == 0, "curve");
    /* a step of 512 px in windows of 128 overlapping by 32: 5 x 5 windows
     * of 128 px, each one step of a 128 px upscale */
    int ww, wh, n = sdx4_unet_windows(512, 512, 128, 32, 1, 1, &ww, &wh);
    CHECK(n == 25 && ww == 128 && wh == 128, "%d windows of %dx%d", n, ww, wh);
    double window = one_step(c, 128, 128, 0, 0), tiled = one_step(c, 512, 512, 128, 32);
    CHECK(window > 0 && near(tiled, n * window, 1e-9), "a tiled step %.6g, %d windows of %.6g", tiled, n, window);
    /* the rest (text, decode) is the whole image's */
    CHECK(near(cost_estimate(c, 512, 512, 128, 32, 20, true) - 20 * tiled,
               cost_estimate(c, 512, 512, 0, 0, 20, true) - 20 * one_step(c, 512, 512, 0, 0), 1e-9),
          "text and decode");
    /* a tile at least as large as the image: untiled */
    CHECK(cost_estimate(c, 300, 200, 300, 32, 20, true) == cost_estimate(c, 300, 200, 0, 0, 20, true), "tile >= sides");
    /* 2048 px in windows: above the untiled 512 px (16 times its pixels),
     * far below the untiled 2048 px's quadratic attention */
    double big = cost_estimate(c, 2048, 2048, 128, 32, 20, true),
           whole = cost_estimate(c, 2048, 2048, 2048, 0, 20, true); /* a tile of the side: whole */
    CHECK(big > cost_estimate(c, 512, 512, 0, 0, 20, true) && big < whole / 2, "2048 px: tiled %.4g, whole %.4g", big,
          whole);
    /* the curve says the same, windows below min-side included */
    static const int cases[][3] = {{512, 512, 128}, {2048, 2048, 256}, {256, 256, 32}, {512, 512, 0}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int w = cases[i][0], h = cases[i][1], tile = cases[i][2];
        for (int guided = 0; guided < 2; guided++) {
            double direct = cost_estimate(c, w, h, tile, 16, 20, guided),
                   curve = cost_curve_estimate(&k, w, h, tile, 16, 20, guided);
            CHECK(direct > 0 && near(curve, direct, 1e-6), "%dx%d tile %d guided %d: curve %.6g, estimator %.6g", w,
                  h, tile, guided, curve, direct);
        }
    }
    CHECK(cost_estimate(c, 512, 512, 64, 64, 20, true) == 0 && cost_curve_estimate(&k, 512, 512, 64, 64, 20, true) == 0,
          "an overlap the tiling refuses: no estimate");
    cost_destroy(c);
}

/* A GAN's work is one forward, which the engine counts as the decode's
 * FLOPs and times as the UNet's seconds: the estimator files both under
 * the decode, so that the warm-up's calibration gives it rates and real
 * estimates (and none for text or steps). */
static void test_gan(void) {
    sdx4_engine_options o;
    sdx4_engine_options_default(&o);
    o.model_dir = SDX4_SOURCE_DIR "/tests/data/gan/rrdb_x4";
    o.device = "cpu";
    o.threads = 1;
    sdx4_engine *e = NULL;
    CHECK(sdx4_engine_open(&o, &e) == SDX4_OK, "rrdb_x4: %s", sdx4_last_error());
    if (!e) return;
    cost_model *c = cost_create(e, 16, 64);
    json_t *doc = cost_calibrate(c, false, 16, 16, 32, 32, false);
    CHECK(doc && cost_calibrated(c), "the GAN's calibration");
    json_t *decode = json_object_get(json_object_get(doc, "gflops"), "decode");
    CHECK(json_real_value(json_object_get(decode, "dense")) > 0, "no decode rate: %s",
          doc ? json_dumps(doc, JSON_COMPACT) : "(none)");
    CHECK(json_is_null(json_object_get(json_object_get(json_object_get(doc, "gflops"), "step"), "dense")),
          "a GAN has no steps");
    double small = cost_estimate(c, 16, 16, 0, 0, 75, true), large = cost_estimate(c, 64, 64, 0, 0, 75, true);
    CHECK(small > 0 && near(large, 16 * small, 0.01), "estimates %g at 16 px, %g at 64 px (linear in the pixels)",
          small, large);
    CHECK(cost_estimate(c, 64, 64, 0, 0, 1, false) == large, "steps and guidance change a GAN's estimate");
    cost_curve k;
    CHECK(cost_get_curve(c, &k) == 0 && near(cost_curve_estimate(&k, 64, 64, 0, 0, 75, true), large, 1e-6),
          "the GAN's curve");
    json_decref(doc);
    cost_destroy(c);
    sdx4_engine_close(e);
}

int main(void) {
    test_gan();
    sdx4_engine *e = test_engine_open("tiny/model");
    if (!e) return 77; /* skipped */
    test_curve(e);
    test_tiles(e);
    sdx4_engine_close(e);
    printf("%d checks, %d failures\n", test_checks, test_failures);
    return test_failures ? 1 : 0;
}
