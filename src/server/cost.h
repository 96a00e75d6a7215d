/*
 * cost.h - how long an upscale will take, estimated before it runs.
 *
 * Thread-safe: the workers teach it while HTTP threads ask it.
 */
#ifndef SDX4_SERVER_COST_H
#define SDX4_SERVER_COST_H

#include <stdbool.h>

#include <jansson.h>

#include "sdx4.h"

typedef struct cost_model cost_model;

/* An estimator for the engine's model, knowing nothing yet. Requests have
 * sides from min_side to max_side: calibrated means measured over enough
 * of that range (cost.c). */
cost_model *cost_create(sdx4_engine *engine, int min_side, int max_side);
void cost_destroy(cost_model *c);

/* Seconds an upscale of a width x height image with `steps` steps should
 * take alone on the device; 0 before the first measurement. */
double cost_estimate(cost_model *c, int width, int height, int steps, bool guided);

/* Whether the estimates rest on measurements at sizes far enough apart to
 * tell the attention's cost from the rest's: only then may they refuse
 * requests. */
bool cost_calibrated(cost_model *c);

/* Learns from a finished upscale: its report's seconds, times `alone`
 * (the fraction of them it would have taken without other upscales
 * sharing the device). A calibration run (the warm-up's) is kept for
 * good; the others count less as newer ones come. */
void cost_observe(cost_model *c, int width, int height, int steps, bool guided,
                  const sdx4_upscale_report *report, double alone, bool calibration);

/* The calibration for model-info: achieved GFLOP/s of each part and kind,
 * and the estimated seconds of one step and of the rest at the smallest
 * and largest allowed sizes. */
json_t *cost_document(cost_model *c);

#endif
