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
 * ancestral) draw it from the same generator, after the two draws above,
 * as diffusers' pipeline hands them its generator.
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

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

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
    const tensor *ctx; /* the prompt's embeddings */
    tensor *x, *tproj, *cls, *y;
    kv_cache *kv; /* the prompt's cross-attention keys and values */
    backend_step *step;
} unet_state;

static int unet_state_init(unet_state *st, const model *m, backend *be, const tensor *ctx,
                           int batch, int h, int w, int noise_level) {
    int32_t labels[2] = {noise_level, noise_level};
    memset(st, 0, sizeof *st);
    st->m = m, st->be = be, st->ctx = ctx;
    int64_t shape[4] = {batch, m->unet.in_channels, h, w};
    TRY(st->x = be->new_tensor(be, 4, shape));
    TRY(st->tproj = be->new_tensor(be, 2, (const int64_t[]){batch, m->unet.block_channels[0]}));
    if (m->unet.class_embedding) TRY(st->cls = sdx4_unet_class_embedding(be, &m->unet, labels, batch));
    TRY(st->kv = sdx4_kv_cache_new());
    TRY(st->step = sdx4_step_new(be));
    return 0;
fail:
    return -1;
}

static void unet_state_free(unet_state *st, backend *be) {
    sdx4_step_free(be, st->step);
    st->step = NULL;
    DROP(st->y), DROP(st->x), DROP(st->tproj), DROP(st->cls);
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

/* One UNet evaluation with guidance: eps [C, h, w] on the host. unet_in
 * already holds the noisy image channels of every batch entry (they do not
 * change between steps); only the latents, as the scheduler scaled them,
 * are written here. */
static int predict_noise(const model *m, backend *be, const pipeline_args *a, unet_state *st,
                         int do_cfg, const float *latents, float t, float *unet_in,
                         float *unet_out, float *eps) {
    int batch = do_cfg ? 2 : 1, C = m->vae.latent_channels;
    size_t plane = (size_t)a->height * a->width, lat = C * plane, img = 3 * plane;
    for (int b = 0; b < batch; b++) /* cat([latents, image], dim=1) */
        memcpy(unet_in + b * (lat + img), latents, lat * sizeof *latents);
    if (unet_step(m, be, st, t, unet_in, unet_out)) return -1;
    if (do_cfg) {
        const float *uncond = unet_out, *text = unet_out + lat;
        for (size_t i = 0; i < lat; i++) eps[i] = uncond[i] + a->guidance * (text[i] - uncond[i]);
    } else {
        memcpy(eps, unet_out, lat * sizeof *eps);
    }
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

/* At a step boundary: the caller's flag, then its callback. */
static int stop_requested(const pipeline_args *a, int step, int total, const float *latents) {
    return cancel_is_set(a->cancel) || (a->on_step && a->on_step(a->user, step, total, latents));
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
    scheduler sched;
    if (sdx4_scheduler_create(&sched, &m->scheduler, a->scheduler, a->scheduler_options))
        return -1;
    if (sdx4_scheduler_set_timesteps(&sched, a->steps, lat)) {
        sdx4_scheduler_free(&sched);
        return -1;
    }

    float *noise = malloc(img * sizeof *noise), *noisy = malloc(img * sizeof *noisy);
    float *latents = malloc(lat * sizeof *latents), *eps = malloc(lat * sizeof *eps);
    float *scaled = malloc(lat * sizeof *scaled);
    float *unet_in = malloc(batch * (lat + img) * sizeof *unet_in);
    float *unet_out = malloc(batch * lat * sizeof *unet_out);
    tensor *ctx = NULL;
    unet_state st = {0};
    torch_rng rng;
    const sdx4_atomic_int *outer_cancel = sdx4_cancel_install(a->cancel);
    if (!noise || !noisy || !latents || !eps || !scaled || !unet_in || !unet_out) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        goto fail;
    }
    double t0 = now();
    TRY(ctx = sdx4_pipeline_encode_prompt(m, be, a->prompt, a->negative_prompt, do_cfg, &rep));
    rep.seconds_text = now() - t0;

    sdx4_torch_rng_seed(&rng, a->seed);
    if (a->image_noise) memcpy(noise, a->image_noise, img * sizeof *noise);
    else sdx4_torch_randn(&rng, noise, img);
    if (sdx4_ddpm_add_noise(&m->low_res_scheduler, a->image, noise, img, a->noise_level, noisy))
        goto fail;
    for (int b = 0; b < batch; b++) /* the image half of every UNet input, once */
        memcpy(unet_in + b * (lat + img) + lat, noisy, img * sizeof *noisy);
    if (a->initial_latents) memcpy(latents, a->initial_latents, lat * sizeof *latents);
    else sdx4_torch_randn(&rng, latents, lat);
    for (size_t i = 0; i < lat; i++) latents[i] = latents[i] * sched.init_noise_sigma;

    if (stop_requested(a, 0, sched.num_timesteps, latents)) goto canceled;
    t0 = now();
    if (unet_state_init(&st, m, be, ctx, batch, a->height, a->width, a->noise_level)) goto fail;
    for (int i = 0; i < sched.num_timesteps; i++) {
        sdx4_scheduler_scale_model_input(&sched, i, latents, scaled);
        if (predict_noise(m, be, a, &st, do_cfg, scaled, sched.timesteps[i], unet_in, unet_out,
                          eps) ||
            sdx4_scheduler_step(&sched, i, eps, latents, a->eta, &rng, latents))
            goto fail;
        if (stop_requested(a, i + 1, sched.num_timesteps, latents)) goto canceled;
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
    sdx4_cancel_install(outer_cancel);
    if (report) *report = rep;
    unet_state_free(&st, be);
    DROP(ctx);
    sdx4_scheduler_free(&sched);
    free(noise), free(noisy), free(latents), free(eps), free(scaled), free(unet_in), free(unet_out);
    return rc;
}
