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
 */
#include "ratelimit.h"

#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* The decision for one more request of `client`; it counts only when
 * `take` (a peek never adds the client to the table). */
static void decide(ratelimit *r, const char *client, double now, bool take, rate_decision *d) {
    d->limit = r->limit;
    if (!r->limit) {
        *d = (rate_decision){.allowed = true};
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
    d->allowed = next - now <= r->window + 1e-9;
    if (take && d->allowed) {
        if (!s) {
            s = oldest;
            s->client = h;
        }
        s->tat = next;
    }
    double ahead = (take && d->allowed ? next : tat) - now; /* debt in seconds */
    pthread_mutex_unlock(&r->lock);

    d->remaining = (int)floor((r->window - ahead) / interval + 1e-9);
    if (d->remaining < 0) d->remaining = 0;
    d->reset = ahead;
    d->retry_after = d->allowed ? 0 : next - r->window - now;
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
