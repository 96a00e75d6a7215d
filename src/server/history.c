/*
 * history.c - request history: the queue, its writer, listings (see history.h).
 *
 * Why a writer thread. A job finishes under the job store's lock, on a
 * worker or an HTTP thread; a database write there would make every
 * request wait for the disk's fsync, or for a PostgreSQL server that is
 * far away or down. So history_record copies the entry into a ring of
 * --history-backlog slots (one lock, one malloc) and returns; a thread of
 * its own takes up to BATCH entries at a time and writes each batch in one
 * transaction (one fsync for many jobs when they come fast). As in log.c,
 * the entries being written stay in the ring until their transaction
 * commits, so the bound counts them too.
 *
 * What is dropped. When the database is unreachable or busy, the writer
 * keeps its batch and retries it, backing off from 0.1 s to 2 s (the
 * PostgreSQL backend reconnects on each try): nothing queued is lost to an
 * outage, and every write is "insert unless the id is there", so writing a
 * batch twice is harmless. Meanwhile new entries queue until the ring is
 * full; beyond it they are dropped and counted (sdx4_history_entries_total
 * {outcome="dropped"}), never waited for. An entry the database refuses
 * (not a transient error) would block the queue forever if retried: a
 * refused batch is written again one entry at a time and the refused
 * entries alone are dropped (outcome="rejected"). At shutdown the queue
 * gets until the deadline to drain; what is left then is dropped.
 *
 * The schema (history_sqlite.c and history_postgres.c create it on open):
 * sdx4_jobs, one row per finished job: id (primary key), owner (the API
 * key's identity, "" anonymous), client, kind, request_id, status,
 * parameters (JSON text: each image's parameters and sizes), images,
 * input_pixels and output_bytes (all images together), created_us,
 * started_us (NULL: never ran) and finished_us (wall-clock microseconds),
 * worker, error_kind and error_detail, and the model that ran it (by name,
 * "" for jobs recorded before schema version 2 added it); an index on (owner, created_us, id)
 * serves a listing, which pages by keyset (the cursor is the last row's
 * created_us and id). sdx4_schema holds the schema's version; a newer one
 * is refused, not misread. sdx4_secret holds a random secret drawn when
 * the database is made: API keys' identities, which the rows are listed
 * by, are derived with it (auth.h) rather than with one drawn at each
 * start, so a key's jobs stay its own after a restart and on every server
 * sharing the database. (Whoever reads the database can thus test guesses
 * of a key offline against its owner column: keys must be long random
 * strings, as the README's section on history says.)
 */
#include "history.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "history_db.h"
#include "log.h"
#include "server.h"

enum { BATCH = 256 };

struct history {
    history_db *db;
    pthread_mutex_t lock;
    pthread_cond_t queued;  /* for the writer: an entry arrived, or closing */
    pthread_cond_t drained; /* for history_close: the ring emptied */
    history_entry **ring;
    size_t size, head, count; /* [head, head + count) queued, the first `taken` of them being written */
    bool closing, writer_done;
    uint64_t written, dropped, rejected;
    uint64_t dropped_at_write; /* `dropped` at the last successful write */
    bool up;
    double down_since; /* mono_now() of the failure that began an outage */
    pthread_t writer;
    uint8_t identity_secret[32];
};

int64_t history_micros(double wall) { return (int64_t)llround(wall * 1e6); }

/* ---- documents ------------------------------------------------------------------ */

static void iso_time_us(char *buf, size_t size, int64_t us) {
    time_t secs = (time_t)(us / 1000000);
    struct tm tm;
    gmtime_r(&secs, &tm);
    size_t n = strftime(buf, size, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf + n, size - n, ".%03dZ", (int)(us % 1000000 / 1000));
}

static void set_time(json_t *doc, const char *key, int64_t us) {
    char buf[40];
    iso_time_us(buf, sizeof buf, us);
    json_object_set_new(doc, key, json_string(buf));
}

json_t *history_row_document(const history_row *r) {
    json_t *d = json_pack("{s:s,s:s,s:s,s:s,s:s,s:I,s:I,s:I,s:s}", "id", r->id ? r->id : "", "kind",
                          r->kind ? r->kind : "", "status", r->status ? r->status : "", "request_id",
                          r->request_id ? r->request_id : "", "client", r->client ? r->client : "",
                          "images", (json_int_t)r->images, "input_pixels", (json_int_t)r->input_pixels,
                          "output_bytes", (json_int_t)r->output_bytes, "worker", r->worker ? r->worker : "");
    if (r->model && r->model[0]) json_object_set_new(d, "model", json_string(r->model)); /* "": before version 2 */
    json_t *params = r->parameters ? json_loads(r->parameters, 0, NULL) : NULL;
    json_object_set_new(d, "parameters", params ? params : json_null());
    set_time(d, "created_at", r->created_us);
    if (r->started_us > 0) set_time(d, "started_at", r->started_us);
    set_time(d, "finished_at", r->finished_us);
    /* for history_list's cursor, which removes it: the document shows milliseconds */
    json_object_set_new(d, "created_us", json_integer((json_int_t)r->created_us));
    if (r->error_kind && r->error_kind[0])
        json_object_set_new(d, "error", json_pack("{s:s,s:s}", "kind", r->error_kind, "detail",
                                                  r->error_detail ? r->error_detail : ""));
    return d;
}

/* ---- times and cursors -------------------------------------------------------------- */

/* Exactly `n` digits at *p, advancing it; -1 if not. */
static int digits(const char **p, int n) {
    int v = 0;
    for (int i = 0; i < n; i++, (*p)++) {
        if (!isdigit((unsigned char)**p)) return -1;
        v = v * 10 + (**p - '0');
    }
    return v;
}

static bool expect(const char **p, char c) { return **p == c ? (*p)++, true : false; }

int history_parse_time(const char *text, double *wall) {
    static const int month_days[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    const char *p = text;
    struct tm tm = {0};
    int year = digits(&p, 4), mon, day, hour, min, sec;
    if (year < 0 || !expect(&p, '-') || (mon = digits(&p, 2)) < 1 || mon > 12 || !expect(&p, '-') ||
        (day = digits(&p, 2)) < 1 || day > month_days[mon - 1])
        return -1;
    if (!(expect(&p, 'T') || expect(&p, 't') || expect(&p, ' '))) return -1;
    if ((hour = digits(&p, 2)) < 0 || hour > 23 || !expect(&p, ':') || (min = digits(&p, 2)) < 0 ||
        min > 59 || !expect(&p, ':') || (sec = digits(&p, 2)) < 0 || sec > 60)
        return -1;
    bool leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    if (mon == 2 && day == 29 && !leap) return -1;
    double fraction = 0;
    if (expect(&p, '.')) {
        if (!isdigit((unsigned char)*p)) return -1;
        for (double scale = 0.1; isdigit((unsigned char)*p); p++, scale /= 10) fraction += (*p - '0') * scale;
    }
    int offset = 0; /* seconds east of UTC */
    if (!(expect(&p, 'Z') || expect(&p, 'z'))) {
        int sign = expect(&p, '+') ? 1 : expect(&p, '-') ? -1 : 0, oh, om;
        if (!sign || (oh = digits(&p, 2)) < 0 || oh > 23 || !expect(&p, ':') || (om = digits(&p, 2)) < 0 ||
            om > 59)
            return -1;
        offset = sign * (oh * 3600 + om * 60);
    }
    if (*p) return -1;
    tm.tm_year = year - 1900;
    tm.tm_mon = mon - 1;
    tm.tm_mday = day;
    tm.tm_hour = hour;
    tm.tm_min = min;
    tm.tm_sec = sec; /* a leap second, 60, is the next minute's 0 */
    *wall = (double)timegm(&tm) - offset + fraction;
    return 0;
}

/* "<created_us>-<id>": the last row of a page. Opaque to clients, but
 * checked like any input, since it comes back from them. */
static void make_cursor(char *buf, size_t size, int64_t created_us, const char *id) {
    snprintf(buf, size, "%" PRId64 "-%s", created_us, id);
}

static int parse_cursor(const char *text, int64_t *created_us, char id[33]) {
    char *end;
    errno = 0;
    long long us = strtoll(text, &end, 10);
    if (end == text || !isdigit((unsigned char)*text) || errno || *end != '-' || strlen(end + 1) != 32)
        return -1;
    for (const char *c = end + 1; *c; c++)
        if (!isdigit((unsigned char)*c) && !(*c >= 'a' && *c <= 'f')) return -1;
    *created_us = us;
    memcpy(id, end + 1, 33);
    return 0;
}

/* ---- the writer ---------------------------------------------------------------------- */

/* Writes what it can of `batch`; returns how many entries are done with
 * (written or rejected), 0 when the database is unavailable. */
static size_t write_batch(history *h, history_entry **batch, size_t n) {
    char err[256] = "";
    history_db_status s = h->db->ops->write(h->db, batch, (int)n, err, sizeof err);
    size_t done = s == HISTORY_DB_OK ? n : 0, written = done, rejected = 0;
    if (s == HISTORY_DB_REJECTED) /* one at a time, so that only the refused entries are dropped */
        for (; done < n; done++) {
            s = h->db->ops->write(h->db, &batch[done], 1, err, sizeof err);
            if (s == HISTORY_DB_RETRY) break;
            if (s == HISTORY_DB_OK) written++;
            else {
                rejected++;
                log_event(LOG_ERROR, "history_rejected",
                          json_pack("{s:s,s:s}", "job_id", batch[done]->id, "error", err));
            }
        }
    pthread_mutex_lock(&h->lock);
    h->written += written;
    h->rejected += rejected;
    bool was_up = h->up;
    h->up = s != HISTORY_DB_RETRY;
    if (was_up && !h->up) h->down_since = mono_now();
    uint64_t lost = h->dropped - h->dropped_at_write; /* since the last write that went through */
    if (s != HISTORY_DB_RETRY) h->dropped_at_write = h->dropped;
    double since = h->down_since;
    pthread_mutex_unlock(&h->lock);
    if (was_up && s == HISTORY_DB_RETRY)
        log_event(LOG_WARN, "history_unavailable",
                  json_pack("{s:s,s:s}", "error", err, "message",
                            "request history cannot be written; entries are queued and retried"));
    else if (!was_up && s != HISTORY_DB_RETRY)
        log_event(LOG_INFO, "history_recovered",
                  json_pack("{s:f,s:I}", "seconds", mono_now() - since, "dropped", (json_int_t)lost));
    return done;
}

static void *writer_main(void *arg) {
    history *h = arg;
    history_entry *batch[BATCH];
    double backoff = 0.1;
    pthread_mutex_lock(&h->lock);
    for (;;) {
        while (!h->count && !h->closing) pthread_cond_wait(&h->queued, &h->lock);
        if (h->closing) break; /* history_close waited for the queue as long as it could */
        size_t n = h->count < BATCH ? h->count : BATCH;
        for (size_t i = 0; i < n; i++) batch[i] = h->ring[(h->head + i) % h->size];
        pthread_mutex_unlock(&h->lock);
        size_t done = write_batch(h, batch, n);
        for (size_t i = 0; i < done; i++) free(batch[i]);
        pthread_mutex_lock(&h->lock);
        h->head = (h->head + done) % h->size;
        h->count -= done;
        if (!h->count) pthread_cond_broadcast(&h->drained);
        if (done) {
            backoff = 0.1;
            continue;
        }
        /* entries arriving meanwhile signal `queued`: they must not cut the wait */
        double until = mono_now() + backoff;
        struct timespec ts = {(time_t)until, (long)((until - (double)(time_t)until) * 1e9)};
        while (!h->closing && mono_now() < until) pthread_cond_timedwait(&h->queued, &h->lock, &ts);
        backoff = backoff * 2 < 2 ? backoff * 2 : 2;
    }
    h->writer_done = true;
    pthread_cond_broadcast(&h->drained);
    pthread_mutex_unlock(&h->lock);
    return NULL;
}

/* ---- the interface -------------------------------------------------------------------- */

static int hex_secret(const char *hex, uint8_t out[32]) {
    if (strlen(hex) != 64) return -1;
    for (int i = 0; i < 32; i++) {
        unsigned v;
        if (!isxdigit((unsigned char)hex[2 * i]) || !isxdigit((unsigned char)hex[2 * i + 1]) ||
            sscanf(hex + 2 * i, "%2x", &v) != 1)
            return -1;
        out[i] = (uint8_t)v;
    }
    return 0;
}

static bool is_postgres_url(const char *where) {
    return strncmp(where, "postgresql://", 13) == 0 || strncmp(where, "postgres://", 11) == 0;
}

history *history_open(const char *where, int backlog, double timeout, char *err, size_t n) {
    if (!where || !*where || backlog < 1) {
        snprintf(err, n, "a file path or a postgresql:// URL, and a backlog of 1 or more, are needed");
        return NULL;
    }
    history *h = calloc(1, sizeof *h);
    if (!h || !(h->ring = calloc((size_t)backlog, sizeof *h->ring))) {
        free(h);
        snprintf(err, n, "out of memory");
        return NULL;
    }
    h->size = (size_t)backlog;
    h->up = true;
    uint8_t random[32];
    char fresh[65], secret[65] = "";
    if (getrandom(random, sizeof random, 0) != sizeof random) {
        snprintf(err, n, "no random bytes for the identity secret");
        free(h->ring);
        free(h);
        return NULL;
    }
    for (int i = 0; i < 32; i++) snprintf(fresh + 2 * i, 3, "%02x", random[i]);
    h->db = is_postgres_url(where) ? history_postgres_open(where, fresh, secret, timeout, err, n)
                                   : history_sqlite_open(where, fresh, secret, err, n);
    if (h->db && hex_secret(secret, h->identity_secret)) {
        snprintf(err, n, "%s: the identity secret in sdx4_secret is not 64 hex digits", where);
        h->db->ops->close(h->db);
        h->db = NULL;
    }
    if (!h->db) {
        free(h->ring);
        free(h);
        return NULL;
    }
    pthread_mutex_init(&h->lock, NULL);
    cond_init_monotonic(&h->queued);
    cond_init_monotonic(&h->drained);
    /* the writer takes no signals: serve.c waits for them in its main thread */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&h->writer, NULL, writer_main, h);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        snprintf(err, n, "cannot start the writer thread");
        h->db->ops->close(h->db);
        free(h->ring);
        free(h);
        return NULL;
    }
    return h;
}

void history_close(history *h, double seconds) {
    if (!h) return;
    double until = mono_now() + seconds;
    struct timespec ts = {(time_t)until, (long)((until - (double)(time_t)until) * 1e9)};
    pthread_mutex_lock(&h->lock);
    while (h->count && !h->writer_done && pthread_cond_timedwait(&h->drained, &h->lock, &ts) != ETIMEDOUT) {}
    h->closing = true;
    pthread_cond_signal(&h->queued);
    /* a writer inside a database call finishes it (bounded by the
     * backends' timeouts) and stops */
    while (!h->writer_done) pthread_cond_wait(&h->drained, &h->lock);
    uint64_t lost = h->count;
    pthread_mutex_unlock(&h->lock);
    pthread_join(h->writer, NULL);
    if (lost)
        log_event(LOG_WARN, "history_lost_at_exit",
                  json_pack("{s:I,s:s}", "entries", (json_int_t)lost, "message",
                            "the history database did not take these before the shutdown deadline"));
    for (size_t i = 0; i < h->count; i++) free(h->ring[(h->head + i) % h->size]);
    h->db->ops->close(h->db);
    pthread_cond_destroy(&h->queued);
    pthread_cond_destroy(&h->drained);
    pthread_mutex_destroy(&h->lock);
    free(h->ring);
    free(h);
}

void history_record(history *h, const history_entry *e) {
    size_t params = e->parameters ? strlen(e->parameters) + 1 : 0;
    history_entry *copy = malloc(sizeof *copy + params);
    if (copy) {
        *copy = *e;
        if (params) copy->parameters = memcpy(copy + 1, e->parameters, params);
    }
    pthread_mutex_lock(&h->lock);
    if (copy && h->count < h->size && !h->closing) {
        h->ring[(h->head + h->count++) % h->size] = copy;
        pthread_cond_signal(&h->queued);
        copy = NULL;
    } else {
        h->dropped++;
    }
    pthread_mutex_unlock(&h->lock);
    free(copy);
}

history_result history_list(history *h, const history_query *q, json_t **page, char *err, size_t n) {
    history_db_query dq = {.owner = q->owner, .status = q->status ? q->status : "",
                           .since_us = isfinite(q->since) ? history_micros(q->since) : INT64_MIN,
                           .until_us = isfinite(q->until) ? history_micros(q->until) : INT64_MAX,
                           .before_us = INT64_MAX, .before_id = "", .limit = q->limit + 1};
    char before_id[33];
    if (q->cursor) {
        if (parse_cursor(q->cursor, &dq.before_us, before_id)) return HISTORY_BAD_CURSOR;
        dq.before_id = before_id;
    }
    json_t *rows = json_array();
    if (h->db->ops->list(h->db, &dq, rows, err, n) != HISTORY_DB_OK) {
        json_decref(rows);
        return HISTORY_UNAVAILABLE;
    }
    json_t *next = json_null();
    if (json_array_size(rows) > (size_t)q->limit) { /* the extra row says a next page exists */
        json_array_remove(rows, (size_t)q->limit);
        json_t *last = json_array_get(rows, (size_t)q->limit - 1);
        char cursor[64];
        make_cursor(cursor, sizeof cursor, json_integer_value(json_object_get(last, "created_us")),
                    json_string_value(json_object_get(last, "id")));
        next = json_string(cursor);
    }
    size_t i;
    json_t *row;
    json_array_foreach(rows, i, row) json_object_del(row, "created_us");
    *page = json_pack("{s:o,s:o}", "jobs", rows, "next_cursor", next);
    return HISTORY_OK;
}

json_t *history_usage_document(const char *client, int64_t day, int64_t requests, int64_t images,
                               int64_t compute_us, int64_t errors) {
    time_t t = (time_t)(day * 86400);
    struct tm tm;
    char date[16];
    strftime(date, sizeof date, "%Y-%m-%d", gmtime_r(&t, &tm));
    return json_pack("{s:s,s:s,s:I,s:I,s:f,s:I}", "client", client ? client : "", "date", date, "requests",
                     (json_int_t)requests, "images", (json_int_t)(images > 0 ? images : 0), "compute_seconds",
                     compute_us > 0 ? (double)compute_us * 1e-6 : 0.0, "errors", (json_int_t)(errors > 0 ? errors : 0));
}

history_result history_usage(history *h, const history_usage_query *q, json_t **rows, char *err, size_t n) {
    history_db_usage_query dq = {.since_us = isfinite(q->since) ? history_micros(q->since) : INT64_MIN,
                                 .until_us = isfinite(q->until) ? history_micros(q->until) : INT64_MAX,
                                 .client = q->client ? q->client : "", .limit = q->limit};
    *rows = json_array();
    if (h->db->ops->usage(h->db, &dq, *rows, err, n) == HISTORY_DB_OK) return HISTORY_OK;
    json_decref(*rows);
    *rows = NULL;
    return HISTORY_UNAVAILABLE;
}

void history_get_stats(history *h, history_stats *s) {
    pthread_mutex_lock(&h->lock);
    *s = (history_stats){.written = h->written, .dropped = h->dropped, .rejected = h->rejected,
                         .queued = h->count, .up = h->up};
    pthread_mutex_unlock(&h->lock);
}

void history_identity_secret(const history *h, uint8_t secret[32]) {
    memcpy(secret, h->identity_secret, sizeof h->identity_secret);
}
