/*
 * float_round.h - a float32 rounded to the nearest value of a narrower
 * float format, kept in float32.
 *
 * The tests measure what a narrower format costs in accuracy without the
 * hardware that computes in it: the CPU backend's emulating paths
 * (backend.h's CPU_DENSE_ONEDNN_F32_*_OPERANDS) round the operands of its
 * convolutions and linear layers to the values bfloat16 or FP8 E4M3 can
 * hold, then multiply them in float32. Products of bfloat16 values are
 * exact in float32 (8 + 8 significant bits, within 24), so what differs
 * from bfloat16 hardware is only the accumulation. E4M3's products are
 * exact too (4 + 4), but its per-tensor scales are applied to the
 * operands here, each scaled value rounded to float32 (a relative 2^-24,
 * nothing beside E4M3's 2^-5), where the hardware applies them to the sum;
 * and its accumulation differs more (cpu_onednn.c's round_operands).
 *
 * Both roundings are to nearest, ties to even, as oneDNN's reorders to
 * bfloat16 and CUDA's conversions to FP8 round: the same carry trick on
 * float32's bits, keeping 8 significant bits for bfloat16 and 4 for E4M3,
 * which then applies its own range.
 */
#ifndef SDX4_FLOAT_ROUND_H
#define SDX4_FLOAT_ROUND_H

#include <stdint.h>
#include <string.h>

/* x to nearest even with `bits` significant bits (the leading one
 * included, 1 to 23), in float32's exponent range: adding half an ulp of
 * the result less one (plus one when the kept part is odd) carries into
 * the kept bits exactly when the dropped part is past half, or at half
 * with an odd kept part. NaN stays NaN; past FLT_MAX becomes infinite. */
static inline float f32_round_bits(float x, int bits) {
    uint32_t u, drop = 24u - (uint32_t)bits;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return x;
    u = (u + (1u << (drop - 1)) - 1u + ((u >> drop) & 1u)) & ~((1u << drop) - 1u);
    memcpy(&x, &u, sizeof x);
    return x;
}

/* bfloat16: float32's exponent range, 8 significant bits. */
static inline float f32_round_bf16(float x) { return f32_round_bits(x, 8); }

/* OCP FP8 E4M3FN (CUDA's __nv_fp8_e4m3, cuBLASLt's CUDA_R_8F_E4M3): sign,
 * 4 exponent bits of bias 7, 3 mantissa bits; normal values from 2^-6 to
 * 1.75 * 2^8 = 448 (the code that would be 480 is NaN, and there is no
 * infinity), subnormals multiples of 2^-9 below 2^-6. Conversion
 * saturates, as CUDA's __NV_SATFINITE and Transformer Engine's casts do:
 * anything past 448, infinity included, becomes 448 with its sign. NaN
 * stays NaN; -0 stays -0. */
static inline float f32_round_e4m3(float x) {
    uint32_t u, sign;
    memcpy(&u, &x, sizeof u);
    sign = u & 0x80000000u;
    u ^= sign;
    if (u > 0x7f800000u) return x;
    float a;
    memcpy(&a, &u, sizeof a);
    /* below 2^-6 the spacing is fixed at 2^-9, which is float32's spacing
     * at 2^14: adding and taking away 2^14 rounds to it, to nearest even */
    if (a < 0x1p-6f)
        a = (a + 0x1p14f) - 0x1p14f;
    else
        a = f32_round_bits(a, 4);
    if (a > 448.0f) a = 448.0f;
    memcpy(&u, &a, sizeof u);
    u |= sign;
    memcpy(&x, &u, sizeof x);
    return x;
}

#endif
