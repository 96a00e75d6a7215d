/*
 * cache.c - the result cache (see cache.h).
 *
 * A chained hash table on the first bytes of the SHA-256 key (already
 * uniformly random, so no further hashing) plus a doubly linked list in
 * recency order: a hit moves its entry to the front, an insert evicts from
 * the back until the byte budget holds. The budget counts the encoded
 * image and the entry's bookkeeping. Links (upload key -> pixel key) are
 * entries without an image in the same table and list: one budget bounds
 * both, and eviction needs no second policy. One mutex guards everything;
 * the work under it is a lookup or two and a memcpy of one encoded image.
 *
 * SHA-256 comes from nettle: libmicrohttpd (through GnuTLS) and libvips
 * already load it into the process, so it adds no new library, and its
 * API is small and allocation-free.
 */
#include "cache.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nettle/hmac.h>
#include <nettle/sha2.h>

typedef struct entry {
    uint8_t key[32];
    bool link;          /* an upload's key: `target` is its pixel key, r is empty */
    uint8_t target[32];
    cached_result r;
    struct entry *chain;      /* next in the hash bucket */
    struct entry *newer, *older;
} entry;

struct cache {
    pthread_mutex_t lock;
    size_t max_bytes, bytes, entries, links;
    size_t nbuckets; /* power of two */
    entry **buckets;
    entry *newest, *oldest;
};

void sha256(uint8_t out[32], const void *data, size_t len) {
    struct sha256_ctx ctx;
    sha256_init(&ctx);
    sha256_update(&ctx, len, data);
    sha256_digest(&ctx, SHA256_DIGEST_SIZE, out);
}

void hmac_sha256(uint8_t out[32], const void *key, size_t key_len, const void *data,
                 size_t len) {
    struct hmac_sha256_ctx ctx;
    hmac_sha256_set_key(&ctx, key_len, key);
    hmac_sha256_update(&ctx, len, data);
    hmac_sha256_digest(&ctx, SHA256_DIGEST_SIZE, out);
}

void cache_key(uint8_t key[32], const char *scope, const char *model_id, const char *params,
               const sdx4_image *input) {
    struct sha256_ctx ctx;
    char header[64];
    int n = snprintf(header, sizeof header, "sdx4-cache-v1|%dx%d|", input->width, input->height);
    sha256_init(&ctx);
    sha256_update(&ctx, (size_t)n, (const uint8_t *)header);
    /* the NULs separate the fields: no two (scope, model, params) texts collide */
    sha256_update(&ctx, strlen(scope) + 1, (const uint8_t *)scope);
    sha256_update(&ctx, strlen(model_id) + 1, (const uint8_t *)model_id);
    sha256_update(&ctx, strlen(params) + 1, (const uint8_t *)params);
    sha256_update(&ctx, (size_t)input->width * input->height * 3, input->pixels);
    sha256_digest(&ctx, SHA256_DIGEST_SIZE, key);
}

void cache_upload_key(uint8_t key[32], const char *scope, const char *model_id,
                      const char *params, const void *data, size_t len) {
    struct sha256_ctx ctx;
    char header[64];
    int n = snprintf(header, sizeof header, "sdx4-upload-v1|%zu|", len);
    sha256_init(&ctx);
    sha256_update(&ctx, (size_t)n, (const uint8_t *)header);
    sha256_update(&ctx, strlen(scope) + 1, (const uint8_t *)scope);
    sha256_update(&ctx, strlen(model_id) + 1, (const uint8_t *)model_id);
    sha256_update(&ctx, strlen(params) + 1, (const uint8_t *)params);
    sha256_update(&ctx, len, data);
    sha256_digest(&ctx, SHA256_DIGEST_SIZE, key);
}

static size_t entry_cost(const entry *e) { return sizeof *e + e->r.len; }

static entry **bucket_of(cache *c, const uint8_t key[32]) {
    size_t h;
    memcpy(&h, key, sizeof h);
    return &c->buckets[h & (c->nbuckets - 1)];
}

cache *cache_create(size_t max_bytes) {
    cache *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->max_bytes = max_bytes;
    /* one bucket per ~64 KiB of budget: a few entries per chain at most */
    c->nbuckets = 256;
    while (c->nbuckets < max_bytes / 65536 && c->nbuckets < (1u << 20)) c->nbuckets *= 2;
    c->buckets = calloc(c->nbuckets, sizeof *c->buckets);
    if (!c->buckets) {
        free(c);
        return NULL;
    }
    pthread_mutex_init(&c->lock, NULL);
    return c;
}

static void unlink_recency(cache *c, entry *e) {
    if (e->newer) e->newer->older = e->older;
    else c->newest = e->older;
    if (e->older) e->older->newer = e->newer;
    else c->oldest = e->newer;
    e->newer = e->older = NULL;
}

static void push_newest(cache *c, entry *e) {
    e->older = c->newest;
    e->newer = NULL;
    if (c->newest) c->newest->newer = e;
    c->newest = e;
    if (!c->oldest) c->oldest = e;
}

static void remove_entry(cache *c, entry *e) {
    for (entry **p = bucket_of(c, e->key); *p; p = &(*p)->chain)
        if (*p == e) {
            *p = e->chain;
            break;
        }
    unlink_recency(c, e);
    c->bytes -= entry_cost(e);
    if (e->link) c->links--;
    else c->entries--;
    free(e->r.data);
    free(e);
}

/* The entry of `key` if it is of the kind asked (the two kinds' keys are
 * hashed in different namespaces, so this only guards against misuse). */
static entry *find(cache *c, const uint8_t key[32], bool link) {
    for (entry *e = *bucket_of(c, key); e; e = e->chain)
        if (memcmp(e->key, key, 32) == 0) return e->link == link ? e : NULL;
    return NULL;
}

static void touch(cache *c, entry *e) {
    unlink_recency(c, e);
    push_newest(c, e);
}

/* Copies result e out; false when out of memory. Called with the lock. */
static bool copy_out(const entry *e, cached_result *out) {
    void *data = malloc(e->r.len);
    if (!data) return false;
    *out = e->r;
    out->data = data;
    memcpy(out->data, e->r.data, e->r.len);
    return true;
}

int cache_get(cache *c, const uint8_t key[32], cached_result *out) {
    pthread_mutex_lock(&c->lock);
    entry *e = find(c, key, false);
    int hit = e && copy_out(e, out);
    if (hit) touch(c, e);
    pthread_mutex_unlock(&c->lock);
    return hit;
}

int cache_get_upload(cache *c, const uint8_t upload_key[32], cached_result *out) {
    pthread_mutex_lock(&c->lock);
    entry *l = find(c, upload_key, true);
    entry *e = l ? find(c, l->target, false) : NULL;
    int hit = e && copy_out(e, out);
    if (hit) {
        touch(c, l);
        touch(c, e);
    }
    pthread_mutex_unlock(&c->lock);
    return hit;
}

/* Adds e in place of any entry of its key, evicting the least recently
 * used entries to make room. */
static void insert(cache *c, entry *e) {
    pthread_mutex_lock(&c->lock);
    entry *old = find(c, e->key, e->link);
    if (old) remove_entry(c, old); /* same inputs raced: keep the newer copy */
    while (c->oldest && c->bytes + entry_cost(e) > c->max_bytes) remove_entry(c, c->oldest);
    entry **b = bucket_of(c, e->key);
    e->chain = *b;
    *b = e;
    push_newest(c, e);
    c->bytes += entry_cost(e);
    if (e->link) c->links++;
    else c->entries++;
    pthread_mutex_unlock(&c->lock);
}

void cache_put(cache *c, const uint8_t key[32], const cached_result *r) {
    if (r->len + sizeof(entry) > c->max_bytes / 2) return;
    entry *e = calloc(1, sizeof *e);
    if (!e || !(e->r.data = malloc(r->len))) {
        free(e);
        return;
    }
    memcpy(e->key, key, 32);
    void *data = e->r.data;
    e->r = *r;
    e->r.data = data;
    memcpy(e->r.data, r->data, r->len);
    insert(c, e);
}

void cache_link(cache *c, const uint8_t upload_key[32], const uint8_t key[32]) {
    if (sizeof(entry) > c->max_bytes / 2) return; /* the rule cache_put follows */
    entry *e = calloc(1, sizeof *e);
    if (!e) return;
    memcpy(e->key, upload_key, 32);
    e->link = true;
    memcpy(e->target, key, 32);
    insert(c, e);
}

void cache_get_stats(cache *c, cache_stats *stats) {
    pthread_mutex_lock(&c->lock);
    stats->bytes = c->bytes;
    stats->entries = c->entries;
    stats->links = c->links;
    pthread_mutex_unlock(&c->lock);
}

void cache_destroy(cache *c) {
    if (!c) return;
    while (c->oldest) remove_entry(c, c->oldest);
    pthread_mutex_destroy(&c->lock);
    free(c->buckets);
    free(c);
}
