/*
 * test_server_process_metrics.c - process_metrics.c against what this
 * process knows of itself: CPU time grows while it spins, a descriptor
 * opened shows, memory touched shows as resident, the start time is that
 * of this process, the limit is getrlimit's; and the exposition text
 * carries the six standard names.
 */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "process_metrics.h"
#include "test.h"

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(void) {
    process_stats a, b;
    CHECK(process_stats_read(&a) == 0, "reading /proc/self");

    /* 0.3 s of CPU: the kernel's tick is 10 ms at most */
    volatile double x = 0;
    double until = cpu_now() + 0.3;
    while (cpu_now() < until) x += 1;
    int fd = open("/dev/null", O_RDONLY);
    size_t size = 64u << 20;
    char *touched = malloc(size);
    memset(touched, 1, size);
    CHECK(process_stats_read(&b) == 0, "reading /proc/self again");

    double cpu = b.cpu_seconds - a.cpu_seconds;
    CHECK(cpu >= 0.25 && cpu <= 1.0, "CPU seconds grew by %.2f while spinning 0.3 s", cpu);
    CHECK(b.open_fds == a.open_fds + 1, "open fds %lld then %lld after one open", (long long)a.open_fds,
          (long long)b.open_fds);
    CHECK(b.resident_bytes - a.resident_bytes >= (int64_t)(60u << 20), "resident grew by %lld bytes, 64 MiB touched",
          (long long)(b.resident_bytes - a.resident_bytes));
    CHECK(b.virtual_bytes >= b.resident_bytes, "virtual %lld < resident %lld", (long long)b.virtual_bytes,
          (long long)b.resident_bytes);
    double now = (double)time(NULL);
    CHECK(b.start_time <= now + 1 && b.start_time > now - 60, "start time %.2f, now %.0f", b.start_time, now);
    struct rlimit lim;
    getrlimit(RLIMIT_NOFILE, &lim);
    CHECK(b.max_fds == (lim.rlim_cur == RLIM_INFINITY ? -1 : (int64_t)lim.rlim_cur), "max fds %lld",
          (long long)b.max_fds);

    char *text = process_metrics_render();
    CHECK(text != NULL, "render");
    static const char *const names[] = {"process_cpu_seconds_total", "process_resident_memory_bytes",
                                        "process_virtual_memory_bytes", "process_start_time_seconds",
                                        "process_open_fds", "process_max_fds"};
    for (size_t i = 0; text && i < sizeof names / sizeof names[0]; i++) {
        char line[96];
        snprintf(line, sizeof line, "\n%s ", names[i]);
        CHECK(strstr(text, line) != NULL, "no sample of %s in:\n%s", names[i], text);
    }
    free(text);
    free(touched);
    close(fd);
    printf("test_server_process_metrics: %d checks, %d failed\n", test_checks, test_failures);
    return test_failures ? 1 : 0;
}
