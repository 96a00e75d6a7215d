/*
 * plan_cache.c - the file behind plan_cache.h.
 *
 * Layout, every integer little-endian:
 *
 *     "SDX4PLAN"                        8 bytes
 *     u32 format (PLAN_CACHE_FORMAT)    u32 record count
 *     per record:
 *         u64 stamp (Unix seconds when the record was made)
 *         u16 device key length   u16 operation key length   u32 value length
 *         device key   operation key   value
 *     u64 FNV-1a of every byte before it
 *
 * The checksum makes a truncated or damaged file a refused file rather
 * than a wrong choice; every length is checked against the limits and the
 * bytes left before anything is read. The file is not fsync'ed: a crash
 * may leave a truncated file, which the checksum refuses and the next save
 * replaces.
 *
 * Records live in one array; a lookup compares a 64-bit hash of both keys
 * before the keys themselves. The array holds at most
 * PLAN_CACHE_MAX_RECORDS (twice that while a merge adds a file), so a linear
 * scan costs microseconds, and lookups happen once per shape.
 */
#include "core/plan_cache.h"
#include "sdx4.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAGIC "SDX4PLAN"
#define HEADER_BYTES 16  /* magic, format, count */
#define RECORD_HEADER 16 /* stamp, three lengths */
#define TRAILER_BYTES 8  /* checksum */

typedef struct {
    uint64_t hash;  /* of the device and operation keys */
    uint64_t stamp; /* Unix seconds when made: the oldest go first */
    char *device, *op;
    uint8_t *value;
    uint32_t len;
} record;

struct plan_cache {
    char *path;
    char *device;
    record *r;
    int n, room;
    size_t bytes;      /* the file's size if saved now */
    int dirty;         /* put since the last save */
    int write_warned;  /* the path failed once: quiet from then on */
    int warnings;
};

/* ------------------------------------------------------------- helpers */

static uint64_t fnv1a(uint64_t h, const void *data, size_t n) {
    const uint8_t *p = data;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}
#define FNV_START 0xcbf29ce484222325ull

static uint64_t key_hash(const char *device, const char *op) {
    uint64_t h = fnv1a(FNV_START, device, strlen(device) + 1); /* the NUL separates */
    return fnv1a(h, op, strlen(op));
}

static uint64_t get_le(const uint8_t *p, int bytes) {
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static uint8_t *put_le(uint8_t *p, uint64_t v, int bytes) {
    for (int i = 0; i < bytes; i++) p[i] = (uint8_t)(v >> (8 * i));
    return p + bytes;
}

static void warn(plan_cache *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "sdx4: plan cache %s: ", c->path);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    c->warnings++;
}

static void record_free(record *r) {
    free(r->device);
    free(r->op);
    free(r->value);
}

static int find(const plan_cache *c, uint64_t hash, const char *device, const char *op) {
    for (int i = 0; i < c->n; i++)
        if (c->r[i].hash == hash && !strcmp(c->r[i].op, op) && !strcmp(c->r[i].device, device))
            return i;
    return -1;
}

/* The bytes a record takes in the file. */
static size_t record_bytes(const record *r) {
    return RECORD_HEADER + strlen(r->device) + strlen(r->op) + r->len;
}

/* Appends a record made of copies; -1 when out of memory. */
static int append(plan_cache *c, const char *device, size_t dlen, const char *op, size_t olen,
                  const void *value, size_t len, uint64_t stamp) {
    if (c->n == c->room) {
        int room = c->room ? 2 * c->room : 64;
        record *r = realloc(c->r, (size_t)room * sizeof *r);
        if (!r) return -1;
        c->r = r, c->room = room;
    }
    record *r = &c->r[c->n];
    *r = (record){.stamp = stamp, .len = (uint32_t)len};
    r->device = malloc(dlen + 1), r->op = malloc(olen + 1), r->value = malloc(len ? len : 1);
    if (!r->device || !r->op || !r->value) {
        record_free(r);
        return -1;
    }
    memcpy(r->device, device, dlen), r->device[dlen] = 0;
    memcpy(r->op, op, olen), r->op[olen] = 0;
    if (len) memcpy(r->value, value, len);
    r->hash = key_hash(r->device, r->op);
    c->bytes += record_bytes(r);
    c->n++;
    return 0;
}

/* A record's place in the eviction order: other devices' records before
 * this device's, older before newer, earlier in the array before later. */
typedef struct {
    int own;
    uint64_t stamp;
    int index;
} victim;

static int eviction_order(const void *a, const void *b) {
    const victim *x = a, *y = b;
    if (x->own != y->own) return x->own - y->own;
    if (x->stamp != y->stamp) return x->stamp < y->stamp ? -1 : 1;
    return x->index - y->index;
}

/* Drops records in eviction order until both caps hold. */
static void enforce_caps(plan_cache *c) {
    size_t bytes = c->bytes;
    if (c->n <= PLAN_CACHE_MAX_RECORDS && bytes <= PLAN_CACHE_MAX_BYTES) return;
    victim *order = malloc((size_t)c->n * sizeof *order);
    char *drop = calloc((size_t)c->n, 1);
    if (!order || !drop) { /* no memory to sort: drop from the front */
        free(order), free(drop);
        while (c->n > 0 && (c->n > PLAN_CACHE_MAX_RECORDS || bytes > PLAN_CACHE_MAX_BYTES)) {
            bytes -= record_bytes(&c->r[0]);
            record_free(&c->r[0]);
            memmove(c->r, c->r + 1, (size_t)--c->n * sizeof *c->r);
        }
        c->bytes = bytes;
        return;
    }
    for (int i = 0; i < c->n; i++)
        order[i] = (victim){!strcmp(c->r[i].device, c->device), c->r[i].stamp, i};
    qsort(order, (size_t)c->n, sizeof *order, eviction_order);
    int kept = c->n;
    for (int i = 0; i < c->n && (kept > PLAN_CACHE_MAX_RECORDS || bytes > PLAN_CACHE_MAX_BYTES);
         i++) {
        drop[order[i].index] = 1;
        bytes -= record_bytes(&c->r[order[i].index]);
        kept--;
    }
    int w = 0;
    for (int i = 0; i < c->n; i++) {
        if (drop[i]) record_free(&c->r[i]);
        else c->r[w++] = c->r[i];
    }
    c->n = w;
    c->bytes = bytes;
    free(order);
    free(drop);
}

/* ----------------------------------------------------------------- API */

int sdx4_plan_cache_path(const char *option, char *buf, size_t size) {
    if (!option || !*option || !strcmp(option, "off")) return 0;
    int n = snprintf(buf, size, "%s", option);
    return n > 0 && (size_t)n < size;
}

int sdx4_default_plan_cache(char *path, size_t size) {
    int n;
    /* the XDG base directory spec ignores a relative XDG_CACHE_HOME */
    const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    if (xdg && xdg[0] == '/') n = snprintf(path, size, "%s/sdx4/cuda-plans", xdg);
    else if (home && *home) n = snprintf(path, size, "%s/.cache/sdx4/cuda-plans", home);
    else return 0;
    return n > 0 && (size_t)n < size;
}

int sdx4_plan_cache_merge(plan_cache *c, const void *data, size_t size, char *why,
                          size_t why_size) {
    const uint8_t *p = data;
#define REFUSE(...) return snprintf(why, why_size, __VA_ARGS__), -1
    if (size < HEADER_BYTES + TRAILER_BYTES || memcmp(p, MAGIC, 8))
        REFUSE("not an sdx4 plan cache");
    if (size > PLAN_CACHE_MAX_BYTES) REFUSE("%zu bytes, more than sdx4 writes", size);
    uint32_t format = (uint32_t)get_le(p + 8, 4), count = (uint32_t)get_le(p + 12, 4);
    if (format != PLAN_CACHE_FORMAT)
        REFUSE("format %u, this sdx4 reads %d", format, PLAN_CACHE_FORMAT);
    if (get_le(p + size - TRAILER_BYTES, 8) != fnv1a(FNV_START, p, size - TRAILER_BYTES))
        REFUSE("checksum mismatch (truncated or damaged)");
    if (count > PLAN_CACHE_MAX_RECORDS) REFUSE("%u records, more than sdx4 writes", count);
    /* check every record before taking any: a bad file adds nothing */
    const uint8_t *end = p + size - TRAILER_BYTES, *q = p + HEADER_BYTES;
    for (uint32_t i = 0; i < count; i++) {
        if ((size_t)(end - q) < RECORD_HEADER) REFUSE("record %u is cut off", i);
        size_t dlen = get_le(q + 8, 2), olen = get_le(q + 10, 2), len = get_le(q + 12, 4);
        if (!dlen || dlen > PLAN_CACHE_MAX_KEY || !olen || olen > PLAN_CACHE_MAX_KEY ||
            len > PLAN_CACHE_MAX_VALUE)
            REFUSE("record %u has a key or value over the limits", i);
        q += RECORD_HEADER;
        if ((size_t)(end - q) < dlen + olen + len) REFUSE("record %u is cut off", i);
        if (memchr(q, 0, dlen + olen)) REFUSE("record %u has a NUL in a key", i);
        q += dlen + olen + len;
    }
    if (q != end) REFUSE("%zu bytes after the last record", (size_t)(end - q));
#undef REFUSE
    char device[PLAN_CACHE_MAX_KEY + 1], op[PLAN_CACHE_MAX_KEY + 1];
    q = p + HEADER_BYTES;
    for (uint32_t i = 0; i < count; i++) {
        size_t dlen = get_le(q + 8, 2), olen = get_le(q + 10, 2), len = get_le(q + 12, 4);
        uint64_t stamp = get_le(q, 8);
        q += RECORD_HEADER;
        memcpy(device, q, dlen), device[dlen] = 0;
        memcpy(op, q + dlen, olen), op[olen] = 0;
        if (find(c, key_hash(device, op), device, op) < 0 &&
            append(c, device, dlen, op, olen, q + dlen + olen, len, stamp))
            break; /* out of memory: keep what was taken */
        q += dlen + olen + len;
    }
    enforce_caps(c);
    return 0;
}

/* The file's bytes, or NULL: *missing when there is none, else a reason
 * in `why`. */
static uint8_t *read_file(const char *path, size_t *size, int *missing, char *why,
                          size_t why_size) {
    *missing = 0;
    FILE *f = fopen(path, "rb");
    if (!f) {
        /* no file, or no folder yet: the first save makes them */
        if (errno == ENOENT || errno == ENOTDIR) *missing = 1;
        else snprintf(why, why_size, "cannot be read: %s", strerror(errno));
        return NULL;
    }
    /* a file longer than any sdx4 writes is refused unread */
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && st.st_size > (off_t)PLAN_CACHE_MAX_BYTES) {
        snprintf(why, why_size, "%lld bytes, more than sdx4 writes", (long long)st.st_size);
        fclose(f);
        return NULL;
    }
    /* one byte more than it has: saves rename, so it cannot grow meanwhile */
    size_t room = st.st_size > 0 ? (size_t)st.st_size + 1 : 1, n = 0;
    uint8_t *buf = malloc(room);
    if (buf) n = fread(buf, 1, room, f);
    int failed = !buf || ferror(f);
    fclose(f);
    if (failed) {
        snprintf(why, why_size, "cannot be read: %s", buf ? "read error" : "out of memory");
        free(buf);
        return NULL;
    }
    *size = n;
    return buf;
}

/* Merges the file on disk; quiet when there is none, `warn_bad` decides
 * whether a bad one is a warning (it is at open; at save the file is about
 * to be replaced and was warned about at open). */
static void merge_file(plan_cache *c, int warn_bad) {
    char why[160];
    size_t size = 0;
    int missing;
    uint8_t *data = read_file(c->path, &size, &missing, why, sizeof why);
    int rc = data ? sdx4_plan_cache_merge(c, data, size, why, sizeof why) : missing ? 0 : -1;
    if (rc && warn_bad) warn(c, "%s; ignored, rebuilt as shapes are timed", why);
    free(data);
}

plan_cache *sdx4_plan_cache_open(const char *path, const char *device_key) {
    if (!path || !*path || !device_key || !*device_key ||
        strlen(device_key) > PLAN_CACHE_MAX_KEY)
        return NULL;
    plan_cache *c = calloc(1, sizeof *c);
    if (c) c->bytes = HEADER_BYTES + TRAILER_BYTES;
    if (!c || !(c->path = strdup(path)) || !(c->device = strdup(device_key))) {
        sdx4_plan_cache_close(c);
        return NULL;
    }
    merge_file(c, 1);
    return c;
}

void sdx4_plan_cache_close(plan_cache *c) {
    if (!c) return;
    for (int i = 0; i < c->n; i++) record_free(&c->r[i]);
    free(c->r);
    free(c->path);
    free(c->device);
    free(c);
}

const void *sdx4_plan_cache_get(plan_cache *c, const char *op_key, size_t *len) {
    int i = find(c, key_hash(c->device, op_key), c->device, op_key);
    if (i < 0) return NULL;
    *len = c->r[i].len;
    return c->r[i].value;
}

int sdx4_plan_cache_put(plan_cache *c, const char *op_key, const void *value, size_t len) {
    size_t olen = strlen(op_key);
    if (!olen || olen > PLAN_CACHE_MAX_KEY || len > PLAN_CACHE_MAX_VALUE) return -1;
    int i = find(c, key_hash(c->device, op_key), c->device, op_key);
    if (i >= 0) { /* replaced: it is new again */
        c->bytes -= record_bytes(&c->r[i]);
        record_free(&c->r[i]);
        c->r[i] = c->r[--c->n];
    }
    if (append(c, c->device, strlen(c->device), op_key, olen, value, len,
               (uint64_t)time(NULL)))
        return -1;
    c->dirty = 1;
    enforce_caps(c);
    return 0;
}

/* Creates the folders above `path` (mkdir -p of its dirname). */
static int make_parents(const char *path) {
    char dir[4096];
    if (snprintf(dir, sizeof dir, "%s", path) >= (int)sizeof dir) return -1;
    char *slash = strrchr(dir, '/');
    if (!slash || slash == dir) return 0;
    *slash = 0;
    for (char *p = dir + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(dir, 0777) && errno != EEXIST) return -1;
        *p = '/';
    }
    return mkdir(dir, 0777) && errno != EEXIST ? -1 : 0;
}

/* The cache as a file's bytes (malloc'd), or NULL when out of memory. */
static uint8_t *serialize(const plan_cache *c, size_t *size) {
    size_t n = HEADER_BYTES + TRAILER_BYTES;
    for (int i = 0; i < c->n; i++) n += record_bytes(&c->r[i]);
    uint8_t *buf = malloc(n), *q = buf;
    if (!buf) return NULL;
    memcpy(q, MAGIC, 8);
    q = put_le(q + 8, PLAN_CACHE_FORMAT, 4);
    q = put_le(q, (uint64_t)c->n, 4);
    for (int i = 0; i < c->n; i++) {
        const record *r = &c->r[i];
        size_t dlen = strlen(r->device), olen = strlen(r->op);
        q = put_le(q, r->stamp, 8);
        q = put_le(q, dlen, 2);
        q = put_le(q, olen, 2);
        q = put_le(q, r->len, 4);
        memcpy(q, r->device, dlen), q += dlen;
        memcpy(q, r->op, olen), q += olen;
        memcpy(q, r->value, r->len), q += r->len;
    }
    put_le(q, fnv1a(FNV_START, buf, n - TRAILER_BYTES), 8);
    *size = n;
    return buf;
}

/* Writes `size` bytes to fd; -1 on failure. */
static int write_all(int fd, const uint8_t *data, size_t size) {
    while (size > 0) {
        ssize_t w = write(fd, data, size);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        data += w, size -= (size_t)w;
    }
    return 0;
}

int sdx4_plan_cache_save(plan_cache *c) {
    if (!c->dirty) return 0;
    /* tried once per batch of puts: the next put makes the next try, and
     * the file is written whole, so nothing is lost by a failed one */
    c->dirty = 0;
    merge_file(c, 0); /* what other processes saved meanwhile */
    char tmp[4096];
    size_t size = 0;
    uint8_t *data = NULL;
    const char *failed = NULL;
    int fd = -1, made = 0;
    if (make_parents(c->path)) {
        failed = "cannot make its folder";
    } else if (snprintf(tmp, sizeof tmp, "%s.XXXXXX", c->path) >= (int)sizeof tmp ||
               (fd = mkstemp(tmp)) < 0) {
        failed = "cannot create a temporary file beside it";
    } else {
        made = 1;
        if (!(data = serialize(c, &size))) failed = "out of memory";
        else if (write_all(fd, data, size)) failed = "cannot write it";
        int closed = close(fd);
        if (!failed && closed) failed = "cannot write it";
        if (!failed && rename(tmp, c->path)) failed = "cannot rename it into place";
    }
    int err = errno;
    if (failed && made) unlink(tmp);
    free(data);
    if (!failed) return 0;
    if (!c->write_warned) {
        c->write_warned = 1;
        warn(c, "%s (%s); choices are kept in memory only", failed, strerror(err));
    }
    return -1;
}

int sdx4_plan_cache_records(const plan_cache *c) { return c->n; }
int sdx4_plan_cache_warnings(const plan_cache *c) { return c->warnings; }
