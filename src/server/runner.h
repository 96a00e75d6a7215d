/*
 * runner.h - one upscale task from its options to its encoded image.
 *
 * The single-process queue (queue.c) and the cluster's workers (worker.c)
 * run a task through the same two calls, so that both modes give the same
 * bytes for the same seed and the same problem for the same failure. The
 * callers keep their own bookkeeping around them (timing, cost learning,
 * the cache, where the outcome goes).
 */
#ifndef SDX4_SERVER_RUNNER_H
#define SDX4_SERVER_RUNNER_H

#include "form.h"
#include "jobs.h"
#include "sdx4.h"

/* The content check (--safety-checker): one checker for the process,
 * opened before the first upscale (runner_content_check_open: 0, or -1
 * with err set, naming the folder) and closed after the last. While one is
 * open, every successful upscale's image is checked where it is produced
 * (runner_upscale_batch, which the single process and the cluster's
 * workers both run): a flagged one fails its task with the problem
 * content-flagged (--safety-action refuse) or is blacked out (blackout). */
int runner_content_check_open(const server_config *cfg, char *err, size_t errlen);
void runner_content_check_close(void);
/* What this process does to its outputs: "" (no check), "refuse" or
 * "blackout" (config_content_check of the settings it opened). A cluster
 * worker's task states carry it, so that an API node with the check on
 * never keeps an output made otherwise under its key. */
const char *runner_content_check_policy(void);

/* The engine's parameters of a task's options (no progress callback, no
 * stop flag). */
void runner_params(const upscale_options *opts, sdx4_upscale_params *p);

/* Whether upscales of these inputs and options can share their UNet calls
 * (sdx4_batchable). */
bool runner_batchable(sdx4_engine *engine, const sdx4_image *a, const upscale_options *oa, const sdx4_image *b,
                      const upscale_options *ob);
/* How many upscales like this one may share its UNet calls: at most
 * `most`, and what the engine's memory budget allows (sdx4_batch_capacity). */
int runner_batch_room(sdx4_engine *engine, const sdx4_image *input, const upscale_options *opts, int most);

/* One upscale of a batch: the engine runs `input` with `opts`; `stop`
 * (set by another thread) ends it at the next step boundary, `progress`
 * (or NULL) hears each step, with `user`, and may stop it too. */
typedef struct {
    const sdx4_image *input;
    const upscale_options *opts;
    const sdx4_atomic_int *stop;
    void *user; /* progress's */
    sdx4_image *image;
    task_outcome *out;
} runner_item;

/* Runs n upscales (1..SDX4_MAX_BATCH) that sdx4_batchable allows to share
 * their UNet calls, each ending as it would alone: out->state
 * JOB_SUCCEEDED with `image` filled, JOB_CANCELED (stopped), or JOB_FAILED
 * with out->error set; out->report filled in every case the engine got
 * that far, and out->compute_seconds the run's time shared by the n (what
 * the usage report counts per client). */
void runner_upscale_batch(sdx4_engine *engine, runner_item *items, int n, sdx4_progress_fn progress);

/* Where an output came from, for its metadata (opts->metadata). */
typedef struct {
    const char *model; /* its name */
    const char *model_hash; /* its version's digest (models.c), NULL unknown */
    bool gan;
    int input_width, input_height;
    const void *icc; /* the input's ICC profile, NULL none */
    size_t icc_len;
} runner_origin;

/* 0, or -1 and a problem (422, field metadata) when opts ask for metadata
 * in a JPEG or WebP whose EXIF could not hold the text (very long
 * prompts): refused before the upscale rather than failed after it. */
int runner_check_metadata(const upscale_options *opts, const char *model, bool gan, problem *p);

/* Resizes and crops `image` as opts ask (resize_*, crop_*: none by
 * default), then encodes it in opts' format into out (output, len, width,
 * height, state JOB_SUCCEEDED), or fails `out` with the reason; frees the
 * pixels. With opts->metadata the file also holds the parameters as
 * AUTOMATIC1111's text (infotext.h) and `origin`'s ICC profile; without
 * it `origin` is not read (NULL will do). */
void runner_encode(sdx4_image *image, const upscale_options *opts, const runner_origin *origin,
                   task_outcome *out);

#endif
