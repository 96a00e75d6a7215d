/* clock.h - seconds on a clock, for the timings the engine reports. */
#ifndef SDX4_CLOCK_H
#define SDX4_CLOCK_H

#include <time.h>

static inline double clock_seconds(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Monotonic seconds: what an interval is measured on. */
static inline double mono_seconds(void) { return clock_seconds(CLOCK_MONOTONIC); }

#endif
