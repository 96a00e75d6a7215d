/*
 * pipeline.c - the upscaling loop, line by line as diffusers' __call__:
 *
 *   prompt_embeds = cat([negative_embeds, prompt_embeds])  (guidance > 1)
 *   noise   = randn(image.shape, generator)                first draw
 *   image   = low_res_scheduler.add_noise(image, noise, noise_level)
 *   latents = randn([1, C, h, w], generator)               second draw
 *   latents = latents * scheduler.init_noise_sigma
 *   for t in scheduler.timesteps:
 *       x   = scheduler.scale_model_input(cat([latents] * 2), t)
 *       eps = unet(cat([x, image], dim=1), t,
 *                  prompt_embeds, class_labels=noise_level)
 *       eps = eps_uncond + guidance * (eps_text - eps_uncond)
 *       latents = scheduler.step(eps, t, latents, eta, generator)
 *   image = vae.decode(latents / scaling_factor)  (in tiles: vae.h)
 *
 * The scheduler is built for each run from the model's config and the
 * caller's choice (schedulers.h); samplers that draw noise (Euler
 * ancestral, KDPM2 ancestral, DDPM, the SDE solvers) draw it from the
 * same generator, after the two draws above, as diffusers' pipeline hands
 * them its generator. Its own cost (set_timesteps, step; scale_model_input
 * is a division done while the latents are copied into the UNet's input)
 * is measured apart, as this thread's CPU time: the samplers run on
 * the host in one thread, so that is their cost whatever else the machine
 * runs, and `sdx4 bench --scheduler` sets it beside a UNet step.
 *
 * Latents and the scheduler live on the host (a few hundred KB): the
 * networks run on the backend. Random numbers are always drawn on the CPU
 * in float32 so a seed means the same image on every backend.
 *
 * Every step runs the same UNet on new values: it is one backend step
 * (backend.h), which a backend that records (CUDA) replays instead of
 * running it operation by operation. The step's inputs (the UNet's input
 * and its timestep) are written into tensors kept for the whole loop, and
 * its output tensor, the recorded one once the backend replays, is read.
 * The cross-attention keys and values of the prompt, the same at every
 * step, are computed by the first step and kept (kv_cache, blocks.h).
 *
 * Upscales of the same latent size, timesteps and guidance can run in
 * lockstep (a batch): each step is one UNet call over all their inputs,
 * cat([latents] * 2) of each in turn, with every one's prompts and noise
 * level; their guidance, sampler steps, generators and callbacks stay
 * their own (run_item), so each gets the image it would get alone. One
 * upscale is a batch of one. A tiled upscale runs alone: its windows are
 * its batch.
 *
 * The cancel flag of an upscale alone is installed as this thread's
 * (core/cancel.h) for its whole run: the UNet, the VAE and the CPU kernels
 * read it between their blocks and tiles, and the loop between steps.
 * Whatever fails once the flag is set reports SDX4_ERR_CANCELED, also
 * where a backend tidying up after the stopped operation (ending a
 * planning pass) cleared the error. In a batch a watcher thread stops the
 * UNet call when any upscale's flag is set, and the others run that step
 * again without it (batch_watch); each decode reads its own flag.
 */
#include "model/pipeline.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/clock.h"
#include "core/error.h"
#include "model/tiling.h"

static double now(void) { return mono_seconds(); }
static double thread_cpu(void) { return clock_seconds(CLOCK_THREAD_CPUTIME_ID); }

tensor *sdx4_pipeline_encode_prompt(const model *m, backend *be, const char *prompt,
                               const char *negative, int do_cfg, pipeline_report *report) {
    int len = sdx4_tokenizer_max_length(m->tok), batch = do_cfg ? 2 : 1, n_pos = 0, n_neg = 0;
    int32_t *ids = malloc(sizeof *ids * 2 * len);
    if (!ids) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        return NULL;
    }
    int32_t *pos = ids + (do_cfg ? len : 0);
    if (sdx4_tokenizer_encode(m->tok, prompt ? prompt : "", pos, len, &n_pos) ||
        (do_cfg && sdx4_tokenizer_encode(m->tok, negative ? negative : "", ids, len, &n_neg))) {
        free(ids);
        return NULL;
    }
    if (report) {
        report->prompt_tokens = n_pos;
        report->prompt_truncated = n_pos > len;
        report->negative_truncated = n_neg > len;
    }
    tensor *out = sdx4_text_encoder_forward(be, &m->te, ids, batch, len);
    free(ids);
    return out;
}

/* The UNet's device tensors across the steps of one upscale (see the top
 * comment): input, timestep projection and class embedding, and the
 * output, which after the first steps is the recorded one. */
typedef struct {
    const model *m;
    backend *be;
    const tensor *ctx;  /* the prompt's embeddings, one per batch entry */
    tensor *ctx_copies; /* owned: the prompt's repeated for several windows */
    tensor *x, *tproj, *cls, *y;
    kv_cache *kv; /* the prompt's cross-attention keys and values */
    backend_step *step;
} unet_state;

/* The UNet's state for the prompts' embeddings of `items` upscales
 * ([cfg, L, D] each), every one repeated `copies` times (windows of one
 * image), stacked in the order of the UNet's batch, with a class label
 * (noise level) for every batch entry. One prompt once is used as it is. */
static int unet_state_init(unet_state *st, const model *m, backend *be, const tensor *const *ctxs, int items,
                           int copies, int h, int w, const int32_t *labels) {
    memset(st, 0, sizeof *st);
    st->m = m, st->be = be, st->ctx = ctxs[0];
    int batch = items * copies * (int)ctxs[0]->shape[0];
    float *host = NULL;
    if (items * copies > 1) {
        size_t n = (size_t)tensor_numel(ctxs[0]);
        if (!(host = malloc(sizeof *host * n * (size_t)(items * copies)))) goto oom;
        for (int k = 0; k < items; k++) {
            float *at = host + (size_t)k * copies * n;
            if (be->download(be, ctxs[k], at)) goto fail;
            for (int c = 1; c < copies; c++) memcpy(at + c * n, at, n * sizeof *host);
        }
        const tensor *ctx = ctxs[0];
        int64_t shape[4] = {batch, ctx->shape[1], ctx->shape[2], ctx->shape[3]};
        TRY(st->ctx_copies = be->new_tensor(be, ctx->ndim, shape));
        if (be->upload(be, st->ctx_copies, host)) goto fail;
        st->ctx = st->ctx_copies;
    }
    int64_t shape[4] = {batch, m->unet.in_channels, h, w};
    TRY(st->x = be->new_tensor(be, 4, shape));
    TRY(st->tproj = be->new_tensor(be, 2, (const int64_t[]){batch, m->unet.block_channels[0]}));
    if (m->unet.class_embedding) TRY(st->cls = sdx4_unet_class_embedding(be, &m->unet, labels, batch));
    TRY(st->kv = sdx4_kv_cache_new());
    TRY(st->step = sdx4_step_new(be));
    free(host);
    return 0;
oom:
    sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
fail:
    free(host);
    return -1;
}

static void unet_state_free(unet_state *st, backend *be) {
    sdx4_step_free(be, st->step);
    st->step = NULL;
    DROP(st->y), DROP(st->x), DROP(st->tproj), DROP(st->cls), DROP(st->ctx_copies);
    sdx4_kv_cache_free(st->kv);
    st->kv = NULL;
}

/* The step's function (backend.h): the UNet on the tensors of st. */
static int unet_step_forward(void *arg) {
    unet_state *st = arg;
    DROP(st->y);
    st->y = sdx4_unet_forward_embedded(st->be, &st->m->unet, st->x, st->tproj, st->cls, st->ctx, st->kv);
    return st->y ? 0 : -1;
}

/* One UNet evaluation: unet_in on the host in, unet_out on the host out. */
static int unet_step(const model *m, backend *be, unet_state *st, float t, const float *unet_in,
                     float *unet_out) {
    if (be->upload(be, st->x, unet_in) || sdx4_unet_set_timestep(be, &m->unet, st->tproj, t) ||
        sdx4_step_run(be, st->step, unet_step_forward, st))
        return -1;
    return be->download(be, st->y, unet_out);
}

/* dst = src / scale: the scheduler's scale_model_input as the latents are
 * copied into the UNet's input (sdx4_scheduler_input_scale), no pass of
 * its own; a plain copy for the identity. */
static void copy_scaled(float *dst, const float *src, size_t n, float scale) {
    if (scale == 1.0f) {
        memcpy(dst, src, n * sizeof *dst);
        return;
    }
#pragma omp simd
    for (size_t i = 0; i < n; i++) dst[i] = src[i] / scale;
}

/* At a step boundary: the caller's flag, then its callback. */
static int stop_requested(const pipeline_args *a, int step, int total, const float *latents) {
    return cancel_is_set(a->cancel) || (a->on_step && a->on_step(a->user, step, total, latents));
}

/* Progress inside a tiled step: each UNet call over a group of windows is
 * a unit, so that a step of many windows moves a progress bar more than
 * once; `from` is the units done before this evaluation, or -1 when it
 * reports none (an evaluation diffusers calls back after is the one that
 * does: the units then stay in order). */
typedef struct {
    int from, total;
    const float *latents;
} call_progress;

/* predict_noise over the windows of `tl`, `group` at a time (tiling.h):
 * each window's guided prediction, weighted, summed into acc, then
 * divided by the weights' sum. Between calls it stops when asked (1). */
static int predict_noise_tiled(const model *m, backend *be, const pipeline_args *a, unet_state *st,
                               const tiling *tl, int group, int do_cfg, const float *latents, float scale,
                               const float *image, float t, float *unet_in, float *unet_out, float *acc,
                               const call_progress *progress, float *eps) {
    int cfg = do_cfg ? 2 : 1, C = m->vae.latent_channels, th = tl->th, tw = tl->tw;
    size_t plane = (size_t)a->height * a->width, lat = C * plane, wplane = (size_t)th * tw;
    size_t in_size = (size_t)(C + 3) * wplane, out_size = (size_t)C * wplane;
    memset(acc, 0, lat * sizeof *acc);
    for (int first = 0; first < tl->count; first += group) {
        for (int g = 0; g < group; g++) { /* cat([latents, image], dim=1) of each window */
            int k = first + g < tl->count ? first + g : tl->count - 1;
            int y0 = tl->ys[k / tl->nx], x0 = tl->xs[k % tl->nx];
            float *in = unet_in + (size_t)g * cfg * in_size;
            for (int c = 0; c < C + 3; c++)
                for (int y = 0; y < th; y++) {
                    const float *src = c < C ? latents + c * plane : image + (c - C) * plane;
                    copy_scaled(in + c * wplane + (size_t)y * tw, src + (size_t)(y0 + y) * a->width + x0, tw,
                                c < C ? scale : 1.0f);
                }
            for (int b = 1; b < cfg; b++) memcpy(in + b * in_size, in, in_size * sizeof *in);
        }
        if (unet_step(m, be, st, t, unet_in, unet_out)) return -1;
        int call = first / group + 1, last = first + group >= tl->count;
        if (!last && (progress->from < 0 ? cancel_is_set(a->cancel)
                                         : stop_requested(a, progress->from + call, progress->total,
                                                          progress->latents)))
            return 1;
        for (int g = 0; g < group && first + g < tl->count; g++) {
            int k = first + g, y0 = tl->ys[k / tl->nx], x0 = tl->xs[k % tl->nx];
            const float *uncond = unet_out + (size_t)g * cfg * out_size, *text = uncond + out_size;
            for (int c = 0; c < C; c++)
                for (int y = 0; y < th; y++)
                    for (int x = 0; x < tw; x++) {
                        size_t i = c * wplane + (size_t)y * tw + x;
                        float e = do_cfg ? uncond[i] + a->guidance * (text[i] - uncond[i]) : uncond[i];
                        acc[c * plane + (size_t)(y0 + y) * a->width + x0 + x] += sdx4_tiling_weight(tl, k, y, x) * e;
                    }
        }
    }
    for (size_t i = 0; i < lat; i++) eps[i] = acc[i] / tl->sum[i % plane];
    return 0;
}

int sdx4_pipeline_decode(const model *m, backend *be, const float *latents, int h, int w,
                         vae_tiling_mode tiling, int tile, int64_t budget, float **out) {
    const vae_decoder *v = &m->vae;
    int f = sdx4_vae_scale_factor(v);
    if (!tile) tile = sdx4_vae_tile(v);
    if (!budget) budget = SDX4_VAE_TILING_BUDGET;
    int tiled = tiling == VAE_TILING_ON ||
                 (tiling == VAE_TILING_AUTO && tile && sdx4_vae_decode_bytes(v, h, w) > budget);
    size_t nz = (size_t)v->latent_channels * h * w;
    float *z = malloc(nz * sizeof *z);
    *out = malloc((size_t)v->out_channels * h * f * w * f * sizeof **out);
    if (!z || !*out) {
        free(z), free(*out), *out = NULL;
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < nz; i++) z[i] = latents[i] / v->scaling_factor;
    /* with float's range (force_upcast): bfloat16 where the backend keeps
     * half activations, else float32 */
    dtype saved = be->set_activation_type ? be->set_activation_type(be, DTYPE_BF16) : DTYPE_F32;
    int tiles = tiled ? sdx4_vae_decode_tiled(be, v, z, h, w, tile, *out)
                      : sdx4_vae_decode_host(be, v, z, h, w, *out) ? -1 : 1;
    if (be->set_activation_type) be->set_activation_type(be, saved);
    free(z);
    if (tiles < 0) free(*out), *out = NULL;
    return tiles;
}

/* Whether diffusers' pipeline calls back after UNet evaluation i of n:
 * after every order-th one (a second-order sampler's step is two) past
 * the warm-up (the evaluations beyond steps * order: PNDM's Runge-Kutta
 * ones), and after the last. */
static int callback_at(int i, int n, int warmup, int order) {
    return i == n - 1 || (i + 1 > warmup && (i + 1) % order == 0);
}

/* One upscale through the loop: its sampler, generator, prompt, noisy
 * image and latents. A batch runs several in lockstep, one UNet call a
 * step for all of them; every one keeps its own state, so that each image
 * is the one it would be alone. */
typedef struct {
    const pipeline_args *a;
    pipeline_report rep;
    scheduler sched;
    int has_sched;
    torch_rng rng;
    tensor *ctx;
    float *noisy, *latents, *eps;
    int warmup, total, calls, done_steps; /* progress: `calls` units a step */
    int stopped;                          /* its caller stopped it */
} run_item;

static void item_free(run_item *it) {
    sdx4_torch_rng_stop_ahead(&it->rng);
    if (it->has_sched) sdx4_scheduler_free(&it->sched);
    DROP(it->ctx);
    free(it->noisy), free(it->latents), free(it->eps);
    it->has_sched = 0, it->noisy = it->latents = it->eps = NULL;
}

/* Everything before the loop, in diffusers' order: the sampler's
 * timesteps, the prompt's embeddings, the generator's first draw (the
 * image's noise) and second (the latents); progress counts `calls` units
 * a step. -1 with the error set (the item is then freed by the caller). */
static int item_begin(const model *m, backend *be, const pipeline_args *a, int calls, run_item *it) {
    int C = m->vae.latent_channels;
    size_t plane = (size_t)a->height * a->width, lat = C * plane, img = 3 * plane;
    it->a = a, it->calls = calls;
    if (a->noise_level < 0 || a->noise_level > m->max_noise_level) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "noise_level %d is outside 0..%d", a->noise_level,
                       m->max_noise_level);
        return -1;
    }
    if (sdx4_scheduler_create(&it->sched, &m->scheduler, a->scheduler, a->scheduler_options)) return -1;
    it->has_sched = 1;
    double t0 = thread_cpu();
    if (sdx4_scheduler_set_timesteps(&it->sched, a->steps, lat)) return -1;
    it->rep.seconds_scheduler = thread_cpu() - t0;
    it->rep.unet_steps = it->sched.num_timesteps;
    it->noisy = malloc(img * sizeof *it->noisy);
    it->latents = malloc(lat * sizeof *it->latents), it->eps = malloc(lat * sizeof *it->eps);
    float *noise = malloc(img * sizeof *noise);
    if (!noise || !it->noisy || !it->latents || !it->eps) {
        free(noise);
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        return -1;
    }
    t0 = now();
    it->ctx = sdx4_pipeline_encode_prompt(m, be, a->prompt, a->negative_prompt, a->guidance > 1.0f, &it->rep);
    it->rep.seconds_text = now() - t0;
    sdx4_torch_rng_seed(&it->rng, a->seed);
    if (a->image_noise) memcpy(noise, a->image_noise, img * sizeof *noise);
    else sdx4_torch_randn(&it->rng, noise, img);
    int rc = !it->ctx || sdx4_ddpm_add_noise(&m->low_res_scheduler, a->image, noise, img, a->noise_level, it->noisy);
    free(noise);
    if (rc) return -1;
    /* from here every draw is randn(lat) (the latents, then a sampler's
     * noise): for a sampler that draws, each next one is drawn while the
     * UNet runs (rng.h); without a thread they are drawn when asked, the
     * same numbers */
    if (sdx4_scheduler_draws_noise(&it->sched, a->eta)) sdx4_torch_rng_draw_ahead(&it->rng);
    if (a->initial_latents) memcpy(it->latents, a->initial_latents, lat * sizeof *it->latents);
    else sdx4_torch_randn(&it->rng, it->latents, lat);
    for (size_t i = 0; i < lat; i++) it->latents[i] = it->latents[i] * it->sched.init_noise_sigma;
    /* progress as diffusers' pipeline reports it (callback_at), so that n
     * steps count 1..n whatever the sampler */
    int n = it->sched.num_timesteps;
    it->warmup = n - a->steps * it->sched.order;
    for (int i = 0; i < n; i++) it->total += callback_at(i, n, it->warmup, it->sched.order);
    it->total *= calls;
    return stop_requested(a, 0, it->total, it->latents) ? (it->stopped = 1) : 0;
}

/* The scheduler's scale_model_input for evaluation i, timed as its own. */
static float item_input_scale(run_item *it, int i) {
    double s0 = thread_cpu();
    float scale = sdx4_scheduler_input_scale(&it->sched, i);
    it->rep.seconds_scheduler += thread_cpu() - s0;
    return scale;
}

/* After evaluation i, with the guided prediction in it->eps: the
 * sampler's step, then the caller's callback where diffusers' pipeline
 * calls back, else its flag. 1 when the caller stopped it, -1 on error. */
static int item_step(run_item *it, int i) {
    double s0 = thread_cpu();
    if (sdx4_scheduler_step(&it->sched, i, it->eps, it->latents, it->a->eta, &it->rng, it->latents)) return -1;
    it->rep.seconds_scheduler += thread_cpu() - s0;
    int stop = callback_at(i, it->sched.num_timesteps, it->warmup, it->sched.order)
                   ? stop_requested(it->a, (++it->done_steps) * it->calls, it->total, it->latents)
                   : cancel_is_set(it->a->cancel);
    return stop ? (it->stopped = 1) : 0;
}

/* The loop of one upscale over the windows of `tl`, `group` of them a
 * UNet call. 1 when stopped, -1 on error. */
static int run_tiled(const model *m, backend *be, run_item *it, const tiling *tl, int group) {
    const pipeline_args *a = it->a;
    int do_cfg = a->guidance > 1.0f, cfg = do_cfg ? 2 : 1, C = m->vae.latent_channels, rc = -1;
    size_t lat = (size_t)C * a->height * a->width, window = (size_t)tl->th * tl->tw;
    float *unet_in = malloc((size_t)group * cfg * (C + 3) * window * sizeof *unet_in);
    float *unet_out = malloc((size_t)group * cfg * C * window * sizeof *unet_out);
    float *acc = malloc(lat * sizeof *acc);
    int32_t *labels = malloc((size_t)group * cfg * sizeof *labels);
    unet_state st = {0};
    if (!unet_in || !unet_out || !acc || !labels) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        goto done;
    }
    for (int b = 0; b < group * cfg; b++) labels[b] = a->noise_level;
    if (unet_state_init(&st, m, be, (const tensor *const *)&it->ctx, 1, group, tl->th, tl->tw, labels)) goto done;
    for (int i = 0; i < it->sched.num_timesteps; i++) {
        float scale = item_input_scale(it, i);
        int reports = callback_at(i, it->sched.num_timesteps, it->warmup, it->sched.order);
        call_progress progress = {reports ? it->done_steps * it->calls : -1, it->total, it->latents};
        rc = predict_noise_tiled(m, be, a, &st, tl, group, do_cfg, it->latents, scale, it->noisy,
                                 it->sched.timesteps[i], unet_in, unet_out, acc, &progress, it->eps);
        if (rc > 0) it->stopped = 1;
        if (rc == 0) rc = item_step(it, i);
        if (rc) goto done;
    }
done:
    unet_state_free(&st, be);
    free(unet_in), free(unet_out), free(acc), free(labels);
    return rc;
}

/* The UNet's state for the items in `live`, and the noisy-image half of
 * each one's inputs in unet_in, which does not change between steps. */
static int batch_state(const model *m, backend *be, run_item **live, int n, unet_state *st, float *unet_in) {
    const pipeline_args *a = live[0]->a;
    int cfg = a->guidance > 1.0f ? 2 : 1, C = m->vae.latent_channels;
    size_t plane = (size_t)a->height * a->width, lat = C * plane, img = 3 * plane;
    const tensor *ctxs[SDX4_MAX_BATCH];
    int32_t labels[2 * SDX4_MAX_BATCH];
    for (int k = 0; k < n; k++) {
        ctxs[k] = live[k]->ctx;
        for (int b = 0; b < cfg; b++) {
            labels[k * cfg + b] = live[k]->a->noise_level;
            memcpy(unet_in + (size_t)(k * cfg + b) * (lat + img) + lat, live[k]->noisy, img * sizeof *unet_in);
        }
    }
    unet_state_free(st, be);
    return unet_state_init(st, m, be, ctxs, n, 1, a->height, a->width, labels);
}

/* In a batch, one upscale's stop must end the UNet call running for all
 * within a tile, as it would alone, without ending the others. A watcher
 * thread polls the flags of the upscales still in the batch and sets the
 * batch's own flag, installed as this thread's (core/cancel.h): the call
 * fails as canceled, the stopped upscales leave, and the step runs again
 * for the rest (nothing of the interrupted call was kept). */
typedef struct {
    const sdx4_atomic_int *flags[SDX4_MAX_BATCH];
    atomic_uint live;     /* bit k: items[k] is in the batch */
    sdx4_atomic_int stop; /* the batch's flag */
    atomic_int quit;
    pthread_t thread;
} batch_watch;

static void *watch_main(void *arg) {
    batch_watch *w = arg;
    const struct timespec pause = {0, 2000000}; /* 2 ms: a small part of a tile's work */
    while (!atomic_load(&w->quit)) {
        unsigned live = atomic_load(&w->live);
        for (int k = 0; k < SDX4_MAX_BATCH; k++) /* still live when seen set: not one that just left */
            if (live >> k & 1 && cancel_is_set(w->flags[k]) && atomic_load(&w->live) >> k & 1)
                atomic_store(&w->stop, 1);
        nanosleep(&pause, NULL);
    }
    return NULL;
}

static void watch_live(batch_watch *w, run_item *items, run_item **live, int n) {
    unsigned mask = 0;
    for (int k = 0; k < n; k++) mask |= 1u << (live[k] - items);
    atomic_store(&w->live, mask);
}

/* The loop of upscales in lockstep on their whole latents: each step one
 * UNet call over every item still running (cat([latents] * 2) of each,
 * in order), each item's guided prediction and sampler step its own. An
 * item its caller stops leaves the batch at that step's end, or at once
 * during the UNet call (batch_watch); the others go on (the UNet's state
 * is rebuilt for them). -1 on error. */
static int run_batch(const model *m, backend *be, run_item *items, int n) {
    const pipeline_args *a = items[0].a;
    int cfg = a->guidance > 1.0f ? 2 : 1, C = m->vae.latent_channels, live_n = 0, rc = -1, watching = 0;
    size_t plane = (size_t)a->height * a->width, lat = C * plane, img = 3 * plane;
    run_item *live[SDX4_MAX_BATCH];
    for (int k = 0; k < n; k++)
        if (!items[k].stopped) live[live_n++] = &items[k];
    float *unet_in = malloc((size_t)n * cfg * (lat + img) * sizeof *unet_in);
    float *unet_out = malloc((size_t)n * cfg * lat * sizeof *unet_out);
    unet_state st = {0};
    batch_watch watch = {.live = 0};
    const sdx4_atomic_int *outer_cancel = NULL;
    if (!unet_in || !unet_out) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        goto done;
    }
    if (n > 1) {
        for (int k = 0; k < n; k++) watch.flags[k] = items[k].a->cancel;
        watch_live(&watch, items, live, live_n);
        if (pthread_create(&watch.thread, NULL, watch_main, &watch)) {
            sdx4_set_error(SDX4_ERR_NO_MEMORY, "cannot start the batch's cancel watcher");
            goto done;
        }
        watching = 1;
        outer_cancel = sdx4_cancel_install(&watch.stop);
    }
    if (live_n && batch_state(m, be, live, live_n, &st, unet_in)) goto done;
    for (int i = 0; i < items[0].sched.num_timesteps && live_n; i++) {
        for (int k = 0; k < live_n; k++) { /* cat([latents, image], dim=1), scaled */
            float *in = unet_in + (size_t)k * cfg * (lat + img);
            copy_scaled(in, live[k]->latents, lat, item_input_scale(live[k], i));
            if (cfg == 2) memcpy(in + lat + img, in, lat * sizeof *in);
        }
        atomic_store(&watch.stop, 0); /* set again within 2 ms while a live item's flag is */
        if (unet_step(m, be, &st, items[0].sched.timesteps[i], unet_in, unet_out)) {
            if (!watching || !cancel_is_set(&watch.stop)) goto done;
            sdx4_error_clear(); /* an item stopped: the rest run step i again */
            int left = 0;
            for (int k = 0; k < live_n; k++) {
                if (cancel_is_set(live[k]->a->cancel)) live[k]->stopped = 1;
                else live[left++] = live[k];
            }
            watch_live(&watch, items, live, live_n = left);
            if (live_n && batch_state(m, be, live, live_n, &st, unet_in)) goto done;
            i--;
            continue;
        }
        int left = 0;
        for (int k = 0; k < live_n; k++) {
            const float *uncond = unet_out + (size_t)k * cfg * lat, *text = uncond + lat;
            float g = live[k]->a->guidance, *eps = live[k]->eps;
            if (cfg == 2)
                for (size_t j = 0; j < lat; j++) eps[j] = uncond[j] + g * (text[j] - uncond[j]);
            else
                memcpy(eps, uncond, lat * sizeof *eps);
            int stop = item_step(live[k], i);
            if (stop < 0) goto done;
            if (!stop) live[left++] = live[k];
        }
        if (left < live_n) {
            watch_live(&watch, items, live, live_n = left);
            if (live_n && batch_state(m, be, live, live_n, &st, unet_in)) goto done;
        }
    }
    rc = 0;
done:
    if (watching) {
        atomic_store(&watch.quit, 1);
        pthread_join(watch.thread, NULL);
        sdx4_cancel_install(outer_cancel);
    }
    unet_state_free(&st, be); /* its memory serves the VAE */
    free(unet_in), free(unet_out);
    return rc;
}

/* Whether two upscales can share their UNet calls: the same latent size,
 * the same timesteps (sampler, its options, steps) and guidance or not,
 * both untiled. */
static int batchable(const pipeline_args *x, const pipeline_args *y) {
    return x->height == y->height && x->width == y->width && x->steps == y->steps &&
           (x->guidance > 1.0f) == (y->guidance > 1.0f) && !strcmp(x->scheduler ? x->scheduler : "",
                                                                    y->scheduler ? y->scheduler : "") &&
           !strcmp(x->scheduler_options ? x->scheduler_options : "", y->scheduler_options ? y->scheduler_options : "");
}

int sdx4_pipeline_run_batch(const model *m, backend *be, int n, const pipeline_args *args, float **outs,
                            pipeline_report *reports, sdx4_status *statuses) {
    for (int k = 0; k < n && k < SDX4_MAX_BATCH; k++) outs[k] = NULL, statuses[k] = SDX4_OK;
    if (n < 1 || n > SDX4_MAX_BATCH) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "a batch of %d upscales: 1 to %d", n, SDX4_MAX_BATCH);
        return -1;
    }
    const pipeline_args *a = &args[0];
    int cfg = a->guidance > 1.0f ? 2 : 1, rc = -1;
    /* tile 0: the whole latent while the UNet's memory fits the budget */
    int tile = a->tile > 0 ? a->tile
                           : sdx4_tiling_auto(a->height, a->width, a->tile_overlap, n * cfg,
                                              sdx4_unet_bytes_per_pixel(&m->unet),
                                              a->unet_budget ? a->unet_budget : SDX4_UNET_TILING_BUDGET);
    for (int k = 1; k < n; k++)
        if (!batchable(a, &args[k]) || args[k].tile > 0) {
            sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "upscale %d of the batch cannot share the first one's UNet "
                           "calls (size, steps, sampler, guidance or tiles differ)", k);
            return -1;
        }
    if (n > 1 && tile > 0) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "a batch of %d upscales needs the whole latent: %dx%d would "
                       "run in windows", n, a->width, a->height);
        return -1;
    }
    tiling tl = {0}; /* tile > 0: the windows; one for a tile at least as large as the image */
    if (tile > 0 && sdx4_tiling_plan(&tl, a->height, a->width, tile, a->tile_overlap)) return -1;
    int group = tile > 0 ? sdx4_tiling_windows_per_call(tl.count) : 1;
    int calls = tile > 0 ? (tl.count + group - 1) / group : 1; /* progress units per step */
    run_item *items = calloc((size_t)n, sizeof *items);
    if (!items) {
        sdx4_tiling_free(&tl);
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        return -1;
    }
    /* one upscale alone stops inside the UNet and the VAE when its flag is
     * set; a batch's flag is its watcher's (run_batch) */
    const sdx4_atomic_int *outer_cancel = sdx4_cancel_install(n == 1 ? a->cancel : NULL);
    for (int k = 0; k < n; k++) {
        if (item_begin(m, be, &args[k], calls, &items[k]) < 0) goto done;
        if (items[k].sched.num_timesteps != items[0].sched.num_timesteps ||
            memcmp(items[k].sched.timesteps, items[0].sched.timesteps,
                   items[0].sched.num_timesteps * sizeof *items[0].sched.timesteps)) {
            sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "upscale %d of the batch has other timesteps", k);
            goto done;
        }
    }
    double t0 = now();
    if (tile > 0 ? !items[0].stopped && run_tiled(m, be, &items[0], &tl, group) < 0
                 : run_batch(m, be, items, n) < 0)
        goto done;
    double unet_seconds = now() - t0;
    for (int k = 0; k < n; k++) {
        run_item *it = &items[k];
        it->rep.seconds_unet = unet_seconds;
        it->rep.unet_tile = tile, it->rep.unet_windows = tile > 0 ? tl.count : 1;
        if (it->stopped) continue;
        if (n > 1) sdx4_cancel_install(it->a->cancel); /* its own decode stops for its flag */
        t0 = now();
        it->rep.vae_tiles = sdx4_pipeline_decode(m, be, it->latents, it->a->height, it->a->width,
                                                 it->a->vae_tiling, it->a->vae_tile,
                                                 it->a->vae_budget, &outs[k]);
        it->rep.seconds_vae = now() - t0;
        if (n > 1) sdx4_cancel_install(NULL);
        if (it->rep.vae_tiles < 0 && cancel_is_set(it->a->cancel)) it->stopped = 1;
        else if (it->rep.vae_tiles < 0 && n == 1) goto done;
        else if (it->rep.vae_tiles < 0) /* its own failure (its vae_tiling): the others' images stand */
            statuses[k] = sdx4_error_status() ? sdx4_error_status() : SDX4_ERR_NO_MEMORY;
        item_free(it); /* its latents and the generator's thread are no longer needed */
    }
    rc = 0;
done:
    if (rc && n == 1 && cancel_is_set(a->cancel)) /* what failed once the flag was set: stopped */
        rc = 0, items[0].stopped = 1;
    if (rc)
        for (int k = 0; k < n; k++) free(outs[k]), outs[k] = NULL;
    for (int k = 0; k < n; k++)
        if (items[k].stopped) free(outs[k]), outs[k] = NULL;
    for (int k = 0; k < n; k++) {
        if (reports) reports[k] = items[k].rep;
        if (items[k].stopped) statuses[k] = SDX4_ERR_CANCELED;
        item_free(&items[k]);
    }
    free(items);
    sdx4_cancel_install(outer_cancel);
    sdx4_tiling_free(&tl);
    return rc;
}

int sdx4_pipeline_run(const model *m, backend *be, const pipeline_args *a, float **out, pipeline_report *report) {
    sdx4_status status;
    int rc = sdx4_pipeline_run_batch(m, be, 1, a, out, report, &status);
    return rc ? rc : status == SDX4_ERR_CANCELED ? sdx4_cancel_stopped() : 0;
}
