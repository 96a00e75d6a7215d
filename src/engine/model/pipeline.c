/*
 * pipeline.c - the upscaling loop, line by line as diffusers' __call__:
 *
 *   prompt_embeds = cat([negative_embeds, prompt_embeds])  (guidance > 1)
 *   noise   = randn(image.shape, generator)                first draw
 *   image   = low_res_scheduler.add_noise(image, noise, noise_level)
 *   latents = randn([1, C, h, w], generator)               second draw
 *   for t in scheduler.timesteps:
 *       eps = unet(cat([cat([latents] * 2), image], dim=1), t,
 *                  prompt_embeds, class_labels=noise_level)
 *       eps = eps_uncond + guidance * (eps_text - eps_uncond)
 *       latents = scheduler.step(eps, t, latents, eta, generator)
 *   image = vae.decode(latents / scaling_factor)
 *
 * Latents and the scheduler live on the host (a few hundred KB): the
 * networks run on the backend. Random numbers are always drawn on the CPU
 * in float32 so a seed means the same image on every backend.
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

tensor *pipeline_encode_prompt(const model *m, backend *be, const char *prompt,
                               const char *negative, int do_cfg, pipeline_report *report) {
    int len = tokenizer_max_length(m->tok), batch = do_cfg ? 2 : 1, n_pos = 0, n_neg = 0;
    int32_t *ids = malloc(sizeof *ids * 2 * len);
    if (!ids) {
        set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        return NULL;
    }
    int32_t *pos = ids + (do_cfg ? len : 0);
    if (tokenizer_encode(m->tok, prompt ? prompt : "", pos, len, &n_pos) ||
        (do_cfg && tokenizer_encode(m->tok, negative ? negative : "", ids, len, &n_neg))) {
        free(ids);
        return NULL;
    }
    if (report) {
        report->prompt_tokens = n_pos;
        report->prompt_truncated = n_pos > len;
        report->negative_truncated = n_neg > len;
    }
    tensor *out = text_encoder_fw(be, &m->te, ids, batch, len);
    free(ids);
    return out;
}

/* One UNet evaluation with guidance: eps [C, h, w] on the host. unet_in
 * already holds the noisy image channels of every batch entry (they do not
 * change between steps); only the latents are written here. */
static int predict_noise(const model *m, backend *be, const pipeline_args *a, const tensor *ctx,
                         int do_cfg, const float *latents, int t, float *unet_in,
                         float *unet_out, float *eps) {
    int batch = do_cfg ? 2 : 1, C = m->vae.latent_channels;
    size_t plane = (size_t)a->height * a->width, lat = C * plane, img = 3 * plane;
    int32_t labels[2] = {a->noise_level, a->noise_level};
    for (int b = 0; b < batch; b++) /* cat([latents, image], dim=1) */
        memcpy(unet_in + b * (lat + img), latents, lat * sizeof *latents);
    int64_t shape[4] = {batch, C + 3, a->height, a->width};
    tensor *x = be->new_tensor(be, 4, shape), *y = NULL;
    int rc = -1;
    TRY(x);
    if (be->upload(be, x, unet_in)) goto fail;
    TRY(y = unet_fw(be, &m->unet, x, (float)t, labels, ctx));
    if (be->download(be, y, unet_out)) goto fail;
    if (do_cfg) {
        const float *uncond = unet_out, *text = unet_out + lat;
        for (size_t i = 0; i < lat; i++) eps[i] = uncond[i] + a->guidance * (text[i] - uncond[i]);
    } else {
        memcpy(eps, unet_out, lat * sizeof *eps);
    }
    rc = 0;
fail:
    DROP(x), DROP(y);
    return rc;
}

tensor *pipeline_decode(const model *m, backend *be, const float *latents, int h, int w) {
    int C = m->vae.latent_channels;
    size_t n = (size_t)C * h * w;
    float *z = malloc(n * sizeof *z);
    tensor *x = NULL, *out = NULL;
    if (!z) {
        set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        return NULL;
    }
    /* vae.decode(latents / scaling_factor), in float32 (force_upcast) */
    dtype saved = be->set_activation_type ? be->set_activation_type(be, DTYPE_F32) : DTYPE_F32;
    for (size_t i = 0; i < n; i++) z[i] = latents[i] / m->vae.scaling_factor;
    TRY(x = be->new_tensor(be, 4, (int64_t[]){1, C, h, w}));
    if (be->upload(be, x, z) == 0) out = vae_decode(be, &m->vae, x);
fail:
    if (be->set_activation_type) be->set_activation_type(be, saved);
    free(z);
    DROP(x);
    return out;
}

int pipeline_run(const model *m, backend *be, const pipeline_args *a, float **out,
                 pipeline_report *report) {
    pipeline_report rep = {0};
    int do_cfg = a->guidance > 1.0f, C = m->vae.latent_channels, rc = -1;
    size_t plane = (size_t)a->height * a->width, lat = C * plane, img = 3 * plane;
    int batch = do_cfg ? 2 : 1;
    *out = NULL;
    if (a->noise_level < 0 || a->noise_level > m->max_noise_level) {
        set_error(SDX4_ERR_INVALID_ARGUMENT, "noise_level %d is outside 0..%d", a->noise_level,
                  m->max_noise_level);
        return -1;
    }
    /* a private copy of the scheduler: set_timesteps writes to it */
    ddim_scheduler sched = m->scheduler;
    sched.timesteps = NULL;
    if (ddim_set_timesteps(&sched, a->steps)) return -1;

    float *noise = malloc(img * sizeof *noise), *noisy = malloc(img * sizeof *noisy);
    float *latents = malloc(lat * sizeof *latents), *eps = malloc(lat * sizeof *eps);
    float *prev = malloc(lat * sizeof *prev);
    float *unet_in = malloc(batch * (lat + img) * sizeof *unet_in);
    float *unet_out = malloc(batch * lat * sizeof *unet_out);
    tensor *ctx = NULL, *image = NULL;
    torch_rng rng;
    if (!noise || !noisy || !latents || !eps || !prev || !unet_in || !unet_out) {
        set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        goto fail;
    }
    double t0 = now();
    TRY(ctx = pipeline_encode_prompt(m, be, a->prompt, a->negative_prompt, do_cfg, &rep));
    rep.seconds_text = now() - t0;

    torch_rng_seed(&rng, a->seed);
    if (a->image_noise) memcpy(noise, a->image_noise, img * sizeof *noise);
    else torch_randn(&rng, noise, img);
    if (ddpm_add_noise(&m->low_res_scheduler, a->image, noise, img, a->noise_level, noisy))
        goto fail;
    for (int b = 0; b < batch; b++) /* the image half of every UNet input, once */
        memcpy(unet_in + b * (lat + img) + lat, noisy, img * sizeof *noisy);
    if (a->initial_latents) memcpy(latents, a->initial_latents, lat * sizeof *latents);
    else torch_randn(&rng, latents, lat); /* init_noise_sigma is 1 for DDIM */

    if (a->on_step && a->on_step(a->user, 0, sched.num_timesteps, latents)) goto canceled;
    t0 = now();
    for (int i = 0; i < sched.num_timesteps; i++) {
        int t = sched.timesteps[i];
        if (predict_noise(m, be, a, ctx, do_cfg, latents, t, unet_in, unet_out, eps) ||
            ddim_step(&sched, eps, t, latents, lat, a->eta, &rng, prev))
            goto fail;
        memcpy(latents, prev, lat * sizeof *latents);
        if (a->on_step && a->on_step(a->user, i + 1, sched.num_timesteps, latents)) goto canceled;
    }
    rep.seconds_unet = now() - t0;

    t0 = now();
    TRY(image = pipeline_decode(m, be, latents, a->height, a->width));
    *out = malloc(tensor_numel(image) * sizeof **out);
    if (!*out) {
        set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        goto fail;
    }
    if (be->download(be, image, *out)) goto fail;
    rep.seconds_vae = now() - t0;
    rc = 0;
    goto done;
canceled:
    set_error(SDX4_ERR_CANCELED, "canceled");
fail:
    free(*out);
    *out = NULL;
done:
    if (report) *report = rep;
    DROP(ctx), DROP(image);
    free(sched.timesteps);
    free(noise), free(noisy), free(latents), free(eps), free(prev), free(unet_in), free(unet_out);
    return rc;
}
