/*
 * test_float_round.c - core/float_round.h: float32 rounded to bfloat16's
 * and FP8 E4M3's values, with which the CPU backend's emulating paths
 * (cpu_onednn.c) measure those formats' error on the goldens.
 *
 * E4M3 is held two ways: values at its edges worked out by hand (in the
 * comments), and every value of a large set against a brute-force
 * reference that decodes all 256 E4M3 codes and picks the nearest finite
 * one, ties to the even code, which is what round-to-nearest-even with
 * saturation means. bfloat16 gets a few hand values (test_backend_onednn
 * holds it against an independent rounding on whole operations).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "core/float_round.h"
#include "test.h"

/* The value of E4M3FN code c (NaN for 0x7f and 0xff): sign, exponent
 * field E of bias 7, mantissa M; E = 0 is subnormal, M * 2^-9. */
static double e4m3_decode(int c) {
    int sign = c >> 7, e = (c >> 3) & 15, m = c & 7;
    if (e == 15 && m == 7) return NAN;
    double v = e ? ldexp(1.0 + m / 8.0, e - 7) : ldexp(m, -9);
    return sign ? -v : v;
}

/* The nearest finite E4M3 value to x, ties to the even code, among the
 * codes of x's sign (so that -tiny gives -0, as a conversion does).
 * Nothing is past 448, so anything larger gets 448: saturation. For
 * |x| <= 2^16 the distances are exact in double (x's lowest bit is at
 * least 2^-32 where |x| >= 2^-9, and the codes are multiples of 2^-9:
 * 49 bits), or, below 2^-9, too far apart for rounding to swap them;
 * larger values are checked by hand. */
static float e4m3_nearest(float x) {
    int base = signbit(x) ? 0x80 : 0, best = -1;
    double best_d = INFINITY;
    for (int c = base; c < base + 0x80; c++) {
        double v = e4m3_decode(c);
        if (isnan(v)) continue;
        double d = fabs((double)x - v);
        if (d < best_d || (d == best_d && (best & 1) && !(c & 1))) {
            best = c;
            best_d = d;
        }
    }
    return (float)e4m3_decode(best);
}

/* Same value and, for zero, same sign. */
static int same(float a, float b) { return a == b && signbit(a) == signbit(b); }

static void check_e4m3(float x, float want, const char *why) {
    float got = f32_round_e4m3(x);
    CHECK(same(got, want), "e4m3(%a) = %a, expected %a: %s", x, got, want, why);
}

static void test_e4m3_by_hand(void) {
    /* the largest: 1.75 * 2^8 (code 0x7e); 1.875 * 2^8 = 480 would be
     * 0x7f, which is NaN in E4M3FN */
    check_e4m3(448.0f, 448.0f, "the largest finite");
    check_e4m3(449.0f, 448.0f, "rounds down to 448");
    /* 464 is halfway between 448 (mantissa 110, even) and 480 (111): to
     * even gives 448; past it rounds to 480, which saturates */
    check_e4m3(464.0f, 448.0f, "the tie at 464 goes to 448, the even one");
    check_e4m3(nextafterf(464.0f, 1000.0f), 448.0f, "past 464: 480 saturates to 448");
    check_e4m3(480.0f, 448.0f, "480 saturates");
    check_e4m3(1e30f, 448.0f, "far past: saturates");
    check_e4m3(INFINITY, 448.0f, "infinity saturates (satfinite)");
    check_e4m3(-INFINITY, -448.0f, "and with its sign");
    check_e4m3(-500.0f, -448.0f, "negative saturates to -448");
    /* spacing 2^-7 in [2^-4, 2^-3): 0.1 / 2^-7 = 12.8, so 13 * 2^-7 */
    check_e4m3(0.1f, 0.1015625f, "0.1 -> 13/128");
    check_e4m3(-0.1f, -0.1015625f, "-0.1 -> -13/128");
    /* spacing 1/8 in [1, 2): 1.0625 is halfway between 1 (mantissa 000)
     * and 1.125 (001): to 1; 1.1875 halfway between 1.125 (001) and 1.25
     * (010): to 1.25 */
    check_e4m3(1.0625f, 1.0f, "tie to even mantissa 000");
    check_e4m3(1.1875f, 1.25f, "tie to even mantissa 010");
    check_e4m3(-1.0625f, -1.0f, "negative tie");
    check_e4m3(nextafterf(1.0625f, 2.0f), 1.125f, "just past a tie rounds up");
    /* 1.9375 is halfway between 1.875 (111) and 2 (the next exponent's
     * 000): to 2. 248 likewise between 240 and 256 */
    check_e4m3(1.9375f, 2.0f, "tie across an exponent boundary");
    check_e4m3(248.0f, 256.0f, "tie across the last exponent boundary");
    /* subnormals: multiples of 2^-9 below 2^-6 */
    check_e4m3(0x1p-9f, 0x1p-9f, "the smallest subnormal");
    check_e4m3(0x1p-10f, 0.0f, "half the smallest: tie between 0 (code 0x00) and 2^-9 (0x01): 0");
    check_e4m3(-0x1p-10f, -0.0f, "the same, negative: -0");
    check_e4m3(nextafterf(0x1p-10f, 1.0f), 0x1p-9f, "just past half: 2^-9");
    check_e4m3(0x1p-12f, 0.0f, "far below: 0");
    /* 3 * 2^-10 is halfway between 2^-9 (0x01) and 2^-8 (0x02): 2^-8 */
    check_e4m3(0x3p-10f, 0x1p-8f, "subnormal tie to even code");
    /* 15 * 2^-10 is halfway between 7 * 2^-9 (0x07, the largest
     * subnormal) and 2^-6 (0x08, the smallest normal): 2^-6 */
    check_e4m3(0xfp-10f, 0x1p-6f, "tie from the subnormals into the normals");
    check_e4m3(0x7p-9f, 0x7p-9f, "the largest subnormal");
    check_e4m3(0x1p-6f, 0x1p-6f, "the smallest normal");
    check_e4m3(0.0f, 0.0f, "zero");
    check_e4m3(-0.0f, -0.0f, "negative zero");
    CHECK(isnan(f32_round_e4m3(NAN)), "NaN stays NaN");
    CHECK(isnan(f32_round_e4m3(-NAN)), "-NaN stays NaN");
}

/* Every finite input of the set against the brute-force nearest code. */
static int e4m3_mismatches;

static void against_nearest(float x) {
    float want = e4m3_nearest(x), got = f32_round_e4m3(x);
    if (!same(got, want) && e4m3_mismatches++ < 10)
        CHECK(0, "e4m3(%a) = %a, nearest code %a", x, got, want);
}

static void test_e4m3_brute_force(void) {
    int n = 0;
    /* every bfloat16 value up to 2^16: each E4M3 value and each halfway
     * point between two of them (5 significant bits) is one, with every
     * exponent below them */
    for (uint32_t b = 0; b < 0x10000u; b++) {
        uint32_t u = b << 16;
        float x;
        memcpy(&x, &u, sizeof x);
        if (!(fabsf(x) <= 0x1p16f)) continue;
        against_nearest(x);
        n++;
    }
    /* the floats on either side of each halfway point */
    for (int c = 0; c < 0x7e; c++) {
        float mid = (float)((e4m3_decode(c) + e4m3_decode(c + 1)) / 2);
        for (int s = 0; s < 2; s++) {
            float m = s ? -mid : mid;
            against_nearest(nextafterf(m, -INFINITY));
            against_nearest(nextafterf(m, INFINITY));
            n += 2;
        }
    }
    /* random significands across E4M3's exponents and beyond */
    uint64_t rng = 0x9E3779B97F4A7C15ull;
    for (int i = 0; i < 200000; i++) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        uint32_t exp = 127u - 14u + (uint32_t)(rng >> 32) % 26u; /* 2^-14 .. 2^11 */
        uint32_t u = (uint32_t)(rng & 0x807fffffu) | (exp << 23);
        float x;
        memcpy(&x, &u, sizeof x);
        against_nearest(x);
        n++;
    }
    CHECK(e4m3_mismatches == 0, "%d of %d values differ from the nearest E4M3 code", e4m3_mismatches,
          n);
    printf("  e4m3: %d values against the nearest code, %d differ\n", n, e4m3_mismatches);
}

static void test_bf16(void) {
    /* spacing 2^-7 in [1, 2): 1 + 2^-8 is halfway between 1 and 1 + 2^-7
     * (odd): to 1; 1 + 3 * 2^-8 halfway between 1 + 2^-7 (odd) and
     * 1 + 2^-6 (even): to 1 + 2^-6 */
    CHECK(f32_round_bf16(1.0f + 0x1p-8f) == 1.0f, "bf16 tie to even, down");
    CHECK(f32_round_bf16(1.0f + 0x3p-8f) == 1.0f + 0x1p-6f, "bf16 tie to even, up");
    CHECK(f32_round_bf16(-(1.0f + 0x3p-8f)) == -(1.0f + 0x1p-6f), "bf16 negative");
    CHECK(f32_round_bf16(0.1f) == 0x1.9ap-4f, "bf16(0.1) = 0x1.9ap-4: %a", f32_round_bf16(0.1f));
    CHECK(isinf(f32_round_bf16(3.4e38f)), "bf16 past its largest (0x1.fep127): infinite");
    CHECK(isnan(f32_round_bf16(NAN)), "bf16 NaN stays NaN");
    /* its subnormals are multiples of 2^-133 */
    CHECK(f32_round_bf16(0x1p-133f) == 0x1p-133f, "bf16's smallest subnormal");
    CHECK(f32_round_bf16(0x1p-140f) == 0.0f, "below half of it: 0");
}

int main(void) {
    test_e4m3_by_hand();
    test_e4m3_brute_force();
    test_bf16();
    return test_finish("test_float_round");
}
