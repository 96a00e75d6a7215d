/*
 * cost.c - the time an upscale will take, from its arithmetic and what the
 * device was measured to do (see cost.h).
 *
 * The model. An upscale is three parts: the text encoder (once), the
 * UNet (once per step) and the VAE decode (once). The engine counts each
 * part's FLOPs for a given size from the model's configuration
 * (sdx4_count_flops), in two kinds: dense (convolutions, linear layers:
 * linear in the pixels) and attention (QK^T and AV: quadratic in the
 * pixels where a layer attends over every position, as the VAE's mid-block
 * does). Each part p has its own seconds per FLOP for each kind, d_p and
 * a_p, and an upscale of `steps` steps is estimated as
 *
 *     sum over p of  d_p * dense_p + a_p * attention_p
 *
 * with the step's FLOPs times `steps`. A tiled UNet (the request's
 * `tile`) runs each step as windows of one size: its step's FLOPs are
 * those of one window times their number, so that a 2048 px input in
 * 128 px windows overlapping by 32 costs 21 x 21 windows' work, not the
 * attention of 4 million positions at once. Counting FLOPs, not pixels, is
 * what lets measurements at small sizes speak for large ones: on the tiny
 * model the decode's attention is a quarter of its FLOPs at 64 px and 96%
 * at 512 px, so seconds per pixel measured at 64 px would underestimate a
 * 512 px decode about 18 times. Two rates per part, because a device need
 * not run both kinds equally well (the softmax, small heads).
 *
 * Fitting. Each measured part gives one equation t = d * D + a * A; the
 * rates minimize the sum of squared relative errors (each equation divided
 * by its t, so that small and large images count alike). The two rates
 * are kept within a factor of 2 of each other and pulled together unless
 * the measurements clearly part them (refit() says why): on 2 CPU cores
 * the tiny model's decode ran 34-40 GFLOP/s from 64 to 192 px while its
 * attention share rose from 27% to 77% (both kinds at about one rate),
 * and a fit left free read one-step runs at 32 and 64 px as an attention 9
 * times slower than the rest. With measurements at one size only, one
 * rate serves both kinds; the FLOP count still carries the quadratic term.
 *
 * Measurements. The warm-up's calibration runs (serve.c: one-step
 * upscales at two sizes, the larger with four times the pixels) are kept
 * for good; every finished upscale adds its own, and those decay by 0.9
 * with each newer one, so the estimates follow the machine (the real
 * jobs, ten of them worth, outweigh the calibration) while the
 * calibration keeps both kinds identified when real jobs come in one size.
 * A job that shared the device is measured in the time it would have
 * taken alone (queue.c's virtual clock gives the fraction).
 *
 * Cold. Until the measurements span enough of the allowed sizes (a side
 * ratio of 2, or the whole range when it is narrower) the estimates are
 * extrapolations, and cost_calibrated() says so: the queue then admits
 * as if there were no estimator. With --warmup false that lasts until
 * real jobs have covered such a span.
 *
 * A GAN (ESRGAN's family) has no text encoder and no steps: its one
 * forward is counted by the engine as the decode's FLOPs (all dense) and
 * timed as the UNet's seconds, which this estimator files under the
 * decode, so that warm-up calibrates it and finished upscales teach it as
 * they do a diffusion model's. Each served model has an estimator of its
 * own (models.c).
 *
 * Without the model. An API node of a cluster loads no model, so it
 * cannot count FLOPs; the workers publish their estimator as a curve
 * (cost_curve): each part's seconds at three square sizes from min-side
 * to max-side. Each part's FLOPs are a quadratic in the pixels (a
 * constant for the text encoder, dense ones linear, attention quadratic),
 * so its seconds are too, and three points give the quadratic back:
 * exact at squares, and off by the sides' rounding elsewhere; also for a
 * tiled upscale's windows, which may be smaller than min-side.
 */
#include "cost.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { PART_TEXT, PART_STEP, PART_DECODE, PART_COUNT };
static const char *const part_names[PART_COUNT] = {"text", "step", "decode"};

#define RECENT_DECAY 0.9

/* Sums for the least squares of relative errors: w, and with x = dense / t
 * and y = attention / t their weighted products. */
typedef struct {
    double w, xx, xy, yy, x, y;
} fit_sums;

typedef struct {
    fit_sums pinned, recent; /* calibration runs; other upscales, decaying */
    double dense, attention; /* seconds per FLOP, 0 before any measurement */
} part_fit;

struct cost_model {
    sdx4_engine *engine;
    bool gan; /* a GAN: all its work is one forward, counted and measured as the decode */
    int scale_factor; /* the latent's sides are the input's rounded down to it */
    int64_t unet_bytes_per_pixel; /* what automatic tiles weigh (sdx4_unet_windows) */
    int min_side, max_side;
    pthread_mutex_t lock;
    part_fit part[PART_COUNT];
    int observations;
    double min_pixels, max_pixels; /* of the images measured */
};

cost_model *cost_create(sdx4_engine *engine, int min_side, int max_side) {
    cost_model *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->engine = engine;
    sdx4_model_info info;
    sdx4_engine_info(engine, &info);
    c->gan = info.kind && strcmp(info.kind, "gan") == 0;
    c->scale_factor = info.vae_scale_factor;
    c->unet_bytes_per_pixel = info.unet_bytes_per_pixel;
    c->min_side = min_side;
    c->max_side = max_side;
    pthread_mutex_init(&c->lock, NULL);
    return c;
}

void cost_destroy(cost_model *c) {
    if (!c) return;
    pthread_mutex_destroy(&c->lock);
    free(c);
}

/* Each part's FLOPs for one upscale (the step's times `steps`, and times
 * the windows of a tiled one); -1 when the engine cannot run that size at
 * all. */
static int work(cost_model *c, int width, int height, int tile, int overlap, int steps, bool guided,
                sdx4_flops out[PART_COUNT]) {
    sdx4_flop_counts f, window;
    if (sdx4_count_flops(c->engine, width, height, &f) != SDX4_OK) return -1;
    if (c->gan) { /* no text, no steps: its tiles, grown by the receptive radius, are not counted */
        out[PART_TEXT] = out[PART_STEP] = (sdx4_flops){0, 0};
        out[PART_DECODE] = f.decode;
        return 0;
    }
    int ww, wh, windows = sdx4_unet_windows(width - width % c->scale_factor, height - height % c->scale_factor,
                                            tile, overlap, guided, c->unet_bytes_per_pixel, &ww, &wh);
    if (windows < 0) return -1;
    if (windows > 1) {
        if (sdx4_count_flops(c->engine, ww, wh, &window) != SDX4_OK) return -1;
        f.step = window.step;
    }
    double batch = guided ? 1 : 0.5, runs = batch * steps * windows; /* the counts are for batch 2 */
    out[PART_TEXT] = (sdx4_flops){f.text.dense * batch, f.text.attention * batch};
    out[PART_STEP] = (sdx4_flops){f.step.dense * runs, f.step.attention * runs};
    out[PART_DECODE] = f.decode;
    return 0;
}

static void add(fit_sums *s, double x, double y, double weight) {
    s->w += weight;
    s->xx += weight * x * x, s->xy += weight * x * y, s->yy += weight * y * y;
    s->x += weight * x, s->y += weight * y;
}

static void decay(fit_sums *s, double factor) {
    s->w *= factor, s->xx *= factor, s->xy *= factor, s->yy *= factor;
    s->x *= factor, s->y *= factor;
}

/* The rates minimizing sum w (1 - dense * x - attention * y)^2, with
 * attention = k * dense and k from 1/2 to 2, nearer 1 unless the data
 * clearly say otherwise: two sizes measured a few seconds apart on a
 * shared machine cannot pin the attention's rate down better than that,
 * and an attention rate fitted wildly off would be multiplied by the
 * largest images' quadratic term. For each k the best dense rate r is
 * sum z / sum z^2 (z = x + k y), leaving w - (sum z)^2 / sum z^2. */
static void refit(part_fit *p) {
    fit_sums s = p->pinned;
    s.w += p->recent.w, s.xx += p->recent.xx, s.xy += p->recent.xy, s.yy += p->recent.yy;
    s.x += p->recent.x, s.y += p->recent.y;
    double best = INFINITY;
    for (int j = -8; j <= 8; j++) {
        double k = exp2(j / 8.0), z = s.x + k * s.y, zz = s.xx + 2 * k * s.xy + k * k * s.yy;
        if (!(zz > 0)) continue;
        double misfit = s.w - z * z / zz + s.w * 0.02 * log(k) * log(k);
        if (misfit < best) best = misfit, p->dense = z / zz, p->attention = k * z / zz;
    }
}

static double seconds(const part_fit *p, sdx4_flops f) {
    return p->dense * f.dense + p->attention * f.attention;
}

double cost_estimate(cost_model *c, int width, int height, int tile, int tile_overlap, int steps, bool guided) {
    sdx4_flops f[PART_COUNT];
    if (work(c, width, height, tile, tile_overlap, steps, guided, f)) return 0;
    double total = 0;
    pthread_mutex_lock(&c->lock);
    for (int p = 0; p < PART_COUNT; p++) total += seconds(&c->part[p], f[p]);
    pthread_mutex_unlock(&c->lock);
    return total;
}

bool cost_calibrated(cost_model *c) {
    double range = (double)c->max_side * c->max_side / ((double)c->min_side * c->min_side);
    double needed = range < 4 ? range : 4;
    pthread_mutex_lock(&c->lock);
    bool ok = c->observations > 0 && c->max_pixels >= needed * c->min_pixels;
    pthread_mutex_unlock(&c->lock);
    return ok;
}

void cost_observe(cost_model *c, int width, int height, int tile, int tile_overlap, int steps, bool guided,
                  const sdx4_upscale_report *r, double alone, bool calibration) {
    sdx4_flops f[PART_COUNT];
    if (!(alone > 0) || work(c, width, height, tile, tile_overlap, steps, guided, f)) return;
    double measured[PART_COUNT] = {r->seconds_text, r->seconds_unet, r->seconds_vae};
    if (c->gan) /* its forward's seconds are reported as the UNet's (sdx4.h), its FLOPs as the decode's */
        measured[PART_TEXT] = measured[PART_STEP] = 0, measured[PART_DECODE] = r->seconds_unet + r->seconds_vae;
    double pixels = (double)width * height;
    pthread_mutex_lock(&c->lock);
    for (int p = 0; p < PART_COUNT; p++) {
        double t = measured[p] * alone;
        if (!(t > 0) || !(f[p].dense + f[p].attention > 0)) continue;
        part_fit *fit = &c->part[p];
        if (!calibration) decay(&fit->recent, RECENT_DECAY);
        add(calibration ? &fit->pinned : &fit->recent, f[p].dense / t, f[p].attention / t, 1);
        refit(fit);
    }
    if (!c->observations++) c->min_pixels = c->max_pixels = pixels;
    if (pixels < c->min_pixels) c->min_pixels = pixels;
    if (pixels > c->max_pixels) c->max_pixels = pixels;
    pthread_mutex_unlock(&c->lock);
}

int cost_warm_up(sdx4_engine *engine, int width, int height, sdx4_upscale_report *report) {
    sdx4_image in = {width, height, malloc((size_t)width * height * 3)}, out = {0};
    if (!in.pixels) return -1;
    for (size_t i = 0; i < (size_t)width * height * 3; i++) in.pixels[i] = (uint8_t)(i * 7);
    sdx4_upscale_params p;
    sdx4_upscale_params_default(&p);
    p.num_inference_steps = 1;
    p.seed = 0;
    sdx4_status st = sdx4_upscale(engine, &in, &p, &out, report);
    free(in.pixels);
    sdx4_image_free(&out);
    return st == SDX4_OK ? 0 : -1;
}

int cost_measure(cost_model *c, int width, int height, bool keep) {
    sdx4_upscale_report r;
    if (cost_warm_up(c->engine, width, height, &r)) return -1;
    if (keep) cost_observe(c, width, height, 0, 0, 1, true, &r, 1.0, true);
    return 0;
}

json_t *cost_calibrate(cost_model *c, bool gpu, int w0, int h0, int w1, int h1, bool warmed1) {
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    if (cost_measure(c, w0, h0, true)) return NULL;
    if ((double)w1 * h1 > (double)w0 * h0) {
        if (!warmed1 && gpu && cost_measure(c, w1, h1, false)) return NULL;
        if (cost_measure(c, w1, h1, true)) return NULL;
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    json_t *doc = cost_document(c);
    json_object_set_new(doc, "seconds",
                        json_real((double)(end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) * 1e-9));
    return doc;
}

static json_t *gflops(double seconds_per_flop) {
    return seconds_per_flop > 0 ? json_real(1e-9 / seconds_per_flop) : json_null();
}

/* One step and the rest (text + decode) at a square size, into `list`. */
static void add_example(cost_model *c, json_t *list, int side) {
    sdx4_flops f[PART_COUNT];
    if (work(c, side, side, 0, 0, 1, true, f)) return;
    json_array_append_new(
        list, json_pack("{s:i,s:i,s:f,s:f}", "width", side, "height", side, "step_seconds",
                        seconds(&c->part[PART_STEP], f[PART_STEP]), "other_seconds",
                        seconds(&c->part[PART_TEXT], f[PART_TEXT]) +
                            seconds(&c->part[PART_DECODE], f[PART_DECODE])));
}

json_t *cost_document(cost_model *c) {
    bool calibrated = cost_calibrated(c);
    json_t *rates = json_object(), *examples = json_array();
    pthread_mutex_lock(&c->lock);
    for (int p = 0; p < PART_COUNT; p++)
        json_object_set_new(rates, part_names[p],
                            json_pack("{s:o,s:o}", "dense", gflops(c->part[p].dense), "attention",
                                      gflops(c->part[p].attention)));
    add_example(c, examples, c->min_side);
    add_example(c, examples, c->max_side);
    int observations = c->observations;
    pthread_mutex_unlock(&c->lock);
    return json_pack("{s:b,s:i,s:o,s:o}", "calibrated", calibrated, "observations", observations,
                     "gflops", rates, "estimates", examples);
}

/* ---- the curve (cost.h) ------------------------------------------------------ */

int cost_get_curve(cost_model *c, cost_curve *out) {
    int sides[3] = {c->min_side, (c->min_side + c->max_side) / 2, c->max_side};
    *out = (cost_curve){.calibrated = cost_calibrated(c), .unet_bytes_per_pixel = c->unet_bytes_per_pixel};
    pthread_mutex_lock(&c->lock);
    int rc = c->observations > 0 && sides[0] < sides[1] && sides[1] < sides[2] ? 0 : -1;
    for (int i = 0; rc == 0 && i < 3; i++) {
        sdx4_flops f[PART_COUNT];
        if (work(c, sides[i], sides[i], sides[i], 0, 1, true, f)) { /* whole: a tile of the side */
            rc = -1;
            break;
        }
        out->pixels[i] = (double)sides[i] * sides[i];
        out->text[i] = seconds(&c->part[PART_TEXT], f[PART_TEXT]);
        out->step[i] = seconds(&c->part[PART_STEP], f[PART_STEP]);
        out->decode[i] = seconds(&c->part[PART_DECODE], f[PART_DECODE]);
    }
    pthread_mutex_unlock(&c->lock);
    return rc;
}

static json_t *triple(const double v[3]) { return json_pack("[f,f,f]", v[0], v[1], v[2]); }

json_t *cost_curve_to_json(const cost_curve *k) {
    return json_pack("{s:b,s:o,s:o,s:o,s:o,s:I}", "calibrated", k->calibrated, "pixels", triple(k->pixels), "text",
                     triple(k->text), "step", triple(k->step), "decode", triple(k->decode), "unet_bytes_per_pixel",
                     (json_int_t)k->unet_bytes_per_pixel);
}

static int get_triple(const json_t *j, const char *name, double v[3], char *err, size_t n) {
    const json_t *a = json_object_get(j, name);
    for (size_t i = 0; json_is_array(a) && json_array_size(a) == 3 && i < 3; i++) {
        const json_t *x = json_array_get(a, i);
        v[i] = json_number_value(x);
        if (!json_is_number(x) || !(v[i] >= 0 && v[i] < 1e12)) break;
        if (i == 2) return 0;
    }
    snprintf(err, n, "cost curve: \"%s\" must be 3 numbers from 0 to 1e12", name);
    return -1;
}

int cost_curve_from_json(const json_t *j, cost_curve *k, char *err, size_t n) {
    *k = (cost_curve){0};
    const json_t *calibrated = json_object_get(j, "calibrated");
    if (!json_is_boolean(calibrated)) return snprintf(err, n, "cost curve: \"calibrated\" must be true or false"), -1;
    k->calibrated = json_is_true(calibrated);
    if (get_triple(j, "pixels", k->pixels, err, n) || get_triple(j, "text", k->text, err, n) ||
        get_triple(j, "step", k->step, err, n) || get_triple(j, "decode", k->decode, err, n))
        return -1;
    if (!(0 < k->pixels[0] && k->pixels[0] < k->pixels[1] && k->pixels[1] < k->pixels[2]))
        return snprintf(err, n, "cost curve: \"pixels\" must increase from above 0"), -1;
    /* absent from a worker of an earlier version: its curve stands, as one
     * of a model that never tiles by itself */
    const json_t *per_pixel = json_object_get(j, "unet_bytes_per_pixel");
    k->unet_bytes_per_pixel = json_integer_value(per_pixel);
    if (per_pixel && (!json_is_integer(per_pixel) || k->unet_bytes_per_pixel < 1 ||
                      k->unet_bytes_per_pixel > (int64_t)1 << 30))
        return snprintf(err, n, "cost curve: \"unet_bytes_per_pixel\" must be an integer from 1 to 2^30"), -1;
    return 0;
}

/* The quadratic through (x[i], y[i]) at `at` (Lagrange's form), at least 0. */
static double interpolate(const double x[3], const double y[3], double at) {
    double sum = 0;
    for (int i = 0; i < 3; i++) {
        double term = y[i];
        for (int m = 0; m < 3; m++)
            if (m != i) term *= (at - x[m]) / (x[i] - x[m]);
        sum += term;
    }
    return sum > 0 ? sum : 0;
}

double cost_curve_estimate(const cost_curve *k, int width, int height, int tile, int tile_overlap, int steps,
                           bool guided) {
    double pixels = (double)width * height, batch = guided ? 1 : 0.5; /* as work() counts */
    int ww, wh, windows = sdx4_unet_windows(width, height, tile, tile_overlap, guided, k->unet_bytes_per_pixel, &ww,
                                            &wh);
    if (windows < 0) return 0;
    double step = windows * interpolate(k->pixels, k->step, (double)ww * wh);
    return batch * (interpolate(k->pixels, k->text, pixels) + steps * step) + interpolate(k->pixels, k->decode, pixels);
}
