/*
 * fuzz_plan_cache.c - arbitrary bytes as a CUDA plan cache file
 * (core/plan_cache.h): merged into a cache, looked up, merged again (every
 * record then already present), and a record put. Any bytes must be taken
 * or refused with a reason; none may crash, hang or leak.
 *
 * The file ends in a checksum that random bytes never match, so an input
 * whose first byte is even has the rest sealed with the right one first:
 * the fuzzer then reaches the record parser.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/plan_cache.h"

#define DEVICE "NVIDIA H100|GPU-aaaa|sm90|driver 12080|cudnn 91900|format 1"

/* data[1..] followed by its FNV-1a 64, as plan_cache.c seals a file. */
static uint8_t *sealed(const uint8_t *data, size_t size, size_t *n) {
    uint8_t *b = malloc(size + 8);
    if (!b) return NULL;
    memcpy(b, data + 1, size - 1);
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < size - 1; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    for (int i = 0; i < 8; i++) b[size - 1 + i] = (uint8_t)(h >> (8 * i));
    *n = size + 7;
    return b;
}

int LLVMFuzzerTestOneInput(const uint8_t *input, size_t input_size) {
    uint8_t *copy = NULL;
    const uint8_t *data = input;
    size_t size = input_size;
    if (input_size > 0 && input[0] % 2 == 0) {
        if (!(copy = sealed(input, input_size, &size))) return 0;
        data = copy;
    }
    /* a path that never exists: open reads nothing, and nothing is saved */
    plan_cache *c = sdx4_plan_cache_open("/nonexistent/sdx4-fuzz/plans", DEVICE);
    if (!c) {
        free(copy);
        return 0;
    }
    char why[160];
    if (sdx4_plan_cache_merge(c, data, size, why, sizeof why) == 0) {
        size_t len;
        const char *ops[] = {"conv 1", "gemm 1", "x"};
        for (int i = 0; i < 3; i++) {
            const uint8_t *v = sdx4_plan_cache_get(c, ops[i], &len);
            if (v && len && v[len - 1] == 0xff) why[0] = 0; /* read every byte it claims */
        }
        if (sdx4_plan_cache_merge(c, data, size, why, sizeof why) != 0) __builtin_trap();
    } else if (!why[0]) {
        __builtin_trap(); /* a refusal always says why */
    }
    sdx4_plan_cache_put(c, "conv 1", data, size < 64 ? size : 64);
    sdx4_plan_cache_close(c);
    free(copy);
    return 0;
}
