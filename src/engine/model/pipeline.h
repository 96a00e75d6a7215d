/*
 * pipeline.h - StableDiffusionUpscalePipeline.__call__ on a loaded model.
 */
#ifndef SDX4_PIPELINE_H
#define SDX4_PIPELINE_H

#include <stdint.h>

#include "core/cancel.h"
#include "model/model.h"

/* How the decode runs: whole, in diffusers' tiles (vae.h), or in tiles
 * when the whole decode would hold more than a budget. */
typedef enum { VAE_TILING_OFF, VAE_TILING_ON, VAE_TILING_AUTO } vae_tiling_mode;

typedef struct {
    const float *image; /* [3, height, width] in [-1, 1], sides already
                           multiples of the VAE scale factor */
    int height, width;
    const char *prompt, *negative_prompt; /* NULL = "" */
    int steps;
    float guidance;
    int noise_level; /* 0..max_noise_level */
    float eta;
    uint64_t seed;
    /* NULL: the model's own scheduler; else a diffusers class name or an
     * alias, and JSON config overrides (schedulers.h) */
    const char *scheduler, *scheduler_options;
    /* Tiled UNet (MultiDiffusion): windows of tile x tile latent pixels
     * (clamped to the image) overlapping by at least tile_overlap, their
     * noise predictions blended at every step; a tile at least as large as
     * the image: untiled. 0: untiled while the UNet's activations
     * (sdx4_unet_bytes_per_pixel) fit in unet_budget (0:
     * SDX4_UNET_TILING_BUDGET), else sdx4_tiling_auto's windows. */
    int tile, tile_overlap;
    int64_t unet_budget;
    /* Golden tests replace the generator's first two draws with recorded
     * noise; NULL draws from torch.Generator().manual_seed(seed). */
    const float *image_noise, *initial_latents;
    /* After each step (step 1..steps; also 0 before the first), with the
     * latents [latent_channels, height, width]; a second-order sampler's
     * step is two UNet evaluations, as in diffusers' progress. A tiled
     * UNet's step counts one unit per UNet call (group of windows), also
     * reported between its calls: total is then steps x calls. Nonzero
     * cancels. */
    int (*on_step)(void *user, int step, int total, const float *latents);
    void *user;
    /* Optional: set by another thread, it stops the run within a tile of
     * the operation running (core/cancel.h); NULL never stops. */
    const sdx4_atomic_int *cancel;
    /* VAE_TILING_AUTO tiles when sdx4_vae_decode_bytes() exceeds vae_budget
     * (0: SDX4_VAE_TILING_BUDGET); vae_tile is the tile in latents, 0 for
     * the config's (sdx4_vae_tile: tests choose others) */
    vae_tiling_mode vae_tiling;
    int vae_tile;
    int64_t vae_budget;
} pipeline_args;

typedef struct {
    int prompt_tokens, prompt_truncated, negative_truncated;
    int vae_tiles;    /* tiles the decode ran in, 1 when whole */
    int unet_tile;    /* the window side the UNet ran with, 0 for the whole latent */
    int unet_windows; /* its windows, 1 when whole */
    double seconds_text, seconds_unet, seconds_vae;
    double seconds_scheduler; /* CPU seconds of the sampler (set_timesteps,
                                 scale_model_input, step), within seconds_unet */
    int unet_steps;           /* the scheduler's timesteps, each a UNet evaluation */
} pipeline_report;

/* Runs the pipeline; *out receives the decoded image [3, H*f, W*f] in
 * model space (about [-1, 1], not clamped), malloc'd. -1 with
 * SDX4_ERR_CANCELED when args->cancel or on_step stopped it. */
int sdx4_pipeline_run(const model *m, backend *be, const pipeline_args *args, float **out,
                      pipeline_report *report);

/* Runs n upscales (1..SDX4_MAX_BATCH) in lockstep, one UNet call a step
 * for all: each keeps its prompts, noise level, guidance scale, seed,
 * generator, sampler state and callbacks, so that its image is the one it
 * would be alone (batched arithmetic may round differently). They must
 * share the latent size, steps, sampler and its options, guidance or not,
 * and run untiled (a single upscale may be tiled). One that its caller
 * stops (cancel flag, on_step) leaves the batch, with statuses[k]
 * SDX4_ERR_CANCELED and outs[k] NULL; the others go on. In a batch, a
 * decode that fails on its own (its vae_tiling) fails only its upscale,
 * with its status. Every report gets the batch's UNet seconds. -1 with the
 * error set when the batch failed (no outputs). */
int sdx4_pipeline_run_batch(const model *m, backend *be, int n, const pipeline_args *args, float **outs,
                            pipeline_report *reports, sdx4_status *statuses);

/* Encodes [negative;] prompt as the pipeline does: [batch, 77, hidden]
 * with batch 2 (negative first) when do_cfg, else 1. */
tensor *sdx4_pipeline_encode_prompt(const model *m, backend *be, const char *prompt,
                               const char *negative, int do_cfg, pipeline_report *report);

/* vae.decode(latents / scaling_factor) of host latents [C, h, w] as the
 * pipeline runs it, in float's range on every backend (the VAE overflows
 * in fp16): whole, or in diffusers' tiles of `tile` latents (0: the
 * config's, sdx4_vae_tile) when tiling is ON, or AUTO and the whole decode
 * would hold more than budget bytes (0: SDX4_VAE_TILING_BUDGET). *out
 * receives the malloc'd image [out_channels, h * f, w * f]; returns the
 * number of tiles (1 when whole), or -1. */
int sdx4_pipeline_decode(const model *m, backend *be, const float *latents, int h, int w,
                         vae_tiling_mode tiling, int tile, int64_t budget, float **out);

#endif
