/*
 * state_dict.c - the state dict an importer builds (tools/convert.h): named
 * tensors in the order they were added, each owning a copy of its data.
 *
 * A name may appear once: an importer that emitted one twice has misread
 * its file, and a safetensors file cannot hold both. Lookups are linear;
 * the largest ESRGAN has ~700 tensors, and a conversion looks each up once.
 */
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "tools/convert.h"

int sdx4_state_dict_add(state_dict *sd, const char *name, dtype type, int ndim,
                        const int64_t *shape, const void *data) {
    if (type != DTYPE_F32 && type != DTYPE_F16) {
        sdx4_set_error(SDX4_ERR_MODEL, "tensor %s: dtype %s (F32 or F16 expected)", name,
                       dtype_name(type));
        return -1;
    }
    if (ndim < 1 || ndim > 4) {
        sdx4_set_error(SDX4_ERR_MODEL, "tensor %s: %d dimensions (1 to 4 expected)", name, ndim);
        return -1;
    }
    if (sdx4_state_dict_find(sd, name)) {
        sdx4_set_error(SDX4_ERR_MODEL, "tensor %s: given twice", name);
        return -1;
    }
    size_t nbytes = dtype_size(type);
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 1 || (uint64_t)shape[i] > SIZE_MAX / 2 / nbytes) {
            sdx4_set_error(SDX4_ERR_MODEL, "tensor %s: dimension %d is %lld", name, i,
                           (long long)shape[i]);
            return -1;
        }
        nbytes *= (size_t)shape[i];
    }
    if (sd->n == sd->cap) {
        int cap = sd->cap ? 2 * sd->cap : 64;
        sd_tensor *t = realloc(sd->t, (size_t)cap * sizeof *t);
        if (!t) goto oom;
        sd->t = t;
        sd->cap = cap;
    }
    sd_tensor *t = &sd->t[sd->n];
    memset(t, 0, sizeof *t);
    t->name = strdup(name);
    t->data = malloc(nbytes);
    if (!t->name || !t->data) {
        free(t->name);
        free(t->data);
        goto oom;
    }
    memcpy(t->data, data, nbytes);
    t->type = type;
    t->ndim = ndim;
    memcpy(t->shape, shape, (size_t)ndim * sizeof *shape);
    t->nbytes = nbytes;
    sd->n++;
    return 0;
oom:
    sdx4_set_error(SDX4_ERR_NO_MEMORY, "tensor %s: out of memory", name);
    return -1;
}

const sd_tensor *sdx4_state_dict_find(const state_dict *sd, const char *name) {
    for (int i = 0; i < sd->n; i++)
        if (!strcmp(sd->t[i].name, name)) return &sd->t[i];
    return NULL;
}

void sdx4_state_dict_free(state_dict *sd) {
    for (int i = 0; i < sd->n; i++) {
        free(sd->t[i].name);
        free(sd->t[i].data);
    }
    free(sd->t);
    memset(sd, 0, sizeof *sd);
}
