/*
 * cmd_upscale.c - `sdx4 upscale`: one image in, one image 4x larger out.
 *
 * The order of work is chosen so that mistakes cost as little as possible:
 * the arguments are checked first (including OUT's format and that its
 * folder is writable, so a typo does not cost a whole run), then the input
 * is decoded, then the model is loaded, and only then does the long part
 * start.
 *
 * Ctrl-C: the SIGINT handler only sets a flag, which is the engine's
 * cancel flag (sdx4_upscale_params.cancel): the engine reads it between
 * steps and inside long operations, stops within a fraction of a second
 * and returns SDX4_ERR_CANCELED, so everything is freed on the normal path
 * and the command exits 130. The handler is installed with SA_RESETHAND: a
 * second Ctrl-C kills the process the usual way.
 */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "cli.h"
#include "imageio.h"
#include "infotext.h"
#include "models.h"
#include "progress.h"
#include "sdx4.h"

/* An option that sets an engine parameter: its range, default and help
 * line come from the engine's table (sdx4_params), so the CLI cannot
 * accept what the engine refuses nor document another default. */
typedef struct {
    const char *option, *metavar, *param;
    void *value;
} param_flag;

/* Appends to the string in help[size], cutting what does not fit. */
static void add(char *help, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void add(char *help, size_t size, const char *fmt, ...) {
    size_t n = strlen(help);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(help + n, size - n, fmt, ap);
    va_end(ap);
}

/* One option's lines: its text wrapped at 79 columns beside a 25-column
 * left part. */
static void help_option(char *help, size_t size, const char *left, const char *text) {
    add(help, size, "  %-22s", left);
    size_t column = 25;
    while (*text) {
        int word = (int)strcspn(text, " ");
        if (column > 25 && column + 1 + (size_t)word > 79) {
            add(help, size, "\n%24s", "");
            column = 25;
        }
        add(help, size, " %.*s", word, text);
        column += 1 + (size_t)word;
        text += word;
        text += strspn(text, " ");
    }
    add(help, size, "\n");
}

static void param_help(char *help, size_t size, const param_flag *flag) {
    const sdx4_param *p = sdx4_param_find(flag->param);
    char left[64], text[256];
    snprintf(left, sizeof left, "%s %s", flag->option, flag->metavar);
    switch (p->type) {
    case SDX4_PARAM_TEXT:
        snprintf(text, sizeof text, "%s (default: empty)", p->help);
        break;
    case SDX4_PARAM_CHOICE:
        snprintf(text, sizeof text, "%s (default: %s)", p->help, p->choices[p->int_default]);
        break;
    case SDX4_PARAM_SEED:
        snprintf(text, sizeof text, "%s, %lld..%lld (default: a random one; the seed used is printed)",
                 p->help, (long long)p->int_min, (long long)p->int_max);
        break;
    case SDX4_PARAM_INT:
        snprintf(text, sizeof text, "%s, %lld..%lld (default: %lld)", p->help, (long long)p->int_min,
                 (long long)p->int_max, (long long)p->int_default);
        break;
    case SDX4_PARAM_REAL:
        snprintf(text, sizeof text, "%s, %g..%g (default: %g)", p->help, p->real_min, p->real_max,
                 p->real_default);
        break;
    }
    help_option(help, size, left, text);
}

static void build_help(char *help, size_t size, const param_flag *flags, int nflags) {
    help[0] = '\0';
    add(help, size,
        "Usage: sdx4 upscale [options] IN OUT\n"
        "\n"
        "Upscales IN (PNG, JPEG or WebP) 4x and writes OUT in the format of its\n"
        "extension (.png, .jpg, .jpeg, .webp).\n"
        "\n"
        "Options:\n"
        "  --model DIR            diffusers model folder (default: $SDX4_MODEL)\n");
    for (int i = 0; i < nflags; i++) param_help(help, size, &flags[i]);
    help_option(help, size, "--scheduler-option K=V",
                "a scheduler config override (repeatable); V is JSON, else a string: "
                "use_karras_sigmas=true");
    add(help, size,
        "  --threads N            CPU threads, 0..%d, 0 = all cores (default: 0)\n"
        "  --variant fp16         load the *.fp16.safetensors weights\n"
        "  --device cpu|cuda|auto compute device (default: auto)\n"
        CLI_CUDA_HELP
        CLI_PRECISION_HELP
        "  --quality Q            JPEG/WebP quality, 1..100 (default: 90)\n"
        "  --safety-checker DIR   check the output with this content checker\n"
        "                         (CompVis/stable-diffusion-safety-checker's folder)\n"
        "  --safety-action refuse|blackout\n"
        "                         a flagged output: not written, exit status 3\n"
        "                         (refuse, the default), or written black\n"
        "  --metadata             write the parameters into OUT (a PNG text chunk,\n"
        "                         JPEG/WebP EXIF UserComment, as AUTOMATIC1111 does)\n"
        "                         and keep IN's ICC profile\n"
        "  -h, --help             show this help\n"
        "\n"
        "Ctrl-C cancels within a fraction of a second (exit status 130).\n",
        SDX4_MAX_THREADS);
}

static cli_option param_option(const param_flag *flag) {
    const sdx4_param *p = sdx4_param_find(flag->param);
    cli_option o = {flag->option, OPT_TEXT, flag->value, 0, 0, NULL, 0};
    switch (p->type) {
    case SDX4_PARAM_TEXT: break;
    case SDX4_PARAM_CHOICE: break; /* sdx4_check_params names the choices */
    case SDX4_PARAM_SEED: o.kind = OPT_SEED; break; /* 0..SDX4_SEED_MAX */
    case SDX4_PARAM_INT:
        o.kind = OPT_INT, o.min = (double)p->int_min, o.max = (double)p->int_max;
        break;
    case SDX4_PARAM_REAL:
        o.kind = OPT_FLOAT, o.min = p->real_min, o.max = p->real_max;
        break;
    }
    return o;
}

/* lock-free on every platform sdx4 builds for, so a signal handler may set it */
static sdx4_atomic_int interrupted;

static void on_sigint(int sig) {
    (void)sig;
    atomic_store(&interrupted, 1);
}

static int on_progress(void *user, int step, int total) {
    progress_draw(user, step, total);
    return 0;
}

/* A random seed in the table's range (63 bits), so that it can be given
 * back with --seed or to the API. */
static int random_seed(uint64_t *seed) {
    uint64_t r;
    if (getrandom(&r, sizeof r, 0) != (ssize_t)sizeof r) return -1;
    *seed = r & (uint64_t)SDX4_SEED_MAX;
    return 0;
}

/* Warns before the run when a prompt is longer than the text encoder
 * reads: the tail of it will have no effect. */
static int warn_if_truncated(sdx4_engine *engine, const char *what,
                             const char *prompt, int max_tokens) {
    int tokens;
    if (!prompt) return 0;
    if (sdx4_count_tokens(engine, prompt, &tokens) != SDX4_OK) return -1;
    if (tokens > max_tokens)
        fprintf(stderr,
                "warning: the %s has %d tokens; only the first %d are used\n",
                what, tokens, max_tokens);
    return 0;
}

/* imageio's messages usually name the file already; say it once. */
static void fail_file(const char *path, const char *message) {
    if (strstr(message, path))
        cli_fail("%s", message);
    else
        cli_fail("%s: %s", path, message);
}

/* A model's name: its folder's, as the server names it. */
static void model_name(const char *dir, char *name, size_t size) {
    snprintf(name, size, "%s", dir);
    size_t n = strlen(name);
    while (n > 1 && name[n - 1] == '/') name[--n] = '\0';
    const char *slash = strrchr(name, '/');
    if (slash && slash[1]) memmove(name, slash + 1, strlen(slash + 1) + 1);
}

/* Whether --metadata's text fits OUT: a JPEG's or WebP's EXIF holds
 * IMAGEIO_MAX_EXIF_BYTES, 2 bytes of UTF-16 at most per byte of text and
 * 58 of its own. Asked once the model's kind is known, before the run. */
static int metadata_fits(const char *out_path, const sdx4_upscale_params *params, const char *model,
                         const char *model_hash, const sdx4_model_info *info) {
    if (imageio_format_from_name(out_path) == IMAGE_PNG) return 1;
    infotext_facts facts = {model, model_hash, !strcmp(info->kind, "gan"), 0, 0, 0, 0};
    size_t text = infotext_bound(params, &facts);
    if (58 + 2 * text <= IMAGEIO_MAX_EXIF_BYTES) return 1;
    cli_fail("%s: --metadata: the parameters (up to %zu bytes of text) may not fit its EXIF (%d bytes): write a "
             ".png, or use shorter prompts", out_path, text, IMAGEIO_MAX_EXIF_BYTES);
    return 0;
}

/* Writes OUT with the parameters and the input's profile (--metadata). */
static int write_with_metadata(const sdx4_image *output, const char *out_path, int quality,
                               const sdx4_upscale_params *params, const char *model, const char *model_hash,
                               const sdx4_model_info *info, const sdx4_image *input, const void *icc,
                               size_t icc_len, char *err, size_t errlen) {
    char name[256];
    model_name(model, name, sizeof name);
    infotext_facts facts = {name, model_hash, !strcmp(info->kind, "gan"), input->width, input->height,
                            output->width, output->height};
    char *text = infotext(params, &facts);
    if (!text) return snprintf(err, errlen, "out of memory"), -1;
    imageio_metadata meta;
    infotext_metadata(text, facts.gan, icc, icc_len, &meta);
    int rc = imageio_write_file_metadata(output, out_path, quality, &meta, err, errlen);
    free(text);
    return rc;
}

/* A run on the full model takes minutes: find out before it, not after,
 * that OUT cannot be created. */
static int check_writable_folder(const char *out_path) {
    char folder[4096];
    snprintf(folder, sizeof folder, "%s", out_path);
    char *slash = strrchr(folder, '/');
    if (!slash)
        strcpy(folder, ".");
    else if (slash == folder)
        folder[1] = '\0';
    else
        *slash = '\0';
    if (access(folder, W_OK) != 0) {
        cli_fail("%s: %s", folder, strerror(errno));
        return -1;
    }
    return 0;
}
/* The content check of --safety-checker: 0 to write the output (passed, or
 * flagged and blacked out, as diffusers does), else the exit status is in
 * safety_status (EXIT_FLAGGED, or EXIT_RUNTIME when the check failed). */
static int safety_status;

static int check_content(sdx4_safety *safety, sdx4_image *output, const char *out_path, int blackout) {
    sdx4_safety_result r;
    if (sdx4_safety_check(safety, output, &r) != SDX4_OK) {
        cli_fail_engine();
        safety_status = EXIT_RUNTIME;
        return -1;
    }
    if (!r.flagged) {
        fprintf(stderr, "content check: passed (%.2f s)\n", r.seconds);
        return 0;
    }
    if (blackout) {
        memset(output->pixels, 0, (size_t)output->width * output->height * 3);
        fprintf(stderr, "content check: the output was flagged; %s is written black (--safety-action blackout)\n",
                out_path);
        return 0;
    }
    cli_fail("%s not written: the output was flagged by the content check (--safety-checker)", out_path);
    safety_status = EXIT_FLAGGED;
    return -1;
}

int cmd_upscale(int argc, char **argv) {
    const char *model = NULL, *variant = NULL, *device = "auto";
    const char *safety_dir = NULL, *safety_action = "refuse";
    sdx4_upscale_params params;
    sdx4_upscale_params_default(&params);
    int steps = params.num_inference_steps, threads = 0, quality = 0, metadata = 0;
    double guidance = params.guidance_scale, noise = params.noise_level;
    double eta = params.eta;
    uint64_t seed = 0;
    sdx4_cuda_options cuda = {0};
    cli_precision precision = {0};
    cli_list scheduler_option_list = {0};
    char *options_json = NULL;

    const param_flag flags[] = {
        {"--prompt", "TEXT", "prompt", &params.prompt},
        {"--negative-prompt", "TEXT", "negative_prompt", &params.negative_prompt},
        {"--steps", "N", "num_inference_steps", &steps},
        {"--guidance", "G", "guidance_scale", &guidance},
        {"--noise-level", "F", "noise_level", &noise},
        {"--seed", "S", "seed", &seed},
        {"--eta", "E", "eta", &eta},
        {"--scheduler", "NAME", "scheduler", &params.scheduler},
        {"--vae-tiling", "MODE", "vae_tiling", &params.vae_tiling},
        {"--tile", "SIZE", "tile", &params.tile},
        {"--tile-overlap", "N", "tile_overlap", &params.tile_overlap},
    };
    const cli_option fixed[] = {
        {"--model", OPT_STRING, &model, 0, 0, NULL, 0},
        {"--threads", OPT_INT, &threads, 0, SDX4_MAX_THREADS, NULL, 0},
        {"--variant", OPT_STRING, &variant, 0, 0, NULL, 0},
        {"--device", OPT_CHOICE, &device, 0, 0, "cpu|cuda|auto", 0},
        CLI_CUDA_OPTIONS(&cuda),
        CLI_PRECISION_OPTIONS(&precision),
        {"--quality", OPT_INT, &quality, 1, 100, NULL, 0},
        {"--safety-checker", OPT_STRING, &safety_dir, 0, 0, NULL, 0},
        {"--safety-action", OPT_CHOICE, &safety_action, 0, 0, "refuse|blackout", 0},
        {"--metadata", OPT_FLAG, &metadata, 0, 0, NULL, 0},
        {"--scheduler-option", OPT_LIST, &scheduler_option_list, 0, 0, NULL, 0},
    };
    enum { NFLAGS = sizeof flags / sizeof flags[0], NFIXED = sizeof fixed / sizeof fixed[0] };
    cli_option options[NFIXED + NFLAGS + 1]; /* the fixed ones, the parameters', the end */
    memcpy(options, fixed, sizeof fixed);
    for (int i = 0; i < NFLAGS; i++) options[NFIXED + i] = param_option(&flags[i]);
    options[NFIXED + NFLAGS] = (cli_option){0};
    char help[8192];
    build_help(help, sizeof help, flags, NFLAGS);
    cli_command cmd = {"upscale", help, "IN OUT", 2, 2, options};
    const char *paths[2];
    int npaths;
    int status = cli_parse(&cmd, argc, argv, paths, &npaths);
    if (status != CLI_CONTINUE ||
        (status = cli_precision_settings(&cmd, &precision, device, &cuda)) != CLI_CONTINUE ||
        (status = cli_cuda_environment(&cmd, &cuda)) != CLI_CONTINUE)
        return status;
    const char *in_path = paths[0], *out_path = paths[1];

    model = cli_model_dir(model);
    if (!model)
        return cli_usage_error(&cmd, "--model is required (or set SDX4_MODEL)");
    if (imageio_format_from_name(out_path) == IMAGE_UNKNOWN)
        return cli_usage_error(
            &cmd, "OUT '%s' must end in .png, .jpg, .jpeg or .webp", out_path);
    if (!cli_given(&cmd, "--seed") && random_seed(&seed) != 0)
        return cli_fail("getrandom: %s", strerror(errno));

    params.num_inference_steps = steps;
    params.guidance_scale = (float)guidance;
    params.noise_level = (float)noise;
    params.eta = (float)eta;
    params.seed = seed;
    int bad_option;
    options_json = cli_scheduler_options(&cmd, &scheduler_option_list, &bad_option);
    if (bad_option) return EXIT_USAGE;
    params.scheduler_options = options_json;
    if (sdx4_check_params(&params) != SDX4_OK) {
        free(options_json);
        return cli_usage_error(&cmd, "%s", sdx4_last_error());
    }

    sdx4_image input = {0}, output = {0};
    void *icc = NULL; /* --metadata: the input's ICC profile */
    size_t icc_len = 0;
    sdx4_engine *engine = NULL;
    sdx4_safety *safety = NULL;
    char err[512];
    status = EXIT_RUNTIME;

    if (check_writable_folder(out_path) != 0) goto done;
    if ((metadata ? imageio_read_file_keep_icc(in_path, &input, &icc, &icc_len, err, sizeof err)
                  : imageio_read_file(in_path, &input, err, sizeof err)) != 0) {
        fail_file(in_path, err);
        goto done;
    }
    if (input.width > SDX4_MAX_INPUT_SIDE || input.height > SDX4_MAX_INPUT_SIDE) {
        cli_fail("%s: %dx%d is too large: sdx4 upscales at most %d pixels a side (%d out)", in_path,
                 input.width, input.height, SDX4_MAX_INPUT_SIDE, 4 * SDX4_MAX_INPUT_SIDE);
        goto done;
    }
    sdx4_engine_options engine_options;
    sdx4_engine_options_default(&engine_options);
    engine_options.model_dir = model;
    engine_options.variant = variant;
    engine_options.device = device;
    engine_options.threads = threads;
    engine_options.cuda = cuda;
    engine_options.cpu = precision.cpu;
    sdx4_model_info info;
    if (sdx4_engine_open(&engine_options, &engine) != SDX4_OK ||
        sdx4_engine_info(engine, &info) != SDX4_OK ||
        warn_if_truncated(engine, "prompt", params.prompt,
                          info.max_prompt_tokens) != 0 ||
        warn_if_truncated(engine, "negative prompt", params.negative_prompt,
                          info.max_prompt_tokens) != 0) {
        cli_fail_engine();
        goto done;
    }
    /* before the long part, so that a bad checker folder costs nothing */
    engine_options.model_dir = safety_dir;
    if (safety_dir && sdx4_safety_open(&engine_options, &safety) != SDX4_OK) {
        cli_fail_engine();
        goto done;
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sa.sa_flags = SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);

    /* the weights' digest, as the server's metadata has it: read before
     * the run, so that a file that cannot be read fails it early */
    char model_hash[65] = "";
    if (metadata && models_digest(&info, model_hash, err, sizeof err)) {
        cli_fail("--metadata: %s", err);
        goto done;
    }
    if (metadata && !metadata_fits(out_path, &params, model, model_hash, &info)) goto done;
    if (strcmp(info.kind, "gan")) fprintf(stderr, "seed: %llu\n", (unsigned long long)seed); /* a GAN draws no noise */
    progress_bar bar;
    progress_init(&bar);
    params.progress = on_progress;
    params.progress_user = &bar;
    params.cancel = &interrupted;
    double start = cli_now();
    sdx4_upscale_report report;
    sdx4_status result = sdx4_upscale(engine, &input, &params, &output,
                                      &report);
    progress_end(&bar);
    /* A Ctrl-C during the VAE decode, after the last step, still counts. */
    if (result == SDX4_ERR_CANCELED || (result == SDX4_OK && atomic_load(&interrupted))) {
        fputs("canceled\n", stderr);
        status = EXIT_CANCELED;
        goto done;
    }
    if (result != SDX4_OK) {
        cli_fail_engine();
        goto done;
    }
    if (safety && check_content(safety, &output, out_path, !strcmp(safety_action, "blackout")) != 0) {
        status = safety_status;
        goto done;
    }
    if ((metadata ? write_with_metadata(&output, out_path, quality, &params, model, model_hash, &info, &input, icc,
                                        icc_len, err, sizeof err)
                  : imageio_write_file(&output, out_path, quality, err, sizeof err)) != 0) {
        fail_file(out_path, err);
        goto done;
    }
    if (!strcmp(info.kind, "gan")) { /* one forward: no text encoder, UNet or VAE */
        char gan_tiles[32] = "";
        if (report.gan_tiles > 1) snprintf(gan_tiles, sizeof gan_tiles, " in %d tiles", report.gan_tiles);
        fprintf(stderr, "%s: %dx%d in %.1f s (%s %.1f s%s), peak RSS %.0f MiB\n", out_path, output.width,
                output.height, cli_now() - start, info.architecture, report.seconds_unet, gan_tiles,
                (double)sdx4_peak_rss_bytes() / (1 << 20));
        status = 0;
        goto done;
    }
    char windows[48] = "", tiles[32] = "";
    if (report.unet_windows > 1)
        snprintf(windows, sizeof windows, " in %d windows of %d", report.unet_windows, report.unet_tile);
    if (report.vae_tiles > 1) snprintf(tiles, sizeof tiles, " in %d tiles", report.vae_tiles);
    fprintf(stderr,
            "%s: %dx%d in %.1f s (text %.1f s, unet %.1f s%s, vae %.1f s%s), peak RSS %.0f MiB\n",
            out_path, output.width, output.height, cli_now() - start,
            report.seconds_text, report.seconds_unet, windows, report.seconds_vae, tiles,
            (double)sdx4_peak_rss_bytes() / (1 << 20));
    status = 0;

done:
    sdx4_image_free(&output);
    sdx4_image_free(&input);
    free(icc);
    sdx4_engine_close(engine);
    sdx4_safety_close(safety);
    free(options_json);
    return status;
}
