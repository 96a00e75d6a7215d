/*
 * safety_check.c - what the content check (sdx4_safety_check) costs: the
 * wall and process CPU time of each of N checks of one image, after one
 * untimed check, on the device and threads given.
 *
 *   build/safety_check CHECKER_DIR IMAGE [N [THREADS [DEVICE]]]
 *
 * docs/production/content-check.md has the figures and how the full-size
 * random-weight checker they were measured with was made.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "imageio.h"
#include "sdx4.h"

static double seconds(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s CHECKER_DIR IMAGE [N [THREADS [DEVICE]]]\n", argv[0]);
        return 2;
    }
    int n = argc > 3 ? atoi(argv[3]) : 5, threads = argc > 4 ? atoi(argv[4]) : 0;
    char err[256];
    sdx4_image img = {0};
    if (imageio_init(argv[0]) || imageio_read_file(argv[2], &img, err, sizeof err)) {
        fprintf(stderr, "%s: %s\n", argv[2], err);
        return 1;
    }
    sdx4_engine_options o;
    sdx4_engine_options_default(&o);
    o.model_dir = argv[1];
    o.threads = threads;
    if (argc > 5) o.device = argv[5];
    sdx4_safety *s = NULL;
    double t0 = seconds(CLOCK_MONOTONIC);
    if (sdx4_safety_open(&o, &s) != SDX4_OK) {
        fprintf(stderr, "%s\n", sdx4_last_error());
        return 1;
    }
    printf("opened in %.2f s\n", seconds(CLOCK_MONOTONIC) - t0);
    sdx4_safety_result r;
    int rc = 0;
    for (int i = 0; i <= n && !rc; i++) {
        double w = seconds(CLOCK_MONOTONIC), c = seconds(CLOCK_PROCESS_CPUTIME_ID);
        if (sdx4_safety_check(s, &img, &r) != SDX4_OK) {
            fprintf(stderr, "%s\n", sdx4_last_error());
            rc = 1;
        } else if (i > 0) {
            printf("check %d: wall %.3f s, cpu %.3f s, flagged %d\n", i, seconds(CLOCK_MONOTONIC) - w,
                   seconds(CLOCK_PROCESS_CPUTIME_ID) - c, r.flagged);
        }
    }
    printf("peak RSS %.0f MiB\n", (double)sdx4_peak_rss_bytes() / (1 << 20));
    sdx4_safety_close(s);
    sdx4_image_free(&img);
    imageio_shutdown();
    return rc;
}
