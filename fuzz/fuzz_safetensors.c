/*
 * fuzz_safetensors.c - arbitrary bytes as a safetensors file: sdx4_st_parse()
 * must accept or refuse them without reading outside the buffer, and every
 * tensor it accepts must lie inside it.
 */
#include <stdint.h>
#include <stdlib.h>

#include "core/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    st_file f;
    if (sdx4_st_parse(&f, data, size, "fuzz") == 0) {
        for (int i = 0; i < f.count; i++) {
            const uint8_t *p = f.tensors[i].data;
            if (p < data || p + f.tensors[i].nbytes > data + size) abort();
        }
        free(sdx4_st_metadata(&f, "format"));
        sdx4_st_close(&f);
    }
    return 0;
}
