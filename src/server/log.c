/*
 * log.c - structured JSON logs (see log.h).
 *
 * Request threads never write to the sink. A line is built in memory and
 * copied into a ring of --log-buffer bytes under a lock held for one
 * memcpy; a writer thread of its own takes what is queued and writes it to
 * fd 2. A reader of stderr that stalls (a full pipe, a stopped log
 * shipper) then blocks only that thread: the ring fills, and the lines
 * that do not fit are dropped and counted (sdx4_log_lines_dropped_total)
 * instead of making a request wait. The first line queued after a drop is
 * preceded by a "log_lines_dropped" line saying how many went missing, so
 * the gap is marked where it happened and shows as soon as the sink moves
 * again.
 *
 * The ring holds bytes, not line slots, so its bound is the memory it
 * costs whatever the lines' lengths. Producers append at `tail`; the writer
 * owns [head, tail) and writes from it without the lock, since producers
 * only ever fill [tail, head + size), and moves `head` once a write is
 * done.
 *
 * Before log_start, and in commands that never call it, lines are written
 * directly: startup errors must appear even when the server never gets far
 * enough to start a thread. log_flush waits, bounded, for the ring to
 * drain at exit; a writer still stuck in write(2) then is left to the
 * process's exit.
 */
#include "log.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static atomic_int min_level = LOG_INFO;
static atomic_bool access_enabled = true;
static _Atomic uint64_t dropped_total;
static atomic_bool started; /* the writer runs: lines go through the ring */

static const char *const level_names[] = {"debug", "info", "warn", "error"};

static struct {
    pthread_mutex_t lock;
    pthread_cond_t queued;  /* the ring was empty and is not: for the writer */
    pthread_cond_t drained; /* the ring emptied: for log_flush */
    char *ring;
    size_t size;
    size_t head, tail; /* bytes written out and queued since the start */
    uint64_t gap;      /* lines dropped since the last notice */
} q = {.lock = PTHREAD_MUTEX_INITIALIZER, .queued = PTHREAD_COND_INITIALIZER, .drained = PTHREAD_COND_INITIALIZER};

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

uint64_t log_lines_dropped(void) { return atomic_load(&dropped_total); }

size_t log_queued_bytes(void) {
    pthread_mutex_lock(&q.lock);
    size_t n = q.tail - q.head;
    pthread_mutex_unlock(&q.lock);
    return n;
}

/* ---- the sink --------------------------------------------------------------- */

/* Writes all of `data` to fd 2; false when the sink is broken (closed,
 * full disk), not merely slow. */
static bool write_all(const char *data, size_t len) {
    while (len) {
        ssize_t w = write(2, data, len);
        if (w > 0) {
            data += w;
            len -= (size_t)w;
        } else if (w < 0 && errno == EAGAIN) { /* someone made stderr non-blocking */
            struct pollfd p = {.fd = 2, .events = POLLOUT};
            poll(&p, 1, -1);
        } else if (!(w < 0 && errno == EINTR)) {
            return false;
        }
    }
    return true;
}

static uint64_t count_lines(const char *data, size_t len) {
    uint64_t n = 0;
    for (const char *p = data; (p = memchr(p, '\n', len - (size_t)(p - data))); p++) n++;
    return n;
}

static void *writer_main(void *arg) {
    (void)arg;
    pthread_mutex_lock(&q.lock);
    for (;;) {
        while (q.head == q.tail) pthread_cond_wait(&q.queued, &q.lock);
        size_t at = q.head % q.size, n = q.tail - q.head;
        if (n > q.size - at) n = q.size - at; /* up to the ring's end; the rest next turn */
        pthread_mutex_unlock(&q.lock);
        bool ok = write_all(q.ring + at, n);
        pthread_mutex_lock(&q.lock);
        if (!ok) { /* lost, like lines that found the ring full */
            uint64_t lost = count_lines(q.ring + at, n);
            q.gap += lost;
            atomic_fetch_add(&dropped_total, lost);
        }
        q.head += n;
        if (q.head == q.tail) pthread_cond_broadcast(&q.drained);
    }
    return NULL;
}

int log_start(size_t buffer_bytes) {
    if (atomic_load(&started)) return 0;
    if (!(q.ring = malloc(buffer_bytes))) return -1;
    q.size = buffer_bytes;
    /* the writer takes no signals: serve.c waits for them in its main thread */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pthread_t writer;
    int rc = pthread_create(&writer, NULL, writer_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        free(q.ring);
        q.ring = NULL;
        return -1;
    }
    pthread_detach(writer); /* it lives as long as the process */
    atomic_store(&started, true);
    return 0;
}

/* ---- lines ------------------------------------------------------------------ */

/* "2026-01-02T03:04:05.678Z" */
static void timestamp(char *out, size_t size) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    size_t n = strftime(out, size, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + n, size - n, ".%03ldZ", ts.tv_nsec / 1000000);
}

/* Lock held. Appends `len` bytes if they fit; false (nothing written) if not. */
static bool ring_put(const char *data, size_t len) {
    if (len > q.size - (q.tail - q.head)) return false;
    size_t at = q.tail % q.size, first = len < q.size - at ? len : q.size - at;
    memcpy(q.ring + at, data, first);
    memcpy(q.ring, data + first, len - first);
    q.tail += len;
    return true;
}

/* Lock held. The line that marks a gap; its length. */
static size_t gap_notice(char *out, size_t size, const char *stamp) {
    int n = snprintf(out, size,
                     "{\"ts\":\"%s\",\"level\":\"warn\",\"event\":\"log_lines_dropped\",\"lines\":%llu,"
                     "\"message\":\"the log sink was too slow; lines were dropped\"}\n",
                     stamp, (unsigned long long)q.gap);
    return n > 0 && (size_t)n < size ? (size_t)n : 0;
}

/* Queues `line` (newline included) behind the notice of a gap, if any:
 * both or neither, so the notice always sits where the lines went
 * missing. Never waits for the sink. */
static void enqueue(const char *line, size_t len, const char *stamp) {
    char notice[256];
    pthread_mutex_lock(&q.lock);
    bool was_empty = q.head == q.tail;
    size_t notice_len = q.gap ? gap_notice(notice, sizeof notice, stamp) : 0;
    if (notice_len + len <= q.size - (q.tail - q.head)) {
        if (notice_len) ring_put(notice, notice_len);
        ring_put(line, len);
        q.gap = 0;
        if (was_empty) pthread_cond_signal(&q.queued);
    } else {
        q.gap++;
        atomic_fetch_add(&dropped_total, 1);
    }
    pthread_mutex_unlock(&q.lock);
}

void log_event(log_level level, const char *event, json_t *fields) {
    if (!log_enabled(level)) {
        json_decref(fields);
        return;
    }
    char stamp[40];
    timestamp(stamp, sizeof stamp);
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
    if (atomic_load(&started)) enqueue(text, len + 1, stamp);
    else write_all(text, len + 1);
    free(text);
}

void log_flush(double seconds) {
    char stamp[40], notice[256];
    timestamp(stamp, sizeof stamp);
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    double end = (double)until.tv_sec + until.tv_nsec * 1e-9 + seconds;
    until.tv_sec = (time_t)end;
    until.tv_nsec = (long)((end - (double)until.tv_sec) * 1e9);
    if (!atomic_load(&started)) return;
    pthread_mutex_lock(&q.lock);
    if (q.gap) { /* a gap with no line after it: say so now */
        size_t n = gap_notice(notice, sizeof notice, stamp);
        bool was_empty = q.head == q.tail;
        if (n && ring_put(notice, n)) {
            q.gap = 0;
            if (was_empty) pthread_cond_signal(&q.queued);
        }
    }
    while (q.head != q.tail)
        if (pthread_cond_timedwait(&q.drained, &q.lock, &until) == ETIMEDOUT) break;
    pthread_mutex_unlock(&q.lock);
}
