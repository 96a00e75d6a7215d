/*
 * safetensors.c - mmap reader and streaming writer (see safetensors.h).
 *
 * The header is parsed with jansson. Validation rejects: a header length
 * past the end of the file, non-object JSON, unknown dtypes, negative or
 * overflowing shapes, offsets out of range or disagreeing with the shape,
 * and overlapping tensors.
 */
#include "core/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/error.h"

#define MAX_HEADER (100u << 20) /* the format's own limit is 100 MB */

static int parse_dtype(const char *s, dtype *out) {
    for (int t = 0; t < DTYPE_COUNT; t++)
        if (!strcmp(s, dtype_name((dtype)t))) {
            *out = (dtype)t;
            return 0;
        }
    return -1;
}

static int by_offset(const void *a, const void *b) {
    const st_tensor *x = a, *y = b;
    return x->data < y->data ? -1 : x->data > y->data;
}

/* Fills t from one header entry; `data` is the start of the byte buffer. */
static int parse_entry(st_tensor *t, const char *name, json_t *v,
                       const unsigned char *data, size_t data_size) {
    json_t *jd = json_object_get(v, "dtype"), *js = json_object_get(v, "shape");
    json_t *jo = json_object_get(v, "data_offsets");
    if (!json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) ||
        json_array_size(jo) != 2) {
        set_error(SDX4_ERR_MODEL, "tensor %s: header entry needs dtype, shape and data_offsets", name);
        return -1;
    }
    if (parse_dtype(json_string_value(jd), &t->type)) {
        set_error(SDX4_ERR_MODEL, "tensor %s: dtype %s is not a safetensors dtype",
                  name, json_string_value(jd));
        return -1;
    }
    size_t nd = json_array_size(js);
    if (nd > ST_MAX_DIMS) {
        set_error(SDX4_ERR_MODEL, "tensor %s: %zu dimensions", name, nd);
        return -1;
    }
    uint64_t numel = 1;
    t->ndim = (int)nd;
    for (size_t i = 0; i < nd; i++) {
        json_t *d = json_array_get(js, i);
        if (!json_is_integer(d) || json_integer_value(d) < 0 ||
            json_integer_value(d) > (1ll << 40)) {
            set_error(SDX4_ERR_MODEL, "tensor %s: bad shape", name);
            return -1;
        }
        t->shape[i] = json_integer_value(d);
        numel *= (uint64_t)t->shape[i];
        if (numel > (1ull << 40)) {
            set_error(SDX4_ERR_MODEL, "tensor %s: shape too large", name);
            return -1;
        }
    }
    json_t *b = json_array_get(jo, 0), *e = json_array_get(jo, 1);
    if (!json_is_integer(b) || !json_is_integer(e) || json_integer_value(b) < 0 ||
        json_integer_value(e) < json_integer_value(b) ||
        (uint64_t)json_integer_value(e) > data_size) {
        set_error(SDX4_ERR_MODEL, "tensor %s: data_offsets out of range (file truncated?)", name);
        return -1;
    }
    t->nbytes = (size_t)(json_integer_value(e) - json_integer_value(b));
    if (t->nbytes != numel * dtype_size(t->type)) {
        set_error(SDX4_ERR_MODEL, "tensor %s: %zu bytes for %llu elements of %s", name,
                  t->nbytes, (unsigned long long)numel, dtype_name(t->type));
        return -1;
    }
    t->data = data + json_integer_value(b);
    t->name = strdup(name);
    return t->name ? 0 : -1;
}

int st_parse(st_file *f, const void *buf, size_t size, const char *label) {
    memset(f, 0, sizeof *f);
    f->path = strdup(label);
    const unsigned char *p = buf;
    if (size < 8) {
        set_error(SDX4_ERR_MODEL, "%s: too short for a safetensors file", label);
        goto fail;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | p[i];
    if (hlen > MAX_HEADER || hlen > size - 8) {
        set_error(SDX4_ERR_MODEL, "%s: header length %llu exceeds the file (truncated?)",
                  label, (unsigned long long)hlen);
        goto fail;
    }
    json_error_t jerr;
    json_t *root = json_loadb((const char *)p + 8, hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!json_is_object(root)) {
        set_error(SDX4_ERR_MODEL, "%s: header is not a JSON object (%s)", label, jerr.text);
        json_decref(root);
        goto fail;
    }
    const unsigned char *data = p + 8 + hlen;
    size_t data_size = size - 8 - hlen;
    f->tensors = calloc(json_object_size(root) + 1, sizeof *f->tensors);
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (!strcmp(key, "__metadata__")) {
            f->metadata_json = json_dumps(v, JSON_COMPACT);
            continue;
        }
        if (!json_is_object(v) || parse_entry(&f->tensors[f->count], key, v, data, data_size)) {
            if (!json_is_object(v)) set_error(SDX4_ERR_MODEL, "tensor %s: not an object", key);
            error_prefix("%s", label);
            json_decref(root);
            goto fail;
        }
        f->count++;
    }
    json_decref(root);
    /* overlapping tensors mean a corrupt or hostile header */
    st_tensor *sorted = malloc((f->count + 1) * sizeof *sorted);
    memcpy(sorted, f->tensors, f->count * sizeof *sorted);
    qsort(sorted, f->count, sizeof *sorted, by_offset);
    for (int i = 1; i < f->count; i++) {
        const unsigned char *end = (const unsigned char *)sorted[i - 1].data + sorted[i - 1].nbytes;
        if ((const unsigned char *)sorted[i].data < end) {
            set_error(SDX4_ERR_MODEL, "%s: tensors %s and %s overlap", label,
                      sorted[i - 1].name, sorted[i].name);
            free(sorted);
            goto fail;
        }
    }
    free(sorted);
    return 0;
fail:
    st_close(f);
    return -1;
}

int st_open(st_file *f, const char *path) { return st_open_as(f, path, path); }

int st_open_as(st_file *f, const char *path, const char *label) {
    memset(f, 0, sizeof *f);
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        set_error(SDX4_ERR_IO, "%s: %s", path, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) || !S_ISREG(st.st_mode)) {
        set_error(SDX4_ERR_IO, "%s: not a regular file", path);
        close(fd);
        return -1;
    }
    size_t size = (size_t)st.st_size;
    void *map = size ? mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0) : NULL;
    close(fd);
    if (size && map == MAP_FAILED) {
        set_error(SDX4_ERR_IO, "%s: mmap: %s", path, strerror(errno));
        return -1;
    }
    if (st_parse(f, map, size, label)) {
        if (map) munmap(map, size);
        return -1;
    }
    f->map = map;
    f->map_size = size;
    free(f->path); /* errors named the label; the path is what callers read */
    f->path = strdup(path);
    return 0;
}

void st_close(st_file *f) {
    for (int i = 0; i < f->count; i++) free(f->tensors[i].name);
    free(f->tensors);
    free(f->metadata_json);
    free(f->path);
    if (f->map) munmap(f->map, f->map_size);
    memset(f, 0, sizeof *f);
}

const st_tensor *st_find(const st_file *f, const char *name) {
    for (int i = 0; i < f->count; i++)
        if (!strcmp(f->tensors[i].name, name)) return &f->tensors[i];
    return NULL;
}

char *st_metadata(const st_file *f, const char *key) {
    if (!f->metadata_json) return NULL;
    json_t *m = json_loads(f->metadata_json, 0, NULL);
    json_t *v = json_object_get(m, key);
    char *out = json_is_string(v) ? strdup(json_string_value(v)) : NULL;
    json_decref(m);
    return out;
}

int st_write(const char *path, const st_entry *entries, int count,
             const char *metadata_json, st_fill_fn fill, void *user) {
    error_clear();
    json_t *h = json_object();
    if (metadata_json) {
        json_t *m = json_loads(metadata_json, 0, NULL);
        if (m) json_object_set_new(h, "__metadata__", m);
    }
    uint64_t off = 0;
    for (int i = 0; i < count; i++) {
        const st_entry *e = &entries[i];
        uint64_t n = dtype_size(e->type);
        json_t *shape = json_array();
        for (int d = 0; d < e->ndim; d++) {
            json_array_append_new(shape, json_integer(e->shape[d]));
            n *= (uint64_t)e->shape[d];
        }
        json_object_set_new(h, e->name,
                            json_pack("{s:s, s:o, s:[I,I]}", "dtype", dtype_name(e->type),
                                      "shape", shape, "data_offsets", (json_int_t)off,
                                      (json_int_t)(off + n)));
        off += n;
    }
    char *text = json_dumps(h, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(h);
    size_t tlen = strlen(text), padded = (tlen + 7) & ~(size_t)7; /* keep data 8-aligned */
    FILE *fp = fopen(path, "wb");
    if (!fp) {
        set_error(SDX4_ERR_IO, "%s: %s", path, strerror(errno));
        free(text);
        return -1;
    }
    unsigned char len[8];
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    int ok = fwrite(len, 8, 1, fp) == 1 && fwrite(text, tlen, 1, fp) == 1;
    for (size_t i = tlen; ok && i < padded; i++) ok = fputc(' ', fp) != EOF;
    free(text);
    void *buf = NULL;
    size_t cap = 0;
    for (int i = 0; ok && i < count; i++) {
        size_t n = dtype_size(entries[i].type);
        for (int d = 0; d < entries[i].ndim; d++) n *= (size_t)entries[i].shape[d];
        if (n > cap) {
            free(buf);
            buf = malloc(cap = n);
            if (!buf) ok = 0;
        }
        ok = ok && fill(user, i, buf, n) == 0 && (n == 0 || fwrite(buf, n, 1, fp) == 1);
    }
    free(buf);
    if (fclose(fp) != 0) ok = 0;
    if (!ok) {
        if (error_status() == SDX4_OK) set_error(SDX4_ERR_IO, "%s: write failed", path);
        remove(path);
        return -1;
    }
    return 0;
}
