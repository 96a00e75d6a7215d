/*
 * webhook.c - signed, retried webhook calls (see webhook.h).
 *
 * A small pool of sender threads (--webhook-senders, default 8) delivers.
 * Deliveries wait in one list with the time of their next attempt; a
 * sender takes the earliest that is due and whose target (host:port) has
 * fewer than --webhook-per-target calls in flight (default 2), so a
 * receiver that accepts and never answers holds at most two senders, each
 * for --webhook-timeout, and every other target keeps being served. Eight
 * threads because a call is waiting on a network, not work: they cost
 * stacks, and it takes four distinct hanging targets before anyone else
 * waits. The limit is per host:port as curl normalises the URL; names
 * that resolve to one address count apart, and the pool bounds them all.
 *
 * The backlog is bounded (--webhook-backlog, default 1000: the number of
 * finished jobs kept, --max-jobs, so that each can have its call pending;
 * about 1 KB each, the job's status document). A delivery beyond it is not
 * queued: its job's webhook is marked failed at once with the reason, so
 * a dead receiver costs memory bounded like everything else.
 *
 * A delivery succeeds on any 2xx answer; otherwise it is retried after
 * backoff, 2*backoff, 4*backoff... up to the configured number of attempts.
 * Its outcome, and why it failed, goes to the sender's callback (jobs.c
 * writes it into the job for GET /jobs/{id}). On shutdown calls go on until the deadline; one still in
 * flight then is aborted (curl's progress callback), what is left dropped.
 *
 * Each call carries X-Sdx4-Signature: t=<unix time>,v1=<hex HMAC-SHA256
 * of "<t>.<body>" keyed by the webhook secret>. Signing the timestamp with
 * the body lets a receiver refuse replays of an old call; the receiver
 * recomputes the HMAC and compares in constant time. HMAC-SHA256 comes
 * from nettle (see cache.c for why), HTTP from libcurl.
 *
 * Where calls may go. Webhook URLs come from clients, so unless
 * --webhook-private is set, a target whose name resolves to a loopback,
 * private, link-local, NAT64, 6to4, Teredo or otherwise internal address
 * is refused (final: no retry), judged on every address the server
 * resolves it to. Without --webhook-proxy calls go direct, whatever proxy
 * variables (http_proxy, https_proxy, ALL_PROXY, no_proxy) the server's
 * environment has: curl would otherwise send calls through them and the
 * check would judge the proxy instead of the target. Direct calls are
 * checked a second time on the address curl is about to connect to
 * (CURLOPT_OPENSOCKETFUNCTION), so a name that resolves differently on
 * curl's lookup (DNS rebinding) is caught too. Redirects are not followed.
 *
 * With --webhook-proxy every call goes through it (no_proxy ignored too),
 * the proxy's own address is allowed (the operator named it), and the
 * target is judged by the server's resolution before the call. The proxy
 * resolves the name again itself: a proxy that resolves differently
 * (split-horizon DNS, or a record rebound between the two lookups) may
 * still reach an internal address that this check never saw. Only the
 * proxy can close that, so point --webhook-proxy at an egress proxy that
 * refuses internal destinations itself; socks5:// (not socks5h://) has
 * curl resolve and hand the proxy an address, which narrows the gap to
 * curl's lookup against ours.
 */
#include "webhook.h"

#include <arpa/inet.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <curl/curl.h>

#include "cache.h"
#include "curl_http.h"
#include "log.h"
#include "metrics.h"

typedef struct delivery {
    char job_id[33], event[16];
    char *url, *body;
    webhook_done_fn *done;
    void *done_arg;
    char *host;   /* the URL's host, IPv6 without brackets: what is resolved */
    char *target; /* "host:port": the unit of the per-target limit */
    int attempts;
    double due;
    struct delivery *next;
} delivery;

struct webhooks {
    server *srv;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    delivery *pending;   /* waiting for their time or for a free slot */
    delivery *in_flight; /* being sent, one per busy sender */
    int count;           /* pending + in flight: what the backlog bounds */
    bool stopping;
    double deadline;
    _Atomic double abort_at; /* calls still running then are aborted */
    int senders;
    pthread_t *threads;
};

/* X-Sdx4-Signature's value for `body` sent at `timestamp`:
 * "t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>". */
static void webhook_signature(const char *secret, long long timestamp, const char *body, char *out,
                              size_t size) {
    size_t len = strlen(body);
    char prefix[32];
    int n = snprintf(prefix, sizeof prefix, "%lld.", timestamp);
    char *message = malloc((size_t)n + len);
    uint8_t mac[32];
    if (!message) {
        snprintf(out, size, "t=%lld,v1=", timestamp);
        return;
    }
    memcpy(message, prefix, (size_t)n);
    memcpy(message + n, body, len);
    hmac_sha256(mac, secret, strlen(secret), message, (size_t)n + len);
    free(message);
    int off = snprintf(out, size, "t=%lld,v1=", timestamp);
    for (int i = 0; i < 32 && off + 2 < (int)size; i++) off += snprintf(out + off, size - (size_t)off, "%02x", mac[i]);
}

/* ---- where calls may go ----------------------------------------------------- */

static bool internal_v4(const uint8_t a[4]) {
    return a[0] == 0 || a[0] == 10 || a[0] == 127 || (a[0] == 100 && (a[1] & 0xc0) == 64) ||
           (a[0] == 169 && a[1] == 254) || (a[0] == 172 && (a[1] & 0xf0) == 16) ||
           (a[0] == 192 && a[1] == 168) || (a[0] == 192 && a[1] == 0 && a[2] == 0) ||
           (a[0] == 198 && (a[1] & 0xfe) == 18) || a[0] >= 224;
}

/* The IPv6 ranges that reach IPv4 or local networks are refused outright,
 * not judged by the IPv4 address inside them: a gateway of the operator's
 * network decides where NAT64, 6to4 and Teredo go. */
static bool internal_v6(const uint8_t a[16]) {
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    static const uint8_t translated[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0};
    static const uint8_t nat64[12] = {0, 0x64, 0xff, 0x9b};
    static const uint8_t zero[12] = {0};
    if (memcmp(a, mapped, 12) == 0) return internal_v4(a + 12); /* ::ffff:a.b.c.d */
    if (memcmp(a, zero, 12) == 0) return true;       /* ::, ::1 and ::a.b.c.d (IPv4-compatible) */
    if (memcmp(a, translated, 12) == 0) return true; /* ::ffff:0:a.b.c.d (SIIT) */
    if (memcmp(a, nat64, 12) == 0) return true;      /* 64:ff9b::/96 NAT64 */
    if (memcmp(a, nat64, 4) == 0 && a[4] == 0 && a[5] == 1) return true; /* 64:ff9b:1::/48 local NAT64 */
    if (a[0] == 0x01 && a[1] == 0 && memcmp(a + 2, zero, 6) == 0) return true; /* 100::/64 discard */
    if (a[0] == 0x20 && a[1] == 0x01 && a[2] == 0 && a[3] == 0) return true;  /* 2001::/32 Teredo */
    if (a[0] == 0x20 && a[1] == 0x02) return true;                            /* 2002::/16 6to4 */
    return (a[0] & 0xfe) == 0xfc ||                  /* fc00::/7 unique local */
           (a[0] == 0xfe && (a[1] & 0xc0) == 0x80) || /* fe80::/10 link-local */
           (a[0] == 0xfe && (a[1] & 0xc0) == 0xc0) || /* fec0::/10 site-local (deprecated) */
           a[0] == 0xff;                             /* multicast */
}

static bool internal_address(const struct sockaddr *sa) {
    if (sa->sa_family == AF_INET) return internal_v4((const uint8_t *)&((const struct sockaddr_in *)sa)->sin_addr);
    if (sa->sa_family == AF_INET6) return internal_v6(((const struct sockaddr_in6 *)sa)->sin6_addr.s6_addr);
    return true;
}

static void address_text(const struct sockaddr *sa, char *out, size_t size) {
    const void *a = sa->sa_family == AF_INET6 ? (const void *)&((const struct sockaddr_in6 *)sa)->sin6_addr
                                              : (const void *)&((const struct sockaddr_in *)sa)->sin_addr;
    if (!inet_ntop(sa->sa_family, a, out, (socklen_t)size)) snprintf(out, size, "?");
}

typedef enum { CALL_DELIVERED, CALL_FAILED, CALL_REFUSED } call_result;

/* Resolves the target as this server sees it and judges every address:
 * CALL_REFUSED if one is internal, CALL_FAILED if the name does not
 * resolve (DNS may answer on the next attempt). */
static call_result judge_target(const delivery *d, char *why, size_t size) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *list = NULL;
    int rc = getaddrinfo(d->host, NULL, &hints, &list);
    if (rc != 0) {
        snprintf(why, size, "cannot resolve %s: %s", d->host, gai_strerror(rc));
        return CALL_FAILED;
    }
    call_result verdict = CALL_DELIVERED;
    for (const struct addrinfo *ai = list; ai && verdict == CALL_DELIVERED; ai = ai->ai_next)
        if (internal_address(ai->ai_addr)) {
            char text[INET6_ADDRSTRLEN];
            address_text(ai->ai_addr, text, sizeof text);
            if (strcmp(text, d->host) == 0)
                snprintf(why, size, "refused: %s is an internal address (see --webhook-private)", text);
            else
                snprintf(why, size, "refused: %s is %s, an internal address (see --webhook-private)", d->host, text);
            verdict = CALL_REFUSED;
        }
    freeaddrinfo(list);
    return verdict;
}

/* One attempt's state for curl's callbacks. */
typedef struct {
    webhooks *w;
    char refused[INET6_ADDRSTRLEN]; /* the address open_socket refused, if any */
} attempt;

static curl_socket_t open_socket(void *arg, curlsocktype purpose, struct curl_sockaddr *address) {
    attempt *a = arg;
    (void)purpose;
    /* addr is followed by the rest of an addrlen-byte address */
    struct sockaddr_storage sa = {0};
    memcpy(&sa, &address->addr, address->addrlen < sizeof sa ? address->addrlen : sizeof sa);
    const server_config *c = &a->w->srv->cfg;
    /* with a proxy, every connection goes to the proxy the operator named */
    if (!c->webhook_private && !c->webhook_proxy && internal_address((struct sockaddr *)&sa)) {
        address_text((struct sockaddr *)&sa, a->refused, sizeof a->refused);
        return CURL_SOCKET_BAD;
    }
    return socket(address->family, address->socktype, address->protocol);
}

static int abort_at_deadline(void *arg, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                             curl_off_t ulnow) {
    const attempt *a = arg;
    (void)dltotal, (void)dlnow, (void)ultotal, (void)ulnow;
    return mono_now() >= atomic_load(&a->w->abort_at);
}

static size_t discard(char *data, size_t size, size_t n, void *arg) {
    (void)data;
    (void)arg;
    return size * n;
}

/* One attempt; `why` says what happened ("HTTP 204", a curl error, a refusal). */
static call_result call(webhooks *w, const delivery *d, char *why, size_t why_size) {
    const server_config *c = &w->srv->cfg;
    if (!c->webhook_private) {
        call_result verdict = judge_target(d, why, why_size);
        if (verdict != CALL_DELIVERED) return verdict;
    }
    CURL *curl = curl_easy_init();
    if (!curl) return snprintf(why, why_size, "curl_easy_init failed"), CALL_FAILED;
    char signature[128], header[192];
    long long now = (long long)wall_now();
    webhook_signature(c->webhook_secret, now, d->body, signature, sizeof signature);
    struct curl_slist *headers = curl_slist_append(NULL, "Content-Type: application/json");
    snprintf(header, sizeof header, "X-Sdx4-Signature: %s", signature);
    headers = curl_slist_append(headers, header);
    snprintf(header, sizeof header, "X-Sdx4-Event: job.%s", d->event);
    headers = curl_slist_append(headers, header);
    snprintf(header, sizeof header, "X-Sdx4-Delivery: %s", d->job_id);
    headers = curl_slist_append(headers, header);

    attempt a = {.w = w};
    curl_easy_setopt(curl, CURLOPT_URL, d->url);
    curl_http_only(curl);
    curl_http_trust(curl, c->outbound_ca_file);
    curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 0L);
    /* "" turns off the environment's proxy variables; with a proxy, "" as
     * NOPROXY sends every call through it, whatever no_proxy says */
    curl_easy_setopt(curl, CURLOPT_PROXY, c->webhook_proxy ? c->webhook_proxy : "");
    if (c->webhook_proxy) curl_easy_setopt(curl, CURLOPT_NOPROXY, "");
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, (long)(c->webhook_timeout * 1000));
    curl_easy_setopt(curl, CURLOPT_USERAGENT, "sdx4/" SDX4_VERSION);
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, d->body);
    curl_easy_setopt(curl, CURLOPT_OPENSOCKETFUNCTION, open_socket);
    curl_easy_setopt(curl, CURLOPT_OPENSOCKETDATA, &a);
    curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, abort_at_deadline);
    curl_easy_setopt(curl, CURLOPT_XFERINFODATA, &a);
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, discard);

    CURLcode rc = curl_easy_perform(curl);
    long status = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
    curl_slist_free_all(headers);
    curl_easy_cleanup(curl);
    if (a.refused[0]) {
        snprintf(why, why_size, "refused: %s resolved to %s on connecting, an internal address", d->host,
                 a.refused);
        return CALL_REFUSED;
    }
    if (rc != CURLE_OK) snprintf(why, why_size, "%s", curl_easy_strerror(rc));
    else snprintf(why, why_size, "HTTP %ld", status);
    return rc == CURLE_OK && status >= 200 && status < 300 ? CALL_DELIVERED : CALL_FAILED;
}

/* ---- the senders ------------------------------------------------------------ */

static void delivery_free(delivery *d) {
    free(d->url);
    free(d->body);
    free(d->host);
    free(d->target);
    free(d);
}

/* Lock held. Calls in flight to `target`. */
static int target_busy(const webhooks *w, const char *target) {
    int n = 0;
    for (const delivery *d = w->in_flight; d; d = d->next) n += strcmp(d->target, target) == 0;
    return n;
}

/* Lock held. The earliest due delivery whose target has a free slot, or
 * NULL; `wake_at` becomes the earliest time one not yet due is (those
 * behind a busy target wait for a call to end instead). */
static delivery **next_due(webhooks *w, double now, double *wake_at) {
    delivery **first = NULL;
    *wake_at = INFINITY;
    for (delivery **p = &w->pending; *p; p = &(*p)->next) {
        if (target_busy(w, (*p)->target) >= w->srv->cfg.webhook_per_target) continue;
        if ((*p)->due > now) {
            if ((*p)->due < *wake_at) *wake_at = (*p)->due;
        } else if (!first || (*p)->due < (*first)->due) {
            first = p;
        }
    }
    return first;
}

static void unlink_from(delivery **list, delivery *d) {
    while (*list != d) list = &(*list)->next;
    *list = d->next;
}

/* Gives a delivery up or records its success; lock not held. */
static void finish(delivery *d, bool delivered, webhook_failure reason, const char *why) {
    d->done(d->done_arg, d->job_id, delivered, d->attempts, delivered ? NULL : why);
    if (!delivered) metrics_webhook_failed(reason);
    metrics_webhooks_pending(-1);
    delivery_free(d);
}

static void *sender_main(void *arg) {
    webhooks *w = arg;
    const server_config *c = &w->srv->cfg;
    pthread_mutex_lock(&w->lock);
    for (;;) {
        double now = mono_now(), wake_at;
        delivery **due = next_due(w, now, &wake_at);
        /* on shutdown a sender leaves once nothing it could take is due
         * before the deadline; a call in flight is its own sender's */
        if (w->stopping && (now >= w->deadline || (!due && wake_at > w->deadline))) break;
        if (!due) {
            double until = w->stopping && w->deadline < wake_at ? w->deadline : wake_at;
            if (isinf(until)) {
                pthread_cond_wait(&w->wake, &w->lock);
            } else {
                struct timespec ts = {(time_t)until, (long)((until - (double)(time_t)until) * 1e9)};
                pthread_cond_timedwait(&w->wake, &w->lock, &ts);
            }
            continue;
        }
        delivery *d = *due;
        *due = d->next;
        d->next = w->in_flight;
        w->in_flight = d;
        pthread_mutex_unlock(&w->lock);

        char why[320];
        call_result result = call(w, d, why, sizeof why);
        d->attempts++;
        if (result != CALL_REFUSED) metrics_webhook(result == CALL_DELIVERED);
        log_event(result == CALL_DELIVERED ? LOG_INFO : LOG_WARN, "webhook",
                  json_pack("{s:s,s:s,s:b,s:i,s:s}", "job_id", d->job_id, "url", d->url, "delivered",
                            result == CALL_DELIVERED, "attempt", d->attempts, "result", why));
        bool done = result != CALL_FAILED || d->attempts >= c->webhook_attempts;

        pthread_mutex_lock(&w->lock);
        unlink_from(&w->in_flight, d);
        if (done) {
            w->count--;
        } else {
            d->due = mono_now() + c->webhook_backoff * pow(2, d->attempts - 1);
            d->next = w->pending;
            w->pending = d;
        }
        pthread_cond_broadcast(&w->wake); /* a slot of d's target is free */
        if (done) {
            pthread_mutex_unlock(&w->lock);
            finish(d, result == CALL_DELIVERED,
                   result == CALL_REFUSED ? HOOK_FAIL_REFUSED : HOOK_FAIL_ATTEMPTS, why);
            pthread_mutex_lock(&w->lock);
        }
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

webhooks *webhooks_create(server *srv) {
    webhooks *w = calloc(1, sizeof *w);
    if (!w || !(w->threads = calloc((size_t)srv->cfg.webhook_senders, sizeof *w->threads))) {
        free(w);
        return NULL;
    }
    w->srv = srv;
    atomic_store(&w->abort_at, INFINITY);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    pthread_mutex_init(&w->lock, NULL);
    cond_init_monotonic(&w->wake);
    while (w->senders < srv->cfg.webhook_senders &&
           pthread_create(&w->threads[w->senders], NULL, sender_main, w) == 0)
        w->senders++;
    if (w->senders < srv->cfg.webhook_senders) {
        webhooks_destroy(w, 0);
        return NULL;
    }
    return w;
}

void webhooks_destroy(webhooks *w, double deadline) {
    if (!w) return;
    pthread_mutex_lock(&w->lock);
    w->stopping = true;
    w->deadline = deadline;
    atomic_store(&w->abort_at, deadline);
    pthread_cond_broadcast(&w->wake);
    pthread_mutex_unlock(&w->lock);
    for (int i = 0; i < w->senders; i++) pthread_join(w->threads[i], NULL);
    while (w->pending) { /* past the shutdown deadline */
        delivery *d = w->pending;
        w->pending = d->next;
        log_event(LOG_WARN, "webhook_dropped", json_pack("{s:s,s:s}", "job_id", d->job_id, "url", d->url));
        finish(d, false, HOOK_FAIL_SHUTDOWN, "the server stopped before the call could be made");
    }
    pthread_cond_destroy(&w->wake);
    pthread_mutex_destroy(&w->lock);
    curl_global_cleanup();
    free(w->threads);
    free(w);
}

/* The URL's host (IPv6 without brackets) and "host:port", as curl parses
 * and normalises it; -1 if it does not parse. */
static int parse_target(delivery *d) {
    CURLU *u = curl_url();
    char *host = NULL, *port = NULL;
    int rc = -1;
    if (u && curl_url_set(u, CURLUPART_URL, d->url, 0) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) == CURLUE_OK) {
        size_t len = strlen(host);
        bool bracketed = len >= 2 && host[0] == '[' && host[len - 1] == ']';
        d->host = bracketed ? strndup(host + 1, len - 2) : strdup(host);
        d->target = malloc(len + strlen(port) + 2);
        if (d->host && d->target) {
            sprintf(d->target, "%s:%s", host, port);
            rc = 0;
        }
    }
    curl_free(host);
    curl_free(port);
    curl_url_cleanup(u);
    return rc;
}

int webhooks_send(webhooks *w, const char *job_id, const char *url, const char *event,
                  const char *body, webhook_done_fn *done, void *done_arg, char *why,
                  size_t why_size) {
    delivery *d = calloc(1, sizeof *d);
    if (!d || !(d->url = strdup(url)) || !(d->body = strdup(body))) {
        if (d) delivery_free(d);
        snprintf(why, why_size, "out of memory");
        return -1;
    }
    snprintf(d->job_id, sizeof d->job_id, "%s", job_id);
    snprintf(d->event, sizeof d->event, "%s", event);
    d->done = done;
    d->done_arg = done_arg;
    webhook_failure reason = HOOK_FAIL_REFUSED;
    bool parsed = parse_target(d) == 0;
    pthread_mutex_lock(&w->lock);
    if (!parsed) {
        snprintf(why, why_size, "the webhook URL does not parse");
    } else if (w->stopping && mono_now() >= w->deadline) {
        snprintf(why, why_size, "the server is stopping");
        reason = HOOK_FAIL_SHUTDOWN;
    } else if (w->count >= w->srv->cfg.webhook_backlog) {
        snprintf(why, why_size, "the webhook backlog is full (%d deliveries pending)", w->count);
        reason = HOOK_FAIL_BACKLOG;
    } else {
        d->due = mono_now();
        d->next = w->pending;
        w->pending = d;
        w->count++;
        metrics_webhooks_pending(1);
        pthread_cond_signal(&w->wake);
        d = NULL;
    }
    pthread_mutex_unlock(&w->lock);
    if (!d) return 0;
    metrics_webhook_failed(reason);
    log_event(LOG_WARN, "webhook_failed",
              json_pack("{s:s,s:s,s:s}", "job_id", job_id, "url", url, "reason", why));
    delivery_free(d);
    return -1;
}
