/*
 * plan_cache.h - choices a GPU backend made by timing, kept in a file so
 * that the next process at the same sizes makes them without timing.
 *
 * The CUDA backend times cuDNN's algorithms and graph-API plans the first
 * time it meets a convolution shape (cuda_conv.cu): seconds of a cold
 * start. It stores each choice here as an opaque value under an operation
 * key ("conv ...", "gemm ..."), and the next process looks it up instead.
 *
 * A choice is only valid for the device and the libraries it was made
 * with: every record carries a device key (GPU, driver, library versions
 * and the backend's record format, one string the backend composes).
 * Lookups see only records of the cache's own device key; records of other
 * keys stay in the file, untouched, for the processes they belong to.
 *
 * The file is read whole at open and written whole at save: to a
 * temporary file in the same folder, then renamed over the old one, so a
 * reader (several workers share one file) sees the old file or the new
 * one, never a torn one. Save merges first with what is on disk then, so
 * that the records other processes added meanwhile are kept; two saves at
 * the same instant may still lose one side's new records until that
 * process saves again (it keeps them in memory), which costs a re-timing
 * at worst, never a wrong choice.
 *
 * Nothing here refuses to start: a missing file is an empty cache; a
 * corrupt, truncated, foreign or other-version file is a warning on stderr
 * and an empty cache, replaced at the next save; a path that cannot be
 * written is a warning once, and the cache then lives in memory only.
 *
 * Bounded: at most PLAN_CACHE_MAX_RECORDS records and PLAN_CACHE_MAX_BYTES
 * of file. When a save or an insert would pass either, the records of
 * other device keys go first, oldest first, then this device's oldest.
 *
 * Not thread-safe: its owner serializes calls (the CUDA backend's lock).
 */
#ifndef SDX4_PLAN_CACHE_H
#define SDX4_PLAN_CACHE_H

#include <stddef.h>
#include <stdint.h>

/* The file's own layout (plan_cache.c); a file of another is ignored. */
#define PLAN_CACHE_FORMAT 1

/* A full-size model at one input size has a few dozen convolution shapes
 * (each up to a legacy, a bias and four graph records) and as many GEMM
 * shapes: about 200 records of about 250 bytes, 50 KB. 8192 records hold
 * some 40 sizes and modes on one device, or several devices and driver
 * upgrades, and 4 MiB is read in a few milliseconds at every start. */
#define PLAN_CACHE_MAX_RECORDS 8192
#define PLAN_CACHE_MAX_BYTES ((size_t)4 << 20)
#define PLAN_CACHE_MAX_KEY 255    /* bytes of a device or operation key */
#define PLAN_CACHE_MAX_VALUE 4096 /* bytes of one value */

typedef struct plan_cache plan_cache;

/* Where the cache of sdx4_cuda_options.plan_cache `option` lives: NULL,
 * "" and "off" are no cache; anything else is the path itself. Returns 1
 * with the path in buf, 0 for no cache (also when the path does not fit).
 * The front ends' default is sdx4_default_plan_cache (sdx4.h). */
int sdx4_plan_cache_path(const char *option, char *buf, size_t size);

/* A cache for `device_key` backed by the file at `path`, whose records it
 * loads (see the top comment for a file that is not right). NULL only
 * when out of memory or for a device key that is empty or too long. */
plan_cache *sdx4_plan_cache_open(const char *path, const char *device_key);
/* Frees without saving; NULL is fine. */
void sdx4_plan_cache_close(plan_cache *c);

/* The value stored for `op_key` under the cache's device key, and its
 * length in *len; NULL when there is none. Valid until the next put,
 * merge or save. */
const void *sdx4_plan_cache_get(plan_cache *c, const char *op_key, size_t *len);
/* Stores (or replaces) the value of `op_key`; -1 for a key or value over
 * the limits above (nothing is stored) or out of memory. */
int sdx4_plan_cache_put(plan_cache *c, const char *op_key, const void *value, size_t len);

/* Writes the file when something was put since the last save: 0 done (or
 * nothing to do), -1 when it could not be written (a warning the first
 * time; the records stay in memory, and the save after the next put tries
 * again: the file is always written whole). */
int sdx4_plan_cache_save(plan_cache *c);

/* Adds the records of a file's bytes that the cache lacks (those it has
 * win); 0, or -1 with a reason in `why` when the bytes are not a valid
 * file of this format, which then adds nothing. The loader of open and
 * save, exposed for the tests and the fuzzer. */
int sdx4_plan_cache_merge(plan_cache *c, const void *data, size_t size, char *why,
                          size_t why_size);

/* For the tests: records held (every device key), warnings printed. */
int sdx4_plan_cache_records(const plan_cache *c);
int sdx4_plan_cache_warnings(const plan_cache *c);

#endif
