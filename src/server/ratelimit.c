/*
 * ratelimit.c - per-client limits with the generic cell rate algorithm.
 *
 * GCRA keeps one number per client, its theoretical arrival time (TAT):
 * each request moves it forward by window/limit seconds, and a request is
 * refused when that would put it more than one window ahead of now. This
 * allows `limit` requests in a burst, then one every window/limit seconds,
 * with exact Retry-After and reset values and no timers.
 *
 * Clients live in a fixed set-associative table (SETS x WAYS slots indexed
 * by a 64-bit hash of the client name): memory is bounded whatever the
 * number of clients, and a new client takes the slot of its set whose TAT
 * is oldest, i.e. the client that has been idle longest (whose allowance
 * is full anyway when its TAT has passed). Under a flood of distinct
 * addresses the worst case is that an evicted client gets a fresh
 * allowance: the limiter fails open for a few, never closed for all.
 *
 * Shared (cluster mode). Nodes behind one load balancer must count one
 * allowance per client, so the TAT moves to Redis: one key per client
 * (sdx4:<name>:<first 128 bits of the name's SHA-256>: no address or key
 * identity spelled in Redis), read, compared and moved forward by one Lua
 * script, which Redis runs atomically, so two nodes never both take the
 * last request of an allowance. The script reads Redis's clock (TIME;
 * allowed in scripts since Redis 5 replicates their effects, not the
 * script), never a node's: nodes' clocks differ, and a node whose clock
 * ran ahead would hand out its clients' future allowance. The key expires
 * when its TAT passes, when it means what no key means: a full allowance.
 * Memory in Redis is then bounded by the clients of the last window.
 *
 * Redis unreachable: the request is refused with 503 (http.c), not let
 * through. Failing open would leave the GPUs without a bound exactly when
 * the cluster is in trouble, and every request that passes the limiter
 * needs Redis anyway (its job is queued there); a node-local fallback
 * would allow each client `limit` times the number of nodes. redis.c
 * makes the refusal fast: at most one timeout a second, then at once.
 */
#include "ratelimit.h"

#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "log.h"
#include "redis.h"

enum { SETS = 4096, WAYS = 8 };

typedef struct {
    uint64_t client; /* hash; 0 = empty */
    double tat;
} slot;

typedef struct {
    uint8_t addr[16]; /* IPv4 as ::ffff:a.b.c.d */
    int prefix;       /* bits, on the 128-bit form */
} cidr;

struct ratelimit {
    int limit;
    double window;
    pthread_mutex_t lock;
    slot (*table)[WAYS];
    cidr *trusted;
    int ntrusted;
    redis *redis; /* shared: the TATs live there (table unused) */
    char name[32];
    atomic_bool redis_failing; /* logs once per outage, not per request */
};

static uint64_t hash_client(const char *s) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h ? h : 1;
}

/* Parses an IPv4 or IPv6 address into the 128-bit form. */
static int parse_ip(const char *text, uint8_t out[16]) {
    struct in_addr v4;
    if (inet_pton(AF_INET, text, &v4) == 1) {
        memset(out, 0, 10);
        out[10] = out[11] = 0xff;
        memcpy(out + 12, &v4, 4);
        return 4;
    }
    return inet_pton(AF_INET6, text, out) == 1 ? 6 : 0;
}

static int parse_cidr(const char *text, cidr *c) {
    char buf[64];
    snprintf(buf, sizeof buf, "%s", text);
    char *slash = strchr(buf, '/');
    if (slash) *slash = '\0';
    int family = parse_ip(buf, c->addr);
    if (!family) return -1;
    int max = family == 4 ? 32 : 128;
    int bits = max;
    if (slash) {
        char *end;
        long v = strtol(slash + 1, &end, 10);
        if (end == slash + 1 || *end || v < 0 || v > max) return -1;
        bits = (int)v;
    }
    c->prefix = family == 4 ? 96 + bits : bits;
    return 0;
}

static bool in_cidr(const cidr *c, const uint8_t a[16]) {
    int full = c->prefix / 8, rest = c->prefix % 8;
    if (memcmp(c->addr, a, (size_t)full) != 0) return false;
    if (!rest) return true;
    uint8_t mask = (uint8_t)(0xff << (8 - rest));
    return (c->addr[full] & mask) == (a[full] & mask);
}

static bool trusted(const ratelimit *r, const char *ip_text) {
    uint8_t a[16];
    if (!parse_ip(ip_text, a)) return false;
    for (int i = 0; i < r->ntrusted; i++)
        if (in_cidr(&r->trusted[i], a)) return true;
    return false;
}

ratelimit *ratelimit_create(int limit, double window, const string_list *proxies, FILE *err) {
    ratelimit *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->limit = limit;
    r->window = window;
    pthread_mutex_init(&r->lock, NULL);
    r->trusted = calloc((size_t)proxies->count + 1, sizeof *r->trusted);
    r->table = limit ? calloc(SETS, sizeof *r->table) : NULL;
    if (!r->trusted || (limit && !r->table)) goto fail;
    for (int i = 0; i < proxies->count; i++) {
        if (parse_cidr(proxies->items[i], &r->trusted[i])) {
            fprintf(err, "sdx4 serve: trusted proxy \"%s\" is not an address or CIDR range\n",
                    proxies->items[i]);
            goto fail;
        }
    }
    r->ntrusted = proxies->count;
    return r;
fail:
    ratelimit_destroy(r);
    return NULL;
}

void ratelimit_destroy(ratelimit *r) {
    if (!r) return;
    pthread_mutex_destroy(&r->lock);
    free(r->table);
    free(r->trusted);
    free(r);
}

bool ratelimit_enabled(const ratelimit *r) { return r->limit > 0; }

void ratelimit_share(ratelimit *r, redis *redis, const char *name) {
    r->redis = redis;
    snprintf(r->name, sizeof r->name, "%s", name);
    free(r->table);
    r->table = NULL;
}

/* The rest of the decision from the client's debt before this request
 * (`ahead`: seconds its TAT is past now) and whether it was taken. */
static void settle(const ratelimit *r, double ahead, bool allowed, bool took, rate_decision *d) {
    double interval = r->window / r->limit;
    if (took) ahead += interval;
    d->allowed = allowed;
    d->remaining = (int)floor((r->window - ahead) / interval + 1e-9);
    if (d->remaining < 0) d->remaining = 0;
    d->reset = ahead;
    d->retry_after = allowed ? 0 : ahead + interval - r->window; /* refused: nothing taken */
}

/* KEYS[1] the client's TAT (microseconds since the epoch on Redis's clock);
 * ARGV: the interval and the window in microseconds, "1" to count the
 * request. Answers {allowed, microseconds the TAT was ahead of now}. The
 * numbers stay below 2^53, exact in Lua's doubles; %.0f writes them out
 * whole where tostring would round them to 14 digits. */
static const char rate_script[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "local tat = tonumber(redis.call('GET', KEYS[1]) or 0)\n"
    "if tat < now then tat = now end\n"
    "local ahead, interval = tat - now, tonumber(ARGV[1])\n"
    "local allowed = ahead + interval <= tonumber(ARGV[2])\n"
    "if allowed and ARGV[3] == '1' then\n"
    "  redis.call('SET', KEYS[1], string.format('%.0f', tat + interval), 'PX',\n"
    "             math.ceil((ahead + interval) / 1000))\n"
    "end\n"
    "return {allowed and 1 or 0, string.format('%.0f', ahead)}\n";

static void decide_shared(ratelimit *r, const char *client, bool take, rate_decision *d) {
    uint8_t digest[32];
    sha256(digest, client, strlen(client));
    char key[80];
    int n = snprintf(key, sizeof key, "sdx4:%s:", r->name);
    for (int i = 0; i < 16; i++) n += snprintf(key + n, sizeof key - (size_t)n, "%02x", digest[i]);
    char err[256];
    /* the interval rounded down: `limit` of them always fit in the window */
    redisReply *reply = redis_call(r->redis, err, sizeof err, "EVAL %s 1 %s %lld %lld %s", rate_script, key,
                                   (long long)floor(r->window / r->limit * 1e6),
                                   (long long)llround(r->window * 1e6), take ? "1" : "0");
    bool ok = reply && reply->type == REDIS_REPLY_ARRAY && reply->elements == 2 &&
              reply->element[0]->type == REDIS_REPLY_INTEGER && reply->element[1]->type == REDIS_REPLY_STRING;
    if (!ok) {
        if (reply) snprintf(err, sizeof err, "redis: unexpected answer to the rate limit script");
        if (!atomic_exchange(&r->redis_failing, true))
            log_event(LOG_WARN, "ratelimit_redis_down", json_pack("{s:s,s:s}", "limiter", r->name, "error", err));
        freeReplyObject(reply);
        *d = (rate_decision){.limit = r->limit, .unavailable = true, .retry_after = 1};
        return;
    }
    if (atomic_exchange(&r->redis_failing, false))
        log_event(LOG_INFO, "ratelimit_redis_back", json_pack("{s:s}", "limiter", r->name));
    bool allowed = reply->element[0]->integer == 1;
    double ahead = strtod(reply->element[1]->str, NULL) * 1e-6;
    freeReplyObject(reply);
    d->limit = r->limit;
    d->unavailable = false;
    settle(r, ahead, allowed, take && allowed, d);
}

/* The decision for one more request of `client`; it counts only when
 * `take` (a peek never adds the client to the table). */
static void decide(ratelimit *r, const char *client, double now, bool take, rate_decision *d) {
    d->limit = r->limit;
    d->unavailable = false;
    if (!r->limit) {
        *d = (rate_decision){.allowed = true};
        return;
    }
    if (r->redis) {
        decide_shared(r, client, take, d);
        return;
    }
    double interval = r->window / r->limit;
    uint64_t h = hash_client(client);
    slot *set = r->table[h % SETS];

    pthread_mutex_lock(&r->lock);
    slot *s = NULL, *oldest = &set[0];
    for (int w = 0; w < WAYS; w++) {
        if (set[w].client == h) s = &set[w];
        if (set[w].tat < oldest->tat) oldest = &set[w];
    }
    double tat = s && s->tat > now ? s->tat : now;
    double next = tat + interval;
    bool allowed = next - now <= r->window + 1e-9;
    if (take && allowed) {
        if (!s) {
            s = oldest;
            s->client = h;
        }
        s->tat = next;
    }
    pthread_mutex_unlock(&r->lock);
    settle(r, tat - now, allowed, take && allowed, d);
}

void ratelimit_check(ratelimit *r, const char *client, double now, rate_decision *d) {
    decide(r, client, now, true, d);
}

void ratelimit_peek(ratelimit *r, const char *client, double now, rate_decision *d) {
    decide(r, client, now, false, d);
}

void ratelimit_client_address(const ratelimit *r, const struct sockaddr *peer,
                              const char *forwarded_for, char *out, size_t size) {
    char ip[INET6_ADDRSTRLEN] = "unknown";
    if (peer && peer->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)peer)->sin_addr, ip, sizeof ip);
    else if (peer && peer->sa_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)peer)->sin6_addr, ip, sizeof ip);
    snprintf(out, size, "%s", ip);
    if (!forwarded_for || !r->ntrusted || !trusted(r, ip)) return;

    /* walk right to left: each hop appended the address it saw, so only
     * the entries up to the first untrusted one were written by proxies we
     * believe; everything left of it is whatever the client sent. An entry
     * that is not a bare address (empty, "unknown", a port, garbage) ends
     * the walk at the address to its right, a trusted hop: the client is
     * then that proxy, never a value the client could have chosen. */
    const char *end = forwarded_for + strlen(forwarded_for);
    while (end > forwarded_for) {
        const char *start = end;
        while (start > forwarded_for && start[-1] != ',') start--;
        const char *s = start, *e = end;
        while (s < e && (*s == ' ' || *s == '\t')) s++;
        while (e > s && (e[-1] == ' ' || e[-1] == '\t')) e--;
        char hop[INET6_ADDRSTRLEN];
        uint8_t bytes[16];
        size_t n = (size_t)(e - s);
        if (n == 0 || n >= sizeof hop) return;
        memcpy(hop, s, n);
        hop[n] = '\0';
        if (!parse_ip(hop, bytes)) return;
        snprintf(out, size, "%s", hop);
        if (!trusted(r, hop)) return;
        end = start > forwarded_for ? start - 1 : start;
    }
}

bool ratelimit_trusts_peer(const ratelimit *r, const struct sockaddr *peer) {
    char ip[INET6_ADDRSTRLEN];
    if (!r->ntrusted || !peer) return false;
    if (peer->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)peer)->sin_addr, ip, sizeof ip);
    else if (peer->sa_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)peer)->sin6_addr, ip, sizeof ip);
    else
        return false;
    return trusted(r, ip);
}
