/*
 * fuzz_config.c - arbitrary bytes as a component config: parsed, then used
 * to build the UNet, VAE decoder and text encoder in spec mode (no weights,
 * shapes only), both schedulers and a GAN (model/esrgan.h). Any config must give a model or a
 * clear error; none may crash, hang or leak.
 */
#include <stdint.h>
#include <stdlib.h>

#include "core/config.h"
#include "model/esrgan.h"
#include "model/scheduler.h"
#include "model/text_encoder.h"
#include "model/unet.h"
#include "model/vae.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    config c;
    if (sdx4_cfg_parse(&c, (const char *)data, size, "fuzz/config.json")) return 0;
    weight_source ws;
    unet u;
    sdx4_weights_spec_init(&ws);
    sdx4_unet_load(&u, &ws, &c);
    sdx4_unet_free(&u);
    sdx4_weights_close(&ws);

    vae_decoder v;
    sdx4_weights_spec_init(&ws);
    sdx4_vae_load(&v, &ws, &c);
    sdx4_weights_close(&ws);

    text_encoder te;
    sdx4_weights_spec_init(&ws);
    sdx4_text_encoder_load(&te, &ws, &c);
    sdx4_text_encoder_free(&te);
    sdx4_weights_close(&ws);

    ddim_scheduler d;
    if (sdx4_ddim_from_config(&d, &c) == 0) {
        sdx4_ddim_set_timesteps(&d, 1 + (int)(size % 1000));
        sdx4_ddim_free(&d);
    }
    ddpm_scheduler p;
    if (sdx4_ddpm_from_config(&p, &c) == 0) sdx4_ddpm_free(&p);
    gan_config g;
    esrgan gan;
    if (sdx4_gan_config_parse(&c, &g) == 0 && sdx4_esrgan_spec(&gan, &g) == 0) {
        (void)sdx4_esrgan_radius(&g);
        (void)sdx4_esrgan_bytes_per_pixel(&g);
        (void)sdx4_esrgan_flops(&g, 64, 64);
        sdx4_esrgan_free(&gan);
    }
    sdx4_cfg_free(&c);
    return 0;
}
