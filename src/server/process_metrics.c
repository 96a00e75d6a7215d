/*
 * process_metrics.c - process_* metrics from /proc/self (see the header).
 *
 * The names, units and sources are those of the official Prometheus
 * clients' process collector (client_golang's, through the procfs
 * package), so that dashboards and alerts written for any exporter work
 * unchanged: CPU time and memory from /proc/self/stat, the start time from
 * its start tick plus the boot time of /proc/stat, descriptors counted in
 * /proc/self/fd, their limit from getrlimit. Debian packages no C
 * Prometheus client (libprom is not in Debian 12), and these six numbers
 * are a few lines of /proc parsing. sdx4 is Linux-only, as /proc is.
 */
#include "process_metrics.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

/* Seconds since the epoch at which the machine booted (/proc/stat's btime). */
static long long boot_time(void) {
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return -1;
    char line[256];
    long long btime = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "btime %lld", &btime) == 1) break;
    fclose(f);
    return btime;
}

static int64_t count_open_fds(void) {
    DIR *d = opendir("/proc/self/fd");
    if (!d) return -1;
    int64_t n = 0;
    int own = dirfd(d); /* the listing's own descriptor is not the process's */
    for (struct dirent *e; (e = readdir(d));)
        if (e->d_name[0] != '.' && atoi(e->d_name) != own) n++;
    closedir(d);
    return n;
}

int process_stats_read(process_stats *ps) {
    char buf[1024];
    FILE *f = fopen("/proc/self/stat", "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* field 2, the command name in parentheses, may itself hold ") ": the
     * fields counted below start after the last one */
    char *p = strrchr(buf, ')');
    unsigned long long utime, stime, start_ticks, vsize;
    long long rss;
    /* fields 3 to 13 skipped, 14 utime, 15 stime, 16 to 21 skipped, 22
     * starttime, 23 vsize, 24 rss (proc(5)) */
    if (!p || sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu %*d %*d %*d %*d %*d %*d "
                            "%llu %llu %lld", &utime, &stime, &start_ticks, &vsize, &rss) != 5)
        return -1;
    long ticks = sysconf(_SC_CLK_TCK), page = sysconf(_SC_PAGESIZE);
    long long btime = boot_time();
    if (ticks <= 0 || page <= 0 || btime < 0) return -1;
    ps->cpu_seconds = (double)(utime + stime) / (double)ticks;
    ps->resident_bytes = (int64_t)rss * page;
    ps->virtual_bytes = (int64_t)vsize;
    ps->start_time = (double)btime + (double)start_ticks / (double)ticks;
    ps->open_fds = count_open_fds();
    struct rlimit lim;
    ps->max_fds = getrlimit(RLIMIT_NOFILE, &lim) != 0 ? -1
                  : lim.rlim_cur == RLIM_INFINITY    ? -1
                                                     : (int64_t)lim.rlim_cur;
    return 0;
}

char *process_metrics_render(void) {
    process_stats ps;
    char *text = NULL;
    if (process_stats_read(&ps) != 0) return strdup("");
    if (asprintf(&text,
                 "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n"
                 "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total %.2f\n"
                 "# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
                 "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes %lld\n"
                 "# HELP process_virtual_memory_bytes Virtual memory size in bytes.\n"
                 "# TYPE process_virtual_memory_bytes gauge\nprocess_virtual_memory_bytes %lld\n"
                 "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n"
                 "# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds %.2f\n"
                 "# HELP process_open_fds Number of open file descriptors.\n"
                 "# TYPE process_open_fds gauge\nprocess_open_fds %lld\n"
                 "# HELP process_max_fds Maximum number of open file descriptors (-1: unlimited).\n"
                 "# TYPE process_max_fds gauge\nprocess_max_fds %lld\n",
                 ps.cpu_seconds, (long long)ps.resident_bytes, (long long)ps.virtual_bytes, ps.start_time,
                 (long long)ps.open_fds, (long long)ps.max_fds) < 0)
        return NULL;
    return text;
}
