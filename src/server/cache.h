/*
 * cache.h - results of past upscales, keyed by SHA-256, bounded in bytes.
 *
 * The key is the SHA-256 of the model id, every parameter that changes the
 * output bytes (a canonical text made by form.c) and the decoded input
 * pixels, so that two uploads of the same picture in different files (PNG
 * vs lossless WebP, other metadata) share an entry. Only requests with an
 * explicit seed are cached: without one the output is meant to differ.
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
    size_t bytes, entries;
} cache_stats;

cache *cache_create(size_t max_bytes);
void cache_destroy(cache *c);

void cache_key(uint8_t key[32], const char *model_id, const char *params,
               const sdx4_image *input);

/* 1 and a malloc'd copy in `out` on a hit, 0 on a miss. */
int cache_get(cache *c, const uint8_t key[32], cached_result *out);
/* Copies `r` in, evicting the least recently used entries to make room;
 * results larger than half the budget are not kept. */
void cache_put(cache *c, const uint8_t key[32], const cached_result *r);
void cache_get_stats(cache *c, cache_stats *stats);

/* SHA-256 and HMAC-SHA256 (nettle), for the cache, API keys and webhooks. */
void sha256(uint8_t out[32], const void *data, size_t len);
void hmac_sha256(uint8_t out[32], const void *key, size_t key_len, const void *data,
                 size_t len);

#endif
