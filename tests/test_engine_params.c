/*
 * test_engine_params.c - the engine's table of upscale parameters
 * (sdx4_params) and the check that needs no model (sdx4_check_params).
 *
 * The table is what the CLI, the server and openapi.json are held to, so
 * it is checked for itself here: one row per field of sdx4_upscale_params
 * a user sets, defaults inside their ranges and equal to what
 * sdx4_upscale_params_default fills in, and every bound accepted by
 * sdx4_check_params while the next value outward is refused with a
 * message naming the parameter.
 */
#include <math.h>

#include "sdx4.h"
#include "test.h"

static const char *const expected[] = {"prompt", "negative_prompt", "num_inference_steps",
                                       "guidance_scale", "noise_level", "seed", "eta",
                                       "scheduler", "scheduler_options", "vae_tiling"};

/* Sets the field of row `name` to v (numbers only). */
static void set_number(sdx4_upscale_params *p, const char *name, double v) {
    if (!strcmp(name, "num_inference_steps")) p->num_inference_steps = (int)v;
    else if (!strcmp(name, "guidance_scale")) p->guidance_scale = (float)v;
    else if (!strcmp(name, "noise_level")) p->noise_level = (float)v;
    else if (!strcmp(name, "eta")) p->eta = (float)v;
    else CHECK(0, "no field for %s", name);
}

static double field_number(const sdx4_upscale_params *p, const char *name) {
    if (!strcmp(name, "num_inference_steps")) return p->num_inference_steps;
    if (!strcmp(name, "guidance_scale")) return p->guidance_scale;
    if (!strcmp(name, "noise_level")) return p->noise_level;
    if (!strcmp(name, "eta")) return p->eta;
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

int main(void) {
    test_rows();
    test_bounds();
    return test_finish("test_engine_params");
}
