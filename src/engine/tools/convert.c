/*
 * convert.c - sdx4_convert(): a GAN upscaler from PyTorch's or ncnn's files
 * into sdx4's model folder (convert.h).
 *
 * PyTorch's checkpoints are pickles, which run code when loaded: sdx4
 * reads none, and takes a state dict saved as safetensors instead (the
 * refusal says how to make one). Its names are BasicSR's once a training
 * wrapper's prefix is gone ("params_ema." is the one Real-ESRGAN's
 * releases hold; "params." and "module." the others); the original
 * ESRGAN's names ("model.1.sub.0.RDB1.conv1.0.weight") are renamed to
 * them. The architecture and its sizes are read from the names and shapes,
 * as spandrel does; then the state dict must hold exactly the tensors the
 * loader will ask for (esrgan.c's spec mode), with their shapes, before
 * anything is written.
 */
#include "tools/convert.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/error.h"
#include "core/safetensors.h"
#include "sdx4.h"

#define MODEL_ERROR(...) (sdx4_set_error(SDX4_ERR_MODEL, __VA_ARGS__), -1)

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && !strcmp(s + n - k, suffix);
}

/* ------------------------------------------------------------- PyTorch */

/* The original ESRGAN's name of a tensor as BasicSR's, into out; 0 when
 * `name` is not one of them. */
static int esrgan_legacy_name(const char *name, int blocks, char *out, size_t size) {
    int b, r, c, n = 0;
    char param[16];
    if (sscanf(name, "model.1.sub.%d.RDB%d.conv%d.0.%15[a-z]%n", &b, &r, &c, param, &n) == 4 && !name[n])
        return snprintf(out, size, "body.%d.rdb%d.conv%d.%s", b, r, c, param), 1;
    if (sscanf(name, "model.1.sub.%d.%15[a-z]%n", &b, param, &n) == 2 && !name[n] && b == blocks)
        return snprintf(out, size, "conv_body.%s", param), 1;
    static const struct { int index; const char *name; } layers[] = {
        {0, "conv_first"}, {3, "conv_up1"}, {6, "conv_up2"}, {8, "conv_hr"}, {10, "conv_last"}};
    if (sscanf(name, "model.%d.%15[a-z]%n", &b, param, &n) == 2 && !name[n])
        for (size_t i = 0; i < sizeof layers / sizeof layers[0]; i++)
            if (layers[i].index == b) return snprintf(out, size, "%s.%s", layers[i].name, param), 1;
    return 0;
}

/* The blocks of an original ESRGAN state dict: model.1.sub.<N> holds
 * conv_body after the N blocks. */
static int legacy_blocks(const st_file *f) {
    int blocks = 0, b, n;
    for (int i = 0; i < f->count; i++)
        if ((n = 0), sscanf(f->tensors[i].name, "model.1.sub.%d.RDB%n", &b, &n) == 1 && n > 0 && b + 1 > blocks)
            blocks = b + 1;
    return blocks;
}

/* The prefix to strip: "params_ema." when present (the weights
 * Real-ESRGAN's releases use), else "params." or "module.", else none. */
static const char *wrapper_prefix(const st_file *f) {
    static const char *const prefixes[] = {"params_ema.", "params.", "module."};
    for (size_t p = 0; p < sizeof prefixes / sizeof prefixes[0]; p++)
        for (int i = 0; i < f->count; i++)
            if (!strncmp(f->tensors[i].name, prefixes[p], strlen(prefixes[p]))) return prefixes[p];
    return "";
}

static int load_safetensors(const char *path, state_dict *sd) {
    st_file f;
    if (sdx4_st_open(&f, path)) return -1;
    const char *prefix = wrapper_prefix(&f);
    size_t plen = strlen(prefix);
    int blocks = legacy_blocks(&f), rc = 0;
    for (int i = 0; i < f.count && !rc; i++) {
        const st_tensor *t = &f.tensors[i];
        if (plen && strncmp(t->name, prefix, plen)) continue; /* another wrapper's copy */
        const char *name = t->name + plen;
        char renamed[256];
        if (blocks && esrgan_legacy_name(name, blocks, renamed, sizeof renamed)) name = renamed;
        if (t->type != DTYPE_F32 && t->type != DTYPE_F16)
            rc = MODEL_ERROR("%s: tensor %s has dtype %s, expected F32 or F16", path, t->name, dtype_name(t->type));
        else if (t->ndim < 1 || t->ndim > 4)
            rc = MODEL_ERROR("%s: tensor %s has %d dimensions", path, t->name, t->ndim);
        else
            rc = sdx4_state_dict_add(sd, name, t->type, t->ndim, t->shape, t->data);
    }
    sdx4_st_close(&f);
    return rc;
}

/* The shape of `name` in sd, or NULL. */
static const int64_t *shape_of(const state_dict *sd, const char *name) {
    const sd_tensor *t = sdx4_state_dict_find(sd, name);
    return t ? t->shape : NULL;
}

/* The architecture and its sizes from the names and shapes (3 channels in
 * and out, as sdx4 upscales RGB). */
static int infer_config(const state_dict *sd, const char *label, gan_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    cfg->num_in_ch = cfg->num_out_ch = 3;
    const int64_t *first = shape_of(sd, "conv_first.weight"), *s;
    char name[64];
    if (first) {
        cfg->arch = ESRGAN_RRDBNET;
        cfg->num_feat = (int)first[0];
        cfg->scale = first[1] == 3 ? 4 : first[1] == 12 ? 2 : first[1] == 48 ? 1 : 0;
        if (!cfg->scale)
            return MODEL_ERROR("%s: conv_first takes %lld channels: not 3, 12 or 48 (scale 4, 2 or 1 of RGB)",
                               label, (long long)first[1]);
        if (shape_of(sd, "conv_up3.weight"))
            return MODEL_ERROR("%s: conv_up3: RRDBNet at scale 8 is not supported (1, 2 or 4)", label);
        while (snprintf(name, sizeof name, "body.%d.rdb1.conv1.weight", cfg->num_block), shape_of(sd, name))
            cfg->num_block++;
        if (!(s = shape_of(sd, "body.0.rdb1.conv1.weight")))
            return MODEL_ERROR("%s: conv_first but no body.0.rdb1.conv1: not an RRDBNet", label);
        cfg->num_grow_ch = (int)s[0];
        return 0;
    }
    if (!(s = shape_of(sd, "body.0.weight")) || s[1] != 3)
        return MODEL_ERROR("%s: neither conv_first (RRDBNet) nor body.0 taking RGB (SRVGGNetCompact): not a "
                           "model of the ESRGAN family", label);
    cfg->arch = ESRGAN_SRVGG;
    cfg->num_feat = (int)s[0];
    int last = 0; /* the index of the last convolution: 2 * (num_conv + 1) */
    while (snprintf(name, sizeof name, "body.%d.weight", last + 2), (s = shape_of(sd, name)) && s[1] == cfg->num_feat)
        last += 2;
    snprintf(name, sizeof name, "body.%d.weight", last);
    s = shape_of(sd, name);
    if (last < 2 || !s || s[0] % 3)
        return MODEL_ERROR("%s: SRVGGNetCompact without its last convolution", label);
    cfg->num_conv = last / 2 - 1;
    for (cfg->scale = 1; cfg->scale * cfg->scale * 3 < s[0]; cfg->scale++) {}
    if (cfg->scale * cfg->scale * 3 != s[0])
        return MODEL_ERROR("%s: %s has %lld outputs, not 3 x a square", label, name, (long long)s[0]);
    if (!shape_of(sd, "body.1.weight"))
        return MODEL_ERROR("%s: SRVGGNetCompact without PReLU weights: its act_type (relu or leakyrelu) "
                           "cannot be told from the weights; write config.json by hand", label);
    cfg->act = GAN_ACT_PRELU;
    return 0;
}

/* ---------------------------------------------------------------- write */

/* The spec's tensors, all of them and nothing else, with their shapes. */
static int check_against_spec(const state_dict *sd, const weight_source *spec, const char *label) {
    for (int i = 0; i < spec->nspecs; i++) {
        const weight_spec *w = &spec->specs[i];
        const sd_tensor *t = sdx4_state_dict_find(sd, w->name);
        if (!t) return MODEL_ERROR("%s: tensor %s is missing", label, w->name);
        int same = t->ndim == w->ndim;
        for (int d = 0; same && d < w->ndim; d++) same = t->shape[d] == w->shape[d];
        if (!same) return MODEL_ERROR("%s: tensor %s has another shape than the architecture implies", label, w->name);
    }
    if (sd->n != spec->nspecs) {
        for (int i = 0; i < sd->n; i++) {
            int known = 0;
            for (int k = 0; k < spec->nspecs && !known; k++) known = !strcmp(spec->specs[k].name, sd->t[i].name);
            if (!known)
                return MODEL_ERROR("%s: tensor %s is not part of %s", label, sd->t[i].name,
                                   spec->nspecs ? "the architecture" : "it");
        }
        return MODEL_ERROR("%s: a tensor appears twice", label);
    }
    return 0;
}

typedef struct {
    const state_dict *sd;
    const weight_source *spec;
} fill_ctx;

static int fill(void *user, int index, void *buf, size_t nbytes) {
    const fill_ctx *c = user;
    const sd_tensor *t = sdx4_state_dict_find(c->sd, c->spec->specs[index].name);
    memcpy(buf, t->data, nbytes);
    return 0;
}

static int write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f || fputs(text, f) < 0 || fclose(f)) {
        if (f) fclose(f);
        return MODEL_ERROR("%s: cannot write: %s", path, strerror(errno));
    }
    return 0;
}

static int moved(const char *from, const char *to) {
    return rename(from, to) ? MODEL_ERROR("%s: cannot write: %s", to, strerror(errno)) : 0;
}

/* The folder: config.json and model.safetensors, each written under a
 * temporary name and renamed, so that a folder is whole or absent. */
static int write_folder(const char *dir, const gan_config *cfg, const state_dict *sd, const weight_source *spec,
                        const char *source) {
    if (sdx4_make_dirs(dir)) return -1;
    st_entry *e = calloc(spec->nspecs ? spec->nspecs : 1, sizeof *e);
    char *json = sdx4_gan_config_json(cfg), meta[1024], tmp[4096], path[4096];
    int rc = -1;
    if (!e || !json) {
        if (!e) sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        goto done;
    }
    for (int i = 0; i < spec->nspecs; i++) {
        const sd_tensor *t = sdx4_state_dict_find(sd, spec->specs[i].name);
        e[i] = (st_entry){.name = t->name, .type = t->type, .ndim = t->ndim};
        memcpy(e[i].shape, t->shape, sizeof t->shape);
    }
    json_t *m = json_pack("{s:s, s:s}", "format", "pt", "source", source);
    char *mtext = m ? json_dumps(m, JSON_COMPACT) : NULL;
    snprintf(meta, sizeof meta, "%s", mtext ? mtext : "{\"format\":\"pt\"}");
    free(mtext);
    json_decref(m);
    fill_ctx ctx = {sd, spec};
    snprintf(tmp, sizeof tmp, "%s/model.safetensors.tmp", dir);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (sdx4_st_write(tmp, e, spec->nspecs, meta, fill, &ctx) || moved(tmp, path)) goto done;
    snprintf(tmp, sizeof tmp, "%s/config.json.tmp", dir);
    snprintf(path, sizeof path, "%s/config.json", dir);
    rc = write_text(tmp, json) || moved(tmp, path) ? -1 : 0;
done:
    if (rc) unlink(tmp);
    free(e);
    free(json);
    return rc;
}

sdx4_status sdx4_convert(int n, const char *const *inputs, const char *out_dir) {
    sdx4_error_clear();
    if (n < 1 || n > 2 || !out_dir || !*out_dir) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "convert: one .safetensors, or an ncnn .param and .bin, and a folder");
        return SDX4_ERR_INVALID_ARGUMENT;
    }
    const char *in = inputs[0];
    if (ends_with(in, ".pth") || ends_with(in, ".pt") || ends_with(in, ".ckpt")) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                       "%s is a PyTorch pickle, which sdx4 does not read (loading one runs its code). Save its "
                       "state dict as safetensors first, in a Python with torch and safetensors:\n"
                       "  python -c \"import torch, safetensors.torch as st; d = torch.load('%s', map_location='cpu', "
                       "weights_only=True); d = d.get('params_ema', d.get('params', d)); "
                       "st.save_file({k: v.contiguous() for k, v in d.items()}, 'model.safetensors')\"\n"
                       "then run sdx4 convert model.safetensors %s",
                       in, in, out_dir);
        return SDX4_ERR_INVALID_ARGUMENT;
    }
    int ncnn = n == 2 && ends_with(in, ".param") && ends_with(inputs[1], ".bin");
    if (n == 2 ? !ncnn : !ends_with(in, ".safetensors")) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                       "convert: expected a .safetensors state dict, or an ncnn .param and its .bin, not %s%s%s", in,
                       n == 2 ? " " : "", n == 2 ? inputs[1] : "");
        return SDX4_ERR_INVALID_ARGUMENT;
    }
    state_dict sd = {0};
    gan_config cfg;
    esrgan spec = {0};
    const char *base = strrchr(in, '/');
    base = base ? base + 1 : in;
    int rc = ncnn ? sdx4_ncnn_import(in, inputs[1], &cfg, &sd) : load_safetensors(in, &sd) || infer_config(&sd, in, &cfg);
    if (!rc) rc = sdx4_esrgan_spec(&spec, &cfg) || check_against_spec(&sd, &spec.ws, in) ||
                  write_folder(out_dir, &cfg, &sd, &spec.ws, base);
    sdx4_esrgan_free(&spec);
    sdx4_state_dict_free(&sd);
    return rc ? (sdx4_error_status() ? sdx4_error_status() : SDX4_ERR_MODEL) : SDX4_OK;
}
