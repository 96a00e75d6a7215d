/*
 * make_model.c - sdx4_make_model(): a random-weight model folder from a
 * folder of configs, for measuring speed and memory without the real
 * weights (and as the demo model of a fresh checkout).
 *
 * The tensor list comes from building the model in spec mode (weights.h),
 * so the files hold exactly the names and shapes the loader asks for; the
 * VAE's encoder, which the upscaler never runs, is not written. Values are
 * uniform with the variance of PyTorch's default init (fan-in scaled), norm
 * scales near 1 and small biases, so activations stay finite at full size.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/error.h"
#include "core/safetensors.h"
#include "model/model.h"
#include "tools/convert.h"
#include "sdx4.h"

static const char *config_files[] = {
    "model_index.json", "text_encoder/config.json", "unet/config.json", "vae/config.json",
    "scheduler/scheduler_config.json", "low_res_scheduler/scheduler_config.json"};
static const char *tokenizer_files[] = {"vocab.json", "merges.txt", "tokenizer_config.json",
                                        "special_tokens_map.json"};

/* Creates one folder; one that exists already is fine, a file is not. */
static int make_dir(const char *path) {
    struct stat st;
    if (mkdir(path, 0755) == 0) return 0;
    if (errno != EEXIST) {
        sdx4_set_error(SDX4_ERR_IO, "%s: %s", path, strerror(errno));
        return -1;
    }
    if (stat(path, &st) || !S_ISDIR(st.st_mode)) {
        sdx4_set_error(SDX4_ERR_IO, "%s: exists and is not a folder", path);
        return -1;
    }
    return 0;
}

/* mkdir -p: the output folder and every missing parent, as any tool that
 * is given a path to write makes it (a container build writes to
 * /opt/sdx4/demo before /opt/sdx4 exists). */
int sdx4_make_dirs(const char *path) {
    char buf[4096];
    size_t len = strlen(path);
    if (len == 0 || len >= sizeof buf) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "output folder: %s", len ? "path too long" : "empty path");
        return -1;
    }
    memcpy(buf, path, len + 1);
    for (char *p = buf + 1; p < buf + len; p++) {
        if (*p != '/') continue;
        *p = '\0';
        int rc = make_dir(buf);
        *p = '/';
        if (rc) return -1;
    }
    return make_dir(buf);
}

/* Creates dir/a/b for "a/b/file" (the parent folders of a relative file). */
static int make_parents(const char *dir, const char *rel) {
    const char *slash = strrchr(rel, '/');
    if (!slash) return 0;
    char path[4096];
    snprintf(path, sizeof path, "%s/%.*s", dir, (int)(slash - rel), rel);
    return sdx4_make_dirs(path);
}

static int copy_file(const char *from_dir, const char *to_dir, const char *rel) {
    char src[4096], dst[4096], buf[65536];
    snprintf(src, sizeof src, "%s/%s", from_dir, rel);
    snprintf(dst, sizeof dst, "%s/%s", to_dir, rel);
    if (make_parents(to_dir, rel)) return -1;
    FILE *in = fopen(src, "rb"), *out = in ? fopen(dst, "wb") : NULL;
    int ok = in && out;
    size_t n;
    while (ok && (n = fread(buf, 1, sizeof buf, in)) > 0) ok = fwrite(buf, 1, n, out) == n;
    if (in) fclose(in);
    if (out && fclose(out)) ok = 0;
    if (!ok) sdx4_set_error(SDX4_ERR_IO, "copying %s to %s: %s", src, dst, strerror(errno));
    return ok ? 0 : -1;
}

typedef struct {
    const weight_source *ws;
    dtype type;
    uint64_t seed;
} fill_ctx;

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && !strcmp(s + a - b, suffix);
}

static int fill(void *user, int index, void *buf, size_t nbytes) {
    const fill_ctx *c = user;
    const weight_spec *w = &c->ws->specs[index];
    uint64_t state = c->seed * 1000003u + (uint64_t)index;
    size_t n = nbytes / dtype_size(c->type);
    int64_t fan_in = 1;
    for (int i = 1; i < w->ndim; i++) fan_in *= w->shape[i];
    int is_norm_scale = w->ndim == 1 && ends_with(w->name, ".weight");
    int is_embedding = strstr(w->name, "embedding.weight") != NULL;
    /* uniform(-a, a) has variance a^2 / 3 */
    float center = is_norm_scale ? 1.0f : 0.0f;
    float a = w->ndim == 1 ? 0.02f : is_embedding ? 0.05f : sqrtf(3.0f / (float)fan_in);
    for (size_t i = 0; i < n; i++) {
        float u = (float)(splitmix(&state) >> 40) * (1.0f / 16777216.0f); /* [0, 1) */
        float v = center + a * (2.0f * u - 1.0f);
        if (c->type == DTYPE_F16) ((uint16_t *)buf)[i] = f32_to_f16(v);
        else ((float *)buf)[i] = v;
    }
    return 0;
}

static int write_weights(const weight_source *ws, const char *out_dir, const char *component,
                         const char *stem, dtype type, uint64_t seed) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s/%s%s.safetensors", out_dir, component, stem,
             type == DTYPE_F16 ? ".fp16" : "");
    st_entry *e = calloc(ws->nspecs, sizeof *e);
    if (!e) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        return -1;
    }
    for (int i = 0; i < ws->nspecs; i++) {
        e[i].name = ws->specs[i].name;
        e[i].type = type;
        e[i].ndim = ws->specs[i].ndim;
        memcpy(e[i].shape, ws->specs[i].shape, sizeof ws->specs[i].shape);
    }
    fill_ctx c = {ws, type, seed};
    int rc = sdx4_st_write(path, e, ws->nspecs, "{\"format\":\"pt\"}", fill, &c);
    free(e);
    return rc;
}

sdx4_status sdx4_make_model(const char *config_dir, const char *out_dir, const char *dtype_name_,
                            uint64_t seed) {
    sdx4_error_clear();
    dtype type;
    if (!dtype_name_ || !strcmp(dtype_name_, "fp32")) type = DTYPE_F32;
    else if (!strcmp(dtype_name_, "fp16")) type = DTYPE_F16;
    else {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "dtype %s: expected fp16 or fp32", dtype_name_);
        return SDX4_ERR_INVALID_ARGUMENT;
    }
    model m;
    if (sdx4_model_spec(&m, config_dir)) {
        sdx4_error_prefix("%s", config_dir);
        return sdx4_error_status();
    }
    int rc = sdx4_make_dirs(out_dir);
    for (size_t i = 0; !rc && i < sizeof config_files / sizeof *config_files; i++)
        rc = copy_file(config_dir, out_dir, config_files[i]);
    char tok_src[4096], tok_dir[4096];
    snprintf(tok_src, sizeof tok_src, "%s/tokenizer/vocab.json", config_dir);
    snprintf(tok_dir, sizeof tok_dir, "%s/tokenizer", out_dir);
    if (!rc && access(tok_src, R_OK) == 0) {
        for (size_t i = 0; !rc && i < sizeof tokenizer_files / sizeof *tokenizer_files; i++) {
            char rel[128];
            snprintf(rel, sizeof rel, "tokenizer/%s", tokenizer_files[i]);
            snprintf(tok_src, sizeof tok_src, "%s/%s", config_dir, rel);
            if (access(tok_src, R_OK) == 0) rc = copy_file(config_dir, out_dir, rel);
        }
    } else if (!rc) {
        int vocab;
        rc = make_dir(tok_dir) || sdx4_tokenizer_write_byte_level(tok_dir, &vocab);
    }
    rc = rc || write_weights(&m.te_ws, out_dir, "text_encoder", "model", type, seed) ||
         write_weights(&m.unet_ws, out_dir, "unet", "diffusion_pytorch_model", type, seed + 1) ||
         write_weights(&m.vae_ws, out_dir, "vae", "diffusion_pytorch_model", type, seed + 2);
    if (!rc) { /* the marker the server and CLI read: this model paints noise */
        char path[4096];
        snprintf(path, sizeof path, "%s/DEMO_MODEL", out_dir);
        FILE *f = fopen(path, "w");
        rc = !f || fprintf(f, "Random weights written by sdx4 make-model from %s (seed %llu): "
                              "its output is noise.\n", config_dir, (unsigned long long)seed) < 0;
        if (f && fclose(f)) rc = 1;
        if (rc) sdx4_set_error(SDX4_ERR_IO, "%s: %s", path, strerror(errno));
    }
    sdx4_model_free(&m);
    return rc ? (sdx4_error_status() ? sdx4_error_status() : SDX4_ERR_IO) : SDX4_OK;
}
