/*
 * engine.c - the public API of include/sdx4.h on top of the model code.
 *
 * An engine is a backend plus a loaded model: the diffusion pipeline of a
 * diffusers folder (model_index.json), or a GAN of the ESRGAN family
 * (config.json, model/esrgan.h). sdx4_upscale() validates the caller's
 * parameters, converts the image as diffusers' VaeImageProcessor does,
 * runs the pipeline and converts back; a GAN takes the image as float in
 * [0, 1] as Real-ESRGAN does, ignores the diffusion parameters, and runs
 * whole or in exact tiles. Each call owns its activations, so calls may
 * run concurrently.
 *
 * The parameters' rules live in one table here (sdx4_params): names,
 * ranges, defaults and help. The CLI builds its options from it, the
 * server its fields and model-info, and a test holds openapi.json to it,
 * so a range changed here changes everywhere or fails a test.
 * sdx4_check_params() applies it without a model, so that front ends
 * refuse a bad value before the expensive work; sdx4_upscale() applies it
 * again, with the limits that depend on the loaded model.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "backend/backend.h"
#include "core/cancel.h"
#include "core/clock.h"
#include "core/error.h"
#include "engine_internal.h"
#include "model/esrgan.h"
#include "model/image_processor.h"
#include "model/pipeline.h"
#include "model/tiling.h"
#include "sdx4.h"

struct sdx4_engine {
    backend *be;
    int is_gan; /* then g holds the model, else m */
    model m;
    esrgan g;
    char device[256];
    char model_dir[4096];
};

/* The output side per input side. */
static int scale_of(const sdx4_engine *e) {
    return e->is_gan ? e->g.cfg.outscale : sdx4_vae_scale_factor(&e->m.vae);
}

void sdx4_engine_options_default(sdx4_engine_options *o) {
    memset(o, 0, sizeof *o);
    o->device = "auto";
}

static backend *open_backend(const char *device, int threads, const cuda_settings *cuda,
                             cpu_dense_path cpu) {
    (void)cuda; /* unused in builds without the CUDA backend */
    if (!device || !strcmp(device, "auto")) {
#ifdef SDX4_HAVE_CUDA
        backend *be = sdx4_backend_cuda_create(0, cuda);
        if (be) return be;
#endif
        return sdx4_backend_cpu_open(threads, cpu);
    }
    if (!strcmp(device, "cpu")) return sdx4_backend_cpu_open(threads, cpu);
    if (!strcmp(device, "cuda")) {
#ifdef SDX4_HAVE_CUDA
        return sdx4_backend_cuda_create(0, cuda);
#else
        sdx4_set_error(SDX4_ERR_DEVICE, "device cuda: this build of sdx4 has no CUDA backend");
        return NULL;
#endif
    }
    sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "device %s: expected cpu, cuda or auto", device);
    return NULL;
}

backend *sdx4_backend_open(const sdx4_engine_options *o, const char *what) {
    if (!o || !o->model_dir || !*o->model_dir) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "no %s folder given", what);
        return NULL;
    }
    if (o->threads < 0 || o->threads > SDX4_MAX_THREADS) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "threads %d: expected 0 (all cores) to %d", o->threads,
                       SDX4_MAX_THREADS);
        return NULL;
    }
    cuda_settings cuda;
    cpu_dense_path cpu;
    if (sdx4_cuda_settings_parse(&o->cuda, &cuda) || sdx4_cpu_settings_parse(&o->cpu, &cpu))
        return NULL;
    return open_backend(o->device, o->threads, &cuda, cpu);
}

/* A GAN's folder has config.json and no model_index.json. */
static int is_gan_folder(const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/model_index.json", dir);
    if (access(path, F_OK) == 0) return 0;
    snprintf(path, sizeof path, "%s/config.json", dir);
    return access(path, F_OK) == 0;
}

sdx4_status sdx4_engine_open(const sdx4_engine_options *o, sdx4_engine **out) {
    sdx4_error_clear();
    *out = NULL;
    sdx4_engine *e = calloc(1, sizeof *e);
    if (!e) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        return SDX4_ERR_NO_MEMORY;
    }
    if (!(e->be = sdx4_backend_open(o, "model"))) goto fail;
    if (!(e->is_gan = is_gan_folder(o->model_dir)) && sdx4_model_load(&e->m, e->be, o->model_dir, o->variant)) {
        sdx4_error_prefix("%s", o->model_dir);
        goto fail;
    }
    if (e->is_gan && sdx4_esrgan_load(&e->g, e->be, o->model_dir)) {
        sdx4_error_prefix("%s", o->model_dir);
        goto fail;
    }
    snprintf(e->device, sizeof e->device, "%s", e->be->description);
    snprintf(e->model_dir, sizeof e->model_dir, "%s", o->model_dir);
    *out = e;
    return SDX4_OK;
fail:;
    sdx4_status s = sdx4_error_status() ? sdx4_error_status() : SDX4_ERR_MODEL;
    if (e->be) e->be->destroy(e->be);
    free(e);
    return s;
}

void sdx4_engine_close(sdx4_engine *e) {
    if (!e) return;
    if (e->is_gan) sdx4_esrgan_free(&e->g);
    else sdx4_model_free(&e->m);
    e->be->destroy(e->be);
    free(e);
}

sdx4_status sdx4_engine_info(const sdx4_engine *e, sdx4_model_info *info) {
    memset(info, 0, sizeof *info);
    info->model_dir = e->model_dir;
    info->device = e->device;
    dtype act = e->be->set_activation_type
                    ? e->be->set_activation_type(e->be, DTYPE_COUNT) /* query only */
                    : DTYPE_F32;
    info->compute_dtype = act == DTYPE_F16                  ? "float16"
                          : e->be->dense_type == DTYPE_BF16 ? "bfloat16"
                                                            : "float32";
    info->vae_scale_factor = scale_of(e);
    if (e->is_gan) {
        info->kind = "gan";
        info->architecture = sdx4_gan_arch_name(e->g.cfg.arch);
        info->weights_dtype = dtype_name(e->g.ws.file_dtype);
        info->gan_params = e->g.ws.params;
        info->gan_bytes_per_pixel = sdx4_esrgan_bytes_per_pixel(&e->g.cfg);
        info->weight_files[0] = e->g.ws.path;
    } else {
        info->kind = "diffusion";
        info->architecture = "StableDiffusionUpscalePipeline";
        info->weights_dtype = dtype_name(e->m.unet_ws.file_dtype);
        info->text_encoder_params = e->m.te_ws.params;
        info->unet_params = e->m.unet_ws.params;
        info->vae_params = e->m.vae_ws.params;
        info->weight_files[0] = e->m.te_ws.path;
        info->weight_files[1] = e->m.unet_ws.path;
        info->weight_files[2] = e->m.vae_ws.path;
        info->max_noise_level = e->m.max_noise_level;
        info->max_prompt_tokens = sdx4_tokenizer_max_length(e->m.tok);
        info->unet_bytes_per_pixel = sdx4_unet_bytes_per_pixel(&e->m.unet);
    }
    int64_t in_use = 0, peak = 0;
    e->be->memory(e->be, &in_use, &peak);
    info->device_memory_bytes = in_use;
    info->device_memory_peak_bytes = peak;
    return SDX4_OK;
}

void sdx4_image_free(sdx4_image *img) {
    if (!img) return;
    free(img->pixels);
    img->pixels = NULL;
}

/* ---- the parameter table ------------------------------------------------- */

/* Rows by position, in the order of sdx4_upscale_params's fields. */
enum {
    P_PROMPT, P_NEGATIVE_PROMPT, P_STEPS, P_GUIDANCE, P_NOISE_LEVEL, P_SEED, P_ETA, P_SCHEDULER,
    P_SCHEDULER_OPTIONS, P_VAE_TILING, P_TILE, P_TILE_OVERLAP, P_COUNT
};

_Static_assert(SDX4_UNET_TILING_BUDGET == (int64_t)6 << 30, "the tile row's help says 6 GiB");

/* In the order of vae_tiling_mode (pipeline.h). */
static const char *const vae_tilings[] = {"off", "on", "auto", NULL};
_Static_assert(VAE_TILING_OFF == 0 && VAE_TILING_ON == 1 && VAE_TILING_AUTO == 2, "vae_tilings");

/* Guidance stops at 50, what the API has always documented: classifier-
 * free guidance past a few tens only saturates the image. Seeds stop at
 * 2^63 - 1 (SDX4_SEED_MAX), what a JSON client can send. Defaults are
 * diffusers' StableDiffusionUpscalePipeline's (noise_level 70 of 350 is
 * 0.2). */
static const sdx4_param params[P_COUNT] = {
    [P_PROMPT] = {"prompt", SDX4_PARAM_TEXT, .help = "what the image shows"},
    [P_NEGATIVE_PROMPT] = {"negative_prompt", SDX4_PARAM_TEXT, .help = "what to steer away from"},
    [P_STEPS] = {"num_inference_steps", SDX4_PARAM_INT, .int_min = 1, .int_max = SDX4_MAX_STEPS,
                 .int_default = 75, .help = "denoising steps"},
    [P_GUIDANCE] = {"guidance_scale", SDX4_PARAM_REAL, .real_min = 0, .real_max = 50, .real_default = 9.0,
                    .help = "classifier-free guidance scale; 1 or less turns it off"},
    [P_NOISE_LEVEL] = {"noise_level", SDX4_PARAM_REAL, .real_min = 0, .real_max = 1, .real_default = 0.2,
                       .help = "noise added to the input, as a fraction of the model's max noise level"},
    [P_SEED] = {"seed", SDX4_PARAM_SEED, .int_min = 0, .int_max = SDX4_SEED_MAX,
                .help = "seed of torch.Generator(\"cpu\").manual_seed"},
    [P_ETA] = {"eta", SDX4_PARAM_REAL, .real_min = 0, .real_max = 1, .real_default = 0, .help = "DDIM eta"},
    [P_SCHEDULER] = {"scheduler", SDX4_PARAM_TEXT,
                     .help = "sampler: a diffusers scheduler class or ddim, ddpm, pndm, euler, euler-a, heun, "
                             "dpm2, dpm2-a, lms, dpm++2m, dpm++2s, deis, unipc; "
                             "empty: the model's own"},
    [P_SCHEDULER_OPTIONS] = {"scheduler_options", SDX4_PARAM_TEXT,
                             .help = "JSON object of scheduler config overrides, "
                                     "e.g. {\"use_karras_sigmas\": true}"},
    [P_VAE_TILING] = {"vae_tiling", SDX4_PARAM_CHOICE, .int_min = 0, .int_max = 2, .int_default = 2,
                      .choices = vae_tilings,
                      .help = "VAE decode in tiles (bounded memory): off, on, or auto "
                              "when the whole decode would exceed 1 GiB"},
    /* 0 or SDX4_MIN_TILE..2048: the row's range holds the 0,
     * sdx4_check_params the gap */
    [P_TILE] = {"tile", SDX4_PARAM_INT, .int_min = 0, .int_max = SDX4_MAX_INPUT_SIDE, .int_default = 0,
                .help = "UNet in windows this many latent (input) pixels wide, blended at every step: "
                        "bounded memory and time for large inputs; 32 and more, or 0: the whole image "
                        "while the UNet's activations fit in 6 GiB, else the largest windows that do"},
    [P_TILE_OVERLAP] = {"tile_overlap", SDX4_PARAM_INT, .int_min = 0, .int_max = 1024, .int_default = 32,
                        .help = "least overlap of neighbouring UNet windows in latent pixels; below tile"},
};

const sdx4_param *sdx4_params(int *count) {
    *count = P_COUNT;
    return params;
}

const sdx4_param *sdx4_param_find(const char *name) {
    for (int i = 0; name && i < P_COUNT; i++)
        if (!strcmp(params[i].name, name)) return &params[i];
    return NULL;
}

void sdx4_upscale_params_default(sdx4_upscale_params *p) {
    memset(p, 0, sizeof *p);
    p->num_inference_steps = (int)params[P_STEPS].int_default;
    p->guidance_scale = (float)params[P_GUIDANCE].real_default;
    p->noise_level = (float)params[P_NOISE_LEVEL].real_default;
    p->eta = (float)params[P_ETA].real_default;
    p->tile = (int)params[P_TILE].int_default;
    p->tile_overlap = (int)params[P_TILE_OVERLAP].int_default;
}

#define INVALID(...) (sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, __VA_ARGS__), SDX4_ERR_INVALID_ARGUMENT)

static sdx4_status check_int(const sdx4_param *r, int64_t v) {
    if (v < r->int_min || v > r->int_max)
        return INVALID("%s %lld is outside %lld..%lld", r->name, (long long)v, (long long)r->int_min,
                       (long long)r->int_max);
    return SDX4_OK;
}

static sdx4_status check_real(const sdx4_param *r, float v) {
    if (!isfinite(v) || v < r->real_min || v > r->real_max)
        return INVALID("%s %g is outside %g..%g", r->name, v, r->real_min, r->real_max);
    return SDX4_OK;
}

/* The position of v among a choice row's values (NULL: the default), or -1. */
static int choice_index(const sdx4_param *r, const char *v) {
    if (!v) return (int)r->int_default;
    for (int i = 0; r->choices[i]; i++)
        if (!strcmp(r->choices[i], v)) return i;
    return -1;
}

sdx4_status sdx4_check_params(const sdx4_upscale_params *p) {
    sdx4_error_clear();
    if (p->seed > (uint64_t)params[P_SEED].int_max)
        return INVALID("seed %llu is outside 0..%lld", (unsigned long long)p->seed,
                       (long long)params[P_SEED].int_max);
    sdx4_status s;
    if ((s = check_int(&params[P_STEPS], p->num_inference_steps)) ||
        (s = check_real(&params[P_GUIDANCE], p->guidance_scale)) ||
        (s = check_real(&params[P_NOISE_LEVEL], p->noise_level)) ||
        (s = check_real(&params[P_ETA], p->eta)) || (s = check_int(&params[P_TILE], p->tile)) ||
        (s = check_int(&params[P_TILE_OVERLAP], p->tile_overlap)))
        return s;
    if (p->tile > 0 && p->tile < SDX4_MIN_TILE)
        return INVALID("tile %d is outside %d..%lld (0: automatic)", p->tile, SDX4_MIN_TILE,
                       (long long)params[P_TILE].int_max);
    /* the default overlap is one the caller may never have chosen: say so */
    if (p->tile > 0 && p->tile_overlap >= p->tile && p->tile_overlap == params[P_TILE_OVERLAP].int_default)
        return INVALID("tile_overlap %d must be smaller than tile %d (%d is tile_overlap's default: give a "
                       "smaller one, or a larger tile)", p->tile_overlap, p->tile, p->tile_overlap);
    if (p->tile > 0 && p->tile_overlap >= p->tile)
        return INVALID("tile_overlap %d must be smaller than tile %d", p->tile_overlap, p->tile);
    if (sdx4_scheduler_check_choice(p->scheduler, p->scheduler_options))
        return SDX4_ERR_INVALID_ARGUMENT;
    if (choice_index(&params[P_VAE_TILING], p->vae_tiling) < 0)
        return INVALID("vae_tiling %s: expected off, on or auto", p->vae_tiling);
    return SDX4_OK;
}

/* The rules every caller gets, with messages naming the parameter: the
 * table's, then those of the loaded model. */
static sdx4_status check_params(const sdx4_engine *e, const sdx4_image *in,
                                const sdx4_upscale_params *p) {
    /* the diffusion model's latent is the input rounded down to the scale */
    int f = e->is_gan ? sdx4_esrgan_min_side(&e->g.cfg) : scale_of(e);
    if (!in || !in->pixels) return INVALID("no input image");
    if (in->width < f || in->height < f)
        return INVALID("input image is too small: each side needs at least %d pixels", f);
    /* before anything is allocated */
    if (in->width > SDX4_MAX_INPUT_SIDE || in->height > SDX4_MAX_INPUT_SIDE)
        return INVALID("input image %dx%d is too large: at most %d pixels a side", in->width, in->height,
                       SDX4_MAX_INPUT_SIDE);
    sdx4_status s = sdx4_check_params(p);
    if (s || e->is_gan) return s;
    int max_steps = e->m.scheduler.num_train_timesteps < SDX4_MAX_STEPS
                        ? e->m.scheduler.num_train_timesteps : SDX4_MAX_STEPS;
    if (p->num_inference_steps > max_steps)
        return INVALID("num_inference_steps %d is outside 1..%d", p->num_inference_steps,
                       max_steps);
    return SDX4_OK;
}

static int on_step(void *user, int step, int total, const float *latents) {
    (void)latents;
    const sdx4_upscale_params *p = user;
    return p->progress ? p->progress(p->progress_user, step, total) : 0;
}

/* The product's fraction on the model's integer scale, rounded half to
 * even as Python's round(). */
static int noise_level_of(const sdx4_engine *e, const sdx4_upscale_params *p) {
    return (int)nearbyint((double)p->noise_level * e->m.max_noise_level);
}

/* The pipeline's arguments for params p on a preprocessed image. */
static pipeline_args pipeline_args_of(const sdx4_engine *e, const sdx4_upscale_params *p, const float *image, int h,
                                      int w) {
    return (pipeline_args){
        .image = image, .height = h, .width = w,
        .prompt = p->prompt, .negative_prompt = p->negative_prompt,
        .steps = p->num_inference_steps, .guidance = p->guidance_scale,
        .noise_level = noise_level_of(e, p),
        .eta = p->eta, .seed = p->seed, .on_step = on_step, .user = (void *)p,
        .scheduler = p->scheduler, .scheduler_options = p->scheduler_options,
        .cancel = p->cancel,
        .vae_tiling = (vae_tiling_mode)choice_index(&params[P_VAE_TILING], p->vae_tiling),
        .tile = p->tile, .tile_overlap = p->tile_overlap,
    };
}

static sdx4_upscale_report report_of(const pipeline_report *rep, int noise_level, int batch) {
    return (sdx4_upscale_report){
        .noise_level = noise_level, .prompt_tokens = rep->prompt_tokens,
        .prompt_truncated = rep->prompt_truncated, .negative_truncated = rep->negative_truncated,
        .seconds_text = rep->seconds_text, .seconds_unet = rep->seconds_unet,
        .seconds_vae = rep->seconds_vae, .seconds_scheduler = rep->seconds_scheduler,
        .unet_steps = rep->unet_steps, .vae_tiles = rep->vae_tiles, .unet_tile = rep->unet_tile,
        .unet_windows = rep->unet_windows, .batch_size = batch};
}

/* The latent's sides of an input: rounded down to the scale factor. */
static void latent_size(const sdx4_engine *e, int width, int height, int *w, int *h) {
    int f = scale_of(e);
    *w = width - width % f, *h = height - height % f;
}

int sdx4_batchable(const sdx4_engine *e, int width_a, int height_a, const sdx4_upscale_params *a, int width_b,
                   int height_b, const sdx4_upscale_params *b) {
    int wa, ha, wb, hb;
    if (e->is_gan) return 0; /* one forward at a time: a GAN runs in a fraction of a step */
    latent_size(e, width_a, height_a, &wa, &ha);
    latent_size(e, width_b, height_b, &wb, &hb);
    return wa == wb && ha == hb && a->num_inference_steps == b->num_inference_steps &&
           (a->guidance_scale > 1.0f) == (b->guidance_scale > 1.0f) && a->tile == 0 && b->tile == 0 &&
           !strcmp(a->scheduler ? a->scheduler : "", b->scheduler ? b->scheduler : "") &&
           !strcmp(a->scheduler_options ? a->scheduler_options : "",
                   b->scheduler_options ? b->scheduler_options : "");
}

int sdx4_batch_capacity(const sdx4_engine *e, int width, int height, const sdx4_upscale_params *p) {
    int w, h, cfg = p->guidance_scale > 1.0f ? 2 : 1;
    if (e->is_gan) return 1;
    latent_size(e, width, height, &w, &h);
    int64_t one = sdx4_unet_bytes_per_pixel(&e->m.unet) * cfg * w * h;
    if (p->tile != 0 || one <= 0 || one > SDX4_UNET_TILING_BUDGET) return 1;
    int64_t n = SDX4_UNET_TILING_BUDGET / one;
    return n < SDX4_MAX_BATCH ? (int)n : SDX4_MAX_BATCH;
}

static int on_tile(void *user, int done, int total) {
    const sdx4_upscale_params *p = user;
    return cancel_is_set(p->cancel) || (p->progress && p->progress(p->progress_user, done, total));
}

/* A GAN's upscale: the image as float CHW in [0, 1], the network whole or
 * in exact tiles, the result quantized as the pipeline's. */
static sdx4_status gan_upscale(sdx4_engine *e, const sdx4_image *in, const sdx4_upscale_params *p, sdx4_image *out,
                               sdx4_upscale_report *report) {
    if (report) *report = (sdx4_upscale_report){.batch_size = 1}; /* a failure's: nothing measured */
    sdx4_status s = check_params(e, in, p);
    if (s) return s;
    int h = in->height, w = in->width, f = e->g.cfg.scale, of = e->g.cfg.outscale, tiles = 0;
    float *chw = malloc(sizeof *chw * 3 * (size_t)h * w), *res = NULL;
    if (!chw) return sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory"), SDX4_ERR_NO_MEMORY;
    for (size_t i = 0; i < (size_t)h * w; i++)
        for (int c = 0; c < 3; c++) chw[(size_t)c * h * w + i] = in->pixels[3 * i + c] / 255.0f;
    const sdx4_atomic_int *outer = sdx4_cancel_install(p->cancel);
    double t0 = mono_seconds();
    int rc = sdx4_esrgan_run(&e->g, e->be, chw, h, w, p->tile, SDX4_GAN_TILING_BUDGET, on_tile, (void *)p, &res,
                             &tiles);
    double seconds = mono_seconds() - t0;
    sdx4_cancel_install(outer);
    free(chw);
    if (rc) {
        if (cancel_is_set(p->cancel)) sdx4_set_error(SDX4_ERR_CANCELED, "canceled");
        return sdx4_error_status() ? sdx4_error_status() : SDX4_ERR_NO_MEMORY;
    }
    out->width = w * f, out->height = h * f;
    out->pixels = malloc(3 * (size_t)out->width * out->height);
    if (out->pixels) sdx4_image_quantize(res, out->height, out->width, out->pixels);
    free(res);
    if (!out->pixels) return sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory"), SDX4_ERR_NO_MEMORY;
    if (of != f) { /* "outscale": resized as Real-ESRGAN's option does, after quantizing */
        sdx4_image full = *out, small = {0};
        int resized = !sdx4_image_resize_bicubic(&full, w * of, h * of, &small);
        sdx4_image_free(&full);
        *out = resized ? small : (sdx4_image){0};
        if (!resized) return sdx4_error_status() ? sdx4_error_status() : SDX4_ERR_NO_MEMORY;
    }
    if (report) *report = (sdx4_upscale_report){.seconds_unet = seconds, .gan_tiles = tiles, .batch_size = 1};
    return SDX4_OK;
}

static sdx4_status upscale_batch(sdx4_engine *e, int n, const sdx4_image *in, const sdx4_upscale_params *p,
                                 sdx4_image *out, sdx4_upscale_report *reports, sdx4_status *statuses) {
    if (n < 1 || n > SDX4_MAX_BATCH) return INVALID("a batch of %d upscales: 1 to %d", n, SDX4_MAX_BATCH);
    if (e->is_gan) {
        if (n > 1) return INVALID("a GAN upscales one image at a time, not a batch of %d", n);
        memset(out, 0, sizeof *out);
        return statuses[0] = gan_upscale(e, in, p, out, reports);
    }
    for (int k = 0; k < n; k++) {
        memset(&out[k], 0, sizeof out[k]);
        statuses[k] = SDX4_OK;
    }
    sdx4_status s = SDX4_OK;
    for (int k = 0; k < n && !s; k++) {
        s = check_params(e, &in[k], &p[k]);
        if (!s && k > 0 && !sdx4_batchable(e, in[0].width, in[0].height, &p[0], in[k].width, in[k].height, &p[k]))
            s = INVALID("upscale %d of the batch cannot share the first one's UNet calls: sizes, steps, sampler, "
                        "guidance or tiles differ", k);
    }
    if (!s && n > sdx4_batch_capacity(e, in[0].width, in[0].height, &p[0]))
        s = INVALID("a batch of %d upscales of %dx%d exceeds the UNet's memory budget (at most %d)", n,
                    in[0].width, in[0].height, sdx4_batch_capacity(e, in[0].width, in[0].height, &p[0]));
    float *images[SDX4_MAX_BATCH] = {0}, *results[SDX4_MAX_BATCH] = {0};
    pipeline_args args[SDX4_MAX_BATCH];
    pipeline_report reps[SDX4_MAX_BATCH] = {{0}};
    sdx4_status ran[SDX4_MAX_BATCH] = {0};
    int h = 0, w = 0, f = scale_of(e);
    for (int k = 0; k < n && !s; k++) {
        if (sdx4_image_preprocess(&in[k], f, &images[k], &h, &w)) s = sdx4_error_status();
        else args[k] = pipeline_args_of(e, &p[k], images[k], h, w);
    }
    if (!s && sdx4_pipeline_run_batch(&e->m, e->be, n, args, results, reps, ran))
        s = sdx4_error_status() ? sdx4_error_status() : SDX4_ERR_NO_MEMORY;
    for (int k = 0; k < n; k++) {
        if (s || ran[k]) statuses[k] = s ? s : ran[k];
        else if (sdx4_image_postprocess(results[k], h * f, w * f, &out[k]))
            statuses[k] = sdx4_error_status() ? sdx4_error_status() : SDX4_ERR_NO_MEMORY;
        if (reports) reports[k] = report_of(&reps[k], noise_level_of(e, &p[k]), n);
        free(images[k]), free(results[k]);
    }
    return s;
}

sdx4_status sdx4_upscale_batch(sdx4_engine *e, int n, const sdx4_image *in, const sdx4_upscale_params *p,
                               sdx4_image *out, sdx4_upscale_report *reports, sdx4_status *statuses) {
    sdx4_error_clear();
    sdx4_status s = upscale_batch(e, n, in, p, out, reports, statuses);
    if (e->be->trim) e->be->trim(e->be); /* an idle engine holds its weights only */
    return s;
}

sdx4_status sdx4_upscale(sdx4_engine *e, const sdx4_image *in, const sdx4_upscale_params *p,
                         sdx4_image *out, sdx4_upscale_report *report) {
    sdx4_status status, s = sdx4_upscale_batch(e, 1, in, p, out, report, &status);
    if (!s && status == SDX4_ERR_CANCELED) sdx4_set_error(SDX4_ERR_CANCELED, "canceled");
    return s ? s : status;
}

/* Each axis on its own: tiling.c lays the axes out independently, so a
 * height x 1 and a 1 x width latent give the two axes' windows without
 * weighing a whole latent's pixels. */
int sdx4_unet_windows(int width, int height, int tile, int overlap, int guided, int64_t unet_bytes_per_pixel,
                      int *window_w, int *window_h) {
    if (width < 1 || height < 1) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "a %dx%d latent has no windows", width, height);
        return -1;
    }
    if (tile == 0)
        tile = sdx4_tiling_auto(height, width, overlap, guided ? 2 : 1, unet_bytes_per_pixel,
                                SDX4_UNET_TILING_BUDGET);
    if (tile == 0) {
        *window_w = width, *window_h = height;
        return 1;
    }
    tiling down, across;
    if (sdx4_tiling_plan(&down, height, 1, tile, overlap)) return -1;
    if (sdx4_tiling_plan(&across, 1, width, tile, overlap)) {
        sdx4_tiling_free(&down);
        return -1;
    }
    int count = down.ny * across.nx;
    *window_w = across.tw, *window_h = down.th;
    sdx4_tiling_free(&down);
    sdx4_tiling_free(&across);
    return count;
}

sdx4_status sdx4_count_tokens(const sdx4_engine *e, const char *prompt, int *tokens) {
    if (e->is_gan) { /* no text encoder: the prompt is not read */
        *tokens = 0;
        return SDX4_OK;
    }
    int len = sdx4_tokenizer_max_length(e->m.tok);
    int32_t *ids = malloc(sizeof *ids * len);
    if (!ids) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        return SDX4_ERR_NO_MEMORY;
    }
    int rc = sdx4_tokenizer_encode(e->m.tok, prompt ? prompt : "", ids, len, tokens);
    free(ids);
    return rc ? sdx4_error_status() : SDX4_OK;
}

int64_t sdx4_peak_rss_bytes(void) {
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru)) return 0;
    return (int64_t)ru.ru_maxrss * 1024;
}

model *sdx4_engine_model(sdx4_engine *e) { return e->is_gan ? NULL : &e->m; }
esrgan *sdx4_engine_gan(sdx4_engine *e) { return e->is_gan ? &e->g : NULL; }
backend *sdx4_engine_backend(sdx4_engine *e) { return e->be; }
