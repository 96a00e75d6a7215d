/*
 * process_metrics.h - the process's CPU time, memory and file descriptors
 * under the standard Prometheus names (process_*), read from /proc/self.
 *
 * Thread-safe: every call reads /proc afresh and keeps no state.
 */
#ifndef SDX4_SERVER_PROCESS_METRICS_H
#define SDX4_SERVER_PROCESS_METRICS_H

#include <stdint.h>

typedef struct {
    double cpu_seconds;       /* user + system time of all threads */
    int64_t resident_bytes;   /* resident set size */
    int64_t virtual_bytes;    /* virtual memory size */
    double start_time;        /* seconds since the epoch */
    int64_t open_fds;         /* file descriptors open now */
    int64_t max_fds;          /* RLIMIT_NOFILE's soft limit (-1: unlimited) */
} process_stats;

/* Fills `ps`; -1 when /proc/self/stat cannot be read or parsed (then
 * nothing is rendered rather than zeros that would look like values). */
int process_stats_read(process_stats *ps);

/* The exposition text of process_stats_read (malloc'd; "" when it
 * failed, NULL only when out of memory). */
char *process_metrics_render(void);

#endif
