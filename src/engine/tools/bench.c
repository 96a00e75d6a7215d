/*
 * bench.c - sdx4_bench(): the figures of BENCHMARKS.md, timed inside the
 * engine so that each part is measured alone (text encoder, one guided
 * UNet step, VAE decode) and then together (a whole upscale, with the
 * caller's sampler, whose own host time per step the pipeline reports).
 */
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "core/error.h"
#include "core/rng.h"
#include "engine_internal.h"
#include "model/pipeline.h"
#include "model/schedulers.h"

static double now_ms(void) { return 1e3 * mono_seconds(); }

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, n, sizeof *v, by_value);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Waits for the backend's queued work, so that a part's time is its own. */
static int finish(backend *be) { return be->synchronize ? be->synchronize(be) : 0; }

static tensor *random_tensor(backend *be, int64_t b, int64_t c, int64_t h, int64_t w,
                             torch_rng *rng) {
    tensor *t = be->new_tensor(be, 4, (int64_t[]){b, c, h, w});
    float *host = malloc(sizeof *host * b * c * h * w);
    if (t && host) {
        sdx4_torch_randn(rng, host, (size_t)(b * c * h * w));
        be->upload(be, t, host);
    }
    free(host);
    return t;
}

/* The UNet step of the pipeline as a backend step (backend.h), and the
 * number of times it ran. */
typedef struct {
    model *m;
    backend *be;
    const tensor *x, *tproj, *cls, *ctx;
    kv_cache *kv;
    tensor *y;
    int runs;
} bench_step;

static int bench_step_forward(void *arg) {
    bench_step *b = arg;
    b->runs++;
    DROP(b->y);
    b->y = sdx4_unet_forward_embedded(b->be, &b->m->unet, b->x, b->tproj, b->cls, b->ctx, b->kv);
    return b->y ? 0 : -1;
}

/* The UNet step as pipeline.c runs it, through a backend step, once the
 * backend's first runs are over: replayed where the backend replays steps
 * (CUDA graphs), in the memory its planning pass laid out where it plans
 * them (the CPU); 0 ms where it does neither. */
static int time_pipeline_step(model *m, backend *be, const tensor *x, const tensor *ctx,
                              const int32_t *labels, double *t, int repeats, double *ms) {
    *ms = 0.0;
    if (!be->step_new) return 0;
    int batch = (int)x->shape[0], rc = -1;
    tensor *tproj = NULL, *cls = NULL;
    backend_step *step = NULL;
    bench_step b = {.m = m, .be = be, .x = x, .ctx = ctx};
    TRY(b.tproj = tproj = sdx4_unet_new_timestep(be, &m->unet, batch, 500.0f));
    if (m->unet.class_embedding)
        TRY(b.cls = cls = sdx4_unet_class_embedding(be, &m->unet, labels, batch));
    TRY(b.kv = sdx4_kv_cache_new());
    TRY(step = sdx4_step_new(be));
    /* the backend's first runs of the step (warm-up, planning, recording)
     * call the UNet, as in the pipeline; where it replays, the first that
     * does not is a replay, the untimed one (10: a bound, should a backend
     * never replay); where it does not, two runs (warm-up, planning) and
     * one untimed in the planned memory, which faults it in */
    int before;
    do {
        before = b.runs;
        if (sdx4_step_run(be, step, bench_step_forward, &b)) goto fail;
    } while (sdx4_step_replays(be) ? b.runs > before && b.runs < 10 : b.runs < 3);
    if (finish(be)) goto fail;
    for (int i = 0; i < repeats; i++) {
        double t0 = now_ms();
        if (sdx4_step_run(be, step, bench_step_forward, &b) || finish(be)) goto fail;
        t[i] = now_ms() - t0;
    }
    *ms = median(t, repeats);
    rc = 0;
fail:
    sdx4_step_free(be, step);
    DROP(b.y), DROP(tproj), DROP(cls);
    sdx4_kv_cache_free(b.kv);
    return rc;
}

/* The sampler's choice, checked before anything is timed. */
static int check_scheduler(const model *m, const char *name, const char *options, int steps) {
    scheduler s;
    int rc = sdx4_scheduler_create(&s, &m->scheduler, name, options) ||
             sdx4_scheduler_set_timesteps(&s, steps, 1);
    sdx4_scheduler_free(&s);
    return rc ? -1 : 0;
}

/* The median of `repeats` runs of `batch` upscales of `in` sharing their
 * UNet calls (seeds 0..batch-1), after one untimed run. */
static int time_batch(sdx4_engine *e, const sdx4_image *in, const sdx4_upscale_params *p, int batch, int repeats,
                      double *t, double *ms) {
    sdx4_image ins[SDX4_MAX_BATCH], outs[SDX4_MAX_BATCH];
    sdx4_upscale_params ps[SDX4_MAX_BATCH];
    sdx4_status statuses[SDX4_MAX_BATCH];
    for (int k = 0; k < batch; k++) ins[k] = *in, ps[k] = *p, ps[k].seed = (uint64_t)k;
    for (int i = -1; i < repeats; i++) {
        double t0 = now_ms();
        if (sdx4_upscale_batch(e, batch, ins, ps, outs, NULL, statuses)) return -1;
        if (i >= 0) t[i] = now_ms() - t0;
        for (int k = 0; k < batch; k++) sdx4_image_free(&outs[k]);
    }
    *ms = median(t, repeats);
    return 0;
}

/* A GAN has no parts to time alone: its whole upscale of a size x size
 * input is pipeline_ms. */
static sdx4_status bench_gan(sdx4_engine *e, int size, int repeats, sdx4_bench_result *r) {
    double *t = calloc(repeats, sizeof *t);
    sdx4_image in = {size, size, malloc((size_t)3 * size * size)}, out = {0};
    if (!t || !in.pixels) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < (size_t)3 * size * size; i++) in.pixels[i] = (uint8_t)(i * 37 % 251);
    sdx4_upscale_params p;
    sdx4_upscale_params_default(&p);
    for (int i = -1; i < repeats; i++) { /* one untimed run first, as the others */
        double t0 = now_ms();
        if (sdx4_upscale(e, &in, &p, &out, NULL)) goto fail;
        if (i >= 0) t[i] = now_ms() - t0;
        sdx4_image_free(&out);
    }
    r->pipeline_ms = median(t, repeats);
    r->peak_rss_bytes = sdx4_peak_rss_bytes();
    int64_t in_use;
    backend *be = sdx4_engine_backend(e);
    be->memory(be, &in_use, &r->device_peak_bytes);
fail:
    free(t);
    free(in.pixels);
    return sdx4_error_status();
}

sdx4_status sdx4_bench(sdx4_engine *e, int size, int steps, int repeats, int batch, const char *scheduler,
                       const char *scheduler_options, sdx4_bench_result *r) {
    sdx4_error_clear();
    model *m = sdx4_engine_model(e);
    backend *be = sdx4_engine_backend(e);
    if (size < 8 || size > 1024 || steps < 1 || steps > 1000 || repeats < 1 || repeats > 100 || batch < 1 ||
        batch > SDX4_MAX_BATCH) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "bench: size 8..1024, steps 1..1000, repeats 1..100, batch 1..%d",
                       SDX4_MAX_BATCH);
        return SDX4_ERR_INVALID_ARGUMENT;
    }
    if (m && check_scheduler(m, scheduler, scheduler_options, steps)) return sdx4_error_status();
    memset(r, 0, sizeof *r);
    r->size = size, r->steps = steps, r->repeats = repeats, r->batch = batch;
    if (!m) return bench_gan(e, size, repeats, r);
    double *t = calloc(repeats, sizeof *t), *sched_t = calloc(repeats, sizeof *sched_t);
    torch_rng rng;
    sdx4_torch_rng_seed(&rng, 0);
    tensor *ctx = NULL, *x = NULL, *y = NULL;
    float *latents = NULL;
    int32_t labels[2] = {20, 20};
    sdx4_image in = {size, size, malloc((size_t)3 * size * size)}, out = {0};
    if (!t || !sched_t || !in.pixels) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        goto fail;
    }
    /* each part runs once untimed first: GPU backends choose their
     * algorithms (cuDNN) and fill their memory caches on a first run */
    for (int i = -1; i < repeats; i++) {
        double t0 = now_ms();
        DROP(ctx);
        TRY(ctx = sdx4_pipeline_encode_prompt(m, be, "a white cat", "", 1, NULL));
        if (finish(be)) goto fail;
        if (i >= 0) t[i] = now_ms() - t0;
    }
    r->text_encoder_ms = median(t, repeats);

    TRY(x = random_tensor(be, 2, m->unet.in_channels, size, size, &rng));
    for (int i = -1; i < repeats; i++) {
        double t0 = now_ms();
        TRY(y = sdx4_unet_forward(be, &m->unet, x, 500.0f, m->unet.class_embedding ? labels : NULL, ctx));
        if (finish(be)) goto fail;
        if (i >= 0) t[i] = now_ms() - t0;
        else r->unet_step_first_ms = now_ms() - t0;
        DROP(y);
    }
    r->unet_step_ms = median(t, repeats);
    if (time_pipeline_step(m, be, x, ctx, labels, t, repeats,
                           sdx4_step_replays(be) ? &r->unet_step_replay_ms : &r->unet_step_planned_ms))
        goto fail;

    size_t nz = (size_t)m->vae.latent_channels * size * size;
    if (!(latents = malloc(nz * sizeof *latents))) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        goto fail;
    }
    sdx4_torch_randn(&rng, latents, nz);
    for (int i = -1; i < repeats; i++) {
        double t0 = now_ms();
        float *image;
        r->vae_tiles = sdx4_pipeline_decode(m, be, latents, size, size, VAE_TILING_AUTO, 0, 0, &image);
        if (r->vae_tiles < 0) goto fail;
        free(image);
        if (i >= 0) t[i] = now_ms() - t0;
        else r->vae_decode_first_ms = now_ms() - t0;
    }
    r->vae_decode_ms = median(t, repeats);

    for (size_t i = 0; i < (size_t)3 * size * size; i++) in.pixels[i] = (uint8_t)(i * 37 % 251);
    sdx4_upscale_params p;
    sdx4_upscale_params_default(&p);
    p.prompt = "a white cat";
    p.num_inference_steps = steps;
    p.noise_level = 20.0f / (float)(m->max_noise_level ? m->max_noise_level : 1);
    p.scheduler = scheduler;
    p.scheduler_options = scheduler_options;
    for (int i = -1; i < repeats; i++) {
        sdx4_upscale_report report;
        double t0 = now_ms();
        if (sdx4_upscale(e, &in, &p, &out, &report)) goto fail;
        if (i >= 0) {
            t[i] = now_ms() - t0;
            sched_t[i] = 1e3 * report.seconds_scheduler / report.unet_steps;
        }
        r->pipeline_unet_steps = report.unet_steps;
        sdx4_image_free(&out);
    }
    r->pipeline_ms = median(t, repeats);
    r->scheduler_step_ms = median(sched_t, repeats);
    if (batch > 1 && time_batch(e, &in, &p, batch, repeats, t, &r->pipeline_batch_ms)) goto fail;
    r->peak_rss_bytes = sdx4_peak_rss_bytes();
    int64_t in_use;
    be->memory(be, &in_use, &r->device_peak_bytes);
fail:
    DROP(ctx), DROP(x), DROP(y);
    free(latents);
    free(t);
    free(sched_t);
    free(in.pixels);
    return sdx4_error_status();
}
