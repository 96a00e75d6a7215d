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
 * of faults.h (the injector and the sweep, which test_faults_cuda.c shares).
 * Those count calls, fail the chosen one, and keep the set of live
 * blocks they handed out (a hash set of addresses: a block that a shared
 * library allocated and the engine frees is not ours to count). Jansson's
 * allocations, inside libjansson.so where --wrap cannot reach, come
 * through the same set by json_set_alloc_funcs (counted on their own: they
 * are most of the calls); utf8proc_map, which allocates inside
 * libutf8proc, is wrapped as an allocation. File operations are
 * wrapped the same way, below: fopen, open, fread, pread, fstat, fwrite,
 * fclose, and jansson's json_load_file (which reads its file inside
 * libjansson).
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
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "faults.h"
#include "imageio.h"
#include "sdx4.h"
#include "test.h"

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
    fault_model m;
    char input[4096];
} path_case;

static char out_path[4096];

/* Runs the path once (a fault_path's run): 0 with the PNG's bytes in
 * *png, or -1 with the message in err. Everything it made is freed either
 * way. */
static int run_path(const void *ctx, void **png, size_t *png_len, char *err, size_t errlen) {
    const path_case *c = ctx;
    sdx4_image in = {0}, out = {0};
    int rc = -1;
    if (imageio_read_file(c->input, &in, err, errlen) || fault_upscale(&c->m, "cpu", &in, &out, err, errlen) ||
        imageio_write_file(&out, out_path, 0, err, errlen))
        goto done;
    sdx4_image back = {0};
    if (imageio_read_file(out_path, &back, err, errlen)) goto done;
    sdx4_image_free(&back);
    if (imageio_encode(&out, IMAGE_PNG, 0, png, png_len, err, errlen)) goto done;
    rc = 0;
done:
    sdx4_image_free(&out);
    sdx4_image_free(&in);
    return rc;
}

/* A failure tolerated must give the clean run's very bytes. */
static int same_bytes(const void *clean, size_t clean_len, const void *png, size_t png_len, char *why,
                      size_t whylen) {
    if (png_len == clean_len && !memcmp(png, clean, clean_len)) return 1;
    snprintf(why, whylen, "a PNG of %zu bytes unlike the clean run's %zu", png_len, clean_len);
    return 0;
}

/* A width x height PNG of faults.h's pattern, at path (of pathlen) in tmp. */
static int write_input(char *path, size_t pathlen, const char *tmp, const char *what, int width, int height) {
    snprintf(path, pathlen, "%s/sdx4-test-faults-%d-%s.png", tmp, (int)getpid(), what);
    sdx4_image img = {width, height, NULL};
    char err[1024];
    int rc = fault_pattern(&img) || imageio_write_file(&img, path, 0, err, sizeof err);
    if (rc) fprintf(stderr, "%s: %s\n", path, img.pixels ? err : "out of memory");
    sdx4_image_free(&img);
    return rc;
}

int main(int argc, char **argv) {
    (void)argc;
    fault_init();
    if (imageio_init(argv[0])) return 1;
    /* about this many runs per sweep of the diffusion model; a GAN's run
     * costs a tenth of one, so a GAN's sweeps get 10 times as many */
    long budget = fault_budget();
    const char *tmp = getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(out_path, sizeof out_path, "%s/sdx4-test-faults-%d.png", tmp, (int)getpid());

    path_case cases[3];
    fault_models(&cases[0].m, &cases[1].m, &cases[2].m, 2);
    static const char *const names[3] = {
        "diffusion (tiny model, 2 guided steps, 16 x 16 px)",
        "gan (srvgg_x4_prelu, whole, 16 x 12 px)",
        "gan (rrdb_x2, 2 x 2 tiles of 32 px, 40 x 36 px)",
    };
    snprintf(cases[1].input, sizeof cases[1].input, "%s/input.png", cases[1].m.model_dir);
    /* the diffusion input small (the UNet's cost), the tiled GAN's larger
     * than the GANs' test images */
    if (write_input(cases[0].input, sizeof cases[0].input, tmp, "small", 16, 16) ||
        write_input(cases[2].input, sizeof cases[2].input, tmp, "tiled", 40, 36))
        return 1;

    const unsigned kinds = 1u << FAULT_ALLOC | 1u << FAULT_JSON | 1u << FAULT_FILE;
    for (int i = 0; i < 3; i++) {
        fault_path path = {names[i], run_path, &cases[i], same_bytes, fault_count_host};
        fault_run_case(&path, kinds, kinds, budget * (i ? 10 : 1));
    }
    unlink(out_path);
    unlink(cases[0].input);
    unlink(cases[2].input);
    imageio_shutdown();
    return test_finish("test_faults");
}
