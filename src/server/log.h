/*
 * log.h - structured logs: one JSON object per line on stderr.
 *
 * Every line has "ts" (UTC, milliseconds), "level" and "event"; the rest are
 * the fields the caller passes, request_id among them wherever a request is
 * concerned, so that access logs, event logs and problem responses can be
 * joined. Thread-safe.
 *
 * Once log_start has run, lines go through a bounded in-memory queue that
 * a thread of its own writes out: a slow or stalled reader of stderr never
 * blocks a caller, lines that do not fit are dropped and counted, and a
 * "log_lines_dropped" line marks the gap (see log.c).
 */
#ifndef SDX4_SERVER_LOG_H
#define SDX4_SERVER_LOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

typedef enum { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR } log_level;

/* Messages below `min` are dropped; access lines only when `access`. */
void log_init(log_level min, bool access);
/* "debug", "info", "warn", "error" -> level; -1 if none of these. */
int log_level_parse(const char *name, log_level *level);
bool log_access_enabled(void);

/* Starts the writer thread with a queue of `buffer_bytes`; before it,
 * lines are written directly. -1 if the thread cannot start. */
int log_start(size_t buffer_bytes);
/* Waits until the queue is written out, at most `seconds`. */
void log_flush(double seconds);
/* Lines dropped so far (queue full or sink broken); bytes queued now. */
uint64_t log_lines_dropped(void);
size_t log_queued_bytes(void);

/* Writes {"ts","level","event",...fields}. Steals `fields` (an object or
 * NULL), so calls read log_event(LOG_INFO, "x", json_pack(...)). */
void log_event(log_level level, const char *event, json_t *fields);

#endif
