/*
 * objstore.h - objects in S3-compatible storage: put, get, delete, and
 * presigned GET URLs, signed with AWS Signature Version 4.
 *
 * Thread safety: after objstore_open, every function may be called from
 * any number of threads at once; each request runs on its own curl handle
 * and the store's settings are read-only.
 */
#ifndef SDX4_SERVER_OBJSTORE_H
#define SDX4_SERVER_OBJSTORE_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

typedef struct objstore objstore;

typedef struct {
    const char *bucket;
    /* "http[s]://host[:port]" or "host[:port]" (https); NULL: $AWS_ENDPOINT_URL,
     * else AWS's s3.<region>.amazonaws.com */
    const char *endpoint;
    /* NULL: $AWS_REGION, else $AWS_DEFAULT_REGION, else us-east-1 */
    const char *region;
    /* objects at endpoint/bucket/key, not at bucket.endpoint/key (needed
     * for endpoints that are an address, as local servers' are) */
    bool path_style;
    double timeout; /* seconds one request may take, connecting included */
    const char *ca_file; /* CAs an https endpoint is verified against; NULL: libcurl's default */
} objstore_settings;

/* Credentials come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
 * (temporary credentials) AWS_SESSION_TOKEN. NULL with `err` set when a
 * setting or a credential is missing or malformed; nothing is contacted. */
objstore *objstore_open(const objstore_settings *s, char *err, size_t err_size);
void objstore_close(objstore *os);

/* Each returns 0, or -1 with `err` saying what failed: the connection, or
 * the store's HTTP status and error code ("403 SignatureDoesNotMatch"). */
int objstore_put(objstore *os, const char *key, const void *bytes, size_t len,
                 const char *content_type, char *err, size_t err_size);
/* `*bytes` (malloc'd, the caller frees it) and `*len` on success; an
 * object larger than `max` bytes (or 16 KiB, when `max` is less: room for
 * an error answer) fails, read no further than that. */
int objstore_get(objstore *os, const char *key, size_t max, void **bytes, size_t *len, char *err,
                 size_t err_size);
int objstore_delete(objstore *os, const char *key, char *err, size_t err_size);

/* A URL that GETs `key` without credentials until `expires` seconds
 * (1 to 604800, SigV4's limit) after `now`; objstore_presign passes the
 * present time. -1 if it does not fit `size`. */
int objstore_presign_at(const objstore *os, const char *key, long expires, time_t now, char *url,
                        size_t size);
int objstore_presign(const objstore *os, const char *key, long expires, char *url, size_t size);

#endif
