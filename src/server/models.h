/*
 * models.h - the models one server or worker serves: which folders, under
 * which names, loaded how, described how.
 *
 * `sdx4 serve` and `sdx4 worker` take the same settings (config.h): each
 * --model folder (repeatable; SDX4_MODEL and a settings file may list
 * several), then every model folder inside --models-dir, in name order.
 * The first is the default, the one a request without a `model` field
 * gets. A model is named by its folder's name (the first by --model-id
 * when given); names are unique.
 */
#ifndef SDX4_SERVER_MODELS_H
#define SDX4_SERVER_MODELS_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "config.h"
#include "server.h"

/* The models the settings name, not yet loaded (calloc'd array, *count
 * of them, state MODEL_LOADING): -1 with `err` naming the folder or the
 * name at fault (no model folder in --models-dir, two models of one name,
 * more than MAX_MODELS). */
int models_resolve(const server_config *cfg, served_model **out, int *count, char *err, size_t err_size);

/* Drops the versions (each freed by its last holder) and frees the array. */
void models_free(served_model *models, int count);

/* A new version of model `m` from the folder `dir` (its own, or another
 * for a swap): the engine opened with the settings, its facts, its
 * weights' digest and its estimator (min-side to max-side); logs
 * model_loaded. Referenced once, for the caller. NULL with `err`
 * ("<folder>: why") when it cannot be opened. */
model_version *models_open(const served_model *m, const char *dir, const server_config *cfg, char *err,
                           size_t err_size);
/* Makes `v` (whose reference passes to m) the version new work gets; the
 * one it replaces is freed by its last holder. */
void models_install(served_model *m, model_version *v);
/* models_open of its own folder, installed. The state stays MODEL_LOADING:
 * the caller moves it on. */
int models_load(served_model *m, const server_config *cfg, char *err, size_t err_size);

/* The version new work gets, referenced (NULL when none is loaded: an
 * API-only node); models_release drops the reference (NULL is fine). */
model_version *models_acquire(served_model *m);
void models_release(model_version *v);

/* The index of the model named `name` (exactly), or -1. */
int models_find(const served_model *models, int count, const char *name);

/* "a, b or c": the names, for problems and logs (malloc'd). */
char *models_names(const served_model *models, int count);

/* The names of the upscale parameters (sdx4_params' rows) that change a
 * loaded model's output: all of them for a diffusion model, only `tile`
 * for a GAN (which accepts the others and ignores them). */
json_t *models_applicable_parameters(const sdx4_model_info *info);

/* A loaded model's entry of GET /api/v1/models (`v` its version): {name,
 * model_hash, default, ready, kind, architecture, scale, parameters,
 * dtype, applicable_parameters}. */
json_t *models_entry(const served_model *m, const model_version *v, bool is_default);

/* Its parameters, all parts together. */
long long models_parameters(const sdx4_model_info *info);
/* The model's version: the SHA-256 of the weight files `info` names
 * (their names, sizes and bytes), as 64 hex digits; -1 with `err` when one
 * cannot be read or changed while it was read. The CLI's metadata takes
 * it too, so both say the same "Model hash". */
int models_digest(const sdx4_model_info *info, char hex[65], char *err, size_t err_size);

/* Whether a loaded model is a GAN (no steps, no prompt). */
bool models_is_gan(const served_model *m);

#endif
