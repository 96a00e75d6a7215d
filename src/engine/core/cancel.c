/* cancel.c - this thread's cancel flag (see cancel.h). */
#include "core/cancel.h"

#include "core/error.h"

static _Thread_local const sdx4_atomic_int *current;

const sdx4_atomic_int *sdx4_cancel_install(const sdx4_atomic_int *flag) {
    const sdx4_atomic_int *previous = current;
    current = flag;
    return previous;
}

const sdx4_atomic_int *sdx4_cancel_flag(void) { return current; }

int sdx4_cancel_stopped(void) {
    sdx4_set_error(SDX4_ERR_CANCELED, "canceled");
    return -1;
}

int sdx4_cancel_check(void) { return cancel_is_set(current) ? sdx4_cancel_stopped() : 0; }
