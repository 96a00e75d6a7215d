/*
 * conns.c - connection limits, deadlines, disconnects and the upload
 * budget (see conns.h).
 *
 * Slow clients. libmicrohttpd's connection timeout is an idle timeout that
 * every byte resets, so a client sending a header byte every few seconds
 * holds its connection forever, and enough of them hold every connection.
 * Three bounds close that:
 *   - per address: at most --per-ip-connections open connections. The
 *     accept policy refuses past the limit before libmicrohttpd allocates
 *     anything; connections are counted when libmicrohttpd reports them
 *     started and uncounted when closed (counting at accept would leak
 *     the connections it drops in between without a notification), so
 *     the limit can be passed by the few accepted at that very moment
 *     by the other HTTP threads. Trusted proxies are exempt: a reverse
 *     proxy carries many clients, and limiting it would limit them all
 *     (the proxy sees the real clients and is where their limits belong);
 *     --max-connections still bounds it.
 *   - the headers: a request line and headers complete within
 *     --header-timeout of the connection's opening or of the previous
 *     answer on it, however steadily bytes arrive.
 *   - the body: at least --min-upload-rate bytes per second over each
 *     CONNS_RATE_WINDOW seconds from the end of the headers.
 * A watchdog thread checks these four times a second and ends an offending
 * connection with shutdown(2), not close(2): libmicrohttpd then reads EOF
 * and closes it through its own path (callbacks, counts, the fd).
 *
 * File descriptors. The watchdog only touches the fd of a connection that
 * is in its list, under the lock, and the list loses a connection under
 * the same lock when libmicrohttpd reports it closed, which it does before
 * it close()s the fd (0.9.75: cleanup_connection and the failure path of
 * new_connection_process_ notify, then close). So a shutdown() never
 * reaches an fd that the kernel has given to someone else.
 *
 * Disconnects. A synchronous request's connection is suspended while its
 * job runs, and libmicrohttpd does not watch suspended sockets: a client
 * that gave up would leave its job running to the end. The watchdog polls
 * those sockets; a hang-up (POLLRDHUP, POLLHUP or POLLERR) calls the
 * request's `gone`, which cancels the job. A client that half-closes its
 * side after sending counts as gone, as in nginx.
 *
 * The upload budget. Bodies are held in memory until they are complete
 * (images are decoded from memory), so unfinished uploads, on as many
 * connections as allowed, could pin gigabytes. Every byte kept is taken
 * from a global budget first (an atomic counter, no lock), and a body that
 * does not fit is refused with 503 and Retry-After. Spooling bodies to
 * temporary files was the alternative; it only moves the bound to the disk
 * (which then needs its own budget) and adds I/O to every upload, while a
 * 503 tells a client exactly when to come back.
 *
 * TLS (--tls-cert) changes none of this: the watchdog works on the TCP
 * socket under GnuTLS, whose shutdown() ends the TLS connection too and
 * whose hang-up shows as on plain TCP; a connection's header deadline
 * starts when it is accepted, so it bounds the handshake as well.
 *
 * Locking: one mutex guards the list and the address counts. It is taken
 * before the job store's (a `gone` callback cancels a job under it), never
 * after it.
 */
#include "conns.h"

#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "ratelimit.h"
#include "server.h"

#define TICK 0.25           /* seconds between the watchdog's rounds */
#define ADDRESS_BUCKETS 1024

typedef enum {
    STAGE_HEADERS, /* awaiting a request's headers: the header deadline runs */
    STAGE_BODY,    /* receiving a body: its rate is measured */
    STAGE_BUSY,    /* being answered, or ended by the watchdog: no deadline */
    STAGE_WATCHED  /* suspended on a synchronous job: its socket is polled */
} conn_stage;

typedef enum { OUTCOME_NONE, OUTCOME_GONE, OUTCOME_SLOW_BODY } conn_outcome;

/* Open connections from one address (IPv6: one /64). */
typedef struct address {
    uint8_t key[16];
    int count;
    struct address *next;
} address;

struct conn {
    conns *owner;
    conn *prev, *next;
    int fd;
    address *from;      /* counted against this address; NULL if exempt */
    conn_stage stage;
    bool answered;      /* a request was answered on it (keep-alive) */
    bool shut;          /* the watchdog ended it */
    double since;       /* HEADERS: waiting since; BODY: the rate window's start */
    size_t window_bytes;
    conn_outcome outcome;
    bool (*gone)(void *arg);
    void *gone_arg;
};

struct conns {
    conns_limits limits;
    const struct ratelimit *proxies;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_t watchdog;
    bool closing;
    conn *head;
    long long open;
    address *addresses[ADDRESS_BUCKETS];
    struct pollfd *polled; /* the watchdog's scratch arrays */
    conn **polled_conns;
    size_t polled_cap;
    _Atomic size_t upload_bytes;
    _Atomic unsigned long long refused_per_address, cut_header_timeout, cut_keepalive_idle,
        cut_min_upload_rate, client_disconnect_cancels, upload_refusals;
};

#define COUNT(counter) atomic_fetch_add_explicit(&(counter), 1, memory_order_relaxed)
#define READ(counter) atomic_load_explicit(&(counter), memory_order_relaxed)

/* ---- addresses ----------------------------------------------------------- */

/* The address as 16 bytes: IPv4 as ::ffff:a.b.c.d, IPv6 cut to its /64
 * (one host commonly owns a whole /64). Other families share one key. */
static void address_key(const struct sockaddr *sa, uint8_t key[16]) {
    memset(key, 0, 16);
    if (sa && sa->sa_family == AF_INET) {
        key[10] = key[11] = 0xff;
        memcpy(key + 12, &((const struct sockaddr_in *)sa)->sin_addr, 4);
    } else if (sa && sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        memcpy(key, a, IN6_IS_ADDR_V4MAPPED(a) ? 16 : 8);
    }
}

static address **address_slot(conns *cs, const uint8_t key[16]) {
    uint32_t h = 2166136261u; /* FNV-1a */
    for (int i = 0; i < 16; i++) h = (h ^ key[i]) * 16777619u;
    address **p = &cs->addresses[h % ADDRESS_BUCKETS];
    while (*p && memcmp((*p)->key, key, 16) != 0) p = &(*p)->next;
    return p; /* the entry, or where it would be linked */
}

/* Whether the peer is subject to the per-address limit. */
static bool limited(const conns *cs, const struct sockaddr *peer) {
    return cs->limits.per_address > 0 && !ratelimit_trusts_peer(cs->proxies, peer);
}

enum MHD_Result conns_accept(void *cls, const struct sockaddr *addr, socklen_t addrlen) {
    conns *cs = cls;
    (void)addrlen;
    if (!limited(cs, addr)) return MHD_YES;
    uint8_t key[16];
    address_key(addr, key);
    pthread_mutex_lock(&cs->lock);
    address *a = *address_slot(cs, key);
    bool full = a && a->count >= cs->limits.per_address;
    pthread_mutex_unlock(&cs->lock);
    if (full) COUNT(cs->refused_per_address);
    return full ? MHD_NO : MHD_YES;
}

/* ---- connections (lock held) ---------------------------------------------------- */

static void track(conns *cs, conn *c, const struct sockaddr *peer) {
    if (limited(cs, peer)) {
        uint8_t key[16];
        address_key(peer, key);
        address **p = address_slot(cs, key);
        if (!*p && (*p = calloc(1, sizeof **p))) memcpy((*p)->key, key, 16);
        if (*p) (*p)->count++;
        c->from = *p;
    }
    c->next = cs->head;
    if (cs->head) cs->head->prev = c;
    cs->head = c;
    cs->open++;
}

static void untrack(conns *cs, conn *c) {
    if (c->prev) c->prev->next = c->next;
    else cs->head = c->next;
    if (c->next) c->next->prev = c->prev;
    cs->open--;
    if (c->from && --c->from->count == 0) {
        address **p = address_slot(cs, c->from->key);
        *p = c->from->next;
        free(c->from);
    }
}

void conns_notify(void *cls, struct MHD_Connection *connection, void **socket_context,
                  enum MHD_ConnectionNotificationCode code) {
    conns *cs = cls;
    if (code == MHD_CONNECTION_NOTIFY_CLOSED) {
        conn *c = *socket_context;
        if (!c) return;
        pthread_mutex_lock(&cs->lock);
        untrack(cs, c);
        pthread_mutex_unlock(&cs->lock);
        free(c);
        *socket_context = NULL;
        return;
    }
    /* each answer is read before the next question: libmicrohttpd 1.0
     * answers every one in the same per-connection union (0.9.75 did not) */
    const union MHD_ConnectionInfo *info = MHD_get_connection_info(connection, MHD_CONNECTION_INFO_CONNECTION_FD);
    int fd = info ? info->connect_fd : -1;
    info = MHD_get_connection_info(connection, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    const struct sockaddr *peer = info ? info->client_addr : NULL;
    conn *c = calloc(1, sizeof *c);
    if (!c || fd < 0) {
        /* untracked, it would escape every deadline: end it at once */
        if (fd >= 0) shutdown(fd, SHUT_RDWR);
        free(c);
        return;
    }
    c->owner = cs;
    c->fd = fd;
    c->stage = STAGE_HEADERS;
    c->since = mono_now();
    pthread_mutex_lock(&cs->lock);
    track(cs, c, peer);
    pthread_cond_signal(&cs->wake);
    pthread_mutex_unlock(&cs->lock);
    *socket_context = c;
}

conn *conns_of(struct MHD_Connection *connection) {
    const union MHD_ConnectionInfo *info =
        MHD_get_connection_info(connection, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return info ? info->socket_context : NULL;
}

/* ---- request stages ---------------------------------------------------------------- */

void conns_headers_done(conn *c) {
    if (!c) return;
    pthread_mutex_lock(&c->owner->lock);
    if (!c->shut) {
        c->stage = STAGE_BODY;
        c->since = mono_now();
        c->window_bytes = 0;
    }
    pthread_mutex_unlock(&c->owner->lock);
}

void conns_body_done(conn *c) {
    if (!c) return;
    pthread_mutex_lock(&c->owner->lock);
    if (c->stage == STAGE_BODY) c->stage = STAGE_BUSY;
    pthread_mutex_unlock(&c->owner->lock);
}

void conns_body_bytes(conn *c, size_t n) {
    if (!c) return;
    pthread_mutex_lock(&c->owner->lock);
    c->window_bytes += n;
    pthread_mutex_unlock(&c->owner->lock);
}

void conns_request_done(conn *c) {
    if (!c) return;
    pthread_mutex_lock(&c->owner->lock);
    c->gone = NULL;
    c->outcome = OUTCOME_NONE;
    if (!c->shut) {
        c->stage = STAGE_HEADERS;
        c->since = mono_now();
        c->answered = true;
    }
    pthread_mutex_unlock(&c->owner->lock);
}

void conns_watch(conn *c, bool (*gone)(void *arg), void *arg) {
    if (!c) return;
    pthread_mutex_lock(&c->owner->lock);
    if (!c->shut) {
        c->stage = STAGE_WATCHED;
        c->gone = gone;
        c->gone_arg = arg;
    }
    pthread_mutex_unlock(&c->owner->lock);
}

bool conns_unwatch(conn *c) {
    if (!c) return false;
    pthread_mutex_lock(&c->owner->lock);
    if (c->stage == STAGE_WATCHED) c->stage = STAGE_BUSY;
    c->gone = NULL;
    bool gone = c->outcome == OUTCOME_GONE;
    pthread_mutex_unlock(&c->owner->lock);
    return gone;
}

const char *conns_outcome(conn *c) {
    if (!c) return NULL;
    pthread_mutex_lock(&c->owner->lock);
    conn_outcome o = c->outcome;
    pthread_mutex_unlock(&c->owner->lock);
    return o == OUTCOME_GONE ? "client_disconnected" : o == OUTCOME_SLOW_BODY ? "min_upload_rate" : NULL;
}

/* ---- the watchdog ---------------------------------------------------------------------- */

/* What one round ended, for its log lines. */
typedef struct {
    int headers, bodies;
} round_cuts;

static void cut(conns *cs, conn *c, round_cuts *cuts) {
    shutdown(c->fd, SHUT_RDWR);
    c->shut = true;
    if (c->stage == STAGE_BODY) {
        c->outcome = OUTCOME_SLOW_BODY;
        COUNT(cs->cut_min_upload_rate);
        cuts->bodies++;
    } else if (c->answered) {
        /* an idle keep-alive connection (routine), or a follow-up request
         * trickled in: from here the two look the same */
        COUNT(cs->cut_keepalive_idle);
    } else {
        COUNT(cs->cut_header_timeout);
        cuts->headers++;
    }
    c->stage = STAGE_BUSY;
}

/* Polls the sockets of suspended synchronous requests; cancels the work of
 * those whose client hung up. */
static void poll_watched(conns *cs) {
    size_t n = 0;
    for (conn *c = cs->head; c; c = c->next) {
        if (c->stage != STAGE_WATCHED) continue;
        if (n == cs->polled_cap) {
            size_t cap = cs->polled_cap ? cs->polled_cap * 2 : 64;
            struct pollfd *p = realloc(cs->polled, cap * sizeof *p);
            if (p) cs->polled = p;
            conn **pc = realloc(cs->polled_conns, cap * sizeof *pc);
            if (pc) cs->polled_conns = pc;
            if (!p || !pc) break; /* the others wait for the next round */
            cs->polled_cap = cap;
        }
        cs->polled[n] = (struct pollfd){.fd = c->fd, .events = POLLRDHUP};
        cs->polled_conns[n++] = c;
    }
    if (!n || poll(cs->polled, n, 0) <= 0) return;
    for (size_t i = 0; i < n; i++) {
        if (!(cs->polled[i].revents & (POLLRDHUP | POLLHUP | POLLERR))) continue;
        conn *c = cs->polled_conns[i];
        c->outcome = OUTCOME_GONE;
        c->stage = STAGE_BUSY;
        if (c->gone && c->gone(c->gone_arg)) COUNT(cs->client_disconnect_cancels);
        c->gone = NULL;
    }
}

static void *watchdog_main(void *arg) {
    conns *cs = arg;
    const conns_limits *l = &cs->limits;
    pthread_mutex_lock(&cs->lock);
    while (!cs->closing) {
        if (!cs->head) {
            pthread_cond_wait(&cs->wake, &cs->lock);
            continue;
        }
        double now = mono_now();
        round_cuts cuts = {0};
        for (conn *c = cs->head; c; c = c->next) {
            if (c->stage == STAGE_HEADERS && now - c->since > l->header_timeout) {
                cut(cs, c, &cuts);
            } else if (c->stage == STAGE_BODY && l->min_upload_rate && now - c->since >= CONNS_RATE_WINDOW) {
                if ((double)c->window_bytes < (double)l->min_upload_rate * (now - c->since)) {
                    cut(cs, c, &cuts);
                } else {
                    c->since = now;
                    c->window_bytes = 0;
                }
            }
        }
        poll_watched(cs);
        pthread_mutex_unlock(&cs->lock);
        /* one line per round, not per connection: a flood stays a few lines */
        if (cuts.headers)
            log_event(LOG_WARN, "connections_cut",
                      json_pack("{s:s,s:i,s:f}", "reason", "header_timeout", "connections", cuts.headers,
                                "limit_s", l->header_timeout));
        if (cuts.bodies)
            log_event(LOG_WARN, "connections_cut",
                      json_pack("{s:s,s:i,s:I}", "reason", "min_upload_rate", "connections", cuts.bodies,
                                "min_bytes_per_s", (json_int_t)l->min_upload_rate));
        pthread_mutex_lock(&cs->lock);
        if (cs->closing) break;
        double next = mono_now() + TICK;
        struct timespec ts = {(time_t)next, (long)((next - (double)(time_t)next) * 1e9)};
        pthread_cond_timedwait(&cs->wake, &cs->lock, &ts);
    }
    pthread_mutex_unlock(&cs->lock);
    return NULL;
}

conns *conns_create(const conns_limits *limits, const struct ratelimit *proxies) {
    conns *cs = calloc(1, sizeof *cs);
    if (!cs) return NULL;
    cs->limits = *limits;
    cs->proxies = proxies;
    pthread_mutex_init(&cs->lock, NULL);
    cond_init_monotonic(&cs->wake);
    if (pthread_create(&cs->watchdog, NULL, watchdog_main, cs) != 0) {
        pthread_cond_destroy(&cs->wake);
        pthread_mutex_destroy(&cs->lock);
        free(cs);
        return NULL;
    }
    return cs;
}

void conns_destroy(conns *cs) {
    if (!cs) return;
    pthread_mutex_lock(&cs->lock);
    cs->closing = true;
    pthread_cond_signal(&cs->wake);
    pthread_mutex_unlock(&cs->lock);
    pthread_join(cs->watchdog, NULL);
    /* the daemon has stopped: every connection was reported closed */
    pthread_cond_destroy(&cs->wake);
    pthread_mutex_destroy(&cs->lock);
    free(cs->polled);
    free(cs->polled_conns);
    free(cs);
}

/* ---- the upload budget -------------------------------------------------------------------- */

bool conns_upload_fits(conns *cs, size_t n) {
    size_t budget = cs->limits.upload_budget;
    return !budget || atomic_load(&cs->upload_bytes) + n <= budget;
}

bool conns_upload_take(conns *cs, size_t n) {
    size_t budget = cs->limits.upload_budget;
    size_t held = atomic_load(&cs->upload_bytes);
    do {
        if (budget && held + n > budget) return false;
    } while (!atomic_compare_exchange_weak(&cs->upload_bytes, &held, held + n));
    return true;
}

void conns_upload_release(conns *cs, size_t n) {
    if (n) atomic_fetch_sub(&cs->upload_bytes, n);
}

void conns_upload_refused(conns *cs) { COUNT(cs->upload_refusals); }

void conns_get_stats(conns *cs, conns_stats *st) {
    pthread_mutex_lock(&cs->lock);
    st->open = cs->open;
    pthread_mutex_unlock(&cs->lock);
    st->refused_per_address = READ(cs->refused_per_address);
    st->cut_header_timeout = READ(cs->cut_header_timeout);
    st->cut_keepalive_idle = READ(cs->cut_keepalive_idle);
    st->cut_min_upload_rate = READ(cs->cut_min_upload_rate);
    st->client_disconnect_cancels = READ(cs->client_disconnect_cancels);
    st->upload_refusals = READ(cs->upload_refusals);
    st->upload_bytes = atomic_load(&cs->upload_bytes);
    st->upload_budget = cs->limits.upload_budget;
}
