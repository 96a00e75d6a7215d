/* model.c - loading a diffusers x4-upscaler folder (see model.h). */
#include "model/model.h"

#include <stdlib.h>
#include <string.h>

#include "core/error.h"

static int read_index(model *m, const char *dir) {
    config idx;
    if (sdx4_cfg_load(&idx, dir, "model_index.json")) return -1;
    int rc = sdx4_cfg_expect_str(&idx, "_class_name", "StableDiffusionUpscalePipeline") ||
             sdx4_cfg_int(&idx, "max_noise_level", 350, &m->max_noise_level);
    if (!rc && (m->max_noise_level < 0 || m->max_noise_level > 100000)) {
        sdx4_set_error(SDX4_ERR_MODEL, "model_index.json: max_noise_level=%d is out of range",
                  m->max_noise_level);
        rc = -1;
    }
    sdx4_cfg_free(&idx);
    return rc ? -1 : 0;
}

static int read_configs(model *m, const char *dir) {
    return sdx4_cfg_load(&m->te_cfg, dir, "text_encoder/config.json") ||
                   sdx4_cfg_load(&m->unet_cfg, dir, "unet/config.json") ||
                   sdx4_cfg_load(&m->vae_cfg, dir, "vae/config.json")
               ? -1
               : 0;
}

/* The pieces must fit each other, as the pipeline's own checks demand. */
static int check_consistency(const model *m) {
    int ctx = m->te.hidden;
    if (m->unet.in_channels != m->vae.latent_channels + 3) {
        sdx4_set_error(SDX4_ERR_MODEL, "unet/config.json: in_channels=%d, but the pipeline feeds "
                  "%d latent channels + 3 image channels", m->unet.in_channels,
                  m->vae.latent_channels);
        return -1;
    }
    if (m->unet.out_channels != m->vae.latent_channels) {
        sdx4_set_error(SDX4_ERR_MODEL, "unet/config.json: out_channels=%d differs from the VAE's "
                  "latent_channels=%d", m->unet.out_channels, m->vae.latent_channels);
        return -1;
    }
    for (int i = 0; i < m->unet.levels; i++)
        if (m->unet.context_dim[i] != ctx) {
            sdx4_set_error(SDX4_ERR_MODEL, "unet/config.json: cross_attention_dim differs from the "
                      "text encoder's hidden_size=%d", ctx);
            return -1;
        }
    return 0;
}

static int build(model *m) {
    if (sdx4_text_encoder_load(&m->te, &m->te_ws, &m->te_cfg)) return -1;
    if (sdx4_unet_load(&m->unet, &m->unet_ws, &m->unet_cfg)) return -1;
    if (sdx4_vae_load(&m->vae, &m->vae_ws, &m->vae_cfg)) return -1;
    return 0;
}

int sdx4_model_load(model *m, backend *be, const char *dir, const char *variant) {
    memset(m, 0, sizeof *m);
    if (read_index(m, dir) || read_configs(m, dir)) goto fail;
    if (!(m->tok = sdx4_tokenizer_load(dir))) goto fail;
    if (sdx4_scheduler_source_load(&m->scheduler, dir) || sdx4_ddpm_load(&m->low_res_scheduler, dir)) goto fail;
    if (sdx4_weights_open(&m->te_ws, be, dir, "text_encoder", "model", variant) ||
        sdx4_weights_open(&m->unet_ws, be, dir, "unet", "diffusion_pytorch_model", variant) ||
        sdx4_weights_open(&m->vae_ws, be, dir, "vae", "diffusion_pytorch_model", variant))
        goto fail;
    if (build(m) || check_consistency(m)) goto fail;
    /* every weight is in memory now: the files are not read again */
    sdx4_weights_finish(&m->te_ws);
    sdx4_weights_finish(&m->unet_ws);
    sdx4_weights_finish(&m->vae_ws);
    return 0;
fail:
    sdx4_model_free(m);
    return -1;
}

int sdx4_model_spec(model *m, const char *dir) {
    memset(m, 0, sizeof *m);
    sdx4_weights_spec_init(&m->te_ws);
    sdx4_weights_spec_init(&m->unet_ws);
    sdx4_weights_spec_init(&m->vae_ws);
    if (read_index(m, dir) || read_configs(m, dir) || build(m) || check_consistency(m)) {
        sdx4_model_free(m);
        return -1;
    }
    return 0;
}

void sdx4_model_free(model *m) {
    sdx4_text_encoder_free(&m->te);
    sdx4_unet_free(&m->unet);
    sdx4_weights_close(&m->te_ws);
    sdx4_weights_close(&m->unet_ws);
    sdx4_weights_close(&m->vae_ws);
    sdx4_cfg_free(&m->te_cfg);
    sdx4_cfg_free(&m->unet_cfg);
    sdx4_cfg_free(&m->vae_cfg);
    sdx4_tokenizer_free(m->tok);
    sdx4_scheduler_source_free(&m->scheduler);
    sdx4_ddpm_free(&m->low_res_scheduler);
    memset(m, 0, sizeof *m);
}
