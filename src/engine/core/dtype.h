/* dtype.h - element types of weights and tensors, and conversions. */
#ifndef SDX4_DTYPE_H
#define SDX4_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* The float types are what weights may be; the others exist only so that
 * files holding them (e.g. CLIP's int64 position_ids) can be read. */
typedef enum {
    DTYPE_F32, DTYPE_F16, DTYPE_BF16,
    DTYPE_F64, DTYPE_I64, DTYPE_I32, DTYPE_I16, DTYPE_I8, DTYPE_U8, DTYPE_BOOL,
    DTYPE_COUNT
} dtype;

static const struct { const char *name; size_t size; } dtype_info[DTYPE_COUNT] = {
    {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"F64", 8}, {"I64", 8},
    {"I32", 4}, {"I16", 2}, {"I8", 1},   {"U8", 1},  {"BOOL", 1},
};

static inline size_t dtype_size(dtype t) { return dtype_info[t].size; }
static inline const char *dtype_name(dtype t) { return dtype_info[t].name; }
static inline int dtype_is_float(dtype t) { return t <= DTYPE_BF16; }

/* IEEE binary16 -> binary32, exact for every input (subnormals, inf, NaN). */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000 | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* binary32 -> binary16 with round-to-nearest-even, as torch's .half(). */
static inline uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t absx = x & 0x7fffffff;
    if (absx >= 0x7f800000) /* inf or NaN */
        return (uint16_t)(sign | 0x7c00 | (absx > 0x7f800000 ? 0x200 : 0));
    if (absx >= 0x477ff000) return (uint16_t)(sign | 0x7c00); /* overflow */
    if (absx < 0x38800000) { /* subnormal or zero in half */
        if (absx < 0x33000000) return (uint16_t)sign;
        uint32_t man = (absx & 0x7fffff) | 0x800000;
        int shift = 126 - (int)(absx >> 23);
        uint32_t half = man >> shift, rest = man & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rest > mid || (rest == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t h = ((absx >> 13) - (112 << 10));
    uint32_t rest = absx & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

static inline float bf16_to_f32(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Convert n elements of `type` at src (any alignment) to float32. */
static inline void dtype_to_f32(dtype type, const void *src, float *dst, size_t n) {
    const unsigned char *p = (const unsigned char *)src;
    for (size_t i = 0; i < n; i++) {
        if (type == DTYPE_F32) {
            memcpy(&dst[i], p + 4 * i, 4);
        } else {
            uint16_t v;
            memcpy(&v, p + 2 * i, 2);
            dst[i] = type == DTYPE_F16 ? f16_to_f32(v) : bf16_to_f32(v);
        }
    }
}

#endif
