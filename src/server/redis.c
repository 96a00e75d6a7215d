/*
 * redis.c - pooled, time-bounded connections to Redis (see redis.h).
 *
 * hiredis's synchronous context is one socket that one thread may use at a
 * time. Rather than one connection behind one lock (every HTTP thread would
 * queue behind the slowest call) or one per thread (HTTP threads, workers
 * and senders come and go), idle connections wait in a small free list:
 * a call takes one (or opens one), uses it, and puts it back. The list is
 * capped at REDIS_IDLE_MAX; connections beyond it are closed on return, so
 * a burst does not leave hundreds open.
 *
 * Failures. A connection whose call failed at the I/O level is closed,
 * never reused: its socket may hold half an answer. The call is retried
 * once on a new connection when it failed on a pooled one (Redis may have
 * restarted since, which is not worth an error to the caller); commands
 * are retried only when the request was never answered, and the commands
 * sdx4 sends are safe to repeat (its scripts are idempotent per job id).
 * While Redis is down, a failed connect starts a REDIS_RETRY_SECONDS
 * pause in which calls fail at once: a thousand requests do not each wait
 * for a connect timeout.
 *
 * TLS (rediss://) is refused by name: Debian 12's hiredis (0.14) has no
 * TLS. Reach a remote Redis over a private network or a TLS tunnel.
 */
#include "redis.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server.h"

#define REDIS_IDLE_MAX 16
#define REDIS_RETRY_SECONDS 1.0

typedef struct idle {
    redisContext *c;
    struct idle *next;
} idle;

struct redis {
    char host[256], socket_path[256], user[128], password[256];
    int port, db;
    double timeout;
    char where[400];
    pthread_mutex_t lock;
    idle *free;
    int nfree;
    double retry_at; /* mono_now(): no connect before this */
    atomic_bool up;
};

static struct timeval timeval_of(double seconds) {
    return (struct timeval){(time_t)seconds, (suseconds_t)((seconds - (double)(time_t)seconds) * 1e6)};
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* %XX escapes of a URL's user and password. */
static int percent_decode(const char *s, size_t len, char *out, size_t size) {
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        char ch = s[i];
        if (ch == '%') {
            int hi = i + 2 < len ? hex_digit(s[i + 1]) : -1, lo = hi >= 0 ? hex_digit(s[i + 2]) : -1;
            if (lo < 0) return -1;
            ch = (char)(hi * 16 + lo);
            i += 2;
        }
        if (o + 1 >= size) return -1;
        out[o++] = ch;
    }
    out[o] = '\0';
    return 0;
}

static int parse_db(const char *s, int *db) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < 0 || v > 65535) return -1;
    *db = (int)v;
    return 0;
}

static int parse_url(redis *r, const char *url, char *err, size_t n) {
    if (strncmp(url, "rediss://", 9) == 0) {
        snprintf(err, n, "redis URL %s: TLS (rediss://) is not supported by this build's hiredis 0.14; "
                         "reach Redis over a private network or a TLS tunnel", url);
        return -1;
    }
    if (strncmp(url, "unix://", 7) == 0) {
        const char *path = url + 7, *query = strchr(path, '?');
        size_t len = query ? (size_t)(query - path) : strlen(path);
        if (len == 0 || path[0] != '/' || len >= sizeof r->socket_path) {
            snprintf(err, n, "redis URL %s: expected unix:///absolute/path[?db=N]", url);
            return -1;
        }
        memcpy(r->socket_path, path, len);
        r->socket_path[len] = '\0';
        if (query && (strncmp(query, "?db=", 4) != 0 || parse_db(query + 4, &r->db) != 0)) {
            snprintf(err, n, "redis URL %s: the only query allowed is ?db=N", url);
            return -1;
        }
        snprintf(r->where, sizeof r->where, "unix://%s (db %d)", r->socket_path, r->db);
        return 0;
    }
    if (strncmp(url, "redis://", 8) != 0) {
        snprintf(err, n, "redis URL %s: expected redis://[[user]:password@]host[:port][/db] or unix:///path", url);
        return -1;
    }
    const char *s = url + 8, *slash = strchr(s, '/');
    const char *end = slash ? slash : s + strlen(s), *at = NULL;
    for (const char *p = s; p < end; p++)
        if (*p == '@') at = p;
    if (at) {
        const char *colon = memchr(s, ':', (size_t)(at - s));
        if (!colon) {
            snprintf(err, n, "redis URL: credentials must be user:password@ or :password@");
            return -1;
        }
        if (percent_decode(s, (size_t)(colon - s), r->user, sizeof r->user) != 0 ||
            percent_decode(colon + 1, (size_t)(at - colon - 1), r->password, sizeof r->password) != 0) {
            snprintf(err, n, "redis URL: bad user or password encoding");
            return -1;
        }
        s = at + 1;
    }
    const char *host_end = end;
    if (*s == '[') { /* [IPv6]:port */
        const char *close = memchr(s, ']', (size_t)(end - s));
        if (!close) {
            snprintf(err, n, "redis URL %s: unclosed [", url);
            return -1;
        }
        snprintf(r->host, sizeof r->host, "%.*s", (int)(close - s - 1), s + 1);
        s = close + 1;
    } else {
        const char *colon = memchr(s, ':', (size_t)(end - s));
        host_end = colon ? colon : end;
        snprintf(r->host, sizeof r->host, "%.*s", (int)(host_end - s), s);
        s = host_end;
    }
    r->port = 6379;
    if (s < end && *s == ':') {
        char port[8];
        snprintf(port, sizeof port, "%.*s", (int)(end - s - 1), s + 1);
        int p;
        if (end - s - 1 > 5 || parse_db(port, &p) != 0 || p < 1) {
            snprintf(err, n, "redis URL %s: bad port", url);
            return -1;
        }
        r->port = p;
    } else if (s < end) {
        snprintf(err, n, "redis URL %s: unexpected text after the host", url);
        return -1;
    }
    if (!r->host[0]) {
        snprintf(err, n, "redis URL %s: no host", url);
        return -1;
    }
    if (slash && slash[1] && parse_db(slash + 1, &r->db) != 0) {
        snprintf(err, n, "redis URL %s: the path must be a database number", url);
        return -1;
    }
    snprintf(r->where, sizeof r->where, "redis://%s%s:%d/%d", r->password[0] ? "***@" : "", r->host,
             r->port, r->db);
    return 0;
}

/* A new connection, authenticated and on the right database. */
static redisContext *connect_new(redis *r, char *err, size_t n) {
    pthread_mutex_lock(&r->lock);
    bool paused = mono_now() < r->retry_at;
    pthread_mutex_unlock(&r->lock);
    if (paused) {
        snprintf(err, n, "redis at %s is unreachable (retrying)", r->where);
        return NULL;
    }
    struct timeval tv = timeval_of(r->timeout);
    redisContext *c = r->socket_path[0] ? redisConnectUnixWithTimeout(r->socket_path, tv)
                                        : redisConnectWithTimeout(r->host, r->port, tv);
    const char *why = !c ? "out of memory" : c->err ? c->errstr : NULL;
    if (!why && redisSetTimeout(c, tv) != REDIS_OK) why = "cannot set the socket timeout";
    if (!why && !r->socket_path[0]) redisEnableKeepAlive(c); /* TCP only: it fails on a unix socket */
    redisReply *reply = NULL;
    if (!why && r->password[0]) {
        reply = r->user[0] ? redisCommand(c, "AUTH %s %s", r->user, r->password)
                           : redisCommand(c, "AUTH %s", r->password);
        if (!reply) why = c->errstr;
        else if (reply->type == REDIS_REPLY_ERROR) why = "authentication refused";
        freeReplyObject(reply);
    }
    if (!why && r->db) {
        reply = redisCommand(c, "SELECT %d", r->db);
        if (!reply) why = c->errstr;
        else if (reply->type == REDIS_REPLY_ERROR) why = "SELECT refused";
        freeReplyObject(reply);
    }
    if (why) {
        snprintf(err, n, "redis at %s: %s", r->where, why);
        if (c) redisFree(c);
        pthread_mutex_lock(&r->lock);
        r->retry_at = mono_now() + REDIS_RETRY_SECONDS;
        pthread_mutex_unlock(&r->lock);
        atomic_store(&r->up, false);
        return NULL;
    }
    return c;
}

/* A pooled connection or a new one; *pooled says which. */
static redisContext *take(redis *r, bool *pooled, char *err, size_t n) {
    pthread_mutex_lock(&r->lock);
    idle *i = r->free;
    if (i) {
        r->free = i->next;
        r->nfree--;
    }
    pthread_mutex_unlock(&r->lock);
    *pooled = i != NULL;
    if (i) {
        redisContext *c = i->c;
        free(i);
        return c;
    }
    return connect_new(r, err, n);
}

void redis_release(redis *r, redisContext *c, bool broken) {
    if (!c) return;
    idle *i = NULL;
    if (!broken && redisSetTimeout(c, timeval_of(r->timeout)) == REDIS_OK) i = malloc(sizeof *i);
    pthread_mutex_lock(&r->lock);
    if (i && r->nfree < REDIS_IDLE_MAX) {
        i->c = c;
        i->next = r->free;
        r->free = i;
        r->nfree++;
        c = NULL;
        i = NULL;
    }
    pthread_mutex_unlock(&r->lock);
    free(i);
    if (c) redisFree(c);
}

redisContext *redis_borrow(redis *r, double block_seconds, char *err, size_t n) {
    bool pooled;
    redisContext *c = take(r, &pooled, err, n);
    if (c && redisSetTimeout(c, timeval_of(block_seconds + r->timeout)) != REDIS_OK) {
        snprintf(err, n, "redis: cannot set the socket timeout");
        redisFree(c);
        return NULL;
    }
    return c;
}

/* Runs one command through `send` on a pooled connection, once more on a
 * fresh one if the pooled one had gone stale. */
typedef redisReply *(*send_fn)(redisContext *c, void *arg);

static redisReply *call(redis *r, char *err, size_t n, send_fn send, void *arg) {
    for (int attempt = 0; attempt < 2; attempt++) {
        bool pooled;
        redisContext *c = take(r, &pooled, err, n);
        if (!c) return NULL;
        redisReply *reply = send(c, arg);
        if (!reply) {
            snprintf(err, n, "redis at %s: %s", r->where, c->errstr[0] ? c->errstr : "no answer");
            redis_release(r, c, true);
            if (pooled) continue;
            atomic_store(&r->up, false);
            return NULL;
        }
        redis_release(r, c, false);
        atomic_store(&r->up, true);
        if (reply->type == REDIS_REPLY_ERROR) {
            snprintf(err, n, "redis: %s", reply->str);
            freeReplyObject(reply);
            return NULL;
        }
        return reply;
    }
    return NULL;
}

typedef struct {
    const char *fmt;
    va_list *ap;
} format_args;

static redisReply *send_format(redisContext *c, void *arg) {
    format_args *f = arg;
    va_list ap;
    va_copy(ap, *f->ap);
    redisReply *reply = redisvCommand(c, f->fmt, ap);
    va_end(ap);
    return reply;
}

redisReply *redis_call(redis *r, char *err, size_t n, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    format_args f = {fmt, &ap};
    redisReply *reply = call(r, err, n, send_format, &f);
    va_end(ap);
    return reply;
}

typedef struct {
    int argc;
    const char **argv;
    const size_t *lens;
} argv_args;

static redisReply *send_argv(redisContext *c, void *arg) {
    argv_args *a = arg;
    return redisCommandArgv(c, a->argc, a->argv, a->lens);
}

redisReply *redis_call_argv(redis *r, char *err, size_t n, int argc, const char **argv,
                            const size_t *lens) {
    argv_args a = {argc, argv, lens};
    return call(r, err, n, send_argv, &a);
}

redis *redis_open(const char *url, double timeout, char *err, size_t n) {
    redis *r = calloc(1, sizeof *r);
    if (!r) {
        snprintf(err, n, "out of memory");
        return NULL;
    }
    r->timeout = timeout > 0 ? timeout : 2.0;
    if (parse_url(r, url, err, n) != 0) {
        free(r);
        return NULL;
    }
    pthread_mutex_init(&r->lock, NULL);
    char ignored[256];
    redisReply *pong = redis_call(r, ignored, sizeof ignored, "PING");
    freeReplyObject(pong);
    return r;
}

void redis_close(redis *r) {
    if (!r) return;
    while (r->free) {
        idle *i = r->free;
        r->free = i->next;
        redisFree(i->c);
        free(i);
    }
    pthread_mutex_destroy(&r->lock);
    free(r);
}

const char *redis_where(const redis *r) { return r->where; }

bool redis_up(const redis *r) { return atomic_load(&r->up); }
