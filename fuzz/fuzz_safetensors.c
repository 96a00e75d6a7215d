/*
 * fuzz_safetensors.c - arbitrary bytes as a safetensors file: st_parse()
 * must accept or refuse them without reading outside the buffer, and every
 * tensor it accepts must lie inside it.
 */
#include <stdint.h>
#include <stdlib.h>

#include "core/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    st_file f;
    if (st_parse(&f, data, size, "fuzz") == 0) {
        for (int i = 0; i < f.count; i++) {
            const uint8_t *p = f.tensors[i].data;
            if (p < data || p + f.tensors[i].nbytes > data + size) abort();
        }
        free(st_metadata(&f, "format"));
        st_close(&f);
    }
    return 0;
}
