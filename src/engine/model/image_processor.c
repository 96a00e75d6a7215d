/*
 * image_processor.c - diffusers' VaeImageProcessor for the upscale pipeline.
 *
 * Two halves. The float half is two lines of diffusers each
 * (normalize: 2 * x - 1 on x / 255; denormalize: x * 0.5 + 0.5, clamped;
 * numpy_to_pil: (x * 255).round()), written in float32 arithmetic in the
 * same order as torch and numpy evaluate them, so the results are equal
 * to the bit, not just close.
 *
 * The other half is Pillow's bicubic resize, which diffusers applies when
 * a side is not a multiple of the VAE scale factor. Pillow's resampler
 * (libImaging/Resample.c) is a separable convolution:
 *
 *   - For each output index along an axis it centres the filter at
 *     (i + 0.5) * scale in input coordinates and, when shrinking, widens
 *     the filter by the scale (support 2 * scale instead of 2), so every
 *     input pixel contributes. The taps are evaluated in double,
 *     normalised to sum to 1, then turned into 22-bit fixed point.
 *   - 8-bit images run one pass, round and clip every value to uint8,
 *     then run the other pass on that uint8 result. Which pass goes first
 *     depends on the sizes (see sdx4_image_resize_bicubic); a pass whose side
 *     does not change is skipped.
 *
 * Every one of those steps changes output bytes, so each is reproduced as
 * Pillow 13.0 does it, down to its rounding of the tap window's bounds.
 */
#include "model/image_processor.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

/* ------------------------------------------------------------------------
 * Pillow's bicubic resampler
 * ------------------------------------------------------------------------ */

/* Pillow keeps 8 bits for the value and 2 for overshoot of the taps. */
#define PRECISION_BITS (32 - 8 - 2)
#define BICUBIC_SUPPORT 2.0

/* Keys' cubic convolution with a = -0.5, as Pillow writes it. */
static double bicubic_filter(double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

/* The taps of one axis: output index i reads `count[i]` input pixels
 * starting at `first[i]`, weighted by weights[i * ksize + 0 ..]. */
typedef struct {
    int ksize;
    int *first, *count;  /* (out_size) */
    int32_t *weights;    /* (out_size, ksize), 22-bit fixed point */
} resample_axis;

static void axis_free(resample_axis *ax) {
    free(ax->first);
    free(ax->count);
    free(ax->weights);
}

/* Pillow's precompute_coeffs() followed by normalize_coeffs_8bpc(). */
static int axis_init(resample_axis *ax, int in_size, int out_size) {
    double scale = (double)in_size / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = BICUBIC_SUPPORT * filterscale;
    int ksize = (int)ceil(support) * 2 + 1;

    memset(ax, 0, sizeof *ax);
    ax->ksize = ksize;
    ax->first = malloc((size_t)out_size * sizeof *ax->first);
    ax->count = malloc((size_t)out_size * sizeof *ax->count);
    ax->weights = calloc((size_t)out_size * (size_t)ksize, sizeof *ax->weights);
    double *taps = malloc((size_t)ksize * sizeof *taps);
    if (!ax->first || !ax->count || !ax->weights || !taps) {
        free(taps);
        axis_free(ax);
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "resize: out of memory for %d taps", ksize);
        return -1;
    }
    for (int i = 0; i < out_size; i++) {
        double center = (i + 0.5) * scale;
        double ss = 1.0 / filterscale;
        /* Pillow rounds the window's ends by truncating x + 0.5. */
        int lo = (int)(center - support + 0.5);
        int hi = (int)(center + support + 0.5);
        if (lo < 0) lo = 0;
        if (hi > in_size) hi = in_size;
        int n = hi - lo;
        double sum = 0.0;
        for (int k = 0; k < n; k++) {
            taps[k] = bicubic_filter((k + lo - center + 0.5) * ss);
            sum += taps[k];
        }
        int32_t *w = ax->weights + (size_t)i * ksize;
        for (int k = 0; k < n; k++) {
            double t = sum != 0.0 ? taps[k] / sum : taps[k];
            double fixed = t * (1 << PRECISION_BITS);
            w[k] = (int32_t)(t < 0 ? fixed - 0.5 : fixed + 0.5);
        }
        ax->first[i] = lo;
        ax->count[i] = n;
    }
    free(taps);
    return 0;
}

/* Fixed point sum (with its rounding half already added) -> uint8;
 * Pillow's clip8(): values below 0 and above 255 saturate. */
static inline uint8_t clip8(int32_t ss) {
    if (ss < 0) return 0;
    int32_t v = ss >> PRECISION_BITS;
    return (uint8_t)(v > 255 ? 255 : v);
}

/* One pass along x: src (h, src_w, 3) -> dst (h, ax->out, 3). */
static void resample_horizontal(const uint8_t *src, int src_w, int h,
                                uint8_t *dst, int dst_w,
                                const resample_axis *ax) {
    for (int y = 0; y < h; y++) {
        const uint8_t *row = src + (size_t)y * src_w * 3;
        uint8_t *out = dst + (size_t)y * dst_w * 3;
        for (int x = 0; x < dst_w; x++) {
            const int32_t *w = ax->weights + (size_t)x * ax->ksize;
            const uint8_t *p = row + (size_t)ax->first[x] * 3;
            int32_t s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
            for (int k = 0; k < ax->count[x]; k++) {
                s0 += p[3 * k + 0] * w[k];
                s1 += p[3 * k + 1] * w[k];
                s2 += p[3 * k + 2] * w[k];
            }
            out[3 * x + 0] = clip8(s0);
            out[3 * x + 1] = clip8(s1);
            out[3 * x + 2] = clip8(s2);
        }
    }
}

/* One pass along y: src (src_h, w, 3) -> dst (dst_h, w, 3). */
static void resample_vertical(const uint8_t *src, int w, uint8_t *dst,
                              int dst_h, const resample_axis *ax) {
    size_t stride = (size_t)w * 3;
    for (int y = 0; y < dst_h; y++) {
        const int32_t *wt = ax->weights + (size_t)y * ax->ksize;
        const uint8_t *col = src + (size_t)ax->first[y] * stride;
        uint8_t *out = dst + (size_t)y * stride;
        for (size_t i = 0; i < stride; i++) {
            int32_t s = 1 << (PRECISION_BITS - 1);
            for (int k = 0; k < ax->count[y]; k++)
                s += col[(size_t)k * stride + i] * wt[k];
            out[i] = clip8(s);
        }
    }
}

static int check_image(const sdx4_image *img, const char *what) {
    if (!img || !img->pixels || img->width <= 0 || img->height <= 0) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "%s: empty image", what);
        return -1;
    }
    return 0;
}

int sdx4_image_resize_bicubic(const sdx4_image *in, int width, int height,
                         sdx4_image *out) {
    if (check_image(in, "resize")) return -1;
    if (width <= 0 || height <= 0) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "resize: bad size %dx%d", width, height);
        return -1;
    }
    uint8_t *pixels = malloc((size_t)width * (size_t)height * 3);
    if (!pixels) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "resize: out of memory for %dx%d", width, height);
        return -1;
    }
    /* Pillow 13 runs the vertical pass first when the height loses more
     * than twice as many pixels as the width (Pillow 12 and older: always
     * horizontal first). The order shows in the bytes, through the uint8
     * rounding between the passes. A pass whose side is unchanged is
     * skipped. */
    int lose_h = in->height - height, lose_w = in->width - width;
    int vertical_first = lose_h > 0 && lose_h > 2 * lose_w;
    char passes[2];
    int npasses = 0;
    if (vertical_first && height != in->height) passes[npasses++] = 'v';
    if (width != in->width) passes[npasses++] = 'h';
    if (!vertical_first && height != in->height) passes[npasses++] = 'v';

    const uint8_t *src = in->pixels;
    int src_w = in->width, src_h = in->height;
    uint8_t *tmp = NULL;
    for (int i = 0; i < npasses; i++) {
        int vertical = passes[i] == 'v';
        int dst_w = vertical ? src_w : width, dst_h = vertical ? height : src_h;
        uint8_t *dst = i == npasses - 1 ? pixels : (tmp = malloc((size_t)dst_w * dst_h * 3));
        resample_axis ax;
        if (!dst || axis_init(&ax, vertical ? src_h : src_w, vertical ? height : width)) {
            if (!dst) sdx4_set_error(SDX4_ERR_NO_MEMORY, "resize: out of memory");
            free(tmp);
            free(pixels);
            return -1;
        }
        if (vertical) resample_vertical(src, src_w, dst, dst_h, &ax);
        else resample_horizontal(src, src_w, src_h, dst, dst_w, &ax);
        axis_free(&ax);
        src = dst;
        src_w = dst_w;
        src_h = dst_h;
    }
    if (npasses == 0) memcpy(pixels, in->pixels, (size_t)width * height * 3);
    free(tmp);
    out->width = width;
    out->height = height;
    out->pixels = pixels;
    return 0;
}

/* ------------------------------------------------------------------------
 * Model space
 * ------------------------------------------------------------------------ */

int sdx4_image_preprocess(const sdx4_image *in, int scale_factor, float **out,
                     int *h, int *w) {
    if (check_image(in, "preprocess")) return -1;
    if (scale_factor <= 0) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "preprocess: scale factor %d", scale_factor);
        return -1;
    }
    /* get_default_height_width(): x - x % vae_scale_factor */
    int ow = in->width - in->width % scale_factor;
    int oh = in->height - in->height % scale_factor;
    if (ow < scale_factor || oh < scale_factor) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT,
                  "image %dx%d is smaller than the model's %d pixels a side",
                  in->width, in->height, scale_factor);
        return -1;
    }
    sdx4_image resized = *in;
    if (ow != in->width || oh != in->height) {
        if (sdx4_image_resize_bicubic(in, ow, oh, &resized)) return -1;
    }
    size_t plane = (size_t)ow * (size_t)oh;
    float *chw = malloc(3 * plane * sizeof *chw);
    if (!chw) {
        if (resized.pixels != in->pixels) free(resized.pixels);
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "preprocess: out of memory for %dx%d", ow, oh);
        return -1;
    }
    /* pil_to_numpy: astype(float32) / 255.0; normalize: 2.0 * x - 1.0 */
    for (size_t i = 0; i < plane; i++)
        for (int c = 0; c < 3; c++) {
            float unit = (float)resized.pixels[3 * i + c] / 255.0f;
            chw[c * plane + i] = 2.0f * unit - 1.0f;
        }
    if (resized.pixels != in->pixels) free(resized.pixels);
    *out = chw;
    *h = oh;
    *w = ow;
    return 0;
}

/* denormalize: (x * 0.5 + 0.5).clamp(0, 1), NaN kept as torch keeps it. */
static inline float denormalize(float x) {
    float y = x * 0.5f + 0.5f;
    return y < 0.0f ? 0.0f : y > 1.0f ? 1.0f : y;
}

/* numpy_to_pil: (x * 255).round().astype(uint8). rintf rounds half to
 * even under the default rounding mode, as numpy's round does. */
static inline uint8_t unit_to_u8(float x) {
    if (!(x > 0.0f)) return 0; /* also NaN, which numpy leaves undefined */
    float v = rintf(x * 255.0f);
    return v >= 255.0f ? 255 : (uint8_t)v;
}

void sdx4_image_denormalize(const float *chw, size_t n, float *out) {
    for (size_t i = 0; i < n; i++) out[i] = denormalize(chw[i]);
}

void sdx4_image_quantize(const float *chw, int h, int w, uint8_t *rgb) {
    size_t plane = (size_t)h * (size_t)w;
    for (size_t i = 0; i < plane; i++)
        for (int c = 0; c < 3; c++) rgb[3 * i + c] = unit_to_u8(chw[c * plane + i]);
}

int sdx4_image_postprocess(const float *chw, int h, int w, sdx4_image *out) {
    if (!chw || h <= 0 || w <= 0) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "postprocess: bad size %dx%d", w, h);
        return -1;
    }
    size_t plane = (size_t)h * (size_t)w;
    uint8_t *rgb = malloc(3 * plane);
    if (!rgb) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "postprocess: out of memory for %dx%d", w, h);
        return -1;
    }
    for (size_t i = 0; i < plane; i++)
        for (int c = 0; c < 3; c++)
            rgb[3 * i + c] = unit_to_u8(denormalize(chw[c * plane + i]));
    out->width = w;
    out->height = h;
    out->pixels = rgb;
    return 0;
}
