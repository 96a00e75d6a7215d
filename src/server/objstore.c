/*
 * objstore.c - a small S3 client: libcurl for HTTP, SigV4 for signatures.
 *
 * Why not libs3. Debian 12's libs3-dev is libs3 2.0, which signs with AWS
 * Signature Version 2 only (HMAC-SHA1, "AWSAccessKeyId=...&Signature=..."
 * query strings) and has no region and no session token in its bucket
 * context. AWS refuses Version 2 in every region opened since 2014 and for
 * buckets created since June 2020, and without session tokens the
 * temporary credentials of an IAM role (Kubernetes' IRSA, an instance
 * profile) cannot be used. The four calls this server needs are a few
 * hundred lines over libcurl and nettle, which it links already.
 *
 * Signing. Every request carries an Authorization header of AWS Signature
 * Version 4 (AWS4-HMAC-SHA256) over its method, path, host, x-amz-date,
 * x-amz-content-sha256 (the body's SHA-256, so the store rejects a body
 * changed in transit) and x-amz-security-token when there is one.
 * Presigned URLs sign the same way with the fields in the query, the
 * payload UNSIGNED-PAYLOAD and only the host header, as AWS's SDKs make
 * them: anyone holding one may GET that object until it expires.
 *
 * Addressing. Virtual-host style (bucket.host/key) is AWS's default;
 * path style (host/bucket/key) is what local servers, MinIO and
 * endpoints given as an address need.
 *
 * Threads. Each call makes its own curl handle, so calls never share a
 * connection or a lock; a new connection per object is the price, small
 * next to an image's upload. A request that has not finished within the
 * store's timeout fails, and so never holds its caller longer than that.
 */
#include "objstore.h"

#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <curl/curl.h>

#include "cache.h" /* sha256, hmac_sha256 */
#include "curl_http.h"

/* Bytes of an answer always read, however small the object asked for:
 * room for the store's XML error document, whose code the error names. */
#define ERROR_ROOM 16384
#define EMPTY_SHA256 "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

struct objstore {
    char *scheme;     /* "http" or "https" */
    char *host;       /* the Host header: [bucket.]host[:port] */
    char *bucket_path; /* "/bucket" in path style, "" in virtual-host style */
    char *region, *access_key, *secret_key, *session_token; /* token NULL when none */
    char *ca_file; /* NULL: libcurl's default CAs */
    long timeout_ms;
};

/* ---- encoding --------------------------------------------------------------------------- */

static void hex(char *out, const uint8_t *bytes, size_t n) {
    for (size_t i = 0; i < n; i++) sprintf(out + 2 * i, "%02x", bytes[i]);
}

/* RFC 3986 percent-encoding as SigV4 wants it: everything but the
 * unreserved characters, and '/' too unless `keep_slash` (object paths).
 * Returns a malloc'd string. */
static char *uri_encode(const char *s, bool keep_slash) {
    char *out = malloc(3 * strlen(s) + 1), *o = out;
    if (!out) return NULL;
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        if (isalnum(*c) || *c == '-' || *c == '_' || *c == '.' || *c == '~' || (keep_slash && *c == '/'))
            *o++ = (char)*c;
        else
            o += sprintf(o, "%%%02X", *c);
    }
    *o = '\0';
    return out;
}

/* ---- SigV4 ---------------------------------------------------------------------------------- */

/* "20130524T000000Z" and "20130524". */
static void amz_dates(time_t now, char stamp[17], char day[9]) {
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(stamp, 17, "%Y%m%dT%H%M%SZ", &tm);
    memcpy(day, stamp, 8);
    day[8] = '\0';
}

/* hex(HMAC(signing key of `day`, string to sign of `canonical`)). */
static void signature(const objstore *os, const char *stamp, const char *day, const char *canonical,
                      char out[65]) {
    uint8_t digest[32], key[32];
    char canonical_hash[65], *secret = NULL, *to_sign = NULL;
    sha256(digest, canonical, strlen(canonical));
    hex(canonical_hash, digest, 32);
    if (asprintf(&secret, "AWS4%s", os->secret_key) < 0) secret = NULL;
    if (asprintf(&to_sign, "AWS4-HMAC-SHA256\n%s\n%s/%s/s3/aws4_request\n%s", stamp, day, os->region,
                 canonical_hash) < 0)
        to_sign = NULL;
    if (!secret || !to_sign) {
        out[0] = '\0'; /* out of memory: a request the store refuses */
        free(secret);
        free(to_sign);
        return;
    }
    hmac_sha256(key, secret, strlen(secret), day, strlen(day));
    hmac_sha256(key, key, 32, os->region, strlen(os->region));
    hmac_sha256(key, key, 32, "s3", 2);
    hmac_sha256(key, key, 32, "aws4_request", 12);
    hmac_sha256(digest, key, 32, to_sign, strlen(to_sign));
    hex(out, digest, 32);
    free(secret);
    free(to_sign);
}

/* ---- opening ------------------------------------------------------------------------------- */

static const char *first_set(const char *a, const char *env1, const char *env2) {
    if (a && *a) return a;
    const char *v = env1 ? getenv(env1) : NULL;
    if (v && *v) return v;
    v = env2 ? getenv(env2) : NULL;
    return v && *v ? v : NULL;
}

static bool printable_token(const char *s) {
    for (; *s; s++)
        if (!isgraph((unsigned char)*s)) return false;
    return true;
}

objstore *objstore_open(const objstore_settings *s, char *err, size_t err_size) {
    const char *bucket = s->bucket, *region = first_set(s->region, "AWS_REGION", "AWS_DEFAULT_REGION");
    const char *endpoint = first_set(s->endpoint, "AWS_ENDPOINT_URL", NULL);
    const char *key = getenv("AWS_ACCESS_KEY_ID"), *secret = getenv("AWS_SECRET_ACCESS_KEY");
    const char *token = getenv("AWS_SESSION_TOKEN");
    if (!region) region = "us-east-1";
    /* bucket names are 3 to 63 of [a-z0-9.-]; we also refuse what would
     * break a URL, whatever a permissive local server accepts */
    size_t blen = bucket ? strlen(bucket) : 0;
    bool bucket_ok = blen >= 3 && blen <= 63;
    for (size_t i = 0; bucket_ok && i < blen; i++)
        bucket_ok = islower((unsigned char)bucket[i]) || isdigit((unsigned char)bucket[i]) ||
                    bucket[i] == '-' || bucket[i] == '.' || bucket[i] == '_';
    if (!bucket_ok) {
        snprintf(err, err_size, "s3-bucket \"%s\" is not a bucket name (3 to 63 of a-z 0-9 . - _)",
                 bucket ? bucket : "");
        return NULL;
    }
    if (!key || !*key || !secret || !*secret) {
        snprintf(err, err_size, "S3 needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment");
        return NULL;
    }
    if (!printable_token(key) || !printable_token(region) || (token && !printable_token(token))) {
        snprintf(err, err_size, "AWS_ACCESS_KEY_ID, AWS_SESSION_TOKEN and the region must be printable, without spaces");
        return NULL;
    }

    const char *scheme = "https", *host = endpoint;
    char aws_host[128];
    if (!endpoint) {
        snprintf(aws_host, sizeof aws_host, "s3.%s.amazonaws.com", region);
        host = aws_host;
    } else if (strncasecmp(endpoint, "http://", 7) == 0) {
        scheme = "http";
        host = endpoint + 7;
    } else if (strncasecmp(endpoint, "https://", 8) == 0) {
        host = endpoint + 8;
    } else if (strstr(endpoint, "://")) {
        snprintf(err, err_size, "s3-endpoint \"%s\" must be http://, https:// or a bare host[:port]", endpoint);
        return NULL;
    }
    size_t hlen = strlen(host);
    while (hlen && host[hlen - 1] == '/') hlen--; /* "http://h:9000/" */
    bool host_ok = hlen > 0 && hlen <= 255;
    for (size_t i = 0; host_ok && i < hlen; i++)
        host_ok = isalnum((unsigned char)host[i]) || strchr("-.:[]", host[i]);
    if (!host_ok) {
        snprintf(err, err_size, "s3-endpoint \"%s\" must be a host[:port], without a path", endpoint);
        return NULL;
    }

    objstore *os = calloc(1, sizeof *os);
    if (!os) goto oom;
    os->scheme = strdup(scheme);
    if (s->path_style) {
        os->host = strndup(host, hlen);
        if (asprintf(&os->bucket_path, "/%s", bucket) < 0) os->bucket_path = NULL;
    } else {
        if (asprintf(&os->host, "%s.%.*s", bucket, (int)hlen, host) < 0) os->host = NULL;
        os->bucket_path = strdup("");
    }
    os->region = strdup(region);
    os->access_key = strdup(key);
    os->secret_key = strdup(secret);
    os->session_token = token && *token ? strdup(token) : NULL;
    os->ca_file = s->ca_file ? strdup(s->ca_file) : NULL;
    os->timeout_ms = s->timeout > 0 ? (long)(s->timeout * 1000) : 30000;
    if (!os->scheme || !os->host || !os->bucket_path || !os->region || !os->access_key ||
        !os->secret_key || (token && *token && !os->session_token) || (s->ca_file && !os->ca_file))
        goto oom;
    curl_global_init(CURL_GLOBAL_DEFAULT); /* reference-counted by libcurl */
    return os;
oom:
    objstore_close(os);
    snprintf(err, err_size, "out of memory");
    return NULL;
}

void objstore_close(objstore *os) {
    if (!os) return;
    if (os->scheme) curl_global_cleanup();
    free(os->scheme);
    free(os->host);
    free(os->bucket_path);
    free(os->region);
    free(os->access_key);
    free(os->secret_key);
    free(os->session_token);
    free(os->ca_file);
    free(os);
}

/* ---- requests -------------------------------------------------------------------------------- */

typedef struct {
    const uint8_t *data;
    size_t len, off;
} upload;

typedef struct {
    char *data;
    size_t len, cap;
    size_t max; /* bytes accepted (ERROR_ROOM at least) */
    bool over;  /* the answer passed `max`: the transfer was stopped */
} download;

static size_t read_upload(char *buf, size_t size, size_t n, void *arg) {
    upload *u = arg;
    size_t take = size * n < u->len - u->off ? size * n : u->len - u->off;
    memcpy(buf, u->data + u->off, take);
    u->off += take;
    return take;
}

static size_t write_download(char *buf, size_t size, size_t n, void *arg) {
    download *d = arg;
    size_t add = size * n;
    size_t max = d->max < ERROR_ROOM ? ERROR_ROOM : d->max;
    if (add > max - d->len) {
        d->over = true;
        return 0; /* curl fails the transfer */
    }
    if (d->len + add + 1 > d->cap) {
        size_t cap = d->cap ? d->cap : 16384;
        while (cap < d->len + add + 1) cap *= 2;
        char *grown = realloc(d->data, cap);
        if (!grown) return 0; /* curl fails the transfer */
        d->data = grown;
        d->cap = cap;
    }
    memcpy(d->data + d->len, buf, add);
    d->len += add;
    d->data[d->len] = '\0';
    return add;
}

/* What an error answer's XML names: "<Code>NoSuchKey</Code>" -> NoSuchKey. */
static void error_code(const download *body, char *out, size_t size) {
    out[0] = '\0';
    const char *start = body->data ? strstr(body->data, "<Code>") : NULL;
    const char *end = start ? strstr(start, "</Code>") : NULL;
    if (start && end) snprintf(out, size, " %.*s", (int)(end - start - 6), start + 6);
}

/* One signed request; the answer's body goes to `body` (2xx or not). */
static int request(objstore *os, const char *method, const char *key, const void *bytes, size_t len,
                   const char *content_type, download *body, char *err, size_t err_size) {
    char stamp[17], day[9], payload_hash[65], sig[65];
    amz_dates(time(NULL), stamp, day);
    if (bytes) {
        uint8_t digest[32];
        sha256(digest, bytes, len);
        hex(payload_hash, digest, 32);
    } else {
        strcpy(payload_hash, EMPTY_SHA256);
    }
    char *path = uri_encode(key, true), *canonical = NULL, *url = NULL, *auth = NULL;
    char *token_header = NULL;
    struct curl_slist *headers = NULL;
    CURL *curl = NULL;
    int rc = -1;
    const char *signed_headers = os->session_token ? "host;x-amz-content-sha256;x-amz-date;x-amz-security-token"
                                                   : "host;x-amz-content-sha256;x-amz-date";
    /* method, path, query (none), "name:value" of each signed header, a
     * blank line, their names, the payload's hash */
    if (!path ||
        asprintf(&canonical, "%s\n%s/%s\n\nhost:%s\nx-amz-content-sha256:%s\nx-amz-date:%s\n%s%s%s\n%s\n%s",
                 method, os->bucket_path, path, os->host, payload_hash, stamp,
                 os->session_token ? "x-amz-security-token:" : "",
                 os->session_token ? os->session_token : "", os->session_token ? "\n" : "",
                 signed_headers, payload_hash) < 0)
        canonical = NULL;
    if (!canonical || asprintf(&url, "%s://%s%s/%s", os->scheme, os->host, os->bucket_path, path) < 0) {
        url = NULL;
        snprintf(err, err_size, "out of memory");
        goto done;
    }
    signature(os, stamp, day, canonical, sig);
    if (asprintf(&auth, "Authorization: AWS4-HMAC-SHA256 Credential=%s/%s/%s/s3/aws4_request, SignedHeaders=%s, Signature=%s",
                 os->access_key, day, os->region, signed_headers, sig) < 0)
        auth = NULL;
    if (os->session_token && asprintf(&token_header, "x-amz-security-token: %s", os->session_token) < 0)
        token_header = NULL;
    if (!auth || (os->session_token && !token_header)) goto oom;
    char host_header[352], hash_header[96], date_header[48], type_header[160];
    snprintf(host_header, sizeof host_header, "Host: %s", os->host);
    snprintf(hash_header, sizeof hash_header, "x-amz-content-sha256: %s", payload_hash);
    snprintf(date_header, sizeof date_header, "x-amz-date: %s", stamp);
    snprintf(type_header, sizeof type_header, "Content-Type: %s", content_type ? content_type : "application/octet-stream");
    struct curl_slist *h = NULL;
    const char *lines[] = {host_header, hash_header, date_header, auth, token_header,
                           bytes ? type_header : NULL, "Expect:" /* no 100-continue round trip */};
    for (size_t i = 0; i < sizeof lines / sizeof lines[0]; i++) {
        if (!lines[i]) continue;
        if (!(h = curl_slist_append(headers, lines[i]))) goto oom;
        headers = h;
    }
    if (!(curl = curl_easy_init())) goto oom;
    upload up = {bytes, len, 0};
    curl_easy_setopt(curl, CURLOPT_URL, url);
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_http_only(curl);
    curl_http_trust(curl, os->ca_file);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, os->timeout_ms);
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, os->timeout_ms < 10000 ? os->timeout_ms : 10000);
    curl_easy_setopt(curl, CURLOPT_PROXY, ""); /* never the environment's proxy: the store is named */
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, write_download);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, body);
    if (bytes) {
        curl_easy_setopt(curl, CURLOPT_UPLOAD, 1L);
        curl_easy_setopt(curl, CURLOPT_READFUNCTION, read_upload);
        curl_easy_setopt(curl, CURLOPT_READDATA, &up);
        curl_easy_setopt(curl, CURLOPT_INFILESIZE_LARGE, (curl_off_t)len);
    } else if (strcmp(method, "DELETE") == 0) {
        curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, "DELETE");
    }
    CURLcode cc = curl_easy_perform(curl);
    long status = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
    if (body->over) {
        snprintf(err, err_size, "%s %s: the object is larger than %zu bytes", method, key, body->max);
    } else if (cc != CURLE_OK) {
        snprintf(err, err_size, "%s %s://%s: %s", method, os->scheme, os->host, curl_easy_strerror(cc));
    } else if (status < 200 || status > 299) {
        char code[96];
        error_code(body, code, sizeof code);
        snprintf(err, err_size, "%s %s: the store answered %ld%s", method, key, status, code);
    } else {
        rc = 0;
    }
    goto done;
oom:
    snprintf(err, err_size, "out of memory");
done:
    if (curl) curl_easy_cleanup(curl);
    curl_slist_free_all(headers);
    free(path);
    free(canonical);
    free(url);
    free(auth);
    free(token_header);
    return rc;
}

int objstore_put(objstore *os, const char *key, const void *bytes, size_t len,
                 const char *content_type, char *err, size_t err_size) {
    download body = {0};
    static const uint8_t nothing = 0;
    int rc = request(os, "PUT", key, bytes ? bytes : &nothing, len, content_type, &body, err, err_size);
    free(body.data);
    return rc;
}

int objstore_get(objstore *os, const char *key, size_t max, void **bytes, size_t *len, char *err,
                 size_t err_size) {
    download body = {.max = max};
    int rc = request(os, "GET", key, NULL, 0, NULL, &body, err, err_size);
    if (rc == 0 && !body.data && !(body.data = calloc(1, 1))) { /* an empty object */
        snprintf(err, err_size, "out of memory");
        rc = -1;
    }
    if (rc) {
        free(body.data);
        return -1;
    }
    *bytes = body.data;
    *len = body.len;
    return 0;
}

int objstore_delete(objstore *os, const char *key, char *err, size_t err_size) {
    download body = {0};
    int rc = request(os, "DELETE", key, NULL, 0, NULL, &body, err, err_size);
    free(body.data);
    return rc;
}

/* ---- presigned URLs ------------------------------------------------------------------------- */

int objstore_presign_at(const objstore *os, const char *key, long expires, time_t now, char *url,
                        size_t size) {
    char stamp[17], day[9], sig[65];
    if (expires < 1 || expires > 604800) return -1;
    amz_dates(now, stamp, day);
    char *path = uri_encode(key, true), *credential = NULL, *token = NULL, *query = NULL,
         *canonical = NULL;
    int rc = -1;
    if (!path) goto done;
    char scope_key[256];
    snprintf(scope_key, sizeof scope_key, "%s/%s/%s/s3/aws4_request", os->access_key, day, os->region);
    if (!(credential = uri_encode(scope_key, false))) goto done;
    if (os->session_token && !(token = uri_encode(os->session_token, false))) goto done;
    /* the canonical query: parameters sorted by name */
    if (asprintf(&query,
                 "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=%s&X-Amz-Date=%s&X-Amz-Expires=%ld"
                 "%s%s&X-Amz-SignedHeaders=host",
                 credential, stamp, expires, token ? "&X-Amz-Security-Token=" : "", token ? token : "") < 0) {
        query = NULL;
        goto done;
    }
    if (asprintf(&canonical, "GET\n%s/%s\n%s\nhost:%s\n\nhost\nUNSIGNED-PAYLOAD", os->bucket_path, path,
                 query, os->host) < 0) {
        canonical = NULL;
        goto done;
    }
    signature(os, stamp, day, canonical, sig);
    int n = snprintf(url, size, "%s://%s%s/%s?%s&X-Amz-Signature=%s", os->scheme, os->host,
                     os->bucket_path, path, query, sig);
    if (n > 0 && (size_t)n < size && sig[0]) rc = 0;
done:
    free(path);
    free(credential);
    free(token);
    free(query);
    free(canonical);
    return rc;
}

int objstore_presign(const objstore *os, const char *key, long expires, char *url, size_t size) {
    return objstore_presign_at(os, key, expires, time(NULL), url, size);
}
