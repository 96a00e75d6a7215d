/*
 * progress.c - the progress bar of `sdx4 upscale` (see progress.h).
 *
 * The line is redrawn with a carriage return and ended with "erase to end
 * of line" (ESC [ K), so a shorter line never leaves the tail of a longer
 * one behind. Each redraw is one fputs() of a line built in a buffer, so
 * the terminal never shows half a line.
 */
#include <stdio.h>
#include <unistd.h>

#include "cli.h"
#include "progress.h"

enum { BAR_WIDTH = 30 };

void progress_init(progress_bar *bar) {
    bar->enabled = isatty(STDERR_FILENO);
    bar->drawn = 0;
    bar->step0_time = cli_now();
}

/* "42s", "3m05s", "1h02m": short enough for a status line. */
static void format_duration(char *buf, size_t size, double seconds) {
    long s = (long)(seconds + 0.5);
    if (s < 60)
        snprintf(buf, size, "%lds", s);
    else if (s < 3600)
        snprintf(buf, size, "%ldm%02lds", s / 60, s % 60);
    else
        snprintf(buf, size, "%ldh%02ldm", s / 3600, s % 3600 / 60);
}

void progress_draw(progress_bar *bar, int step, int total) {
    if (step == 0) bar->step0_time = cli_now();
    if (!bar->enabled || total <= 0) return;

    char line[160], cells[BAR_WIDTH + 1];
    int filled = (int)((long long)BAR_WIDTH * step / total);
    for (int i = 0; i < BAR_WIDTH; i++) cells[i] = i < filled ? '#' : '.';
    cells[BAR_WIDTH] = '\0';
    int len = snprintf(line, sizeof line, "\rstep %d/%d [%s]", step, total,
                       cells);

    double elapsed = cli_now() - bar->step0_time;
    if (step > 0 && elapsed > 0 && len < (int)sizeof line) {
        double rate = step / elapsed;
        char eta[32];
        format_duration(eta, sizeof eta, (total - step) / rate);
        /* Slow steps (the full-size model on a CPU) read better as s/it. */
        if (rate >= 1)
            snprintf(line + len, sizeof line - len, " %.1f it/s ETA %s",
                     rate, eta);
        else
            snprintf(line + len, sizeof line - len, " %.1f s/it ETA %s",
                     1 / rate, eta);
    }
    fputs(line, stderr);
    fputs("\033[K", stderr);
    fflush(stderr);
    bar->drawn = 1;
}

void progress_end(progress_bar *bar) {
    if (bar->drawn) fputc('\n', stderr);
    bar->drawn = 0;
}
