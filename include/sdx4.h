/*
 * sdx4.h - the public interface of the sdx4 engine.
 *
 * sdx4 runs Stable Diffusion's x4 upscaler (stabilityai/stable-diffusion-x4-
 * upscaler) from a diffusers model folder and gives the numbers that
 * diffusers' StableDiffusionUpscalePipeline gives. This header is the only
 * part of the engine that the command line and the HTTP server include.
 *
 * Conventions
 *   - Every function that can fail returns an sdx4_status (or NULL); the
 *     message of the last failure on the calling thread is sdx4_last_error().
 *     Nothing is printed.
 *   - Objects come in create/free pairs; free functions accept NULL.
 *   - Images are 8-bit RGB, interleaved, rows packed (stride = 3 * width).
 *
 * Thread safety
 *   An sdx4_engine is immutable once opened: sdx4_upscale() may run on one
 *   engine from several threads at once (each call owns its activations and
 *   shares the weights). sdx4_engine_close() must not race with any call.
 */
#ifndef SDX4_H
#define SDX4_H

#include <stddef.h>
#include <stdint.h>

/* The flag type of sdx4_upscale_params.cancel: C11's atomic int, and the
 * same object as C++ sees it. */
#ifdef __cplusplus
#include <atomic>
typedef std::atomic<int> sdx4_atomic_int;
#else
#include <stdatomic.h>
typedef atomic_int sdx4_atomic_int;
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define SDX4_VERSION "0.1.0"

typedef enum {
    SDX4_OK = 0,
    SDX4_ERR_INVALID_ARGUMENT, /* a parameter out of range, a bad image */
    SDX4_ERR_IO,               /* a file could not be read or written */
    SDX4_ERR_MODEL,            /* the model folder is malformed or unsupported */
    SDX4_ERR_NO_MEMORY,
    SDX4_ERR_CANCELED,         /* the progress callback or the cancel flag
                                  asked to stop */
    SDX4_ERR_DEVICE,           /* the compute device failed or is missing */
} sdx4_status;

/* The message describing the last failure on this thread ("" if none). */
const char *sdx4_last_error(void);

/* A short constant name for a status ("invalid argument", ...). */
const char *sdx4_status_name(sdx4_status status);

/* ------------------------------------------------------------------------
 * Engine: a loaded model on one device.
 * ------------------------------------------------------------------------ */

typedef struct sdx4_engine sdx4_engine;

/* The most CPU threads sdx4_engine_options.threads may ask for. */
#define SDX4_MAX_THREADS 1024

/* How the CUDA backend computes. Zero fields (NULL strings) are the
 * defaults. The CPU ignores them, but a value outside the choices is
 * refused whatever the device. The library reads no environment: the CLI
 * and the server map the variable named beside each field (and their
 * flags) onto it. */
typedef struct {
    const char *dtype; /* SDX4_CUDA_DTYPE: "fp16" (default): half weights and
                          activations, float accumulation; "fp32": float
                          everywhere, no TF32 (matches the CPU) */
    const char *vae;   /* SDX4_CUDA_VAE: the VAE decode of fp16 mode in "bf16"
                          (default) or "fp32" */
    const char *conv;  /* SDX4_CUDA_CONV: convolutions by "cudnn" (default:
                          the faster of its legacy call and graph API),
                          "cudnn-legacy" (the legacy call alone: a new size
                          is chosen faster, every step is slower),
                          "cudnn-graph" (every graph-API plan that agrees
                          with the legacy call, even a slower one: tests) or
                          "im2col" (im2col + GEMM, as without cuDNN) */
    int no_graphs;     /* SDX4_CUDA_GRAPH=0: every step runs operation by
                          operation instead of replaying a CUDA graph */
    int no_plans;      /* SDX4_CUDA_PLAN=0: no planning pass; a recorded step
                          takes its memory from the allocator's cache
                          instead of one planned arena */
    int profile;       /* SDX4_CUDA_PROFILE=1: GPU time per operation and the
                          memory peak, on stderr when the engine closes */
    const char *plan_cache; /* SDX4_PLAN_CACHE: the file of the algorithms
                          and plans chosen by timing per shape, so that
                          the next process at the same sizes starts
                          without timing: a path; NULL, "" or "off": none
                          (the CLI and the server default to
                          sdx4_default_plan_cache). A file that is damaged
                          or of another version, or a path that cannot be
                          written, is a warning on stderr */
} sdx4_cuda_options;

/* How the CPU backend computes (device "cpu", or "auto" without a GPU);
 * zero fields are the defaults, a value outside the choices is refused
 * whatever the device. */
typedef struct {
    const char *dtype; /* SDX4_CPU_DTYPE: "fp32" (default): float32 through
                          OpenBLAS; "bf16": convolutions and linear layers
                          with bfloat16 operands and float accumulation
                          through oneDNN (AMX or AVX512-BF16), everything
                          else in float. On a CPU with neither, or a build
                          without oneDNN, the engine refuses to open: it
                          never emulates bfloat16 */
} sdx4_cpu_options;

typedef struct {
    const char *model_dir; /* diffusers folder with model_index.json */
    const char *variant;   /* "fp16" prefers *.fp16.safetensors; NULL: plain */
    const char *device;    /* "cpu", "cuda" or "auto" (NULL = "auto") */
    int threads;           /* CPU threads; 0 = all cores */
    sdx4_cuda_options cuda;
    sdx4_cpu_options cpu;
} sdx4_engine_options;

void sdx4_engine_options_default(sdx4_engine_options *options);

/* The plan cache (sdx4_cuda_options.plan_cache) in the user's cache
 * folder: $XDG_CACHE_HOME/sdx4/cuda-plans (an absolute one), else
 * $HOME/.cache/sdx4/cuda-plans. 1 with the path, 0 when neither variable
 * is set or it does not fit. The CLI and the server take it when told no
 * other; this call is where the library reads the environment, because
 * its caller asks. */
int sdx4_default_plan_cache(char *path, size_t size);

sdx4_status sdx4_engine_open(const sdx4_engine_options *options,
                             sdx4_engine **engine);
void sdx4_engine_close(sdx4_engine *engine);

/* What the engine loaded, for `sdx4 info`, the server's model-info and
 * health. Strings live as long as the engine. */
typedef struct {
    const char *model_dir;
    const char *kind;            /* "diffusion" (a diffusers folder) or "gan"
                                    (a folder of config.json and
                                    model.safetensors: ESRGAN's family) */
    const char *architecture;    /* "StableDiffusionUpscalePipeline",
                                    "RRDBNet", "SRVGGNetCompact" */
    const char *device;          /* the backend's description: "CPU, 2 threads,
                                    OpenBLAS ..." or "cuda:0 (NVIDIA H100 ...)" */
    const char *compute_dtype;   /* "float32", "float16", "bfloat16" (the
                                    CPU's convolutions and linear layers) */
    const char *weights_dtype;   /* dtype of the files loaded: "F32", "F16"... */
    int64_t text_encoder_params;
    int64_t unet_params;
    int64_t vae_params;          /* loaded part: post_quant_conv + decoder */
    int max_noise_level;         /* from model_index.json (350 for x4) */
    int vae_scale_factor;        /* output side = input side * this (a
                                    GAN's scale too) */
    int max_prompt_tokens;       /* 77 for CLIP, with start and end tokens */
    int64_t device_memory_bytes; /* the backend's memory in use now: weights it
                                    copied, live tensors, workspaces (GPU
                                    memory on cuda) */
    int64_t device_memory_peak_bytes; /* the most of it since the start */
    int64_t unet_bytes_per_pixel; /* float32 activations the UNet holds at its
                                     peak per latent pixel of each batch item
                                     (a guided upscale's batch is 2): what
                                     automatic tiles weigh (tile 0) */
    int64_t gan_params;          /* a GAN's parameters (0 for diffusion) */
    int64_t gan_bytes_per_pixel; /* float32 activations of a GAN's whole
                                    forward per input pixel: what decides
                                    whether it runs whole */
    const char *weight_files[4]; /* the weight files loaded, NULL-terminated:
                                    what a version digest of the model
                                    hashes (the server's models.c) */
} sdx4_model_info;

sdx4_status sdx4_engine_info(const sdx4_engine *engine, sdx4_model_info *info);

/* ------------------------------------------------------------------------
 * Upscaling
 * ------------------------------------------------------------------------ */

typedef struct {
    int width, height;
    uint8_t *pixels; /* RGB8, width * height * 3 bytes */
} sdx4_image;

/* Free the pixels of an image the engine produced (not the struct). */
void sdx4_image_free(sdx4_image *image);

/* Called before the first step (step 0) and after each denoising step
 * (1..total; a second-order sampler's step is two UNet evaluations, as
 * diffusers counts its progress). With a tiled UNet each step counts one
 * unit per UNet call over a group of windows, reported as each ends (total
 * is steps x calls), so that large images move too. Return nonzero to
 * cancel: sdx4_upscale() then returns SDX4_ERR_CANCELED at the next step
 * or call boundary. */
typedef int (*sdx4_progress_fn)(void *user, int step, int total);

typedef struct {
    const char *prompt;          /* NULL = "" */
    const char *negative_prompt; /* NULL = "" (as diffusers) */
    /* Ranges and defaults: the table of sdx4_params(). */
    int num_inference_steps;
    float guidance_scale;        /* <= 1 disables guidance */
    float noise_level;           /* a fraction of max_noise_level: 0.2 is
                                    diffusers' noise_level=70 of 350 */
    uint64_t seed;               /* torch.Generator("cpu").manual_seed(seed) */
    float eta;                   /* DDIM eta */
    /* The sampler: NULL or "" is the model's own (its
       scheduler_config.json); else a diffusers class name
       (DPMSolverMultistepScheduler) or an alias (ddim, ddpm, pndm, euler,
       euler-a, heun, dpm2, dpm2-a, lms, dpm++2m, dpm++2s, deis, unipc).
       Options: NULL or a JSON object of config overrides, as diffusers'
       from_config(config, **options) takes them: {"use_karras_sigmas": true}. A key or value the engine does not
       implement is refused by name. */
    const char *scheduler;
    const char *scheduler_options;
    /* The VAE decode in tiles, as diffusers' vae.enable_tiling() decodes:
       "off", "on", or "auto" (NULL, the default): in tiles when the whole
       decode would hold more than SDX4_VAE_TILING_BUDGET bytes of
       activations. Tiles bound the decode's memory whatever the image
       size; the blended image differs slightly from the whole decode's,
       as diffusers' does. */
    const char *vae_tiling;
    /* The UNet in tiles (MultiDiffusion): at every step, windows of
       tile x tile latent pixels (the x4 upscaler's latent has the input's
       size), overlapping by at least tile_overlap, are denoised on their
       own and their predictions blended where they overlap. A tile at
       least as large as the image runs the whole latent at once
       (diffusers' own result). Tiles bound the UNet's memory and its
       attention's quadratic cost whatever the image size; the image
       differs from the untiled one. tile 0, the default, is automatic:
       the whole latent while the UNet's activations fit in
       SDX4_UNET_TILING_BUDGET, else the largest windows whose UNet call
       fits (sdx4_unet_windows says which; the choice depends on the
       image's size, the guidance and the model, never on the device, so
       that a request gives the same image everywhere). tile 0 or
       32..2048, tile_overlap 0..1024 (default 32) and below tile. */
    int tile, tile_overlap;
    sdx4_progress_fn progress;   /* optional */
    void *progress_user;
    /* Optional: a flag another thread sets to stop this upscale. It is read
       at every step boundary and inside long operations (between the
       blocks of the UNet and the VAE decoder, between attention tiles), so
       a set flag ends the call with SDX4_ERR_CANCELED within a fraction of
       a second whatever the image size. */
    const sdx4_atomic_int *cancel;
} sdx4_upscale_params;

/* Fills in the defaults of the parameter table below (prompts NULL, seed 0,
 * no progress callback, no cancel flag). */
void sdx4_upscale_params_default(sdx4_upscale_params *params);

/* The rules of the upscale parameters, in one table that every front end
 * reads: the CLI's options, the server's fields and its model-info, and
 * the API description (tests check openapi.json against it). One row per
 * field of sdx4_upscale_params a user sets; the progress callback and the
 * cancel flag are not parameters. */
typedef enum {
    SDX4_PARAM_INT,  /* an int field: int_min..int_max, default int_default */
    SDX4_PARAM_REAL, /* a float field: real_min..real_max, default real_default */
    SDX4_PARAM_SEED, /* the uint64_t seed: int_min..int_max; it has no default:
                        a caller that gets none draws a random one (the CLI
                        and the server do, and say which) */
    SDX4_PARAM_TEXT, /* a string, any length (the tokenizer truncates); NULL
                        and the default are "" */
    SDX4_PARAM_CHOICE, /* a string, one of `choices`; NULL is the default,
                          choices[int_default] */
} sdx4_param_type;

/* "auto" tiles the VAE decode above this many bytes of activations
 * (float32, as the decoder's layers hold them at their peak): 1 GiB, an
 * untiled decode up to about 650 px out with the x4 upscaler's VAE. */
#define SDX4_VAE_TILING_BUDGET ((int64_t)1 << 30)

/* Automatic UNet tiles (tile 0) run the whole latent while the UNet holds
 * at most this many bytes of float32 activations: 6 GiB, enough for a
 * guided 512 x 512 latent of the x4 upscaler (5.9 GiB), the service's
 * largest default input; a 1024 px one would hold 4 times as much. Above
 * it, windows keep every UNet call within it. */
#define SDX4_UNET_TILING_BUDGET ((int64_t)6 << 30)

/* A GAN (sdx4_model_info.kind "gan") runs the whole image in one forward
 * while its float32 activations stay within this many bytes: 2 GiB, about
 * 470 x 470 px in with Real-ESRGAN x4plus (its upsampling head holds 64
 * channels at 4x the side). Above it, or with tile > 0 (tiles of that
 * many input pixels), it runs in tiles grown by the network's receptive
 * radius, which give the numbers of the whole run. */
#define SDX4_GAN_TILING_BUDGET ((int64_t)2 << 30)

/* The most upscales that share their UNet calls (sdx4_upscale_batch). */
#define SDX4_MAX_BATCH 16

/* The largest seed: JSON clients cannot send integers beyond a signed
 * 64-bit one safely, so every front end stops there. */
#define SDX4_SEED_MAX INT64_MAX

/* The most denoising steps any model allows (a model with fewer training
 * timesteps allows fewer: sdx4_upscale says so). */
#define SDX4_MAX_STEPS 1000

/* The largest input side sdx4_upscale takes (8192 px out; WebP encodes at
 * most 16383 px a side). Inputs above about 512 px want `tile`. */
#define SDX4_MAX_INPUT_SIDE 2048

/* The smallest tile of a tiled UNet (sdx4_upscale_params.tile > 0): the
 * x4 upscaler's UNet halves its input three times, so that its deepest
 * blocks see such a window as 4 x 4 pixels. */
#define SDX4_MIN_TILE 32

typedef struct {
    const char *name;      /* the field's name in sdx4_upscale_params and in
                              the API: "guidance_scale" */
    sdx4_param_type type;
    int64_t int_min, int_max, int_default;    /* SDX4_PARAM_INT, _SEED */
    double real_min, real_max, real_default;  /* SDX4_PARAM_REAL */
    const char *help;      /* one line, lower case, no final period */
    const char *const *choices; /* SDX4_PARAM_CHOICE: the values, NULL-ended */
} sdx4_param;

/* The table, in the order of the fields of sdx4_upscale_params; *count is
 * set to its length. It is constant: any thread may read it. Ranges are
 * inclusive. num_inference_steps's maximum
 * is the engine's ceiling: a model with fewer training timesteps allows
 * fewer (sdx4_upscale refuses more, naming the model's limit). */
const sdx4_param *sdx4_params(int *count);

/* The row named `name`, or NULL. */
const sdx4_param *sdx4_param_find(const char *name);

/* Checks `params` against the table without an engine, so that a caller
 * refuses a bad value before loading a model: SDX4_OK, or
 * SDX4_ERR_INVALID_ARGUMENT with a message naming the parameter and its
 * range ("guidance_scale 200 is outside 0..50"). */
sdx4_status sdx4_check_params(const sdx4_upscale_params *params);

/* How many UNet evaluations an upscale of `steps` steps makes with the
 * sampler `scheduler` (a name as sdx4_upscale_params takes it): 2 * steps
 * - 1 for the second-order ones (heun, dpm2, dpm2-a), steps + 10 for
 * pndm (its Runge-Kutta warm-up), else steps, also for NULL (the model's
 * own is counted as first order) and unknown names; at most that many
 * where options change the count (PNDM's skip_prk_steps, DPM-Solver's
 * lambda_min_clipped), and one more where "trailing" spacing adds a
 * timestep (DDIM, DDPM). What estimates of an upscale's time count. Any
 * thread may call it. */
int sdx4_unet_evaluations(const char *scheduler, int steps);

/* The windows the UNet runs on a latent of width x height (the x4
 * upscaler's latent is the input as sdx4_upscale runs it: sides rounded
 * down to a multiple of vae_scale_factor) with `tile` and `overlap` as
 * sdx4_upscale_params gives them, guided (guidance_scale > 1) or not, for
 * a model of the given unet_bytes_per_pixel (sdx4_model_info; it decides
 * what tile 0 does): their number, and the size every one of them has in
 * *window_w x *window_h; 1 and the whole latent when untiled. What an
 * estimate multiplies one window's UNet work by. -1
 * (SDX4_ERR_INVALID_ARGUMENT) for a side below 1, or a tile with an
 * overlap below 0 or not below it. Any thread may call it. */
int sdx4_unet_windows(int width, int height, int tile, int overlap, int guided, int64_t unet_bytes_per_pixel,
                      int *window_w, int *window_h);

/* Facts about one finished call. */
typedef struct {
    int noise_level;        /* the integer level used, 0..max_noise_level */
    int prompt_tokens;      /* tokens of the prompt before truncation,
                               start and end tokens included */
    int prompt_truncated;   /* 1 if the prompt was cut to max_prompt_tokens */
    int negative_truncated; /* same for the negative prompt */
    double seconds_text, seconds_unet, seconds_vae;
    double seconds_scheduler; /* the sampler's own CPU time (set_timesteps,
                                 scale_model_input's scalar, step; one host
                                 thread), within seconds_unet */
    int unet_steps;           /* UNet evaluations run: num_inference_steps, or
                                 more for some samplers (PNDM) */
    int vae_tiles;          /* tiles the VAE decoded in; 1 when whole */
    int unet_tile;          /* the UNet's window side; 0 for the whole latent */
    int unet_windows;       /* its windows; 1 when whole */
    int batch_size;         /* upscales that shared its UNet calls (1 alone) */
    int gan_tiles;          /* a GAN's tiles, summed over its stages; 1
                               when whole (its seconds are seconds_unet) */
} sdx4_upscale_report;

/* Upscale `input` by vae_scale_factor. A side that is not a multiple of the
 * scale factor is first resized down to one (bicubic, as diffusers does).
 * `output->pixels` is allocated; release it with sdx4_image_free().
 * `report` may be NULL. */
sdx4_status sdx4_upscale(sdx4_engine *engine, const sdx4_image *input,
                         const sdx4_upscale_params *params,
                         sdx4_image *output, sdx4_upscale_report *report);

/* Upscales n inputs (1..SDX4_MAX_BATCH) together: at every step one UNet
 * call for all of them, which keeps a GPU's tensor cores busier than n
 * calls would. Each keeps its own prompts, noise level, guidance scale,
 * seed, sampler state, progress callback and cancel flag: its image is
 * the one sdx4_upscale gives it alone (the batched arithmetic may round
 * differently: within the pipeline's tolerance). They must be batchable
 * with the first (sdx4_batchable) and at most sdx4_batch_capacity of
 * them. One whose flag is set (or whose callback stops it) leaves the
 * batch at that step's end with statuses[k] SDX4_ERR_CANCELED and no
 * output; the others go on. Returns SDX4_OK when the batch ran (then
 * statuses[k] says how each ended, outputs[k] holds the images of those
 * SDX4_OK), else the error that stopped all of them (every status set to
 * it). reports may be NULL; else reports[k] is written for each of the n
 * upscales, those that failed too (what was measured before the failure,
 * zero where nothing was). */
sdx4_status sdx4_upscale_batch(sdx4_engine *engine, int n, const sdx4_image *inputs,
                               const sdx4_upscale_params *params, sdx4_image *outputs,
                               sdx4_upscale_report *reports, sdx4_status *statuses);

/* Whether upscales of a width_a x height_a input with params a and of a
 * width_b x height_b one with b can share UNet calls: the same latent
 * size, steps, sampler and its options, guidance or not, and tile 0 for
 * both. Any thread may call it. */
int sdx4_batchable(const sdx4_engine *engine, int width_a, int height_a, const sdx4_upscale_params *a,
                   int width_b, int height_b, const sdx4_upscale_params *b);

/* How many upscales like this one can share their UNet calls: as many as
 * fit SDX4_UNET_TILING_BUDGET together, at most SDX4_MAX_BATCH; 1 when
 * one alone needs windows or asks for a tile. Any thread may call it. */
int sdx4_batch_capacity(const sdx4_engine *engine, int width, int height, const sdx4_upscale_params *params);

/* Token count of a prompt as the text encoder will see it (start and end
 * tokens included, before truncation): lets a server tell a client that
 * its prompt will be cut. */
sdx4_status sdx4_count_tokens(const sdx4_engine *engine, const char *prompt,
                              int *tokens);

/* Floating-point operations (a multiply-add counts 2) of one part of an
 * upscale, in two kinds: dense (convolutions and linear layers, which grow
 * with the pixels) and attention (the products QK^T and AV, which grow
 * with the square of the pixels where a layer attends over every
 * position). Normalizations, activations and element-wise operations are
 * not counted. */
typedef struct {
    double dense, attention;
} sdx4_flops;

typedef struct {
    sdx4_flops text;   /* once per upscale: the text encoder on both prompts,
                          and the prompts' cross-attention keys and values,
                          which the first step computes and the others reuse */
    sdx4_flops step;   /* one denoising step: the UNet on a batch of 2 */
    sdx4_flops decode; /* the VAE decode to the output size */
} sdx4_flop_counts;

/* What an upscale of a width x height input costs in arithmetic, counted
 * from the loaded model's configuration (sides rounded down to a multiple
 * of vae_scale_factor, as sdx4_upscale does), so that a caller can cost a
 * request before running it: text + steps * step + decode. The counts are
 * those with guidance (guidance_scale > 1); without it, `text` and `step`
 * are half. */
sdx4_status sdx4_count_flops(const sdx4_engine *engine, int width, int height,
                             sdx4_flop_counts *flops);

/* ------------------------------------------------------------------------
 * Content check: diffusers' StableDiffusionSafetyChecker
 * ------------------------------------------------------------------------ */

/* A loaded checker (CompVis/stable-diffusion-safety-checker's folder:
 * config.json, model.safetensors, preprocessor_config.json) on one device.
 * Like an engine, it is immutable once opened: sdx4_safety_check() may
 * run from several threads at once; sdx4_safety_close() must not race
 * with any call. */
typedef struct sdx4_safety sdx4_safety;

/* diffusers' counts of concept and special-care embeddings. */
#define SDX4_SAFETY_CONCEPTS 17
#define SDX4_SAFETY_SPECIAL 3

/* Opens the checker in options->model_dir on options->device, threads
 * and cuda as for an engine (variant is not read). A config value the
 * checker does not implement is refused by name. */
sdx4_status sdx4_safety_open(const sdx4_engine_options *options, sdx4_safety **safety);
void sdx4_safety_close(sdx4_safety *safety);

/* What StableDiffusionSafetyChecker.forward decides for one image. */
typedef struct {
    int flagged;      /* has_nsfw_concept: a concept score above 0 */
    int special_care; /* a special-care score above 0: the concept scores
                         then carry the forward's 0.01 adjustment */
    /* round(cosine - threshold + adjustment, 3), as diffusers computes
       them (float32); the cosines of the image's projected embedding to
       each concept embedding */
    float concept_scores[SDX4_SAFETY_CONCEPTS], special_scores[SDX4_SAFETY_SPECIAL];
    float concept_cos[SDX4_SAFETY_CONCEPTS], special_cos[SDX4_SAFETY_SPECIAL];
    double seconds;   /* the check's wall time, preprocessing included */
} sdx4_safety_result;

/* Checks an image (an upscale's output) as diffusers' pipelines do: the
 * RGB8 image through CLIPImageProcessor (Pillow bicubic resize of the
 * shorter side, centre crop, CLIP normalisation; transformers 4's, the
 * PIL one), the vision tower, the concepts. Flagged or not is in
 * result->flagged; what to do with a flagged image (diffusers blacks it
 * out) is the caller's. */
sdx4_status sdx4_safety_check(sdx4_safety *safety, const sdx4_image *image, sdx4_safety_result *result);

/* ------------------------------------------------------------------------
 * Tools: benchmarks and random-weight models
 * ------------------------------------------------------------------------ */

/* Times the parts of a pipeline on an input of size x size pixels (the
 * UNet runs at that size, the VAE decodes to 4x): text encoder (batch 2),
 * one UNet step (batch 2, guidance) run operation by operation and as the
 * pipeline runs it after its first steps: on a backend that records steps
 * (CUDA graphs) recorded once and replayed (unet_step_replay_ms), on the
 * CPU in the memory planned for it (unet_step_planned_ms), else 0; the
 * VAE decode as an upscale runs it (in tiles where the whole decode would
 * exceed the default budget: vae_tiles of them, 1 when whole; the image
 * back in host memory), and a whole upscale of
 * `steps` steps. Milliseconds; the median of `repeats` runs (>= 1), after
 * one untimed run of each. The *_first_ms fields time those first runs of
 * the UNet step and the VAE decode: where a GPU backend chooses its
 * algorithms for a new size, what the first upscale at that size pays
 * once more than the others. */
typedef struct {
    int size, steps, repeats;
    double text_encoder_ms, unet_step_ms, unet_step_replay_ms, unet_step_planned_ms, vae_decode_ms, pipeline_ms;
    double unet_step_first_ms, vae_decode_first_ms;
    int vae_tiles;
    /* the whole upscale's sampler: its CPU time per UNet step (set_timesteps,
       scale_model_input and step over pipeline_unet_steps; the median over
       the repeats), to set beside unet_step_ms, and its UNet steps for
       `steps` */
    double scheduler_step_ms;
    int pipeline_unet_steps;
    int batch;                /* upscales of pipeline_batch_ms (1: not run) */
    double pipeline_batch_ms; /* a batch of them sharing their UNet calls */
    int64_t peak_rss_bytes, device_peak_bytes;
} sdx4_bench_result;

/* scheduler and scheduler_options choose the whole upscale's sampler as
 * sdx4_upscale_params does (NULL: the model's own); a bad choice fails
 * before anything is timed. batch > 1 also times `batch` such upscales
 * (seeds 0..batch-1) sharing their UNet calls (sdx4_upscale_batch), to
 * set beside `batch` times pipeline_ms. */
sdx4_status sdx4_bench(sdx4_engine *engine, int size, int steps, int repeats, int batch,
                       const char *scheduler, const char *scheduler_options,
                       sdx4_bench_result *result);

/* Writes a model folder with random weights from the configs in
 * config_dir (the diffusers layout without weights, e.g.
 * models/x4-upscaler): the real tensor names, shapes and files, in
 * "fp32" or "fp16" (written as the *.fp16.safetensors variant). With
 * tokenizer files missing from config_dir, a byte-level vocabulary is
 * written (the demo model). Weights are scaled to keep activations finite;
 * the output of such a model is noise. */
sdx4_status sdx4_make_model(const char *config_dir, const char *out_dir,
                            const char *dtype, uint64_t seed);

/* Converts an upscaler of the ESRGAN family (RRDBNet: ESRGAN, Real-ESRGAN
 * x4plus and x2plus; SRVGGNetCompact: realesr-general-x4v3,
 * realesr-animevideov3) into a model folder the engine opens (kind
 * "gan"): out_dir/config.json and out_dir/model.safetensors, the weights
 * under BasicSR's names in their own dtype. inputs: one PyTorch state dict
 * saved as .safetensors (BasicSR's or the original ESRGAN's names; a
 * "params_ema" copy preferred), or ncnn's .param and .bin (n = 2). A .pth
 * or .ckpt pickle is refused with the command that saves it as
 * safetensors. The tensors must be exactly those of the architecture
 * their names and shapes describe. */
sdx4_status sdx4_convert(int n, const char *const *inputs, const char *out_dir);

/* How close two images are, as scikit-image measures it (0.26; quality.c
 * says how). Channels are R, G, B. */
typedef struct {
    double psnr;            /* dB: skimage.metrics.peak_signal_noise_ratio(a,
                               b, data_range=255) over the H x W x 3 arrays;
                               +INFINITY when the images are identical
                               (printf's %f writes "inf") */
    double ssim;            /* skimage.metrics.structural_similarity(a, b,
                               channel_axis=2, data_range=255) with its
                               defaults: 7 x 7 uniform window, K1 = 0.01,
                               K2 = 0.03, use_sample_covariance=True, the mean
                               over the windows wholly inside the image (its
                               crop of 3 px a side); the channels' mean */
    double psnr_channel[3]; /* the same of each channel alone */
    double ssim_channel[3];
} sdx4_quality;

/* PSNR and SSIM of `b` against `a` (the reference; both metrics are
 * symmetric), computed in double. SDX4_ERR_INVALID_ARGUMENT when the sizes
 * differ (the message gives both) or a side is below 7 px (SSIM's window;
 * skimage raises there too). Any thread may call it. */
sdx4_status sdx4_compare_images(const sdx4_image *a, const sdx4_image *b, sdx4_quality *q);

/* Peak resident memory of this process so far, in bytes. */
int64_t sdx4_peak_rss_bytes(void);

#ifdef __cplusplus
}
#endif
#endif
