/*
 * history_postgres.c - request history in PostgreSQL (history_db.h).
 *
 * Two connections from the URL: the writer thread's, and one for
 * listings under a lock (a libpq connection serves one thread at a time).
 * Either is reset when it is found broken, on its next use: the writer
 * then retries its batch later (history.c backs off), and a listing tries
 * once more on the reset connection (the server restarted meanwhile), then
 * gets HISTORY_DB_RETRY at once rather than waiting for it to return.
 * Every connection gets connect_timeout and a statement_timeout unless
 * the URL sets them, so that neither a dead host nor a stuck lock can hold
 * a thread for long. A server that stops answering on an open connection
 * (a frozen host, a path that drops packets) enforces no statement_timeout,
 * and libpq's blocking calls would wait for it for good, a listing's HTTP
 * thread and shutdown with them: every statement is sent and its answer
 * awaited here, up to --history-timeout; past it the connection is closed
 * and made anew on its next use.
 *
 * Several nodes may open the same database at once: the schema is made
 * under a transaction-scoped advisory lock, since two concurrent CREATE
 * TABLE IF NOT EXISTS of one table can still collide in PostgreSQL.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#include "history_db.h"

typedef struct {
    history_db base;
    char *url;
    double timeout; /* seconds an answer is awaited */
    PGconn *writer, *reader; /* NULL: closed for want of an answer, made anew on next use */
    pthread_mutex_t read_lock;
} postgres_db;

/* An arbitrary constant that names sdx4's schema lock among advisory locks. */
#define SCHEMA_LOCK "7135412968"

/* After sdx4_schema says the version is not newer than this build's. */
static const char schema[] =
    "CREATE TABLE IF NOT EXISTS sdx4_jobs ("
    " id TEXT COLLATE \"C\" PRIMARY KEY, owner TEXT NOT NULL, client TEXT NOT NULL,"
    " kind TEXT NOT NULL, request_id TEXT NOT NULL, status TEXT NOT NULL, parameters TEXT,"
    " images INTEGER NOT NULL, input_pixels BIGINT NOT NULL, output_bytes BIGINT NOT NULL,"
    " created_us BIGINT NOT NULL, started_us BIGINT, finished_us BIGINT NOT NULL,"
    " worker TEXT NOT NULL, error_kind TEXT NOT NULL, error_detail TEXT NOT NULL,"
    " model TEXT NOT NULL DEFAULT '', compute_us BIGINT);"
    "CREATE INDEX IF NOT EXISTS sdx4_jobs_owner_created ON sdx4_jobs (owner, created_us, id);"
    "INSERT INTO sdx4_schema SELECT " HISTORY_VERSION_TEXT " WHERE NOT EXISTS (SELECT 1 FROM sdx4_schema);";

static PGconn *connect_url(const char *url) {
    /* the URL's own settings win: expand_dbname applies it after these */
    const char *keys[] = {"connect_timeout", "options", "application_name", "dbname", NULL};
    const char *values[] = {"3", "-c statement_timeout=10000", "sdx4", url, NULL};
    return PQconnectdbParams(keys, values, 1);
}

static void copy_error(PGconn *c, const char *what, char *err, size_t len) {
    const char *m = c ? PQerrorMessage(c) : "out of memory";
    size_t n = strlen(m);
    while (n && (m[n - 1] == '\n' || m[n - 1] == ' ')) n--; /* libpq ends messages with a newline */
    snprintf(err, len, "%s%.*s", what, (int)n, m);
}

/* Ready to use, made or reset first if it broke; false (err set) if
 * unreachable. */
static bool usable(const postgres_db *db, PGconn **c, char *err, size_t len) {
    if (!*c) *c = connect_url(db->url);
    else if (PQstatus(*c) != CONNECTION_OK) PQreset(*c);
    if (PQstatus(*c) == CONNECTION_OK) return true;
    copy_error(*c, "", err, len);
    return false;
}

static double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* PQexecParams (n >= 0), or PQexec (n < 0: statements separated by ';',
 * the last one's result), waiting db->timeout at most for the answer.
 * NULL when the call failed (PQerrorMessage says why), or when no answer
 * came in time: then *c is closed and NULL, and err says so. */
static PGresult *run(const postgres_db *db, PGconn **c, const char *sql, int n, const Oid *types,
                     const char *const *values, char *err, size_t len) {
    if (!(n < 0 ? PQsendQuery(*c, sql) : PQsendQueryParams(*c, sql, n, types, values, NULL, NULL, 0)))
        return NULL;
    double deadline = seconds_now() + db->timeout;
    PGresult *last = NULL;
    for (;;) {
        while (PQisBusy(*c)) {
            struct pollfd p = {.fd = PQsocket(*c), .events = POLLIN};
            double left = deadline - seconds_now();
            int ready = left > 0 ? poll(&p, 1, (int)(left * 1000) + 1) : 0;
            if (ready < 0 && errno == EINTR) continue;
            if (ready == 0) {
                snprintf(err, len, "PostgreSQL did not answer within %g s (--history-timeout)", db->timeout);
                PQclear(last);
                PQfinish(*c);
                *c = NULL;
                return NULL;
            }
            if (ready < 0 || !PQconsumeInput(*c)) {
                PQclear(last);
                return NULL;
            }
        }
        PGresult *res = PQgetResult(*c);
        if (!res) return last;
        PQclear(last);
        last = res;
    }
}

/* A failed statement: the database refused it, unless the connection is
 * gone (NULL: closed by run(), which said why in err). */
static history_db_status failed(PGconn *c, PGresult *res, char *err, size_t len) {
    if (!c) return HISTORY_DB_RETRY;
    copy_error(c, "", err, len);
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    PQclear(res);
    /* class 08 connection, 53 resources, 57 operator intervention (shutdown,
     * statement timeout), 40 serialization: the same statement may succeed later */
    bool transient = PQstatus(c) != CONNECTION_OK || !state || strncmp(state, "08", 2) == 0 ||
                     strncmp(state, "53", 2) == 0 || strncmp(state, "57", 2) == 0 ||
                     strncmp(state, "40", 2) == 0;
    return transient ? HISTORY_DB_RETRY : HISTORY_DB_REJECTED;
}

static history_db_status exec_command(const postgres_db *db, PGconn **c, const char *sql, char *err, size_t len) {
    PGresult *res = run(db, c, sql, -1, NULL, NULL, err, len);
    if (PQresultStatus(res) == PGRES_COMMAND_OK || PQresultStatus(res) == PGRES_TUPLES_OK) {
        PQclear(res);
        return HISTORY_DB_OK;
    }
    return failed(*c, res, err, len);
}

static history_db_status postgres_write(history_db *base, history_entry *const *entries, int n, char *err,
                                        size_t len) {
    postgres_db *db = (postgres_db *)base;
    PGconn **c = &db->writer;
    if (!usable(db, c, err, len)) return HISTORY_DB_RETRY;
    history_db_status s = exec_command(db, c, "BEGIN", err, len);
    for (int i = 0; i < n && s == HISTORY_DB_OK; i++) {
        const history_entry *e = entries[i];
        char images[24], pixels[24], bytes[24], created[24], started[24], finished[24], compute[24];
        snprintf(images, sizeof images, "%d", e->images);
        snprintf(pixels, sizeof pixels, "%" PRId64, e->input_pixels);
        snprintf(bytes, sizeof bytes, "%" PRId64, e->output_bytes);
        snprintf(created, sizeof created, "%" PRId64, history_micros(e->created));
        snprintf(started, sizeof started, "%" PRId64, history_micros(e->started));
        snprintf(finished, sizeof finished, "%" PRId64, history_micros(e->finished));
        snprintf(compute, sizeof compute, "%" PRId64, history_micros(e->compute));
        const char *values[18] = {e->id,     e->owner,  e->client,  e->kind,    e->request_id,
                                  e->state,  e->parameters, images, pixels,     bytes,
                                  created,   e->started > 0 ? started : NULL, finished,
                                  e->worker, e->error_kind, e->error_detail, e->model,
                                  e->compute >= 0 ? compute : NULL};
        PGresult *res = run(db, c, HISTORY_INSERT, 18, NULL, values, err, len);
        if (PQresultStatus(res) == PGRES_COMMAND_OK) PQclear(res);
        else s = failed(*c, res, err, len);
    }
    if (s == HISTORY_DB_OK) return exec_command(db, c, "COMMIT", err, len);
    char ignored[256];
    if (PQstatus(*c) == CONNECTION_OK) PQclear(run(db, c, "ROLLBACK", -1, NULL, NULL, ignored, sizeof ignored));
    return s;
}

/* The first column of a one-row query, into out; false if it failed. */
static bool query_text(const postgres_db *db, PGconn **c, const char *sql, char *out, size_t size, char *err,
                       size_t len) {
    PGresult *res = run(db, c, sql, -1, NULL, NULL, err, len);
    bool ok = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1;
    if (ok) snprintf(out, size, "%s", PQgetvalue(res, 0, 0));
    PQclear(res);
    return ok;
}

/* Checks the version of the schema there, migrates an older one, creates
 * what is missing, and reads the identity secret: one transaction, under
 * the schema lock. */
static int prepare_schema(postgres_db *db, const char *fresh, char secret[65], char *err, size_t len) {
    PGconn **c = &db->writer;
    char version[24] = "", sql[sizeof schema + 256], ignored[256];
    bool ok = exec_command(db, c, "BEGIN; SELECT pg_advisory_xact_lock(" SCHEMA_LOCK ");" HISTORY_VERSION_TABLE,
                           err, len) == HISTORY_DB_OK &&
              query_text(db, c, HISTORY_VERSION_SELECT, version, sizeof version, err, len);
    if (ok && atoi(version) > HISTORY_SCHEMA_VERSION) {
        snprintf(err, len, "history schema version %s is newer than this sdx4's (%d)", version,
                 HISTORY_SCHEMA_VERSION);
        PQclear(run(db, c, "ROLLBACK", -1, NULL, NULL, ignored, sizeof ignored));
        return -1;
    }
    ok = ok && (atoi(version) != 1 || exec_command(db, c, HISTORY_MIGRATE_1, err, len) == HISTORY_DB_OK);
    ok = ok && (atoi(version) < 1 || atoi(version) > 2 ||
                exec_command(db, c, HISTORY_MIGRATE_2, err, len) == HISTORY_DB_OK);
    snprintf(sql, sizeof sql, "%s" HISTORY_SECRET_SQL, schema, fresh);
    ok = ok && exec_command(db, c, sql, err, len) == HISTORY_DB_OK &&
         query_text(db, c, HISTORY_SECRET_SELECT, secret, 65, err, len) &&
         exec_command(db, c, "COMMIT", err, len) == HISTORY_DB_OK;
    if (ok) return 0;
    if (!*c) return -1; /* no answer in time: err says so */
    copy_error(*c, "PostgreSQL history schema: ", err, len);
    PQclear(run(db, c, "ROLLBACK", -1, NULL, NULL, ignored, sizeof ignored));
    return -1;
}

static const char *value(PGresult *res, int row, int col) {
    return PQgetisnull(res, row, col) ? NULL : PQgetvalue(res, row, col);
}

static int64_t number(PGresult *res, int row, int col) {
    return PQgetisnull(res, row, col) ? -1 : strtoll(PQgetvalue(res, row, col), NULL, 10);
}

/* Runs a read on the reader connection, each row to `on_row`. */
static history_db_status read_rows(postgres_db *db, const char *sql, int n, const Oid *types,
                                   const char *const *values, void (*on_row)(PGresult *, int, json_t *),
                                   json_t *rows, char *err, size_t len) {
    pthread_mutex_lock(&db->read_lock);
    history_db_status s = HISTORY_DB_RETRY;
    /* a connection the server closed (a restart) shows only when used:
     * then it is reset and the query tried once more; not one closed here
     * for want of an answer (NULL), which would make the caller wait twice */
    for (int attempt = 0; attempt < 2 && s == HISTORY_DB_RETRY &&
                          (attempt == 0 || (db->reader && PQstatus(db->reader) != CONNECTION_OK)) &&
                          usable(db, &db->reader, err, len);
         attempt++) {
        PGresult *res = run(db, &db->reader, sql, n, types, values, err, len);
        if (PQresultStatus(res) == PGRES_TUPLES_OK) {
            for (int i = 0; i < PQntuples(res); i++) on_row(res, i, rows);
            PQclear(res);
            s = HISTORY_DB_OK;
        } else {
            s = failed(db->reader, res, err, len);
        }
    }
    pthread_mutex_unlock(&db->read_lock);
    return s;
}

static void list_row(PGresult *res, int i, json_t *rows) {
    history_row r = {.id = value(res, i, 0), .kind = value(res, i, 1), .status = value(res, i, 2),
                     .request_id = value(res, i, 3), .client = value(res, i, 4),
                     .images = number(res, i, 5), .parameters = value(res, i, 6),
                     .input_pixels = number(res, i, 7), .output_bytes = number(res, i, 8),
                     .created_us = number(res, i, 9), .started_us = number(res, i, 10),
                     .finished_us = number(res, i, 11), .worker = value(res, i, 12),
                     .error_kind = value(res, i, 13), .error_detail = value(res, i, 14),
                     .model = value(res, i, 15)};
    json_array_append_new(rows, history_row_document(&r));
}

static history_db_status postgres_list(history_db *base, const history_db_query *q, json_t *rows, char *err,
                                       size_t len) {
    char since[24], until[24], before[24], limit[24];
    snprintf(since, sizeof since, "%" PRId64, q->since_us);
    snprintf(until, sizeof until, "%" PRId64, q->until_us);
    snprintf(before, sizeof before, "%" PRId64, q->before_us);
    snprintf(limit, sizeof limit, "%d", q->limit);
    const char *values[7] = {q->owner, q->status, since, until, before, q->before_id, limit};
    const Oid types[7] = {25, 25, 20, 20, 20, 25, 20}; /* text, int8 */
    return read_rows((postgres_db *)base, HISTORY_SELECT, 7, types, values, list_row, rows, err, len);
}

static void usage_row(PGresult *res, int i, json_t *rows) {
    json_array_append_new(rows, history_usage_document(value(res, i, 0), number(res, i, 1), number(res, i, 2),
                                                       number(res, i, 3), number(res, i, 4), number(res, i, 5)));
}

static history_db_status postgres_usage(history_db *base, const history_db_usage_query *q, json_t *rows,
                                        char *err, size_t len) {
    char since[24], until[24], limit[24];
    snprintf(since, sizeof since, "%" PRId64, q->since_us);
    snprintf(until, sizeof until, "%" PRId64, q->until_us);
    snprintf(limit, sizeof limit, "%d", q->limit);
    const char *values[4] = {since, until, q->client, limit};
    const Oid types[4] = {20, 20, 25, 20};
    return read_rows((postgres_db *)base, HISTORY_USAGE, 4, types, values, usage_row, rows, err, len);
}

static void postgres_close(history_db *base) {
    postgres_db *db = (postgres_db *)base;
    PQfinish(db->writer);
    PQfinish(db->reader);
    pthread_mutex_destroy(&db->read_lock);
    free(db->url);
    free(db);
}

static const history_db_ops postgres_ops = {postgres_write, postgres_list, postgres_usage, postgres_close};

history_db *history_postgres_open(const char *url, const char *fresh, char secret[65], double timeout, char *err,
                                  size_t len) {
    postgres_db *db = calloc(1, sizeof *db);
    if (!db || !(db->url = strdup(url))) {
        free(db);
        snprintf(err, len, "out of memory");
        return NULL;
    }
    db->base.ops = &postgres_ops;
    db->timeout = timeout;
    pthread_mutex_init(&db->read_lock, NULL);
    db->writer = connect_url(url);
    db->reader = connect_url(url);
    PGconn *bad = PQstatus(db->writer) != CONNECTION_OK ? db->writer
                  : PQstatus(db->reader) != CONNECTION_OK ? db->reader
                                                          : NULL;
    if (bad || db->writer == NULL || db->reader == NULL) {
        copy_error(bad, "cannot connect to PostgreSQL: ", err, len);
        postgres_close(&db->base);
        return NULL;
    }
    if (prepare_schema(db, fresh, secret, err, len)) {
        postgres_close(&db->base);
        return NULL;
    }
    return &db->base;
}
