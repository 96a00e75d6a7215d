/*
 * safetensors.c - reader and streaming writer (see safetensors.h).
 *
 * The header is parsed with jansson. Validation rejects: a header length
 * past the end of the file, non-object JSON, unknown dtypes, negative or
 * overflowing shapes, offsets out of range or disagreeing with the shape,
 * and overlapping tensors. The same checks run whether the whole file is
 * in memory (sdx4_st_parse, sdx4_st_open) or only its header (sdx4_st_open_header): a
 * tensor is described by its offset in the file, and points into memory
 * only when the file is there.
 */
#include "core/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/error.h"

#define MAX_HEADER (100u << 20) /* the format's own limit is 100 MB */
#define READ_CHUNK ((size_t)1 << 30) /* pread moves at most ~2 GB per call */

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
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* Where the tensor data lies: from file offset `start`, `size` bytes, in
 * memory at `base` + offset when the whole file is there (else NULL). */
typedef struct {
    uint64_t start;
    uint64_t size;
    const unsigned char *base;
} data_region;

/* Fills t from one header entry. */
static int parse_entry(st_tensor *t, const char *name, json_t *v, const data_region *d) {
    json_t *jd = json_object_get(v, "dtype"), *js = json_object_get(v, "shape");
    json_t *jo = json_object_get(v, "data_offsets");
    if (!json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) ||
        json_array_size(jo) != 2) {
        sdx4_set_error(SDX4_ERR_MODEL, "tensor %s: header entry needs dtype, shape and data_offsets", name);
        return -1;
    }
    if (parse_dtype(json_string_value(jd), &t->type)) {
        sdx4_set_error(SDX4_ERR_MODEL, "tensor %s: dtype %s is not a safetensors dtype",
                  name, json_string_value(jd));
        return -1;
    }
    size_t nd = json_array_size(js);
    if (nd > ST_MAX_DIMS) {
        sdx4_set_error(SDX4_ERR_MODEL, "tensor %s: %zu dimensions", name, nd);
        return -1;
    }
    uint64_t numel = 1;
    t->ndim = (int)nd;
    for (size_t i = 0; i < nd; i++) {
        json_t *dim = json_array_get(js, i);
        if (!json_is_integer(dim) || json_integer_value(dim) < 0 ||
            json_integer_value(dim) > (1ll << 40)) {
            sdx4_set_error(SDX4_ERR_MODEL, "tensor %s: bad shape", name);
            return -1;
        }
        t->shape[i] = json_integer_value(dim);
        numel *= (uint64_t)t->shape[i];
        if (numel > (1ull << 40)) {
            sdx4_set_error(SDX4_ERR_MODEL, "tensor %s: shape too large", name);
            return -1;
        }
    }
    json_t *b = json_array_get(jo, 0), *e = json_array_get(jo, 1);
    if (!json_is_integer(b) || !json_is_integer(e) || json_integer_value(b) < 0 ||
        json_integer_value(e) < json_integer_value(b) ||
        (uint64_t)json_integer_value(e) > d->size) {
        sdx4_set_error(SDX4_ERR_MODEL, "tensor %s: data_offsets out of range (file truncated?)", name);
        return -1;
    }
    t->nbytes = (size_t)(json_integer_value(e) - json_integer_value(b));
    if (t->nbytes != numel * dtype_size(t->type)) {
        sdx4_set_error(SDX4_ERR_MODEL, "tensor %s: %zu bytes for %llu elements of %s", name,
                  t->nbytes, (unsigned long long)numel, dtype_name(t->type));
        return -1;
    }
    t->offset = d->start + (uint64_t)json_integer_value(b);
    t->data = d->base ? d->base + t->offset : NULL;
    if (!(t->name = strdup(name))) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "tensor %s: out of memory", name);
        return -1;
    }
    return 0;
}

/* The header length from the file's first 8 bytes, checked against the
 * file's size. */
static int header_length(const unsigned char *first8, uint64_t size, const char *label,
                         uint64_t *hlen) {
    if (size < 8) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: too short for a safetensors file", label);
        return -1;
    }
    *hlen = 0;
    for (int i = 7; i >= 0; i--) *hlen = *hlen << 8 | first8[i];
    if (*hlen > MAX_HEADER || *hlen > size - 8) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: header length %llu exceeds the file (truncated?)",
                  label, (unsigned long long)*hlen);
        return -1;
    }
    return 0;
}

/* Fills f's tensors and metadata from the header's JSON text. */
static int parse_header(st_file *f, const char *text, size_t len, const data_region *d,
                        const char *label) {
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root && !jerr.text[0]) { /* jansson names every syntax error: its allocator failed */
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory parsing the header", label);
        return -1;
    }
    if (!json_is_object(root)) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: header is not a JSON object (%s)", label, jerr.text);
        json_decref(root);
        return -1;
    }
    f->tensors = calloc(json_object_size(root) + 1, sizeof *f->tensors);
    if (!f->tensors) goto no_memory;
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (!strcmp(key, "__metadata__")) {
            if (!(f->metadata_json = json_dumps(v, JSON_COMPACT))) goto no_memory;
            continue;
        }
        if (!json_is_object(v) || parse_entry(&f->tensors[f->count], key, v, d)) {
            if (!json_is_object(v)) sdx4_set_error(SDX4_ERR_MODEL, "tensor %s: not an object", key);
            sdx4_error_prefix("%s", label);
            json_decref(root);
            return -1;
        }
        f->count++;
    }
    json_decref(root);
    /* overlapping tensors mean a corrupt or hostile header */
    st_tensor *sorted = malloc((f->count + 1) * sizeof *sorted);
    if (!sorted) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory", label);
        return -1;
    }
    memcpy(sorted, f->tensors, f->count * sizeof *sorted);
    qsort(sorted, f->count, sizeof *sorted, by_offset);
    for (int i = 1; i < f->count; i++) {
        if (sorted[i].offset < sorted[i - 1].offset + sorted[i - 1].nbytes) {
            sdx4_set_error(SDX4_ERR_MODEL, "%s: tensors %s and %s overlap", label,
                      sorted[i - 1].name, sorted[i].name);
            free(sorted);
            return -1;
        }
    }
    free(sorted);
    return 0;
no_memory:
    sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory", label);
    json_decref(root);
    return -1;
}

int sdx4_st_parse(st_file *f, const void *buf, size_t size, const char *label) {
    memset(f, 0, sizeof *f);
    if (!(f->path = strdup(label))) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory", label);
        return -1;
    }
    const unsigned char *p = buf;
    uint64_t hlen;
    if (header_length(p, size, label, &hlen)) goto fail;
    data_region d = {8 + hlen, size - 8 - hlen, p};
    if (parse_header(f, (const char *)p + 8, hlen, &d, label)) goto fail;
    return 0;
fail:
    sdx4_st_close(f);
    return -1;
}

/* Reads n bytes at `offset` into dst; returns the count read (short when
 * the file ends first) or -1 with errno. */
static int64_t read_at(int fd, void *dst, size_t n, uint64_t offset) {
    size_t done = 0;
    while (done < n) {
        size_t want = n - done < READ_CHUNK ? n - done : READ_CHUNK;
        ssize_t r = pread(fd, (char *)dst + done, want, (off_t)(offset + done));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) break;
        done += (size_t)r;
    }
    return (int64_t)done;
}

/* Opens a regular file for reading, its status in *st. */
static int open_regular(const char *path, struct stat *st) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        sdx4_set_error(SDX4_ERR_IO, "%s: %s", path, strerror(errno));
        return -1;
    }
    if (fstat(fd, st)) {
        sdx4_set_error(SDX4_ERR_IO, "%s: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    if (!S_ISREG(st->st_mode)) {
        sdx4_set_error(SDX4_ERR_IO, "%s: not a regular file", path);
        close(fd);
        return -1;
    }
    return fd;
}

int sdx4_st_open(st_file *f, const char *path) {
    memset(f, 0, sizeof *f);
    struct stat st;
    int fd = open_regular(path, &st);
    if (fd < 0) return -1;
    size_t size = (size_t)st.st_size;
    unsigned char *buf = malloc(size ? size : 1);
    int64_t got = buf ? read_at(fd, buf, size, 0) : -1;
    if (got != (int64_t)size) {
        if (!buf) sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory for %zu bytes", path, size);
        else if (got < 0) sdx4_set_error(SDX4_ERR_IO, "%s: read: %s", path, strerror(errno));
        else sdx4_set_error(SDX4_ERR_IO, "%s: the file shrank while it was read", path);
        free(buf);
        close(fd);
        return -1;
    }
    close(fd);
    if (sdx4_st_parse(f, buf, size, path)) {
        free(buf);
        return -1;
    }
    f->buf = buf;
    return 0;
}

static int64_t mtime_ns(const struct stat *st) {
    return (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec;
}

int sdx4_st_open_header(st_file *f, const char *path, const char *label) {
    memset(f, 0, sizeof *f);
    struct stat st;
    int fd = open_regular(path, &st);
    if (fd < 0) return -1;
    char *text = NULL;
    if (!(f->path = strdup(label))) { /* errors name the label */
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory", label);
        goto fail;
    }
    unsigned char first8[8] = {0};
    uint64_t hlen;
    if (st.st_size >= 8 && read_at(fd, first8, 8, 0) != 8) {
        sdx4_set_error(SDX4_ERR_IO, "%s: cannot read the header length", path);
        goto fail;
    }
    if (header_length(first8, (uint64_t)st.st_size, label, &hlen)) goto fail;
    if (!(text = malloc(hlen ? hlen : 1)) || read_at(fd, text, hlen, 8) != (int64_t)hlen) {
        sdx4_set_error(SDX4_ERR_IO, "%s: cannot read the header", path);
        goto fail;
    }
    data_region d = {8 + hlen, (uint64_t)st.st_size - 8 - hlen, NULL};
    if (parse_header(f, text, hlen, &d, label)) goto fail;
    free(f->path);
    if (!(f->path = strdup(path))) { /* sdx4_st_read's errors name it */
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory", label);
        goto fail;
    }
    free(text);
    f->fd = fd;
    f->has_fd = 1;
    f->size = st.st_size;
    f->mtime_ns = mtime_ns(&st);
    return 0;
fail:
    free(text);
    close(fd);
    sdx4_st_close(f);
    return -1;
}

int sdx4_st_read(const st_file *f, const st_tensor *t, void *dst) {
    int64_t got = read_at(f->fd, dst, t->nbytes, t->offset);
    if (got < 0) {
        sdx4_set_error(SDX4_ERR_IO, "%s: tensor %s: read: %s", f->path, t->name, strerror(errno));
        return -1;
    }
    /* the file is the one opened: a change now would mix old and new data */
    struct stat st;
    if (got == (int64_t)t->nbytes && fstat(f->fd, &st)) {
        sdx4_set_error(SDX4_ERR_IO, "%s: tensor %s: fstat: %s", f->path, t->name, strerror(errno));
        return -1;
    }
    if (got != (int64_t)t->nbytes || st.st_size != f->size || mtime_ns(&st) != f->mtime_ns) {
        sdx4_set_error(SDX4_ERR_MODEL, "%s: tensor %s: the file changed on disk while the model "
                  "was loading", f->path, t->name);
        return -1;
    }
    /* the bytes now live in the caller's memory: a second copy in the page
     * cache would double what loading costs (the price: a later load of
     * the same file reads the disk) */
    posix_fadvise(f->fd, (off_t)t->offset, (off_t)t->nbytes, POSIX_FADV_DONTNEED);
    return 0;
}

void sdx4_st_close(st_file *f) {
    for (int i = 0; i < f->count; i++) free(f->tensors[i].name);
    free(f->tensors);
    free(f->metadata_json);
    free(f->path);
    free(f->buf);
    if (f->has_fd) close(f->fd);
    memset(f, 0, sizeof *f);
}

const st_tensor *sdx4_st_find(const st_file *f, const char *name) {
    for (int i = 0; i < f->count; i++)
        if (!strcmp(f->tensors[i].name, name)) return &f->tensors[i];
    return NULL;
}

char *sdx4_st_metadata(const st_file *f, const char *key) {
    if (!f->metadata_json) return NULL;
    json_t *m = json_loads(f->metadata_json, 0, NULL);
    json_t *v = json_object_get(m, key);
    char *out = json_is_string(v) ? strdup(json_string_value(v)) : NULL;
    json_decref(m);
    return out;
}

int sdx4_st_write(const char *path, const st_entry *entries, int count,
             const char *metadata_json, st_fill_fn fill, void *user) {
    sdx4_error_clear();
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
        sdx4_set_error(SDX4_ERR_IO, "%s: %s", path, strerror(errno));
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
        if (sdx4_error_status() == SDX4_OK) sdx4_set_error(SDX4_ERR_IO, "%s: write failed", path);
        remove(path);
        return -1;
    }
    return 0;
}
