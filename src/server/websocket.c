/*
 * websocket.c - a job's progress over a WebSocket (RFC 6455), beside its
 * Server-Sent Events: GET /api/v1/jobs/{id}/events with the handshake's
 * headers upgrades instead of streaming text/event-stream.
 *
 * The same events as the SSE stream, one text message each: the status
 * document named by the job's state,
 *
 *   {"event": "running", "id": 3, "data": {...the job's document...}}
 *
 * sent when the job changes (steps in between are coalesced), the last
 * one the final state, then a close frame (1000). The route, its API key
 * and the job's owner are checked by http.c before the upgrade, as for
 * SSE.
 *
 * libmicrohttpd hands an upgraded connection's socket over: it is no
 * longer polled or timed by the daemon, and the request (with its
 * reference to the job) lasts until the stream closes it. Each socket
 * gets a thread that
 * waits on the job (a waiter that signals a condition variable: every
 * registration gets exactly one wake, so the thread never leaves one
 * behind) and writes whole frames with a send timeout, so a client that
 * stops reading frees its thread at the next event. What the client sends
 * is not read: the stream is one-way, and its end is the job's end. At
 * most WS_MAX_STREAMS run at once; beyond them the route answers 503.
 */
#include "websocket.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <nettle/sha1.h>

#include "base64.h"

#define WS_MAX_STREAMS 256
#define WS_SEND_TIMEOUT_S 10
static const char ws_guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

static atomic_int streams;

/* Whether a comma-separated header value holds `token` (case-insensitive). */
static bool has_token(const char *value, const char *token) {
    size_t n = strlen(token);
    for (const char *p = value; p && *p;) {
        while (*p == ' ' || *p == '\t' || *p == ',') p++;
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        while (len && (p[len - 1] == ' ' || p[len - 1] == '\t')) len--;
        if (len == n && !strncasecmp(p, token, n)) return true;
        p = end;
    }
    return false;
}

ws_request ws_check_handshake(struct MHD_Connection *c, char accept[32]) {
    const char *upgrade = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Upgrade");
    if (!upgrade || !has_token(upgrade, "websocket")) return WS_NOT_ASKED;
    const char *connection = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Connection");
    const char *version = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Sec-WebSocket-Version");
    const char *key = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Sec-WebSocket-Key");
    size_t raw_len = 0;
    void *raw = key ? base64_decode(key, strlen(key), &raw_len) : NULL;
    free(raw);
    if (!connection || !has_token(connection, "upgrade") || !key || raw_len != 16) return WS_BAD_REQUEST;
    if (!version || strcmp(version, "13")) return WS_BAD_VERSION;
    /* Sec-WebSocket-Accept: base64(SHA-1(key + the RFC's GUID)) */
    struct sha1_ctx sha;
    uint8_t digest[SHA1_DIGEST_SIZE];
    sha1_init(&sha);
    sha1_update(&sha, strlen(key), (const uint8_t *)key);
    sha1_update(&sha, sizeof ws_guid - 1, (const uint8_t *)ws_guid);
    sha1_digest(&sha, sizeof digest, digest);
    size_t n;
    char *b64 = base64_encode(digest, sizeof digest, &n);
    if (!b64) return WS_BAD_REQUEST;
    snprintf(accept, 32, "%s", b64);
    free(b64);
    return WS_UPGRADE;
}

/* ---- the stream -------------------------------------------------------------- */

typedef struct {
    job *j;
    MHD_socket sock;
    struct MHD_UpgradeResponseHandle *urh;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    bool woken;
} stream;

static void no_suspend(void *arg) { (void)arg; }

static void wake(void *arg) {
    stream *s = arg;
    pthread_mutex_lock(&s->lock);
    s->woken = true;
    pthread_cond_signal(&s->changed);
    pthread_mutex_unlock(&s->lock);
}

/* One unmasked frame (a server's frames are not masked), whole. */
static bool send_frame(MHD_socket sock, int opcode, const void *data, size_t len) {
    uint8_t head[10];
    size_t h = 2;
    head[0] = (uint8_t)(0x80 | opcode); /* FIN */
    if (len < 126) {
        head[1] = (uint8_t)len;
    } else if (len <= 0xffff) {
        head[1] = 126, head[2] = (uint8_t)(len >> 8), head[3] = (uint8_t)len, h = 4;
    } else {
        head[1] = 127, h = 10;
        for (int i = 0; i < 8; i++) head[2 + i] = (uint8_t)((uint64_t)len >> (56 - 8 * i));
    }
    const struct { const void *p; size_t n; } parts[2] = {{head, h}, {data, len}};
    for (int k = 0; k < 2; k++)
        for (size_t off = 0; off < parts[k].n;) {
            ssize_t w = send(sock, (const char *)parts[k].p + off, parts[k].n - off, MSG_NOSIGNAL);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) return false;
            off += (size_t)w;
        }
    return true;
}

/* The job's state as the SSE stream names it, with its document. */
static bool send_event(stream *s, const job_view *v) {
    json_t *msg = json_pack("{s:s, s:I, s:o}", "event", job_state_name(v->state), "id", (json_int_t)v->version,
                            "data", job_document(s->j));
    char *text = msg ? json_dumps(msg, JSON_COMPACT) : NULL;
    json_decref(msg);
    bool ok = text && send_frame(s->sock, 0x1, text, strlen(text));
    free(text);
    return ok;
}

static void *run_stream(void *arg) {
    stream *s = arg;
    bool sent = false;
    unsigned seen = 0;
    for (;;) {
        job_view v;
        job_get_view(s->j, &v);
        if (!sent || v.version != seen) {
            if (!send_event(s, &v)) break; /* the client is gone or stopped reading */
            sent = true, seen = v.version;
            if (v.state >= JOB_SUCCEEDED) {
                static const uint8_t normal[2] = {0x03, 0xe8}; /* 1000: normal closure */
                send_frame(s->sock, 0x8, normal, sizeof normal);
                break;
            }
        }
        waiter w = {.suspend = no_suspend, .wake = wake, .arg = s};
        s->woken = false;
        if (job_wait(s->j, seen, &w) != 0) continue; /* changed meanwhile */
        pthread_mutex_lock(&s->lock);
        while (!s->woken) pthread_cond_wait(&s->changed, &s->lock);
        pthread_mutex_unlock(&s->lock);
    }
    /* last: closing ends the request, which releases the job */
    struct MHD_UpgradeResponseHandle *urh = s->urh;
    pthread_cond_destroy(&s->changed);
    pthread_mutex_destroy(&s->lock);
    free(s);
    atomic_fetch_sub(&streams, 1);
    MHD_upgrade_action(urh, MHD_UPGRADE_ACTION_CLOSE);
    return NULL;
}

/* MHD's call once the 101 is sent: the socket is ours; cls is the job. */
static void upgraded(void *cls, struct MHD_Connection *connection, void *req_cls, const char *extra_in,
                     size_t extra_in_size, MHD_socket sock, struct MHD_UpgradeResponseHandle *urh) {
    (void)connection, (void)req_cls, (void)extra_in, (void)extra_in_size;
    stream *s = calloc(1, sizeof *s);
    if (!s) {
        MHD_upgrade_action(urh, MHD_UPGRADE_ACTION_CLOSE);
        return;
    }
    s->j = cls, s->sock = sock, s->urh = urh;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->changed, NULL);
    int flags = fcntl(sock, F_GETFL);
    if (flags >= 0) fcntl(sock, F_SETFL, flags & ~O_NONBLOCK);
    struct timeval tv = {WS_SEND_TIMEOUT_S, 0};
    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    atomic_fetch_add(&streams, 1);
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &attr, run_stream, s)) {
        pthread_cond_destroy(&s->changed);
        pthread_mutex_destroy(&s->lock);
        free(s);
        atomic_fetch_sub(&streams, 1);
        MHD_upgrade_action(urh, MHD_UPGRADE_ACTION_CLOSE);
    }
    pthread_attr_destroy(&attr);
}

struct MHD_Response *ws_events_response(job *j, const char *accept) {
    if (atomic_load(&streams) >= WS_MAX_STREAMS) return NULL;
    struct MHD_Response *resp = MHD_create_response_for_upgrade(upgraded, j);
    if (!resp) return NULL;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_UPGRADE, "websocket");
    MHD_add_response_header(resp, "Sec-WebSocket-Accept", accept);
    return resp;
}
