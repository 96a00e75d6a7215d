/*
 * test_scheduler.c - the DDIM and DDPM schedulers against diffusers.
 *
 * Part 1, the golden files (<model>/golden/scheduler.safetensors of tiny
 * and small, made by diffusers 0.40 / torch 2.11): every timesteps_N
 * exactly, alphas_cumprod of both schedulers, one DDIM step and one DDPM
 * add_noise, to 1e-5 (and counted bit for bit).
 *
 * Part 2, what the goldens do not reach: every beta_schedule x
 * timestep_spacing x prediction_type, with clip_sample, clip_sample_range,
 * set_alpha_to_one, steps_offset and eta > 0 varied across them, and
 * numpy's edge cases of set_timesteps. The literal numbers were printed by
 * diffusers 0.42.1 with torch 2.15.0 on CPU: DDIMScheduler(...) with the
 * row's settings (beta_start, beta_end = 0.00085, 0.012 for scaled_linear,
 * else the defaults), set_timesteps(7), then with g =
 * torch.Generator().manual_seed(100 + row): mo = torch.randn(1,4,4,4, g),
 * sample = torch.randn(1,4,4,4, g) * 2, step(mo, timesteps[1], sample,
 * eta, generator=g) and step(mo, timesteps[-1], sample) at flat indices
 * 0, 21, 42, 63. (The same script reproduced both goldens' alphas_cumprod
 * bit for bit first.) The engine is bit-identical to the goldens' torch
 * 2.11; torch 2.15 rounds a 0-dim tensor's ** 0.5 differently in the last
 * place, so about half of these agree only to ~5e-7, well inside 1e-5.
 *
 * Part 3, refusals: each unsupported value is an error naming its key.
 */
#include <stdint.h>
#include <stdlib.h>

#include "core/error.h"
#include "core/safetensors.h"
#include "model/scheduler.h"
#include "sdx4.h"
#include "test.h"

#define TOL 1e-5

static size_t numel(const st_tensor *t) {
    size_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
    return n;
}

static const float *tensor(const st_file *f, const char *name, size_t n) {
    const st_tensor *t = sdx4_st_find(f, name);
    CHECK(t && t->type == DTYPE_F32 && numel(t) == n, "%s missing, not F32 or not %zu values",
          name, n);
    return t && t->type == DTYPE_F32 && numel(t) == n ? t->data : NULL;
}

static size_t count_differing(const float *a, const float *b, size_t n) {
    size_t d = 0;
    for (size_t i = 0; i < n; i++) d += a[i] != b[i];
    return d;
}

static int metadata_int(const st_file *f, const char *key) {
    char *v = sdx4_st_metadata(f, key);
    CHECK(v, "metadata %s missing", key);
    int x = v ? atoi(v) : 0;
    free(v);
    return x;
}

/* A scheduler built from a config stored in the golden's metadata must give
 * the same alphas_cumprod as the one loaded from the model folder. */
static void check_metadata_config(const st_file *f, const char *key, const float *acp, int ddim) {
    char *text = sdx4_st_metadata(f, key);
    CHECK(text, "metadata %s missing", key);
    if (!text) return;
    config c;
    int ok = !sdx4_cfg_parse(&c, text, strlen(text), key);
    CHECK(ok, "%s: %s", key, sdx4_last_error());
    if (ok) {
        ddim_scheduler s;
        ddpm_scheduler d;
        int rc = ddim ? sdx4_ddim_from_config(&s, &c) : sdx4_ddpm_from_config(&d, &c);
        CHECK(!rc, "%s: %s", key, sdx4_last_error());
        if (!rc) {
            const float *mine = ddim ? s.alphas_cumprod : d.alphas_cumprod;
            CHECK(!memcmp(mine, acp, 1000 * sizeof *acp), "%s: alphas_cumprod differs", key);
            if (ddim) sdx4_ddim_free(&s); else sdx4_ddpm_free(&d);
        }
        sdx4_cfg_free(&c);
    }
    free(text);
}

/* ------------------------------------------------- part 1: the goldens */

static void check_golden(const char *model) {
    char rel[256];
    snprintf(rel, sizeof rel, "%s/model", model);
    const char *dir = test_ref(rel);
    snprintf(rel, sizeof rel, "%s/golden/scheduler.safetensors", model);
    st_file f;
    if (sdx4_st_open(&f, test_ref(rel))) {
        printf("%s: skipped (%s)\n", model, sdx4_last_error());
        return;
    }
    ddim_scheduler s;
    ddpm_scheduler d;
    int ok = !sdx4_ddim_load(&s, dir);
    CHECK(ok, "%s: sdx4_ddim_load: %s", model, sdx4_last_error());
    int ok_d = !sdx4_ddpm_load(&d, dir);
    CHECK(ok_d, "%s: sdx4_ddpm_load: %s", model, sdx4_last_error());
    if (!ok || !ok_d) {
        sdx4_st_close(&f);
        return;
    }
    int T = s.num_train_timesteps;
    CHECK(T == 1000 && d.num_train_timesteps == 1000, "T %d %d", T, d.num_train_timesteps);

    for (int i = 0; i < f.count; i++) { /* every timesteps_N */
        const st_tensor *t = &f.tensors[i];
        if (strncmp(t->name, "timesteps_", 10)) continue;
        int n = atoi(t->name + 10);
        CHECK(!sdx4_ddim_set_timesteps(&s, n), "%s: set_timesteps(%d): %s", model, n, sdx4_last_error());
        size_t count = numel(t);
        CHECK((size_t)s.num_timesteps == count, "%s: %s has %zu entries, got %d", model, t->name,
              count, s.num_timesteps);
        float *want = malloc(count * sizeof *want);
        dtype_to_f32(t->type, t->data, want, count);
        int wrong = 0;
        for (size_t k = 0; k < count && k < (size_t)s.num_timesteps; k++)
            wrong += (float)s.timesteps[k] != want[k];
        CHECK(!wrong, "%s: %s: %d timesteps differ", model, t->name, wrong);
        free(want);
    }

    const float *acp = tensor(&f, "alphas_cumprod", 1000);
    const float *low_acp = tensor(&f, "low_res_alphas_cumprod", 1000);
    if (acp && T == 1000) {
        double e = max_abs_diff(s.alphas_cumprod, acp, 1000);
        CHECK(e <= TOL, "%s: alphas_cumprod max abs diff %g", model, e);
        printf("%s: alphas_cumprod max abs diff %g, %zu of 1000 not bit-identical\n", model, e,
               count_differing(s.alphas_cumprod, acp, 1000));
        check_metadata_config(&f, "scheduler_config", acp, 1);
    }
    if (low_acp && d.num_train_timesteps == 1000) {
        double e = max_abs_diff(d.alphas_cumprod, low_acp, 1000);
        CHECK(e <= TOL, "%s: low_res_alphas_cumprod max abs diff %g", model, e);
        printf("%s: low_res_alphas_cumprod max abs diff %g, %zu of 1000 not bit-identical\n",
               model, e, count_differing(d.alphas_cumprod, low_acp, 1000));
        check_metadata_config(&f, "low_res_config", low_acp, 0);
    }

    const size_t n = 4 * 8 * 8;
    const float *mo = tensor(&f, "step_model_output", n), *smp = tensor(&f, "step_sample", n);
    const float *want = tensor(&f, "step_prev_sample", n);
    int steps = metadata_int(&f, "step_num_inference_steps"), t = metadata_int(&f, "step_t");
    if (mo && smp && want && !sdx4_ddim_set_timesteps(&s, steps)) {
        float got[4 * 8 * 8];
        CHECK(!sdx4_ddim_step(&s, mo, t, smp, n, 0.0f, NULL, NULL, got), "%s: step: %s", model,
              sdx4_last_error());
        double e = max_abs_diff(got, want, n);
        CHECK(e <= TOL, "%s: DDIM step at t=%d max abs diff %g", model, t, e);
        printf("%s: DDIM step (t=%d of %d steps) max abs diff %g, %zu of %zu not bit-identical\n",
               model, t, steps, e, count_differing(got, want, n), n);
        /* in place: prev_sample may be the sample buffer */
        float inplace[4 * 8 * 8];
        memcpy(inplace, smp, sizeof inplace);
        CHECK(!sdx4_ddim_step(&s, mo, t, inplace, n, 0.0f, NULL, NULL, inplace) &&
                  !memcmp(inplace, got, sizeof got), "%s: in-place step differs", model);
    }

    const size_t m = 3 * 8 * 8;
    const float *img = tensor(&f, "add_noise_image", m), *nz = tensor(&f, "add_noise_noise", m);
    const float *noisy = tensor(&f, "add_noise_out", m);
    int level = metadata_int(&f, "add_noise_level");
    if (img && nz && noisy) {
        float got[3 * 8 * 8];
        CHECK(!sdx4_ddpm_add_noise(&d, img, nz, m, level, got), "%s: add_noise: %s", model,
              sdx4_last_error());
        double e = max_abs_diff(got, noisy, m);
        CHECK(e <= TOL, "%s: add_noise max abs diff %g", model, e);
        printf("%s: DDPM add_noise (level %d) max abs diff %g, %zu of %zu not bit-identical\n",
               model, level, e, count_differing(got, noisy, m), m);
    }
    sdx4_ddim_free(&s);
    sdx4_ddpm_free(&d);
    sdx4_st_close(&f);
}

/* ------------------------------------------ part 2: every combination */

typedef struct {
    const char *beta_schedule, *spacing, *prediction;
    int clip_sample, set_alpha_to_one, steps_offset;
    double clip_sample_range;
    float eta;
    int count;             /* timesteps after set_timesteps(7) */
    int timesteps[7];
    float acp[4];          /* alphas_cumprod at 0, 1, 500, 999 */
    float step_second[4];  /* step at timesteps[1], eta: flat 0, 21, 42, 63 */
    float step_last[4];    /* step at timesteps[-1], eta 0 */
} combo;

static const combo combos[] = {
    {"linear", "leading", "epsilon", 1, 1, 0, 1.5, 0.0f, 7,
     {852, 710, 568, 426, 284, 142, 0},
     {0.999899983f, 0.999780059f, 0.0777966529f, 4.03583035e-05f},
     {0.414206862f, -0.271551341f, 0.144793093f, -0.700478792f},
     {1.5f, 1.5f, 1.29573739f, -0.629894078f}},
    {"linear", "leading", "v_prediction", 0, 0, 1, 1.0, 0.0f, 7,
     {853, 711, 569, 427, 285, 143, 1},
     {0.999899983f, 0.999780059f, 0.0777966529f, 4.03583035e-05f},
     {-1.10443246f, -0.540992796f, 3.38961411f, -0.140258759f},
     {-1.17963099f, -0.531850874f, 3.35269213f, -0.102078654f}},
    {"linear", "leading", "sample", 1, 1, 0, 1.0, 0.7f, 7,
     {852, 710, 568, 426, 284, 142, 0},
     {0.999899983f, 0.999780059f, 0.0777966529f, 4.03583035e-05f},
     {0.801201344f, -1.49812329f, -2.1782701f, -4.74133444f},
     {0.0627567545f, 0.84855336f, -0.377680808f, 0.322311789f}},
    {"linear", "trailing", "epsilon", 0, 1, 0, 1.0, 0.0f, 7,
     {999, 856, 713, 570, 428, 285, 142},
     {0.999899983f, 0.999780059f, 0.0777966529f, 4.03583035e-05f},
     {5.93819809f, 2.54159904f, 6.8544445f, 7.27183199f},
     {1.99196863f, 0.510526597f, 2.65452909f, 2.29943299f}},
    {"linear", "trailing", "v_prediction", 1, 0, 0, 1.0, 0.0f, 7,
     {999, 856, 713, 570, 428, 285, 142},
     {0.999899983f, 0.999780059f, 0.0777966529f, 4.03583035e-05f},
     {0.167938054f, 0.0842270553f, 0.364396751f, -0.867297411f},
     {0.96786505f, 0.407928824f, 0.02779595f, -0.991344631f}},
    {"linear", "trailing", "sample", 0, 1, 1, 1.0, 0.0f, 7,
     {999, 856, 713, 570, 428, 285, 142},
     {0.999899983f, 0.999780059f, 0.0777966529f, 4.03583035e-05f},
     {-1.20450866f, 1.12398207f, -0.116004623f, -1.20017457f},
     {0.720086753f, -1.70291698f, 1.33151221f, -0.630573452f}},
    {"linear", "linspace", "epsilon", 1, 1, 0, 1.5, 0.0f, 7,
     {999, 832, 666, 500, 333, 166, 0},
     {0.999899983f, 0.999780059f, 0.0777966529f, 4.03583035e-05f},
     {0.587302446f, 0.73319453f, -0.730714142f, 1.85570788f},
     {1.5f, -1.18660092f, 0.6032601f, -1.5f}},
    {"linear", "linspace", "v_prediction", 0, 0, 0, 1.0, 0.7f, 7,
     {999, 832, 666, 500, 333, 166, 0},
     {0.999899983f, 0.999780059f, 0.0777966529f, 4.03583035e-05f},
     {1.89534616f, -0.322038293f, -1.52067542f, 0.43972978f},
     {2.35563302f, 0.150504887f, -2.65982175f, -0.0966984555f}},
    {"linear", "linspace", "sample", 1, 1, 0, 1.0, 0.0f, 7,
     {999, 832, 666, 500, 333, 166, 0},
     {0.999899983f, 0.999780059f, 0.0777966529f, 4.03583035e-05f},
     {-0.201444f, 0.0406991243f, -1.16551185f, 0.0742004961f},
     {-0.79160291f, -0.41638729f, -0.615272939f, -1.0f}},
    {"scaled_linear", "leading", "epsilon", 0, 1, 1, 1.0, 0.0f, 7,
     {853, 711, 569, 427, 285, 143, 1},
     {0.999149978f, 0.998296022f, 0.276332468f, 0.00466009509f},
     {-3.27202535f, -3.05953503f, -3.08418369f, 3.02654862f},
     {-2.39304543f, -2.21104765f, -2.09637141f, 2.36672831f}},
    {"scaled_linear", "leading", "v_prediction", 1, 0, 0, 1.0, 0.0f, 7,
     {852, 710, 568, 426, 284, 142, 0},
     {0.999149978f, 0.998296022f, 0.276332468f, 0.00466009509f},
     {-0.83901763f, 4.0394659f, -1.69443822f, 2.67667174f},
     {-0.893650651f, 1.01117992f, -0.979730964f, 0.990855098f}},
    {"scaled_linear", "leading", "sample", 0, 1, 0, 1.0, 0.0f, 7,
     {852, 710, 568, 426, 284, 142, 0},
     {0.999149978f, 0.998296022f, 0.276332468f, 0.00466009509f},
     {-3.05775499f, 4.57860756f, -1.36738479f, 1.39102733f},
     {-1.2634033f, -1.23954296f, 0.780210972f, -2.09885311f}},
    {"scaled_linear", "trailing", "epsilon", 1, 1, 0, 1.5, 0.7f, 7,
     {999, 856, 713, 570, 428, 285, 142},
     {0.999149978f, 0.998296022f, 0.276332468f, 0.00466009509f},
     {-0.0119663477f, 0.349943519f, -0.232910097f, 1.1630671f},
     {1.50329721f, 1.47856975f, -1.52558231f, 0.09392564f}},
    {"scaled_linear", "trailing", "v_prediction", 0, 0, 1, 1.0, 0.0f, 7,
     {999, 856, 713, 570, 428, 285, 142},
     {0.999149978f, 0.998296022f, 0.276332468f, 0.00466009509f},
     {-0.875421643f, -2.99033427f, 0.604498267f, 1.49965072f},
     {-0.770127714f, -2.6190176f, 0.449216127f, 1.29676783f}},
    {"scaled_linear", "trailing", "sample", 1, 1, 0, 1.0, 0.0f, 7,
     {999, 856, 713, 570, 428, 285, 142},
     {0.999149978f, 0.998296022f, 0.276332468f, 0.00466009509f},
     {-0.0794213414f, 0.509639919f, -2.05169654f, -2.80745697f},
     {0.872660697f, 0.955244541f, 0.372303993f, 0.703595281f}},
    {"scaled_linear", "linspace", "epsilon", 0, 1, 0, 1.0, 0.0f, 7,
     {999, 832, 666, 500, 333, 166, 0},
     {0.999149978f, 0.998296022f, 0.276332468f, 0.00466009509f},
     {-5.47594023f, 1.94786537f, 9.10820961f, 2.96651697f},
     {-3.2000823f, 0.784359157f, 4.81830359f, 1.41158772f}},
    {"scaled_linear", "linspace", "v_prediction", 1, 0, 0, 1.0, 0.0f, 7,
     {999, 832, 666, 500, 333, 166, 0},
     {0.999149978f, 0.998296022f, 0.276332468f, 0.00466009509f},
     {-0.773842812f, 0.658058882f, -1.48737109f, -0.727457285f},
     {-0.807261586f, 0.724718273f, -1.00526571f, -0.849998713f}},
    {"scaled_linear", "linspace", "sample", 0, 1, 1, 1.0, 0.7f, 7,
     {999, 832, 666, 500, 333, 166, 0},
     {0.999149978f, 0.998296022f, 0.276332468f, 0.00466009509f},
     {2.26900125f, 0.612452567f, 2.24323797f, -1.94538403f},
     {-0.164413705f, -0.402640641f, -0.723362386f, -1.57203174f}},
    {"squaredcos_cap_v2", "leading", "epsilon", 1, 1, 0, 1.5, 0.0f, 7,
     {852, 710, 568, 426, 284, 142, 0},
     {0.999958694f, 0.99991256f, 0.492285043f, 2.42873499e-09f},
     {0.667686403f, -1.53399205f, 0.0121665597f, 0.100053877f},
     {0.551827788f, -1.48977363f, -1.5f, 0.192346483f}},
    {"squaredcos_cap_v2", "leading", "v_prediction", 0, 0, 0, 1.0, 0.0f, 7,
     {852, 710, 568, 426, 284, 142, 0},
     {0.999958694f, 0.99991256f, 0.492285043f, 2.42873499e-09f},
     {1.48911273f, 0.741019845f, 0.884054244f, 1.11831164f},
     {1.45583832f, 0.828915596f, 0.967848361f, 1.00279903f}},
    {"squaredcos_cap_v2", "leading", "sample", 1, 1, 0, 1.0, 0.0f, 7,
     {852, 710, 568, 426, 284, 142, 0},
     {0.999958694f, 0.99991256f, 0.492285043f, 2.42873499e-09f},
     {-2.9203639f, 0.446073949f, 1.58991694f, -2.63006496f},
     {0.58979553f, -0.647293031f, 0.519379616f, -1.0f}},
    {"squaredcos_cap_v2", "trailing", "epsilon", 0, 1, 1, 1.0, 0.0f, 7,
     {999, 856, 713, 570, 428, 285, 142},
     {0.999958694f, 0.99991256f, 0.492285043f, 2.42873499e-09f},
     {-1.33825588f, 1.79831505f, 4.92614698f, -2.34292626f},
     {-1.04779398f, 0.810482025f, 1.83625484f, -1.16574657f}},
    {"squaredcos_cap_v2", "trailing", "v_prediction", 1, 0, 0, 1.0, 0.7f, 7,
     {999, 856, 713, 570, 428, 285, 142},
     {0.999958694f, 0.99991256f, 0.492285043f, 2.42873499e-09f},
     {-0.326169133f, 2.82480049f, 0.425078571f, 0.789593518f},
     {-1.00636709f, 1.00383329f, 0.273863494f, 0.995897472f}},
    {"squaredcos_cap_v2", "trailing", "sample", 0, 1, 0, 1.0, 0.0f, 7,
     {999, 856, 713, 570, 428, 285, 142},
     {0.999958694f, 0.99991256f, 0.492285043f, 2.42873499e-09f},
     {1.02888834f, 1.19874144f, -0.786445379f, -3.9472599f},
     {0.356718123f, 1.29309547f, 0.5821293f, 0.103962034f}},
    {"squaredcos_cap_v2", "linspace", "epsilon", 1, 1, 0, 1.5, 0.0f, 7,
     {999, 832, 666, 500, 333, 166, 0},
     {0.999958694f, 0.99991256f, 0.492285043f, 2.42873499e-09f},
     {-1.20244813f, 1.44666159f, 0.235383272f, 0.0526498556f},
     {-1.5f, 1.5f, 1.5f, 0.347605258f}},
    {"squaredcos_cap_v2", "linspace", "v_prediction", 0, 0, 1, 1.0, 0.0f, 7,
     {999, 832, 666, 500, 333, 166, 0},
     {0.999958694f, 0.99991256f, 0.492285043f, 2.42873499e-09f},
     {-1.8133781f, 1.37918687f, -3.11361885f, 1.18738711f},
     {-2.19516134f, 1.42171288f, -3.06333447f, 1.47324538f}},
    {"squaredcos_cap_v2", "linspace", "sample", 1, 1, 0, 1.0, 0.0f, 7,
     {999, 832, 666, 500, 333, 166, 0},
     {0.999958694f, 0.99991256f, 0.492285043f, 2.42873499e-09f},
     {1.27206302f, -2.21627307f, 0.3630476f, -1.97092652f},
     {-1.0f, -0.475254565f, -0.351233691f, 0.232260808f}},
};

static int from_json(ddim_scheduler *s, const char *json) {
    config c;
    if (sdx4_cfg_parse(&c, json, strlen(json), "scheduler/scheduler_config.json")) return -1;
    int rc = sdx4_ddim_from_config(s, &c);
    sdx4_cfg_free(&c);
    return rc;
}

static void check_values(const char *what, const float *got, const float *want, int n) {
    double e = max_abs_diff(got, want, (size_t)n);
    CHECK(e <= TOL, "%s: max abs diff %g", what, e);
}

static void check_combos(void) {
    static const int at[4] = {0, 21, 42, 63};
    static const int acp_at[4] = {0, 1, 500, 999};
    int exact = 0, values = 0;
    for (size_t i = 0; i < sizeof combos / sizeof combos[0]; i++) {
        const combo *k = &combos[i];
        char json[512], what[160];
        int scaled = !strcmp(k->beta_schedule, "scaled_linear");
        snprintf(json, sizeof json,
                 "{\"_class_name\": \"DDIMScheduler\", \"beta_schedule\": \"%s\", "
                 "\"beta_start\": %s, \"beta_end\": %s, \"timestep_spacing\": \"%s\", "
                 "\"prediction_type\": \"%s\", \"clip_sample\": %s, \"clip_sample_range\": %g, "
                 "\"set_alpha_to_one\": %s, \"steps_offset\": %d, \"trained_betas\": null}",
                 k->beta_schedule, scaled ? "0.00085" : "0.0001", scaled ? "0.012" : "0.02",
                 k->spacing, k->prediction, k->clip_sample ? "true" : "false",
                 k->clip_sample_range, k->set_alpha_to_one ? "true" : "false", k->steps_offset);
        snprintf(what, sizeof what, "combo %zu (%s, %s, %s, eta %g)", i, k->beta_schedule,
                 k->spacing, k->prediction, k->eta);
        ddim_scheduler s;
        if (from_json(&s, json)) {
            CHECK(0, "%s: %s", what, sdx4_last_error());
            continue;
        }
        CHECK(!sdx4_ddim_set_timesteps(&s, 7), "%s: %s", what, sdx4_last_error());
        CHECK(s.num_timesteps == k->count && !memcmp(s.timesteps, k->timesteps, sizeof k->timesteps),
              "%s: timesteps differ", what);
        float acp[4];
        for (int j = 0; j < 4; j++) acp[j] = s.alphas_cumprod[acp_at[j]];
        check_values(what, acp, k->acp, 4);

        torch_rng g;
        sdx4_torch_rng_seed(&g, 100 + i);
        float mo[64], smp[64], second[64], last[64], got[4];
        sdx4_torch_randn(&g, mo, 64);
        sdx4_torch_randn(&g, smp, 64);
        for (int j = 0; j < 64; j++) smp[j] *= 2;
        CHECK(!sdx4_ddim_step(&s, mo, s.timesteps[1], smp, 64, k->eta, &g, NULL, second), "%s: %s", what,
              sdx4_last_error());
        CHECK(!sdx4_ddim_step(&s, mo, s.timesteps[s.num_timesteps - 1], smp, 64, 0.0f, NULL, NULL, last),
              "%s: %s", what, sdx4_last_error());
        for (int j = 0; j < 4; j++) got[j] = second[at[j]];
        check_values(what, got, k->step_second, 4);
        exact += !count_differing(got, k->step_second, 4);
        for (int j = 0; j < 4; j++) got[j] = last[at[j]];
        check_values(what, got, k->step_last, 4);
        exact += !count_differing(got, k->step_last, 4);
        values += 2;
        sdx4_ddim_free(&s);
    }
    printf("combinations: %zu configs, %d of %d checked steps bit-identical\n",
           sizeof combos / sizeof combos[0], exact, values);
}

/* numpy's corners of set_timesteps (steps_offset 1), from the same
 * diffusers: count, first, last and sum of the timesteps. */
static void check_timestep_corners(void) {
    static const struct {
        const char *spacing;
        int n, count, first, last, sum;
    } cases[] = {
        {"linspace", 1, 1, 0, 0, 0},           {"trailing", 1, 1, 999, 999, 999},
        {"leading", 1, 1, 1, 1, 1},            {"linspace", 2, 2, 999, 0, 999},
        {"trailing", 2, 2, 999, 499, 1498},    {"leading", 2, 2, 501, 1, 502},
        {"linspace", 3, 3, 999, 0, 1499},      {"trailing", 3, 3, 999, 332, 1997},
        {"leading", 3, 3, 667, 1, 1002},       {"linspace", 999, 999, 999, 0, 499001},
        {"trailing", 999, 999, 999, 0, 499001}, {"leading", 999, 999, 999, 1, 499500},
        {"linspace", 1000, 1000, 999, 0, 499500}, {"trailing", 1000, 1000, 999, 0, 499500},
        {"leading", 1000, 1000, 1000, 1, 500500},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char json[128];
        snprintf(json, sizeof json, "{\"timestep_spacing\": \"%s\", \"steps_offset\": 1}",
                 cases[i].spacing);
        ddim_scheduler s;
        if (from_json(&s, json) || sdx4_ddim_set_timesteps(&s, cases[i].n)) {
            CHECK(0, "%s n=%d: %s", cases[i].spacing, cases[i].n, sdx4_last_error());
            sdx4_ddim_free(&s);
            continue;
        }
        int sum = 0;
        for (int j = 0; j < s.num_timesteps; j++) sum += s.timesteps[j];
        CHECK(s.num_timesteps == cases[i].count && s.timesteps[0] == cases[i].first &&
                  s.timesteps[s.num_timesteps - 1] == cases[i].last && sum == cases[i].sum,
              "%s n=%d: count %d first %d last %d sum %d", cases[i].spacing, cases[i].n,
              s.num_timesteps, s.timesteps[0], s.timesteps[s.num_timesteps - 1], sum);
        sdx4_ddim_free(&s);
    }

    /* "trailing" with n=61: np.arange(1000, 0, -1000/61) has 62 entries and
     * the last timestep is -1; diffusers steps there with alphas_cumprod[-1]. */
    ddim_scheduler s;
    if (from_json(&s, "{\"timestep_spacing\": \"trailing\", \"prediction_type\": "
                      "\"v_prediction\", \"clip_sample\": false}") ||
        sdx4_ddim_set_timesteps(&s, 61)) {
        CHECK(0, "trailing 61: %s", sdx4_last_error());
        sdx4_ddim_free(&s);
        return;
    }
    int c = s.num_timesteps;
    CHECK(c == 62 && s.timesteps[0] == 999 && s.timesteps[1] == 983 && s.timesteps[2] == 966 &&
              s.timesteps[c - 3] == 32 && s.timesteps[c - 2] == 15 && s.timesteps[c - 1] == -1,
          "trailing 61: %d timesteps, last %d", c, s.timesteps[c - 1]);
    torch_rng g;
    sdx4_torch_rng_seed(&g, 5);
    float mo[64], smp[64], prev[64];
    sdx4_torch_randn(&g, mo, 64);
    sdx4_torch_randn(&g, smp, 64);
    CHECK(!sdx4_ddim_step(&s, mo, s.timesteps[c - 1], smp, 64, 0.0f, NULL, NULL, prev), "step at -1: %s",
          sdx4_last_error());
    const float want[4] = {-1.84558427f, 0.598278224f, -0.537232578f, -1.3225112f};
    const float got[4] = {prev[0], prev[21], prev[42], prev[63]};
    check_values("trailing 61, step at t=-1", got, want, 4);
    sdx4_ddim_free(&s);
}

/* DDPM add_noise with each schedule at level 350, from the same diffusers:
 * g = manual_seed(9), x = torch.rand(1,3,4,4, g) * 2 - 1, noise =
 * torch.randn(1,3,4,4, g), add_noise(x, noise, [350]) at 0, 13, 29, 47. */
static void check_ddpm_schedules(void) {
    static const struct {
        const char *schedule;
        float acp350, out[4];
    } cases[] = {
        {"linear", 0.283182502f, {-1.00334597f, -1.28710437f, 0.983953953f, 0.554821014f}},
        {"scaled_linear", 0.640484095f, {-0.578638256f, -1.15977192f, 0.778475165f, 0.684846878f}},
        {"squaredcos_cap_v2", 0.718456507f,
         {-0.468627721f, -1.10805321f, 0.715780616f, 0.702152014f}},
    };
    for (int i = 0; i < 3; i++) {
        char json[160];
        snprintf(json, sizeof json,
                 "{\"_class_name\": \"DDPMScheduler\", \"beta_schedule\": \"%s\", "
                 "\"variance_type\": \"fixed_small\"}", cases[i].schedule);
        config c;
        ddpm_scheduler d;
        if (sdx4_cfg_parse(&c, json, strlen(json), "low_res_scheduler/scheduler_config.json") ||
            sdx4_ddpm_from_config(&d, &c)) {
            CHECK(0, "ddpm %s: %s", cases[i].schedule, sdx4_last_error());
            continue;
        }
        sdx4_cfg_free(&c);
        torch_rng g;
        sdx4_torch_rng_seed(&g, 9);
        float x[48], nz[48], out[48];
        sdx4_torch_rand(&g, x, 48);
        for (int j = 0; j < 48; j++) x[j] = x[j] * 2 - 1;
        sdx4_torch_randn(&g, nz, 48);
        CHECK(!sdx4_ddpm_add_noise(&d, x, nz, 48, 350, out), "%s", sdx4_last_error());
        const float got[4] = {out[0], out[13], out[29], out[47]};
        check_values(cases[i].schedule, &d.alphas_cumprod[350], &cases[i].acp350, 1);
        check_values(cases[i].schedule, got, cases[i].out, 4);
        sdx4_ddpm_free(&d);
    }
}

/* ------------------------------------------------ part 3: refusals */

static void expect_error(int rc, const char *what, const char *needle, sdx4_status status) {
    const char *msg = sdx4_last_error();
    CHECK(rc == -1, "%s: accepted", what);
    CHECK(strstr(msg, needle) != NULL, "%s: message \"%s\" does not name %s", what, msg, needle);
    CHECK(sdx4_error_status() == status, "%s: status %s", what, sdx4_status_name(sdx4_error_status()));
}

static void check_refusals(void) {
    static const struct {
        int ddpm;
        const char *json, *key;
    } bad[] = {
        {0, "{\"timestep_spacing\": \"karras\"}", "timestep_spacing=karras"},
        {0, "{\"beta_schedule\": \"foo\"}", "beta_schedule=foo"},
        {0, "{\"trained_betas\": [0.1, 0.2]}", "trained_betas"},
        {0, "{\"_class_name\": \"PNDMScheduler\"}", "_class_name=PNDMScheduler"},
        {0, "{\"prediction_type\": \"flow\"}", "prediction_type=flow"},
        {0, "{\"thresholding\": true}", "thresholding"},
        {0, "{\"rescale_betas_zero_snr\": true}", "rescale_betas_zero_snr"},
        {0, "{\"num_train_timesteps\": 0}", "num_train_timesteps"},
        {0, "{\"num_train_timesteps\": 100000000}", "num_train_timesteps"},
        {0, "{\"clip_sample\": \"yes\"}", "clip_sample"},
        {0, "{\"beta_start\": \"small\"}", "beta_start"},
        {0, "{\"timestep_spacing\": 3}", "timestep_spacing"},
        {1, "{\"beta_schedule\": \"sigmoid\"}", "beta_schedule=sigmoid"},
        {1, "{\"_class_name\": \"DDIMScheduler\"}", "_class_name=DDIMScheduler"},
        {1, "{\"trained_betas\": [0.5]}", "trained_betas"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        const char *label = bad[i].ddpm ? "low_res_scheduler/scheduler_config.json"
                                        : "scheduler/scheduler_config.json";
        config c;
        int rc = sdx4_cfg_parse(&c, bad[i].json, strlen(bad[i].json), label);
        CHECK(!rc, "%s: %s", bad[i].json, sdx4_last_error());
        if (rc) continue;
        ddim_scheduler s;
        ddpm_scheduler d;
        rc = bad[i].ddpm ? sdx4_ddpm_from_config(&d, &c) : sdx4_ddim_from_config(&s, &c);
        expect_error(rc, bad[i].json, bad[i].key, SDX4_ERR_MODEL);
        CHECK(strstr(sdx4_last_error(), label) != NULL, "%s: message does not name the file",
              bad[i].json);
        if (!rc) {
            if (bad[i].ddpm) sdx4_ddpm_free(&d); else sdx4_ddim_free(&s);
        }
        sdx4_cfg_free(&c);
    }

    ddim_scheduler s;
    expect_error(sdx4_ddim_load(&s, "/nonexistent"), "missing folder", "scheduler/scheduler_config.json",
                 SDX4_ERR_MODEL);
    ddpm_scheduler d;
    expect_error(sdx4_ddpm_load(&d, "/nonexistent"), "missing folder",
                 "low_res_scheduler/scheduler_config.json", SDX4_ERR_MODEL);

    /* call errors: arguments diffusers would raise on */
    if (from_json(&s, "{\"steps_offset\": 1}")) {
        CHECK(0, "%s", sdx4_last_error());
        return;
    }
    float x[4] = {0.1f, -0.2f, 0.3f, 0.4f}, y[4];
    expect_error(sdx4_ddim_step(&s, x, 500, x, 4, 0.0f, NULL, NULL, y), "step before set_timesteps",
                 "set_timesteps", SDX4_ERR_INVALID_ARGUMENT);
    expect_error(sdx4_ddim_set_timesteps(&s, 0), "0 steps", "num_inference_steps=0",
                 SDX4_ERR_INVALID_ARGUMENT);
    expect_error(sdx4_ddim_set_timesteps(&s, 1001), "1001 steps", "num_inference_steps=1001",
                 SDX4_ERR_INVALID_ARGUMENT);
    CHECK(!sdx4_ddim_set_timesteps(&s, 1000), "%s", sdx4_last_error());
    /* leading + steps_offset 1 + 1000 steps starts at t=1000, past the
     * table: diffusers fails on the index, so does sdx4_ddim_step */
    expect_error(sdx4_ddim_step(&s, x, s.timesteps[0], x, 4, 0.0f, NULL, NULL, y), "t=1000", "1000",
                 SDX4_ERR_INVALID_ARGUMENT);
    expect_error(sdx4_ddim_step(&s, x, -1001, x, 4, 0.0f, NULL, NULL, y), "t=-1001", "-1001",
                 SDX4_ERR_INVALID_ARGUMENT);
    expect_error(sdx4_ddim_step(&s, x, 500, x, 4, 1.0f, NULL, NULL, y), "eta without generator", "generator",
                 SDX4_ERR_INVALID_ARGUMENT);
    expect_error(sdx4_ddim_step(&s, x, 500, x, 4, NAN, NULL, NULL, y), "eta NaN", "eta",
                 SDX4_ERR_INVALID_ARGUMENT);
    sdx4_ddim_free(&s);

    if (sdx4_ddpm_load(&d, test_ref("small/model"))) {
        printf("refusals of add_noise: skipped (%s)\n", sdx4_last_error());
        return;
    }
    expect_error(sdx4_ddpm_add_noise(&d, x, x, 4, 1000, y), "add_noise t=1000", "1000",
                 SDX4_ERR_INVALID_ARGUMENT);
    expect_error(sdx4_ddpm_add_noise(&d, x, x, 4, -1, y), "add_noise t=-1", "-1",
                 SDX4_ERR_INVALID_ARGUMENT);
    sdx4_ddpm_free(&d);
}

int main(void) {
    check_golden("tiny");
    check_golden("small");
    check_combos();
    check_timestep_corners();
    check_ddpm_schedules();
    check_refusals();
    return test_finish("test_scheduler");
}
