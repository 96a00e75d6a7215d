/*
 * history.h - request history: every finished job, in a durable store.
 *
 * A file path opens SQLite (one process), a postgresql:// or postgres://
 * URL opens PostgreSQL (several processes sharing one database). The
 * store knows nothing of in-memory jobs: an entry is plain values, so a
 * job finished by any implementation of the job store, on any node, is
 * recorded the same way.
 *
 * history_record never waits for the database: it copies the entry into a
 * bounded queue that a thread of its own writes out, and drops (and
 * counts) what does not fit while the database is slow or down (see
 * history.c). history_list reads synchronously. Thread-safe.
 */
#ifndef SDX4_SERVER_HISTORY_H
#define SDX4_SERVER_HISTORY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

typedef struct history history;

/* One finished job. Times are wall-clock seconds since the epoch
 * (started 0: no task ever ran); strings are NUL-terminated and may be
 * empty; `parameters` is JSON text (or NULL), copied by history_record. */
typedef struct {
    char id[33];
    char owner[64];      /* the API key's identity (auth.h), "" anonymous */
    char client[64];     /* the rate-limit client: key identity or address */
    char kind[16];       /* "upscale" (synchronous), "job", "batch" */
    char request_id[48];
    char state[16];      /* "succeeded", "failed", "canceled" */
    char worker[64];     /* what ran it: the host in single-process mode */
    char model[64];      /* the model that ran it (its name), "" unknown */
    char error_kind[32]; /* problem slug ("timeout"), "" when none */
    char error_detail[384];
    const char *parameters;
    int images;
    int64_t input_pixels, output_bytes; /* over all images */
    double created, started, finished;
    double compute; /* device seconds: its tasks' shares of the runs they were
                       in (a batch's time is split between its upscales);
                       -1 unknown (then usage counts started..finished) */
} history_entry;

typedef struct {
    const char *owner;  /* only this owner's jobs */
    const char *status; /* a final state, or NULL for any */
    double since, until; /* created in [since, until); -INFINITY, INFINITY: unbounded */
    int limit;          /* 1..HISTORY_MAX_LIMIT */
    const char *cursor; /* next_cursor of the previous page, or NULL */
} history_query;

#define HISTORY_MAX_LIMIT 100

typedef enum {
    HISTORY_OK,
    HISTORY_BAD_CURSOR,  /* the cursor is not one this store gave out */
    HISTORY_UNAVAILABLE, /* the database cannot be read now; err says why */
} history_result;

typedef struct {
    uint64_t written, dropped, rejected; /* rejected: refused by the database itself */
    size_t queued;
    bool up; /* the last write or connection attempt succeeded */
} history_stats;

/* Opens (creating the schema if needed) the store `where` names, with a
 * queue of `backlog` entries; a PostgreSQL call waits `timeout` seconds
 * at most for its answer. NULL and a message in `err` on failure:
 * an unreachable server, a file that is not a database, a schema newer
 * than this build. */
history *history_open(const char *where, int backlog, double timeout, char *err, size_t n);
/* Waits at most `seconds` for the queue to be written out, then stops the
 * writer and closes the store; what is still queued is lost (counted). */
void history_close(history *h, double seconds);

/* Queues a copy of `e`; never blocks on the database. */
void history_record(history *h, const history_entry *e);

/* A page of the owner's jobs, newest first:
 * {"jobs":[...], "next_cursor": "..." or null}. */
history_result history_list(history *h, const history_query *q, json_t **page, char *err, size_t n);

/* The admin API's usage report: requests, images, compute seconds and
 * errors per client and UTC day, days then clients in order. */
typedef struct {
    double since, until; /* created in [since, until); -INFINITY, INFINITY: unbounded */
    const char *client;  /* one client's only, or NULL for all */
    int limit;           /* rows, 1..HISTORY_MAX_USAGE_ROWS */
} history_usage_query;

#define HISTORY_MAX_USAGE_ROWS 10000

/* rows: [{client, date, requests, images, compute_seconds, errors}] */
history_result history_usage(history *h, const history_usage_query *q, json_t **rows, char *err, size_t n);

void history_get_stats(history *h, history_stats *s);

/* The secret that makes API keys' identities stable (auth.h): drawn when
 * the database was made, the same for every server that opens it. */
void history_identity_secret(const history *h, uint8_t secret[32]);

/* RFC 3339 ("2026-12-06T17:00:00Z", "...00.5+01:00") -> seconds since
 * the epoch; -1 if malformed. */
int history_parse_time(const char *text, double *wall);

#endif
