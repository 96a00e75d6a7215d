/*
 * cancel.h - the flag that stops the upscale running on this thread.
 *
 * sdx4_upscale_params.cancel belongs to one call, and one backend serves
 * every concurrent call of an engine, so the flag cannot live in the
 * backend. It is not passed down either: every operation of backend.h
 * and every forward function would take one more argument for the few
 * places that read it. Instead the pipeline installs the call's flag in a
 * thread-local variable for the length of the call (an upscale runs on
 * its caller's thread from start to end), and whatever may run long reads
 * it there: the model code between blocks (resnets, transformer blocks,
 * the VAE's attention and up-blocks), which is what stops a GPU backend,
 * whose host only enqueues work; and the CPU kernels between their tiles,
 * where one operation can take seconds (attention over 16384+ tokens, a
 * convolution at 2048x2048).
 *
 * OpenMP worker threads do not see the caller's thread-local variable: a
 * kernel reads sdx4_cancel_flag() into a local before its parallel region,
 * skips the tiles that remain once the flag is set, and reports
 * sdx4_cancel_stopped() after the region, on the calling thread.
 */
#ifndef SDX4_CANCEL_H
#define SDX4_CANCEL_H

#include "sdx4.h"

/* Makes `flag` (NULL: none) this thread's flag; returns the one it
 * replaces, for the caller to put back when its call ends. */
const sdx4_atomic_int *sdx4_cancel_install(const sdx4_atomic_int *flag);
/* This thread's flag, or NULL. */
const sdx4_atomic_int *sdx4_cancel_flag(void);

/* Whether `flag` is set; any thread may ask. Relaxed: the flag orders
 * nothing, it only has to be seen within a tile or two. */
static inline int cancel_is_set(const sdx4_atomic_int *flag) {
    return flag && atomic_load_explicit(flag, memory_order_relaxed);
}

/* -1 with the error set to SDX4_ERR_CANCELED: what an operation that
 * stopped early reports. */
int sdx4_cancel_stopped(void);
/* sdx4_cancel_stopped() if this thread's flag is set, else 0. */
int sdx4_cancel_check(void);

#endif
