/*
 * ratelimit.h - requests per client per window, and who the client is.
 *
 * A client is its API key when keys are enabled, else its IP address; the
 * address comes from X-Forwarded-For only when the connection itself comes
 * from a configured trusted proxy. The same limiter counts failed API key
 * attempts per address (auth.c). Thread-safe.
 *
 * In cluster mode (ratelimit_share) the allowance lives in Redis, so that
 * every node counts against the same one; the decision is then Redis's,
 * on Redis's clock, and a Redis that cannot be reached decides nothing
 * (rate_decision.unavailable).
 */
#ifndef SDX4_SERVER_RATELIMIT_H
#define SDX4_SERVER_RATELIMIT_H

#include <stdbool.h>
#include <stdio.h>
#include <sys/socket.h>

#include "config.h"

typedef struct ratelimit ratelimit;

typedef struct {
    bool allowed;
    int limit, remaining;
    double reset;       /* seconds until the full allowance is back */
    double retry_after; /* when refused: seconds until one more is allowed */
    bool unavailable;   /* shared and Redis unreachable: refused, no counts */
} rate_decision;

struct redis;

/* `limit` requests per `window` seconds (limit 0: no limit). NULL with a
 * message on `err` when a trusted proxy is not an address or CIDR range. */
ratelimit *ratelimit_create(int limit, double window, const string_list *trusted, FILE *err);
void ratelimit_destroy(ratelimit *r);
/* Keeps the allowances in Redis under sdx4:<name>:<client digest> from now
 * on (call before any check; `redis` outlives `r`). */
void ratelimit_share(ratelimit *r, struct redis *redis, const char *name);
bool ratelimit_enabled(const ratelimit *r);

/* `now` is mono_now(); a shared limiter uses Redis's clock instead. */
void ratelimit_check(ratelimit *r, const char *client, double now, rate_decision *d);
/* Whether one more request would be allowed now, without counting one. */
void ratelimit_peek(ratelimit *r, const char *client, double now, rate_decision *d);

/* Whether the connection's peer is one of the trusted proxies. */
bool ratelimit_trusts_peer(const ratelimit *r, const struct sockaddr *peer);

/* The client's address as text: the peer, or when the peer is a trusted
 * proxy, the right-most untrusted address of `forwarded_for` (every
 * X-Forwarded-For line of the request joined with commas, in order); an
 * entry that is not an address stops the walk at the trusted hop to its
 * right. */
void ratelimit_client_address(const ratelimit *r, const struct sockaddr *peer,
                              const char *forwarded_for, char *out, size_t size);

#endif
