/*
 * history_db.h - the two databases behind history.c: SQLite and PostgreSQL.
 *
 * A backend is a table of three operations behind an opaque handle, as
 * the engine's backends are: history.c owns the queue, the writer thread,
 * the cursor and the documents; a backend only turns entries into rows
 * and rows back into values. `write` is called by the writer thread only;
 * `list` by any thread (a backend keeps a separate connection for reads,
 * under its own lock, so that a listing never waits behind a write).
 *
 * Both backends take the same statements with the same $1..$N
 * parameters: PostgreSQL numbers them, and SQLite numbers named
 * parameters in order of first appearance, which the statements keep.
 */
#ifndef SDX4_SERVER_HISTORY_DB_H
#define SDX4_SERVER_HISTORY_DB_H

#include "history.h"

/* The schema this build writes. sdx4_schema holds the version a database
 * was made with: a newer one is refused at open rather than misread, an
 * older one migrated (HISTORY_MIGRATE_1, _2, under the same transaction).
 * Version 2 added the model column (several models per server), 3 the
 * compute column (a job's share of device seconds, for the usage). */
#define HISTORY_SCHEMA_VERSION 3
#define HISTORY_VERSION_TEXT "3"
#define HISTORY_VERSION_TABLE "CREATE TABLE IF NOT EXISTS sdx4_schema (version INTEGER NOT NULL);"
#define HISTORY_VERSION_SELECT "SELECT coalesce(max(version), 0) FROM sdx4_schema"

typedef enum {
    HISTORY_DB_OK,
    HISTORY_DB_RETRY,    /* unreachable, busy or full: the same write may succeed later */
    HISTORY_DB_REJECTED, /* the database refused the statement: some entry is bad */
} history_db_status;

typedef struct history_db history_db;

typedef struct {
    const char *owner, *status; /* status "" for any */
    int64_t since_us, until_us;  /* created in [since, until) */
    int64_t before_us;           /* the cursor: rows before (before_us, before_id) */
    const char *before_id;
    int limit;
} history_db_query;

/* One row as read, pointing into the backend's result (valid until the
 * callback returns); started_us < 0 when no task ever ran. */
typedef struct {
    const char *id, *kind, *status, *request_id, *client, *parameters, *worker, *error_kind,
        *error_detail, *model;
    int64_t images, input_pixels, output_bytes, created_us, started_us, finished_us;
} history_row;

/* The admin API's usage: per client and day (UTC) in [since, until), at
 * most `limit` rows, one client's only when `client` is not "". */
typedef struct {
    int64_t since_us, until_us;
    const char *client;
    int limit;
} history_db_usage_query;

typedef struct {
    /* Writes the entries in one transaction (all or none). */
    history_db_status (*write)(history_db *db, history_entry *const *entries, int n, char *err,
                               size_t len);
    /* Appends history_row_document() of each matching row to `rows`:
     * newest first, at most q->limit. */
    history_db_status (*list)(history_db *db, const history_db_query *q, json_t *rows, char *err,
                              size_t len);
    /* Appends history_usage_document() of each (client, day), in day
     * then client order. */
    history_db_status (*usage)(history_db *db, const history_db_usage_query *q, json_t *rows, char *err,
                               size_t len);
    void (*close)(history_db *db);
} history_db_ops;

struct history_db {
    const history_db_ops *ops;
};

/* `fresh` (64 hex digits) becomes the identity secret of a new database;
 * `secret` receives the database's. */
history_db *history_sqlite_open(const char *path, const char *fresh, char secret[65], char *err, size_t len);
history_db *history_postgres_open(const char *url, const char *fresh, char secret[65], double timeout, char *err,
                                  size_t len);

/* The identity secret's table, the same in both dialects; a printf
 * format of the fresh secret (hex digits: nothing to quote). */
#define HISTORY_SECRET_SQL                                                                        \
    "CREATE TABLE IF NOT EXISTS sdx4_secret (secret TEXT NOT NULL);"                             \
    "INSERT INTO sdx4_secret SELECT '%s' WHERE NOT EXISTS (SELECT 1 FROM sdx4_secret);"
#define HISTORY_SECRET_SELECT "SELECT secret FROM sdx4_secret LIMIT 1"

/* Version 1 to 2, the same in both dialects: jobs recorded before have
 * model "" (unknown: the server's only model then). */
#define HISTORY_MIGRATE_1                                                                         \
    "ALTER TABLE sdx4_jobs ADD COLUMN model TEXT NOT NULL DEFAULT '';"                           \
    "UPDATE sdx4_schema SET version = 2;"
/* Version 2 to 3: jobs recorded before have compute NULL (unknown: the
 * usage counts their first start to their end, as it did). */
#define HISTORY_MIGRATE_2                                                                         \
    "ALTER TABLE sdx4_jobs ADD COLUMN compute_us BIGINT;"                                        \
    "UPDATE sdx4_schema SET version = 3;"

/* From history.c, for both backends. */
json_t *history_row_document(const history_row *r);
/* {client, date, requests, images, compute_seconds, errors}; `day` counts
 * days since the epoch. */
json_t *history_usage_document(const char *client, int64_t day, int64_t requests, int64_t images,
                               int64_t compute_us, int64_t errors);
int64_t history_micros(double wall); /* 0 stays 0: "never" */

#define HISTORY_COLUMNS                                                                           \
    "id, owner, client, kind, request_id, status, parameters, images, input_pixels, "            \
    "output_bytes, created_us, started_us, finished_us, worker, error_kind, error_detail, model, "\
    "compute_us"
#define HISTORY_INSERT                                                                            \
    "INSERT INTO sdx4_jobs (" HISTORY_COLUMNS ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, "   \
    "$10, $11, $12, $13, $14, $15, $16, $17, $18) ON CONFLICT (id) DO NOTHING"
/* Keyset paging on (created_us, id), which the index orders: a page costs
 * the same however deep it is, and rows written meanwhile never shift it. */
#define HISTORY_SELECT                                                                            \
    "SELECT id, kind, status, request_id, client, images, parameters, input_pixels, "            \
    "output_bytes, created_us, started_us, finished_us, worker, error_kind, error_detail, model " \
    "FROM sdx4_jobs WHERE owner = $1 AND ($2 = '' OR status = $2) AND created_us >= $3 "         \
    "AND created_us < $4 AND (created_us, id) < ($5, $6) "                                       \
    "ORDER BY created_us DESC, id DESC LIMIT $7"

/* Usage per client and day: compute time is each job's share of device
 * seconds (a batch's time split between the upscales in it), or for rows
 * of schema 2 and before, from its first task starting to its end; errors
 * are failed jobs (canceled ones are not). */
#define HISTORY_USAGE                                                                             \
    "SELECT client, created_us / 86400000000 AS day, count(*), sum(images), "                    \
    "sum(CASE WHEN compute_us IS NOT NULL THEN compute_us "                                       \
    "WHEN started_us IS NOT NULL AND finished_us > started_us "                                   \
    "THEN finished_us - started_us ELSE 0 END), "                                                 \
    "sum(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) FROM sdx4_jobs "                         \
    "WHERE created_us >= $1 AND created_us < $2 AND ($3 = '' OR client = $3) "                   \
    "GROUP BY client, day ORDER BY day, client LIMIT $4"

#endif
