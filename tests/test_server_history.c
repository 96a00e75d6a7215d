/*
 * test_server_history.c - the request history's SQLite store (history.c,
 * history_sqlite.c): entries recorded through the queue come back, newest
 * first, paged by cursor and filtered by owner, status and time; they
 * survive a reopen; a busy database holds the queue and drops only what
 * exceeds it; an entry the database refuses is dropped alone; bad cursors,
 * corrupt files and newer schemas are refused with a reason.
 */
#include <stdbool.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>

#include "history.h"
#include "test.h"

/* Created at any time. */
#define ALL_TIME .since = -INFINITY, .until = INFINITY

static char dir[] = "/tmp/sdx4-history-XXXXXX";

static const char *path_in(const char *name) {
    static char buf[2][256];
    static int next;
    char *b = buf[next++ & 1];
    snprintf(b, sizeof buf[0], "%s/%s", dir, name);
    return b;
}

/* Entry i: owner "alice" for even i, "bob" for odd; every third failed;
 * created one second apart from 2026-12-06T00:00:00Z. */
static history_entry entry(int i) {
    history_entry e = {.images = 1, .input_pixels = 64 * 64, .output_bytes = 1000 + i,
                       .created = 1796515200.0 + i, .started = 1796515200.25 + i,
                       .finished = 1796515200.5 + i, .parameters = "[{\"steps\":20,\"seed\":7}]"};
    snprintf(e.id, sizeof e.id, "%032x", i + 1);
    snprintf(e.owner, sizeof e.owner, "%s", i % 2 ? "bob" : "alice");
    snprintf(e.client, sizeof e.client, "%s", e.owner);
    snprintf(e.kind, sizeof e.kind, "job");
    snprintf(e.request_id, sizeof e.request_id, "req-%d", i);
    snprintf(e.worker, sizeof e.worker, "host");
    if (i % 3 == 0) {
        snprintf(e.state, sizeof e.state, "failed");
        snprintf(e.error_kind, sizeof e.error_kind, "timeout");
        snprintf(e.error_detail, sizeof e.error_detail, "took too long");
    } else {
        snprintf(e.state, sizeof e.state, "succeeded");
    }
    return e;
}

/* Waits until `written` entries were written and none is queued. */
static bool settled(history *h, uint64_t written, double seconds) {
    history_stats s;
    for (int i = 0; i < (int)(seconds * 100); i++) {
        history_get_stats(h, &s);
        if (s.written >= written && s.queued == 0) return true;
        usleep(10 * 1000);
    }
    return false;
}

/* Every page of the query; the ids in order, concatenated by commas. */
static int list_all(history *h, history_query q, char *ids, size_t size, int *pages) {
    ids[0] = '\0';
    *pages = 0;
    char cursor[80] = "";
    for (;;) {
        json_t *page = NULL;
        char err[256];
        q.cursor = cursor[0] ? cursor : NULL;
        if (history_list(h, &q, &page, err, sizeof err) != HISTORY_OK) return -1;
        (*pages)++;
        size_t i;
        json_t *job;
        json_array_foreach(json_object_get(page, "jobs"), i, job) {
            size_t n = strlen(ids);
            snprintf(ids + n, size - n, "%s%d", n ? "," : "",
                     (int)strtol(json_string_value(json_object_get(job, "id")), NULL, 16) - 1);
        }
        json_t *next = json_object_get(page, "next_cursor");
        if (!json_is_string(next)) {
            json_decref(page);
            return 0;
        }
        snprintf(cursor, sizeof cursor, "%s", json_string_value(next));
        json_decref(page);
    }
}

static void test_record_and_list(void) {
    char err[256];
    history *h = history_open(path_in("h.db"), 100, 15, err, sizeof err);
    CHECK(h, "open: %s", err);
    if (!h) return;
    for (int i = 0; i < 10; i++) {
        history_entry e = entry(i);
        history_record(h, &e);
    }
    history_record(h, &(history_entry){.id = "00000000000000000000000000000001", .owner = "alice",
                                        .state = "failed", .created = 1.0, .finished = 2.0});
    CHECK(settled(h, 11, 5), "the entries were not written");

    char ids[256];
    int pages;
    /* alice: 8, 6, 4, 2, 0 newest first; the duplicate id (a retried write) is ignored */
    CHECK(list_all(h, (history_query){ALL_TIME, .owner = "alice", .limit = 2}, ids, sizeof ids, &pages) == 0, "list");
    CHECK(strcmp(ids, "8,6,4,2,0") == 0 && pages == 3, "alice's jobs: %s in %d pages", ids, pages);
    CHECK(list_all(h, (history_query){ALL_TIME, .owner = "alice", .limit = 5}, ids, sizeof ids, &pages) == 0 &&
              pages == 1, "an exact page has no next cursor: %d pages", pages);
    CHECK(list_all(h, (history_query){ALL_TIME, .owner = "bob", .limit = 100}, ids, sizeof ids, &pages) == 0 &&
              strcmp(ids, "9,7,5,3,1") == 0, "bob's jobs: %s", ids);
    CHECK(list_all(h, (history_query){ALL_TIME, .owner = "carol", .limit = 10}, ids, sizeof ids, &pages) == 0 &&
              ids[0] == '\0' && pages == 1, "carol has none: %s", ids);
    CHECK(list_all(h, (history_query){ALL_TIME, .owner = "bob", .status = "failed", .limit = 1}, ids, sizeof ids,
                   &pages) == 0 && strcmp(ids, "9,3") == 0, "bob's failed jobs: %s", ids);
    CHECK(list_all(h, (history_query){.owner = "alice", .since = 1796515202.0, .until = 1796515206.0, .limit = 1},
                   ids, sizeof ids, &pages) == 0 && strcmp(ids, "4,2") == 0,
          "alice's jobs created in [2 s, 6 s): %s", ids);

    /* one document in full */
    json_t *page = NULL;
    CHECK(history_list(h, &(history_query){ALL_TIME, .owner = "bob", .limit = 1}, &page, err, sizeof err) == HISTORY_OK,
          "list: %s", err);
    json_t *job = json_array_get(json_object_get(page, "jobs"), 0);
    char *text = json_dumps(job, JSON_COMPACT | JSON_SORT_KEYS);
    const char *want = "{\"client\":\"bob\",\"created_at\":\"2026-12-06T00:00:09.000Z\",\"error\":{\"detail\":"
                       "\"took too long\",\"kind\":\"timeout\"},\"finished_at\":\"2026-12-06T00:00:09.500Z\","
                       "\"id\":\"0000000000000000000000000000000a\",\"images\":1,\"input_pixels\":4096,"
                       "\"kind\":\"job\",\"output_bytes\":1009,\"parameters\":[{\"seed\":7,\"steps\":20}],"
                       "\"request_id\":\"req-9\",\"started_at\":\"2026-12-06T00:00:09.250Z\",\"status\":"
                       "\"failed\",\"worker\":\"host\"}";
    CHECK(text && strcmp(text, want) == 0, "document:\n%s\nwanted:\n%s", text, want);
    free(text);
    json_decref(page);

    static const char *const bad[] = {"x", "123", "123-abc", "-5-00000000000000000000000000000001",
                                      "99999999999999999999-00000000000000000000000000000001",
                                      "5-0000000000000000000000000000000G", "5-00000000000000000000000000000001x"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        page = NULL;
        CHECK(history_list(h, &(history_query){ALL_TIME, .owner = "bob", .limit = 1, .cursor = bad[i]}, &page, err,
                           sizeof err) == HISTORY_BAD_CURSOR && !page, "cursor \"%s\" accepted", bad[i]);
    }
    uint8_t secret[32], again[32];
    history_identity_secret(h, secret);
    history_close(h, 5);

    /* reopened: the rows are still there, and API keys keep their identities */
    h = history_open(path_in("h.db"), 100, 15, err, sizeof err);
    CHECK(h, "reopen: %s", err);
    if (!h) return;
    history_identity_secret(h, again);
    CHECK(memcmp(secret, again, 32) == 0, "the identity secret changed");
    history *other = history_open(path_in("other.db"), 100, 15, err, sizeof err);
    CHECK(other, "open: %s", err);
    history_identity_secret(other, again);
    CHECK(memcmp(secret, again, 32) != 0, "two databases have one identity secret");
    history_close(other, 5);
    CHECK(list_all(h, (history_query){ALL_TIME, .owner = "alice", .limit = 100}, ids, sizeof ids, &pages) == 0 &&
              strcmp(ids, "8,6,4,2,0") == 0, "after reopening: %s", ids);
    history_close(h, 5);
}

/* Another connection holds the file's write lock: the writer's batch
 * waits and is retried, the queue fills, and only what exceeds it is
 * dropped; once the lock goes, everything queued is written. */
static void test_busy_database(void) {
    char err[256];
    history *h = history_open(path_in("busy.db"), 3, 15, err, sizeof err);
    CHECK(h, "open: %s", err);
    if (!h) return;
    sqlite3 *other;
    CHECK(sqlite3_open(path_in("busy.db"), &other) == SQLITE_OK, "second connection");
    CHECK(sqlite3_exec(other, "BEGIN EXCLUSIVE", NULL, NULL, NULL) == SQLITE_OK, "lock: %s", sqlite3_errmsg(other));
    double t0 = (double)time(NULL);
    for (int i = 0; i < 8; i++) {
        history_entry e = entry(i);
        history_record(h, &e);
    }
    CHECK((double)time(NULL) - t0 < 1, "history_record waited for the database");
    history_stats s;
    for (int i = 0; i < 500; i++) { /* the busy timeout (2 s) runs out */
        history_get_stats(h, &s);
        if (!s.up) break;
        usleep(10 * 1000);
    }
    CHECK(!s.up && s.written == 0 && s.dropped == 5 && s.queued == 3,
          "while locked: up %d written %llu dropped %llu queued %zu", s.up, (unsigned long long)s.written,
          (unsigned long long)s.dropped, s.queued);
    sqlite3_exec(other, "COMMIT", NULL, NULL, NULL);
    CHECK(settled(h, 3, 10), "the queue was not written after the lock went");
    history_get_stats(h, &s);
    CHECK(s.up && s.written == 3 && s.dropped == 5, "after: up %d written %llu dropped %llu", s.up,
          (unsigned long long)s.written, (unsigned long long)s.dropped);
    sqlite3_close(other);
    history_close(h, 5);
}

/* A trigger refuses one entry: the others of its batch are written. */
static void test_rejected_entry(void) {
    char err[256];
    history *h = history_open(path_in("refuse.db"), 100, 15, err, sizeof err);
    CHECK(h, "open: %s", err);
    if (!h) return;
    sqlite3 *other;
    sqlite3_open(path_in("refuse.db"), &other);
    CHECK(sqlite3_exec(other, "CREATE TRIGGER refuse BEFORE INSERT ON sdx4_jobs WHEN NEW.request_id = 'req-2' "
                              "BEGIN SELECT RAISE(ABORT, 'refused'); END", NULL, NULL, NULL) == SQLITE_OK,
          "trigger: %s", sqlite3_errmsg(other));
    sqlite3_close(other);
    for (int i = 0; i < 5; i++) {
        history_entry e = entry(i);
        history_record(h, &e);
    }
    history_stats s;
    for (int i = 0; i < 500; i++) {
        history_get_stats(h, &s);
        if (s.written + s.rejected == 5) break;
        usleep(10 * 1000);
    }
    CHECK(s.written == 4 && s.rejected == 1 && s.up, "written %llu rejected %llu",
          (unsigned long long)s.written, (unsigned long long)s.rejected);
    history_close(h, 5);
}

static void test_bad_stores(void) {
    char err[256] = "";
    FILE *f = fopen(path_in("corrupt.db"), "wb");
    for (int i = 0; i < 200; i++) fputs("not a database at all ", f);
    fclose(f);
    history *h = history_open(path_in("corrupt.db"), 10, 15, err, sizeof err);
    CHECK(!h && strstr(err, "corrupt.db") && strstr(err, "not a database"), "corrupt file: %s", err);

    h = history_open(path_in("no/such/dir/h.db"), 10, 15, err, sizeof err);
    CHECK(!h && strstr(err, "h.db") && strstr(err, "unable to open"), "missing folder: %s", err);

    sqlite3 *db;
    sqlite3_open(path_in("newer.db"), &db);
    sqlite3_exec(db, "CREATE TABLE sdx4_schema (version INTEGER NOT NULL); INSERT INTO sdx4_schema VALUES (4);",
                 NULL, NULL, NULL);
    sqlite3_close(db);
    h = history_open(path_in("newer.db"), 10, 15, err, sizeof err);
    CHECK(!h && strstr(err, "schema version 4 is newer"), "newer schema: %s", err);

    h = history_open("postgresql://127.0.0.1:1/none?connect_timeout=2", 10, 15, err, sizeof err);
    CHECK(!h && strstr(err, "cannot connect to PostgreSQL"), "unreachable PostgreSQL: %s", err);
    h = history_open("", 10, 15, err, sizeof err);
    CHECK(!h && err[0], "empty name accepted");
}

static void test_parse_time(void) {
    static const struct {
        const char *text;
        double want; /* -1: refused */
    } cases[] = {
        {"2026-12-06T00:00:09Z", 1796515209},
        {"2026-12-06t00:00:09.5z", 1796515209.5},
        {"2026-12-06 01:00:09+01:00", 1796515209},
        {"2026-12-05T23:30:09-00:30", 1796515209},
        {"1970-01-01T00:00:00Z", 0},
        {"2024-02-29T00:00:00Z", 1709164800},
        {"2026-02-29T00:00:00Z", -1},
        {"2026-12-06", -1},
        {"2026-12-06T00:00:09", -1},
        {"2026-13-06T00:00:09Z", -1},
        {"2026-12-06T24:00:09Z", -1},
        {"2026-12-06T00:00:09.Z", -1},
        {"2026-12-06T00:00:09Zjunk", -1},
        {"+2026-12-06T00:00:09Z", -1},
        {"2026-12-06T00:00:09+0100", -1},
        {"", -1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        double got = -1;
        int rc = history_parse_time(cases[i].text, &got);
        if (cases[i].want < 0) CHECK(rc == -1, "\"%s\" accepted as %f", cases[i].text, got);
        else CHECK(rc == 0 && fabs(got - cases[i].want) < 1e-6, "\"%s\": %d, %f", cases[i].text, rc, got);
    }
}

/* A database of schema version 1 (before the model and compute columns)
 * is migrated at open: its rows stay, without a model, and the usage
 * counts their start to end; new rows have their model and their compute
 * share. */
static void test_migration(void) {
    sqlite3 *db;
    sqlite3_open(path_in("v1.db"), &db);
    CHECK(sqlite3_exec(db, "CREATE TABLE sdx4_schema (version INTEGER NOT NULL); INSERT INTO sdx4_schema VALUES (1);"
                           "CREATE TABLE sdx4_jobs (id TEXT PRIMARY KEY, owner TEXT NOT NULL, client TEXT NOT NULL,"
                           " kind TEXT NOT NULL, request_id TEXT NOT NULL, status TEXT NOT NULL, parameters TEXT,"
                           " images INTEGER NOT NULL, input_pixels INTEGER NOT NULL, output_bytes INTEGER NOT NULL,"
                           " created_us INTEGER NOT NULL, started_us INTEGER, finished_us INTEGER NOT NULL,"
                           " worker TEXT NOT NULL, error_kind TEXT NOT NULL, error_detail TEXT NOT NULL);"
                           "INSERT INTO sdx4_jobs VALUES ('00000000000000000000000000000001', 'alice', 'alice', "
                           "'job', 'old', 'succeeded', NULL, 1, 4096, 10, 1000000, 1500000, 2000000, 'host', '', '');",
                       NULL, NULL, NULL) == SQLITE_OK,
          "version 1 database: %s", sqlite3_errmsg(db));
    sqlite3_close(db);
    char err[256];
    history *h = history_open(path_in("v1.db"), 10, 15, err, sizeof err);
    CHECK(h, "open a version 1 database: %s", err);
    if (!h) return;
    history_entry e = entry(2); /* alice's: a third of a batch's 0.375 s */
    snprintf(e.model, sizeof e.model, "rrdb_x4");
    e.compute = 0.125;
    history_record(h, &e);
    CHECK(settled(h, 1, 5), "the entry was not written");
    json_t *page = NULL;
    CHECK(history_list(h, &(history_query){ALL_TIME, .owner = "alice", .limit = 10}, &page, err, sizeof err) ==
              HISTORY_OK, "list: %s", err);
    json_t *jobs = json_object_get(page, "jobs");
    CHECK(json_array_size(jobs) == 2 &&
              !strcmp(json_string_value(json_object_get(json_array_get(jobs, 0), "model")), "rrdb_x4") &&
              !json_object_get(json_array_get(jobs, 1), "model"),
          "after the migration: %s", json_dumps(page, JSON_COMPACT));
    json_decref(page);
    json_t *usage = NULL;
    CHECK(history_usage(h, &(history_usage_query){-INFINITY, INFINITY, NULL, 10}, &usage, err, sizeof err) ==
              HISTORY_OK, "usage: %s", err);
    double old_s = json_real_value(json_object_get(json_array_get(usage, 0), "compute_seconds"));
    double new_s = json_real_value(json_object_get(json_array_get(usage, 1), "compute_seconds"));
    CHECK(json_array_size(usage) == 2 && old_s == 0.5 && new_s == 0.125, "usage after the migration: %s",
          json_dumps(usage, JSON_COMPACT));
    json_decref(usage);
    history_close(h, 5);
    sqlite3_open(path_in("v1.db"), &db);
    char version[8] = "";
    sqlite3_stmt *st;
    sqlite3_prepare_v2(db, "SELECT max(version) FROM sdx4_schema", -1, &st, NULL);
    if (sqlite3_step(st) == SQLITE_ROW) snprintf(version, sizeof version, "%s", sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
    sqlite3_close(db);
    CHECK(!strcmp(version, "3"), "schema version after the migration: %s", version);
}

int main(void) {
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    test_record_and_list();
    test_busy_database();
    test_rejected_entry();
    test_migration();
    test_bad_stores();
    test_parse_time();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    printf("%d checks, %d failures\n", test_checks, test_failures);
    return test_failures ? 1 : 0;
}
