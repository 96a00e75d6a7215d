/* cancel.c - this thread's cancel flag (see cancel.h). */
#include "core/cancel.h"

#include "core/error.h"

static _Thread_local const sdx4_atomic_int *current;

const sdx4_atomic_int *cancel_install(const sdx4_atomic_int *flag) {
    const sdx4_atomic_int *previous = current;
    current = flag;
    return previous;
}

const sdx4_atomic_int *cancel_flag(void) { return current; }

int cancel_stopped(void) {
    set_error(SDX4_ERR_CANCELED, "canceled");
    return -1;
}

int cancel_check(void) { return cancel_is_set(current) ? cancel_stopped() : 0; }
