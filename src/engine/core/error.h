/*
 * error.h - the engine's error reporting.
 *
 * A failing function sets a message with sdx4_set_error() and returns -1 or
 * NULL; callers up the stack may prefix context with sdx4_error_prefix() so the
 * user reads "unet/diffusion_pytorch_model.safetensors: tensor conv_in.weight:
 * shape [32,7,3,3] expected [32,4,3,3]". The message is thread-local, so
 * concurrent calls on one engine keep their own (sdx4_last_error()).
 */
#ifndef SDX4_ERROR_H
#define SDX4_ERROR_H

#include "sdx4.h"

#if defined(__GNUC__)
#define SDX4_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define SDX4_PRINTF(a, b)
#endif

/* Sets the message and the status class of the failure. */
void sdx4_set_error(sdx4_status status, const char *fmt, ...) SDX4_PRINTF(2, 3);
/* Prepends "<prefix>: " to the current message. */
void sdx4_error_prefix(const char *fmt, ...) SDX4_PRINTF(1, 2);
/* The status class of the last sdx4_set_error() on this thread. */
sdx4_status sdx4_error_status(void);
void sdx4_error_clear(void);

#endif
