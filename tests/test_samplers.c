/*
 * test_samplers.c - every sampler beside DDIM (DDPM, PNDM, Euler, Euler
 * ancestral, Heun, KDPM2, KDPM2 ancestral, LMS, DPM-Solver multistep and
 * singlestep, DEIS, UniPC) against diffusers (tests/data/schedulers, made by
 * tools/scheduler_goldens.py).
 *
 * Per golden file, the scheduler is chosen as a caller chooses it (class
 * and options over the model's DDIM config, sdx4_scheduler_create) and
 * checked at ../shared/reference/README.md's tolerances:
 *   - timesteps, sigmas and init_noise_sigma for 1, 2, 7 and 20 steps on
 *     the tiny and small configs; timesteps exactly, except Karras,
 *     exponential, beta and Lu ones, which come through numpy's float32
 *     log (scheduler_sigma.c), and KDPM2's interpolated ones (float32
 *     torch logs): 1e-4; a step count diffusers refuses (PNDM's warm-up
 *     under 4) has no tensors, and the engine must refuse it too;
 *   - three steps in a row on recorded inputs, with scale_model_input,
 *     the noise of the ancestral samplers drawn from a generator seeded
 *     5: 1e-5;
 *   - a whole 7-step upscale on the tiny model from the seed alone (so
 *     ancestral noise comes from the pipeline's generator in diffusers'
 *     order): the latents at the pipeline's callbacks (the first three
 *     and the last; on_step comes where diffusers calls back: after
 *     every second UNet evaluation of a second-order sampler, none during
 *     PNDM's warm-up), and in euler's file the image, 2e-3.
 * Then what a caller gets wrong: an unknown class or option and an
 * unsupported value, each refused naming it; the beta quantiles of beta
 * sigmas against scipy, and thresholding against torch.
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "model/image_processor.h"
#include "model/pipeline.h"
#include "model/schedulers.h"
#include "sdx4.h"
#include "test.h"
#include "test_device.h"

#define DATA SDX4_SOURCE_DIR "/tests/data/schedulers"
#define STEP_NUMEL 256 /* the recorded steps' [1, 4, 8, 8] */

static const char *const files[] = {
    "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_1_sigma_min",
    /* Heun, KDPM2, KDPM2 ancestral, LMS */
    "heun", "heun_karras", "dpm2", "dpm2_karras", "dpm2_a", "lms", "lms_karras",
    /* the DPM-Solver family in full */
    "dpmpp_3m", "dpmpp_3m_sde", "dpm_3m_heun_exponential", "dpm_2m_sde_heun",
    "dpmpp_2m_sde_heun_lu", "dpmpp_2m_beta", "dpmpp_2m_thresholding_clipped", "dpmpp_2s",
    "dpmpp_3s_sde", "dpm_3s_heun_karras", "deis_2m", "deis_3m_karras", "euler_exponential",
    /* UniPC */
    "unipc", "unipc_bh1", "unipc_3", "unipc_3_karras", "unipc_no_corrector", "unipc_noise",
    "unipc_threshold",
    /* DDPM and PNDM */
    "ddpm", "ddpm_small_log_thresholding", "ddpm_large_trailing_eps", "pndm", "pndm_plms_linspace_eps"};

static const float *golden_f32(const st_file *f, const char *name, size_t *n) {
    const st_tensor *t = sdx4_st_find(f, name);
    CHECK(t && t->type == DTYPE_F32, "%s missing or not F32", name);
    if (!t || t->type != DTYPE_F32) return NULL;
    *n = t->nbytes / sizeof(float);
    return t->data;
}

/* max |a - b| / max(1, |b|): sigmas reach ~150, where float32 steps 1e-5 */
static double max_rel_diff(const float *a, const float *b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]) / fmax(1.0, fabs((double)b[i]));
        if (d > m || isnan(d)) m = isnan(d) ? INFINITY : d;
    }
    return m;
}

static void check_schedules(const char *file, const st_file *g, const char *cls,
                            const char *options) {
    /* fractional timesteps of spread sigmas come through numpy's float32
     * log, KDPM2's interpolated ones through float32 torch logs */
    int spread = strstr(options, "karras") || strstr(options, "exponential") ||
                 strstr(options, "beta") || strstr(options, "lu_lambdas") || strstr(cls, "KDPM2");
    for (int cfg = 0; cfg < 2; cfg++) {
        const char *model = cfg ? "small" : "tiny";
        char dir[512];
        snprintf(dir, sizeof dir, "%s/model", test_ref(model));
        scheduler_source src;
        CHECK(!sdx4_scheduler_source_load(&src, dir), "%s: %s", model, sdx4_last_error());
        static const int counts[] = {1, 2, 7, 20};
        for (int c = 0; src.json && c < 4; c++) {
            int n = counts[c];
            char name[64];
            snprintf(name, sizeof name, "%s_timesteps_%d", model, n);
            int refused = sdx4_st_find(g, name) == NULL;
            scheduler s;
            if (refused) { /* as diffusers refuses it */
                CHECK(sdx4_scheduler_create(&s, &src, cls, options) ||
                          sdx4_scheduler_set_timesteps(&s, n, STEP_NUMEL),
                      "%s %s %d steps: diffusers refuses them, the engine took them", file,
                      model, n);
                sdx4_scheduler_free(&s);
                continue;
            }
            if (sdx4_scheduler_create(&s, &src, cls, options) ||
                sdx4_scheduler_set_timesteps(&s, n, STEP_NUMEL)) {
                CHECK(0, "%s %s %d steps: %s", file, model, n, sdx4_last_error());
                sdx4_scheduler_free(&s);
                continue;
            }
            /* what the server's time estimates count; an upper bound where
             * options change the count (lambda_min_clipped, skip_prk_steps) */
            int clipped = strstr(options, "lambda_min_clipped") || s.family == SCHED_PNDM;
            CHECK(clipped ? s.num_timesteps <= sdx4_unet_evaluations(cls, n)
                          : s.num_timesteps == sdx4_unet_evaluations(cls, n),
                  "%s %s %d: %d UNet evaluations, sdx4_unet_evaluations says %d", file, model, n,
                  s.num_timesteps, sdx4_unet_evaluations(cls, n));
            size_t nt = 0, ns = 0, ni = 0; /* name: the timesteps' */
            const float *ts = golden_f32(g, name, &nt);
            snprintf(name, sizeof name, "%s_sigmas_%d", model, n); /* the classes that have them */
            const float *sig = sdx4_st_find(g, name) ? golden_f32(g, name, &ns) : NULL;
            snprintf(name, sizeof name, "%s_init_noise_sigma_%d", model, n);
            const float *ins = golden_f32(g, name, &ni);
            CHECK(ts && (int)nt == s.num_timesteps, "%s %s %d: %d timesteps, diffusers %zu", file,
                  model, n, s.num_timesteps, nt);
            if (ts && (int)nt == s.num_timesteps) {
                double d = max_abs_diff(s.timesteps, ts, nt);
                CHECK(d <= (spread ? 1e-4 : 0), "%s %s %d: timesteps differ by %g", file, model,
                      n, d);
            }
            const float *sigmas = sdx4_scheduler_sigmas(&s);
            CHECK(!sig || sigmas, "%s %s %d: diffusers has sigmas, the engine none", file, model, n);
            /* KDPM2's repeat the final sigma once more (2n + 2) */
            if (sig && sigmas && ns >= nt + 1) {
                double d = max_rel_diff(sigmas, sig, nt + 1);
                CHECK(d <= 1e-5, "%s %s %d: sigmas differ by %g", file, model, n, d);
            }
            if (ins && ni == 1)
                CHECK(fabs(s.init_noise_sigma - ins[0]) <= 1e-5 * fmax(1, ins[0]),
                      "%s %s %d: init_noise_sigma %.9g, diffusers %.9g", file, model, n,
                      s.init_noise_sigma, ins[0]);
            sdx4_scheduler_free(&s);
        }
        sdx4_scheduler_source_free(&src);
    }
}

static void check_steps(const char *file, const st_file *g, const scheduler_source *src,
                        const char *cls, const char *options) {
    scheduler s;
    if (sdx4_scheduler_create(&s, src, cls, options) ||
        sdx4_scheduler_set_timesteps(&s, 7, STEP_NUMEL)) {
        CHECK(0, "%s: %s", file, sdx4_last_error());
        sdx4_scheduler_free(&s);
        return;
    }
    size_t n = 0;
    const float *start = golden_f32(g, "step_sample", &n);
    float sample[STEP_NUMEL], scaled[STEP_NUMEL];
    if (!start || n != STEP_NUMEL) {
        CHECK(0, "%s: step_sample has %zu values", file, n);
        sdx4_scheduler_free(&s);
        return;
    }
    memcpy(sample, start, sizeof sample);
    torch_rng rng;
    sdx4_torch_rng_seed(&rng, 5);
    double worst_scaled = 0, worst_prev = 0;
    for (int k = 0; k < 3; k++) {
        char name[64];
        size_t nm = 0, ns = 0, np = 0;
        snprintf(name, sizeof name, "step_model_output_%d", k);
        const float *mo = golden_f32(g, name, &nm);
        snprintf(name, sizeof name, "step_scaled_%d", k);
        const float *want_scaled = golden_f32(g, name, &ns);
        snprintf(name, sizeof name, "step_prev_%d", k);
        const float *want_prev = golden_f32(g, name, &np);
        if (!mo || !want_scaled || !want_prev || nm != n || ns != n || np != n) break;
        float scale = sdx4_scheduler_input_scale(&s, k); /* as the pipeline divides */
        for (size_t j = 0; j < n; j++) scaled[j] = sample[j] / scale;
        worst_scaled = fmax(worst_scaled, max_abs_diff(scaled, want_scaled, n));
        CHECK(!sdx4_scheduler_step(&s, k, mo, sample, 0.0f, &rng, sample), "%s step %d: %s", file,
              k, sdx4_last_error());
        worst_prev = fmax(worst_prev, max_abs_diff(sample, want_prev, n));
    }
    printf("  %s: scale_model_input max diff %.3g, 3 steps max diff %.3g\n", file, worst_scaled,
           worst_prev);
    CHECK(worst_scaled <= 1e-5, "%s: scale_model_input differs by %g", file, worst_scaled);
    CHECK(worst_prev <= 1e-5, "%s: steps differ by %g", file, worst_prev);
    /* out of order: the sigma samplers and PNDM keep a step index; DDIM
     * and DDPM are stateless */
    int stateless = s.family == SCHED_DDIM || s.family == SCHED_DDPM;
    CHECK(stateless || sdx4_scheduler_step(&s, 1, sample, sample, 0.0f, &rng, sample) != 0,
          "%s: a step out of order was taken", file);
    sdx4_scheduler_free(&s);
}

typedef struct {
    const st_file *g;
    int num_inference_steps, steps, checked;
    double worst;
} step_check;

/* diffusers' pipeline calls back after the steps past its warm-up, the
 * first total - num_inference_steps (PNDM's Runge-Kutta steps), and after
 * the last: callback k follows step warm-up + k. */
static int check_latents(void *user, int step, int total, const float *latents) {
    step_check *c = user;
    int warmup = total > c->num_inference_steps ? total - c->num_inference_steps : 0;
    if (step <= warmup) return 0;
    char name[32];
    size_t n = 0;
    snprintf(name, sizeof name, "latents_step%d", step - 1 - warmup);
    const float *want = sdx4_st_find(c->g, name) ? golden_f32(c->g, name, &n) : NULL;
    if (want) c->worst = fmax(c->worst, max_abs_diff(latents, want, n));
    c->checked += want != NULL;
    c->steps++;
    return 0;
}

static void check_pipeline(const char *file, const st_file *g, const model *m, backend *be,
                           const float *image, const char *cls, const char *options) {
    step_check chk = {.g = g, .num_inference_steps = 7};
    pipeline_args a = {
        .image = image, .height = 16, .width = 16, .prompt = "a white cat", .steps = 7,
        .guidance = 6.0f, .noise_level = 20, .seed = 0, .scheduler = cls,
        .scheduler_options = options, .on_step = check_latents, .user = &chk,
    };
    float *out = NULL;
    CHECK(!sdx4_pipeline_run(m, be, &a, &out, NULL), "%s pipeline: %s", file, sdx4_last_error());
    /* as many steps as diffusers' pipeline has callbacks (metadata), each
     * checked where the golden kept its latents (steps 0-2 and the last) */
    char *callbacks = sdx4_st_metadata(g, "callbacks");
    int want_steps = callbacks ? atoi(callbacks) : -1;
    free(callbacks);
    CHECK(want_steps > 0 && chk.steps == want_steps && chk.checked >= (want_steps < 4 ? want_steps : 4),
          "%s: %d steps of diffusers' %d, %d checked", file, chk.steps, want_steps, chk.checked);
    /* a half-precision backend is held only to running (test_pipeline
     * holds its image to diffusers') */
    CHECK(test_half_precision || chk.worst <= 2e-3, "%s: latents differ by %g", file, chk.worst);
    /* the image: in one file (the decode after the last latents is the
     * same for every sampler) */
    size_t n = 0;
    const float *want = sdx4_st_find(g, "output") ? golden_f32(g, "output", &n) : NULL;
    double d = NAN;
    if (out && want && n == (size_t)3 * 64 * 64) {
        sdx4_image_denormalize(out, n, out);
        d = max_abs_diff(out, want, n);
        CHECK(test_half_precision || d <= 2e-3, "%s: output differs by %g", file, d);
    }
    printf("  %s: %d-step upscale, latents max diff %.3g", file, want_steps, chk.worst);
    printf(isnan(d) ? "\n" : ", output max diff %.3g\n", d);
    free(out);
}

/* The refusals a caller can meet, each naming what it refuses. */
static void check_refusals(const scheduler_source *src) {
    static const struct {
        const char *name, *options, *expect;
    } bad[] = {
        {"lcm", NULL, "scheduler lcm"},
        {"heun", "{\"use_exponential_sigmas\": true}", "use_exponential_sigmas"},
        {"dpm2", "{\"prediction_type\": \"sample\"}", "prediction_type=sample"},
        {"dpm2-a", "{\"clip_sample\": true}", "clip_sample is not a setting"},
        {"lms", "{\"beta_schedule\": \"exp\"}", "beta_schedule=exp"},
        {"heun", "{\"rescale_betas_zero_snr\": true}", "rescale_betas_zero_snr is not a setting"},
        {"ddpm", "{\"variance_type\": \"learned_range\"}", "variance_type=learned_range"},
        {"ddpm", "{\"variance_type\": \"fixed_large_log\"}", "variance_type=fixed_large_log"},
        {"ddpm", "{\"set_alpha_to_one\": true}", "set_alpha_to_one is not a setting"},
        {"ddpm", "{\"thresholding\": true, \"dynamic_thresholding_ratio\": 1.5}",
         "dynamic_thresholding_ratio=1.5"},
        {"pndm", "{\"prediction_type\": \"sample\"}", "prediction_type=sample"},
        {"pndm", "{\"rescale_betas_zero_snr\": true}", "rescale_betas_zero_snr is not a setting"},
        {"PNDMScheduler", "{\"skip_prk_steps\": 1}", "skip_prk_steps"},
        {"euler", "{\"use_karras_sigma\": true}", "use_karras_sigma is not a setting"},
        {"euler-a", "{\"use_karras_sigmas\": true}", "use_karras_sigmas is not a setting"},
        {"dpm++2m", "{\"solver_order\": 4}", "solver_order=4"},
        {"dpm++2m", "{\"algorithm_type\": \"dpmsolver\"}", "final_sigmas_type=zero"},
        {"dpm++2m",
         "{\"algorithm_type\": \"sde-dpmsolver\", \"solver_order\": 3, "
         "\"final_sigmas_type\": \"sigma_min\"}",
         "solver_order=3 is not supported with algorithm_type sde-dpmsolver"},
        {"dpm++2m", "{\"use_flow_sigmas\": true}", "use_flow_sigmas"},
        {"dpm++2m", "{\"lambda_min_clipped\": 100}", "clips every training timestep"},
        {"dpm++2m", "{\"variance_type\": \"learned\"}", "variance_type"},
        {"dpm++2m", "{\"thresholding\": true, \"dynamic_thresholding_ratio\": 1.5}",
         "dynamic_thresholding_ratio"},
        {"euler", "{\"use_exponential_sigmas\": true, \"use_beta_sigmas\": true}", "only one of"},
        {"dpm++2s", "{\"timestep_spacing\": \"leading\"}", "timestep_spacing is not a setting"},
        {"dpm++2s", "{\"algorithm_type\": \"sde-dpmsolver\"}", "algorithm_type=sde-dpmsolver"},
        {"dpm++2s",
         "{\"algorithm_type\": \"dpmsolver\", \"thresholding\": true, "
         "\"final_sigmas_type\": \"sigma_min\"}",
         "thresholding is not supported"},
        {"deis", "{\"algorithm_type\": \"sde-dpmsolver++\"}", "algorithm_type=sde-dpmsolver++"},
        {"deis", "{\"final_sigmas_type\": \"zero\"}", "final_sigmas_type is not a setting"},
        {"euler", "{\"timestep_spacing\": \"sideways\"}", "timestep_spacing=sideways"},
        {"euler-a", "{\"prediction_type\": \"sample\"}", "prediction_type=sample"},
        {"unipc", "{\"solver_order\": 4}", "solver_order=4"},
        {"unipc", "{\"solver_type\": \"bh1\"}", "solver_type=bh1 needs final_sigmas_type"},
        {"unipc", "{\"predict_x0\": false}", "predict_x0=false needs final_sigmas_type"},
        {"unipc", "{\"disable_corrector\": [\"1\"]}", "disable_corrector must be"},
        {"unipc", "{\"use_flow_sigmas\": true}", "use_flow_sigmas"},
        {"unipc", "{\"thresholding\": true, \"sample_max_value\": 0}", "sample_max_value=0"},
        {"unipc", "{\"prediction_type\": \"flow_prediction\"}", "prediction_type=flow_prediction"},
        {"unipc", "{\"clip_sample\": true}", "clip_sample is not a setting"},
        {NULL, "[1, 2]", "JSON object"},
        {NULL, "{\"use_karras_sigmas\": tru", "JSON object"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        scheduler s;
        int rc = sdx4_scheduler_create(&s, src, bad[i].name, bad[i].options);
        CHECK(rc != 0, "%s %s was accepted", bad[i].name, bad[i].options);
        if (rc == 0) {
            sdx4_scheduler_free(&s);
            continue;
        }
        CHECK(strstr(sdx4_last_error(), bad[i].expect) != NULL, "%s %s: error '%s' lacks '%s'",
              bad[i].name, bad[i].options, sdx4_last_error(), bad[i].expect);
        CHECK(sdx4_error_status() == SDX4_ERR_INVALID_ARGUMENT, "%s %s: status %d", bad[i].name,
              bad[i].options, sdx4_error_status());
    }
    CHECK(sdx4_scheduler_check_choice("dpm++2m", "{\"use_karras_sigmas\": true}") == 0, "%s",
          sdx4_last_error());
    CHECK(sdx4_scheduler_check_choice("DPMSolverMultistepScheduler", NULL) == 0, "%s",
          sdx4_last_error());
    CHECK(sdx4_scheduler_check_choice("dpm", NULL) != 0, "dpm accepted");
    CHECK(sdx4_unet_evaluations("heun", 20) == 39 && sdx4_unet_evaluations("dpm2-a", 20) == 39 &&
              sdx4_unet_evaluations("lms", 20) == 20 && sdx4_unet_evaluations(NULL, 20) == 20,
          "UNet evaluations by alias");
    CHECK(sdx4_scheduler_check_choice("UniPCMultistepScheduler", NULL) == 0, "%s",
          sdx4_last_error());
    /* the model's own class and aliases of it */
    scheduler s;
    CHECK(!sdx4_scheduler_create(&s, src, NULL, NULL) && s.family == SCHED_DDIM, "model's own: %s",
          sdx4_last_error());
    sdx4_scheduler_free(&s);
    int rc = sdx4_scheduler_create(&s, src, "ddim", "{\"eta_unknown\": null}");
    CHECK(rc != 0 && strstr(sdx4_last_error(), "eta_unknown"), "an unknown DDIM option: %s",
          rc ? sdx4_last_error() : "accepted");
    if (rc == 0) sdx4_scheduler_free(&s);
}

/* scipy.stats.beta.ppf(p, a, b), printed by scipy 1.17.1 in the goldens'
 * venv: beta sigmas use a = b = 0.6; the others try the other side of
 * the continued fraction and densities bounded at one end. */
static void check_beta_ppf(void) {
    static const double cases[][4] = {
        {0.5, 0.6, 0.6, 0.50000000000000011},
        {0.3333333333333333, 0.6, 0.6, 0.27541329077762339},
        {0.05, 0.6, 0.6, 0.012554456873611399},
        {0.95, 0.6, 0.6, 0.98744554312638855},
        {1e-06, 0.6, 0.6, 1.8558824624053043e-10},
        {0.999999, 0.6, 0.6, 0.99999999981441179},
        {0.3, 2.5, 0.7, 0.70977589121488038},
        {0.8, 0.5, 3.0, 0.2567723472089895},
    };
    double worst = 0;
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        double got = sdx4_beta_ppf(cases[i][0], cases[i][1], cases[i][2]), want = cases[i][3];
        double d = fabs(got - want) / want;
        worst = fmax(worst, d);
        CHECK(d <= 1e-13, "beta.ppf(%g, %g, %g) = %.17g, scipy %.17g", cases[i][0], cases[i][1],
              cases[i][2], got, want);
    }
    CHECK(sdx4_beta_ppf(0, 0.6, 0.6) == 0 && sdx4_beta_ppf(1, 0.6, 0.6) == 1, "beta.ppf's ends");
    printf("  beta.ppf: max relative diff from scipy %.3g\n", worst);
}

/* Thresholding (diffusers' _threshold_sample, of DDPM, DPM-Solver, UniPC) on values whose
 * quantile falls between two of them: the expected values are torch's. */
static void check_thresholding(void) {
    static const float x[7] = {-3, 0.5f, 2, 1.5f, -0.2f, 2.75f, -1.25f};
    static const float want[2][7] = { /* quantile 0.6 of |x| is 1.8; max 10, then 1.5 */
        {-1, 0.277777761f, 1, 0.833333313f, -0.111111112f, 1, -0.694444418f},
        {-1, 0.333333343f, 1, 1, -0.13333334f, 1, -0.833333313f},
    };
    static const float max_value[2] = {10, 1.5f};
    for (int k = 0; k < 2; k++) {
        float v[7];
        memcpy(v, x, sizeof v);
        float scratch[7];
        sdx4_threshold_sample(v, 7, 0.6f, max_value[k], scratch);
        double d = max_abs_diff(v, want[k], 7);
        CHECK(d <= 1e-7, "thresholding with max %g differs from torch by %g", max_value[k], d);
    }
    float v[3] = {1, NAN, -2}, scratch[3]; /* torch.quantile of a NaN is NaN, and so is every value */
    sdx4_threshold_sample(v, 3, 0.995f, 1, scratch);
    CHECK(isnan(v[0]) && isnan(v[2]),
          "thresholding a NaN: %g %g", v[0], v[2]);
}

/* Which samplers draw noise (the pipeline draws their next block ahead):
 * the ancestral and SDE ones, DDPM, DDIM with eta > 0; the goldens of each
 * check that the noise is diffusers' whichever way it is drawn. */
static void check_draws_noise(const scheduler_source *src) {
    static const struct {
        const char *name, *options;
        float eta;
        int draws;
    } cases[] = {
        {"ddim", NULL, 0, 0},          {"ddim", NULL, 0.5f, 1},
        {"ddpm", NULL, 0, 1},          {"pndm", NULL, 0, 0},
        {"euler", NULL, 0, 0},         {"euler-a", NULL, 0, 1},
        {"heun", NULL, 0, 0},          {"dpm2", NULL, 0, 0},
        {"dpm2-a", NULL, 0, 1},        {"lms", NULL, 0, 0},
        {"dpm++2m", NULL, 0, 0},       {"dpm++2m", "{\"algorithm_type\": \"sde-dpmsolver++\"}", 0, 1},
        {"dpm++2s", NULL, 0, 0},       {"deis", NULL, 0, 0},
        {"unipc", NULL, 0, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        scheduler s;
        if (sdx4_scheduler_create(&s, src, cases[i].name, cases[i].options)) {
            CHECK(0, "%s: %s", cases[i].name, sdx4_last_error());
            continue;
        }
        CHECK(sdx4_scheduler_draws_noise(&s, cases[i].eta) == cases[i].draws, "%s %s eta %g: draws %d",
              cases[i].name, cases[i].options ? cases[i].options : "", cases[i].eta, !cases[i].draws);
        sdx4_scheduler_free(&s);
    }
}

/* DDIM with eta > 0 through the facade, which keeps one noise buffer for
 * the run: three steps give the bits of sdx4_ddim_step allocating its
 * noise at each step, from the same generator. */
static void check_ddim_eta_buffer(const scheduler_source *src) {
    enum { N = 1000 };
    scheduler s;
    if (sdx4_scheduler_create(&s, src, "ddim", NULL) || sdx4_scheduler_set_timesteps(&s, 5, N)) {
        CHECK(0, "ddim: %s", sdx4_last_error());
        sdx4_scheduler_free(&s);
        return;
    }
    static float mo[N], a[N], b[N];
    torch_rng gm, ga, gb;
    sdx4_torch_rng_seed(&gm, 7), sdx4_torch_rng_seed(&ga, 8), sdx4_torch_rng_seed(&gb, 8);
    sdx4_torch_randn(&gm, a, N);
    memcpy(b, a, sizeof b);
    for (int i = 0; i < 3; i++) {
        sdx4_torch_randn(&gm, mo, N);
        CHECK(!sdx4_scheduler_step(&s, i, mo, a, 0.7f, &ga, a), "facade step %d: %s", i, sdx4_last_error());
        CHECK(!sdx4_ddim_step(&s.ddim, mo, s.ddim.timesteps[i], b, N, 0.7f, &gb, NULL, b), "step %d: %s", i,
              sdx4_last_error());
    }
    CHECK(!memcmp(a, b, sizeof a), "DDIM eta 0.7: the run's noise buffer changed the result");
    /* a next run of twice the size gets a buffer of its size (ASan) */
    static float big[2 * N];
    CHECK(!sdx4_scheduler_set_timesteps(&s, 5, 2 * N) && !sdx4_scheduler_step(&s, 0, big, big, 0.7f, &ga, big),
          "DDIM eta 0.7, a second run of %d values: %s", 2 * N, sdx4_last_error());
    sdx4_scheduler_free(&s);
}

int main(void) {
    check_beta_ppf();
    check_thresholding();
    backend *be = test_backend();
    char dir[512];
    snprintf(dir, sizeof dir, "%s/model", test_ref("tiny"));
    model m;
    int have_model = !sdx4_model_load(&m, be, dir, NULL);
    CHECK(have_model, "tiny: %s", sdx4_last_error());
    /* the run's input: 16x16 RGB bytes, as diffusers' VaeImageProcessor sees them */
    unsigned char rgb[16 * 16 * 3];
    FILE *f = fopen(DATA "/input.rgb", "rb");
    CHECK(f && fread(rgb, 1, sizeof rgb, f) == sizeof rgb, "%s/input.rgb unreadable", DATA);
    if (f) fclose(f);
    sdx4_image in = {.width = 16, .height = 16, .pixels = rgb};
    float *image = NULL;
    int h, w;
    CHECK(have_model && !sdx4_image_preprocess(&in, sdx4_vae_scale_factor(&m.vae), &image, &h, &w),
          "preprocess: %s", sdx4_last_error());

    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        char path[600];
        snprintf(path, sizeof path, "%s/%s.safetensors", DATA, files[i]);
        st_file g;
        if (sdx4_st_open(&g, path)) {
            CHECK(0, "%s", sdx4_last_error());
            continue;
        }
        char *cls = sdx4_st_metadata(&g, "class"), *options = sdx4_st_metadata(&g, "options");
        CHECK(cls && options, "%s: metadata class/options missing", path);
        if (cls && options) {
            check_schedules(files[i], &g, cls, options);
            if (have_model) {
                check_steps(files[i], &g, &m.scheduler, cls, options);
                if (image) check_pipeline(files[i], &g, &m, be, image, cls, options);
            }
        }
        free(cls);
        free(options);
        sdx4_st_close(&g);
    }
    if (have_model) {
        check_refusals(&m.scheduler);
        check_draws_noise(&m.scheduler);
        check_ddim_eta_buffer(&m.scheduler);
        sdx4_model_free(&m);
    }
    free(image);
    be->destroy(be);
    return test_finish("test_samplers");
}
