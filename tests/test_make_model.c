/*
 * test_make_model.c - random-weight models: the full-size x4-upscaler
 * architecture built from its configs has the published parameter counts,
 * and a model written by sdx4_make_model() from the small reference
 * configs loads through the public API and upscales to finite pixels, with
 * every tensor name and shape of the real reference files. The output
 * folder's missing parents are made (mkdir -p), and a path through a file
 * is refused with a message naming that file.
 */
#include <stdlib.h>
#include <unistd.h>

#include "core/error.h"
#include "core/safetensors.h"
#include "model/model.h"
#include "sdx4.h"
#include "test.h"

static void test_full_size_counts(void) {
    model m;
    int rc = sdx4_model_spec(&m, test_ref("../models/x4-upscaler"));
    CHECK(rc == 0, "%s", sdx4_last_error());
    if (rc) return;
    /* published: UNet 473,398,020; text encoder 340,387,840; VAE decoder
     * 32,965,379 (+ post_quant_conv, 4x4 + 4) */
    CHECK(m.unet_ws.params == 473398020, "unet %lld", (long long)m.unet_ws.params);
    CHECK(m.te_ws.params == 340387840, "text encoder %lld", (long long)m.te_ws.params);
    CHECK(m.vae_ws.params == 32965379 + 20, "vae %lld", (long long)m.vae_ws.params);
    sdx4_model_free(&m);
}

/* Every tensor of `real` exists in `made` with the same shape. */
static void same_tensors(const char *real, const char *made, int skip_encoder) {
    st_file a, b;
    if (sdx4_st_open(&a, real) || sdx4_st_open(&b, made)) {
        CHECK(0, "%s", sdx4_last_error());
        return;
    }
    int checked = 0;
    for (int i = 0; i < a.count; i++) {
        const st_tensor *t = &a.tensors[i], *u;
        if (skip_encoder && (!strncmp(t->name, "encoder.", 8) || !strncmp(t->name, "quant_conv", 10)))
            continue;
        char prefixed[600];
        snprintf(prefixed, sizeof prefixed, "text_model.%s", t->name);
        u = sdx4_st_find(&b, t->name);
        if (!u) u = sdx4_st_find(&b, prefixed);
        CHECK(u != NULL, "%s: %s missing", made, t->name);
        if (!u) continue;
        CHECK(u->ndim == t->ndim && !memcmp(u->shape, t->shape, t->ndim * sizeof *t->shape),
              "%s: shape differs", t->name);
        checked++;
    }
    CHECK(checked > 0, "no tensors compared in %s", real);
    sdx4_st_close(&a);
    sdx4_st_close(&b);
}

/* Opens `dir` and upscales a 16x16 grey square in 2 steps. */
static void upscale_ok(const char *dir) {
    sdx4_engine_options o;
    sdx4_engine_options_default(&o);
    o.model_dir = dir;
    o.device = "cpu";
    sdx4_engine *e = NULL;
    sdx4_status s = sdx4_engine_open(&o, &e);
    CHECK(s == SDX4_OK, "open %s: %s", dir, sdx4_last_error());
    if (!e) return;
    sdx4_image in = {16, 16, malloc(16 * 16 * 3)}, res = {0};
    memset(in.pixels, 128, 16 * 16 * 3);
    sdx4_upscale_params p;
    sdx4_upscale_params_default(&p);
    p.num_inference_steps = 2;
    p.prompt = "a white cat";
    s = sdx4_upscale(e, &in, &p, &res, NULL);
    CHECK(s == SDX4_OK, "upscale: %s", sdx4_last_error());
    CHECK(res.width == 64 && res.height == 64, "output %dx%d", res.width, res.height);
    sdx4_image_free(&res);
    free(in.pixels);
    sdx4_engine_close(e);
}

/* The demo model of a fresh checkout: the repo's own configs, a byte-level
 * vocabulary, no ../shared needed. */
static void test_demo_model(void) {
    char dir[] = "/tmp/sdx4-demo-model-XXXXXX", out[512], cmd[600];
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    snprintf(out, sizeof out, "%s/model", dir);
    sdx4_status s = sdx4_make_model(SDX4_SOURCE_DIR "/assets/demo-model", out, "fp32", 0);
    CHECK(s == SDX4_OK, "make_model: %s", sdx4_last_error());
    if (!s) upscale_ok(out);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0, "cleanup");
}

static void test_written_model(void) {
    char dir[] = "/tmp/sdx4-make-model-XXXXXX", out[512], real[1024], made[1024];
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    snprintf(out, sizeof out, "%s/model", dir);
    sdx4_status s = sdx4_make_model(test_ref("small/model"), out, "fp16", 7);
    CHECK(s == SDX4_OK, "make_model: %s", sdx4_last_error());
    if (s) return;
    static const char *files[][2] = {
        {"unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"},
        {"text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors"},
        {"vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"}};
    for (int i = 0; i < 3; i++) {
        snprintf(real, sizeof real, "%s/%s", test_ref("small/model"), files[i][0]);
        snprintf(made, sizeof made, "%s/%s", out, files[i][1]);
        same_tensors(real, made, i == 2);
    }
    snprintf(made, sizeof made, "%s/DEMO_MODEL", out);
    CHECK(access(made, R_OK) == 0, "DEMO_MODEL marker missing");

    upscale_ok(out);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0, "cleanup");
}

/* OUT's missing parents are made, as a container build writing to
 * /opt/sdx4/demo before /opt/sdx4 exists needs; a path that runs through a
 * file, or names one, is an I/O error that names it. */
static void test_output_parents(void) {
    char dir[] = "/tmp/sdx4-make-model-parents-XXXXXX", out[512], path[600];
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    snprintf(out, sizeof out, "%s/a/b/model", dir);
    sdx4_status s = sdx4_make_model(test_ref("tiny/model"), out, "fp32", 0);
    CHECK(s == SDX4_OK, "make_model into missing parents: %s", sdx4_last_error());
    snprintf(path, sizeof path, "%s/unet/diffusion_pytorch_model.safetensors", out);
    CHECK(access(path, R_OK) == 0, "%s not written", path);

    snprintf(path, sizeof path, "%s/file", dir);
    FILE *f = fopen(path, "w");
    CHECK(f && fclose(f) == 0, "creating %s", path);
    snprintf(out, sizeof out, "%s/file/model", dir);
    s = sdx4_make_model(test_ref("tiny/model"), out, "fp32", 0);
    CHECK(s == SDX4_ERR_IO, "a parent that is a file: status %d", s);
    CHECK(strstr(sdx4_last_error(), path) && strstr(sdx4_last_error(), "not a folder"),
          "message should name %s: %s", path, sdx4_last_error());
    s = sdx4_make_model(test_ref("tiny/model"), path, "fp32", 0);
    CHECK(s == SDX4_ERR_IO && strstr(sdx4_last_error(), "not a folder"),
          "OUT that is a file: status %d, %s", s, sdx4_last_error());

    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0, "cleanup");
}

int main(void) {
    test_full_size_counts();
    test_written_model();
    test_demo_model();
    test_output_parents();
    return test_finish("test_make_model");
}
