/*
 * test_models.c - the three networks against diffusers' goldens, on the
 * CPU backend: CLIP text encoder, UNet (two timesteps and an input size
 * that is not a multiple of 2^levels) and VAE decoder, for the `tiny` and
 * `small` reference models, and the tiny model's fp16 variant. Tolerance
 * from reference/README.md: max abs 2e-4 (fp16 variant: fp16 precision).
 */
#include <jansson.h>
#include <stdlib.h>

#include "backend/backend.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "model/text_encoder.h"
#include "model/unet.h"
#include "model/vae.h"
#include "test.h"
#include "test_device.h"

static backend *be;

/* Uploads golden tensor `name` of file g as a new backend tensor. */
static tensor *golden(const st_file *g, const char *name) {
    const st_tensor *t = sdx4_st_find(g, name);
    if (!t) {
        fprintf(stderr, "golden %s missing\n", name);
        exit(1);
    }
    int64_t shape[4] = {1, 1, 1, 1};
    for (int i = 0; i < t->ndim; i++) shape[i] = t->shape[i];
    tensor *x = be->new_tensor(be, t->ndim, shape);
    float *host = malloc(t->nbytes);
    dtype_to_f32(t->type, t->data, host, t->nbytes / 4);
    be->upload(be, x, host);
    free(host);
    return x;
}

/* Compares a result with golden tensor `name`; returns max abs diff. */
static double compare(const char *what, tensor *got, const st_file *g, const char *name, double tol) {
    const st_tensor *t = sdx4_st_find(g, name);
    CHECK(got != NULL, "%s: %s", what, sdx4_last_error());
    if (!got || !t) return INFINITY;
    size_t n = t->nbytes / 4;
    CHECK((size_t)tensor_numel(got) == n, "%s: %lld elements, golden %zu", what,
          (long long)tensor_numel(got), n);
    if ((size_t)tensor_numel(got) != n) return INFINITY;
    float *a = malloc(n * 4), *b = malloc(n * 4);
    be->download(be, got, a);
    dtype_to_f32(t->type, t->data, b, n);
    double d = max_abs_diff(a, b, n);
    printf("  %-34s max abs diff %.3g\n", what, d);
    CHECK(d <= tol, "%s: max abs diff %g > %g", what, d, tol);
    free(a);
    free(b);
    return d;
}

static int open_component(weight_source *ws, config *cfg, const char *model_dir,
                          const char *component, const char *stem, const char *variant) {
    char file[128];
    snprintf(file, sizeof file, "%s/config.json", component);
    int rc = sdx4_cfg_load(cfg, model_dir, file) ||
             sdx4_weights_open(ws, be, model_dir, component, stem, variant);
    CHECK(rc == 0, "%s: %s", component, sdx4_last_error());
    return rc;
}

static void test_text_encoder(const char *m, const char *variant, double tol) {
    char dir[512], gold[512];
    snprintf(dir, sizeof dir, "%s/model", test_ref(m));
    snprintf(gold, sizeof gold, "%s/golden/text_encoder.safetensors", test_ref(m));
    weight_source ws;
    config cfg;
    text_encoder te;
    st_file g;
    if (open_component(&ws, &cfg, dir, "text_encoder", "model", variant)) return;
    CHECK(sdx4_st_open(&g, gold) == 0, "%s", sdx4_last_error());
    CHECK(sdx4_text_encoder_load(&te, &ws, &cfg) == 0, "%s", sdx4_last_error());
    const st_tensor *ids_t = sdx4_st_find(&g, "input_ids");
    int batch = (int)ids_t->shape[0], seq = (int)ids_t->shape[1];
    float *idf = malloc(ids_t->nbytes);
    int32_t *ids = malloc(sizeof *ids * batch * seq);
    dtype_to_f32(ids_t->type, ids_t->data, idf, (size_t)batch * seq);
    for (int i = 0; i < batch * seq; i++) ids[i] = (int32_t)idf[i];
    tensor *out = sdx4_text_encoder_forward(be, &te, ids, batch, seq);
    char what[128];
    snprintf(what, sizeof what, "%s%s text_encoder", m, variant ? ".fp16" : "");
    compare(what, out, &g, "last_hidden_state", tol);
    tensor_free(out);
    free(idf);
    free(ids);
    sdx4_text_encoder_free(&te);
    sdx4_st_close(&g);
    sdx4_weights_close(&ws);
    sdx4_cfg_free(&cfg);
}

/* json metadata value of the golden file, parsed */
static json_t *meta(const st_file *g, const char *key) {
    char *s = sdx4_st_metadata(g, key);
    json_t *v = s ? json_loads(s, JSON_DECODE_ANY, NULL) : NULL;
    free(s);
    return v;
}

static void test_unet(const char *m, const char *variant, double tol) {
    char dir[512], gold[512], what[128];
    snprintf(dir, sizeof dir, "%s/model", test_ref(m));
    snprintf(gold, sizeof gold, "%s/golden/unet.safetensors", test_ref(m));
    weight_source ws;
    config cfg;
    unet u;
    st_file g;
    if (open_component(&ws, &cfg, dir, "unet", "diffusion_pytorch_model", variant)) return;
    CHECK(sdx4_st_open(&g, gold) == 0, "%s", sdx4_last_error());
    CHECK(sdx4_unet_load(&u, &ws, &cfg) == 0, "%s", sdx4_last_error());
    tensor *sample = golden(&g, "sample"), *ctx = golden(&g, "encoder_hidden_states");
    json_t *labels = meta(&g, "class_labels");
    int32_t cl[2] = {(int32_t)json_integer_value(json_array_get(labels, 0)),
                     (int32_t)json_integer_value(json_array_get(labels, 1))};
    json_decref(labels);
    static const int ts[] = {951, 1};
    for (int i = 0; i < 2; i++) {
        char name[32];
        snprintf(name, sizeof name, "out_t%d", ts[i]);
        snprintf(what, sizeof what, "%s%s unet t=%d", m, variant ? ".fp16" : "", ts[i]);
        tensor *out = sdx4_unet_forward(be, &u, sample, (float)ts[i], cl, ctx);
        compare(what, out, &g, name, tol);
        tensor_free(out);
    }
    /* odd size: batch 1, the first row of the context */
    json_t *odd = meta(&g, "odd");
    int32_t odd_label = (int32_t)json_integer_value(json_object_get(odd, "class_label"));
    float odd_t = (float)json_integer_value(json_object_get(odd, "t"));
    json_decref(odd);
    tensor *s2 = golden(&g, "sample_odd");
    tensor *ctx1 = be->new_tensor(be, 3, (int64_t[]){1, ctx->shape[1], ctx->shape[2]});
    float *host = malloc(sizeof *host * tensor_numel(ctx));
    be->download(be, ctx, host);
    be->upload(be, ctx1, host);
    free(host);
    tensor *out = sdx4_unet_forward(be, &u, s2, odd_t, &odd_label, ctx1);
    snprintf(what, sizeof what, "%s%s unet odd size", m, variant ? ".fp16" : "");
    compare(what, out, &g, "out_odd_t500", tol);
    tensor_free(out);
    tensor_free(s2);
    tensor_free(ctx1);
    tensor_free(sample);
    tensor_free(ctx);
    sdx4_unet_free(&u);
    sdx4_st_close(&g);
    sdx4_weights_close(&ws);
    sdx4_cfg_free(&cfg);
}

static void test_vae(const char *m, const char *variant, double tol) {
    char dir[512], gold[512], what[128];
    snprintf(dir, sizeof dir, "%s/model", test_ref(m));
    snprintf(gold, sizeof gold, "%s/golden/vae_decode.safetensors", test_ref(m));
    weight_source ws;
    config cfg;
    vae_decoder v;
    st_file g;
    if (open_component(&ws, &cfg, dir, "vae", "diffusion_pytorch_model", variant)) return;
    CHECK(sdx4_st_open(&g, gold) == 0, "%s", sdx4_last_error());
    CHECK(sdx4_vae_load(&v, &ws, &cfg) == 0, "%s", sdx4_last_error());
    tensor *z = golden(&g, "latents");
    tensor *out = sdx4_vae_decode(be, &v, z);
    snprintf(what, sizeof what, "%s%s vae decode", m, variant ? ".fp16" : "");
    compare(what, out, &g, "image", tol);
    tensor_free(out);
    tensor_free(z);
    sdx4_st_close(&g);
    sdx4_weights_close(&ws);
    sdx4_cfg_free(&cfg);
}

/* The CPU's bfloat16 products (SDX4_TEST_CPU_DENSE=bf16, test_device.h):
 * bfloat16 keeps 8 significant bits, a relative rounding of 2^-9 (2e-3) per
 * operand against float32's 2^-24. Measured with the bf16 path's arithmetic
 * on this CPU (SDX4_TEST_CPU_DENSE=bf16-operands: float32 oneDNN on
 * operands rounded to bfloat16, the same products and float accumulation
 * up to summation order), max abs diff from the float32 goldens:
 *   text encoder 0.0111 (tiny), 0.0247 (small), 0.0128 (tiny fp16)
 *   UNet 0.0121-0.0127 (tiny), 0.0119-0.0150 (small), 0.0141-0.0179 (fp16)
 *   VAE decode 0.0290 (tiny), 0.0324 (small), 0.0288 (tiny fp16)
 * against 1e-6 to 9e-6 in float32 through OpenBLAS or oneDNN. The
 * tolerances are twice the worst measured, rounded up: a lost bias, a
 * swapped weight or a wrong layout costs O(1). */
#define BF16_NETS 5e-2
#define BF16_VAE 7e-2

/* FP8 E4M3 operands with a scale per tensor, emulated
 * (SDX4_TEST_CPU_DENSE=fp8-operands, -linear, -conv: test_device.h): 4
 * significant bits, a relative rounding of 2^-5 to 2^-4 per operand, 16
 * times bfloat16's, and so about 16 times its error. Measured on this CPU,
 * max abs diff from the float32 goldens, tiny, small and tiny fp16:
 *   every convolution and linear layer:
 *     text encoder 0.187, 0.285, 0.178; UNet 0.185-0.213, 0.216-0.276,
 *     0.185-0.204; VAE decode 0.614, 0.550, 0.536
 *   linear layers only:
 *     text encoder 0.187, 0.285, 0.178; UNet 0.052-0.059, 0.050-0.069,
 *     0.043-0.054; VAE decode 0.030, 0.039, 0.035
 *   convolutions only (the text encoder has none: float32's 1.2e-6, and
 *   the fp16 weights' 1.2e-3):
 *     UNet 0.170-0.229, 0.213-0.243, 0.174-0.202; VAE decode 0.502, 0.644,
 *     0.454
 * The tolerances are twice the worst, rounded up (the fp16 variant's at
 * least its weights' 2e-2). They hold these figures (BENCHMARKS.md), not
 * a quality: each is far past the 1e-2 of CUDA's fp16 mode. */
static const struct {
    cpu_dense_path path;
    double text, unet, vae;
} fp8_tolerances[] = {
    {CPU_DENSE_ONEDNN_F32_FP8_OPERANDS, 0.6, 0.6, 1.3},
    {CPU_DENSE_ONEDNN_F32_FP8_LINEAR_OPERANDS, 0.6, 0.15, 0.08},
    {CPU_DENSE_ONEDNN_F32_FP8_CONV_OPERANDS, 2e-4, 0.5, 1.3},
};

int main(void) {
    be = test_backend();
    /* half precision (CUDA fp16 mode): the 1e-2 for the networks
     * that run in fp16; the VAE runs in float32 on half weights */
    double text_tol = test_half_precision ? 1e-2 : test_bf16 ? BF16_NETS : 2e-4, unet_tol = text_tol;
    double vae_tol = test_half_precision ? 2e-2 : test_bf16 ? BF16_VAE : 2e-4;
    /* fp16 weights, computed in float32: the difference is the weights'
     * rounding (relative 2^-11), amplified by the depth of the network. */
    double text16 = test_bf16 ? BF16_NETS : 2e-2, unet16 = text16, vae16 = test_bf16 ? BF16_VAE : 2e-2;
    for (size_t i = 0; i < sizeof fp8_tolerances / sizeof *fp8_tolerances; i++)
        if (test_dense == fp8_tolerances[i].path) {
            text_tol = fp8_tolerances[i].text, text16 = fmax(text16, text_tol);
            unet_tol = fp8_tolerances[i].unet, unet16 = fmax(unet16, unet_tol);
            vae_tol = fp8_tolerances[i].vae, vae16 = fmax(vae16, vae_tol);
        }
    static const char *models[] = {"tiny", "small"};
    for (int i = 0; i < 2; i++) {
        test_text_encoder(models[i], NULL, text_tol);
        test_unet(models[i], NULL, unet_tol);
        test_vae(models[i], NULL, vae_tol);
    }
    test_text_encoder("tiny", "fp16", text16);
    test_unet("tiny", "fp16", unet16);
    test_vae("tiny", "fp16", vae16);
    be->destroy(be);
    return test_finish("test_models");
}
