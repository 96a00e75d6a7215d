/*
 * history_sqlite.c - request history in an SQLite file (history_db.h).
 *
 * Two connections to the file: the writer thread's, and one for listings
 * under a lock. The file is in WAL mode, so a listing reads the last
 * committed state while a write goes on, and synchronous=NORMAL: a
 * committed batch survives the process's crash (not a power loss, which
 * would cost the last batches, not the file). A busy file (another
 * process writing) is waited for 2 s, then the writer retries later.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include <sqlite3.h>

#include "history_db.h"

typedef struct {
    history_db base;
    sqlite3 *writer, *reader;
    sqlite3_stmt *insert; /* the writer's */
    pthread_mutex_t read_lock;
} sqlite_db;

/* After sdx4_schema says the version is not newer than this build's. */
static const char schema[] =
    "CREATE TABLE IF NOT EXISTS sdx4_jobs ("
    " id TEXT PRIMARY KEY, owner TEXT NOT NULL, client TEXT NOT NULL, kind TEXT NOT NULL,"
    " request_id TEXT NOT NULL, status TEXT NOT NULL, parameters TEXT,"
    " images INTEGER NOT NULL, input_pixels INTEGER NOT NULL, output_bytes INTEGER NOT NULL,"
    " created_us INTEGER NOT NULL, started_us INTEGER, finished_us INTEGER NOT NULL,"
    " worker TEXT NOT NULL, error_kind TEXT NOT NULL, error_detail TEXT NOT NULL,"
    " model TEXT NOT NULL DEFAULT '', compute_us INTEGER);"
    "CREATE INDEX IF NOT EXISTS sdx4_jobs_owner_created ON sdx4_jobs (owner, created_us, id);"
    "INSERT INTO sdx4_schema SELECT " HISTORY_VERSION_TEXT " WHERE NOT EXISTS (SELECT 1 FROM sdx4_schema);";

static history_db_status status_of(int rc) {
    switch (rc & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_IOERR:
    case SQLITE_FULL:
    case SQLITE_CANTOPEN:
        return HISTORY_DB_RETRY;
    default:
        return HISTORY_DB_REJECTED;
    }
}

static history_db_status fail(sqlite3 *c, int rc, char *err, size_t len) {
    snprintf(err, len, "%s", c ? sqlite3_errmsg(c) : sqlite3_errstr(rc));
    return status_of(rc);
}

static int connect(const char *path, sqlite3 **c, char *err, size_t len) {
    int rc = sqlite3_open_v2(path, c, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc == SQLITE_OK) rc = sqlite3_busy_timeout(*c, 2000);
    /* the first statement reads the file: a file that is not a database fails here */
    if (rc == SQLITE_OK)
        rc = sqlite3_exec(*c, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;", NULL, NULL, NULL);
    if (rc == SQLITE_OK) return 0;
    snprintf(err, len, "%s: %s", path, *c ? sqlite3_errmsg(*c) : sqlite3_errstr(rc));
    return -1;
}

static const char *column_text(sqlite3_stmt *st, int i) {
    const unsigned char *s = sqlite3_column_text(st, i);
    return s ? (const char *)s : "";
}

/* The first column of a one-row query as text ("" for NULL). */
static int query_text(sqlite3 *c, const char *sql, char *out, size_t size) {
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(c, sql, -1, &st, NULL);
    if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        snprintf(out, size, "%s", column_text(st, 0));
        rc = SQLITE_OK;
    }
    sqlite3_finalize(st);
    return rc;
}

/* Checks the version of the schema there, migrates an older one, creates
 * what is missing, and reads the identity secret: one transaction. */
static int prepare_schema(sqlite3 *c, const char *path, const char *fresh, char secret[65], char *err,
                          size_t len) {
    char version[24] = "", secret_sql[256];
    snprintf(secret_sql, sizeof secret_sql, HISTORY_SECRET_SQL, fresh);
    int rc = sqlite3_exec(c, "BEGIN IMMEDIATE;" HISTORY_VERSION_TABLE, NULL, NULL, NULL);
    if (rc == SQLITE_OK) rc = query_text(c, HISTORY_VERSION_SELECT, version, sizeof version);
    if (rc == SQLITE_OK && atoi(version) > HISTORY_SCHEMA_VERSION) {
        snprintf(err, len, "%s: history schema version %s is newer than this sdx4's (%d)", path, version,
                 HISTORY_SCHEMA_VERSION);
        sqlite3_exec(c, "ROLLBACK;", NULL, NULL, NULL);
        return -1;
    }
    if (rc == SQLITE_OK && atoi(version) == 1) rc = sqlite3_exec(c, HISTORY_MIGRATE_1, NULL, NULL, NULL);
    if (rc == SQLITE_OK && (atoi(version) == 1 || atoi(version) == 2))
        rc = sqlite3_exec(c, HISTORY_MIGRATE_2, NULL, NULL, NULL);
    if (rc == SQLITE_OK) rc = sqlite3_exec(c, schema, NULL, NULL, NULL);
    if (rc == SQLITE_OK) rc = sqlite3_exec(c, secret_sql, NULL, NULL, NULL);
    if (rc == SQLITE_OK) rc = query_text(c, HISTORY_SECRET_SELECT, secret, 65);
    if (rc == SQLITE_OK) rc = sqlite3_exec(c, "COMMIT;", NULL, NULL, NULL);
    if (rc == SQLITE_OK) return 0;
    snprintf(err, len, "%s: %s", path, sqlite3_errmsg(c));
    sqlite3_exec(c, "ROLLBACK;", NULL, NULL, NULL);
    return -1;
}

static void bind_text(sqlite3_stmt *st, int i, const char *s) {
    if (s) sqlite3_bind_text(st, i, s, -1, SQLITE_STATIC);
    else sqlite3_bind_null(st, i);
}

static history_db_status sqlite_write(history_db *base, history_entry *const *entries, int n, char *err,
                                      size_t len) {
    sqlite_db *db = (sqlite_db *)base;
    int rc = sqlite3_exec(db->writer, "BEGIN IMMEDIATE;", NULL, NULL, NULL);
    for (int i = 0; i < n && rc == SQLITE_OK; i++) {
        const history_entry *e = entries[i];
        sqlite3_stmt *st = db->insert;
        const char *texts[] = {e->id, e->owner, e->client, e->kind, e->request_id, e->state, e->parameters};
        for (int k = 0; k < 7; k++) bind_text(st, k + 1, texts[k]);
        sqlite3_bind_int64(st, 8, e->images);
        sqlite3_bind_int64(st, 9, e->input_pixels);
        sqlite3_bind_int64(st, 10, e->output_bytes);
        sqlite3_bind_int64(st, 11, history_micros(e->created));
        if (e->started > 0) sqlite3_bind_int64(st, 12, history_micros(e->started));
        else sqlite3_bind_null(st, 12);
        sqlite3_bind_int64(st, 13, history_micros(e->finished));
        bind_text(st, 14, e->worker);
        bind_text(st, 15, e->error_kind);
        bind_text(st, 16, e->error_detail);
        bind_text(st, 17, e->model);
        if (e->compute >= 0) sqlite3_bind_int64(st, 18, history_micros(e->compute));
        else sqlite3_bind_null(st, 18);
        rc = sqlite3_step(st);
        if (rc == SQLITE_DONE) rc = SQLITE_OK;
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
    }
    if (rc == SQLITE_OK) rc = sqlite3_exec(db->writer, "COMMIT;", NULL, NULL, NULL);
    if (rc == SQLITE_OK) return HISTORY_DB_OK;
    history_db_status s = fail(db->writer, rc, err, len);
    if (!sqlite3_get_autocommit(db->writer)) sqlite3_exec(db->writer, "ROLLBACK;", NULL, NULL, NULL);
    return s;
}

static history_db_status sqlite_list(history_db *base, const history_db_query *q, json_t *rows, char *err,
                                     size_t len) {
    sqlite_db *db = (sqlite_db *)base;
    pthread_mutex_lock(&db->read_lock);
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(db->reader, HISTORY_SELECT, -1, &st, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_text(st, 1, q->owner, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, q->status, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 3, q->since_us);
        sqlite3_bind_int64(st, 4, q->until_us);
        sqlite3_bind_int64(st, 5, q->before_us);
        sqlite3_bind_text(st, 6, q->before_id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 7, q->limit);
    }
    while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        history_row r = {
            .id = column_text(st, 0), .kind = column_text(st, 1), .status = column_text(st, 2),
            .request_id = column_text(st, 3), .client = column_text(st, 4),
            .images = sqlite3_column_int64(st, 5),
            .parameters = sqlite3_column_type(st, 6) == SQLITE_NULL ? NULL : column_text(st, 6),
            .input_pixels = sqlite3_column_int64(st, 7), .output_bytes = sqlite3_column_int64(st, 8),
            .created_us = sqlite3_column_int64(st, 9),
            .started_us = sqlite3_column_type(st, 10) == SQLITE_NULL ? -1 : sqlite3_column_int64(st, 10),
            .finished_us = sqlite3_column_int64(st, 11), .worker = column_text(st, 12),
            .error_kind = column_text(st, 13), .error_detail = column_text(st, 14),
            .model = column_text(st, 15)};
        json_array_append_new(rows, history_row_document(&r));
        rc = SQLITE_OK;
    }
    history_db_status s = rc == SQLITE_DONE ? HISTORY_DB_OK : fail(db->reader, rc, err, len);
    sqlite3_finalize(st);
    pthread_mutex_unlock(&db->read_lock);
    return s;
}

static history_db_status sqlite_usage(history_db *base, const history_db_usage_query *q, json_t *rows,
                                      char *err, size_t len) {
    sqlite_db *db = (sqlite_db *)base;
    pthread_mutex_lock(&db->read_lock);
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(db->reader, HISTORY_USAGE, -1, &st, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_int64(st, 1, q->since_us);
        sqlite3_bind_int64(st, 2, q->until_us);
        sqlite3_bind_text(st, 3, q->client, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 4, q->limit);
    }
    while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        json_array_append_new(rows, history_usage_document(
                                        column_text(st, 0), sqlite3_column_int64(st, 1), sqlite3_column_int64(st, 2),
                                        sqlite3_column_int64(st, 3), sqlite3_column_int64(st, 4),
                                        sqlite3_column_int64(st, 5)));
        rc = SQLITE_OK;
    }
    history_db_status s = rc == SQLITE_DONE ? HISTORY_DB_OK : fail(db->reader, rc, err, len);
    sqlite3_finalize(st);
    pthread_mutex_unlock(&db->read_lock);
    return s;
}

static void sqlite_close(history_db *base) {
    sqlite_db *db = (sqlite_db *)base;
    sqlite3_finalize(db->insert);
    sqlite3_close(db->writer);
    sqlite3_close(db->reader);
    pthread_mutex_destroy(&db->read_lock);
    free(db);
}

static const history_db_ops sqlite_ops = {sqlite_write, sqlite_list, sqlite_usage, sqlite_close};

history_db *history_sqlite_open(const char *path, const char *fresh, char secret[65], char *err, size_t len) {
    sqlite_db *db = calloc(1, sizeof *db);
    if (!db) {
        snprintf(err, len, "out of memory");
        return NULL;
    }
    db->base.ops = &sqlite_ops;
    pthread_mutex_init(&db->read_lock, NULL);
    if (connect(path, &db->writer, err, len) || prepare_schema(db->writer, path, fresh, secret, err, len) ||
        connect(path, &db->reader, err, len)) {
        sqlite_close(&db->base);
        return NULL;
    }
    if (sqlite3_prepare_v2(db->writer, HISTORY_INSERT, -1, &db->insert, NULL) != SQLITE_OK) {
        snprintf(err, len, "%s: %s", path, sqlite3_errmsg(db->writer));
        sqlite_close(&db->base);
        return NULL;
    }
    return &db->base;
}
