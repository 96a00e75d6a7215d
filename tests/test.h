/*
 * test.h - the tiny test harness of sdx4's ctest programs.
 *
 * CHECK() records a failure and goes on; a program's exit status is the
 * verdict (0 pass, 1 fail, 77 skip for ctest's SKIP_RETURN_CODE). Golden
 * data comes from $SDX4_REFERENCE, else the folder CMake was configured
 * with (../shared/reference beside the checkout).
 */
#ifndef SDX4_TEST_H
#define SDX4_TEST_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "sdx4.h"

static int test_failures, test_checks;

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        test_checks++;                                                       \
        if (!(cond)) {                                                       \
            test_failures++;                                                 \
            fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, \
                    #cond);                                                  \
            fprintf(stderr, __VA_ARGS__);                                    \
            fputc('\n', stderr);                                             \
        }                                                                    \
    } while (0)

static inline const char *test_reference_dir(void) {
    const char *d = getenv("SDX4_REFERENCE");
    if (d && *d) return d;
    return SDX4_REFERENCE_DIR;
}

/* Joins the reference folder and a relative path into a static buffer. */
static inline const char *test_ref(const char *rel) {
    static char buf[4][4096];
    static int next;
    char *b = buf[next++ & 3];
    snprintf(b, sizeof buf[0], "%s/%s", test_reference_dir(), rel);
    return b;
}

/* SDX4_TEST_DEVICE=cuda runs a test's model on the GPU
 * (scripts/device-check.sh); cpu otherwise. */
static inline const char *test_device(void) {
    const char *d = getenv("SDX4_TEST_DEVICE");
    return d && *d ? d : "cpu";
}

/* Whether outputs are held to half precision's tolerance: on cuda in the
 * mode SDX4_CUDA_DTYPE names, fp16 by default. */
static inline int test_in_half_precision(void) {
    const char *dt = getenv("SDX4_CUDA_DTYPE");
    return !strcmp(test_device(), "cuda") && !(dt && !strcmp(dt, "fp32"));
}

/* A test's open options for the folder dir: its device and dtype, 2 threads. */
static inline void test_engine_options(sdx4_engine_options *o, const char *dir) {
    sdx4_engine_options_default(o);
    o->model_dir = dir;
    o->device = test_device();
    o->cuda.dtype = getenv("SDX4_CUDA_DTYPE");
    o->threads = 2;
}

/* max |a - b| over n floats */
static inline double max_abs_diff(const float *a, const float *b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= m)) m = d; /* NaN propagates as a failure */
    }
    return m;
}

/* The CRC-32 of a PNG chunk (its type and data), for tests that build PNG
 * files by hand. */
static inline uint32_t test_png_crc32(const unsigned char *p, size_t n) {
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1)));
    }
    return c ^ 0xffffffffu;
}

/* The backend tests' reproducible random numbers: xorshift64 on a seed of
 * each test's own (`state`), uniform in [lo, hi). */
static inline float test_frand(uint64_t *state, float lo, float hi) {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    return lo + (hi - lo) * (float)((*state >> 40) / (double)(1 << 24));
}

/* n of them, malloc'd. */
static inline float *test_rand_buf(uint64_t *state, int64_t n, float lo, float hi) {
    float *p = (float *)malloc((size_t)n * sizeof *p);
    for (int64_t i = 0; p && i < n; i++) p[i] = test_frand(state, lo, hi);
    return p;
}

/* Opens an engine with `o` and checks that it fails: status `want`, and
 * `needle` in the error (what the option tests expect of a bad setting, or
 * of a good one on a folder that is not there). */
static inline void test_expect_open(const char *what, const sdx4_engine_options *o, sdx4_status want,
                                    const char *needle) {
    sdx4_engine *e = NULL;
    sdx4_status s = sdx4_engine_open(o, &e);
    printf("  %-34s -> %s\n", what, sdx4_last_error());
    CHECK(s == want && e == NULL, "%s: status %s, want %s", what, sdx4_status_name(s), sdx4_status_name(want));
    CHECK(strstr(sdx4_last_error(), needle) != NULL, "%s: message lacks '%s': %s", what, needle,
          sdx4_last_error());
    sdx4_engine_close(e);
}

/* Runs `sdx4 ARGS` ($SDX4_BIN's folder, else the current one) under the
 * environment assignments ENV through the shell, with no $SDX4_MODEL or
 * $SDX4_CPU_DTYPE of the caller's and stdin closed: its exit status (-1
 * when it did not exit) and what it printed, both streams, in `out`. */
static inline int test_run_cli(const char *env, const char *args, char *out, size_t size) {
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "env -u SDX4_MODEL -u SDX4_CPU_DTYPE %s '%s/sdx4' %s 2>&1 </dev/null", env,
             getenv("SDX4_BIN") ? getenv("SDX4_BIN") : ".", args);
    FILE *p = popen(cmd, "r");
    size_t n = p ? fread(out, 1, size - 1, p) : 0;
    out[n] = '\0';
    int status = p ? pclose(p) : -1;
    return status >= 0 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* test_run_cli, checked: exit status `want` and `needle` in its output. */
static inline void test_expect_cli(const char *env, const char *args, int want, const char *needle) {
    char out[8192];
    int status = test_run_cli(env, args, out, sizeof out);
    printf("  %s sdx4 %s -> %d\n", env, args, status);
    CHECK(status == want, "%s sdx4 %s: status %d, want %d: %s", env, args, status, want, out);
    CHECK(strstr(out, needle) != NULL, "%s sdx4 %s: output lacks '%s': %s", env, args, needle, out);
}

/* Whether this CPU has bfloat16 instructions in its flags (/proc/cpuinfo,
 * read apart from oneDNN's own dispatch, which the backend asks). */
static inline int test_cpu_has_bf16(void) {
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[8192];
    int found = 0;
    while (f && !found && fgets(line, sizeof line, f))
        if (!strncmp(line, "flags", 5)) found = strstr(line, " avx512_bf16") || strstr(line, " amx_bf16");
    if (f) fclose(f);
    return found;
}

static inline int test_finish(const char *name) {
    printf("%s: %d checks, %d failed\n", name, test_checks, test_failures);
    return test_failures ? 1 : 0;
}

#endif
