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
 *
 * Shared (cluster mode). The same policy, kept in Redis by three short Lua
 * scripts (get, get through a link, store), each atomic, so that nodes
 * evicting and storing at once never lose count:
 *   sdx4:cache:<hex key>       a result: hash of the image and its numbers
 *   sdx4:cache-link:<hex key>  a link: the name of the result key
 *   sdx4:cache-index           sorted set of those names by last use (ms,
 *                              Redis's clock): the recency list
 *   sdx4:cache-sizes           hash of each name's cost in bytes
 *   sdx4:cache-stats           hash: bytes, entries, links
 * --cache-size is the budget of the whole cluster: a store first evicts
 * from the front of the index until the new entry fits, as above. Every
 * entry also expires CACHE_TTL after its last use (each use renews it),
 * and the store script first forgets up to 64 names whose last use is
 * older than that: a node that dies between scripts, an operator's
 * FLUSH or a maxmemory eviction (under a volatile-* policy only these
 * keys with a TTL are candidates) cannot leave bytes counted forever, and
 * a name whose key has gone is forgotten when a lookup misses it. Redis's
 * maxmemory is the operator's business; the budget never relies on it.
 * Scripts name keys they compute (the link's target, the eviction
 * victims), which a single Redis allows; Redis Cluster is not supported.
 */
#include "cache.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nettle/hmac.h>
#include <nettle/sha2.h>

#include "redis.h"

#define CACHE_TTL_MS (24 * 3600 * 1000) /* a day unused and an entry goes */
#define SHARED_OVERHEAD 256 /* bytes of index, sizes and hash fields per entry */

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
    redis *redis; /* shared: the entries live there (buckets unused) */
    atomic_size_t redis_errors;
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

char *cache_params_with_profile(const char *params, const void *icc, size_t len) {
    uint8_t digest[SHA256_DIGEST_SIZE];
    struct sha256_ctx ctx;
    sha256_init(&ctx);
    sha256_update(&ctx, len, icc);
    sha256_digest(&ctx, sizeof digest, digest);
    char hex[2 * sizeof digest + 1];
    for (size_t i = 0; i < sizeof digest; i++) snprintf(hex + 2 * i, 3, "%02x", digest[i]);
    char *text = NULL;
    return asprintf(&text, "%s\x1ficc=%s", params, hex) < 0 ? NULL : text;
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

/* ---- shared: the entries in Redis ------------------------------------------------ */

/* Declared first by every script: names, Redis's clock, and how an entry
 * is forgotten (its cost given back) and marked as just used. */
#define SCRIPT_PRELUDE                                                                         \
    "local index, sizes, stats = 'sdx4:cache-index', 'sdx4:cache-sizes', 'sdx4:cache-stats'\n" \
    "local t = redis.call('TIME')\n"                                                           \
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"                  \
    "local ttl = tonumber(ARGV[1])\n"                                                          \
    "local function drop(key)\n"                                                               \
    "  local cost = redis.call('HGET', sizes, key)\n"                                          \
    "  if cost then\n"                                                                         \
    "    redis.call('HDEL', sizes, key)\n"                                                     \
    "    redis.call('HINCRBY', stats, 'bytes', -tonumber(cost))\n"                             \
    "    local link = string.find(key, 'sdx4:cache-link:', 1, true)\n"                         \
    "    redis.call('HINCRBY', stats, link and 'links' or 'entries', -1)\n"                    \
    "  end\n"                                                                                  \
    "  redis.call('ZREM', index, key)\n"                                                       \
    "  redis.call('DEL', key)\n"                                                               \
    "end\n"                                                                                    \
    "local function touch(key)\n"                                                              \
    "  redis.call('ZADD', index, now, key)\n"                                                  \
    "  redis.call('PEXPIRE', key, ttl)\n"                                                      \
    "end\n"                                                                                    \
    "local fields = {'image', 'width', 'height', 'tokens', 'truncated', 'negative_truncated'}\n"

/* KEYS[1] a result; ARGV[1] the TTL. The result's fields, or nil. */
static const char get_script[] = SCRIPT_PRELUDE
    "local v = redis.call('HMGET', KEYS[1], unpack(fields))\n"
    "if not v[1] then drop(KEYS[1]) return false end\n"
    "touch(KEYS[1])\n"
    "return v\n";

/* KEYS[1] a link; ARGV[1] the TTL. Its result's fields, or nil. A link
 * whose result has gone stays: the result may be stored again. */
static const char get_link_script[] = SCRIPT_PRELUDE
    "local key = redis.call('GET', KEYS[1])\n"
    "if not key then drop(KEYS[1]) return false end\n"
    "local v = redis.call('HMGET', key, unpack(fields))\n"
    "if not v[1] then drop(key) return false end\n"
    "touch(KEYS[1])\n"
    "touch(key)\n"
    "return v\n";

/* KEYS[1] the entry; ARGV: the TTL, the budget, the entry's cost, "link"
 * or "result", then the link's target or the result's six fields. */
static const char store_script[] = SCRIPT_PRELUDE
    "local budget, cost = tonumber(ARGV[2]), tonumber(ARGV[3])\n"
    "for _, key in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now - ttl, 'LIMIT', 0, 64)) do\n"
    "  drop(key)\n"
    "end\n"
    "drop(KEYS[1])\n" /* same inputs raced: keep the newer copy */
    "while (tonumber(redis.call('HGET', stats, 'bytes')) or 0) + cost > budget do\n"
    "  local oldest = redis.call('ZRANGE', index, 0, 0)[1]\n"
    "  if not oldest then redis.call('DEL', stats, sizes) break end\n" /* nothing left: recount */
    "  drop(oldest)\n"
    "end\n"
    "local link = ARGV[4] == 'link'\n"
    "if link then\n"
    "  redis.call('SET', KEYS[1], ARGV[5])\n"
    "else\n"
    "  local values = {}\n"
    "  for i, f in ipairs(fields) do values[2 * i - 1] = f; values[2 * i] = ARGV[4 + i] end\n"
    "  redis.call('HSET', KEYS[1], unpack(values))\n"
    "end\n"
    "redis.call('HSET', sizes, KEYS[1], cost)\n"
    "redis.call('HINCRBY', stats, 'bytes', cost)\n"
    "redis.call('HINCRBY', stats, link and 'links' or 'entries', 1)\n"
    "touch(KEYS[1])\n"
    "return 1\n";

static void redis_key(char out[96], const char *prefix, const uint8_t key[32]) {
    int n = snprintf(out, 96, "%s", prefix);
    for (int i = 0; i < 32; i++) n += snprintf(out + n, 96 - (size_t)n, "%02x", key[i]);
}

/* Runs a script; NULL (counted) when Redis did not answer. */
static redisReply *run(cache *c, int argc, const char **argv, const size_t *lens) {
    char err[256];
    redisReply *reply = redis_call_argv(c->redis, err, sizeof err, argc, argv, lens);
    if (!reply) atomic_fetch_add(&c->redis_errors, 1);
    return reply;
}

/* A lookup through `script`: 1 and the result in `out`, or 0. */
static int shared_get(cache *c, const char *script, const char *key, cached_result *out) {
    char ttl[24];
    snprintf(ttl, sizeof ttl, "%d", CACHE_TTL_MS);
    const char *argv[] = {"EVAL", script, "1", key, ttl};
    size_t lens[] = {4, strlen(script), 1, strlen(key), strlen(ttl)};
    redisReply *reply = run(c, 5, argv, lens);
    bool found = reply && reply->type == REDIS_REPLY_ARRAY && reply->elements == 6;
    for (size_t i = 0; found && i < 6; i++) found = reply->element[i]->type == REDIS_REPLY_STRING;
    void *data = found ? malloc(reply->element[0]->len ? reply->element[0]->len : 1) : NULL;
    if (data) {
        redisReply **e = reply->element;
        memcpy(data, e[0]->str, e[0]->len);
        *out = (cached_result){data, e[0]->len, atoi(e[1]->str), atoi(e[2]->str),
                               atoi(e[3]->str), atoi(e[4]->str), atoi(e[5]->str)};
    }
    freeReplyObject(reply);
    return data != NULL;
}

/* Stores an entry: `values` are the link's target or the result's fields. */
static void shared_store(cache *c, const char *key, const char *kind, size_t cost, int nvalues,
                         const char **values, const size_t *value_lens) {
    char ttl[24], budget[24], bytes[24];
    snprintf(ttl, sizeof ttl, "%d", CACHE_TTL_MS);
    snprintf(budget, sizeof budget, "%zu", c->max_bytes);
    snprintf(bytes, sizeof bytes, "%zu", cost);
    const char *argv[14] = {"EVAL", store_script, "1", key, ttl, budget, bytes, kind};
    size_t lens[14] = {4, strlen(store_script), 1, strlen(key), strlen(ttl), strlen(budget), strlen(bytes),
                       strlen(kind)};
    for (int i = 0; i < nvalues; i++) {
        argv[8 + i] = values[i];
        lens[8 + i] = value_lens[i];
    }
    freeReplyObject(run(c, 8 + nvalues, argv, lens));
}

static void shared_put(cache *c, const uint8_t key[32], const cached_result *r) {
    char name[96], num[5][16];
    redis_key(name, "sdx4:cache:", key);
    int n[5] = {r->width, r->height, r->prompt_tokens, r->prompt_truncated, r->negative_truncated};
    const char *values[6] = {r->data};
    size_t lens[6] = {r->len};
    for (int i = 0; i < 5; i++) {
        snprintf(num[i], sizeof num[i], "%d", n[i]);
        values[1 + i] = num[i];
        lens[1 + i] = strlen(num[i]);
    }
    shared_store(c, name, "result", r->len + strlen(name) + SHARED_OVERHEAD, 6, values, lens);
}

static void shared_link(cache *c, const uint8_t upload_key[32], const uint8_t key[32]) {
    char name[96], target[96];
    redis_key(name, "sdx4:cache-link:", upload_key);
    redis_key(target, "sdx4:cache:", key);
    const char *values[] = {target};
    size_t lens[] = {strlen(target)};
    shared_store(c, name, "link", strlen(name) + strlen(target) + SHARED_OVERHEAD, 1, values, lens);
}

static void shared_stats(cache *c, cache_stats *stats) {
    char err[256];
    redisReply *reply = redis_call(c->redis, err, sizeof err, "HMGET sdx4:cache-stats bytes entries links");
    if (!reply) atomic_fetch_add(&c->redis_errors, 1);
    size_t *out[] = {&stats->bytes, &stats->entries, &stats->links};
    for (size_t i = 0; reply && reply->type == REDIS_REPLY_ARRAY && i < 3 && i < reply->elements; i++)
        if (reply->element[i]->type == REDIS_REPLY_STRING) *out[i] = strtoull(reply->element[i]->str, NULL, 10);
    freeReplyObject(reply);
    stats->redis_errors = atomic_load(&c->redis_errors);
}

void cache_share(cache *c, redis *redis) {
    c->redis = redis;
    free(c->buckets);
    c->buckets = NULL;
}

/* ---- the operations ------------------------------------------------------------- */

int cache_get(cache *c, const uint8_t key[32], cached_result *out) {
    if (c->redis) {
        char name[96];
        redis_key(name, "sdx4:cache:", key);
        return shared_get(c, get_script, name, out);
    }
    pthread_mutex_lock(&c->lock);
    entry *e = find(c, key, false);
    int hit = e && copy_out(e, out);
    if (hit) touch(c, e);
    pthread_mutex_unlock(&c->lock);
    return hit;
}

int cache_get_upload(cache *c, const uint8_t upload_key[32], cached_result *out) {
    if (c->redis) {
        char name[96];
        redis_key(name, "sdx4:cache-link:", upload_key);
        return shared_get(c, get_link_script, name, out);
    }
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
    if (c->redis) {
        shared_put(c, key, r);
        return;
    }
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
    if (c->redis) {
        shared_link(c, upload_key, key);
        return;
    }
    entry *e = calloc(1, sizeof *e);
    if (!e) return;
    memcpy(e->key, upload_key, 32);
    e->link = true;
    memcpy(e->target, key, 32);
    insert(c, e);
}

void cache_get_stats(cache *c, cache_stats *stats) {
    *stats = (cache_stats){0};
    if (c->redis) {
        shared_stats(c, stats);
        return;
    }
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
