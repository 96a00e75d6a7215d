/*
 * webhook.c - signed, retried webhook calls (see webhook.h).
 *
 * One thread delivers: deliveries wait in a list with the time of their
 * next attempt, and the thread sleeps until the earliest is due. A
 * delivery succeeds on any 2xx answer; otherwise it is retried after
 * backoff, 2*backoff, 4*backoff... up to the configured number of
 * attempts. Its outcome is written back to the job for GET /jobs/{id}.
 *
 * Each call carries X-Sdx4-Signature: t=<unix time>,v1=<hex HMAC-SHA256
 * of "<t>.<body>" keyed by the webhook secret>. Signing the timestamp with
 * the body lets a receiver refuse replays of an old call; the receiver
 * recomputes the HMAC and compares in constant time. HMAC-SHA256 comes
 * from nettle (see cache.c for why), HTTP from libcurl.
 *
 * Webhook URLs come from clients, so unless --webhook-private is set the
 * connection is refused when the resolved address is loopback, private,
 * link-local or otherwise internal: the check runs on the address curl is
 * about to connect to (CURLOPT_OPENSOCKETFUNCTION), after DNS, so a name
 * that resolves to 127.0.0.1 is caught too. Redirects are not followed.
 */
#include "webhook.h"

#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <curl/curl.h>

#include "cache.h"
#include "jobs.h"
#include "log.h"
#include "metrics.h"

typedef struct delivery {
    char job_id[33], event[16];
    char *url, *body;
    int attempts;
    double due;
    struct delivery *next;
} delivery;

struct webhooks {
    server *srv;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    delivery *pending;
    bool stopping;
    double deadline;
    pthread_t thread;
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

static bool internal_address(const struct sockaddr_storage *sa) {
    if (sa->ss_family == AF_INET)
        return internal_v4((const uint8_t *)&((const struct sockaddr_in *)sa)->sin_addr);
    if (sa->ss_family != AF_INET6) return true;
    const uint8_t *a = ((const struct sockaddr_in6 *)sa)->sin6_addr.s6_addr;
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    static const uint8_t zero[15] = {0};
    if (memcmp(a, mapped, 12) == 0) return internal_v4(a + 12);
    if (memcmp(a, zero, 15) == 0) return true;       /* :: and ::1 */
    return (a[0] & 0xfe) == 0xfc ||                  /* fc00::/7 unique local */
           (a[0] == 0xfe && (a[1] & 0xc0) == 0x80) || /* fe80::/10 link-local */
           a[0] == 0xff;                             /* multicast */
}

static curl_socket_t open_socket(void *arg, curlsocktype purpose, struct curl_sockaddr *address) {
    const webhooks *w = arg;
    (void)purpose;
    /* addr is followed by the rest of an addrlen-byte address */
    struct sockaddr_storage sa = {0};
    memcpy(&sa, &address->addr, address->addrlen < sizeof sa ? address->addrlen : sizeof sa);
    if (!w->srv->cfg.webhook_private && internal_address(&sa)) return CURL_SOCKET_BAD;
    return socket(address->family, address->socktype, address->protocol);
}

static size_t discard(char *data, size_t size, size_t n, void *arg) {
    (void)data;
    (void)arg;
    return size * n;
}

/* One attempt: true on a 2xx answer. */
static bool post(webhooks *w, const delivery *d, char *error, size_t error_size) {
    CURL *curl = curl_easy_init();
    if (!curl) return snprintf(error, error_size, "curl_easy_init failed"), false;
    char signature[128], header[192];
    long long now = (long long)wall_now();
    webhook_signature(w->srv->cfg.webhook_secret, now, d->body, signature, sizeof signature);
    struct curl_slist *headers = curl_slist_append(NULL, "Content-Type: application/json");
    snprintf(header, sizeof header, "X-Sdx4-Signature: %s", signature);
    headers = curl_slist_append(headers, header);
    snprintf(header, sizeof header, "X-Sdx4-Event: job.%s", d->event);
    headers = curl_slist_append(headers, header);
    snprintf(header, sizeof header, "X-Sdx4-Delivery: %s", d->job_id);
    headers = curl_slist_append(headers, header);

    curl_easy_setopt(curl, CURLOPT_URL, d->url);
    curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, (long)(w->srv->cfg.webhook_timeout * 1000));
    curl_easy_setopt(curl, CURLOPT_USERAGENT, "sdx4/" SDX4_VERSION);
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, d->body);
    curl_easy_setopt(curl, CURLOPT_OPENSOCKETFUNCTION, open_socket);
    curl_easy_setopt(curl, CURLOPT_OPENSOCKETDATA, w);
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, discard);

    CURLcode rc = curl_easy_perform(curl);
    long status = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
    if (rc != CURLE_OK) snprintf(error, error_size, "%s", curl_easy_strerror(rc));
    else snprintf(error, error_size, "HTTP %ld", status);
    curl_slist_free_all(headers);
    curl_easy_cleanup(curl);
    return rc == CURLE_OK && status >= 200 && status < 300;
}

static void delivery_free(delivery *d) {
    free(d->url);
    free(d->body);
    free(d);
}

static void *sender_main(void *arg) {
    webhooks *w = arg;
    pthread_mutex_lock(&w->lock);
    for (;;) {
        delivery **first = NULL;
        for (delivery **p = &w->pending; *p; p = &(*p)->next)
            if (!first || (*p)->due < (*first)->due) first = p;
        double now = mono_now();
        if (w->stopping && (!first || now >= w->deadline || (*first)->due > w->deadline)) break;
        if (!first || (*first)->due > now) {
            double until = first ? (*first)->due : now + 3600;
            if (w->stopping && until > w->deadline) until = w->deadline;
            struct timespec ts = {(time_t)until, (long)((until - (double)(time_t)until) * 1e9)};
            pthread_cond_timedwait(&w->wake, &w->lock, &ts);
            continue;
        }
        delivery *d = *first;
        *first = d->next;
        pthread_mutex_unlock(&w->lock);

        char error[256];
        bool ok = post(w, d, error, sizeof error);
        d->attempts++;
        metrics_webhook(ok);
        log_event(ok ? LOG_INFO : LOG_WARN, "webhook",
                  json_pack("{s:s,s:s,s:b,s:i,s:s}", "job_id", d->job_id, "url", d->url, "delivered", ok,
                            "attempt", d->attempts, "result", error));
        bool done = ok || d->attempts >= w->srv->cfg.webhook_attempts;
        if (done) {
            job_store_webhook_done(w->srv->jobs, d->job_id, ok, d->attempts);
            delivery_free(d);
        }
        pthread_mutex_lock(&w->lock);
        if (!done) {
            d->due = mono_now() + w->srv->cfg.webhook_backoff * pow(2, d->attempts - 1);
            d->next = w->pending;
            w->pending = d;
        }
    }
    while (w->pending) { /* past the shutdown deadline */
        delivery *d = w->pending;
        w->pending = d->next;
        log_event(LOG_WARN, "webhook_dropped", json_pack("{s:s,s:s}", "job_id", d->job_id, "url", d->url));
        delivery_free(d);
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

webhooks *webhooks_create(server *srv) {
    webhooks *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    w->srv = srv;
    curl_global_init(CURL_GLOBAL_DEFAULT);
    pthread_mutex_init(&w->lock, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&w->wake, &attr);
    pthread_condattr_destroy(&attr);
    if (pthread_create(&w->thread, NULL, sender_main, w) != 0) {
        pthread_cond_destroy(&w->wake);
        pthread_mutex_destroy(&w->lock);
        curl_global_cleanup();
        free(w);
        return NULL;
    }
    return w;
}

void webhooks_destroy(webhooks *w, double deadline) {
    if (!w) return;
    pthread_mutex_lock(&w->lock);
    w->stopping = true;
    w->deadline = deadline;
    pthread_cond_signal(&w->wake);
    pthread_mutex_unlock(&w->lock);
    pthread_join(w->thread, NULL);
    pthread_cond_destroy(&w->wake);
    pthread_mutex_destroy(&w->lock);
    curl_global_cleanup();
    free(w);
}

int webhooks_send(webhooks *w, const char *job_id, const char *url, const char *event,
                  const char *body) {
    delivery *d = calloc(1, sizeof *d);
    if (!d || !(d->url = strdup(url)) || !(d->body = strdup(body))) {
        if (d) delivery_free(d);
        return -1;
    }
    snprintf(d->job_id, sizeof d->job_id, "%s", job_id);
    snprintf(d->event, sizeof d->event, "%s", event);
    pthread_mutex_lock(&w->lock);
    int rc = -1;
    if (!w->stopping || mono_now() < w->deadline) {
        d->due = mono_now();
        d->next = w->pending;
        w->pending = d;
        pthread_cond_signal(&w->wake);
        rc = 0;
    }
    pthread_mutex_unlock(&w->lock);
    if (rc) delivery_free(d);
    return rc;
}
