/*
 * cost.h - how long an upscale will take, estimated before it runs.
 *
 * Thread-safe: the workers teach it while HTTP threads ask it.
 */
#ifndef SDX4_SERVER_COST_H
#define SDX4_SERVER_COST_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "sdx4.h"

typedef struct cost_model cost_model;

/* An estimator for the engine's model, knowing nothing yet. Requests have
 * sides from min_side to max_side: calibrated means measured over enough
 * of that range (cost.c). */
cost_model *cost_create(sdx4_engine *engine, int min_side, int max_side);
void cost_destroy(cost_model *c);

/* Seconds an upscale of a width x height image with `steps` UNet
 * evaluations should take alone on the device; 0 before the first
 * measurement. tile and tile_overlap are the request's (tile 0:
 * automatic): a tiled upscale's steps cost its windows (sdx4_unet_windows)
 * times one window's step. */
double cost_estimate(cost_model *c, int width, int height, int tile, int tile_overlap, int steps, bool guided);

/* Whether the estimates rest on measurements at sizes far enough apart to
 * tell the attention's cost from the rest's: only then may they refuse
 * requests. */
bool cost_calibrated(cost_model *c);

/* Learns from a finished upscale: its report's seconds, times `alone`
 * (the fraction of them it would have taken without other upscales
 * sharing the device). A calibration run (the warm-up's) is kept for
 * good; the others count less as newer ones come. */
void cost_observe(cost_model *c, int width, int height, int tile, int tile_overlap, int steps, bool guided,
                  const sdx4_upscale_report *report, double alone, bool calibration);

/* Runs a one-step guided upscale of width x height (a warm-up: the first
 * client of that size then pays no lazy allocation, and on a GPU no choice
 * of algorithms, made once per shape); `report` (or NULL) gets its
 * timings. -1 when it failed. */
int cost_warm_up(sdx4_engine *engine, int width, int height, sdx4_upscale_report *report);

/* Runs a one-step guided upscale of width x height on the engine, alone,
 * and keeps its timings as a calibration run unless `keep` is false (a
 * GPU's first run at a size, which chooses its algorithms); -1 when it
 * failed. */
int cost_measure(cost_model *c, int width, int height, bool keep);

/* Teaches the estimator at two sizes, the smallest warmed up (w0 x h0) and
 * one with at least 4 times its pixels (w1 x h1, warmed up or not), so
 * that it can tell what grows with the square of the pixels (attention)
 * from what grows with the pixels. Measured runs follow a first run at
 * their size: the process's first upscale pays once for mapping the
 * weights, and on a GPU the first at each size chooses its algorithms.
 * Returns cost_document with the seconds it took, or NULL when an upscale
 * failed. */
json_t *cost_calibrate(cost_model *c, bool gpu, int w0, int h0, int w1, int h1, bool warmed1);

/* The calibration for model-info: achieved GFLOP/s of each part and kind,
 * and the estimated seconds of one step and of the rest at the smallest
 * and largest allowed sizes. */
json_t *cost_document(cost_model *c);

/* The estimator without the model, for API nodes that load none (cluster
 * mode): each part's seconds, guided and one step, for square images of
 * three sizes (pixels[0] < pixels[1] < pixels[2]); the seconds of other
 * sizes follow by quadratic interpolation in the pixels, which is what
 * the FLOPs are (dense ones linear, attention quadratic). Workers publish
 * it in their registration. */
typedef struct {
    bool calibrated;
    double pixels[3];
    double text[3], step[3], decode[3];       /* untiled */
    int64_t unet_bytes_per_pixel;             /* the model's: where tile 0 tiles (0: never) */
} cost_curve;

/* The estimator's curve over its sides; -1 before the first measurement. */
int cost_get_curve(cost_model *c, cost_curve *out);
json_t *cost_curve_to_json(const cost_curve *k);
/* Strict: -1 with `err` naming what is wrong. */
int cost_curve_from_json(const json_t *j, cost_curve *k, char *err, size_t err_size);
/* cost_estimate's seconds from a curve. */
double cost_curve_estimate(const cost_curve *k, int width, int height, int tile, int tile_overlap, int steps,
                           bool guided);

#endif
