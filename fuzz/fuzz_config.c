/*
 * fuzz_config.c - arbitrary bytes as a component config: parsed, then used
 * to build the UNet, VAE decoder and text encoder in spec mode (no weights,
 * shapes only) and both schedulers. Any config must give a model or a
 * clear error; none may crash, hang or leak.
 */
#include <stdint.h>
#include <stdlib.h>

#include "core/config.h"
#include "model/scheduler.h"
#include "model/text_encoder.h"
#include "model/unet.h"
#include "model/vae.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    config c;
    if (cfg_parse(&c, (const char *)data, size, "fuzz/config.json")) return 0;
    weight_source ws;
    unet u;
    weights_spec_init(&ws);
    unet_init(&u, &ws, &c);
    unet_free(&u);
    weights_close(&ws);

    vae_decoder v;
    weights_spec_init(&ws);
    vae_init(&v, &ws, &c);
    weights_close(&ws);

    text_encoder te;
    weights_spec_init(&ws);
    text_encoder_init(&te, &ws, &c);
    text_encoder_free(&te);
    weights_close(&ws);

    ddim_scheduler d;
    if (ddim_from_config(&d, &c) == 0) {
        ddim_set_timesteps(&d, 1 + (int)(size % 1000));
        ddim_free(&d);
    }
    ddpm_scheduler p;
    if (ddpm_from_config(&p, &c) == 0) ddpm_free(&p);
    cfg_free(&c);
    return 0;
}
