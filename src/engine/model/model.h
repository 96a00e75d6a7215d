/*
 * model.h - a loaded StableDiffusionUpscalePipeline folder: its configs,
 * tokenizer, the three networks on a backend, and the two schedulers.
 *
 * Loading reads model_index.json and every component's config, refuses
 * what the engine does not implement by name, and maps the weights.
 * sdx4_model_spec() runs the same construction without files (weights in spec
 * mode) so that make-model can write a folder the loader accepts.
 */
#ifndef SDX4_MODEL_H
#define SDX4_MODEL_H

#include "model/scheduler.h"
#include "model/schedulers.h"
#include "model/text_encoder.h"
#include "model/unet.h"
#include "model/vae.h"
#include "text/tokenizer.h"

typedef struct {
    int max_noise_level;
    tokenizer *tok;
    config te_cfg, unet_cfg, vae_cfg;
    weight_source te_ws, unet_ws, vae_ws;
    text_encoder te;
    unet unet;
    vae_decoder vae;
    scheduler_source scheduler; /* each run builds its scheduler from it */
    ddpm_scheduler low_res_scheduler;
} model;

/* Loads everything from `dir` onto `be`; variant "fp16" prefers the
 * *.fp16.safetensors files. */
int sdx4_model_load(model *m, backend *be, const char *dir, const char *variant);
void sdx4_model_free(model *m);

/* Builds the networks from the configs in `dir` without weights: the
 * weight sources of m record names and shapes (see weights.h). */
int sdx4_model_spec(model *m, const char *dir);

#endif
