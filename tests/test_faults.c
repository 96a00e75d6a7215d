/*
 * test_faults.c - resource exhaustion over the whole upscale path, as
 * SQLite tests it (its test_malloc.c): fail the Nth allocation, then the
 * Nth file operation, for N = 1, 2, 3, ... until a run meets no injected
 * failure.
 *
 * The path is what the CLI does, through the public API only (sdx4.h and
 * imageio.h): read and decode a PNG, open the model, upscale, write the
 * result to a PNG file, read that back, encode it to memory, then free
 * everything. It runs on the tiny diffusion model of the reference data
 * (2 guided steps on 16 x 16 px) and on two small GANs (SRVGGNetCompact
 * whole, RRDBNet in 2 x 2 tiles), one thread each.
 *
 * Every run with an injected failure must either fail with a message (the
 * engine's sdx4_last_error(), imageio's err buffer) or succeed with the
 * very bytes of the clean run (a failure that is tolerated, not hidden).
 * After every run, failed or not, the blocks alive and the descriptors
 * open must be those from before it: no leak on any error path. The test
 * proves that itself, in the release build too; the ASan build's leak
 * checker checks it again at exit.
 *
 * How faults are injected. The program links with -Wl,--wrap for malloc,
 * calloc, realloc, aligned_alloc, posix_memalign, strdup, strndup and free
 * (CMakeLists.txt), which redirects every call to them from the engine's
 * and imageio's static libraries, and this file, to the __wrap_ functions
 * below. Those count calls, fail the chosen one, and keep the set of live
 * blocks they handed out (a hash set of addresses: a block that a shared
 * library allocated and the engine frees is not ours to count). Jansson's
 * allocations, inside libjansson.so where --wrap cannot reach, come
 * through the same set by json_set_alloc_funcs (counted on their own: they
 * are most of the calls); utf8proc_map, which allocates inside
 * libutf8proc, is wrapped as an allocation. File operations are
 * wrapped the same way: fopen, open, fread, pread, fstat, fwrite, fclose,
 * and jansson's json_load_file (which reads its file inside libjansson).
 *
 * What this does not reach: allocations inside libvips and GLib (g_malloc
 * aborts by GLib's design when memory runs out; there is no error to
 * return), libgomp (the same: gomp_malloc is fatal) and OpenBLAS (its
 * buffer pool is mapped once, at its first call). docs/production/
 * resilience.md says more.
 *
 * Debugging one N: SDX4_FAULTS_CASE=<a prefix of the case's name>
 * (SDX4_FAULTS_KIND=<allocation, jansson or file> for one kind)
 * SDX4_FAULTS_FIRST=N SDX4_FAULTS_STRIDE=<a large number> runs that N
 * alone; SDX4_FAULTS_VERBOSE=1 prints every run's function and message;
 * SDX4_FAULTS_TRAP=1 raises SIGTRAP at the failure, where gdb stops.
 *
 * Time: every N reruns the path from the start, and jansson alone makes
 * 163283 allocations reading the tokenizer's vocabulary. So each sweep
 * (a case and a kind of failure) makes about SDX4_FAULTS_RUNS runs (10 for
 * the diffusion model, 10 times as many for a GAN: 5 s in all on the
 * release build here), every kth N from an N that changes with the
 * time: each run of the suite tries other N, and the summary lines say
 * which (SDX4_FAULTS_FIRST and SDX4_FAULTS_STRIDE repeat them). The
 * sanitizer build runs fewer (CMakeLists.txt). SDX4_FAULTS_RUNS=4000 tries
 * every N but jansson's (docs/production/resilience.md: how long); 0
 * tries every N of every kind (hours).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#include <utf8proc.h>

#include "imageio.h"
#include "sdx4.h"
#include "test.h"

/* ------------------------------------------------------------------------
 * The injector: which call fails, and the live-block set
 * ------------------------------------------------------------------------ */

/* What fails: an allocation of the engine's or imageio's own code, one of
 * jansson's (while it parses or builds JSON for them), or a file operation. */
typedef enum { FAULT_ALLOC, FAULT_JSON, FAULT_FILE } fault_kind;

static struct {
    pthread_mutex_t lock; /* the engine's OpenMP threads allocate too */
    int armed;            /* counting (and failing) only inside a run */
    fault_kind kind;
    long fail_at;         /* the call of `kind` that fails (1-based), 0 none */
    long calls[3];        /* calls of each kind so far in this run */
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
        fprintf(stderr, "test_faults: more than %zu live blocks; raise LIVE_BITS\n", LIVE_SLOTS / 2);
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

/* ------------------------------------------------------------------------
 * File operation wrappers: a failed call looks like a failing disk (EIO)
 * ------------------------------------------------------------------------ */

FILE *__real_fopen(const char *path, const char *mode);
int __real_open(const char *path, int flags, ...);
size_t __real_fread(void *p, size_t size, size_t n, FILE *f);
ssize_t __real_pread(int fd, void *p, size_t n, off_t offset);
int __real_fstat(int fd, struct stat *st);
size_t __real_fwrite(const void *p, size_t size, size_t n, FILE *f);
int __real_fclose(FILE *f);
json_t *__real_json_load_file(const char *path, size_t flags, json_error_t *error);

FILE *__wrap_fopen(const char *path, const char *mode) {
    if (fault_hit(FAULT_FILE, "fopen", __builtin_return_address(0))) return errno = EIO, NULL;
    return __real_fopen(path, mode);
}

int __wrap_open(const char *path, int flags, ...) {
    mode_t mode = 0;
    if (flags & O_CREAT) {
        va_list ap;
        va_start(ap, flags);
        mode = (mode_t)va_arg(ap, int);
        va_end(ap);
    }
    if (fault_hit(FAULT_FILE, "open", __builtin_return_address(0))) return errno = EIO, -1;
    return __real_open(path, flags, mode);
}

/* A failed fread reads nothing and sets the stream's error flag, as a
 * disk's read error does (ferror() tells it from an end of file; glibc
 * keeps the flag in _flags, and stdio has no setter). */
size_t __wrap_fread(void *p, size_t size, size_t n, FILE *f) {
    if (fault_hit(FAULT_FILE, "fread", __builtin_return_address(0))) {
        f->_flags |= _IO_ERR_SEEN;
        return errno = EIO, 0;
    }
    return __real_fread(p, size, n, f);
}

ssize_t __wrap_pread(int fd, void *p, size_t n, off_t offset) {
    if (fault_hit(FAULT_FILE, "pread", __builtin_return_address(0))) return errno = EIO, -1;
    return __real_pread(fd, p, n, offset);
}

int __wrap_fstat(int fd, struct stat *st) {
    if (fault_hit(FAULT_FILE, "fstat", __builtin_return_address(0))) return errno = EIO, -1;
    return __real_fstat(fd, st);
}

size_t __wrap_fwrite(const void *p, size_t size, size_t n, FILE *f) {
    if (fault_hit(FAULT_FILE, "fwrite", __builtin_return_address(0))) {
        f->_flags |= _IO_ERR_SEEN;
        return errno = EIO, 0;
    }
    return __real_fwrite(p, size, n, f);
}

/* A failed fclose still closes (as POSIX has it): only the result lies. */
int __wrap_fclose(FILE *f) {
    int fail = fault_hit(FAULT_FILE, "fclose", __builtin_return_address(0));
    int rc = __real_fclose(f);
    return fail ? (errno = EIO, EOF) : rc;
}

json_t *__wrap_json_load_file(const char *path, size_t flags, json_error_t *error) {
    if (fault_hit(FAULT_FILE, "json_load_file", __builtin_return_address(0))) {
        if (error) {
            memset(error, 0, sizeof *error);
            snprintf(error->text, sizeof error->text, "unable to read %s: %s", path, strerror(EIO));
        }
        return errno = EIO, NULL;
    }
    return __real_json_load_file(path, flags, error);
}

/* ------------------------------------------------------------------------
 * The path: file -> image -> engine -> upscale -> PNG file
 * ------------------------------------------------------------------------ */

typedef struct {
    const char *name;
    char model_dir[4096];
    char input[4096];
    int steps, tile;   /* tile: a GAN's tiles in input pixels (0 whole) */
    float guidance;
} path_case;

static char out_path[4096];

/* Runs the path once. 0 with the PNG's bytes in *png, or -1 with the
 * message in err. Everything it made is freed either way. */
static int run_path(const path_case *c, void **png, size_t *png_len, char *err, size_t errlen) {
    sdx4_image in = {0}, out = {0};
    sdx4_engine *e = NULL;
    int rc = -1;
    err[0] = 0;
    *png = NULL;
    if (imageio_read_file(c->input, &in, err, errlen)) goto done;
    sdx4_engine_options o;
    sdx4_engine_options_default(&o);
    o.model_dir = c->model_dir;
    o.device = "cpu";
    o.threads = 1; /* one order of calls: a failing N reproduces */
    if (sdx4_engine_open(&o, &e) != SDX4_OK) {
        snprintf(err, errlen, "%s", sdx4_last_error());
        goto done;
    }
    sdx4_upscale_params p;
    sdx4_upscale_params_default(&p);
    p.prompt = "a white cat";
    p.num_inference_steps = c->steps;
    p.guidance_scale = c->guidance;
    p.tile = c->tile;
    if (c->tile) p.tile_overlap = 8;
    if (sdx4_upscale(e, &in, &p, &out, NULL) != SDX4_OK) {
        snprintf(err, errlen, "%s", sdx4_last_error());
        goto done;
    }
    if (imageio_write_file(&out, out_path, 0, err, errlen)) goto done;
    sdx4_image back = {0};
    if (imageio_read_file(out_path, &back, err, errlen)) goto done;
    sdx4_image_free(&back);
    if (imageio_encode(&out, IMAGE_PNG, 0, png, png_len, err, errlen)) goto done;
    rc = 0;
done:
    sdx4_image_free(&out);
    sdx4_engine_close(e);
    sdx4_image_free(&in);
    return rc;
}

static int open_descriptors(void) {
    DIR *d = opendir("/proc/self/fd");
    int n = 0;
    if (!d) return -1;
    while (readdir(d)) n++;
    closedir(d);
    return n;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static const char *const kind_names[] = {"allocation", "jansson allocation", "file operation"};

/* Runs the path with the Nth call of `kind` failing (0: none); the run's
 * call counts stay in fault.calls. */
static int run_armed(const path_case *c, fault_kind kind, long n, void **png, size_t *png_len, char *err,
                     size_t errlen) {
    fault.kind = kind;
    fault.fail_at = n;
    memset(fault.calls, 0, sizeof fault.calls);
    fault.injected = NULL;
    fault.armed = 1;
    int rc = run_path(c, png, png_len, err, errlen);
    fault.armed = 0;
    return rc;
}

/* Fails the Nth call of `kind` for N = first, first + stride, ... until a
 * run meets no failure; checks each run as the top of the file says. */
static void sweep(const path_case *c, fault_kind kind, long stride, long first, const void *clean,
                  size_t clean_len) {
    const char *what = kind_names[kind];
    long runs = 0, failed = 0, tolerated = 0, n;
    static void *sites[8192]; /* the distinct call sites failed */
    int nsites = 0;
    double t0 = now();
    for (n = first;; n += stride) {
        long live_before = fault.live;
        int fds_before = open_descriptors();
        void *png = NULL;
        size_t png_len = 0;
        char err[1024];
        int rc = run_armed(c, kind, n, &png, &png_len, err, sizeof err);
        runs++;
        if (!fault.injected) {
            CHECK(rc == 0, "%s: no %s failed at N=%ld, yet: %s", c->name, what, n, err);
            CHECK(rc || (png_len == clean_len && !memcmp(png, clean, clean_len)),
                  "%s: the run past the last %s gave another image", c->name, what);
        } else if (rc) {
            failed++;
            CHECK(err[0] != 0, "%s: %s %ld (%s) failed with no message", c->name, what, n, fault.injected);
        } else {
            tolerated++;
            CHECK(png_len == clean_len && !memcmp(png, clean, clean_len),
                  "%s: %s %ld (%s) failed, the run succeeded with another image", c->name, what, n,
                  fault.injected);
        }
        free(png);
        int seen = 0;
        for (int i = 0; i < nsites && !seen; i++) seen = sites[i] == fault.site;
        if (fault.injected && !seen && nsites < (int)(sizeof sites / sizeof *sites)) sites[nsites++] = fault.site;
        CHECK(fault.live == live_before, "%s: %s %ld (%s) failed: %ld blocks leaked (%s)", c->name, what, n,
              fault.injected, fault.live - live_before, err);
        CHECK(open_descriptors() == fds_before, "%s: %s %ld (%s) failed: %d descriptors leaked (%s)", c->name,
              what, n, fault.injected, open_descriptors() - fds_before, err);
        if (getenv("SDX4_FAULTS_VERBOSE"))
            fprintf(stderr, "%s %s %ld (%s): %s\n", c->name, what, n, fault.injected, rc ? err : "ok");
        if (!fault.injected) break;
    }
    printf("  %-19s %7ld per run, N = %ld..%ld step %ld: %ld runs, %ld failed with a message, "
           "%ld succeeded with the clean bytes, %d call sites (%.1f s)\n",
           what, fault.calls[kind], first, n, stride, runs, failed, tolerated, nsites, now() - t0);
}

/* The sweeps of one case. Without SDX4_FAULTS_STRIDE, a kind with more
 * calls than `budget` is strided to about that many runs, from an N that
 * changes with the time (printed: SDX4_FAULTS_FIRST repeats it); 0 is no
 * budget (every N). */
static void run_case(const path_case *c, long budget) {
    void *clean = NULL;
    size_t clean_len = 0;
    char err[1024];
    /* twice: the second run must leave nothing behind either (one-time
     * initialisation happened in the first); it counts the calls */
    int rc = run_path(c, &clean, &clean_len, err, sizeof err);
    free(clean);
    long live_before = fault.live;
    if (!rc) rc = run_armed(c, FAULT_ALLOC, 0, &clean, &clean_len, err, sizeof err);
    CHECK(rc == 0, "%s: the clean run: %s", c->name, err);
    if (rc) return;
    CHECK(fault.live == live_before + 1, "%s: the clean run leaves %ld blocks besides its PNG", c->name,
          fault.live - live_before - 1);
    long calls[3];
    memcpy(calls, fault.calls, sizeof calls);
    CHECK(calls[FAULT_ALLOC] > 50 && calls[FAULT_JSON] > 10 && calls[FAULT_FILE] > 10,
          "%s: only %ld allocations, %ld of jansson's and %ld file operations were seen: is the wrapping "
          "linked?", c->name, calls[FAULT_ALLOC], calls[FAULT_JSON], calls[FAULT_FILE]);
    printf("%s\n", c->name);
    const char *s = getenv("SDX4_FAULTS_STRIDE"), *f = getenv("SDX4_FAULTS_FIRST");
    const char *only = getenv("SDX4_FAULTS_KIND"); /* a developer's focus: allocation, jansson, file */
    for (fault_kind k = FAULT_ALLOC; k <= FAULT_FILE; k++) {
        if (only && strncmp(kind_names[k], only, strlen(only))) continue;
        long stride = s && atol(s) > 0 ? atol(s) : budget > 0 && calls[k] > budget ? calls[k] / budget : 1;
        long first = f && atol(f) > 0 ? atol(f) : 1 + (long)(time(NULL) % stride);
        sweep(c, k, stride, first, clean, clean_len);
    }
    free(clean);
}

/* A width x height PNG of a pattern, at path (of pathlen) in tmp. */
static int write_input(char *path, size_t pathlen, const char *tmp, const char *what, int width, int height) {
    snprintf(path, pathlen, "%s/sdx4-test-faults-%d-%s.png", tmp, (int)getpid(), what);
    sdx4_image img = {width, height, malloc((size_t)3 * width * height)};
    char err[1024];
    for (int i = 0; img.pixels && i < 3 * width * height; i++) img.pixels[i] = (uint8_t)(i * 37 % 253);
    int rc = !img.pixels || imageio_write_file(&img, path, 0, err, sizeof err);
    if (rc) fprintf(stderr, "%s: %s\n", path, img.pixels ? err : "out of memory");
    sdx4_image_free(&img);
    return rc;
}

int main(int argc, char **argv) {
    (void)argc;
    json_set_alloc_funcs(json_malloc_counted, json_free_counted);
    fault.trap = getenv("SDX4_FAULTS_TRAP") && atoi(getenv("SDX4_FAULTS_TRAP"));
    if (imageio_init(argv[0])) return 1;
    /* about this many runs per sweep of the diffusion model (SDX4_FAULTS_RUNS,
     * default 10; 0: every N); a GAN's run costs a tenth of one, so a GAN's
     * sweeps get 10 times as many */
    const char *r = getenv("SDX4_FAULTS_RUNS");
    long budget = r && *r ? atol(r) : 10;
    const char *tmp = getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(out_path, sizeof out_path, "%s/sdx4-test-faults-%d.png", tmp, (int)getpid());

    path_case cases[3] = {
        {.name = "diffusion (tiny model, 2 guided steps, 16 x 16 px)", .steps = 2, .guidance = 6.0f},
        {.name = "gan (srvgg_x4_prelu, whole, 16 x 12 px)", .steps = 1},
        {.name = "gan (rrdb_x2, 2 x 2 tiles of 32 px, 40 x 36 px)", .steps = 1, .tile = 32},
    };
    snprintf(cases[0].model_dir, sizeof cases[0].model_dir, "%s", test_ref("tiny/model"));
    snprintf(cases[1].model_dir, sizeof cases[1].model_dir, "%s", SDX4_SOURCE_DIR "/tests/data/gan/srvgg_x4_prelu");
    snprintf(cases[1].input, sizeof cases[1].input, "%s/input.png", cases[1].model_dir);
    snprintf(cases[2].model_dir, sizeof cases[2].model_dir, "%s", SDX4_SOURCE_DIR "/tests/data/gan/rrdb_x2");
    /* the diffusion input small (the UNet's cost), the tiled GAN's larger
     * than the GANs' test images */
    if (write_input(cases[0].input, sizeof cases[0].input, tmp, "small", 16, 16) ||
        write_input(cases[2].input, sizeof cases[2].input, tmp, "tiled", 40, 36))
        return 1;

    const char *only = getenv("SDX4_FAULTS_CASE"); /* a developer's focus: a prefix of a name */
    for (int i = 0; i < 3; i++)
        if (!only || !strncmp(cases[i].name, only, strlen(only))) run_case(&cases[i], budget * (i ? 10 : 1));
    unlink(out_path);
    unlink(cases[0].input);
    unlink(cases[2].input);
    imageio_shutdown();
    return test_finish("test_faults");
}
