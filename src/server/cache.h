/*
 * cache.h - results of past upscales, keyed by SHA-256, bounded in bytes.
 *
 * The key is the SHA-256 of the model id, every parameter that changes the
 * output bytes (a canonical text made by form.c) and the decoded input
 * pixels, so that two uploads of the same picture in different files (PNG
 * vs lossless WebP, other metadata) share an entry. Only requests with an
 * explicit seed are cached: without one the output is meant to differ.
 * The key also holds a scope, the identity of the API key that asked
 * (auth.h), so that a hit never tells one key what another sent; the
 * operator may share results between keys (--cache-shared: scope "", as
 * for the anonymous clients of a server without keys).
 *
 * Decoding an upload costs far more than answering from the cache, so the
 * cache also keeps links: the SHA-256 of an upload's exact bytes (with the
 * same model id and parameters) to the pixel key its bytes decoded to. A
 * repeat of the same file finds its result through the link without being
 * decoded; another file of the same pixels still finds it by the pixel
 * key. Links share the results' byte budget and recency order, so a link
 * outliving its result only costs a miss (and is evicted in turn).
 *
 * In cluster mode (cache_share) results and links live in Redis, under
 * the same keys, for every node: a result made through one node is a hit
 * through any other. A Redis that cannot be reached is a miss (and a
 * store skipped), counted in redis_errors, never an error to the client.
 * Thread-safe.
 */
#ifndef SDX4_SERVER_CACHE_H
#define SDX4_SERVER_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "sdx4.h"

typedef struct cache cache;

typedef struct {
    void *data; /* the encoded output image */
    size_t len;
    int width, height;
    int prompt_tokens, prompt_truncated, negative_truncated;
} cached_result;

typedef struct {
    size_t bytes; /* results and links */
    size_t entries, links;
    size_t redis_errors; /* shared: calls Redis did not answer, so far */
} cache_stats;

cache *cache_create(size_t max_bytes);
void cache_destroy(cache *c);
/* Keeps the entries in Redis from now on, `max_bytes` then being the
 * budget of the whole cluster (call before any other use; `redis`
 * outlives `c`). */
struct redis;
void cache_share(cache *c, struct redis *redis);

void cache_key(uint8_t key[32], const char *scope, const char *model_id, const char *params,
               const sdx4_image *input);
/* `params` and the SHA-256 of an ICC profile that the output keeps
 * (metadata=true): the same pixels with another profile give another file
 * (malloc'd; NULL when out of memory). */
char *cache_params_with_profile(const char *params, const void *icc, size_t len);
/* The key of the upload's bytes as received (another namespace than
 * cache_key's: the two never collide). */
void cache_upload_key(uint8_t key[32], const char *scope, const char *model_id,
                      const char *params, const void *data, size_t len);

/* 1 and a malloc'd copy in `out` on a hit, 0 on a miss. */
int cache_get(cache *c, const uint8_t key[32], cached_result *out);
/* Copies `r` in, evicting the least recently used entries to make room;
 * results larger than half the budget are not kept. */
void cache_put(cache *c, const uint8_t key[32], const cached_result *r);
/* Records that the upload `upload_key` decodes to the pixel key `key`. */
void cache_link(cache *c, const uint8_t upload_key[32], const uint8_t key[32]);
/* cache_get through a link: 1 when the upload is linked and its result is
 * still held (both then count as just used). */
int cache_get_upload(cache *c, const uint8_t upload_key[32], cached_result *out);
void cache_get_stats(cache *c, cache_stats *stats);

/* SHA-256 and HMAC-SHA256 (nettle), for the cache, API keys and webhooks. */
void sha256(uint8_t out[32], const void *data, size_t len);
void hmac_sha256(uint8_t out[32], const void *key, size_t key_len, const void *data,
                 size_t len);

#endif
