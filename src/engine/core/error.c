/* error.c - thread-local error messages (see error.h). */
#include "core/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char message[1024];
static _Thread_local sdx4_status last_status;

void sdx4_set_error(sdx4_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    last_status = status;
}

void sdx4_error_prefix(const char *fmt, ...) {
    char prefix[512], old[sizeof message];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, message, sizeof old);
    snprintf(message, sizeof message, "%s: %s", prefix, old);
}

sdx4_status sdx4_error_status(void) { return last_status; }

void sdx4_error_clear(void) {
    message[0] = 0;
    last_status = SDX4_OK;
}

const char *sdx4_last_error(void) { return message; }

const char *sdx4_status_name(sdx4_status s) {
    switch (s) {
    case SDX4_OK: return "ok";
    case SDX4_ERR_INVALID_ARGUMENT: return "invalid argument";
    case SDX4_ERR_IO: return "i/o error";
    case SDX4_ERR_MODEL: return "model error";
    case SDX4_ERR_NO_MEMORY: return "out of memory";
    case SDX4_ERR_CANCELED: return "canceled";
    case SDX4_ERR_DEVICE: return "device error";
    }
    return "unknown";
}
