/*
 * fuzz_tokenizer.c - libFuzzer target: arbitrary bytes through the CLIP
 * tokenizer.
 *
 * The small reference model's tokenizer (real CLIP vocabulary, pad "!") is
 * loaded once from $SDX4_REFERENCE/small/model, else from
 * ../shared/reference relative to the working directory. Each input is
 * encoded as a C string (up to its first NUL) at the model's length and at
 * the smallest one; whatever the bytes, encoding must succeed, give ids of
 * the vocabulary and put bos first and eos where truncation leaves it.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sdx4.h"
#include "text/tokenizer.h"

#define VOCAB_SIZE 49408

static tokenizer *load_once(void) {
    static tokenizer *t;
    if (t) return t;
    const char *ref = getenv("SDX4_REFERENCE");
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/small/model", ref && *ref ? ref : "../shared/reference");
    t = sdx4_tokenizer_load(dir);
    if (!t) {
        fprintf(stderr, "fuzz_tokenizer: %s\n", sdx4_last_error());
        abort();
    }
    return t;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    tokenizer *t = load_once();
    char *text = malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = 0;

    int32_t ids[77];
    int max_len = sdx4_tokenizer_max_length(t), n = 0;
    if (max_len > 77) abort();
    if (sdx4_tokenizer_encode(t, text, ids, max_len, &n) != 0) abort();
    if (n < 2 || ids[0] != 49406) abort();
    if (ids[(n < max_len ? n : max_len) - 1] != 49407) abort();
    for (int i = 0; i < max_len; i++)
        if (ids[i] < 0 || ids[i] >= VOCAB_SIZE) abort();

    int n_short = 0;
    if (sdx4_tokenizer_encode(t, text, ids, 2, &n_short) != 0 || n_short != n) abort();
    if (ids[0] != 49406 || ids[1] != 49407) abort();
    free(text);
    return 0;
}
