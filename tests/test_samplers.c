/*
 * test_samplers.c - Euler, Euler ancestral, DPM-Solver++ and UniPC against
 * diffusers (tests/data/schedulers, made by tools/scheduler_goldens.py).
 *
 * Per golden file, the scheduler is chosen as a caller chooses it (class
 * and options over the model's DDIM config, sdx4_scheduler_create) and
 * checked at ../shared/reference/README.md's tolerances:
 *   - timesteps, sigmas and init_noise_sigma for 1, 2, 7 and 20 steps on
 *     the tiny and small configs; timesteps exactly, except Karras ones,
 *     which come through numpy's float32 log (scheduler_sigma.c): 1e-4;
 *   - three steps in a row on recorded inputs, with scale_model_input,
 *     the noise of Euler ancestral drawn from a generator seeded 5: 1e-5;
 *   - a whole 7-step upscale on the tiny model from the seed alone (so
 *     ancestral noise comes from the pipeline's generator in diffusers'
 *     order): the latents at the pipeline's callbacks (the first three
 *     and the last), and in euler's file the image, 2e-3.
 * Then what a caller gets wrong: an unknown class or option and an
 * unsupported value, each refused naming it.
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
#include "test.h"
#include "test_device.h"

#define DATA SDX4_SOURCE_DIR "/tests/data/schedulers"
#define STEP_NUMEL 256 /* the recorded steps' [1, 4, 8, 8] */

static const char *const files[] = {"euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras",
                                    "dpmpp_1_sigma_min",
                                    "unipc", "unipc_bh1", "unipc_3", "unipc_3_karras",
                                    "unipc_no_corrector", "unipc_noise", "unipc_threshold"};

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
    int karras = strstr(options, "karras") != NULL;
    for (int cfg = 0; cfg < 2; cfg++) {
        const char *model = cfg ? "small" : "tiny";
        char dir[512];
        snprintf(dir, sizeof dir, "%s/model", test_ref(model));
        scheduler_source src;
        CHECK(!sdx4_scheduler_source_load(&src, dir), "%s: %s", model, sdx4_last_error());
        static const int counts[] = {1, 2, 7, 20};
        for (int c = 0; src.json && c < 4; c++) {
            int n = counts[c];
            scheduler s;
            if (sdx4_scheduler_create(&s, &src, cls, options) ||
                sdx4_scheduler_set_timesteps(&s, n, STEP_NUMEL)) {
                CHECK(0, "%s %s %d steps: %s", file, model, n, sdx4_last_error());
                sdx4_scheduler_free(&s);
                continue;
            }
            char name[64];
            size_t nt = 0, ns = 0, ni = 0;
            snprintf(name, sizeof name, "%s_timesteps_%d", model, n);
            const float *ts = golden_f32(g, name, &nt);
            snprintf(name, sizeof name, "%s_sigmas_%d", model, n);
            const float *sig = golden_f32(g, name, &ns);
            snprintf(name, sizeof name, "%s_init_noise_sigma_%d", model, n);
            const float *ins = golden_f32(g, name, &ni);
            CHECK(ts && (int)nt == s.num_timesteps, "%s %s %d: %d timesteps, diffusers %zu", file,
                  model, n, s.num_timesteps, nt);
            if (ts && (int)nt == s.num_timesteps) {
                double d = max_abs_diff(s.timesteps, ts, nt);
                CHECK(d <= (karras ? 1e-4 : 0), "%s %s %d: timesteps differ by %g", file, model,
                      n, d);
            }
            const float *sigmas = sdx4_scheduler_sigmas(&s);
            CHECK(!sig || sigmas, "%s %s %d: diffusers has sigmas, the engine none", file, model, n);
            if (sig && sigmas && ns == nt + 1) {
                double d = max_rel_diff(sigmas, sig, ns);
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
        sdx4_scheduler_scale_model_input(&s, k, sample, scaled);
        worst_scaled = fmax(worst_scaled, max_abs_diff(scaled, want_scaled, n));
        CHECK(!sdx4_scheduler_step(&s, k, mo, sample, 0.0f, &rng, sample), "%s step %d: %s", file,
              k, sdx4_last_error());
        worst_prev = fmax(worst_prev, max_abs_diff(sample, want_prev, n));
    }
    printf("  %s: scale_model_input max diff %.3g, 3 steps max diff %.3g\n", file, worst_scaled,
           worst_prev);
    CHECK(worst_scaled <= 1e-5, "%s: scale_model_input differs by %g", file, worst_scaled);
    CHECK(worst_prev <= 1e-5, "%s: steps differ by %g", file, worst_prev);
    /* out of order: the sigma samplers keep a step index */
    CHECK(s.family == SCHED_DDIM || sdx4_scheduler_step(&s, 1, sample, sample, 0.0f, &rng, sample) != 0,
          "%s: a step out of order was taken", file);
    sdx4_scheduler_free(&s);
}

typedef struct {
    const st_file *g;
    int steps, checked;
    double worst;
} step_check;

static int check_latents(void *user, int step, int total, const float *latents) {
    (void)total;
    step_check *c = user;
    if (step == 0) return 0;
    char name[32];
    size_t n = 0;
    snprintf(name, sizeof name, "latents_step%d", step - 1);
    const float *want = sdx4_st_find(c->g, name) ? golden_f32(c->g, name, &n) : NULL;
    if (want) c->worst = fmax(c->worst, max_abs_diff(latents, want, n));
    c->checked += want != NULL;
    c->steps++;
    return 0;
}

static void check_pipeline(const char *file, const st_file *g, const model *m, backend *be,
                           const float *image, const char *cls, const char *options) {
    step_check chk = {.g = g};
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
        {"heun", NULL, "scheduler heun"},
        {"euler", "{\"use_karras_sigma\": true}", "use_karras_sigma is not a setting"},
        {"euler-a", "{\"use_karras_sigmas\": true}", "use_karras_sigmas is not a setting"},
        {"dpm++2m", "{\"solver_order\": 3}", "solver_order=3"},
        {"dpm++2m", "{\"algorithm_type\": \"sde-dpmsolver++\"}", "algorithm_type"},
        {"euler", "{\"use_exponential_sigmas\": true}", "use_exponential_sigmas"},
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

int main(void) {
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
        sdx4_model_free(&m);
    }
    free(image);
    be->destroy(be);
    return test_finish("test_samplers");
}
