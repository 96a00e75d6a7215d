/* weights.c - named, shape-checked parameters from safetensors (weights.h). */
#include "model/weights.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/error.h"

static int file_exists(const char *path) { return access(path, R_OK) == 0; }

int sdx4_weights_open(weight_source *ws, backend *be, const char *dir,
                 const char *component, const char *stem, const char *variant) {
    memset(ws, 0, sizeof *ws);
    ws->be = be;
    ws->prefix = "";
    char path[4096], plain[4096];
    snprintf(plain, sizeof plain, "%s/%s/%s.safetensors", dir, component, stem);
    if (variant && *variant) {
        snprintf(path, sizeof path, "%s/%s/%s.%s.safetensors", dir, component, stem, variant);
        if (!file_exists(path)) snprintf(path, sizeof path, "%s", plain);
    } else {
        snprintf(path, sizeof path, "%s", plain);
        if (!file_exists(path)) { /* only a variant present: take fp16 */
            snprintf(path, sizeof path, "%s/%s/%s.fp16.safetensors", dir, component, stem);
            if (!file_exists(path)) snprintf(path, sizeof path, "%s", plain);
        }
    }
    const char *base = strrchr(path, '/');
    char label[512];
    snprintf(label, sizeof label, "%s/%s", component, base ? base + 1 : path);
    if (!file_exists(path)) {
        snprintf(ws->label, sizeof ws->label, "%s", label);
        sdx4_set_error(SDX4_ERR_MODEL, "%s: missing (looked in %s)", ws->label, dir);
        return -1;
    }
    return sdx4_weights_open_file(ws, be, path, label);
}

int sdx4_weights_open_file(weight_source *ws, backend *be, const char *path, const char *label) {
    memset(ws, 0, sizeof *ws);
    ws->be = be;
    ws->prefix = "";
    snprintf(ws->label, sizeof ws->label, "%s", label);
    if (!file_exists(path)) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: missing", path);
        return -1;
    }
    snprintf(ws->path, sizeof ws->path, "%s", path);
    if (sdx4_st_open_header(&ws->file, path, ws->label)) return -1;
    ws->file_dtype = ws->file.count ? ws->file.tensors[0].type : DTYPE_F32;
    return 0;
}

void sdx4_weights_spec_init(weight_source *ws) {
    memset(ws, 0, sizeof *ws);
    ws->spec = 1;
    ws->prefix = "";
}

void sdx4_weights_finish(weight_source *ws) { sdx4_st_close(&ws->file); }

void sdx4_weights_close(weight_source *ws) {
    for (int i = 0; i < ws->nowned; i++) {
        tensor_free(ws->owned[i].t);
        free(ws->owned[i].bytes); /* after the tensor that viewed them */
    }
    free(ws->owned);
    sdx4_st_close(&ws->file);
    for (int i = 0; i < ws->nspecs; i++) free(ws->specs[i].name);
    free(ws->specs);
    memset(ws, 0, sizeof *ws);
}

static void sdx4_shape_str(char *buf, size_t n, int ndim, const int64_t *shape) {
    size_t o = (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < ndim && o < n; i++)
        o += (size_t)snprintf(buf + o, n - o, "%s%lld", i ? "," : "", (long long)shape[i]);
    if (o < n) snprintf(buf + o, n - o, "]");
}

int sdx4_weight_exists(const weight_source *ws, const char *name) {
    char full[512];
    snprintf(full, sizeof full, "%s%s", ws->prefix, name);
    return sdx4_st_find(&ws->file, full) != NULL;
}

tensor *sdx4_weight_get(weight_source *ws, int ndim, const int64_t *shape, const char *fmt, ...) {
    char name[512], full[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    snprintf(full, sizeof full, "%s%s", ws->prefix, name);
    int64_t numel = 1;
    for (int i = 0; i < ndim; i++) numel *= shape[i];

    if (ws->spec) {
        if (ws->nspecs == ws->cap) {
            int cap = ws->cap ? 2 * ws->cap : 256;
            weight_spec *s = realloc(ws->specs, cap * sizeof *s);
            if (!s) {
                sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
                return NULL;
            }
            ws->specs = s;
            ws->cap = cap;
        }
        weight_spec *s = &ws->specs[ws->nspecs++];
        s->name = strdup(full);
        s->ndim = ndim;
        memcpy(s->shape, shape, ndim * sizeof *shape);
        ws->params += numel;
        return &ws->placeholder;
    }

    const st_tensor *t = sdx4_st_find(&ws->file, full);
    if (!t) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: tensor %s is missing", ws->label, full);
        return NULL;
    }
    int same = t->ndim == ndim;
    for (int i = 0; same && i < ndim; i++) same = t->shape[i] == shape[i];
    if (!same) {
        char want[128], got[128];
        sdx4_shape_str(want, sizeof want, ndim, shape);
        sdx4_shape_str(got, sizeof got, t->ndim, t->shape);
        sdx4_set_error(SDX4_ERR_MODEL, "%s: tensor %s has shape %s, the config implies %s", ws->label,
                  full, got, want);
        return NULL;
    }
    if (!dtype_is_float(t->type)) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: tensor %s has dtype %s, expected F32, F16 or BF16",
                  ws->label, full, dtype_name(t->type));
        return NULL;
    }
    void *bytes = NULL; /* 64-byte aligned, as the CPU backend's own tensors */
    if (posix_memalign(&bytes, 64, t->nbytes ? t->nbytes : 64)) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: tensor %s: out of memory for %zu bytes", ws->label,
                  full, t->nbytes);
        return NULL;
    }
    if (sdx4_st_read(&ws->file, t, bytes)) {
        free(bytes);
        return NULL;
    }
    tensor *w = ws->be->weight(ws->be, bytes, t->type, ndim, shape);
    if (!w) {
        free(bytes);
        sdx4_error_prefix("%s: tensor %s", ws->label, full);
        return NULL;
    }
    if (w->data != bytes) { /* converted or uploaded: the file's bytes are done with */
        free(bytes);
        bytes = NULL;
    }
    if (ws->nowned == ws->owned_cap) {
        int cap = ws->owned_cap ? 2 * ws->owned_cap : 256;
        struct served_weight *o = realloc(ws->owned, cap * sizeof *o);
        if (!o) {
            tensor_free(w);
            free(bytes);
            sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
            return NULL;
        }
        ws->owned = o;
        ws->owned_cap = cap;
    }
    ws->owned[ws->nowned++] = (struct served_weight){w, bytes};
    ws->params += numel;
    return w;
}
