/*
 * test_bad_model.c - broken model folders give a clear error naming the
 * file (and tensor or key), never a crash. Each case copies the small
 * reference model, breaks one thing, and opens it through the public API.
 */
#include <jansson.h>
#include <stdarg.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sdx4.h"
#include "test.h"

static char root[] = "/tmp/sdx4-bad-model-XXXXXX";
static char dir[600];

/* Runs a shell command built printf-style. A failure (no reference data,
 * a full disk) ends the test as failed: the cases after it would edit a
 * model folder that is not there. */
static void sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void sh(const char *fmt, ...) {
    char cmd[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    if (system(cmd) != 0) {
        fprintf(stderr, "test_bad_model: failed: %s\n", cmd);
        exit(1);
    }
}

static void fresh_copy(void) {
    sh("rm -rf '%s/m' && cp -r '%s' '%s/m'", root, test_ref("small/model"), root);
}

static void expect_error(const char *what, sdx4_status want, const char *needle1, const char *needle2) {
    sdx4_engine_options o;
    sdx4_engine_options_default(&o);
    o.model_dir = dir;
    o.device = "cpu";
    sdx4_engine *e = NULL;
    sdx4_status s = sdx4_engine_open(&o, &e);
    const char *msg = sdx4_last_error();
    printf("  %-28s -> %s\n", what, msg);
    CHECK(s == want, "%s: status %s, want %s", what, sdx4_status_name(s), sdx4_status_name(want));
    CHECK(e == NULL, "%s: engine opened", what);
    CHECK(strstr(msg, needle1) != NULL, "%s: message lacks '%s': %s", what, needle1, msg);
    CHECK(!needle2 || strstr(msg, needle2) != NULL, "%s: message lacks '%s': %s", what, needle2, msg);
    sdx4_engine_close(e);
}

/* Rewrites the header of a safetensors file through `edit`, keeping the data. */
static void edit_header(const char *rel, void (*edit)(json_t *h), long truncate_data_to) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, rel);
    FILE *f = fopen(path, "rb");
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    rewind(f);
    unsigned char *buf = malloc(size);
    CHECK(fread(buf, 1, size, f) == (size_t)size, "read");
    fclose(f);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | buf[i];
    json_t *h = json_loadb((char *)buf + 8, hlen, 0, NULL);
    if (edit) edit(h);
    char *text = json_dumps(h, JSON_COMPACT);
    size_t tlen = strlen(text);
    long data = size - 8 - (long)hlen;
    if (truncate_data_to >= 0 && truncate_data_to < data) data = truncate_data_to;
    f = fopen(path, "wb");
    unsigned char len[8];
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)((uint64_t)tlen >> (8 * i));
    fwrite(len, 8, 1, f);
    fwrite(text, tlen, 1, f);
    fwrite(buf + 8 + hlen, data, 1, f);
    fclose(f);
    free(text);
    free(buf);
    json_decref(h);
}

static void set_field(json_t *h, const char *tensor, const char *key, json_t *v) {
    json_object_set_new(json_object_get(h, tensor), key, v);
}
static void offsets_out_of_range(json_t *h) {
    set_field(h, "conv_in.weight", "data_offsets", json_pack("[i,i]", 0, 1 << 30));
}
static void wrong_dtype(json_t *h) { set_field(h, "conv_in.bias", "dtype", json_string("I32")); }
static void wrong_shape(json_t *h) {
    json_t *t = json_object_get(h, "conv_out.weight");
    json_t *shape = json_object_get(t, "shape"); /* [4, 32, 3, 3] -> [32, 4, 3, 3] */
    json_int_t a = json_integer_value(json_array_get(shape, 0));
    json_array_set_new(shape, 0, json_array_get(shape, 1) ? json_integer(json_integer_value(json_array_get(shape, 1))) : json_integer(1));
    json_array_set_new(shape, 1, json_integer(a));
}
static void missing_tensor(json_t *h) { json_object_del(h, "conv_norm_out.bias"); }
static void overlapping(json_t *h) { /* conv_out.bias (4 floats) inside conv_in.weight */
    json_t *w = json_object_get(json_object_get(h, "conv_in.weight"), "data_offsets");
    json_int_t start = json_integer_value(json_array_get(w, 0));
    set_field(h, "conv_out.bias", "data_offsets", json_pack("[I,I]", start, start + 16));
}

static void write_text(const char *rel, const char *text) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, rel);
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

static void set_config(const char *rel, const char *key, json_t *v) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, rel);
    json_t *c = json_load_file(path, 0, NULL);
    json_object_set_new(c, key, v);
    json_dump_file(c, path, 0);
    json_decref(c);
}

int main(void) {
    CHECK(mkdtemp(root) != NULL, "mkdtemp");
    snprintf(dir, sizeof dir, "%s/m", root);
    const char *unet = "unet/diffusion_pytorch_model.safetensors";

    fresh_copy();
    sdx4_engine_options o;
    sdx4_engine_options_default(&o);
    o.model_dir = dir;
    sdx4_engine *e = NULL;
    CHECK(sdx4_engine_open(&o, &e) == SDX4_OK, "the intact copy must open: %s", sdx4_last_error());
    sdx4_engine_close(e);

    fresh_copy();
    edit_header(unet, NULL, 1000);
    expect_error("truncated weights", SDX4_ERR_MODEL, "unet/diffusion_pytorch_model.safetensors", "truncated");

    fresh_copy();
    write_text(unet, "\xff\xff\xff\xff\xff\xff\xff\x7f{}");
    expect_error("lying header length", SDX4_ERR_MODEL, "diffusion_pytorch_model.safetensors", "header length");

    fresh_copy();
    write_text(unet, "");
    expect_error("empty weights file", SDX4_ERR_MODEL, "diffusion_pytorch_model.safetensors", "too short");

    fresh_copy();
    edit_header(unet, offsets_out_of_range, -1);
    expect_error("offsets out of range", SDX4_ERR_MODEL, "conv_in.weight", "data_offsets");

    fresh_copy();
    edit_header(unet, wrong_dtype, -1);
    expect_error("wrong dtype", SDX4_ERR_MODEL, "conv_in.bias", NULL);

    fresh_copy();
    edit_header(unet, wrong_shape, -1);
    expect_error("wrong shape", SDX4_ERR_MODEL, "conv_out.weight", "shape");

    fresh_copy();
    edit_header(unet, missing_tensor, -1);
    expect_error("missing tensor", SDX4_ERR_MODEL, "conv_norm_out.bias", "missing");

    fresh_copy();
    edit_header(unet, overlapping, -1);
    expect_error("overlapping tensors", SDX4_ERR_MODEL, "overlap", NULL);

    fresh_copy();
    write_text("unet/config.json", "{\"in_channels\": 7,");
    expect_error("malformed config", SDX4_ERR_MODEL, "unet/config.json", "malformed");

    fresh_copy();
    set_config("unet/config.json", "resnet_time_scale_shift", json_string("scale_shift"));
    expect_error("unsupported config value", SDX4_ERR_MODEL,
                 "unet/config.json: resnet_time_scale_shift=scale_shift is not supported", NULL);

    fresh_copy();
    set_config("unet/config.json", "layers_per_block", json_string("two"));
    expect_error("config value of wrong type", SDX4_ERR_MODEL, "layers_per_block", NULL);

    fresh_copy();
    set_config("scheduler/scheduler_config.json", "timestep_spacing", json_string("karras"));
    expect_error("unsupported scheduler", SDX4_ERR_MODEL, "timestep_spacing", NULL);

    fresh_copy();
    set_config("model_index.json", "_class_name", json_string("StableDiffusionPipeline"));
    expect_error("other pipeline", SDX4_ERR_MODEL, "model_index.json", "StableDiffusionPipeline");

    fresh_copy();
    set_config("unet/config.json", "block_out_channels", json_pack("[i,i,i,i]", 32, 64, 64, 100));
    expect_error("config disagrees with weights", SDX4_ERR_MODEL, "unet", NULL);

    fresh_copy();
    sh("rm '%s/m/vae/diffusion_pytorch_model.safetensors'", root);
    expect_error("missing weights file", SDX4_ERR_MODEL, "vae/diffusion_pytorch_model.safetensors", "missing");

    fresh_copy();
    sh("rm '%s/m/tokenizer/vocab.json'", root);
    expect_error("missing vocabulary", SDX4_ERR_MODEL, "vocab.json", NULL);

    fresh_copy();
    sh("rm '%s/m/model_index.json'", root);
    expect_error("not a model folder", SDX4_ERR_MODEL, "model_index.json", "missing");

    sh("rm -rf '%s'", root);
    return test_finish("test_bad_model");
}
