/*
 * conns.h - the HTTP connections: who holds them, for how long, and the
 * request bodies they hold in memory.
 *
 * libmicrohttpd reports each connection to conns (accept policy, started,
 * closed); http.c tells it where each request stands (headers complete,
 * body bytes, body complete, waiting on a job, answered). A watchdog
 * thread closes connections that are too slow and notices clients that
 * leave while their synchronous job runs. Thread-safe.
 */
#ifndef SDX4_SERVER_CONNS_H
#define SDX4_SERVER_CONNS_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>

#include <microhttpd.h>

struct ratelimit;
typedef struct conns conns;
typedef struct conn conn; /* one connection; NULL (untracked) is accepted everywhere */

typedef struct {
    int per_address;         /* open connections per address (IPv6: per /64); 0: no limit */
    double header_timeout;   /* seconds to a request's complete headers */
    size_t min_upload_rate;  /* bytes/s over each CONNS_RATE_WINDOW; 0: no minimum */
    size_t upload_budget;    /* body bytes held at once; 0: no budget */
} conns_limits;

/* Seconds over which a body's rate is measured (the first window is the
 * grace a body gets to start). */
#define CONNS_RATE_WINDOW 5.0

/* Starts the watchdog. Peers that `proxies` trusts are exempt from the
 * per-address limit. NULL if the thread cannot start. */
conns *conns_create(const conns_limits *limits, const struct ratelimit *proxies);
/* Stops the watchdog; call after the daemon has stopped. */
void conns_destroy(conns *cs);

/* libmicrohttpd's accept policy and connection notifications (cls: conns). */
enum MHD_Result conns_accept(void *cls, const struct sockaddr *addr, socklen_t addrlen);
void conns_notify(void *cls, struct MHD_Connection *connection, void **socket_context,
                  enum MHD_ConnectionNotificationCode code);
conn *conns_of(struct MHD_Connection *connection);

/* A request's stages, as http.c sees them. */
void conns_headers_done(conn *c);          /* its body, if any, is measured from here */
void conns_body_bytes(conn *c, size_t n);
void conns_body_done(conn *c);             /* no deadline until it is answered */
/* Answered: the next request's headers are awaited from now. */
void conns_request_done(conn *c);

/* While a synchronous request's connection is suspended on its job, the
 * watchdog polls its socket; when the client hangs up it calls `gone`
 * (under conns's lock, on the watchdog thread; it returns true when it
 * canceled unfinished work). conns_unwatch returns true when `gone` ran. */
void conns_watch(conn *c, bool (*gone)(void *arg), void *arg);
bool conns_unwatch(conn *c);

/* Why the watchdog ended the current request ("client_disconnected",
 * "min_upload_rate"), or NULL. */
const char *conns_outcome(conn *c);

/* The upload budget: body bytes are taken as they arrive and released
 * when the body has been consumed or its request ends. */
bool conns_upload_fits(conns *cs, size_t n); /* would n more bytes fit now? */
bool conns_upload_take(conns *cs, size_t n); /* false: over the budget, nothing taken */
void conns_upload_release(conns *cs, size_t n);
void conns_upload_refused(conns *cs);        /* counts a body refused for the budget */

typedef struct {
    long long open;
    unsigned long long refused_per_address;
    unsigned long long cut_header_timeout, cut_keepalive_idle, cut_min_upload_rate;
    unsigned long long client_disconnect_cancels;
    unsigned long long upload_refusals;
    size_t upload_bytes, upload_budget;
} conns_stats;
void conns_get_stats(conns *cs, conns_stats *st);

#endif
