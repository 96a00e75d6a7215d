/*
 * cpu_math.h - four-lane float vectors, and exp and erf on them, for the
 * CPU kernels' elementwise loops.
 *
 * libm's expf and erff are calls, so a loop over them runs one element at a
 * time (erff costs ~15 ns, more than the matrix product that feeds a GEGLU),
 * and at -O2 GCC vectorises few loops by itself. The kernels therefore work
 * on v4f, GCC/Clang vector extensions that compile to SSE on baseline
 * x86-64 (and NEON on ARM), with no intrinsics and no dependence on the
 * optimiser's cost model. (Four lanes, not eight: without AVX, wider
 * vectors are passed through memory between functions.)
 *
 * cpu_exp4 is Cephes' expf polynomial (within 2 ulp); cpu_erf4 is
 * Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), the formula
 * PyTorch's vectorised CPU erf uses, so F.gelu comes out as in PyTorch.
 */
#ifndef SDX4_CPU_MATH_H
#define SDX4_CPU_MATH_H

#include <stdint.h>
#include <string.h>

typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

static inline v4f v4_splat(float f) { return (v4f){f, f, f, f}; }

/* The first n (>= 1, at most 4 used) floats at p; missing lanes are `fill`.
 * Whole vectors take one unaligned load; only a row's tail goes lane by lane. */
static inline v4f v4_load_fill(const float *p, int64_t n, float fill) {
    v4f v;
    if (n >= 4) {
        memcpy(&v, p, sizeof v);
        return v;
    }
    v = v4_splat(fill);
    for (int64_t i = 0; i < n; i++) v[i] = p[i];
    return v;
}

static inline v4f v4_load(const float *p, int64_t n) { return v4_load_fill(p, n, 0.0f); }

static inline void v4_store(float *p, v4f v, int64_t n) {
    if (n >= 4) {
        memcpy(p, &v, sizeof v);
        return;
    }
    for (int64_t i = 0; i < n; i++) p[i] = v[i];
}

/* mask ? a : b, lane by lane (mask lanes are all ones or zero) */
static inline v4f v4_select(v4i mask, v4f a, v4f b) {
    return (v4f)((mask & (v4i)a) | (~mask & (v4i)b));
}

static inline v4f v4_maxv(v4f a, v4f b) { return v4_select(a > b, a, b); }

static inline float v4_sum(v4f v) { return (v[0] + v[1]) + (v[2] + v[3]); }

static inline float v4_max(v4f v) {
    float m = v[0];
    for (int i = 1; i < 4; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* e^x. Arguments are clamped to [-87, 88] (e^-87 ~ 1.6e-38 stands in for
 * anything smaller, NaN included; e^88 ~ 1.7e38 for anything larger), which
 * keeps 2^n a normal float and the conversion to int defined. */
static inline v4f cpu_exp4(v4f x) {
    x = v4_select(x > v4_splat(-87.0f), x, v4_splat(-87.0f));
    x = v4_select(x < v4_splat(88.0f), x, v4_splat(88.0f));
    /* x = n ln2 + r with n = round(x / ln2): adding and removing 1.5 * 2^23
     * rounds to an integer, and ln2 is split so n * ln2 is exact */
    v4f n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    v4f r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    v4f p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    v4i two_n = (__builtin_convertvector(n, v4i) + 127) << 23;
    return p * (v4f)two_n;
}

/* erf(x) = 1 - (a1 t + ... + a5 t^5) e^(-x^2), t = 1 / (1 + p |x|), odd. */
static inline v4f cpu_erf4(v4f x) {
    const v4i sign = (v4i)v4_splat(-0.0f); /* the sign bit alone */
    v4f a = (v4f)((v4i)x & ~sign);
    v4f t = 1.0f / (a * 0.3275911f + 1.0f);
    v4f poly = t * 1.061405429f - 1.453152027f;
    poly = poly * t + 1.421413741f;
    poly = poly * t - 0.284496736f;
    poly = poly * t + 0.254829592f;
    v4f y = 1.0f - poly * t * cpu_exp4(-(a * a));
    return (v4f)((v4i)y | ((v4i)x & sign));
}

#endif
