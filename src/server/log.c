/*
 * log.c - structured JSON logs (see log.h).
 *
 * A line is built in memory and written with a single write(2) to fd 2, so
 * no lock is taken: writes to a pipe of up to PIPE_BUF (4096) bytes are
 * atomic, which every access line fits in, and a slow reader of the logs
 * never holds a lock that request threads wait for.
 */
#include "log.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static atomic_int min_level = LOG_INFO;
static atomic_bool access_enabled = true;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void log_init(log_level min, bool access) {
    atomic_store(&min_level, (int)min);
    atomic_store(&access_enabled, access);
}

int log_level_parse(const char *name, log_level *level) {
    for (int i = 0; i < 4; i++)
        if (strcmp(name, level_names[i]) == 0) {
            *level = (log_level)i;
            return 0;
        }
    return -1;
}

static bool log_enabled(log_level level) { return (int)level >= atomic_load(&min_level); }
bool log_access_enabled(void) { return atomic_load(&access_enabled); }

void log_event(log_level level, const char *event, json_t *fields) {
    if (!log_enabled(level)) {
        json_decref(fields);
        return;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char stamp[40];
    size_t n = strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(stamp + n, sizeof stamp - n, ".%03ldZ", ts.tv_nsec / 1000000);

    json_t *line = json_object();
    json_object_set_new(line, "ts", json_string(stamp));
    json_object_set_new(line, "level", json_string(level_names[level]));
    json_object_set_new(line, "event", json_string(event));
    if (json_is_object(fields)) json_object_update(line, fields);
    json_decref(fields);

    char *text = json_dumps(line, JSON_COMPACT);
    json_decref(line);
    if (!text) return;
    size_t len = strlen(text);
    text[len] = '\n'; /* json_dumps' terminator becomes the newline */
    ssize_t off = 0;
    while ((size_t)off < len + 1) {
        ssize_t w = write(2, text + off, len + 1 - off);
        if (w <= 0) break;
        off += w;
    }
    free(text);
}
