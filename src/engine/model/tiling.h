/*
 * tiling.h - where the windows of a tiled UNet lie on the latent, and how
 * their noise predictions are blended (MultiDiffusion: at every step each
 * window is denoised on its own, and the predictions are averaged where
 * windows overlap, so that every step sees one consistent image).
 *
 * All windows have one size, min(tile, side) per axis, so that they run
 * through the UNet as one batch of one shape. Along an axis they are
 * spread evenly from edge to edge, as few as leave neighbours overlapping
 * by at least `overlap`. A window's weight is 1 in its middle and falls
 * off linearly over `overlap` pixels toward an edge it shares with
 * another window (never toward the image's border), staying above 0, so
 * that a seam is a gradual hand-over rather than a cut.
 */
#ifndef SDX4_TILING_H
#define SDX4_TILING_H

#include <stdint.h>

typedef struct {
    int height, width;    /* the latent's */
    int th, tw;           /* one window's */
    int ny, nx, count;    /* windows down, across, in all (row-major) */
    int *ys, *xs;         /* (ny), (nx): the windows' origins */
    float *wy, *wx;       /* (ny * th), (nx * tw): each row's and column's weights */
    float *sum;           /* (height * width): the weights' sum at each pixel */
} tiling;

/* Lays out windows of tile x tile (clamped to the latent) overlapping by
 * at least `overlap` on a height x width latent. tile >= 1 and
 * 0 <= overlap < tile, else SDX4_ERR_INVALID_ARGUMENT. */
int sdx4_tiling_plan(tiling *t, int height, int width, int tile, int overlap);
void sdx4_tiling_free(tiling *t);

/* At most this many windows share one UNet call: the call's memory is
 * what bounds a tiled upscale's, whatever the image's size. */
#define SDX4_WINDOWS_PER_CALL 4

/* Windows per UNet call for `count` windows: the calls balanced (the last
 * one is filled up with copies of its last window: one shape for the
 * backend's recorded step). */
int sdx4_tiling_windows_per_call(int count);

/* The tile of sdx4_upscale_params.tile 0 (automatic) on a height x width
 * latent, for a UNet that holds bytes_per_pixel per pixel of each of its
 * `batch` items: 0 (the whole latent, diffusers' own result) when that
 * fits in `budget` bytes, else the largest window side, a multiple of 8
 * (the x4 UNet's three halvings stay whole) from SDX4_MIN_TILE and above
 * the overlap, whose UNet call (windows per call x batch) fits. When none
 * fits: the smallest such side, or 0 when the whole latent holds less. */
int sdx4_tiling_auto(int height, int width, int overlap, int batch, int64_t bytes_per_pixel, int64_t budget);

/* The weight of window k at (y, x) of the window. */
static inline float sdx4_tiling_weight(const tiling *t, int k, int y, int x) {
    return t->wy[(k / t->nx) * t->th + y] * t->wx[(k % t->nx) * t->tw + x];
}

#endif
