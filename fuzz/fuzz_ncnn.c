/*
 * fuzz_ncnn.c - arbitrary bytes as an ncnn model: the bytes before the
 * first NUL are the .param text, those after it the .bin (the seeds in
 * fuzz/corpus/fuzz_ncnn are tiny RRDBNet and SRVGGNetCompact models in that
 * form). sdx4_ncnn_parse() must give a config and tensors whose sizes are
 * their shapes', or an error and an empty state dict; nothing may crash,
 * hang or leak.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tools/convert.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *nul = memchr(data, 0, size);
    size_t plen = nul ? (size_t)(nul - data) : size;
    const uint8_t *bin = nul ? nul + 1 : data + size;
    gan_config cfg;
    state_dict sd;
    if (sdx4_ncnn_parse((const char *)data, plen, "fuzz.param", bin, size - (size_t)(bin - data),
                        "fuzz.bin", &cfg, &sd)) {
        if (sd.n || sd.t) abort();
        return 0;
    }
    if (sd.n == 0 || cfg.num_feat < 1 || cfg.scale < 1) abort();
    for (int i = 0; i < sd.n; i++) {
        size_t n = dtype_size(sd.t[i].type);
        for (int d = 0; d < sd.t[i].ndim; d++) n *= (size_t)sd.t[i].shape[d];
        if (n != sd.t[i].nbytes) abort();
    }
    sdx4_state_dict_free(&sd);
    return 0;
}
