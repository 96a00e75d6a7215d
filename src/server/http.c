/*
 * http.c - the HTTP daemon: routing, bodies, answers (libmicrohttpd).
 *
 * Threads. libmicrohttpd runs a small pool of event-loop threads
 * (--http-threads, epoll). They parse requests, check limits, answer
 * seeded repeats from the result cache and decode images (bounded: at most
 * max-side squared pixels, read from the header first), and never wait for
 * inference: an upscale request becomes a job on the queue and its
 * connection is suspended (MHD_suspend_connection) until the job
 * finishes, when the worker's wake-up resumes it and the answer is
 * queued. SSE streams suspend the same way between events.
 *
 * A request's life, as libmicrohttpd calls on_request:
 *   1st call   headers only: framing (check_framing: one length, chunked
 *              or nothing, Host, no NUL), route, request id, CORS, API
 *              key, readiness, rate limit, Content-Length and Content-Type
 *              checks. A refusal is answered here, before any of the body
 *              is read.
 *   next calls body pieces: streamed into the multipart reader
 *              (multipart.c) or the JSON buffer; past --max-upload the
 *              rest is discarded and 413 is answered at the end (a client
 *              that announced its size was already refused at the 1st
 *              call), and past twice the limit the connection is closed.
 *   last call  body complete: parse, check and decode the images, create
 *              the job, queue it, suspend; or answer a problem.
 *   resumed    the job is finished: answer with its result.
 * on_completed then logs the access line, records metrics and frees.
 *
 * AUTOMATIC1111's upscaling routes (/sdapi/v1/..., a1111.h) take the same
 * path: the same first call, body and limits, their JSON read by
 * a1111_parse into the same form, the same image checks and job, and
 * their answer written by a1111_answer instead of the image or batch.
 *
 * Connections are conns.c's: it limits them per address, gives a
 * request's headers a deadline and its body a minimum rate, keeps bodies
 * within a global memory budget (taken as they arrive, given back once
 * parsed), and polls the sockets of suspended synchronous requests, whose
 * job is canceled when the client hangs up.
 */
#include "http.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <math.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <unistd.h>

#include <microhttpd.h>

#include "a1111.h"
#include "admin.h"
#include "auth.h"
#include "cache.h"
#include "conns.h"
#include "docs.h"
#include "form.h"
#include "history.h"
#include "jobs.h"
#include "log.h"
#include "metrics.h"
#include "models.h"
#include "multipart.h"
#include "page.h"
#include "websocket.h"
#include "problem.h"
#include "ratelimit.h"
#include "results.h"
#include "runner.h"
#include "status.h"
#include "tls.h"

#define API "/api/v1"

static atomic_int requests_open;

typedef enum { BODY_NONE, BODY_JSON, BODY_MULTIPART } body_kind;

typedef struct request {
    server *srv;
    struct MHD_Connection *conn;
    route_id route;
    char id[48];
    char method[8];
    char path[160];
    char job_id[33];
    char model[64];  /* GET /models/NAME: the name; "" other routes */
    double start;
    char ip[48];
    char client[64]; /* rate limit and queue lane: API key or address */
    char owner[AUTH_IDENTITY_SIZE]; /* owns the jobs and cache entries it makes ("" anonymous) */
    const char *cors_origin; /* the Origin header when allowed */
    rate_decision rate;
    bool rate_checked;
    bool deferred; /* no body expected: answered on the second call */
    int status;
    /* body */
    body_kind body;
    size_t received;
    bool too_large;
    bool over_budget;    /* the upload budget ran out mid-body: the rest is discarded */
    size_t held;         /* body bytes taken from the upload budget */
    conn *tracked;       /* the connection's entry in conns */
    char *json;
    size_t json_len, json_cap;
    multipart *post;
    char field[64];      /* multipart text field being received */
    char *field_value;
    size_t field_len;
    size_t field_more_chars; /* characters past what was kept of it */
    bool field_open;     /* a text field is being received */
    bool part_image;     /* the part being received is an image */
    upscale_form form;
    bool form_ready;
    a1111_request a1111; /* the AUTOMATIC1111 routes' size (a1111.h) */
    /* the job answered, waited on or streamed */
    job *job;
    waiter waiter;
    /* SSE */
    char *event;
    size_t event_len, event_off;
    unsigned event_version;
    bool event_sent, stream_over;
} request;

/* ---- answers ---------------------------------------------------------------- */

static void add_cors(request *r, struct MHD_Response *resp) {
    if (!r->cors_origin) return;
    const string_list *o = &r->srv->cfg.cors_origins;
    bool wildcard = o->count == 1 && strcmp(o->items[0], "*") == 0;
    MHD_add_response_header(resp, "Access-Control-Allow-Origin", wildcard ? "*" : r->cors_origin);
    if (!wildcard) MHD_add_response_header(resp, "Vary", "Origin");
    MHD_add_response_header(resp, "Access-Control-Expose-Headers",
                            "X-Request-Id, X-Seed, X-Inference-Time-Ms, X-Queue-Time-Ms, X-Model, X-Model-Hash, "
                            "X-Input-Size, X-Output-Size, X-Cache, X-Prompt-Tokens, "
                            "X-Prompt-Truncated, Retry-After, RateLimit-Limit, "
                            "RateLimit-Remaining, RateLimit-Reset, RateLimit-Policy, Location");
}

static void add_rate_headers(request *r, struct MHD_Response *resp) {
    if (!r->rate_checked || !ratelimit_enabled(r->srv->ratelimit)) return;
    char v[64];
    snprintf(v, sizeof v, "%d", r->rate.limit);
    MHD_add_response_header(resp, "RateLimit-Limit", v);
    snprintf(v, sizeof v, "%d", r->rate.remaining);
    MHD_add_response_header(resp, "RateLimit-Remaining", v);
    snprintf(v, sizeof v, "%.0f", ceil(r->rate.reset));
    MHD_add_response_header(resp, "RateLimit-Reset", v);
    snprintf(v, sizeof v, "%d;w=%.0f", r->rate.limit, r->srv->cfg.rate_window);
    MHD_add_response_header(resp, "RateLimit-Policy", v);
}

static enum MHD_Result send_response(request *r, int status, struct MHD_Response *resp) {
    MHD_add_response_header(resp, "X-Request-Id", r->id);
    /* draining: clients reconnect, and find a sibling once the listener closes */
    if (atomic_load(&r->srv->phase) == PHASE_DRAINING) MHD_add_response_header(resp, "Connection", "close");
    add_cors(r, resp);
    add_rate_headers(r, resp);
    if (r->srv->tls && r->srv->cfg.hsts) { /* HTTPS is all this daemon speaks */
        char v[32];
        snprintf(v, sizeof v, "max-age=%d", r->srv->cfg.hsts);
        MHD_add_response_header(resp, "Strict-Transport-Security", v);
    }
    r->status = status;
    enum MHD_Result rc = MHD_queue_response(r->conn, (unsigned)status, resp);
    MHD_destroy_response(resp);
    return rc;
}

static enum MHD_Result send_buffer(request *r, int status, const char *type, void *data,
                                   size_t len, enum MHD_ResponseMemoryMode mode) {
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, data, mode);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", type);
    return send_response(r, status, resp);
}

static enum MHD_Result send_json(request *r, int status, json_t *doc) {
    char *text = json_dumps(doc, JSON_COMPACT);
    json_decref(doc);
    if (!text) return MHD_NO;
    return send_buffer(r, status, "application/json", text, strlen(text), MHD_RESPMEM_MUST_FREE);
}

/* Seconds a client should wait before retrying a full queue: the time the
 * workers need to get through what is waiting, from the mean upscale time
 * so far (1 s before the first one). */
static int retry_after_queue(server *srv) {
    dispatch_stats qs;
    dispatch_stats_get(&srv->dispatch, &qs);
    double each = metrics_mean_inference();
    if (!(each > 0)) each = 1;
    double wait = each * (1.0 + (double)qs.depth / (qs.workers ? qs.workers : 1));
    return wait < 1 ? 1 : wait > 60 ? 60 : (int)ceil(wait);
}

static enum MHD_Result send_problem(request *r, const problem *p) {
    size_t len;
    char *body = problem_body(p, r->id, &len);
    if (!body) return MHD_NO;
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", "application/problem+json");
    char v[32];
    switch (p->kind) {
    case PROBLEM_UNAUTHORIZED:
        MHD_add_response_header(resp, "WWW-Authenticate", "Bearer realm=\"sdx4\"");
        break;
    case PROBLEM_RATE_LIMITED:
        snprintf(v, sizeof v, "%.0f", ceil(r->rate.retry_after) < 1 ? 1 : ceil(r->rate.retry_after));
        MHD_add_response_header(resp, "Retry-After", v);
        break;
    case PROBLEM_UPLOADS_BUSY: /* the body was not read: the connection cannot carry on */
        MHD_add_response_header(resp, "Connection", "close");
        /* fall through */
    case PROBLEM_QUEUE_FULL:
    case PROBLEM_NOT_READY:
    case PROBLEM_SHUTTING_DOWN: /* a restarted or sibling instance may take it */
    case PROBLEM_DRAINED:
    case PROBLEM_HISTORY_UNAVAILABLE:
        snprintf(v, sizeof v, "%d", p->retry_after > 0 ? p->retry_after
                                    : p->kind == PROBLEM_QUEUE_FULL ? retry_after_queue(r->srv) : 5);
        MHD_add_response_header(resp, "Retry-After", v);
        break;
    case PROBLEM_QUEUE_TOO_LONG: /* when the work ahead will have shrunk enough */
    case PROBLEM_STORE_UNAVAILABLE:
        snprintf(v, sizeof v, "%d", p->retry_after > 0 ? p->retry_after : 1);
        MHD_add_response_header(resp, "Retry-After", v);
        break;
    case PROBLEM_METHOD: {
        static const char *const allow[ROUTE_COUNT] = {
            [ROUTE_UPSCALE] = "POST, OPTIONS",      [ROUTE_BATCH] = "POST, OPTIONS",
            [ROUTE_JOB_CREATE] = "GET, HEAD, POST, OPTIONS", [ROUTE_JOB_GET] = "GET, HEAD, DELETE, OPTIONS",
            [ROUTE_JOB_RESULT] = "GET, HEAD, OPTIONS", [ROUTE_JOB_EVENTS] = "GET, OPTIONS",
            [ROUTE_HEALTH] = "GET, HEAD, OPTIONS",  [ROUTE_MODEL_INFO] = "GET, HEAD, OPTIONS",
            [ROUTE_MODELS] = "GET, HEAD, OPTIONS",
            [ROUTE_METRICS] = "GET, HEAD, OPTIONS", [ROUTE_OPENAPI] = "GET, HEAD, OPTIONS",
            [ROUTE_DOCS] = "GET, HEAD, OPTIONS",
            [ROUTE_A1111_UPSCALERS] = "GET, HEAD, OPTIONS", [ROUTE_A1111_SINGLE] = "POST, OPTIONS",
            [ROUTE_A1111_BATCH] = "POST, OPTIONS",
            [ROUTE_ADMIN_DRAIN] = "POST, OPTIONS", [ROUTE_ADMIN_UNDRAIN] = "POST, OPTIONS",
            [ROUTE_ADMIN_JOBS] = "GET, HEAD, OPTIONS", [ROUTE_ADMIN_JOB] = "GET, HEAD, DELETE, OPTIONS",
            [ROUTE_ADMIN_USAGE] = "GET, HEAD, OPTIONS", [ROUTE_ADMIN_RELOAD] = "POST, OPTIONS",
        };
        if (allow[r->route]) MHD_add_response_header(resp, "Allow", allow[r->route]);
        break;
    }
    default:
        break;
    }
    if (problem_status(p->kind) >= 400) metrics_rejection(p->kind);
    return send_response(r, problem_status(p->kind), resp);
}

static enum MHD_Result send_simple_problem(request *r, problem_kind kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static enum MHD_Result send_simple_problem(request *r, problem_kind kind, const char *fmt, ...) {
    problem p = {.kind = kind};
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p.detail, sizeof p.detail, fmt, ap);
    va_end(ap);
    return send_problem(r, &p);
}

/* ---- routing ------------------------------------------------------------------- */

typedef enum { M_GET = 1, M_POST = 2, M_DELETE = 4, M_OPTIONS = 8 } method_bit;

static const unsigned route_methods[ROUTE_COUNT] = {
    [ROUTE_UPSCALE] = M_POST,   [ROUTE_BATCH] = M_POST,      [ROUTE_JOB_CREATE] = M_POST | M_GET,
    [ROUTE_JOB_GET] = M_GET | M_DELETE, [ROUTE_JOB_RESULT] = M_GET, [ROUTE_JOB_EVENTS] = M_GET,
    [ROUTE_HEALTH] = M_GET,     [ROUTE_MODEL_INFO] = M_GET,  [ROUTE_MODELS] = M_GET, [ROUTE_METRICS] = M_GET,
    [ROUTE_OPENAPI] = M_GET,    [ROUTE_DOCS] = M_GET,
    [ROUTE_A1111_UPSCALERS] = M_GET, [ROUTE_A1111_SINGLE] = M_POST, [ROUTE_A1111_BATCH] = M_POST,
    [ROUTE_ADMIN_DRAIN] = M_POST, [ROUTE_ADMIN_UNDRAIN] = M_POST, [ROUTE_ADMIN_JOBS] = M_GET,
    [ROUTE_ADMIN_JOB] = M_GET | M_DELETE, [ROUTE_ADMIN_USAGE] = M_GET, [ROUTE_ADMIN_RELOAD] = M_POST,
};

static bool is_job_id(const char *s, size_t len) {
    if (len != 32) return false;
    for (size_t i = 0; i < len; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return false;
    return true;
}

static route_id match_route(const char *url, char job_id[33], char model[64]) {
    static const struct {
        const char *path;
        route_id route;
    } fixed[] = {
        {API "/upscale", ROUTE_UPSCALE},     {API "/batch-upscale", ROUTE_BATCH},
        {API "/jobs", ROUTE_JOB_CREATE},     {API "/health", ROUTE_HEALTH},
        {API "/model-info", ROUTE_MODEL_INFO}, {API "/models", ROUTE_MODELS},
        {"/metrics", ROUTE_METRICS},
        {"/openapi.json", ROUTE_OPENAPI},    {"/docs", ROUTE_DOCS},
        {"/docs/", ROUTE_DOCS},
        /* AUTOMATIC1111's web UI API, its upscaling part (a1111.c) */
        {"/sdapi/v1/upscalers", ROUTE_A1111_UPSCALERS},
        {"/sdapi/v1/extra-single-image", ROUTE_A1111_SINGLE},
        {"/sdapi/v1/extra-batch-images", ROUTE_A1111_BATCH},
        {"/", ROUTE_DOCS}, /* the web page (page.c): a page for people, as /docs is */
        {API "/admin/drain", ROUTE_ADMIN_DRAIN}, {API "/admin/undrain", ROUTE_ADMIN_UNDRAIN},
        {API "/admin/jobs", ROUTE_ADMIN_JOBS},   {API "/admin/usage", ROUTE_ADMIN_USAGE},
    };
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++)
        if (strcmp(url, fixed[i].path) == 0) return fixed[i].route;
    if (strncmp(url, "/docs/", 6) == 0) return ROUTE_DOCS;
    const char *models = API "/models/"; /* one model's model-info, by name */
    size_t m = strlen(models);
    if (strncmp(url, models, m) == 0) {
        size_t name_len = strlen(url + m);
        if (!name_len || name_len >= 64 || strchr(url + m, '/')) return ROUTE_UNKNOWN;
        memcpy(model, url + m, name_len + 1);
        return ROUTE_MODEL_INFO;
    }
    const char *admin_models = API "/admin/models/", *reload = strrchr(url, '/');
    size_t am = strlen(admin_models);
    if (strncmp(url, admin_models, am) == 0 && strcmp(reload, "/reload") == 0) {
        size_t name_len = (size_t)(reload - (url + am));
        if (!name_len || name_len >= 64 || memchr(url + am, '/', name_len)) return ROUTE_UNKNOWN;
        memcpy(model, url + am, name_len);
        model[name_len] = '\0';
        return ROUTE_ADMIN_RELOAD;
    }
    const char *admin_job = API "/admin/jobs/";
    size_t a = strlen(admin_job);
    if (strncmp(url, admin_job, a) == 0) {
        if (!is_job_id(url + a, strlen(url + a))) return ROUTE_UNKNOWN;
        memcpy(job_id, url + a, 33);
        return ROUTE_ADMIN_JOB;
    }
    const char *prefix = API "/jobs/";
    size_t n = strlen(prefix);
    if (strncmp(url, prefix, n) != 0) return ROUTE_UNKNOWN;
    const char *id = url + n, *slash = strchr(id, '/');
    size_t id_len = slash ? (size_t)(slash - id) : strlen(id);
    if (!is_job_id(id, id_len)) return ROUTE_UNKNOWN;
    memcpy(job_id, id, 32);
    job_id[32] = '\0';
    if (!slash) return ROUTE_JOB_GET;
    if (strcmp(slash, "/result") == 0) return ROUTE_JOB_RESULT;
    if (strcmp(slash, "/events") == 0) return ROUTE_JOB_EVENTS;
    return ROUTE_UNKNOWN;
}

static unsigned method_of(const char *method) {
    if (strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0) return M_GET;
    if (strcmp(method, "POST") == 0) return M_POST;
    if (strcmp(method, "DELETE") == 0) return M_DELETE;
    if (strcmp(method, "OPTIONS") == 0) return M_OPTIONS;
    return 0;
}

static const char *header(request *r, const char *name) {
    return MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, name);
}

typedef struct {
    char *text;
    size_t len;
    bool failed;
} joined_header;

static enum MHD_Result join_forwarded_for(void *cls, enum MHD_ValueKind kind, const char *key,
                                          const char *value) {
    joined_header *j = cls;
    (void)kind;
    if (!key || !value || strcasecmp(key, "X-Forwarded-For") != 0) return MHD_YES;
    size_t n = strlen(value);
    char *grown = realloc(j->text, j->len + n + 3);
    if (!grown) {
        j->failed = true;
        return MHD_NO;
    }
    j->text = grown;
    j->len += (size_t)sprintf(j->text + j->len, "%s%s", j->len ? ", " : "", value);
    return MHD_YES;
}

/* Every X-Forwarded-For line, joined in order (a list header may come in
 * several lines, and MHD_lookup_connection_value sees only the first: a
 * client's forged first line would hide the ones its proxies appended).
 * NULL when there is none, or without memory: then the peer is the
 * client, never a part of the list. */
static char *forwarded_for(request *r) {
    joined_header j = {0};
    MHD_get_connection_values(r->conn, MHD_HEADER_KIND, join_forwarded_for, &j);
    if (!j.failed) return j.text;
    free(j.text);
    return NULL;
}

/* The client's X-Request-Id if it is a sane token, else a fresh one. */
static void set_request_id(request *r) {
    const char *given = header(r, "X-Request-Id");
    if (given) {
        size_t n = strlen(given);
        bool ok = n >= 1 && n < sizeof r->id;
        for (size_t i = 0; ok && i < n; i++)
            ok = (given[i] >= '0' && given[i] <= '9') || (given[i] >= 'a' && given[i] <= 'z') ||
                 (given[i] >= 'A' && given[i] <= 'Z') || given[i] == '-' || given[i] == '_' ||
                 given[i] == '.';
        if (ok) {
            memcpy(r->id, given, n + 1);
            return;
        }
    }
    uint8_t b[8] = {0};
    if (getrandom(b, sizeof b, 0) != sizeof b) memcpy(b, &r->start, sizeof b);
    for (int i = 0; i < 8; i++) snprintf(r->id + 2 * i, 3, "%02x", b[i]);
}

/* What the access log and every answer name the request by: method, path,
 * route, request id and the client's address, from X-Forwarded-For only
 * when `trust_forwarded` and the peer is a trusted proxy (the lines are
 * joined only then). */
static void identify(request *r, const char *url, const char *method, bool trust_forwarded) {
    snprintf(r->method, sizeof r->method, "%s", method);
    snprintf(r->path, sizeof r->path, "%s", url);
    r->route = match_route(url, r->job_id, r->model);
    set_request_id(r);
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    const struct sockaddr *peer = ci ? ci->client_addr : NULL;
    char *forwarded =
        trust_forwarded && peer && ratelimit_trusts_peer(r->srv->ratelimit, peer) ? forwarded_for(r) : NULL;
    ratelimit_client_address(r->srv->ratelimit, peer, forwarded, r->ip, sizeof r->ip);
    free(forwarded);
}

static bool origin_allowed(const server *srv, const char *origin) {
    const string_list *o = &srv->cfg.cors_origins;
    for (int i = 0; i < o->count; i++)
        if (strcmp(o->items[i], "*") == 0 || strcasecmp(o->items[i], origin) == 0) return true;
    return false;
}

static bool needs_key(route_id route) {
    return route != ROUTE_HEALTH && route != ROUTE_OPENAPI && route != ROUTE_DOCS &&
           route != ROUTE_PREFLIGHT;
}

static bool is_admin(route_id route) {
    return route >= ROUTE_ADMIN_DRAIN && route <= ROUTE_ADMIN_RELOAD;
}

static bool takes_body(route_id route) {
    return route == ROUTE_UPSCALE || route == ROUTE_BATCH || route == ROUTE_JOB_CREATE ||
           route == ROUTE_A1111_SINGLE || route == ROUTE_A1111_BATCH;
}

/* An upscale of AUTOMATIC1111's API (a1111.h): JSON in A1111's shape. */
static bool is_a1111(route_id route) {
    return route == ROUTE_A1111_SINGLE || route == ROUTE_A1111_BATCH;
}

/* ---- request bodies ---------------------------------------------------------------- */

static void flush_field(request *r) {
    if (!r->field_open) return;
    form_set_cut_text(&r->form, r->field, r->field_value ? r->field_value : "", r->field_len,
                      r->field_more_chars);
    free(r->field_value);
    r->field_value = NULL;
    r->field_len = r->field_more_chars = 0;
    r->field_open = false;
}

/* A multipart part begins (the previous one has ended). An image must be
 * a file part: as text, it is refused like an image in the query string. */
static int on_part(void *cls, const char *name, bool file) {
    request *r = cls;
    upscale_form *f = &r->form;
    flush_field(r);
    if (f->error.kind) return 0; /* keep draining; the first problem is answered */
    snprintf(r->field, sizeof r->field, "%s", name);
    r->part_image = file && (strcmp(name, "image") == 0 || (f->batch && strcmp(name, "images") == 0));
    if (r->part_image) form_image_begin(f);
    else r->field_open = true;
    return 0;
}

static int on_part_data(void *cls, const char *data, size_t size) {
    request *r = cls;
    upscale_form *f = &r->form;
    if (f->error.kind) return 0;
    if (r->part_image) {
        form_image_append(f, data, size);
        return 0;
    }
    /* a text field is kept as far as the longest prompt could go (UTF-8:
     * 4 bytes a character at most); past that its characters are counted */
    size_t cap = (size_t)r->srv->cfg.max_prompt_chars * 4 + 64;
    size_t keep = r->field_len < cap ? cap - r->field_len : 0;
    if (keep > size) keep = size;
    for (size_t i = keep; i < size; i++) r->field_more_chars += ((unsigned char)data[i] & 0xc0) != 0x80;
    if (!keep) return 0;
    char *grown = realloc(r->field_value, r->field_len + keep + 1);
    if (!grown) return problem_set(&f->error, PROBLEM_INTERNAL, "out of memory");
    memcpy(grown + r->field_len, data, keep);
    r->field_value = grown;
    r->field_len += keep;
    return 0;
}

/* Gives the body's bytes back to the upload budget. */
static void release_body(request *r) {
    conns_upload_release(r->srv->conns, r->held);
    r->held = 0;
}

/* Frees what was kept of a body that will be refused at its end. */
static void drop_body(request *r) {
    free(r->json);
    r->json = NULL;
    r->json_len = r->json_cap = 0;
    multipart_free(r->post);
    r->post = NULL;
    if (r->form_ready) form_free(&r->form);
    r->form_ready = false;
    free(r->field_value);
    r->field_value = NULL;
    r->field_open = false;
    release_body(r);
}

/* Takes a piece of the body; false when the client keeps sending far past
 * the limit, to be cut off (an answer can only be queued once the body has
 * ended, and a body without Content-Length may never end). */
static bool receive(request *r, const char *data, size_t size) {
    r->received += size;
    if (r->received / 2 > r->srv->cfg.max_upload) return false;
    if (r->too_large || r->over_budget || r->body == BODY_NONE) return true; /* discarded */
    if (r->received > r->srv->cfg.max_upload) {
        r->too_large = true; /* stop keeping anything; 413 once the body ends */
        drop_body(r);
        return true;
    }
    if (!conns_upload_take(r->srv->conns, size)) {
        r->over_budget = true; /* other bodies took the budget meanwhile; 503 at the end */
        conns_upload_refused(r->srv->conns);
        drop_body(r);
        return true;
    }
    r->held += size;
    if (r->body == BODY_MULTIPART) {
        if (multipart_feed(r->post, data, size) && !r->form.error.kind)
            problem_set(&r->form.error, PROBLEM_MALFORMED, "malformed multipart/form-data body: %s",
                        multipart_error(r->post));
        return true;
    }
    if (r->json_len + size > r->json_cap) {
        size_t cap = r->json_cap ? r->json_cap : 65536;
        while (cap < r->json_len + size) cap *= 2;
        char *grown = realloc(r->json, cap);
        if (!grown) {
            problem_set(&r->form.error, PROBLEM_INTERNAL, "out of memory");
            return true;
        }
        r->json = grown;
        r->json_cap = cap;
    }
    memcpy(r->json + r->json_len, data, size);
    r->json_len += size;
    return true;
}

/* A query value, with its length: libmicrohttpd decodes %00, and the value
 * must not be cut at that NUL but refused like one in a body. */
static enum MHD_Result add_query_value(void *cls, enum MHD_ValueKind kind, const char *key,
                                       size_t key_len, const char *value, size_t value_len) {
    request *r = cls;
    (void)kind;
    if (strlen(key) != key_len)
        problem_set(&r->form.error, PROBLEM_INVALID_FIELD, "a query parameter name contains a NUL byte");
    else form_set_text(&r->form, key, value ? value : "", value ? value_len : 0);
    return r->form.error.kind ? MHD_NO : MHD_YES;
}

/* Any query parameter of AUTOMATIC1111's routes: refused, naming it. */
static enum MHD_Result refuse_query_value(void *cls, enum MHD_ValueKind kind, const char *key, size_t key_len,
                                          const char *value, size_t value_len) {
    request *r = cls;
    (void)kind, (void)value, (void)value_len;
    char shown[40];
    size_t n = 0;
    for (size_t i = 0; i < key_len && n + 1 < sizeof shown; i++)
        shown[n++] = key[i] >= 0x20 && key[i] < 0x7f && key[i] != '"' ? key[i] : '?';
    shown[n] = '\0';
    if (!r->form.error.kind)
        problem_field(&r->form.error, shown, NULL, "unknown query parameter \"%s\": AUTOMATIC1111's routes take "
                                                   "their fields in the JSON body", shown);
    return MHD_NO;
}

/* ---- HTTP framing ----------------------------------------------------------------------- */

/* What the framing checks need from the header lines. */
typedef struct {
    int content_length, transfer_encoding, host; /* how many lines of each */
    const char *coding;                          /* the Transfer-Encoding */
    uintptr_t head, head_end; /* the request head in libmicrohttpd's buffer */
    const char *last_key;     /* the header line before, and where its value ends */
    uintptr_t last_value_end;
    const char *cut;    /* a header whose value was cut short */
    const char *broken; /* why: a NUL, or a folded line */
} header_census;

/* A NUL inside a header value: libmicrohttpd (0.9.75) parses the request
 * head in place and takes each value's length with strlen, so the bytes
 * after a NUL vanish from the value, and no API tells. They are still in
 * its buffer, between the value's end and the next line, where only the
 * line's CR LF (overwritten with NULs) and spaces may be. An obsolete
 * folded line (RFC 9112 5.2) leaves its text there too: 0.9.75 glues it
 * to the header's name instead of its value, so it is refused as well.
 * Gaps outside the head or out of order are not judged. Returns why the
 * value before the gap was cut short, or NULL. */
static const char *cut_short(const header_census *c, uintptr_t from, uintptr_t to) {
    if (!(c->head <= from && from <= to && to <= c->head_end)) return NULL;
    const char *p = (const char *)from, *end = (const char *)to;
    while (p < end && (!*p || *p == '\r' || *p == '\n')) p++;
    bool folded = p == (const char *)from + 2 && p < end && (*p == ' ' || *p == '\t'); /* CR LF SP */
    for (; p < end; p++)
        if (*p && *p != '\r' && *p != '\n' && *p != ' ' && *p != '\t')
            return folded ? "a folded line (obsolete line folding)" : "a NUL byte";
    return NULL;
}

static void check_gap(header_census *c, uintptr_t to) {
    const char *why = c->cut ? NULL : cut_short(c, c->last_value_end, to);
    if (why) c->cut = c->last_key, c->broken = why;
}

static enum MHD_Result count_header(void *cls, enum MHD_ValueKind kind, const char *key,
                                    size_t key_len, const char *value, size_t value_len) {
    header_census *c = cls;
    (void)kind, (void)key_len;
    check_gap(c, (uintptr_t)key);
    c->last_key = key;
    c->last_value_end = (uintptr_t)value + value_len;
    if (strcasecmp(key, "Content-Length") == 0) c->content_length++;
    else if (strcasecmp(key, "Host") == 0) c->host++;
    else if (strcasecmp(key, "Transfer-Encoding") == 0) {
        c->transfer_encoding++;
        c->coding = value;
    }
    return MHD_YES;
}

/* The framing of a request, judged on the first call from all its header
 * lines (RFC 9112 6.3: when a body's length cannot be trusted, answer 400
 * and close). libmicrohttpd reads a body by the first Transfer-Encoding
 * line, else the first Content-Length, and lets the rest through: with two
 * lengths the rest of a body would run as another request, and a coding
 * other than chunked alone is read until the client closes. A refusal
 * queued on the first call makes libmicrohttpd close the connection after
 * it, unread body and all. Returns -1 when the request was refused.
 *
 * What libmicrohttpd answers itself, before any callback, cannot be
 * judged here: a Content-Length that is not a number (400, sent with its
 * status line twice: after its error reply the state machine goes on as
 * if the headers were fine, fixed upstream in 1.0.0), and a chunk size line
 * longer than its read buffer (500). Both close the connection. */
static int check_framing(request *r, const char *url, const char *method, const char *version) {
    header_census c = {.head = (uintptr_t)method};
    const union MHD_ConnectionInfo *head =
        MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_REQUEST_HEADER_SIZE);
    c.head_end = head ? c.head + head->header_size : 0;
    MHD_get_connection_values_n(r->conn, MHD_HEADER_KIND, count_header, &c);
    check_gap(&c, c.head_end);

    bool http10 = strcmp(version, "HTTP/1.0") == 0;
    char why[160] = "";
    if (c.cut) snprintf(why, sizeof why, "the %.40s header has %s", c.cut, c.broken);
    else if (c.host > 1) snprintf(why, sizeof why, "Host is given %d times", c.host);
    else if (!c.host && !http10)
        snprintf(why, sizeof why, "the request has no Host header (required since HTTP/1.1)");
    else if (c.content_length > 1)
        snprintf(why, sizeof why, "Content-Length is given %d times", c.content_length);
    else if (c.transfer_encoding && c.content_length)
        snprintf(why, sizeof why, "Content-Length and Transfer-Encoding together");
    else if (c.transfer_encoding > 1 || (c.transfer_encoding && strcasecmp(c.coding, "chunked") != 0))
        snprintf(why, sizeof why, "only the chunked transfer coding is accepted (Transfer-Encoding: %.40s%s)",
                 c.coding, c.transfer_encoding > 1 ? ", ..." : "");
    else if (c.transfer_encoding && http10)
        snprintf(why, sizeof why, "Transfer-Encoding in an HTTP/1.0 request");
    if (!why[0]) return 0;

    identify(r, url, method, false); /* no X-Forwarded-For is trusted on a malformed request */
    send_simple_problem(r, PROBLEM_MALFORMED, "%s", why);
    return -1;
}

/* ---- the first call: everything decided from the headers ----------------------------- */

static enum MHD_Result preflight(request *r, unsigned allowed) {
    const char *origin = header(r, "Origin");
    const char *method = header(r, "Access-Control-Request-Method");
    if (!origin || !method) {
        struct MHD_Response *resp = MHD_create_response_from_buffer(0, "", MHD_RESPMEM_PERSISTENT);
        MHD_add_response_header(resp, "Allow", allowed == (M_GET | M_POST) ? "GET, HEAD, POST, OPTIONS"
                                               : allowed & M_POST ? "POST, OPTIONS"
                                               : allowed & M_DELETE ? "GET, HEAD, DELETE, OPTIONS"
                                                                    : "GET, HEAD, OPTIONS");
        return send_response(r, 204, resp);
    }
    if (!origin_allowed(r->srv, origin))
        return send_simple_problem(r, PROBLEM_FORBIDDEN, "origin %s is not allowed by CORS",
                                   strlen(origin) < 200 ? origin : "(too long)");
    if (!(method_of(method) & allowed))
        return send_simple_problem(r, PROBLEM_METHOD, "%s is not allowed here",
                                   strlen(method) < 16 ? method : "(too long)");
    r->cors_origin = origin;
    struct MHD_Response *resp = MHD_create_response_from_buffer(0, "", MHD_RESPMEM_PERSISTENT);
    MHD_add_response_header(resp, "Access-Control-Allow-Methods",
                            allowed == (M_GET | M_POST) ? "GET, POST"
                            : allowed & M_POST          ? "POST"
                            : allowed & M_DELETE        ? "GET, DELETE"
                                                        : "GET");
    MHD_add_response_header(resp, "Access-Control-Allow-Headers",
                            "Authorization, X-API-Key, Content-Type, Accept, X-Request-Id");
    MHD_add_response_header(resp, "Access-Control-Max-Age", "600");
    return send_response(r, 204, resp);
}

/* A body that will be read: refused at once when the uploads in progress
 * leave no room for it in the budget. */
static enum MHD_Result accept_body(request *r, unsigned long long announced) {
    if (conns_upload_fits(r->srv->conns, (size_t)announced)) return MHD_YES;
    conns_upload_refused(r->srv->conns);
    return send_simple_problem(r, PROBLEM_UPLOADS_BUSY,
                               "the uploads in progress hold the %zu bytes allowed at once; retry shortly",
                               r->srv->cfg.upload_budget);
}

static enum MHD_Result begin_body(request *r) {
    const server_config *c = &r->srv->cfg;
    const char *length = header(r, "Content-Length");
    unsigned long long announced = 1; /* without a length: at least a byte */
    if (length) {
        char *end;
        unsigned long long n = strtoull(length, &end, 10);
        if (*end == '\0' && n > c->max_upload)
            return send_simple_problem(r, PROBLEM_TOO_LARGE,
                                       "the body is %llu bytes; at most %zu are accepted", n,
                                       c->max_upload);
        if (*end == '\0') announced = n;
    }
    const char *type = header(r, "Content-Type");
    form_kind kind = r->route == ROUTE_BATCH || r->route == ROUTE_A1111_BATCH ? FORM_BATCH
                     : r->route == ROUTE_JOB_CREATE                           ? FORM_JOB
                                                                              : FORM_UPSCALE;
    form_limits limits = {c->max_steps, c->max_prompt_chars, c->max_batch, r->srv->model_names, r->srv->nmodels};
    if (form_init(&r->form, &limits, kind)) return MHD_NO;
    r->form_ready = true;
    bool json = type && strncasecmp(type, "application/json", 16) == 0 &&
                (type[16] == '\0' || type[16] == ';' || type[16] == ' ');
    if (is_a1111(r->route)) { /* JSON only; without a Content-Type too, as FastAPI reads it */
        a1111_init(&r->a1111);
        if (type && !json)
            return send_simple_problem(r, PROBLEM_CONTENT_TYPE, "AUTOMATIC1111's routes take an application/json body");
        r->body = BODY_JSON;
        return accept_body(r, announced);
    }
    if (type && strncasecmp(type, "multipart/form-data", 19) == 0) {
        r->body = BODY_MULTIPART;
        const char *why;
        r->post = multipart_new(type, on_part, on_part_data, r, &why);
        if (!r->post)
            return why ? send_simple_problem(r, PROBLEM_MALFORMED, "%s", why)
                       : send_simple_problem(r, PROBLEM_INTERNAL, "out of memory");
        return accept_body(r, announced);
    }
    if (json) {
        r->body = BODY_JSON;
        return accept_body(r, announced);
    }
    return send_simple_problem(r, PROBLEM_CONTENT_TYPE,
                               "the body must be multipart/form-data or application/json%s",
                               type ? "" : " (no Content-Type was sent)");
}

static enum MHD_Result answer_get(request *r);

static enum MHD_Result begin(request *r, const char *url, const char *method) {
    server *srv = r->srv;
    identify(r, url, method, true);
    snprintf(r->client, sizeof r->client, "%s", r->ip);

    const char *origin = header(r, "Origin");
    if (origin && origin_allowed(srv, origin)) r->cors_origin = origin;

    if (r->route == ROUTE_UNKNOWN)
        return send_simple_problem(r, PROBLEM_NOT_FOUND, "no such resource");
    unsigned m = method_of(method);
    if (m == M_OPTIONS) {
        unsigned allowed = route_methods[r->route];
        r->route = ROUTE_PREFLIGHT;
        return preflight(r, allowed);
    }
    if (!(m & route_methods[r->route]) || (r->route == ROUTE_JOB_EVENTS && strcmp(method, "HEAD") == 0))
        return send_simple_problem(r, PROBLEM_METHOD, "%s is not allowed here",
                                   strlen(method) < 16 ? method : "this method");

    if (r->route == ROUTE_JOB_GET && m == M_DELETE) r->route = ROUTE_JOB_CANCEL;
    if (r->route == ROUTE_JOB_CREATE && m == M_GET) r->route = ROUTE_JOB_LIST;
    if (r->route == ROUTE_ADMIN_JOB && m == M_DELETE) r->route = ROUTE_ADMIN_JOB_CANCEL;

    if (needs_key(r->route)) {
        double retry;
        auth_client client;
        unsigned scope = is_admin(r->route) ? AUTH_SCOPE_ADMIN : AUTH_SCOPE_UPSCALE;
        problem_kind k = auth_check(srv->auth, r->ip, header(r, "Authorization"), header(r, "X-API-Key"), scope,
                                    mono_now(), &client, &retry);
        memcpy(r->owner, client.identity, sizeof r->owner);
        if (k == PROBLEM_RATE_LIMITED) {
            metrics_auth_throttled();
            r->rate.retry_after = retry; /* Retry-After; no RateLimit-* headers: not that policy */
            return send_simple_problem(r, k, "too many failed API key attempts from this address; retry in %.0f s",
                                       ceil(retry) < 1 ? 1 : ceil(retry));
        }
        if (k == PROBLEM_STORE_UNAVAILABLE) {
            metrics_ratelimit_unavailable();
            return send_simple_problem(r, k, "API keys are checked against what the cluster keeps in Redis, "
                                             "which cannot be reached; retry in 1 s");
        }
        if (k == PROBLEM_UNAUTHORIZED && client.refusal)
            return send_simple_problem(r, k, "the bearer token was refused: %s", client.refusal);
        if (k == PROBLEM_UNAUTHORIZED)
            return send_simple_problem(r, k, "send %s as Authorization: Bearer KEY or X-API-Key: KEY",
                                       scope == AUTH_SCOPE_ADMIN ? "an admin key" : "an API key");
        if (k == PROBLEM_FORBIDDEN && client.identity[0]) /* a valid credential without the scope */
            return send_simple_problem(r, k, scope == AUTH_SCOPE_ADMIN
                                                 ? "this credential has no admin scope: the admin API needs an "
                                                   "admin key or a token with the admin scope"
                                                 : "the credential lacks the upscale scope");
        if (k == PROBLEM_FORBIDDEN) return send_simple_problem(r, k, "the API key is not valid");
        if (r->owner[0]) snprintf(r->client, sizeof r->client, "%s", r->owner);
    }

    if (!takes_body(r->route)) return answer_get(r);

    int phase = atomic_load(&srv->phase);
    if (phase == PHASE_DRAINING)
        return send_simple_problem(r, PROBLEM_SHUTTING_DOWN, "the server is shutting down");
    if (atomic_load(&srv->drained))
        return send_simple_problem(r, PROBLEM_DRAINED, "an administrator drained this node: it takes no new "
                                                       "upscales; retry, another node may take it");
    if (phase != PHASE_READY)
        return send_simple_problem(r, PROBLEM_NOT_READY, "the model is %s",
                                   phase == PHASE_FAILED    ? "unavailable"
                                   : phase == PHASE_WARMING ? "loaded and warming up (its first upscale runs)"
                                                            : "still loading");
    ratelimit_check(srv->ratelimit, r->client, mono_now(), &r->rate);
    if (r->rate.unavailable) {
        metrics_ratelimit_unavailable();
        return send_simple_problem(r, PROBLEM_STORE_UNAVAILABLE,
                                   "the rate limits are kept in Redis, which cannot be reached; retry in 1 s");
    }
    r->rate_checked = true;
    if (!r->rate.allowed)
        return send_simple_problem(r, PROBLEM_RATE_LIMITED,
                                   "at most %d upscale requests per %g s per client; retry in %.0f s",
                                   r->rate.limit, srv->cfg.rate_window, ceil(r->rate.retry_after));
    return begin_body(r);
}

/* ---- GET routes ------------------------------------------------------------------------ */

static enum MHD_Result send_image(request *r, job *j);
static enum MHD_Result redirect_to_store(request *r, job *j);

static ssize_t read_events(void *cls, uint64_t pos, char *buf, size_t max);

static void wake_connection(void *arg) { MHD_resume_connection(((request *)arg)->conn); }
static void suspend_connection(void *arg) { MHD_suspend_connection(((request *)arg)->conn); }

static enum MHD_Result answer_job(request *r) {
    job *j = r->job;
    job_view v;
    job_get_view(j, &v);
    switch (r->route) {
    case ROUTE_JOB_CANCEL:
        job_delete(j);
        return send_json(r, 200, job_document(j));
    case ROUTE_JOB_GET:
        return send_json(r, 200, job_document(j));
    case ROUTE_JOB_RESULT:
        if (v.state == JOB_SUCCEEDED) {
            if (job_kind(j) == FORM_BATCH) return send_json(r, 200, job_batch_results(j));
            if (results_stored(r->srv, job_listed(j))) return redirect_to_store(r, j);
            return send_image(r, j);
        }
        if (v.state == JOB_CANCELED) return send_simple_problem(r, PROBLEM_CANCELED, "the job was canceled");
        if (v.state == JOB_FAILED)
            return send_simple_problem(r, PROBLEM_NOT_FINISHED, "the job failed: %s", v.error.detail);
        return send_simple_problem(r, PROBLEM_NOT_FINISHED, "the job is %s; its result is not ready",
                                   job_state_name(v.state));
    case ROUTE_JOB_EVENTS: {
        char accept[32];
        switch (ws_check_handshake(r->conn, accept)) {
        case WS_UPGRADE: { /* the same events over a WebSocket (websocket.c) */
            struct MHD_Response *ws = ws_events_response(r->job, accept);
            if (!ws) return send_simple_problem(r, PROBLEM_QUEUE_FULL, "too many WebSocket streams run now");
            return send_response(r, MHD_HTTP_SWITCHING_PROTOCOLS, ws);
        }
        case WS_BAD_VERSION:
            return send_simple_problem(r, PROBLEM_MALFORMED, "Sec-WebSocket-Version must be 13");
        case WS_BAD_REQUEST:
            return send_simple_problem(r, PROBLEM_MALFORMED, "a WebSocket handshake needs Connection: Upgrade "
                                                             "and a Sec-WebSocket-Key of 16 bytes");
        case WS_NOT_ASKED:
            break;
        }
        struct MHD_Response *resp =
            MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, read_events, r, NULL);
        if (!resp) return MHD_NO;
        MHD_add_response_header(resp, "Content-Type", "text/event-stream");
        MHD_add_response_header(resp, "Cache-Control", "no-cache");
        MHD_add_response_header(resp, "X-Accel-Buffering", "no");
        return send_response(r, 200, resp);
    }
    default:
        return MHD_NO;
    }
}

/* ---- GET /jobs: the request history --------------------------------------------------- */

typedef struct {
    history_query *q;
    problem *p;
    unsigned seen; /* bit per parameter: each may come once */
} list_args;

static int bad_list_arg(problem *p, const char *field, const char *allowed) {
    return problem_field(p, field, allowed, "%s must be %s", field, allowed);
}

static enum MHD_Result add_list_arg(void *cls, enum MHD_ValueKind kind, const char *key, size_t key_len,
                                    const char *value, size_t value_len) {
    static const char *const names[] = {"limit", "cursor", "status", "since", "until"};
    static const char *const statuses[] = {"succeeded", "failed", "canceled"};
    list_args *a = cls;
    history_query *q = a->q;
    (void)kind;
    int which = -1;
    for (int i = 0; i < 5 && strlen(key) == key_len; i++)
        if (strcmp(key, names[i]) == 0) which = i;
    if (which < 0) {
        problem_field(a->p, strlen(key) < 40 ? key : "query", "limit, cursor, status, since, until",
                      "unknown query parameter \"%.40s\"", key);
        return MHD_NO;
    }
    if (a->seen & 1u << which) {
        problem_field(a->p, key, NULL, "%s is given more than once", key);
        return MHD_NO;
    }
    a->seen |= 1u << which;
    if (!value || strlen(value) != value_len) value = ""; /* %00 inside: refused below */
    char *end;
    switch (which) {
    case 0: {
        long limit = strtol(value, &end, 10);
        if (!isdigit((unsigned char)*value) || *end || limit < 1 || limit > HISTORY_MAX_LIMIT)
            return bad_list_arg(a->p, "limit", "an integer from 1 to 100"), MHD_NO;
        q->limit = (int)limit;
        break;
    }
    case 1:
        if (!*value) return bad_list_arg(a->p, "cursor", "the next_cursor of a previous page"), MHD_NO;
        q->cursor = value;
        break;
    case 2:
        for (int i = 0; i < 3; i++)
            if (strcmp(value, statuses[i]) == 0) q->status = statuses[i];
        if (q->status) break;
        /* the history records jobs as they finish: an unfinished one is
         * found by its id (GET /jobs/{id}), never in a listing */
        problem_field(a->p, "status", "succeeded, failed or canceled",
                      "status must be succeeded, failed or canceled%s",
                      strcmp(value, "queued") == 0 || strcmp(value, "running") == 0
                          ? ": the history holds finished jobs only"
                          : "");
        return MHD_NO;
    default: {
        if (history_parse_time(value, which == 3 ? &q->since : &q->until))
            return bad_list_arg(a->p, names[which], "an RFC 3339 time, e.g. 2026-12-06T17:00:00Z"), MHD_NO;
    }
    }
    return MHD_YES;
}

/* The caller's own finished jobs, newest first. Anonymous clients (no API
 * keys) get 403: their jobs are admitted by id alone, and a listing would
 * hand every anonymous job's id to anyone. Without --history the route
 * is 404: history is a resource this server does not have, by its
 * settings, not a failure (a 5xx would alarm whoever watches error rates). */
static enum MHD_Result answer_job_list(request *r) {
    server *srv = r->srv;
    if (!srv->history)
        return send_simple_problem(r, PROBLEM_NOT_FOUND, "request history is off on this server "
                                                         "(sdx4 serve --history FILE or postgresql://... turns it on)");
    if (!r->owner[0])
        return send_simple_problem(r, PROBLEM_FORBIDDEN, "the history lists the jobs of an API key, and this "
                                                         "server has no API keys: a job is found by its id only");
    history_query q = {.owner = r->owner, .since = -INFINITY, .until = INFINITY, .limit = 20};
    problem p = {0};
    list_args a = {.q = &q, .p = &p};
    MHD_get_connection_values_n(r->conn, MHD_GET_ARGUMENT_KIND, add_list_arg, &a);
    if (p.kind) return send_problem(r, &p);
    json_t *page;
    char err[256];
    switch (history_list(srv->history, &q, &page, err, sizeof err)) {
    case HISTORY_OK:
        return send_json(r, 200, page);
    case HISTORY_BAD_CURSOR:
        problem_field(&p, "cursor", "the next_cursor of a previous page", "cursor is not one this server gave out");
        return send_problem(r, &p);
    default:
        log_event(LOG_WARN, "history_read_failed", json_pack("{s:s,s:s}", "request_id", r->id, "error", err));
        return send_simple_problem(r, PROBLEM_HISTORY_UNAVAILABLE,
                                   "the request history cannot be read now; retry shortly");
    }
}

/* model-info's ?model=NAME (other query parameters are ignored, as on
 * every GET route): the name, or a name that matches none when it does
 * not fit, so that it is answered as unknown. */
static enum MHD_Result model_info_arg(void *cls, enum MHD_ValueKind kind, const char *key, size_t key_len,
                                      const char *value, size_t value_len) {
    request *r = cls;
    (void)kind;
    if (key_len != 5 || strcmp(key, "model") != 0 || !value) return MHD_YES;
    if (value_len == 0 || value_len >= sizeof r->model || strlen(value) != value_len)
        snprintf(r->model, sizeof r->model, "/"); /* no model is named so */
    else memcpy(r->model, value, value_len + 1);
    return MHD_NO;
}

static const char *query_arg(void *ctx, const char *name) {
    return MHD_lookup_connection_value(((request *)ctx)->conn, MHD_GET_ARGUMENT_KIND, name);
}

static enum MHD_Result answer_admin(request *r) {
    admin_request a = {r->srv, r->owner, r->id, query_arg, r};
    problem p = {0};
    json_t *doc = NULL;
    switch (r->route) {
    case ROUTE_ADMIN_DRAIN:
    case ROUTE_ADMIN_UNDRAIN:
        doc = admin_drain(&a, r->route == ROUTE_ADMIN_DRAIN, &p);
        break;
    case ROUTE_ADMIN_JOBS:
        doc = admin_list_jobs(&a, &p);
        break;
    case ROUTE_ADMIN_JOB:
    case ROUTE_ADMIN_JOB_CANCEL:
        doc = admin_job(&a, r->job_id, r->route == ROUTE_ADMIN_JOB_CANCEL, &p);
        break;
    case ROUTE_ADMIN_RELOAD:
        if ((doc = admin_reload(&a, r->model, &p))) return send_json(r, 202, doc);
        break;
    default:
        doc = admin_usage(&a, &p);
    }
    return doc ? send_json(r, 200, doc) : send_problem(r, &p);
}

static enum MHD_Result answer_get(request *r) {
    server *srv = r->srv;
    if (is_admin(r->route)) return answer_admin(r);
    switch (r->route) {
    case ROUTE_JOB_LIST:
        return answer_job_list(r);
    case ROUTE_HEALTH: {
        int status;
        json_t *h = status_health(srv, &status);
        return send_json(r, status, h);
    }
    case ROUTE_MODEL_INFO: {
        int model = 0;
        problem p = {0};
        if (!r->model[0]) /* /model-info: the default, or ?model=NAME */
            MHD_get_connection_values_n(r->conn, MHD_GET_ARGUMENT_KIND, model_info_arg, r);
        if (r->model[0] && (model = models_find(srv->models, srv->nmodels, r->model)) < 0) {
            char *names = models_names(srv->models, srv->nmodels);
            problem_set(&p, PROBLEM_NOT_FOUND, "no model \"%.64s\" on this server: it serves %s", r->model,
                        names ? names : "");
            free(names);
            return send_problem(r, &p);
        }
        int phase = atomic_load(&srv->phase);
        if (phase != PHASE_READY && phase != PHASE_DRAINING)
            return send_simple_problem(r, PROBLEM_NOT_READY, "the model is not loaded yet");
        json_t *info = status_model_info(srv, model);
        if (!info)
            return send_simple_problem(r, PROBLEM_NOT_READY, "no live worker serves the model %s yet",
                                       srv->models[model].name);
        return send_json(r, 200, info);
    }
    case ROUTE_MODELS: {
        int phase = atomic_load(&srv->phase);
        if (phase != PHASE_READY && phase != PHASE_DRAINING)
            return send_simple_problem(r, PROBLEM_NOT_READY, "the models are not loaded yet");
        return send_json(r, 200, status_models(srv));
    }
    case ROUTE_A1111_UPSCALERS: { /* the same list in A1111's shape */
        int phase = atomic_load(&srv->phase);
        if (phase != PHASE_READY && phase != PHASE_DRAINING)
            return send_simple_problem(r, PROBLEM_NOT_READY, "the models are not loaded yet");
        json_t *models = status_models(srv);
        json_t *list = a1111_upscalers(models);
        json_decref(models);
        return send_json(r, 200, list);
    }
    case ROUTE_METRICS: {
        metrics_gauges g = {0};
        dispatch_stats_get(&srv->dispatch, &g.queue);
        if (srv->conns) conns_get_stats(srv->conns, &g.conns);
        if (srv->cache) cache_get_stats(srv->cache, &g.cache);
        if ((g.history_on = srv->history != NULL)) history_get_stats(srv->history, &g.history);
        size_t len;
        char *text = metrics_render(srv, &g, &len);
        if (!text) return MHD_NO;
        return send_buffer(r, 200, "text/plain; version=0.0.4; charset=utf-8", text, len,
                           MHD_RESPMEM_MUST_FREE);
    }
    case ROUTE_OPENAPI: {
        size_t len;
        const char *doc = docs_openapi(&len);
        return send_buffer(r, 200, "application/json", (void *)doc, len, MHD_RESPMEM_PERSISTENT);
    }
    case ROUTE_DOCS: {
        if (strcmp(r->path, "/") == 0) {
            struct MHD_Response *resp = page_response();
            return resp ? send_response(r, 200, resp) : MHD_NO;
        }
        if (strcmp(r->path, "/docs") == 0 || strcmp(r->path, "/docs/") == 0) {
            size_t len;
            const char *page = docs_page(&len);
            return send_buffer(r, 200, "text/html; charset=utf-8", (void *)page, len, MHD_RESPMEM_PERSISTENT);
        }
        const char *type;
        size_t size;
        int fd = docs_asset(r->path + 6, &type, &size);
        if (fd < 0) return send_simple_problem(r, PROBLEM_NOT_FOUND, "no such documentation file");
        struct MHD_Response *resp = MHD_create_response_from_fd(size, fd);
        if (!resp) {
            close(fd);
            return MHD_NO;
        }
        MHD_add_response_header(resp, "Content-Type", type);
        MHD_add_response_header(resp, "Cache-Control", "public, max-age=86400");
        return send_response(r, 200, resp);
    }
    default: { /* the job routes */
        problem why;
        r->job = job_find(srv->jobs, r->job_id, r->owner, &why);
        if (!r->job && why.kind) return send_problem(r, &why);
        if (!r->job) return send_simple_problem(r, PROBLEM_NOT_FOUND, "no job %s (finished jobs are kept %g s)",
                                                r->job_id, srv->cfg.job_retention);
        return answer_job(r);
    }
    }
}

/* ---- SSE ----------------------------------------------------------------------------------- */

/* The next event when the job changed since the last one sent: a snapshot
 * of the status document named by the status. Steps that happen between
 * two reads are coalesced, so a slow client never makes a backlog. */
static bool next_event(request *r) {
    job_view v;
    job_get_view(r->job, &v);
    if (r->event_sent && v.version == r->event_version) return false;
    json_t *doc = job_document(r->job);
    char *data = json_dumps(doc, JSON_COMPACT);
    json_decref(doc);
    free(r->event);
    r->event = NULL;
    int n = asprintf(&r->event, "id: %u\nevent: %s\ndata: %s\n\n", v.version, job_state_name(v.state),
                     data ? data : "{}");
    free(data);
    r->event_len = n > 0 ? (size_t)n : 0;
    r->event_off = 0;
    r->event_version = v.version;
    r->event_sent = true;
    r->stream_over = v.state >= JOB_SUCCEEDED;
    return true;
}

static ssize_t read_events(void *cls, uint64_t pos, char *buf, size_t max) {
    request *r = cls;
    (void)pos;
    for (;;) {
        if (r->event_off < r->event_len) {
            size_t n = r->event_len - r->event_off;
            if (n > max) n = max;
            memcpy(buf, r->event + r->event_off, n);
            r->event_off += n;
            return (ssize_t)n;
        }
        if (r->stream_over) return MHD_CONTENT_READER_END_OF_STREAM;
        if (next_event(r)) continue;
        r->waiter = (waiter){.suspend = suspend_connection, .wake = wake_connection, .arg = r};
        if (job_wait(r->job, r->event_version, &r->waiter) == 0) return 0; /* suspended */
    }
}

/* ---- upscale answers ---------------------------------------------------------------------- */

static void set_header_int(struct MHD_Response *resp, const char *name, long long v) {
    char text[32];
    snprintf(text, sizeof text, "%lld", v);
    MHD_add_response_header(resp, name, text);
}

static enum MHD_Result send_image(request *r, job *j) {
    task *t = job_task(j, 0);
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(t->output_len, t->output, MHD_RESPMEM_PERSISTENT);
    if (!resp) return MHD_NO;
    /* the buffer belongs to the job, which this request references until
     * the answer has been sent (on_completed releases it) */
    char v[64];
    MHD_add_response_header(resp, "Content-Type", imageio_mime_type(t->opts.format));
    snprintf(v, sizeof v, "inline; filename=\"upscaled.%s\"",
             t->opts.format == IMAGE_JPEG ? "jpg" : imageio_format_name(t->opts.format));
    MHD_add_response_header(resp, "Content-Disposition", v);
    snprintf(v, sizeof v, "%llu", (unsigned long long)t->opts.seed);
    MHD_add_response_header(resp, "X-Seed", v);
    set_header_int(resp, "X-Inference-Time-Ms", t->cache_hit ? 0 : llround((t->finished - t->started) * 1e3));
    set_header_int(resp, "X-Queue-Time-Ms", t->cache_hit ? 0 : llround((t->started - r->start) * 1e3 > 0 ? (t->started - r->start) * 1e3 : 0));
    MHD_add_response_header(resp, "X-Model", r->srv->models[t->model].name);
    if (t->model_hash[0]) MHD_add_response_header(resp, "X-Model-Hash", t->model_hash);
    snprintf(v, sizeof v, "%dx%d", t->input.width, t->input.height);
    MHD_add_response_header(resp, "X-Input-Size", v);
    snprintf(v, sizeof v, "%dx%d", t->out_width, t->out_height);
    MHD_add_response_header(resp, "X-Output-Size", v);
    MHD_add_response_header(resp, "X-Cache", t->cache_hit ? "HIT" : t->cacheable ? "MISS" : "BYPASS");
    set_header_int(resp, "X-Prompt-Tokens", t->report.prompt_tokens);
    MHD_add_response_header(resp, "X-Prompt-Truncated", t->report.prompt_truncated ? "true" : "false");
    if (t->report.negative_truncated) MHD_add_response_header(resp, "X-Negative-Prompt-Truncated", "true");
    return send_response(r, 200, resp);
}

/* A one-image async job whose image is in object storage: to its
 * presigned URL (results.c says why not through this server). */
static enum MHD_Result redirect_to_store(request *r, job *j) {
    char url[RESULTS_URL_SIZE];
    if (results_url(r->srv, job_id(j), job_task(j, 0), time(NULL), url, sizeof url))
        return send_simple_problem(r, PROBLEM_INTERNAL, "the result's URL does not fit");
    struct MHD_Response *resp = MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, "Location", url);
    MHD_add_response_header(resp, "Cache-Control", "no-store"); /* the URL expires */
    return send_response(r, 307, resp);
}

/* The job waited on by a synchronous request is over: its answer. */
static enum MHD_Result answer_finished(request *r) {
    job *j = r->job;
    if (is_a1111(r->route)) {
        problem p;
        json_t *doc = a1111_answer(&r->a1111, r->srv->models[job_task(j, 0)->model].name, j, &p);
        return doc ? send_json(r, 200, doc) : send_problem(r, &p);
    }
    job_view v;
    job_get_view(j, &v);
    if (job_kind(j) == FORM_BATCH) {
        if (v.state == JOB_SUCCEEDED) return send_json(r, 200, job_batch_results(j));
        return send_problem(r, &v.error);
    }
    task *t = job_task(j, 0);
    if (v.state == JOB_SUCCEEDED) return send_image(r, j);
    return send_problem(r, &t->error);
}

/* Random seeds stay below 2^53 so that JavaScript clients read them exactly. */
static uint64_t random_seed(void) {
    uint64_t s = 0;
    if (getrandom(&s, sizeof s, 0) != sizeof s) s = (uint64_t)(mono_now() * 1e9);
    return s & ((1ull << 53) - 1);
}

/* Answers task t with a result from the cache. */
static void take_cached(task *t, const cached_result *hit, bool by_upload) {
    t->output = hit->data;
    t->output_len = hit->len;
    t->out_width = hit->width;
    t->out_height = hit->height;
    t->report.prompt_tokens = hit->prompt_tokens;
    t->report.prompt_truncated = hit->prompt_truncated;
    t->report.negative_truncated = hit->negative_truncated;
    t->cache_hit = true;
    metrics_cache(true, by_upload);
}

static void drop_blob(form_blob *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* Checks image i and prepares task t: format by magic number, size from
 * the header, the options, then the pixels. A seeded request is looked up
 * in the cache by its upload's bytes before decoding (a repeat of the same
 * file is answered without decoding, which costs far more than the rest of
 * a cached answer), then by the decoded pixels (the same picture in
 * another file). The checks before the lookup are the ones a miss gets, so
 * the cache never answers a request that would be refused. */
static int prepare_task(request *r, int i, task *t, image_format accept, problem *p) {
    const server_config *c = &r->srv->cfg;
    struct cache *cache = r->srv->cache;
    form_blob *b = &r->form.images[i];
    char err[256];
    image_format format = imageio_sniff(b->data, b->len);
    if (format == IMAGE_UNKNOWN)
        return problem_set(p, PROBLEM_IMAGE_FORMAT,
                           "the image is not PNG, JPEG or WebP (judged by its first bytes)");
    int w, h;
    if (imageio_probe(b->data, b->len, &format, &w, &h, err, sizeof err))
        return problem_set(p, PROBLEM_INVALID_IMAGE, "the %s header could not be read: %s",
                           imageio_format_name(format), err);
    if (w < c->min_side || h < c->min_side || w > c->max_side || h > c->max_side) {
        problem_set(p, PROBLEM_IMAGE_SIZE, "the image is %dx%d pixels; each side must be from %d to %d",
                    w, h, c->min_side, c->max_side);
        snprintf(p->field, sizeof p->field, "image");
        snprintf(p->allowed, sizeof p->allowed, "%d to %d pixels per side", c->min_side, c->max_side);
        return -1;
    }

    form_resolve(&r->form, i, &t->opts);
    served_model *m = &r->srv->models[t->model];
    model_version *v = models_acquire(m); /* NULL on an API node of a cluster */
    int scale = v ? v->info.vae_scale_factor : 0;
    /* the cache keeps the models' results apart, and their versions where
     * this node knows them (an API node of a cluster knows names only),
     * and outputs made with and without the content check */
    char model[64 + 1 + 65 + 24];
    const char *check = config_content_check(c);
    snprintf(model, sizeof model, "%s%s%s%s%s", m->name, v ? "@" : "", v ? v->hash : "", *check ? "|check=" : "",
             check);
    if (v) memcpy(t->model_hash, v->hash, sizeof t->model_hash); /* a cache hit's; a run sets its own */
    models_release(v);
    /* AUTOMATIC1111's size, from the image's (a model's scale is known
     * where its engine is: an API node of a cluster resizes even to it) */
    if (is_a1111(r->route) && a1111_size(&r->a1111, w, h, scale, c->max_side, &t->opts, p)) return -1;
    if (!(t->opts.given & 1u << FIELD_FORMAT) && accept != IMAGE_UNKNOWN) t->opts.format = accept;
    if (runner_check_metadata(&t->opts, m->name, models_is_gan(m), p)) return -1;
    bool seeded = t->opts.given & 1u << FIELD_SEED;
    if (!seeded) t->opts.seed = random_seed();
    t->cacheable = seeded && cache && !results_stored(r->srv, job_listed(t->job));
    const char *scope = c->cache_shared ? "" : r->owner; /* a hit never crosses keys unless shared */
    char *canonical = NULL;
    uint8_t upload_key[32];
    cached_result hit;
    if (t->cacheable) {
        if (!(canonical = options_canonical(&t->opts)))
            return problem_set(p, PROBLEM_INTERNAL, "out of memory");
        cache_upload_key(upload_key, scope, model, canonical, b->data, b->len);
        if (cache_get_upload(cache, upload_key, &hit)) {
            /* these bytes decoded before, to the size their header gives */
            t->input.width = w;
            t->input.height = h;
            take_cached(t, &hit, true);
            free(canonical);
            drop_blob(b);
            return 0;
        }
    }
    /* metadata=true keeps the input's ICC profile for the output */
    if (t->opts.metadata ? imageio_decode_keep_icc(b->data, b->len, &t->input, &t->icc, &t->icc_len, err, sizeof err)
                         : imageio_decode(b->data, b->len, &t->input, err, sizeof err)) {
        free(canonical);
        return problem_set(p, PROBLEM_INVALID_IMAGE, "the %s image could not be decoded: %s",
                           imageio_format_name(format), err);
    }
    drop_blob(b); /* the pixels are all that is needed from here */
    if (t->cacheable && t->icc) {
        char *with = cache_params_with_profile(canonical, t->icc, t->icc_len);
        free(canonical);
        if (!(canonical = with)) return problem_set(p, PROBLEM_INTERNAL, "out of memory");
    }
    if (t->cacheable) {
        cache_key(t->cache_key, scope, model, canonical, &t->input);
        free(canonical);
        cache_link(cache, upload_key, t->cache_key);
        if (cache_get(cache, t->cache_key, &hit)) take_cached(t, &hit, false);
        else metrics_cache(false, false);
    }
    return 0;
}

/* The client of a suspended synchronous request hung up (the connection
 * watchdog calls this under its lock): its job is canceled, as a DELETE
 * would. True when the job was still unfinished. */
static bool cancel_abandoned(void *arg) {
    request *r = arg;
    job_view v;
    job_get_view(r->job, &v);
    if (v.state >= JOB_SUCCEEDED) return false;
    job_delete(r->job);
    return true;
}

static enum MHD_Result start_job(request *r) {
    server *srv = r->srv;
    upscale_form *f = &r->form;
    if (r->too_large)
        return send_simple_problem(r, PROBLEM_TOO_LARGE, "the body is over %zu bytes",
                                   srv->cfg.max_upload);
    if (r->over_budget)
        return send_simple_problem(r, PROBLEM_UPLOADS_BUSY,
                                   "other uploads took the %zu bytes allowed at once while this one "
                                   "arrived; retry shortly", srv->cfg.upload_budget);
    /* the body is complete: parsed, decoded and freed within this call, it
     * no longer waits on the network */
    release_body(r);
    if (r->body == BODY_MULTIPART) {
        if (multipart_end(r->post) && !f->error.kind)
            problem_set(&f->error, PROBLEM_MALFORMED, "malformed multipart/form-data body: %s",
                        multipart_error(r->post));
        flush_field(r); /* the last field */
    } else {
        if (is_a1111(r->route)) a1111_parse(f, &r->a1111, r->json ? r->json : "", r->json_len);
        else form_parse_json(f, r->json ? r->json : "", r->json_len);
        free(r->json); /* the form has its own copies: not held while the job runs */
        r->json = NULL;
    }
    /* A1111's fields come in the body only (its query has none) */
    if (is_a1111(r->route)) MHD_get_connection_values_n(r->conn, MHD_GET_ARGUMENT_KIND, refuse_query_value, r);
    else MHD_get_connection_values_n(r->conn, MHD_GET_ARGUMENT_KIND, add_query_value, r);
    if (form_finish(f)) return send_problem(r, &f->error);
    if (f->webhook_url && !srv->cfg.webhook_secret) {
        problem p;
        problem_field(&p, "webhook_url", NULL, "webhooks are disabled on this server (no webhook secret is set)");
        return send_problem(r, &p);
    }
    image_format accept = IMAGE_UNKNOWN;
    /* (an A1111 answer is JSON with a PNG inside, whatever Accept says) */
    if (f->kind == FORM_UPSCALE && !is_a1111(r->route) && form_accept_format(header(r, "Accept"), &accept))
        return send_simple_problem(r, PROBLEM_NOT_ACCEPTABLE,
                                   "the Accept header allows none of image/png, image/jpeg, image/webp");

    bool listed = f->kind == FORM_JOB || (f->kind == FORM_BATCH && f->async);
    job *j = job_create(srv->jobs, f->kind, f->nimages, listed, r->client, r->id, r->start);
    if (!j) return send_simple_problem(r, PROBLEM_INTERNAL, "out of memory");
    r->job = j;
    job_set_webhook(j, f->webhook_url);
    job_set_owner(j, r->owner);
    for (int i = 0; i < f->nimages; i++) job_task(j, i)->model = f->model; /* the request names one for all */
    for (int i = 0; i < f->nimages; i++) {
        problem p = {0};
        if (prepare_task(r, i, job_task(j, i), accept, &p) == 0) continue;
        if (r->route == ROUTE_A1111_BATCH) { /* no per-image entries: the image answers for the request */
            char detail[sizeof p.detail];
            snprintf(detail, sizeof detail, "imageList[%d]: %.340s", i, p.detail);
            memcpy(p.detail, detail, sizeof detail);
            if (strcmp(p.field, "image") == 0) snprintf(p.field, sizeof p.field, "imageList[%d].data", i);
        }
        if (f->kind != FORM_BATCH || r->route == ROUTE_A1111_BATCH) return send_problem(r, &p);
        job_task_reject(job_task(j, i), &p); /* a batch answers it in the image's entry */
    }
    problem p = {0};
    if (job_submit(j, &p)) return send_problem(r, &p);

    if (listed) {
        struct MHD_Response *resp;
        json_t *doc = job_document(j);
        char *body = json_dumps(doc, JSON_COMPACT);
        json_decref(doc);
        if (!body) return MHD_NO;
        resp = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
        if (!resp) return MHD_NO;
        char location[80];
        snprintf(location, sizeof location, API "/jobs/%s", job_id(j));
        MHD_add_response_header(resp, "Content-Type", "application/json");
        MHD_add_response_header(resp, "Location", location);
        return send_response(r, 202, resp);
    }
    r->waiter = (waiter){.suspend = suspend_connection, .wake = wake_connection, .arg = r, .final_only = true};
    if (job_wait(j, 0, &r->waiter) == 0) {
        conns_watch(r->tracked, cancel_abandoned, r); /* libmicrohttpd no longer watches it */
        return MHD_YES; /* suspended until the job ends */
    }
    return answer_finished(r);
}

/* ---- libmicrohttpd callbacks ---------------------------------------------------------------- */

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_data_size,
                                  void **con_cls) {
    request *r = *con_cls;
    if (!r) {
        r = calloc(1, sizeof *r);
        if (!r) return MHD_NO;
        r->srv = cls;
        r->conn = conn;
        r->start = mono_now();
        r->tracked = conns_of(conn);
        conns_headers_done(r->tracked);
        *con_cls = r;
        atomic_fetch_add(&requests_open, 1);
        metrics_in_flight(1);
        if (check_framing(r, url, method, version)) return r->status ? MHD_YES : MHD_NO;
        /* requests with a body are judged on their headers, before the
         * body is read; the others are answered on the next call, since
         * libmicrohttpd closes the connection after an answer queued on
         * the first one (it has not seen the end of the request yet) */
        char job_id[33], model[64];
        if (strcmp(method, "POST") == 0 && takes_body(match_route(url, job_id, model))) return begin(r, url, method);
        r->deferred = true;
        return MHD_YES;
    }
    if (*upload_data_size) {
        conns_body_bytes(r->tracked, *upload_data_size);
        if (!receive(r, upload_data, *upload_data_size)) return MHD_NO; /* closes the connection */
        *upload_data_size = 0;
        return MHD_YES;
    }
    conns_body_done(r->tracked);
    if (r->status) return MHD_YES; /* answered already; MHD is sending it */
    if (r->deferred) {
        r->deferred = false;
        return begin(r, url, method);
    }
    if (!r->job) return start_job(r);
    /* resumed: the job is over, or was canceled because the client left */
    if (conns_unwatch(r->tracked)) return MHD_NO; /* nobody to answer */
    return answer_finished(r);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode code) {
    (void)cls, (void)conn;
    request *r = *con_cls;
    if (!r) return;
    *con_cls = NULL;
    double seconds = mono_now() - r->start;
    /* nginx's 499 "client closed request" for a client that left its job */
    if (conns_unwatch(r->tracked) && !r->status) r->status = 499;
    metrics_request(r->route, r->status, seconds);
    metrics_in_flight(-1);
    const char *outcome = conns_outcome(r->tracked); /* the watchdog ended it, and why */
    if (log_access_enabled()) {
        json_t *line = json_pack("{s:s,s:s,s:s,s:s,s:i,s:f,s:s,s:I,s:b}", "request_id", r->id, "method",
                                 r->method, "path", r->path, "route", route_names[r->route], "status",
                                 r->status, "duration_ms", seconds * 1e3, "client", r->ip, "bytes_in",
                                 (json_int_t)r->received, "completed",
                                 code == MHD_REQUEST_TERMINATED_COMPLETED_OK);
        if (outcome) json_object_set_new(line, "outcome", json_string(outcome));
        log_event(LOG_INFO, "access", line);
    }
    conns_request_done(r->tracked);
    if (r->job) {
        job_unwait(r->job, &r->waiter);
        job_release(r->job);
    }
    drop_body(r);
    free(r->event);
    free(r);
    atomic_fetch_sub(&requests_open, 1);
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap) {
    (void)cls;
    char text[512];
    vsnprintf(text, sizeof text, fmt, ap);
    size_t n = strlen(text);
    while (n && (text[n - 1] == '\n' || text[n - 1] == '\r')) text[--n] = '\0';
    log_event(LOG_WARN, "http", json_pack("{s:s}", "message", text));
}

/* A connection's start and end: conns's bookkeeping, and the end of its
 * hold on a TLS certificate (before the socket closes, see tls.c). */
static void on_connection(void *cls, struct MHD_Connection *connection, void **socket_context,
                          enum MHD_ConnectionNotificationCode code) {
    server *srv = cls;
    if (srv->tls && code == MHD_CONNECTION_NOTIFY_CLOSED) {
        const union MHD_ConnectionInfo *fd = MHD_get_connection_info(connection, MHD_CONNECTION_INFO_CONNECTION_FD);
        if (fd) tls_connection_closed(srv->tls, fd->connect_fd);
    }
    conns_notify(srv->conns, connection, socket_context, code);
}

int http_start(server *srv, char *err, size_t errlen) {
    const server_config *c = &srv->cfg;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
    struct addrinfo *ai = NULL;
    char port[16];
    snprintf(port, sizeof port, "%d", c->port);
    int gai = getaddrinfo(c->host, port, &hints, &ai);
    if (gai != 0) {
        snprintf(err, errlen, "cannot resolve --host %s: %s", c->host, gai_strerror(gai));
        return -1;
    }
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_ALLOW_SUSPEND_RESUME | MHD_ALLOW_UPGRADE |
                     MHD_USE_ERROR_LOG;
    if (ai->ai_family == AF_INET6) flags |= MHD_USE_IPv6;
    struct MHD_OptionItem pool[] = {
        {c->http_threads > 1 ? MHD_OPTION_THREAD_POOL_SIZE : MHD_OPTION_END,
         c->http_threads, NULL},
        {MHD_OPTION_END, 0, NULL},
    };
    /* HTTPS: each handshake asks tls.c for the certificate, so that a reload
     * reaches new connections without a restart */
    if (srv->tls && MHD_is_feature_supported(MHD_FEATURE_HTTPS_CERT_CALLBACK) != MHD_YES) {
        freeaddrinfo(ai);
        snprintf(err, errlen, "tls-cert: this libmicrohttpd was built without TLS or its certificate callback");
        return -1;
    }
    if (srv->tls) flags |= MHD_USE_TLS;
    struct MHD_OptionItem https[] = {
        {srv->tls ? MHD_OPTION_HTTPS_CERT_CALLBACK : MHD_OPTION_END, 0, (void *)tls_retrieve},
        {MHD_OPTION_HTTPS_PRIORITIES, 0, (void *)TLS_PRIORITIES},
        {MHD_OPTION_END, 0, NULL},
    };
    /* per-address limits, deadlines and disconnects are conns's (its own
     * count, not MHD_OPTION_PER_IP_CONNECTION_LIMIT, so that trusted proxies
     * can be exempt) */
    conns_limits limits = {c->per_ip_connections, c->header_timeout, c->min_upload_rate, c->upload_budget};
    if (!(srv->conns = conns_create(&limits, srv->ratelimit))) {
        freeaddrinfo(ai);
        snprintf(err, errlen, "cannot start the connection watchdog");
        return -1;
    }
    srv->daemon = MHD_start_daemon(
        flags, (uint16_t)c->port, conns_accept, srv->conns, on_request, srv,
        MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, srv,
        MHD_OPTION_SOCK_ADDR, ai->ai_addr,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)c->max_connections,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)ceil(c->connection_timeout),
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, srv,
        MHD_OPTION_NOTIFY_CONNECTION, on_connection, srv,
        MHD_OPTION_ARRAY, pool,
        MHD_OPTION_ARRAY, https,
        MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!srv->daemon) {
        conns_destroy(srv->conns);
        srv->conns = NULL;
        snprintf(err, errlen, "cannot listen on %s:%d (address in use or not allowed?)", c->host, c->port);
        return -1;
    }
    return 0;
}

int http_port(const server *srv) {
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(srv->daemon, MHD_DAEMON_INFO_BIND_PORT);
    return info ? info->port : 0;
}

void http_quiesce(server *srv) {
    MHD_socket s = MHD_quiesce_daemon(srv->daemon);
    if (s != MHD_INVALID_SOCKET) close(s);
}

int http_requests_open(void) { return atomic_load(&requests_open); }

void http_stop(server *srv) {
    if (srv->daemon) MHD_stop_daemon(srv->daemon);
    srv->daemon = NULL;
    conns_destroy(srv->conns); /* after the daemon: no connection is left */
    srv->conns = NULL;
}
