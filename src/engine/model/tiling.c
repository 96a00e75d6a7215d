/*
 * tiling.c - the windows of a tiled UNet and their weights (tiling.h).
 *
 * Along an axis of length L, windows of T < L overlapping by at least O
 * need n = ceil((L - O) / (T - O)) origins; they are floor(i (L - T) /
 * (n - 1)), so the first starts at 0, the last ends at L and neighbours
 * overlap by O or a little more. The weights are separable: a window's
 * weight at (y, x) is its row weight times its column weight.
 */
#include "model/tiling.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "sdx4.h"

/* Windows of `tile` along an axis of `length`. */
static int axis_count(int length, int tile, int overlap) {
    int size = tile < length ? tile : length;
    return size == length ? 1 : (length - overlap + (size - overlap) - 1) / (size - overlap);
}

/* Origins and 1-D weights of the windows along one axis; their count. */
static int plan_axis(int length, int tile, int overlap, int **origins, float **weights) {
    int size = tile < length ? tile : length, n = axis_count(length, tile, overlap);
    *origins = malloc(sizeof **origins * (size_t)n);
    *weights = malloc(sizeof **weights * (size_t)n * (size_t)size);
    if (!*origins || !*weights) return -1;
    for (int i = 0; i < n; i++) {
        int o = n == 1 ? 0 : (int)((int64_t)i * (length - size) / (n - 1));
        (*origins)[i] = o;
        for (int k = 0; k < size; k++) {
            float w = 1.0f; /* the ramps toward edges shared with a neighbour */
            if (overlap > 0 && o > 0 && k < overlap) w = (k + 0.5f) / overlap;
            if (overlap > 0 && o + size < length && size - 1 - k < overlap) {
                float r = (size - 1 - k + 0.5f) / overlap;
                if (r < w) w = r;
            }
            (*weights)[(size_t)i * size + k] = w;
        }
    }
    return n;
}

int sdx4_tiling_plan(tiling *t, int height, int width, int tile, int overlap) {
    memset(t, 0, sizeof *t);
    if (tile < 1 || overlap < 0 || overlap >= tile || height < 1 || width < 1) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "tile %d with tile_overlap %d: the overlap must be 0 or more "
                       "and less than the tile", tile, overlap);
        return -1;
    }
    t->height = height, t->width = width;
    t->th = tile < height ? tile : height;
    t->tw = tile < width ? tile : width;
    t->ny = plan_axis(height, tile, overlap, &t->ys, &t->wy);
    t->nx = plan_axis(width, tile, overlap, &t->xs, &t->wx);
    t->sum = calloc((size_t)height * width, sizeof *t->sum);
    if (t->ny < 0 || t->nx < 0 || !t->sum) {
        sdx4_tiling_free(t);
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "out of memory");
        return -1;
    }
    t->count = t->ny * t->nx;
    for (int k = 0; k < t->count; k++)
        for (int y = 0; y < t->th; y++)
            for (int x = 0; x < t->tw; x++)
                t->sum[(size_t)(t->ys[k / t->nx] + y) * width + t->xs[k % t->nx] + x] +=
                    sdx4_tiling_weight(t, k, y, x);
    return 0;
}

void sdx4_tiling_free(tiling *t) {
    free(t->ys), free(t->xs), free(t->wy), free(t->wx), free(t->sum);
    memset(t, 0, sizeof *t);
}

int sdx4_tiling_windows_per_call(int count) {
    int calls = (count + SDX4_WINDOWS_PER_CALL - 1) / SDX4_WINDOWS_PER_CALL;
    return (count + calls - 1) / calls;
}

/* The bytes of one UNet call over windows of `tile`. */
static int64_t call_bytes(int height, int width, int tile, int overlap, int batch, int64_t bytes_per_pixel) {
    int th = tile < height ? tile : height, tw = tile < width ? tile : width;
    int group = sdx4_tiling_windows_per_call(axis_count(height, tile, overlap) * axis_count(width, tile, overlap));
    return (int64_t)group * batch * th * tw * bytes_per_pixel;
}

int sdx4_tiling_auto(int height, int width, int overlap, int batch, int64_t bytes_per_pixel, int64_t budget) {
    int64_t whole = (int64_t)batch * height * width * bytes_per_pixel;
    if (whole <= budget) return 0;
    int side = height > width ? height : width, least = SDX4_MIN_TILE > overlap + 1 ? SDX4_MIN_TILE : overlap + 1;
    least = (least + 7) / 8 * 8;
    for (int tile = (side - 1) / 8 * 8; tile > least; tile -= 8)
        if (call_bytes(height, width, tile, overlap, batch, bytes_per_pixel) <= budget) return tile;
    /* nothing fits: whichever holds less */
    return least < side && call_bytes(height, width, least, overlap, batch, bytes_per_pixel) < whole ? least : 0;
}
