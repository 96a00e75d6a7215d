/*
 * test_engine_params.c - the engine's table of upscale parameters
 * (sdx4_params) and the check that needs no model (sdx4_check_params).
 *
 * The table is what the CLI, the server and openapi.json are held to, so
 * it is checked for itself here: one row per field of sdx4_upscale_params
 * a user sets, defaults inside their ranges and equal to what
 * sdx4_upscale_params_default fills in, and every bound accepted by
 * sdx4_check_params while the next value outward is refused with a
 * message naming the parameter. The tiled UNet's rules beyond its rows
 * (no tile of 1..31, an overlap below the tile), and sdx4_unet_windows
 * against tiling.c's own layout.
 */
#include <math.h>

#include "model/model.h"
#include "model/tiling.h"
#include "sdx4.h"
#include "test.h"

static const char *const expected[] = {"prompt", "negative_prompt", "num_inference_steps",
                                       "guidance_scale", "noise_level", "seed", "eta",
                                       "scheduler", "scheduler_options", "vae_tiling", "tile",
                                       "tile_overlap"};

/* Sets the field of row `name` to v (numbers only). */
static void set_number(sdx4_upscale_params *p, const char *name, double v) {
    if (!strcmp(name, "num_inference_steps")) p->num_inference_steps = (int)v;
    else if (!strcmp(name, "guidance_scale")) p->guidance_scale = (float)v;
    else if (!strcmp(name, "noise_level")) p->noise_level = (float)v;
    else if (!strcmp(name, "eta")) p->eta = (float)v;
    else if (!strcmp(name, "tile")) p->tile = (int)v;
    else if (!strcmp(name, "tile_overlap")) p->tile_overlap = (int)v;
    else CHECK(0, "no field for %s", name);
}

static double field_number(const sdx4_upscale_params *p, const char *name) {
    if (!strcmp(name, "num_inference_steps")) return p->num_inference_steps;
    if (!strcmp(name, "guidance_scale")) return p->guidance_scale;
    if (!strcmp(name, "noise_level")) return p->noise_level;
    if (!strcmp(name, "eta")) return p->eta;
    if (!strcmp(name, "tile")) return p->tile;
    if (!strcmp(name, "tile_overlap")) return p->tile_overlap;
    CHECK(0, "no field for %s", name);
    return NAN;
}

/* sdx4_check_params on the defaults with row `r` set to v: 0 if accepted,
 * else checks the message names the row and returns 1. */
static int refused(const sdx4_param *r, double v) {
    sdx4_upscale_params p;
    sdx4_upscale_params_default(&p);
    set_number(&p, r->name, v);
    if (sdx4_check_params(&p) == SDX4_OK) return 0;
    CHECK(strstr(sdx4_last_error(), r->name) != NULL, "%s %.17g: message %s", r->name, v,
          sdx4_last_error());
    return 1;
}

static void test_rows(void) {
    int n = -1;
    const sdx4_param *rows = sdx4_params(&n);
    CHECK(n == (int)(sizeof expected / sizeof expected[0]), "%d rows", n);
    for (int i = 0; i < n && i < (int)(sizeof expected / sizeof expected[0]); i++) {
        CHECK(!strcmp(rows[i].name, expected[i]), "row %d is %s, not %s", i, rows[i].name, expected[i]);
        CHECK(sdx4_param_find(rows[i].name) == &rows[i], "find %s", rows[i].name);
        CHECK(rows[i].help && *rows[i].help, "%s has no help", rows[i].name);
    }
    CHECK(sdx4_param_find("steps") == NULL && sdx4_param_find(NULL) == NULL, "find of no row");

    sdx4_upscale_params p;
    sdx4_upscale_params_default(&p);
    CHECK(sdx4_check_params(&p) == SDX4_OK, "defaults refused: %s", sdx4_last_error());
    CHECK(!p.prompt && !p.negative_prompt && p.seed == 0 && !p.progress && !p.cancel, "defaults");
    CHECK(!p.scheduler && !p.scheduler_options, "the model's own scheduler by default");
    p.scheduler = "lcm";
    CHECK(sdx4_check_params(&p) != SDX4_OK && strstr(sdx4_last_error(), "scheduler lcm"),
          "an unknown scheduler: %s", sdx4_last_error());
    p.scheduler = "dpm++2m", p.scheduler_options = "true";
    CHECK(sdx4_check_params(&p) != SDX4_OK && strstr(sdx4_last_error(), "scheduler_options"),
          "options not an object: %s", sdx4_last_error());
    p.scheduler_options = "{\"use_karras_sigmas\": true}";
    CHECK(sdx4_check_params(&p) == SDX4_OK, "dpm++2m with Karras sigmas: %s", sdx4_last_error());
    p.scheduler = p.scheduler_options = NULL;
    /* vae_tiling: NULL is the row's default, auto; a value outside the
     * choices is refused naming them */
    const sdx4_param *tiling = sdx4_param_find("vae_tiling");
    CHECK(!p.vae_tiling && tiling && !strcmp(tiling->choices[tiling->int_default], "auto"), "vae_tiling default");
    static const char *const good[] = {"off", "on", "auto"};
    for (int i = 0; i < 3; i++) {
        p.vae_tiling = good[i];
        CHECK(sdx4_check_params(&p) == SDX4_OK, "vae_tiling %s: %s", good[i], sdx4_last_error());
    }
    p.vae_tiling = "ON";
    CHECK(sdx4_check_params(&p) != SDX4_OK && !strcmp(sdx4_last_error(), "vae_tiling ON: expected off, on or auto"),
          "vae_tiling ON: %s", sdx4_last_error());
    p.vae_tiling = NULL;
    for (int i = 0; i < n; i++) {
        const sdx4_param *r = &rows[i];
        if (r->type == SDX4_PARAM_INT) {
            CHECK(r->int_min <= r->int_default && r->int_default <= r->int_max, "%s default", r->name);
            CHECK(field_number(&p, r->name) == (double)r->int_default, "%s: default %g", r->name,
                  field_number(&p, r->name));
        } else if (r->type == SDX4_PARAM_REAL) {
            CHECK(r->real_min <= r->real_default && r->real_default <= r->real_max, "%s default", r->name);
            CHECK(field_number(&p, r->name) == (float)r->real_default, "%s: default %g", r->name,
                  field_number(&p, r->name));
        } else if (r->type == SDX4_PARAM_SEED) {
            CHECK(r->int_min == 0 && r->int_max == SDX4_SEED_MAX, "seed range");
        } else if (r->type == SDX4_PARAM_CHOICE) { /* int_min..int_max index the choices */
            int k = 0;
            while (r->choices && r->choices[k]) k++;
            CHECK(r->int_min == 0 && r->int_max == k - 1 && r->int_default >= 0 && r->int_default < k,
                  "%s: %d choices, range %lld..%lld, default %lld", r->name, k, (long long)r->int_min,
                  (long long)r->int_max, (long long)r->int_default);
        }
    }
}

static void test_bounds(void) {
    int n;
    const sdx4_param *rows = sdx4_params(&n);
    for (int i = 0; i < n; i++) {
        const sdx4_param *r = &rows[i];
        if (r->type == SDX4_PARAM_INT) {
            CHECK(!refused(r, (double)r->int_min) && !refused(r, (double)r->int_max), "%s bounds", r->name);
            CHECK(refused(r, (double)r->int_min - 1) && refused(r, (double)r->int_max + 1), "%s past", r->name);
        } else if (r->type == SDX4_PARAM_REAL) { /* the fields are floats */
            float lo = (float)r->real_min, hi = (float)r->real_max;
            CHECK(!refused(r, lo) && !refused(r, hi), "%s bounds", r->name);
            CHECK(refused(r, nextafterf(lo, -INFINITY)) && refused(r, nextafterf(hi, INFINITY)) &&
                      refused(r, NAN) && refused(r, INFINITY),
                  "%s past", r->name);
        }
    }
    sdx4_upscale_params p;
    sdx4_upscale_params_default(&p);
    p.seed = SDX4_SEED_MAX;
    CHECK(sdx4_check_params(&p) == SDX4_OK, "seed max: %s", sdx4_last_error());
    p.seed = (uint64_t)SDX4_SEED_MAX + 1;
    CHECK(sdx4_check_params(&p) == SDX4_ERR_INVALID_ARGUMENT && strstr(sdx4_last_error(), "seed"),
          "seed 2^63: %s", sdx4_last_error());
    sdx4_upscale_params_default(&p);
    p.guidance_scale = 200;
    CHECK(sdx4_check_params(&p) == SDX4_ERR_INVALID_ARGUMENT &&
              !strcmp(sdx4_last_error(), "guidance_scale 200 is outside 0..50"),
          "guidance 200: %s", sdx4_last_error());
}

/* sdx4_check_params on the defaults with tile and tile_overlap set: its
 * message, "" when accepted. */
static const char *tile_check(int tile, int overlap) {
    sdx4_upscale_params p;
    sdx4_upscale_params_default(&p);
    p.tile = tile, p.tile_overlap = overlap;
    return sdx4_check_params(&p) == SDX4_OK ? "" : sdx4_last_error();
}

static void test_tile_rules(void) {
    CHECK(!strcmp(tile_check(0, 1024), ""), "no tile, any overlap: %s", sdx4_last_error());
    CHECK(!strcmp(tile_check(SDX4_MIN_TILE, SDX4_MIN_TILE - 1), ""), "the smallest tile: %s", sdx4_last_error());
    CHECK(!strcmp(tile_check(2048, 1024), ""), "the largest: %s", sdx4_last_error());
    const char *m = tile_check(16, 8);
    CHECK(!strcmp(m, "tile 16 is outside 32..2048 (0: automatic)"), "tile 16: %s", m);
    m = tile_check(1, 0);
    CHECK(strstr(m, "tile 1 is outside") != NULL, "tile 1: %s", m);
    m = tile_check(64, 96);
    CHECK(!strcmp(m, "tile_overlap 96 must be smaller than tile 64"), "overlap 96: %s", m);
    m = tile_check(32, 32); /* the default overlap: a tile of 32 needs a smaller one */
    CHECK(!strcmp(m, "tile_overlap 32 must be smaller than tile 32 (32 is tile_overlap's default: give a "
                     "smaller one, or a larger tile)"),
          "overlap 32: %s", m);
}

/* The windows as tiling.c lays them out on the whole latent. */
static void check_windows(int width, int height, int tile, int overlap) {
    tiling t;
    int ww = -1, wh = -1, n = sdx4_unet_windows(width, height, tile, overlap, 1, 1, &ww, &wh);
    if (sdx4_tiling_plan(&t, height, width, tile, overlap)) {
        CHECK(0, "tiling %dx%d tile %d: %s", width, height, tile, sdx4_last_error());
        return;
    }
    CHECK(n == t.count && ww == t.tw && wh == t.th, "%dx%d tile %d overlap %d: %d of %dx%d, tiling.c %d of %dx%d",
          width, height, tile, overlap, n, ww, wh, t.count, t.tw, t.th);
    sdx4_tiling_free(&t);
}

static void test_windows(void) {
    static const int cases[][4] = {
        {64, 64, 32, 8}, {64, 64, 32, 0}, {96, 64, 48, 16}, {512, 512, 128, 32}, {513, 200, 100, 99},
        {2048, 2048, 256, 32}, {2048, 64, 64, 32}, {100, 37, 32, 31}, {64, 64, 64, 32}, {64, 64, 2048, 32},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        check_windows(cases[i][0], cases[i][1], cases[i][2], cases[i][3]);
    int ww, wh;
    CHECK(sdx4_unet_windows(300, 200, 0, 32, 1, 1, &ww, &wh) == 1 && ww == 300 && wh == 200, "untiled (a UNet of 1 byte a pixel never tiles): %dx%d", ww, wh);
    CHECK(sdx4_unet_windows(300, 200, 300, 32, 1, 1, &ww, &wh) == 1 && ww == 300 && wh == 200, "tile = side: %dx%d", ww,
          wh);
    CHECK(sdx4_unet_windows(300, 200, 250, 32, 1, 1, &ww, &wh) == 2 && ww == 250 && wh == 200, "one axis: %dx%d", ww, wh);
    /* 2048 in 128 with 32: ceil((2048 - 32) / 96) = 21 a side */
    CHECK(sdx4_unet_windows(2048, 2048, 128, 32, 1, 1, &ww, &wh) == 21 * 21 && ww == 128 && wh == 128, "2048 px");
    CHECK(sdx4_unet_windows(64, 64, 32, 32, 1, 1, &ww, &wh) == -1 && strstr(sdx4_last_error(), "tile_overlap 32"),
          "overlap = tile: %s", sdx4_last_error());
    CHECK(sdx4_unet_windows(0, 64, 0, 0, 1, 1, &ww, &wh) == -1 && sdx4_unet_windows(64, -1, 32, 8, 1, 1, &ww, &wh) == -1,
          "no latent");
}

/* Automatic tiles (tile 0) for the full-size x4 upscaler's UNet, built from
 * its configs without weights: the service's largest default input, 512 px,
 * runs whole; larger ones in the largest windows whose UNet call fits
 * SDX4_UNET_TILING_BUDGET (8 pixels more a side would not). */
static void test_auto_windows(void) {
    model m;
    if (sdx4_model_spec(&m, SDX4_SOURCE_DIR "/assets/x4-upscaler")) {
        CHECK(0, "x4 configs: %s", sdx4_last_error());
        return;
    }
    int64_t per_pixel = sdx4_unet_bytes_per_pixel(&m.unet);
    int ww, wh;
    printf("  x4 UNet: %lld bytes a pixel of each batch item, guided 512x512 %.2f GiB\n", (long long)per_pixel,
           per_pixel * 2.0 * 512 * 512 / (1 << 30));
    CHECK(sdx4_unet_windows(512, 512, 0, 32, 1, per_pixel, &ww, &wh) == 1 && ww == 512 && wh == 512,
          "512 px guided: %dx%d", ww, wh);
    static const int sizes[][2] = {{1024, 1024}, {2048, 2048}, {2048, 600}, {720, 520}};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++)
        for (int guided = 0; guided < 2; guided++) {
            int w = sizes[i][0], h = sizes[i][1], n = sdx4_unet_windows(w, h, 0, 32, guided, per_pixel, &ww, &wh);
            int tile = ww > wh ? ww : wh, bw, bh, more = sdx4_unet_windows(w, h, tile + 8, 32, guided, 1, &bw, &bh);
            int64_t batch = guided ? 2 : 1, call = sdx4_tiling_windows_per_call(n) * batch * ww * wh * per_pixel;
            int64_t larger = sdx4_tiling_windows_per_call(more) * batch * bw * bh * per_pixel;
            printf("  %dx%d %s: %d window%s of %dx%d, %.2f GiB a call\n", w, h, guided ? "guided" : "unguided", n,
                   n > 1 ? "s" : "", ww, wh, call / (double)(1 << 30));
            if (batch * w * h * per_pixel <= SDX4_UNET_TILING_BUDGET) { /* 720x520 unguided */
                CHECK(n == 1 && ww == w && wh == h, "%dx%d guided %d fits, yet %d windows", w, h, guided, n);
                continue;
            }
            CHECK(n > 1 && tile % 8 == 0 && call <= SDX4_UNET_TILING_BUDGET && larger > SDX4_UNET_TILING_BUDGET,
                  "%dx%d guided %d: %d windows of %dx%d, %lld bytes a call, %lld with 8 more", w, h, guided, n, ww, wh,
                  (long long)call, (long long)larger);
        }
    sdx4_model_free(&m);
}

int main(void) {
    test_rows();
    test_bounds();
    test_tile_rules();
    test_windows();
    test_auto_windows();
    return test_finish("test_engine_params");
}
