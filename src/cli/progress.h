/*
 * progress.h - the progress bar of `sdx4 upscale`.
 *
 * On a terminal, one line redrawn in place after every denoising step:
 *   step 12/75 [#####.........................] 3.2 it/s ETA 20s
 * The rate is measured from step 0 (the engine's call before the first
 * step), so model loading and text encoding do not distort it. When
 * stderr is not a terminal (a log file, a pipe) nothing is drawn.
 */
#ifndef SDX4_PROGRESS_H
#define SDX4_PROGRESS_H

typedef struct {
    int enabled;       /* stderr is a terminal */
    int drawn;         /* a line is on screen, to be ended by a newline */
    double step0_time; /* cli_now() at step 0 */
} progress_bar;

void progress_init(progress_bar *bar);
/* Redraws the line for `step` of `total` (0..total). */
void progress_draw(progress_bar *bar, int step, int total);
/* Ends the line, so that what follows starts on a fresh one. */
void progress_end(progress_bar *bar);

#endif
