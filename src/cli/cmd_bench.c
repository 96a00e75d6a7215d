/*
 * cmd_bench.c - `sdx4 bench`: how long the parts of the pipeline take.
 *
 * sdx4_bench() times the text encoder, one UNet step, the VAE decode and a
 * whole upscale on a size x size input (medians over --repeats runs, after
 * one untimed run of each that lets a GPU pick its algorithms, itself
 * timed for the UNet step and the VAE decode: *_first_ms); this command
 * prints the result as ONE line of JSON on stdout, so that runs on
 * several machines can be appended to a file and compared with jq:
 *   {"model":..., "device":..., "threads":..., "size":..., "steps":...,
 *    "text_encoder_ms":..., "unet_step_ms":..., "unet_step_replay_ms":...,
 *    "unet_step_planned_ms":...,
 *    "vae_decode_ms":..., "vae_tiles":..., "pipeline_ms":...,
 *    "unet_step_first_ms":..., "vae_decode_first_ms":...,
 *    "scheduler":..., "scheduler_options":..., "scheduler_step_ms":...,
 *    "pipeline_unet_steps":..., "peak_rss_mib":..., "device_peak_mib":...}
 * scheduler_step_ms is the whole upscale's sampler's own CPU time per
 * UNet step, to set beside unet_step_ms (BENCHMARKS.md, "Samplers").
 */
#include <jansson.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>

#include "cli.h"
#include "sdx4.h"

static const char help[] =
    "Usage: sdx4 bench [options]\n"
    "\n"
    "Times the text encoder, one UNet step, the VAE decode (in tiles\n"
    "where an upscale would tile it: vae_tiles) and a whole upscale of an\n"
    "N x N input (--size), and prints one line of JSON.\n"
    "\n"
    "Options:\n"
    "  --model DIR            diffusers model folder (default: $SDX4_MODEL)\n"
    "  --size N               input side in pixels, 8..1024 (default: 64)\n"
    "  --steps N              steps of the whole upscale, 1..1000\n"
    "                         (default: 2)\n"
    "  --scheduler NAME       the whole upscale's sampler (default: the\n"
    "                         model's own); its CPU time per UNet step is\n"
    "                         reported as scheduler_step_ms\n"
    "  --scheduler-option K=V a scheduler config override (repeatable); V\n"
    "                         is JSON, else a string: use_karras_sigmas=true\n"
    "  --repeats N            timed runs of each part after one warm-up\n"
    "                         run, 1..100; the median is kept (default: 1).\n"
    "                         The warm-up runs of the UNet step and the VAE\n"
    "                         decode are reported as *_first_ms: on a GPU,\n"
    "                         the one-off cost of a new size\n"
    "  --batch N              also time N whole upscales sharing their UNet\n"
    "                         calls (sdx4_upscale_batch), 1..16, as\n"
    "                         pipeline_batch_ms beside N x pipeline_ms\n"
    "                         (default: 1, not run)\n"
    "  --threads N            CPU threads, 0 = all cores (default: 0)\n"
    "  --variant fp16         load the *.fp16.safetensors weights\n"
    "  --device cpu|cuda|auto compute device (default: auto)\n"
    CLI_CUDA_HELP
    CLI_PRECISION_HELP
    "  -h, --help             show this help\n";

/* What --threads 0 means: every CPU this process may run on. */
static int available_cpus(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
    return 1;
}

static double mib(int64_t bytes) { return bytes / (1024.0 * 1024.0); }

static int print_result(const char *model, const char *device, int threads,
                        const char *scheduler, const char *scheduler_options,
                        const sdx4_bench_result *r) {
    json_t *root = json_pack(
        "{s:s, s:s, s:i, s:i, s:i, s:f, s:f, s:f, s:f, s:f, s:i, s:f, s:f, s:f, s:s, s:s, s:f, s:i, "
        "s:f, s:f, s:i, s:f}",
        "model",
        model, "device", device, "threads", threads, "size", r->size,
        "steps", r->steps, "text_encoder_ms", r->text_encoder_ms,
        "unet_step_ms", r->unet_step_ms, "unet_step_replay_ms", r->unet_step_replay_ms,
        "unet_step_planned_ms", r->unet_step_planned_ms,
        "vae_decode_ms", r->vae_decode_ms, "vae_tiles", r->vae_tiles,
        "pipeline_ms", r->pipeline_ms, "unet_step_first_ms", r->unet_step_first_ms,
        "vae_decode_first_ms", r->vae_decode_first_ms, "scheduler", scheduler ? scheduler : "",
        "scheduler_options", scheduler_options ? scheduler_options : "", "scheduler_step_ms",
        r->scheduler_step_ms, "pipeline_unet_steps", r->pipeline_unet_steps,
        "peak_rss_mib", mib(r->peak_rss_bytes),
        "device_peak_mib", mib(r->device_peak_bytes), "batch", r->batch, "pipeline_batch_ms",
        r->pipeline_batch_ms);
    /* 7 significant digits: 0.1 ms of a 1000 s run, without the noise
     * digits of binary fractions (0.30000000000000004). */
    char *text = root ? json_dumps(root, JSON_COMPACT | JSON_REAL_PRECISION(7))
                      : NULL;
    json_decref(root);
    if (!text) return cli_fail("cannot format the benchmark as JSON");
    puts(text);
    free(text);
    return 0;
}

int cmd_bench(int argc, char **argv) {
    const char *model = NULL, *variant = NULL, *device = "auto", *scheduler = NULL;
    int size = 64, steps = 2, repeats = 1, batch = 1, threads = 0;
    cli_list scheduler_option_list = {0};
    sdx4_cuda_options cuda = {0};
    cli_precision precision = {0};
    cli_option options[] = {
        {"--model", OPT_STRING, &model, 0, 0, NULL, 0},
        {"--size", OPT_INT, &size, 8, 1024, NULL, 0},
        {"--steps", OPT_INT, &steps, 1, 1000, NULL, 0},
        {"--repeats", OPT_INT, &repeats, 1, 100, NULL, 0},
        {"--batch", OPT_INT, &batch, 1, SDX4_MAX_BATCH, NULL, 0},
        {"--scheduler", OPT_STRING, &scheduler, 0, 0, NULL, 0},
        {"--scheduler-option", OPT_LIST, &scheduler_option_list, 0, 0, NULL, 0},
        {"--threads", OPT_INT, &threads, 0, SDX4_MAX_THREADS, NULL, 0},
        {"--variant", OPT_STRING, &variant, 0, 0, NULL, 0},
        {"--device", OPT_CHOICE, &device, 0, 0, "cpu|cuda|auto", 0},
        CLI_CUDA_OPTIONS(&cuda),
        CLI_PRECISION_OPTIONS(&precision),
        {NULL, 0, NULL, 0, 0, NULL, 0},
    };
    cli_command cmd = {"bench", help, "no arguments", 0, 0, options};
    int npositionals;
    int status = cli_parse(&cmd, argc, argv, NULL, &npositionals);
    if (status != CLI_CONTINUE ||
        (status = cli_precision_settings(&cmd, &precision, device, &cuda)) != CLI_CONTINUE ||
        (status = cli_cuda_environment(&cmd, &cuda)) != CLI_CONTINUE)
        return status;
    model = cli_model_dir(model);
    if (!model)
        return cli_usage_error(&cmd, "--model is required (or set SDX4_MODEL)");
    int bad_option;
    char *scheduler_options = cli_scheduler_options(&cmd, &scheduler_option_list, &bad_option);
    if (bad_option) return EXIT_USAGE;
    sdx4_upscale_params params; /* a choice the engine cannot know is refused before loading */
    sdx4_upscale_params_default(&params);
    params.scheduler = scheduler;
    params.scheduler_options = scheduler_options;
    if (sdx4_check_params(&params) != SDX4_OK) {
        free(scheduler_options);
        return cli_usage_error(&cmd, "%s", sdx4_last_error());
    }

    sdx4_engine_options engine_options;
    sdx4_engine_options_default(&engine_options);
    engine_options.model_dir = model;
    engine_options.variant = variant;
    engine_options.device = device;
    engine_options.threads = threads;
    engine_options.cuda = cuda;
    engine_options.cpu = precision.cpu;
    sdx4_engine *engine = NULL;
    sdx4_model_info info;
    sdx4_bench_result result;
    if (sdx4_engine_open(&engine_options, &engine) != SDX4_OK ||
        sdx4_engine_info(engine, &info) != SDX4_OK ||
        sdx4_bench(engine, size, steps, repeats, batch, scheduler, scheduler_options, &result) != SDX4_OK)
        status = cli_fail_engine();
    else
        status = print_result(model, info.device, threads ? threads : available_cpus(),
                              scheduler, scheduler_options, &result);
    sdx4_engine_close(engine);
    free(scheduler_options);
    return status;
}
