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
 * A caller's cancel flag is installed as this thread's (core/cancel.h) for
 * the whole run: the UNet, the VAE and the CPU kernels read it between
 * their blocks and tiles, and the loop between steps. Whatever fails once
 * the flag is set reports SDX4_ERR_CANCELED, also where a backend tidying
 * up after the stopped operation (ending a planning pass) cleared the
 * error.
 */
#include "model/pipeline.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/error.h"
#include "model/tiling.h"

static double clock_seconds(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double now(void) { return clock_seconds(CLOCK_MONOTONIC); }
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

/* For `copies` windows per call the prompt's embeddings [cfg, L, D] are
 * repeated to [copies * cfg, L, D], in the order of the UNet's batch. */
static int unet_state_init(unet_state *st, const model *m, backend *be, const tensor *ctx, int copies,
                           int batch, int h, int w, int noise_level) {
    memset(st, 0, sizeof *st);
    st->m = m, st->be = be, st->ctx = ctx;
    int32_t *labels = malloc(sizeof *labels * (size_t)batch);
    float *host = NULL;
    if (!labels) goto oom;
    for (int b = 0; b < batch; b++) labels[b] = noise_level;
    if (copies > 1) {
        size_t n = (size_t)tensor_numel(ctx);
        host = malloc(sizeof *host * n * (size_t)copies);
        if (!host) goto oom;
        if (be->download(be, ctx, host)) goto fail;
        for (int c = 1; c < copies; c++) memcpy(host + c * n, host, n * sizeof *host);
        int64_t shape[4] = {ctx->shape[0] * copies, ctx->shape[1], ctx->shape[2], ctx->shape[3]};
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
    free(labels), free(host);
    return 0;
oom:
    sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
fail:
    free(labels), free(host);
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

/* One UNet evaluation with guidance: eps [C, h, w] on the host. unet_in
 * already holds the noisy image channels of every batch entry (they do not
 * change between steps); only the latents, scaled as the scheduler's
 * scale_model_input scales them, are written here. */
static int predict_noise(const model *m, backend *be, const pipeline_args *a, unet_state *st,
                         int do_cfg, const float *latents, float scale, float t, float *unet_in,
                         float *unet_out, float *eps) {
    int batch = do_cfg ? 2 : 1, C = m->vae.latent_channels;
    size_t plane = (size_t)a->height * a->width, lat = C * plane, img = 3 * plane;
    copy_scaled(unet_in, latents, lat, scale); /* cat([latents, image], dim=1) */
    for (int b = 1; b < batch; b++) memcpy(unet_in + b * (lat + img), unet_in, lat * sizeof *unet_in);
    if (unet_step(m, be, st, t, unet_in, unet_out)) return -1;
    if (do_cfg) {
        const float *uncond = unet_out, *text = unet_out + lat;
        for (size_t i = 0; i < lat; i++) eps[i] = uncond[i] + a->guidance * (text[i] - uncond[i]);
    } else {
        memcpy(eps, unet_out, lat * sizeof *eps);
    }
    return 0;
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

tensor *sdx4_pipeline_decode(const model *m, backend *be, const float *latents, int h, int w) {
    int C = m->vae.latent_channels;
    size_t n = (size_t)C * h * w;
    float *z = malloc(n * sizeof *z);
    tensor *x = NULL, *out = NULL;
    if (!z) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        return NULL;
    }
    /* vae.decode(latents / scaling_factor) with float's range (force_upcast): bfloat16
     * where the backend keeps half activations, else float32 */
    dtype saved = be->set_activation_type ? be->set_activation_type(be, DTYPE_BF16) : DTYPE_F32;
    for (size_t i = 0; i < n; i++) z[i] = latents[i] / m->vae.scaling_factor;
    TRY(x = be->new_tensor(be, 4, (int64_t[]){1, C, h, w}));
    if (be->upload(be, x, z) == 0) out = sdx4_vae_decode(be, &m->vae, x);
fail:
    if (be->set_activation_type) be->set_activation_type(be, saved);
    free(z);
    DROP(x);
    return out;
}

int sdx4_pipeline_decode_tiled(const model *m, backend *be, const float *latents, int h, int w,
                               int tile, float *out) {
    size_t n = (size_t)m->vae.latent_channels * h * w;
    float *z = malloc(n * sizeof *z);
    if (!z) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < n; i++) z[i] = latents[i] / m->vae.scaling_factor;
    dtype saved = be->set_activation_type ? be->set_activation_type(be, DTYPE_BF16) : DTYPE_F32;
    int tiles = sdx4_vae_decode_tiled(be, &m->vae, z, h, w, tile, out);
    if (be->set_activation_type) be->set_activation_type(be, saved);
    free(z);
    return tiles;
}

/* The decode as args choose: whole, or in tiles when asked or when the
 * whole one would exceed the budget (and the config gives a tile); *out is
 * malloc'd. The tile count, or -1. */
static int decode(const model *m, backend *be, const pipeline_args *a, const float *latents,
                  float **out) {
    int f = sdx4_vae_scale_factor(&m->vae), tiles = 1;
    int tile = a->vae_tile ? a->vae_tile : sdx4_vae_tile(&m->vae);
    int64_t budget = a->vae_budget ? a->vae_budget : SDX4_VAE_TILING_BUDGET;
    size_t n = (size_t)m->vae.out_channels * a->height * f * a->width * f;
    if (!(*out = malloc(n * sizeof **out))) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        return -1;
    }
    if (a->vae_tiling == VAE_TILING_ON ||
        (a->vae_tiling == VAE_TILING_AUTO && tile &&
         sdx4_vae_decode_bytes(&m->vae, a->height, a->width) > budget)) {
        tiles = sdx4_pipeline_decode_tiled(m, be, latents, a->height, a->width, tile, *out);
    } else {
        tensor *image = sdx4_pipeline_decode(m, be, latents, a->height, a->width);
        if (!image || be->download(be, image, *out)) tiles = -1;
        DROP(image);
    }
    if (tiles < 0) {
        free(*out);
        *out = NULL;
    }
    return tiles;
}

/* Whether diffusers' pipeline calls back after UNet evaluation i of n:
 * after every order-th one (a second-order sampler's step is two) past
 * the warm-up (the evaluations beyond steps * order: PNDM's Runge-Kutta
 * ones), and after the last. */
static int callback_at(int i, int n, int warmup, int order) {
    return i == n - 1 || (i + 1 > warmup && (i + 1) % order == 0);
}


int sdx4_pipeline_run(const model *m, backend *be, const pipeline_args *a, float **out,
                 pipeline_report *report) {
    pipeline_report rep = {0};
    int do_cfg = a->guidance > 1.0f, C = m->vae.latent_channels, rc = -1;
    size_t plane = (size_t)a->height * a->width, lat = C * plane, img = 3 * plane;
    int batch = do_cfg ? 2 : 1;
    *out = NULL;
    if (a->noise_level < 0 || a->noise_level > m->max_noise_level) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "noise_level %d is outside 0..%d", a->noise_level,
                  m->max_noise_level);
        return -1;
    }
    /* tile 0: the whole latent while the UNet's memory fits the budget */
    int tile = a->tile > 0 ? a->tile
                           : sdx4_tiling_auto(a->height, a->width, a->tile_overlap, batch,
                                              sdx4_unet_bytes_per_pixel(&m->unet),
                                              a->unet_budget ? a->unet_budget : SDX4_UNET_TILING_BUDGET);
    tiling tl = {0}; /* tile > 0: the windows; one for a tile at least as large as the image */
    if (tile > 0 && sdx4_tiling_plan(&tl, a->height, a->width, tile, a->tile_overlap)) return -1;
    int group = tile > 0 ? sdx4_tiling_windows_per_call(tl.count) : 1;
    size_t window = tile > 0 ? (size_t)tl.th * tl.tw : plane; /* a UNet input's pixels */
    rep.unet_tile = tile;
    rep.unet_windows = tile > 0 ? tl.count : 1;
    scheduler sched;
    if (sdx4_scheduler_create(&sched, &m->scheduler, a->scheduler, a->scheduler_options)) {
        sdx4_tiling_free(&tl);
        return -1;
    }
    double t0 = thread_cpu();
    if (sdx4_scheduler_set_timesteps(&sched, a->steps, lat)) {
        sdx4_scheduler_free(&sched);
        sdx4_tiling_free(&tl);
        return -1;
    }
    rep.seconds_scheduler = thread_cpu() - t0;
    rep.unet_steps = sched.num_timesteps;

    float *noise = malloc(img * sizeof *noise), *noisy = malloc(img * sizeof *noisy);
    float *latents = malloc(lat * sizeof *latents), *eps = malloc(lat * sizeof *eps);
    float *unet_in = malloc((size_t)group * batch * (C + 3) * window * sizeof *unet_in);
    float *unet_out = malloc((size_t)group * batch * C * window * sizeof *unet_out);
    float *acc = tile > 0 ? malloc(lat * sizeof *acc) : NULL;
    tensor *ctx = NULL;
    unet_state st = {0};
    torch_rng rng = {.ahead = NULL}; /* seeded below; stopped at done: */
    const sdx4_atomic_int *outer_cancel = sdx4_cancel_install(a->cancel);
    if (!noise || !noisy || !latents || !eps || !unet_in || !unet_out || (tile > 0 && !acc)) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        goto fail;
    }
    t0 = now();
    TRY(ctx = sdx4_pipeline_encode_prompt(m, be, a->prompt, a->negative_prompt, do_cfg, &rep));
    rep.seconds_text = now() - t0;

    sdx4_torch_rng_seed(&rng, a->seed);
    if (a->image_noise) memcpy(noise, a->image_noise, img * sizeof *noise);
    else sdx4_torch_randn(&rng, noise, img);
    if (sdx4_ddpm_add_noise(&m->low_res_scheduler, a->image, noise, img, a->noise_level, noisy))
        goto fail;
    for (int b = 0; b < batch && tile <= 0; b++) /* the image half of every UNet input, once */
        memcpy(unet_in + b * (lat + img) + lat, noisy, img * sizeof *noisy);
    /* from here every draw is randn(lat) (the latents, then a sampler's
     * noise): for a sampler that draws, each next one is drawn while the
     * UNet runs (rng.h); without a thread they are drawn when asked, the
     * same numbers */
    if (sdx4_scheduler_draws_noise(&sched, a->eta)) sdx4_torch_rng_draw_ahead(&rng);
    if (a->initial_latents) memcpy(latents, a->initial_latents, lat * sizeof *latents);
    else sdx4_torch_randn(&rng, latents, lat);
    for (size_t i = 0; i < lat; i++) latents[i] = latents[i] * sched.init_noise_sigma;

    /* progress as diffusers' pipeline reports it (callback_at), so that n
     * steps count 1..n whatever the sampler */
    int order = sched.order, warmup = sched.num_timesteps - a->steps * order, total = 0, done_steps = 0;
    for (int i = 0; i < sched.num_timesteps; i++) total += callback_at(i, sched.num_timesteps, warmup, order);
    int calls = tile > 0 ? (tl.count + group - 1) / group : 1; /* progress units per step */
    total *= calls;
    if (stop_requested(a, 0, total, latents)) goto canceled;
    t0 = now();
    if (unet_state_init(&st, m, be, ctx, group, group * batch, tile > 0 ? tl.th : a->height,
                        tile > 0 ? tl.tw : a->width, a->noise_level))
        goto fail;
    for (int i = 0; i < sched.num_timesteps; i++) {
        double s0 = thread_cpu();
        float scale = sdx4_scheduler_input_scale(&sched, i);
        rep.seconds_scheduler += thread_cpu() - s0;
        int reports = callback_at(i, sched.num_timesteps, warmup, order);
        call_progress progress = {reports ? done_steps * calls : -1, total, latents};
        int rc_unet = tile > 0 ? predict_noise_tiled(m, be, a, &st, &tl, group, do_cfg, latents, scale, noisy,
                                                        sched.timesteps[i], unet_in, unet_out, acc, &progress, eps)
                                  : predict_noise(m, be, a, &st, do_cfg, latents, scale, sched.timesteps[i], unet_in,
                                                  unet_out, eps);
        if (rc_unet > 0) goto canceled;
        if (rc_unet < 0) goto fail;
        s0 = thread_cpu();
        if (sdx4_scheduler_step(&sched, i, eps, latents, a->eta, &rng, latents)) goto fail;
        rep.seconds_scheduler += thread_cpu() - s0;
        if (reports ? stop_requested(a, (++done_steps) * calls, total, latents)
                : cancel_is_set(a->cancel))
            goto canceled;
    }
    rep.seconds_unet = now() - t0;
    unet_state_free(&st, be); /* its memory serves the VAE */

    t0 = now();
    if ((rep.vae_tiles = decode(m, be, a, latents, out)) < 0) goto fail;
    rep.seconds_vae = now() - t0;
    rc = 0;
    goto done;
canceled:
    sdx4_cancel_stopped();
fail:
    if (cancel_is_set(a->cancel)) sdx4_cancel_stopped();
    free(*out);
    *out = NULL;
done:
    sdx4_torch_rng_stop_ahead(&rng);
    sdx4_cancel_install(outer_cancel);
    if (report) *report = rep;
    unet_state_free(&st, be);
    DROP(ctx);
    sdx4_scheduler_free(&sched);
    sdx4_tiling_free(&tl);
    free(noise), free(noisy), free(latents), free(eps), free(unet_in), free(unet_out), free(acc);
    return rc;
}
