/*
 * quality.c - sdx4_compare_images(): PSNR and SSIM of two RGB images, the
 * numbers scikit-image gives, so that a quality table made here can be set
 * beside one made in Python.
 *
 * PSNR is skimage.metrics.peak_signal_noise_ratio(a, b, data_range=255):
 * 10 log10(255^2 / MSE), the MSE over every value of the H x W x 3 arrays
 * (so the overall PSNR is not the mean of the channels'). Squared
 * differences of 8-bit values are integers: their sum is kept in an
 * int64_t, exact, as numpy's float64 sum of them is exact, and divided
 * once, as numpy divides; PSNR is then bit for bit skimage's. Identical
 * images have MSE 0 and PSNR +inf (numpy divides by zero into inf).
 *
 * SSIM is skimage.metrics.structural_similarity(a, b, channel_axis=2,
 * data_range=255) with its defaults: per channel, a 7 x 7 uniform window
 * (scipy's uniform_filter) gives the means ux, uy and the sample
 * (co)variances vx, vy, vxy (normalised by 49/48, use_sample_covariance);
 *
 *     S = (2 ux uy + C1)(2 vxy + C2) / ((ux^2 + uy^2 + C1)(vx + vy + C2)),
 *     C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2,
 *
 * averaged over the windows that lie wholly inside the image (skimage
 * filters the padded image, then crops 3 pixels off every side, which
 * leaves exactly those); the result is the mean of the three channels'.
 * The window sums are exact here (integers) where scipy's running float
 * sums round, so SSIM agrees with skimage to about 1e-13, not bit for bit;
 * identical images give exactly 1 in both (numerator and denominator are
 * the same float expression).
 *
 * The windows slide: seven rows' column sums are kept per channel and
 * updated one row at a time, and a running sum along each row gives every
 * window, so memory is O(width) whatever the image's height. Each row of
 * windows is averaged on its own and then the rows' means are, so that
 * the rounding of the mean grows with the sides, not with the pixel count
 * (numpy's pairwise sum does as well).
 */
#include <math.h>
#include <stdlib.h>

#include "core/error.h"
#include "sdx4.h"

enum {
    WIN = 7,         /* skimage's win_size without Gaussian weights */
    NP = WIN * WIN,  /* pixels in a window */
    NSUM = 5,        /* the window sums: x, y, xx, yy, xy */
};

static const double data_range = 255.0;
static const double K1 = 0.01, K2 = 0.03;

/* ------------------------------------------------------------------------
 * PSNR
 * ------------------------------------------------------------------------ */

/* 10 log10(R^2 / MSE), +inf when sse is 0. */
static double psnr_of(int64_t sse, int64_t n) {
    if (sse == 0) return INFINITY;
    double mse = (double)sse / (double)n;
    return 10.0 * log10(data_range * data_range / mse);
}

static void psnr(const sdx4_image *a, const sdx4_image *b, sdx4_quality *q) {
    int64_t sse[3] = {0, 0, 0};
    int64_t pixels = (int64_t)a->width * a->height;
    for (int64_t i = 0; i < pixels; i++)
        for (int c = 0; c < 3; c++) {
            int d = (int)a->pixels[3 * i + c] - (int)b->pixels[3 * i + c];
            sse[c] += d * d;
        }
    for (int c = 0; c < 3; c++) q->psnr_channel[c] = psnr_of(sse[c], pixels);
    q->psnr = psnr_of(sse[0] + sse[1] + sse[2], 3 * pixels);
}

/* ------------------------------------------------------------------------
 * SSIM
 * ------------------------------------------------------------------------ */

/* SSIM of one window from its exact sums, as skimage's lines compute it. */
static double ssim_window(const int64_t s[NSUM]) {
    const double cov_norm = (double)NP / (NP - 1); /* sample covariance */
    const double C1 = (K1 * data_range) * (K1 * data_range);
    const double C2 = (K2 * data_range) * (K2 * data_range);
    double ux = s[0] / (double)NP, uy = s[1] / (double)NP;
    double uxx = s[2] / (double)NP, uyy = s[3] / (double)NP, uxy = s[4] / (double)NP;
    double vx = cov_norm * (uxx - ux * ux);
    double vy = cov_norm * (uyy - uy * uy);
    double vxy = cov_norm * (uxy - ux * uy);
    double A1 = 2 * ux * uy + C1, A2 = 2 * vxy + C2;
    double B1 = ux * ux + uy * uy + C1, B2 = vx + vy + C2;
    return (A1 * A2) / (B1 * B2);
}

/* Adds (sign +1) or removes (-1) image row y to the column sums col of the
 * three channels: col[(c * NSUM + k) * width + x]. */
static void add_row(int64_t *col, const sdx4_image *a, const sdx4_image *b, int y, int sign) {
    int w = a->width;
    const uint8_t *pa = a->pixels + (size_t)3 * w * y, *pb = b->pixels + (size_t)3 * w * y;
    for (int x = 0; x < w; x++)
        for (int c = 0; c < 3; c++) {
            int64_t va = pa[3 * x + c], vb = pb[3 * x + c];
            int64_t *cc = col + (size_t)c * NSUM * w + x;
            cc[0] += sign * va;
            cc[w] += sign * vb;
            cc[2 * (size_t)w] += sign * va * va;
            cc[3 * (size_t)w] += sign * vb * vb;
            cc[4 * (size_t)w] += sign * va * vb;
        }
}

static int ssim(const sdx4_image *a, const sdx4_image *b, sdx4_quality *q) {
    int w = a->width, h = a->height;
    int64_t *col = calloc((size_t)3 * NSUM * w, sizeof *col);
    if (!col) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "SSIM of %dx%d images: out of memory", w, h);
        return -1;
    }
    double total[3] = {0, 0, 0}; /* sums of the rows' means */
    for (int y = 0; y < WIN - 1; y++) add_row(col, a, b, y, +1);
    for (int top = 0; top + WIN <= h; top++) {
        add_row(col, a, b, top + WIN - 1, +1);
        for (int c = 0; c < 3; c++) {
            const int64_t *cc = col + (size_t)c * NSUM * w;
            int64_t s[NSUM] = {0};
            for (int x = 0; x < WIN - 1; x++)
                for (int k = 0; k < NSUM; k++) s[k] += cc[(size_t)k * w + x];
            double row = 0;
            for (int left = 0; left + WIN <= w; left++) {
                for (int k = 0; k < NSUM; k++) s[k] += cc[(size_t)k * w + left + WIN - 1];
                row += ssim_window(s);
                for (int k = 0; k < NSUM; k++) s[k] -= cc[(size_t)k * w + left];
            }
            total[c] += row / (w - WIN + 1);
        }
        add_row(col, a, b, top, -1);
    }
    free(col);
    for (int c = 0; c < 3; c++) q->ssim_channel[c] = total[c] / (h - WIN + 1);
    /* numpy's mean of the three: summed in order, then divided */
    q->ssim = (q->ssim_channel[0] + q->ssim_channel[1] + q->ssim_channel[2]) / 3;
    return 0;
}

/* ------------------------------------------------------------------------ */

static int check_image(const sdx4_image *im, const char *which) {
    if (!im || !im->pixels || im->width < 1 || im->height < 1) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "compare: image %s is empty", which);
        return -1;
    }
    return 0;
}

sdx4_status sdx4_compare_images(const sdx4_image *a, const sdx4_image *b, sdx4_quality *q) {
    sdx4_error_clear();
    if (!q) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "compare: no result to fill");
        return SDX4_ERR_INVALID_ARGUMENT;
    }
    if (check_image(a, "a") || check_image(b, "b")) return SDX4_ERR_INVALID_ARGUMENT;
    if (a->width != b->width || a->height != b->height) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "the images differ in size: %dx%d and %dx%d", a->width,
                       a->height, b->width, b->height);
        return SDX4_ERR_INVALID_ARGUMENT;
    }
    if (a->width < WIN || a->height < WIN) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                       "%dx%d is too small: SSIM's %dx%d window needs at least %d pixels a side", a->width,
                       a->height, WIN, WIN, WIN);
        return SDX4_ERR_INVALID_ARGUMENT;
    }
    psnr(a, b, q);
    if (ssim(a, b, q)) return sdx4_error_status();
    return SDX4_OK;
}
