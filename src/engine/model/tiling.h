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

/* The weight of window k at (y, x) of the window. */
static inline float sdx4_tiling_weight(const tiling *t, int k, int y, int x) {
    return t->wy[(k / t->nx) * t->th + y] * t->wx[(k % t->nx) * t->tw + x];
}

#endif
