/*
 * faults.h - the fault injector of test_faults.c and test_faults_cuda.c:
 * which call fails, the set of live blocks, the allocation wrappers, and
 * the sweep that runs a whole path again and again with the Nth call of
 * one kind failing, as SQLite tests itself (its test_malloc.c).
 *
 * A program includes it once: it defines the __wrap_ functions that
 * -Wl,--wrap sends the engine's allocations to (CMakeLists.txt,
 * SDX4_FAULTS_ALLOC_WRAPS), and the program adds wrappers of its own for
 * its kind of call (test_faults.c file operations, test_faults_cuda.c the
 * CUDA libraries), each asking fault_hit() whether it is the one to fail.
 * Allocations are counted and tracked in every program, so that each can
 * tell a leaked block whatever it fails.
 *
 * A path (fault_path) runs the whole upscale from the start and hands back
 * its output's bytes. fault_run_case() runs it clean twice (the first
 * makes the process's one-time initialisation, the second counts the
 * calls), then, for each kind swept, fails the Nth call for N = first,
 * first + stride, ... until a run meets no injected failure, and checks
 * each run:
 *   - with an injected failure it either fails with a message or succeeds
 *     with an output that passes for the clean run's (the path's `same`:
 *     the very bytes, or as near as the path says and why) - a failure
 *     tolerated, not hidden;
 *   - the run past the last call succeeds with such an output;
 *   - after every run, failed or not, the counts of what it must give back
 *     are those from before it: the blocks alive and descriptors open
 *     (fault_count_host), and whatever else the path counts.
 *
 * Runs per sweep: SDX4_FAULTS_RUNS (default 10: the caller scales it per
 * case) or SDX4_FAULTS_SECONDS (about that many seconds per sweep at the
 * second clean run's pace, for a machine whose speed is not known ahead)
 * sizes the stride of a kind with more calls than that; the first N
 * changes with the time, so that each run of the suite tries other N, and
 * the summary lines say which (SDX4_FAULTS_FIRST and SDX4_FAULTS_STRIDE
 * repeat them). SDX4_FAULTS_CASE=<a prefix of a case's name> and
 * SDX4_FAULTS_KIND=<a prefix of a kind's name> narrow a run;
 * SDX4_FAULTS_VERBOSE=1 prints every run's function and message;
 * SDX4_FAULTS_TRAP=1 raises SIGTRAP at the failure, where gdb stops.
 */
#ifndef SDX4_TEST_FAULTS_H
#define SDX4_TEST_FAULTS_H

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <utf8proc.h>

#include "test.h"

/* ------------------------------------------------------------------------
 * The injector: which call fails, and the live-block set
 * ------------------------------------------------------------------------ */

/* What fails: an allocation of the engine's or imageio's own code, one of
 * jansson's (while it parses or builds JSON for them), a file operation,
 * or a call to the CUDA runtime, cuBLAS(Lt) or cuDNN. */
typedef enum { FAULT_ALLOC, FAULT_JSON, FAULT_FILE, FAULT_CUDA, FAULT_KINDS } fault_kind;
static const char *const fault_kind_names[FAULT_KINDS] = {"allocation", "jansson allocation",
                                                          "file operation", "CUDA call"};
/* Fewer calls than this in a clean run: the wrapping is not linked. */
static const long fault_min_calls[FAULT_KINDS] = {50, 10, 10, 100};

static struct {
    pthread_mutex_t lock; /* the engine's OpenMP threads allocate too */
    int armed;            /* counting (and failing) only inside a run */
    fault_kind kind;
    long fail_at;         /* the call of `kind` that fails (1-based), 0 none */
    long calls[FAULT_KINDS]; /* calls of each kind so far in this run */
    const char *injected; /* the function that failed in this run, or NULL */
    void *site;           /* the address it was called from */
    long live;            /* blocks of ours not yet freed */
    int trap;             /* SDX4_FAULTS_TRAP=1: SIGTRAP at each injected failure */
} fault = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* The live blocks: open addressing, linear probing, backward-shift
 * deletion. 2^21 slots hold the tokenizer's vocabulary (jansson makes an
 * object of 49408 strings) with room to spare. Addresses are kept XORed
 * with a mask, so that LeakSanitizer does not take the set's copies for
 * references: it still finds a leaked block on its own. */
#define LIVE_BITS 21
#define LIVE_SLOTS ((size_t)1 << LIVE_BITS)
#define LIVE_MASK ((uintptr_t)0xA5A5A5A5A5A5A5A5u)
static uintptr_t live_set[LIVE_SLOTS]; /* address ^ LIVE_MASK, 0: free */

static size_t live_hash(uintptr_t hidden) {
    return (size_t)((((hidden ^ LIVE_MASK) >> 4) * UINT64_C(0x9E3779B97F4A7C15)) >> (64 - LIVE_BITS));
}

static void live_add(void *p) {
    uintptr_t h = (uintptr_t)p ^ LIVE_MASK;
    size_t i = live_hash(h);
    while (live_set[i]) i = (i + 1) & (LIVE_SLOTS - 1);
    live_set[i] = h;
    if (++fault.live > (long)(LIVE_SLOTS / 2)) {
        fprintf(stderr, "faults.h: more than %zu live blocks; raise LIVE_BITS\n", LIVE_SLOTS / 2);
        abort();
    }
}

/* 1 when p was ours (and is now forgotten). */
static int live_remove(void *p) {
    uintptr_t h = (uintptr_t)p ^ LIVE_MASK;
    size_t i = live_hash(h);
    while (live_set[i] != h) {
        if (!live_set[i]) return 0;
        i = (i + 1) & (LIVE_SLOTS - 1);
    }
    /* shift later members of the probe run back over the hole */
    for (size_t j = (i + 1) & (LIVE_SLOTS - 1); live_set[j]; j = (j + 1) & (LIVE_SLOTS - 1)) {
        size_t home = live_hash(live_set[j]);
        if (((j - home) & (LIVE_SLOTS - 1)) >= ((j - i) & (LIVE_SLOTS - 1))) {
            live_set[i] = live_set[j];
            i = j;
        }
    }
    live_set[i] = 0;
    fault.live--;
    return 1;
}

/* Counts one call of `kind` to `function` from `site`; 1 when it is the
 * one to fail. */
static int fault_hit(fault_kind kind, const char *function, void *site) {
    if (!fault.armed) return 0;
    pthread_mutex_lock(&fault.lock);
    int fail = ++fault.calls[kind] == fault.fail_at && fault.kind == kind;
    if (fail) fault.injected = function, fault.site = site;
    pthread_mutex_unlock(&fault.lock);
    if (fail && fault.trap) raise(SIGTRAP); /* a debugger stops at the injected failure */
    return fail;
}

static void *track(void *p) {
    if (p) {
        pthread_mutex_lock(&fault.lock);
        live_add(p);
        pthread_mutex_unlock(&fault.lock);
    }
    return p;
}

static int untrack(void *p) {
    if (!p) return 0;
    pthread_mutex_lock(&fault.lock);
    int ours = live_remove(p);
    pthread_mutex_unlock(&fault.lock);
    return ours;
}

/* ------------------------------------------------------------------------
 * Allocation wrappers (-Wl,--wrap=NAME sends NAME here, __real_NAME is libc's)
 * ------------------------------------------------------------------------ */

void *__real_malloc(size_t n);
void *__real_calloc(size_t k, size_t n);
void *__real_realloc(void *p, size_t n);
void *__real_aligned_alloc(size_t align, size_t n);
int __real_posix_memalign(void **p, size_t align, size_t n);
char *__real_strdup(const char *s);
char *__real_strndup(const char *s, size_t n);
void __real_free(void *p);

void *__wrap_malloc(size_t n) {
    if (fault_hit(FAULT_ALLOC, "malloc", __builtin_return_address(0))) return errno = ENOMEM, NULL;
    return track(__real_malloc(n));
}

void *__wrap_calloc(size_t k, size_t n) {
    if (fault_hit(FAULT_ALLOC, "calloc", __builtin_return_address(0))) return errno = ENOMEM, NULL;
    return track(__real_calloc(k, n));
}

void *__wrap_realloc(void *p, size_t n) {
    if (fault_hit(FAULT_ALLOC, "realloc", __builtin_return_address(0))) return errno = ENOMEM, NULL; /* p stays valid */
    int ours = p == NULL || untrack(p);
    void *q = __real_realloc(p, n);
    if (!q && p && ours) track(p); /* a real failure keeps p */
    return ours ? track(q) : q;
}

void *__wrap_aligned_alloc(size_t align, size_t n) {
    if (fault_hit(FAULT_ALLOC, "aligned_alloc", __builtin_return_address(0))) return errno = ENOMEM, NULL;
    return track(__real_aligned_alloc(align, n));
}

int __wrap_posix_memalign(void **p, size_t align, size_t n) {
    if (fault_hit(FAULT_ALLOC, "posix_memalign", __builtin_return_address(0))) return ENOMEM;
    int rc = __real_posix_memalign(p, align, n);
    if (!rc) track(*p);
    return rc;
}

char *__wrap_strdup(const char *s) {
    if (fault_hit(FAULT_ALLOC, "strdup", __builtin_return_address(0))) return errno = ENOMEM, NULL;
    return track(__real_strdup(s));
}

char *__wrap_strndup(const char *s, size_t n) {
    if (fault_hit(FAULT_ALLOC, "strndup", __builtin_return_address(0))) return errno = ENOMEM, NULL;
    return track(__real_strndup(s, n));
}

void __wrap_free(void *p) {
    untrack(p);
    __real_free(p);
}

/* utf8proc_map (the tokenizer's NFC and case folding) allocates inside
 * libutf8proc: to its caller it is an allocation, failed as utf8proc
 * fails it, and its result is a block the caller must free. */
utf8proc_ssize_t __real_utf8proc_map(const utf8proc_uint8_t *s, utf8proc_ssize_t len, utf8proc_uint8_t **out,
                                     utf8proc_option_t options);

utf8proc_ssize_t __wrap_utf8proc_map(const utf8proc_uint8_t *s, utf8proc_ssize_t len, utf8proc_uint8_t **out,
                                     utf8proc_option_t options) {
    if (fault_hit(FAULT_ALLOC, "utf8proc_map", __builtin_return_address(0))) {
        *out = NULL;
        return UTF8PROC_ERROR_NOMEM;
    }
    utf8proc_ssize_t n = __real_utf8proc_map(s, len, out, options);
    if (n >= 0) track(*out);
    return n;
}

/* jansson's allocator (json_set_alloc_funcs): the same counter and set */
static void *json_malloc_counted(size_t n) {
    if (fault_hit(FAULT_JSON, "json malloc", __builtin_return_address(0))) return errno = ENOMEM, NULL;
    return track(__real_malloc(n));
}
static void json_free_counted(void *p) { __wrap_free(p); }

/* Before anything allocates: jansson's allocations through the set, and
 * SDX4_FAULTS_TRAP. */
static void fault_init(void) {
    json_set_alloc_funcs(json_malloc_counted, json_free_counted);
    fault.trap = getenv("SDX4_FAULTS_TRAP") && atoi(getenv("SDX4_FAULTS_TRAP"));
}

/* ------------------------------------------------------------------------
 * The upscale at the heart of every path
 * ------------------------------------------------------------------------ */

/* What a case upscales with: a model, and the work asked of it. */
typedef struct {
    char model_dir[4096];
    int steps, tile; /* tile: a GAN's tiles in input pixels (0 whole) */
    float guidance;
} fault_model;

/* The models of every program's cases: the reference data's tiny
 * diffusion model with `steps` guided steps, SRVGGNetCompact whole and
 * RRDBNet in 2 x 2 tiles of 32 px (test_faults.c's GANs). */
static void fault_models(fault_model *diffusion, fault_model *gan, fault_model *tiled, int steps) {
    *diffusion = (fault_model){.steps = steps, .guidance = 6.0f};
    *gan = (fault_model){.steps = 1};
    *tiled = (fault_model){.steps = 1, .tile = 32};
    snprintf(diffusion->model_dir, sizeof diffusion->model_dir, "%s", test_ref("tiny/model"));
    snprintf(gan->model_dir, sizeof gan->model_dir, "%s", SDX4_SOURCE_DIR "/tests/data/gan/srvgg_x4_prelu");
    snprintf(tiled->model_dir, sizeof tiled->model_dir, "%s", SDX4_SOURCE_DIR "/tests/data/gan/rrdb_x2");
}

/* img's width x height pixels, malloc'd, of a pattern: 0, or -1 out of
 * memory. */
static int fault_pattern(sdx4_image *img) {
    size_t n = (size_t)3 * img->width * img->height;
    if (!(img->pixels = malloc(n))) return -1;
    for (size_t i = 0; i < n; i++) img->pixels[i] = (uint8_t)(i * 37 % 253);
    return 0;
}

/* Opens the engine on `device` with its default options (one thread: one
 * order of calls, so that a failing N reproduces) and upscales `in` into
 * *out: 0, or -1 with the message in err. The engine is closed either
 * way. */
static int fault_upscale(const fault_model *m, const char *device, const sdx4_image *in, sdx4_image *out,
                         char *err, size_t errlen) {
    sdx4_engine *e = NULL;
    sdx4_engine_options o;
    sdx4_engine_options_default(&o);
    o.model_dir = m->model_dir;
    o.device = device;
    o.threads = 1;
    int rc = -1;
    if (sdx4_engine_open(&o, &e) == SDX4_OK) {
        sdx4_upscale_params p;
        sdx4_upscale_params_default(&p);
        p.prompt = "a white cat";
        p.num_inference_steps = m->steps;
        p.guidance_scale = m->guidance;
        p.tile = m->tile;
        if (m->tile) p.tile_overlap = 8;
        rc = sdx4_upscale(e, in, &p, out, NULL) == SDX4_OK ? 0 : -1;
    }
    if (rc) snprintf(err, errlen, "%s", sdx4_last_error());
    sdx4_engine_close(e);
    return rc;
}

/* ------------------------------------------------------------------------
 * The sweep: a path run with the Nth call failing, for N = 1, 2, 3 ...
 * ------------------------------------------------------------------------ */

/* What a run must give back, named: taken before and after each run. */
#define FAULT_MAX_COUNTS 24
typedef struct {
    int n;
    const char *what[FAULT_MAX_COUNTS];
    long value[FAULT_MAX_COUNTS];
} fault_counts;

static void fault_count(fault_counts *c, const char *what, long value) {
    if (c->n == FAULT_MAX_COUNTS) {
        fprintf(stderr, "faults.h: more than %d counts; raise FAULT_MAX_COUNTS\n", FAULT_MAX_COUNTS);
        abort();
    }
    c->what[c->n] = what;
    c->value[c->n++] = value;
}

static int open_descriptors(void) {
    DIR *d = opendir("/proc/self/fd");
    int n = 0;
    if (!d) return -1;
    while (readdir(d)) n++;
    closedir(d);
    return n;
}

/* The host's counts: our blocks alive, and the descriptors open. */
static void fault_count_host(fault_counts *c) {
    fault_count(c, "blocks", fault.live);
    fault_count(c, "descriptors", open_descriptors());
}

typedef struct {
    const char *name;
    /* Runs the path once from the start: 0 with its output in *out (a
     * block of ours, which the sweep frees), or -1 with the message in
     * err. Everything else it made is freed either way. */
    int (*run)(const void *ctx, void **out, size_t *out_len, char *err, size_t errlen);
    const void *ctx;
    /* 1 when `out` passes for the clean run's output, else 0 with why. */
    int (*same)(const void *clean, size_t clean_len, const void *out, size_t out_len, char *why,
                size_t whylen);
    void (*count)(fault_counts *c); /* what every run must give back */
} fault_path;

static double fault_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* About this many runs per sweep (SDX4_FAULTS_RUNS, default 10; 0: every
 * N); the caller scales it per case. */
static long fault_budget(void) {
    const char *r = getenv("SDX4_FAULTS_RUNS");
    return r && *r ? atol(r) : 10;
}

/* Runs the path with the Nth call of `kind` failing (0: none); the run's
 * call counts stay in fault.calls. */
static int fault_run(const fault_path *p, fault_kind kind, long n, void **out, size_t *out_len, char *err,
                     size_t errlen) {
    fault.kind = kind;
    fault.fail_at = n;
    memset(fault.calls, 0, sizeof fault.calls);
    fault.injected = NULL;
    *out = NULL;
    *out_len = 0;
    err[0] = 0;
    fault.armed = 1;
    int rc = p->run(p->ctx, out, out_len, err, errlen);
    fault.armed = 0;
    return rc;
}

/* Fails the Nth call of `kind` for N = first, first + stride, ... until a
 * run meets no failure; checks each run as the top of the file says. */
static void fault_sweep(const fault_path *p, fault_kind kind, long stride, long first, const void *clean,
                        size_t clean_len) {
    const char *what = fault_kind_names[kind];
    long runs = 0, failed = 0, tolerated = 0, n;
    static void *sites[8192]; /* the distinct call sites failed */
    int nsites = 0;
    double t0 = fault_now();
    for (n = first;; n += stride) {
        fault_counts before = {0}, after = {0};
        p->count(&before);
        void *out = NULL;
        size_t out_len = 0;
        char err[1024], why[256] = "";
        int rc = fault_run(p, kind, n, &out, &out_len, err, sizeof err);
        int same = rc == 0 && p->same(clean, clean_len, out, out_len, why, sizeof why);
        runs++;
        if (!fault.injected) {
            CHECK(rc == 0, "%s: no %s failed at N=%ld, yet: %s", p->name, what, n, err);
            CHECK(rc || same, "%s: the run past the last %s gave another image (%s)", p->name, what, why);
        } else if (rc) {
            failed++;
            CHECK(err[0] != 0, "%s: %s %ld (%s) failed with no message", p->name, what, n, fault.injected);
        } else {
            tolerated++;
            CHECK(same, "%s: %s %ld (%s) failed, the run succeeded with another image (%s)", p->name, what, n,
                  fault.injected, why);
        }
        free(out);
        int seen = 0;
        for (int i = 0; i < nsites && !seen; i++) seen = sites[i] == fault.site;
        if (fault.injected && !seen && nsites < (int)(sizeof sites / sizeof *sites)) sites[nsites++] = fault.site;
        p->count(&after);
        for (int i = 0; i < before.n; i++)
            CHECK(after.value[i] == before.value[i], "%s: %s %ld (%s) failed: %ld %s leaked (%s)", p->name, what,
                  n, fault.injected, after.value[i] - before.value[i], before.what[i], err);
        if (getenv("SDX4_FAULTS_VERBOSE"))
            fprintf(stderr, "%s %s %ld (%s): %s\n", p->name, what, n, fault.injected, rc ? err : "ok");
        if (!fault.injected) break;
    }
    printf("  %-19s %7ld per run, N = %ld..%ld step %ld: %ld runs, %ld failed with a message, "
           "%ld succeeded with an output that passed for the clean one, %d call sites (%.1f s)\n",
           what, fault.calls[kind], first, n, stride, runs, failed, tolerated, nsites, fault_now() - t0);
}

/* The sweeps of one path, unless SDX4_FAULTS_CASE names another.
 * `wrapped` (a mask of 1 << kind) are the kinds whose calls the program
 * wraps, which a clean run must make; of them it sweeps those whose name
 * SDX4_FAULTS_KIND begins (a developer's focus), else those of `swept`.
 * Without SDX4_FAULTS_STRIDE, a kind with more calls than `budget` (or
 * than SDX4_FAULTS_SECONDS give runs) is strided to about that many runs,
 * from an N that changes with the time (printed: SDX4_FAULTS_FIRST repeats
 * it); 0 is no budget (every N). */
static void fault_run_case(const fault_path *p, unsigned wrapped, unsigned swept, long budget) {
    const char *only = getenv("SDX4_FAULTS_CASE"), *kind = getenv("SDX4_FAULTS_KIND");
    if (only && strncmp(p->name, only, strlen(only))) return;
    if (kind && *kind) {
        swept = 0;
        for (fault_kind k = 0; k < FAULT_KINDS; k++)
            if (!strncasecmp(fault_kind_names[k], kind, strlen(kind))) swept |= 1u << k;
    }
    void *clean = NULL;
    size_t clean_len = 0;
    char err[1024] = "";
    /* twice: the second run must leave nothing behind either (one-time
     * initialisation happened in the first); it counts the calls */
    int rc = p->run(p->ctx, &clean, &clean_len, err, sizeof err);
    free(clean);
    long live_before = fault.live;
    double t0 = fault_now();
    if (!rc) rc = fault_run(p, FAULT_ALLOC, 0, &clean, &clean_len, err, sizeof err);
    double seconds = fault_now() - t0;
    CHECK(rc == 0, "%s: the clean run: %s", p->name, err);
    if (rc) return;
    CHECK(fault.live == live_before + 1, "%s: the clean run leaves %ld blocks besides its output", p->name,
          fault.live - live_before - 1);
    long calls[FAULT_KINDS];
    memcpy(calls, fault.calls, sizeof calls);
    for (fault_kind k = 0; k < FAULT_KINDS; k++)
        CHECK(!(wrapped >> k & 1) || calls[k] > fault_min_calls[k],
              "%s: only %ld calls of the kind %s were seen: is the wrapping linked?", p->name, calls[k],
              fault_kind_names[k]);
    printf("%s (a clean run: %.2f s)\n", p->name, seconds);
    const char *s = getenv("SDX4_FAULTS_STRIDE"), *f = getenv("SDX4_FAULTS_FIRST"),
               *t = getenv("SDX4_FAULTS_SECONDS");
    if (t && atof(t) > 0) budget = 1 + (long)(atof(t) / (seconds > 1e-3 ? seconds : 1e-3));
    for (fault_kind k = 0; k < FAULT_KINDS; k++) {
        if (!((wrapped & swept) >> k & 1)) continue;
        long stride = s && atol(s) > 0 ? atol(s) : budget > 0 && calls[k] > budget ? calls[k] / budget : 1;
        long first = f && atol(f) > 0 ? atol(f) : 1 + (long)(time(NULL) % stride);
        fault_sweep(p, k, stride, first, clean, clean_len);
    }
    free(clean);
}

#endif
