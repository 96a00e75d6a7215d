/*
 * cmd_info.c - `sdx4 info`: what a model folder holds, as the engine sees it.
 *
 * Opens the engine on the CPU (loading is what validates the folder: a
 * missing tensor or a wrong shape is reported here as it would be by
 * `upscale`) and prints sdx4_engine_info(): one "key: value" line each, the
 * components with their parameter counts ("unet 473.4M"), or a GAN's
 * architecture and count, or with --json the same facts as one JSON
 * object with exact counts.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "sdx4.h"

static const char help[] =
    "Usage: sdx4 info [options] DIR\n"
    "\n"
    "Loads the model in DIR on the CPU and describes it: components and\n"
    "their parameter counts, dtypes, max noise level, scale factor and\n"
    "prompt length.\n"
    "\n"
    "Options:\n"
    "  --json          print one JSON object instead of text\n"
    "  --variant fp16  load the *.fp16.safetensors weights\n"
    "  -h, --help      show this help\n";

/* 473364676 -> "473.4M", as model cards write parameter counts. */
static void format_count(char *buf, size_t size, int64_t n) {
    if (n >= 1000000000)
        snprintf(buf, size, "%.1fB", n / 1e9);
    else if (n >= 1000000)
        snprintf(buf, size, "%.1fM", n / 1e6);
    else if (n >= 1000)
        snprintf(buf, size, "%.1fK", n / 1e3);
    else
        snprintf(buf, size, "%lld", (long long)n);
}

/* A GAN (sdx4.h): one network, no prompt, no noise. */
static void print_gan_text(const sdx4_model_info *info) {
    char count[32];
    format_count(count, sizeof count, info->gan_params);
    printf("model: %s\n", info->model_dir);
    printf("kind: gan (%s, %s parameters)\n", info->architecture, count);
    printf("device: %s\n", info->device);
    printf("compute dtype: %s\n", info->compute_dtype);
    printf("weights dtype: %s\n", info->weights_dtype);
    printf("scale factor: %d\n", info->vae_scale_factor);
    printf("activations: %lld bytes an input pixel (tiles above %.0f GiB)\n", (long long)info->gan_bytes_per_pixel,
           SDX4_GAN_TILING_BUDGET / (double)(1 << 30));
}

static void print_text(const sdx4_model_info *info) {
    if (!strcmp(info->kind, "gan")) return print_gan_text(info);
    const struct {
        const char *name;
        int64_t params;
    } parts[] = {
        {"text_encoder", info->text_encoder_params},
        {"unet", info->unet_params},
        {"vae", info->vae_params},
    };
    printf("model: %s\n", info->model_dir);
    printf("device: %s\n", info->device);
    printf("compute dtype: %s\n", info->compute_dtype);
    printf("weights dtype: %s\n", info->weights_dtype);
    printf("components:\n");
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
        char count[32];
        format_count(count, sizeof count, parts[i].params);
        printf("  %s %s\n", parts[i].name, count);
    }
    printf("max noise level: %d\n", info->max_noise_level);
    printf("scale factor: %d\n", info->vae_scale_factor);
    printf("max prompt tokens: %d\n", info->max_prompt_tokens);
    printf("unet activations: %lld bytes a latent pixel (automatic tiles above %.0f GiB)\n",
           (long long)info->unet_bytes_per_pixel, SDX4_UNET_TILING_BUDGET / (double)(1 << 30));
    if (info->device_memory_bytes > 0)
        printf("device memory: %.1f MiB\n",
               info->device_memory_bytes / (1024.0 * 1024.0));
}

static int print_json(const sdx4_model_info *info) {
    json_t *root = !strcmp(info->kind, "gan")
                       ? json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:I, s:i, s:I, s:I}", "model_dir", info->model_dir,
                                   "kind", info->kind, "architecture", info->architecture, "device", info->device,
                                   "compute_dtype", info->compute_dtype, "weights_dtype", info->weights_dtype,
                                   "parameters", (json_int_t)info->gan_params, "vae_scale_factor",
                                   info->vae_scale_factor, "device_memory_bytes",
                                   (json_int_t)info->device_memory_bytes, "gan_bytes_per_pixel",
                                   (json_int_t)info->gan_bytes_per_pixel)
                       : json_pack(
        "{s:s, s:s, s:s, s:s, s:s, s:{s:I, s:I, s:I}, s:i, s:i, s:i, s:I, s:I}",
        "model_dir", info->model_dir, "kind", info->kind, "device", info->device,
        "compute_dtype", info->compute_dtype, "weights_dtype",
        info->weights_dtype, "parameters", "text_encoder",
        (json_int_t)info->text_encoder_params, "unet",
        (json_int_t)info->unet_params, "vae", (json_int_t)info->vae_params,
        "max_noise_level", info->max_noise_level, "vae_scale_factor",
        info->vae_scale_factor, "max_prompt_tokens", info->max_prompt_tokens,
        "device_memory_bytes", (json_int_t)info->device_memory_bytes,
        "unet_bytes_per_pixel", (json_int_t)info->unet_bytes_per_pixel);
    char *text = root ? json_dumps(root, JSON_COMPACT) : NULL;
    json_decref(root);
    if (!text) return cli_fail("cannot format the model info as JSON");
    puts(text);
    free(text);
    return 0;
}

int cmd_info(int argc, char **argv) {
    int json = 0;
    const char *variant = NULL;
    cli_option options[] = {
        {"--json", OPT_FLAG, &json, 0, 0, NULL, 0},
        {"--variant", OPT_STRING, &variant, 0, 0, NULL, 0},
        {NULL, 0, NULL, 0, 0, NULL, 0},
    };
    cli_command cmd = {"info", help, "DIR", 1, 1, options};
    const char *dir;
    int ndir;
    int status = cli_parse(&cmd, argc, argv, &dir, &ndir);
    if (status != CLI_CONTINUE) return status;

    sdx4_engine_options engine_options;
    sdx4_engine_options_default(&engine_options);
    engine_options.model_dir = dir;
    engine_options.variant = variant;
    engine_options.device = "cpu";
    sdx4_engine *engine = NULL;
    sdx4_model_info info;
    if (sdx4_engine_open(&engine_options, &engine) != SDX4_OK ||
        sdx4_engine_info(engine, &info) != SDX4_OK) {
        status = cli_fail_engine();
    } else if (json) {
        status = print_json(&info);
    } else {
        print_text(&info);
        status = 0;
    }
    sdx4_engine_close(engine);
    return status;
}
