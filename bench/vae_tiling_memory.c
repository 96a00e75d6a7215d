/*
 * vae_tiling_memory.c - what the VAE decode holds, whole and in tiles.
 *
 *   vae_tiling_memory MODEL_DIR LATENT_SIDE off|on [THREADS]
 *
 * Loads the model on the CPU, decodes a LATENT_SIDE x LATENT_SIDE latent
 * of torch.randn (seed 0) as the pipeline does (sdx4_pipeline_decode,
 * whole or in the config's tiles) and prints one line
 * of JSON: the backend's peak during the decode over what it held before
 * (activations and kernel scratch: the memory the decode adds), the
 * estimate that "auto" compares with the budget (sdx4_vae_decode_bytes),
 * the process's peak RSS, the tiles and the seconds. One decode per
 * process, so that each peak is its own. BENCHMARKS.md, "Tiled VAE
 * decode", has the figures and the commands.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "core/error.h"
#include "core/rng.h"
#include "model/pipeline.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
    int side = argc > 2 ? atoi(argv[2]) : 0, tiled = argc > 3 && !strcmp(argv[3], "on");
    if (argc < 4 || side < 1 || side > 1024 || (!tiled && strcmp(argv[3], "off"))) {
        fprintf(stderr, "usage: vae_tiling_memory MODEL_DIR LATENT_SIDE off|on [THREADS]\n");
        return 2;
    }
    backend *be = sdx4_backend_cpu_create(argc > 4 ? atoi(argv[4]) : 0);
    model m;
    if (!be || sdx4_model_load(&m, be, argv[1], NULL)) {
        fprintf(stderr, "%s\n", sdx4_last_error());
        return 1;
    }
    int f = sdx4_vae_scale_factor(&m.vae);
    size_t n = (size_t)m.vae.latent_channels * side * side;
    float *latents = malloc(n * sizeof *latents), *out = NULL;
    torch_rng rng;
    sdx4_torch_rng_seed(&rng, 0);
    sdx4_torch_randn(&rng, latents, n);
    int64_t before, peak;
    be->memory(be, &before, &peak);
    double t0 = now();
    int tiles = sdx4_pipeline_decode(&m, be, latents, side, side, tiled ? VAE_TILING_ON : VAE_TILING_OFF,
                                     0, 0, &out);
    double seconds = now() - t0;
    if (tiles < 0) {
        fprintf(stderr, "%s\n", sdx4_last_error());
        return 1;
    }
    be->memory(be, NULL, &peak);
    printf("{\"latent\": %d, \"output\": %d, \"tiling\": \"%s\", \"tiles\": %d, \"seconds\": %.1f, "
           "\"decode_peak_mib\": %.0f, \"estimate_mib\": %.0f, \"peak_rss_mib\": %.0f}\n",
           side, side * f, argv[3], tiles, seconds, (double)(peak - before) / 1048576.0,
           (double)sdx4_vae_decode_bytes(&m.vae, side, side) / 1048576.0,
           (double)sdx4_peak_rss_bytes() / 1048576.0);
    free(latents), free(out);
    sdx4_model_free(&m);
    be->destroy(be);
    return 0;
}
