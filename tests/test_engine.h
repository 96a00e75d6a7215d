/*
 * test_engine.h - an engine on one of the reference models, on the CPU.
 */
#ifndef SDX4_TEST_ENGINE_H
#define SDX4_TEST_ENGINE_H

#include <stdio.h>

#include "sdx4.h"
#include "test.h"

/* The engine on test_ref(rel) (e.g. "tiny/model"), or NULL with the
 * reason on stderr. */
static inline sdx4_engine *test_engine_open(const char *rel) {
    sdx4_engine_options o;
    sdx4_engine_options_default(&o);
    o.model_dir = test_ref(rel);
    o.device = "cpu";
    sdx4_engine *e = NULL;
    if (sdx4_engine_open(&o, &e) == SDX4_OK) return e;
    fprintf(stderr, "cannot open %s: %s\n", o.model_dir, sdx4_last_error());
    return NULL;
}

#endif
