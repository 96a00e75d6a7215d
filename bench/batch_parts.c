/*
 * batch_parts.c - whether the parts around the UNet pay to batch (issue
 * 16): the text encoder and the VAE decode of K upscales, one call each
 * against one call for all K.
 *
 *   build/batch_parts MODEL_DIR [LATENT_SIDE [K [REPEATS [DEVICE [THREADS [VARIANT]]]]]]
 *
 * sdx4_upscale_batch shares the UNet's calls between upscales and runs
 * their prompts' encodings (batch 2: the prompt and the negative one) and
 * their decodes (batch 1) one after the other. This times both ways, in
 * turns so that a machine's drift falls on both: K encodings of batch 2
 * against one of batch 2K (77 tokens each), and K decodes of a
 * LATENT_SIDE latent (torch.randn, seed 0) against one decode of batch K,
 * the decode as sdx4_pipeline_decode runs it (bfloat16 activations where
 * the backend keeps half ones). Defaults: 64 (256 px out), K 3, 2
 * repeats, the engine's default device and threads, the plain weights
 * (VARIANT fp16: *.fp16.safetensors). One JSON line per repeat.
 * BENCHMARKS.md ("Batching") has the figures.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "backend/backend.h"
#include "core/error.h"
#include "core/rng.h"
#include "engine_internal.h"
#include "model/text_encoder.h"
#include "model/vae.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void fail(void) {
    fprintf(stderr, "%s\n", sdx4_last_error());
    exit(1);
}

/* Seconds of `calls` encodings of `batch` token rows each. */
static double encode(backend *be, const model *m, int batch, int calls) {
    int seq = 77;
    int32_t *ids = malloc((size_t)batch * seq * sizeof *ids);
    if (!ids) exit(1);
    for (int i = 0; i < batch * seq; i++) ids[i] = 1 + (i * 7919) % 40000; /* any tokens: dense work only */
    double t0 = now();
    for (int c = 0; c < calls; c++) {
        tensor *y = sdx4_text_encoder_forward(be, &m->te, ids, batch, seq);
        if (!y) fail();
        tensor_free(y);
    }
    if (be->synchronize && be->synchronize(be)) fail();
    free(ids);
    return now() - t0;
}

/* Seconds of `calls` decodes of `batch` latents of side x side each, their
 * images downloaded as the pipeline downloads them. */
static double decode(backend *be, const model *m, int side, int batch, int calls) {
    int C = m->vae.latent_channels, f = sdx4_vae_scale_factor(&m->vae);
    size_t n = (size_t)batch * C * side * side, n_out = (size_t)batch * 3 * side * f * side * f;
    float *z = malloc(n * sizeof *z), *image = malloc(n_out * sizeof *image);
    if (!z || !image) exit(1);
    torch_rng rng;
    sdx4_torch_rng_seed(&rng, 0);
    sdx4_torch_randn(&rng, z, n);
    double t0 = now();
    for (int c = 0; c < calls; c++) {
        dtype saved = be->set_activation_type ? be->set_activation_type(be, DTYPE_BF16) : DTYPE_F32;
        tensor *x = be->new_tensor(be, 4, (int64_t[]){batch, C, side, side}), *y = NULL;
        if (x && !be->upload(be, x, z)) y = sdx4_vae_decode(be, &m->vae, x);
        if (be->set_activation_type) be->set_activation_type(be, saved);
        if (!y || be->download(be, y, image)) fail();
        tensor_free(y);
        tensor_free(x);
    }
    double seconds = now() - t0;
    free(z), free(image);
    return seconds;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL_DIR [LATENT_SIDE [K [REPEATS [DEVICE [THREADS [VARIANT]]]]]]\n", argv[0]);
        return 2;
    }
    int side = argc > 2 ? atoi(argv[2]) : 64, k = argc > 3 ? atoi(argv[3]) : 3, repeats = argc > 4 ? atoi(argv[4]) : 2;
    if (side < 8 || side > 512 || k < 2 || k > SDX4_MAX_BATCH || repeats < 1) {
        fprintf(stderr, "LATENT_SIDE 8..512, K 2..%d, REPEATS 1 or more\n", SDX4_MAX_BATCH);
        return 2;
    }
    sdx4_engine_options o;
    sdx4_engine_options_default(&o);
    o.model_dir = argv[1];
    if (argc > 5) o.device = argv[5];
    if (argc > 6) o.threads = atoi(argv[6]);
    if (argc > 7) o.variant = argv[7];
    sdx4_engine *e = NULL;
    if (sdx4_engine_open(&o, &e) != SDX4_OK) fail();
    model *m = sdx4_engine_model(e);
    backend *be = sdx4_engine_backend(e);
    if (!m) {
        fprintf(stderr, "%s: a diffusion model is needed (a GAN has no text encoder)\n", argv[1]);
        return 1;
    }
    encode(be, m, 2, 1), decode(be, m, side, 1, 1); /* untimed: warm-up, and a GPU's algorithm choices */
    for (int r = 0; r < repeats; r++) {
        double text_apart = encode(be, m, 2, k), text_together = encode(be, m, 2 * k, 1);
        double vae_apart = decode(be, m, side, 1, k), vae_together = decode(be, m, side, k, 1);
        printf("{\"device\": \"%s\", \"latent\": %d, \"k\": %d, \"text_apart_s\": %.3f, \"text_batched_s\": %.3f, "
               "\"vae_apart_s\": %.3f, \"vae_batched_s\": %.3f}\n",
               be->description, side, k, text_apart, text_together, vae_apart, vae_together);
        fflush(stdout);
    }
    sdx4_engine_close(e);
    return 0;
}
