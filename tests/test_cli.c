/*
 * test_cli.c - the `sdx4` program, run as a user runs it.
 *
 * Every case starts the built binary ($SDX4_BIN/sdx4) with posix_spawn,
 * its stdout and stderr on pipes and stdin on /dev/null, and checks the
 * exit status and what it printed: help and version (0), bad usage (2 and
 * a message naming the option), runtime failures (1 and "sdx4: ..." naming
 * the file), `compare` (as text and JSON, identical images, different
 * sizes), a GAN's `upscale`, `info` and `convert` (tests/data/gan), and
 * with the reference model: `info`, `info --json`, `bench`,
 * `make-model`, an `upscale` of every golden pipeline case compared with
 * diffusers' PNG, the tiled UNet's options (--tile 0, or a tile as large
 * as the image, is the untiled file; a smaller one changes it), and Ctrl-C
 * during an upscale (130, "canceled", no file). --metadata, with a GAN
 * and with the reference model: the parameters in the file and the
 * input's ICC profile kept, read back with libvips; without it, the bytes
 * of a plain run.
 * SDX4_MODEL is removed from every child's environment unless a case sets
 * it, so the caller's shell does not change the results.
 *
 * ctest runs the cases in parts, a test each (see `parts` at the end).
 *
 * Under a sanitizer build the children are instrumented too: any report
 * on a child's stderr (a leak on an error path, undefined behaviour) fails
 * the test.
 */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <jansson.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <vips/vips.h>

#include "imageio.h"
#include "sdx4.h"
#include "test.h"

extern char **environ;

enum { PATH_LEN = 4096 }; /* of the folders the test is given */

static char sdx4_bin[PATH_LEN + 8];

/* ------------------------------------------------------------------------
 * Running the binary
 * ------------------------------------------------------------------------ */

typedef struct {
    pid_t pid;
    int fd[2];       /* read ends of the child's stdout and stderr */
    char *text[2];   /* what was read from each, NUL-terminated */
    size_t len[2];
} child;

typedef struct {
    int status;      /* exit status, 128 + signal if killed, -1 on timeout */
    char *out, *err; /* owned; free with result_free() */
} result;

static void result_free(result *r) {
    free(r->out);
    free(r->err);
}

/* The caller's environment without SDX4_MODEL, plus `model_env` if set. */
static char **child_environment(const char *model_env) {
    size_t n = 0;
    while (environ[n]) n++;
    char **env = calloc(n + 2, sizeof *env);
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (strncmp(environ[i], "SDX4_MODEL=", 11)) env[k++] = environ[i];
    if (model_env) {
        static char buf[4096];
        snprintf(buf, sizeof buf, "SDX4_MODEL=%s", model_env);
        env[k++] = buf;
    }
    return env;
}

/* Starts `sdx4 args...` (args ends with NULL). */
static int spawn(child *c, const char *const *args, const char *model_env) {
    for (int i = 0; i < 2; i++) {
        c->text[i] = calloc(1, 1);
        c->len[i] = 0;
    }
    int out[2], err[2];
    if (pipe2(out, O_CLOEXEC)) return -1;
    if (pipe2(err, O_CLOEXEC)) {
        close(out[0]);
        close(out[1]);
        return -1;
    }
    const char *argv[64] = {sdx4_bin};
    int argc = 1;
    while (args[argc - 1] && argc < 63) {
        argv[argc] = args[argc - 1];
        argc++;
    }
    argv[argc] = NULL;

    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&actions, out[1], 1);
    posix_spawn_file_actions_adddup2(&actions, err[1], 2);
    char **env = child_environment(model_env);
    int rc = posix_spawn(&c->pid, sdx4_bin, &actions, NULL,
                         (char *const *)argv, env);
    free(env);
    posix_spawn_file_actions_destroy(&actions);
    close(out[1]);
    close(err[1]);
    c->fd[0] = out[0];
    c->fd[1] = err[0];
    if (rc != 0) {
        close(out[0]);
        close(err[0]);
        c->fd[0] = c->fd[1] = -1;
        c->pid = -1;
        return -1;
    }
    return 0;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Reads the child's output until both pipes close, or until stderr
 * contains `until` (if not NULL). Returns 0, or -1 past the deadline. */
static int pump(child *c, const char *until, double deadline) {
    while (c->fd[0] >= 0 || c->fd[1] >= 0) {
        if (until && strstr(c->text[1], until)) return 0;
        struct pollfd p[2];
        for (int i = 0; i < 2; i++) p[i] = (struct pollfd){c->fd[i], POLLIN, 0};
        int wait_ms = (int)((deadline - now()) * 1000);
        if (wait_ms <= 0) return -1;
        if (poll(p, 2, wait_ms) < 0 && errno != EINTR) return -1;
        for (int i = 0; i < 2; i++) {
            if (c->fd[i] < 0 || !(p[i].revents & (POLLIN | POLLHUP))) continue;
            char buf[4096];
            ssize_t n = read(c->fd[i], buf, sizeof buf);
            if (n <= 0) {
                close(c->fd[i]);
                c->fd[i] = -1;
                continue;
            }
            c->text[i] = realloc(c->text[i], c->len[i] + n + 1);
            memcpy(c->text[i] + c->len[i], buf, n);
            c->len[i] += n;
            c->text[i][c->len[i]] = '\0';
        }
    }
    return until && !strstr(c->text[1], until) ? -1 : 0;
}

/* Reads everything, reaps the child and hands its output over. */
static result finish(child *c, double deadline) {
    result r = {-1, NULL, NULL};
    int timed_out = pump(c, NULL, deadline) != 0;
    if (timed_out && c->pid > 0) kill(c->pid, SIGKILL);
    for (int i = 0; i < 2; i++)
        if (c->fd[i] >= 0) close(c->fd[i]);
    int wstatus;
    if (c->pid > 0 && waitpid(c->pid, &wstatus, 0) == c->pid && !timed_out)
        r.status = WIFEXITED(wstatus) ? WEXITSTATUS(wstatus)
                                      : 128 + WTERMSIG(wstatus);
    r.out = c->text[0];
    r.err = c->text[1];
    /* A sanitizer's report can hide behind an expected exit status 1. */
    CHECK(!strstr(r.err, "Sanitizer") && !strstr(r.err, "runtime error:"),
          "sanitizer report: %s", r.err);
    return r;
}

enum { RUN_SECONDS = 600 };

static result run_env(const char *model_env, const char *const *args) {
    child c;
    if (spawn(&c, args, model_env) != 0) {
        result r = {-1, c.text[0], c.text[1]};
        return r;
    }
    return finish(&c, now() + RUN_SECONDS);
}

#define RUN(...) run_env(NULL, (const char *const[]){__VA_ARGS__, NULL})
#define RUN_WITH_MODEL(m, ...) \
    run_env(m, (const char *const[]){__VA_ARGS__, NULL})

/* ------------------------------------------------------------------------
 * Cases that need no model
 * ------------------------------------------------------------------------ */

static void test_help_and_version(void) {
    result r = RUN("--help");
    CHECK(r.status == 0, "--help: exit %d", r.status);
    CHECK(strstr(r.out, "upscale") && strstr(r.out, "serve"),
          "--help lists the commands: %s", r.out);
    result_free(&r);

    r = RUN("--version");
    CHECK(r.status == 0, "--version: exit %d", r.status);
    CHECK(strstr(r.out, SDX4_VERSION) != NULL, "--version: %s", r.out);
    result_free(&r);

    const char *commands[] = {"upscale", "info", "make-model", "bench"};
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        char usage[64];
        snprintf(usage, sizeof usage, "Usage: sdx4 %s", commands[i]);
        r = RUN(commands[i], "--help");
        CHECK(r.status == 0, "%s --help: exit %d", commands[i], r.status);
        CHECK(strstr(r.out, usage) != NULL, "%s --help: %s", commands[i],
              r.out);
        result_free(&r);
    }

    r = run_env(NULL, (const char *const[]){NULL});
    CHECK(r.status == 2, "no command: exit %d", r.status);
    CHECK(strstr(r.err, "Usage") != NULL, "no command: %s", r.err);
    result_free(&r);
}

/* Each must exit 2, print nothing on stdout and name `needle` on stderr. */
static void test_usage_errors(void) {
    static const struct {
        const char *needle;
        const char *args[12];
    } cases[] = {
        {"frobnicate", {"frobnicate"}},
        {"--frobnicate", {"--frobnicate"}},
        {"--bogus", {"upscale", "--model", "m", "--bogus", "a.png", "b.png"}},
        {"IN OUT", {"upscale", "--model", "m"}},
        {"IN OUT", {"upscale", "--model", "m", "a.png"}},
        {"'c.png'", {"upscale", "--model", "m", "a.png", "b.png", "c.png"}},
        {"--model", {"upscale", "a.png", "b.png"}},
        {"--model", {"upscale", "a.png", "b.png", "--model"}},
        {"vae_tiling sideways: expected off, on or auto",
         {"upscale", "--model", "m", "--vae-tiling", "sideways", "a.png", "b.png"}},
        {"tile 16 is outside 32..2048",
         {"upscale", "--model", "m", "--tile", "16", "a.png", "b.png"}},
        {"tile_overlap 96 must be smaller than tile 64",
         {"upscale", "--model", "m", "--tile", "64", "--tile-overlap", "96", "a.png", "b.png"}},
        {"--noise-level",
         {"upscale", "--model", "m", "--noise-level", "1.5", "a.png", "b.png"}},
        {"--noise-level",
         {"upscale", "--model", "m", "--noise-level", "nan", "a.png", "b.png"}},
        {"--noise-level",
         {"upscale", "--model", "m", "--noise-level=-0.1", "a.png", "b.png"}},
        {"--steps",
         {"upscale", "--model", "m", "--steps", "0", "a.png", "b.png"}},
        {"--steps",
         {"upscale", "--model", "m", "--steps", "abc", "a.png", "b.png"}},
        {"--steps",
         {"upscale", "--model", "m", "--steps", "5x", "a.png", "b.png"}},
        {"--steps",
         {"upscale", "--model", "m", "--steps", "99999999999999999999",
          "a.png", "b.png"}},
        {"--guidance",
         {"upscale", "--model", "m", "--guidance", "inf", "a.png", "b.png"}},
        {"--guidance",
         {"upscale", "--model", "m", "--guidance", "1e999", "a.png", "b.png"}},
        {"--seed",
         {"upscale", "--model", "m", "--seed", "-1", "a.png", "b.png"}},
        {"--seed",
         {"upscale", "--model", "m", "--seed", "18446744073709551616",
          "a.png", "b.png"}},
        {"--eta", {"upscale", "--model", "m", "--eta", "2", "a.png", "b.png"}},
        {"--device",
         {"upscale", "--model", "m", "--device", "gpu", "a.png", "b.png"}},
        {"--quality",
         {"upscale", "--model", "m", "--quality", "0", "a.png", "b.png"}},
        {"--threads",
         {"upscale", "--model", "m", "--threads", "-2", "a.png", "b.png"}},
        {"b.bmp", {"upscale", "--model", "m", "a.png", "b.bmp"}},
        {"DIR", {"info"}},
        {"--json", {"info", "--json=yes", "dir"}},
        {"--config", {"make-model", "out"}},
        {"--dtype", {"make-model", "--config", "c", "--dtype", "bf16", "out"}},
        {"--seed", {"make-model", "--config", "c", "--seed", "x", "out"}},
        {"--model", {"bench"}},
        {"--size", {"bench", "--model", "m", "--size", "0"}},
        {"--repeats", {"bench", "--model", "m", "--repeats", "0"}},
        {"'extra'", {"bench", "--model", "m", "extra"}},
        {"scheduler lcm", {"bench", "--model", "m", "--scheduler", "lcm"}},
        {"'nokey'", {"bench", "--model", "m", "--scheduler-option", "nokey"}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        result r = run_env(NULL, cases[i].args);
        CHECK(r.status == 2, "case %zu (%s): exit %d, stderr: %s", i,
              cases[i].needle, r.status, r.err);
        CHECK(strstr(r.err, cases[i].needle) != NULL,
              "case %zu: stderr does not name %s: %s", i, cases[i].needle,
              r.err);
        CHECK(r.out[0] == '\0', "case %zu: stdout: %s", i, r.out);
        result_free(&r);
    }
}

/* The options of the engine's parameters and the rows they take their
 * ranges from. */
static const struct {
    const char *option, *param;
} param_flags[] = {
    {"--steps", "num_inference_steps"}, {"--guidance", "guidance_scale"},
    {"--noise-level", "noise_level"},   {"--seed", "seed"},
    {"--eta", "eta"},                   {"--tile", "tile"},
    {"--tile-overlap", "tile_overlap"},
};

/* A bound of a row as text, moved `past` steps outward (0: the bound). */
static void bound_text(char *buf, size_t size, const sdx4_param *p, int upper,
                       int past) {
    if (p->type == SDX4_PARAM_REAL) {
        double v = upper ? p->real_max : p->real_min;
        for (int i = 0; i < past; i++)
            v = nextafter(v, upper ? INFINITY : -INFINITY);
        snprintf(buf, size, "%.17g", v);
    } else if (upper && past) { /* past the top of int64: print it unsigned */
        snprintf(buf, size, "%llu", (unsigned long long)p->int_max + 1);
    } else {
        snprintf(buf, size, "%lld",
                 (long long)(upper ? p->int_max : p->int_min - past));
    }
}

/* The CLI's ranges are the engine's table: each bound passes the option
 * parser (the run then fails reading the missing input, exit 1) and the
 * next value outward is refused before anything is read (exit 2, naming
 * the option); --help prints the table's ranges and defaults. */
static void test_param_ranges(const char *tmp) {
    char missing_image[PATH_LEN + 64], out[PATH_LEN + 64];
    snprintf(missing_image, sizeof missing_image, "%s/no-such-image.png", tmp);
    snprintf(out, sizeof out, "%s/never-written.png", tmp);
    result help = RUN("upscale", "--help");
    for (size_t i = 0; i < sizeof param_flags / sizeof param_flags[0]; i++) {
        const char *option = param_flags[i].option;
        const sdx4_param *p = sdx4_param_find(param_flags[i].param);
        CHECK(p != NULL, "no row %s", param_flags[i].param);
        if (!p) continue;
        for (int upper = 0; upper < 2; upper++) {
            char value[64];
            bound_text(value, sizeof value, p, upper, 0);
            result r = RUN("upscale", "--model", "m", option, value,
                           missing_image, out);
            CHECK(r.status == 1 && strstr(r.err, missing_image),
                  "%s %s: exit %d, stderr: %s", option, value, r.status, r.err);
            result_free(&r);
            bound_text(value, sizeof value, p, upper, 1);
            r = RUN("upscale", "--model", "m", option, value, missing_image,
                    out);
            CHECK(r.status == 2 && strstr(r.err, option),
                  "%s %s: exit %d, stderr: %s", option, value, r.status, r.err);
            result_free(&r);
        }
        char range[128];
        if (p->type == SDX4_PARAM_REAL)
            snprintf(range, sizeof range, "%g..%g (default: %g)", p->real_min,
                     p->real_max, p->real_default);
        else if (p->type == SDX4_PARAM_INT)
            snprintf(range, sizeof range, "%lld..%lld (default: %lld)",
                     (long long)p->int_min, (long long)p->int_max,
                     (long long)p->int_default);
        else
            snprintf(range, sizeof range, "%lld..%lld", (long long)p->int_min,
                     (long long)p->int_max);
        const char *line = strstr(help.out, option);
        const char *next = line ? strstr(line, "\n  --") : NULL;
        const char *found = line ? strstr(line, range) : NULL;
        CHECK(found && (!next || found < next), "--help: %s lacks '%s': %s",
              option, range, help.out);
    }
    result_free(&help);

    char threads[32];
    snprintf(threads, sizeof threads, "%d", SDX4_MAX_THREADS + 1);
    result r = RUN("upscale", "--model", "m", "--threads", threads,
                   missing_image, out);
    CHECK(r.status == 2 && strstr(r.err, "--threads"),
          "--threads %s: exit %d, stderr: %s", threads, r.status, r.err);
    result_free(&r);
}

/* A value out of range is refused before the model is looked at: with an
 * input that exists and a model that does not, the error is about the
 * value. */
static void test_fails_before_the_model(const char *tmp) {
    const char *input = test_ref("small/golden/pipe0_input.png");
    if (access(input, R_OK) != 0) return;
    char missing_model[PATH_LEN + 64], out[PATH_LEN + 64];
    snprintf(missing_model, sizeof missing_model, "%s/no-such-model", tmp);
    snprintf(out, sizeof out, "%s/never-written.png", tmp);
    result r = RUN("upscale", "--model", missing_model, "--guidance", "200",
                   input, out);
    CHECK(r.status == 2, "--guidance 200: exit %d, stderr: %s", r.status,
          r.err);
    CHECK(strstr(r.err, "--guidance") && !strstr(r.err, missing_model),
          "--guidance 200: stderr: %s", r.err);
    result_free(&r);
    r = RUN("upscale", "--model", missing_model, "--tile", "48", "--tile-overlap", "48", input, out);
    CHECK(r.status == 2 && strstr(r.err, "tile_overlap 48 must be smaller than tile 48") &&
              !strstr(r.err, missing_model),
          "--tile-overlap 48: exit %d, stderr: %s", r.status, r.err);
    result_free(&r);

    /* an input past the engine's limit: said before the model is looked at */
    char large[PATH_LEN + 64], err[256];
    snprintf(large, sizeof large, "%s/too-large.png", tmp);
    sdx4_image wide = {SDX4_MAX_INPUT_SIDE + 1, 8, calloc((size_t)(SDX4_MAX_INPUT_SIDE + 1) * 8 * 3, 1)};
    CHECK(imageio_write_file(&wide, large, 0, err, sizeof err) == 0, "%s: %s", large, err);
    sdx4_image_free(&wide);
    r = RUN("upscale", "--model", missing_model, large, out);
    CHECK(r.status == 1 && strstr(r.err, "2049x8 is too large: sdx4 upscales at most 2048 pixels a side") &&
              !strstr(r.err, missing_model),
          "2049 px: exit %d, stderr: %s", r.status, r.err);
    CHECK(access(out, F_OK) != 0, "%s was written", out);
    result_free(&r);
}

/* `compare`: a golden pair's numbers as text, identical images (inf, and
 * null in JSON), images of different sizes (1, both sizes named), usage. */
static void test_compare(const char *tmp) {
    const char *a = SDX4_SOURCE_DIR "/tests/data/quality/noise_31x17_a.png";
    const char *b = SDX4_SOURCE_DIR "/tests/data/quality/noise_31x17_b.png";
    result r = RUN("compare", a, b);
    CHECK(r.status == 0 && strstr(r.out, "psnr 26.675 dB  ssim 0.9678\n"), "compare: exit %d, %s%s", r.status,
          r.out, r.err);
    result_free(&r);

    char same[PATH_LEN + 64], tall[PATH_LEN + 64], err[256];
    snprintf(same, sizeof same, "%s/same.png", tmp);
    snprintf(tall, sizeof tall, "%s/tall.png", tmp);
    sdx4_image im = {16, 12, calloc(16 * 12 * 3, 1)};
    CHECK(imageio_write_file(&im, same, 0, err, sizeof err) == 0, "%s: %s", same, err);
    im.width = 12, im.height = 16;
    CHECK(imageio_write_file(&im, tall, 0, err, sizeof err) == 0, "%s: %s", tall, err);
    sdx4_image_free(&im);
    r = RUN("compare", same, same);
    CHECK(r.status == 0 && strstr(r.out, "psnr inf dB  ssim 1.0000\n"), "compare identical: exit %d, %s%s",
          r.status, r.out, r.err);
    result_free(&r);
    r = RUN("compare", "--json", same, same);
    json_t *q = json_loads(r.out, 0, NULL);
    CHECK(r.status == 0 && json_is_null(json_object_get(q, "psnr")) &&
              json_real_value(json_object_get(q, "ssim")) == 1.0 &&
              json_array_size(json_object_get(q, "ssim_channel")) == 3,
          "compare --json identical: exit %d, %s%s", r.status, r.out, r.err);
    json_decref(q);
    result_free(&r);
    r = RUN("compare", same, tall);
    CHECK(r.status == 1 && strstr(r.err, "the images differ in size: 16x12 and 12x16") && !r.out[0],
          "compare sizes: exit %d, %s%s", r.status, r.out, r.err);
    result_free(&r);
    r = RUN("compare", same);
    CHECK(r.status == 2 && strstr(r.err, "A B"), "compare one file: exit %d, %s", r.status, r.err);
    result_free(&r);
}

/* A runtime failure: exit 1, one "sdx4: ..." message naming `needle`. */

static void check_runtime_error(result *r, const char *what,
                                const char *needle) {
    CHECK(r->status == 1, "%s: exit %d, stderr: %s", what, r->status, r->err);
    CHECK(!strncmp(r->err, "sdx4: ", 6), "%s: stderr: %s", what, r->err);
    CHECK(strstr(r->err, needle) != NULL, "%s: stderr does not name %s: %s",
          what, needle, r->err);
    result_free(r);
}

/* A GAN's folder (tests/data/gan): `upscale` without a prompt gives
 * PyTorch's PNG and names the architecture, `info` says kind gan,
 * `convert` writes a folder that upscales alike and refuses a pickle. */
static void test_gan(const char *tmp) {
    const char *dir = SDX4_SOURCE_DIR "/tests/data/gan/rrdb_x4";
    char out[PATH_LEN + 64], converted[PATH_LEN + 64], pth[PATH_LEN + 64], err[256];
    snprintf(out, sizeof out, "%s/gan.png", tmp);
    result r = RUN("upscale", "--model", dir, SDX4_SOURCE_DIR "/tests/data/gan/rrdb_x4/input.png", out);
    CHECK(r.status == 0 && strstr(r.err, "64x48 in") && strstr(r.err, "RRDBNet") && !strstr(r.err, "seed:"),
          "upscale with a GAN: exit %d, %s", r.status, r.err);
    result_free(&r);
    sdx4_image got = {0}, want = {0};
    CHECK(!imageio_read_file(out, &got, err, sizeof err) &&
              !imageio_read_file(SDX4_SOURCE_DIR "/tests/data/gan/rrdb_x4/expected.png", &want, err, sizeof err) &&
              got.width == want.width && got.height == want.height &&
              !memcmp(got.pixels, want.pixels, (size_t)3 * got.width * got.height),
          "the GAN's PNG is PyTorch's: %s", err);
    sdx4_image_free(&got), sdx4_image_free(&want);
    r = RUN("info", dir);
    CHECK(r.status == 0 && strstr(r.out, "kind: gan (RRDBNet") && strstr(r.out, "scale factor: 4"),
          "info on a GAN: exit %d, %s%s", r.status, r.out, r.err);
    result_free(&r);

    snprintf(converted, sizeof converted, "%s/converted", tmp);
    r = RUN("convert", SDX4_SOURCE_DIR "/tests/data/gan/rrdb_x4/model.safetensors", converted);
    CHECK(r.status == 0, "convert: exit %d, %s", r.status, r.err);
    result_free(&r);
    r = RUN("info", "--json", converted);
    CHECK(r.status == 0 && strstr(r.out, "\"kind\":\"gan\"") && strstr(r.out, "\"architecture\":\"RRDBNet\""),
          "info on the converted folder: exit %d, %s%s", r.status, r.out, r.err);
    result_free(&r);
    snprintf(pth, sizeof pth, "%s/RealESRGAN_x4plus.pth", tmp);
    r = RUN("convert", pth, converted);
    check_runtime_error(&r, "convert a .pth", "pickle");
    r = RUN("convert", "a.param", converted);
    CHECK(r.status == 1 && strstr(r.err, "not a.param"), "convert a lone .param: exit %d, %s", r.status, r.err);
    result_free(&r);
}

/* Reads two files and says whether their bytes are the same. */
static int same_file(const char *a, const char *b) {
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    int same = fa && fb;
    for (int ca = 0, cb = 0; same && ca != EOF; same = ca == cb) ca = fgetc(fa), cb = fgetc(fb);
    if (fa) fclose(fa);
    if (fb) fclose(fb);
    return same;
}

/* libvips' reading of a file's PNG text `keyword` or EXIF blob ("exif"),
 * and its ICC profile: a malloc'd copy each, or NULL. */
static char *file_text(const char *path, const char *keyword, void **icc, size_t *icc_len) {
    VipsImage *img = vips_image_new_from_file(path, NULL);
    char *text = NULL;
    *icc = NULL, *icc_len = 0;
    if (!img) return vips_error_clear(), NULL;
    const void *blob;
    size_t n;
    if (vips_image_get_typeof(img, VIPS_META_ICC_NAME) && !vips_image_get_blob(img, VIPS_META_ICC_NAME, &blob, &n))
        *icc = g_memdup2(blob, n), *icc_len = n;
    for (int i = 0; i < 4 && !text; i++) {
        char field[64];
        const char *v;
        snprintf(field, sizeof field, "png-comment-%d-%s", i, keyword);
        if (vips_image_get_typeof(img, field) && !vips_image_get_string(img, field, &v)) text = strdup(v);
    }
    if (!text && !strcmp(keyword, "exif") && vips_image_get_typeof(img, VIPS_META_EXIF_NAME) &&
        !vips_image_get_blob(img, VIPS_META_EXIF_NAME, &blob, &n)) { /* UTF-16BE: keep the ASCII bytes */
        text = calloc(1, n + 1);
        for (size_t i = 0, k = 0; i < n; i++)
            if (((const char *)blob)[i] >= 0x20 && ((const char *)blob)[i] < 0x7f) text[k++] = ((const char *)blob)[i];
    }
    g_object_unref(img);
    return text;
}

/* --metadata with a GAN: A1111's extras text ("postprocessing"; a JPEG's
 * EXIF UserComment) and the input's sRGB profile kept, the pixels those of
 * a plain run; a plain run of the same input with a profile writes the
 * same bytes as one without. */
static void test_metadata_gan(const char *tmp) {
    const char *dir = SDX4_SOURCE_DIR "/tests/data/gan/rrdb_x4";
    const char *input = SDX4_SOURCE_DIR "/tests/data/gan/rrdb_x4/input.png";
    char with_icc[PATH_LEN + 64], plain[PATH_LEN + 64], plain_icc[PATH_LEN + 64], meta[PATH_LEN + 64],
        meta_jpg[PATH_LEN + 64];
    snprintf(with_icc, sizeof with_icc, "%s/input_icc.png", tmp);
    snprintf(plain, sizeof plain, "%s/meta_plain.png", tmp);
    snprintf(plain_icc, sizeof plain_icc, "%s/meta_plain_icc.png", tmp);
    snprintf(meta, sizeof meta, "%s/meta_gan.png", tmp);
    /* the input again, with libvips' sRGB profile */
    VipsImage *img = vips_image_new_from_file(input, NULL);
    VipsBlob *srgb = NULL;
    size_t srgb_len = 0;
    CHECK(img && !vips_profile_load("srgb", &srgb, NULL), "cannot make an input with a profile");
    if (!img || !srgb) return;
    const void *srgb_data = vips_blob_get(srgb, &srgb_len);
    vips_image_set_blob_copy(img, VIPS_META_ICC_NAME, srgb_data, srgb_len);
    CHECK(!vips_pngsave(img, with_icc, NULL), "save: %s", vips_error_buffer());
    g_object_unref(img);

    result r = RUN("upscale", "--model", dir, input, plain);
    CHECK(r.status == 0, "plain: exit %d, %s", r.status, r.err);
    result_free(&r);
    r = RUN("upscale", "--model", dir, with_icc, plain_icc);
    CHECK(r.status == 0, "plain with a profile: exit %d, %s", r.status, r.err);
    result_free(&r);
    CHECK(same_file(plain, plain_icc), "without --metadata the input's profile changed the output");
    r = RUN("upscale", "--metadata", "--model", dir, with_icc, meta);
    CHECK(r.status == 0, "--metadata: exit %d, %s", r.status, r.err);
    result_free(&r);

    void *icc;
    size_t icc_len;
    char *text = file_text(meta, "postprocessing", &icc, &icc_len);
    char *hash = text ? strstr(text, "Model hash: ") : NULL;
    CHECK(hash && strspn(hash + 12, "0123456789abcdef") == 10 && hash[22] == ',', "no model hash: %s",
          text ? text : "(none)");
    if (hash && strlen(hash) > 24) memmove(hash, hash + 24, strlen(hash + 24) + 1);
    CHECK(text && !strcmp(text, "Postprocess upscale by: 4, Postprocess upscaler: rrdb_x4, Size: 64x48, "
                                "Input size: 16x12, Version: sdx4 " SDX4_VERSION),
          "the GAN's text: %s", text ? text : "(none)");
    CHECK(icc && icc_len == srgb_len && !memcmp(icc, srgb_data, srgb_len), "the profile was not kept");
    free(text), g_free(icc);
    /* a JPEG: the text in EXIF UserComment, UTF-16BE (its ASCII bytes compared) */
    snprintf(meta_jpg, sizeof meta_jpg, "%s/meta_gan.jpg", tmp);
    r = RUN("upscale", "--metadata", "--model", dir, with_icc, meta_jpg);
    CHECK(r.status == 0, "--metadata to a JPEG: exit %d, %s", r.status, r.err);
    result_free(&r);
    text = file_text(meta_jpg, "exif", &icc, &icc_len);
    CHECK(text && strstr(text, "UNICODEPostprocess upscale by: 4, Postprocess upscaler: rrdb_x4"), "JPEG: %s",
          text ? text : "(none)");
    CHECK(icc && icc_len == srgb_len && !memcmp(icc, srgb_data, srgb_len), "JPEG: the profile was not kept");
    free(text), g_free(icc);
    text = file_text(plain, "postprocessing", &icc, &icc_len);
    CHECK(!text && !icc, "a plain run wrote metadata");
    free(text), g_free(icc);
    sdx4_image a = {0}, b = {0};
    char err[256] = "";
    CHECK(!imageio_read_file(plain, &a, err, sizeof err) && !imageio_read_file(meta, &b, err, sizeof err) &&
              a.width == b.width && !memcmp(a.pixels, b.pixels, (size_t)3 * a.width * a.height),
          "--metadata changed the pixels: %s", err);
    sdx4_image_free(&a), sdx4_image_free(&b);
    vips_area_unref(VIPS_AREA(srgb));
}

static void test_runtime_errors(const char *tmp) {
    char missing_model[PATH_LEN + 64], missing_image[PATH_LEN + 64];
    char out[PATH_LEN + 64];
    snprintf(missing_model, sizeof missing_model, "%s/no-such-model", tmp);
    snprintf(missing_image, sizeof missing_image, "%s/no-such-image.png", tmp);
    snprintf(out, sizeof out, "%s/never-written.png", tmp);

    /* OUT's folder is checked, then the input read, before the model is
     * opened: these two need no model. */
    result r = RUN("upscale", "--model", missing_model, missing_image, out);
    check_runtime_error(&r, "missing input", missing_image);

    char out_in_missing_folder[PATH_LEN + 64];
    snprintf(out_in_missing_folder, sizeof out_in_missing_folder,
             "%s/no-such-folder/out.png", tmp);
    r = RUN("upscale", "--model", missing_model, missing_image,
            out_in_missing_folder);
    check_runtime_error(&r, "OUT in a missing folder", "no-such-folder");

    r = RUN("info", missing_model);
    check_runtime_error(&r, "info of a missing model", missing_model);

    r = RUN_WITH_MODEL(missing_model, "bench", "--size", "8");
    check_runtime_error(&r, "bench with SDX4_MODEL missing", missing_model);

    r = RUN("make-model", "--config", missing_model, out);
    check_runtime_error(&r, "make-model from a missing config",
                        missing_model);

    const char *input = test_ref("small/golden/pipe0_input.png");
    if (access(input, R_OK) == 0) {
        r = RUN("upscale", "--model", missing_model, "--seed", "1", input, out);
        check_runtime_error(&r, "upscale with a missing model", missing_model);
        CHECK(access(out, F_OK) != 0, "%s was written", out);
    }
}

/* ------------------------------------------------------------------------
 * Cases that run the reference model
 * ------------------------------------------------------------------------ */

static void test_info(const char *model) {
    result r = RUN("info", model);
    CHECK(r.status == 0, "info: exit %d, stderr: %s", r.status, r.err);
    const char *lines[] = {"text_encoder ", "unet ", "vae ",
                           "max noise level: 350", "scale factor: 4",
                           "max prompt tokens: 77", "device: cpu"};
    for (size_t i = 0; i < sizeof lines / sizeof lines[0]; i++)
        CHECK(strcasestr(r.out, lines[i]) != NULL, "info lacks '%s': %s",
              lines[i], r.out);
    result_free(&r);
}

/* `info --json`'s parameter counts, or -1 each if it failed. */
static void info_params(const char *model, const char *variant,
                        int64_t params[3]) {
    result r = variant ? RUN("info", "--json", "--variant", variant, model)
                       : RUN("info", "--json", model);
    CHECK(r.status == 0, "info --json %s: exit %d, stderr: %s", model,
          r.status, r.err);
    json_error_t error;
    json_t *root = json_loads(r.out, 0, &error);
    CHECK(root != NULL, "info --json is not JSON (%s): %s", error.text, r.out);
    json_int_t te = -1, unet = -1, vae = -1, max_noise = -1;
    if (root)
        CHECK(!json_unpack(root, "{s:{s:I, s:I, s:I}, s:I}", "parameters",
                           "text_encoder", &te, "unet", &unet, "vae", &vae,
                           "max_noise_level", &max_noise),
              "info --json lacks fields: %s", r.out);
    CHECK(max_noise == 350, "max_noise_level %lld", (long long)max_noise);
    CHECK(te > 0 && unet > 0 && vae > 0, "parameters %lld %lld %lld",
          (long long)te, (long long)unet, (long long)vae);
    params[0] = te;
    params[1] = unet;
    params[2] = vae;
    json_decref(root);
    result_free(&r);
}

static void test_bench(const char *model) {
    result r = RUN("bench", "--model", model, "--device", "cpu", "--size",
                   "16", "--steps", "1", "--threads", "2", "--batch", "2");
    CHECK(r.status == 0, "bench: exit %d, stderr: %s", r.status, r.err);
    char *newline = strchr(r.out, '\n');
    CHECK(newline && newline[1] == '\0', "bench prints one line: %s", r.out);
    json_t *root = json_loads(r.out, 0, NULL);
    CHECK(root != NULL, "bench output is not JSON: %s", r.out);
    const char *keys[] = {"model", "device", "threads", "size", "steps",
                          "text_encoder_ms", "unet_step_ms", "unet_step_replay_ms", "unet_step_planned_ms",
                          "vae_decode_ms", "vae_tiles", "pipeline_ms", "unet_step_first_ms",
                          "vae_decode_first_ms", "scheduler", "scheduler_options",
                          "scheduler_step_ms", "pipeline_unet_steps", "peak_rss_mib",
                          "device_peak_mib", "batch", "pipeline_batch_ms"};
    for (size_t i = 0; root && i < sizeof keys / sizeof keys[0]; i++)
        CHECK(json_object_get(root, keys[i]) != NULL, "bench lacks %s: %s",
              keys[i], r.out);
    if (root) {
        CHECK(json_integer_value(json_object_get(root, "size")) == 16 &&
                  json_integer_value(json_object_get(root, "steps")) == 1 &&
                  json_integer_value(json_object_get(root, "threads")) == 2 &&
                  json_integer_value(json_object_get(root, "batch")) == 2,
              "bench echoes its settings: %s", r.out);
        /* 64 x 64 px out fits the decode budget: whole, as an upscale runs it */
        CHECK(json_integer_value(json_object_get(root, "vae_tiles")) == 1,
              "bench decodes 16 px latents whole: %s", r.out);
        CHECK(json_number_value(json_object_get(root, "unet_step_ms")) > 0 &&
                  json_number_value(json_object_get(root, "unet_step_planned_ms")) > 0 &&
                  json_number_value(json_object_get(root, "unet_step_replay_ms")) == 0 &&
                  json_number_value(json_object_get(root, "unet_step_first_ms")) > 0 &&
                  json_number_value(json_object_get(root, "vae_decode_first_ms")) > 0 &&
                  json_number_value(json_object_get(root, "peak_rss_mib")) > 0 &&
                  json_number_value(json_object_get(root, "pipeline_batch_ms")) > 0,
              "bench measured nothing: %s", r.out);
    }
    json_decref(root);
    result_free(&r);

    /* a chosen sampler: PLMS evaluates its second step twice */
    r = RUN("bench", "--model", model, "--device", "cpu", "--size", "8", "--steps", "2",
            "--threads", "2", "--scheduler", "pndm", "--scheduler-option", "skip_prk_steps=true");
    CHECK(r.status == 0, "bench --scheduler pndm: exit %d, stderr: %s", r.status, r.err);
    root = json_loads(r.out, 0, NULL);
    CHECK(root && !strcmp(json_string_value(json_object_get(root, "scheduler")), "pndm") &&
              !strcmp(json_string_value(json_object_get(root, "scheduler_options")),
                      "{\"skip_prk_steps\":true}") &&
              json_integer_value(json_object_get(root, "pipeline_unet_steps")) == 3 &&
              json_number_value(json_object_get(root, "scheduler_step_ms")) > 0,
          "bench --scheduler pndm: %s", r.out);
    json_decref(root);
    result_free(&r);
    /* a choice only the model refuses fails before anything is timed */
    r = RUN("bench", "--model", model, "--device", "cpu", "--size", "8", "--steps", "2",
            "--scheduler", "pndm");
    CHECK(r.status == 1 && strstr(r.err, "Runge-Kutta") && r.out[0] == '\0',
          "bench with PNDM's warm-up over 2 steps: exit %d, stderr: %s", r.status, r.err);
    result_free(&r);
}

static void test_make_model(const char *model, const char *tmp) {
    char made[PATH_LEN + 64];
    snprintf(made, sizeof made, "%s/made-model", tmp);
    result r = RUN("make-model", "--config", model, "--dtype", "fp16",
                   "--seed", "3", made);
    CHECK(r.status == 0, "make-model: exit %d, stderr: %s", r.status, r.err);
    result_free(&r);
    int64_t want[3], got[3];
    info_params(model, NULL, want);
    info_params(made, "fp16", got);
    CHECK(!memcmp(want, got, sizeof want),
          "made model's parameter counts differ from its config's");
}

static int count_off_by_more_than_one(const sdx4_image *a,
                                      const sdx4_image *b, size_t *bad) {
    if (a->width != b->width || a->height != b->height) return -1;
    size_t n = (size_t)a->width * a->height * 3;
    *bad = 0;
    for (size_t i = 0; i < n; i++)
        *bad += abs((int)a->pixels[i] - (int)b->pixels[i]) > 1;
    return 0;
}

/* Every golden pipeline case through the command line, compared with the
 * PNG diffusers wrote (the README's tolerance: within 1 level on 99.9%). */
static void test_upscale_matches_diffusers(const char *model, const char *tmp) {
    json_t *cases = json_load_file(test_ref("small/golden/pipeline_cases.json"),
                                   0, NULL);
    char index_path[PATH_LEN + 64];
    snprintf(index_path, sizeof index_path, "%s/model_index.json", model);
    json_t *index = json_load_file(index_path, 0, NULL);
    int max_noise = (int)json_integer_value(
        json_object_get(index, "max_noise_level"));
    CHECK(json_array_size(cases) > 0 && max_noise > 0,
          "pipeline_cases.json or model_index.json unreadable");

    for (size_t k = 0; k < json_array_size(cases); k++) {
        json_t *c = json_array_get(cases, k);
        const char *prompt = "", *negative = NULL;
        int steps = 0, noise_level = 0;
        double guidance = 0;
        json_int_t seed = 0;
        if (json_unpack(c, "{s:s, s?s, s:i, s:F, s:i, s:I}", "prompt", &prompt,
                        "negative", &negative, "steps", &steps, "guidance",
                        &guidance, "noise_level", &noise_level, "seed",
                        &seed)) {
            CHECK(0, "pipeline case %zu unreadable", k);
            continue;
        }
        char steps_s[32], guidance_s[32], noise_s[32], seed_s[32];
        char input[PATH_LEN + 64], golden[PATH_LEN + 64];
        char out[PATH_LEN + 64];
        snprintf(steps_s, sizeof steps_s, "%d", steps);
        snprintf(guidance_s, sizeof guidance_s, "%.17g", guidance);
        snprintf(noise_s, sizeof noise_s, "%.17g",
                 (double)noise_level / max_noise);
        snprintf(seed_s, sizeof seed_s, "%lld", (long long)seed);
        snprintf(input, sizeof input, "%s/pipe%zu_input.png",
                 test_ref("small/golden"), k);
        snprintf(golden, sizeof golden, "%s/pipe%zu_output.png",
                 test_ref("small/golden"), k);
        snprintf(out, sizeof out, "%s/pipe%zu.png", tmp, k);

        result r = RUN("upscale", "--model", model, "--device", "cpu",
                       "--prompt", prompt, "--negative-prompt",
                       negative ? negative : "", "--steps", steps_s,
                       "--guidance", guidance_s, "--noise-level", noise_s,
                       "--seed", seed_s, input, out);
        char seed_line[64];
        snprintf(seed_line, sizeof seed_line, "seed: %s\n", seed_s);
        CHECK(r.status == 0, "pipe%zu: exit %d, stderr: %s", k, r.status,
              r.err);
        CHECK(strstr(r.err, seed_line) != NULL, "pipe%zu: no '%s': %s", k,
              seed_line, r.err);
        result_free(&r);

        sdx4_image ours = {0}, theirs = {0};
        char err[256];
        size_t bad = 0;
        CHECK(imageio_read_file(out, &ours, err, sizeof err) == 0,
              "pipe%zu: %s", k, err);
        CHECK(imageio_read_file(golden, &theirs, err, sizeof err) == 0,
              "pipe%zu: %s", k, err);
        if (ours.pixels && theirs.pixels) {
            CHECK(count_off_by_more_than_one(&ours, &theirs, &bad) == 0,
                  "pipe%zu: %dx%d, diffusers %dx%d", k, ours.width,
                  ours.height, theirs.width, theirs.height);
            size_t n = (size_t)theirs.width * theirs.height * 3;
            CHECK(bad * 1000 <= n, "pipe%zu: %zu of %zu values off by > 1",
                  k, bad, n);
        }
        sdx4_image_free(&ours);
        sdx4_image_free(&theirs);
    }
    json_decref(index);
    json_decref(cases);
}

/* --safety-checker: the tiny model's output of tiny0_input.png is flagged
 * by tests/data/safety's checker (refused: exit 3, nothing written), that
 * of tiny1_input.png passes; a bad checker folder fails before the
 * upscale. Blacking out is the server's test (tests/server/test_safety.py). */
static void test_safety_checker(const char *model, const char *tmp) {
    const char *data = SDX4_SOURCE_DIR "/tests/data/safety";
    char checker[PATH_LEN], in0[PATH_LEN], in1[PATH_LEN], out[PATH_LEN + 64];
    snprintf(checker, sizeof checker, "%s/checker", data);
    snprintf(in0, sizeof in0, "%s/tiny0_input.png", data);
    snprintf(in1, sizeof in1, "%s/tiny1_input.png", data);
    snprintf(out, sizeof out, "%s/checked.png", tmp);
#define TINY_UPSCALE(...)                                                                                     \
    RUN("upscale", "--model", model, "--device", "cpu", "--threads", "2", "--prompt", "a white cat", "--steps", \
        "3", "--guidance", "6", "--noise-level", "0.05714285714285714", "--seed", "0", __VA_ARGS__)
    unlink(out);
    result r = TINY_UPSCALE("--safety-checker", checker, in0, out);
    CHECK(r.status == 3 && strstr(r.err, "flagged by the content check") && access(out, F_OK) != 0,
          "flagged output: exit %d, stderr: %s", r.status, r.err);
    result_free(&r);
    r = TINY_UPSCALE("--safety-checker", checker, in1, out);
    CHECK(r.status == 0 && strstr(r.err, "content check: passed"), "passing output: exit %d, stderr: %s", r.status,
          r.err);
    result_free(&r);
    r = TINY_UPSCALE("--safety-checker", tmp, in1, out);
    CHECK(r.status == 1 && strstr(r.err, "config.json: missing") && !strstr(r.err, "seed:"),
          "bad checker folder: exit %d, stderr: %s", r.status, r.err);
    result_free(&r);
    r = TINY_UPSCALE("--safety-checker", checker, "--safety-action", "warn", in1, out);
    CHECK(r.status == 2, "--safety-action warn: exit %d", r.status);
    result_free(&r);
#undef TINY_UPSCALE
}

/* The tiled UNet through the command line: --tile 0 and a tile at least
 * as large as the 32 px input write the untiled file, byte for byte; 32 px
 * windows on a 48 x 40 input change it. */
static void test_tiles(const char *model, const char *tmp) {
    static const struct {
        const char *input, *tile, *overlap;
        int same;
    } cases[] = {
        {"pipe2", NULL, NULL, 1}, {"pipe2", "0", NULL, 1}, {"pipe2", "32", "8", 1},
        {"pipe0", NULL, NULL, 1}, {"pipe0", "32", "8", 0},
    };
    char untiled[PATH_LEN + 64] = "";
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char input[PATH_LEN + 64], out[PATH_LEN + 64];
        snprintf(input, sizeof input, "%s/%s_input.png", test_ref("small/golden"), cases[i].input);
        snprintf(out, sizeof out, "%s/tiles%zu.png", tmp, i);
        const char *args[20] = {"upscale", "--model", model, "--device", "cpu", "--steps", "2", "--seed", "3"};
        int n = 9;
        if (cases[i].tile) args[n++] = "--tile", args[n++] = cases[i].tile;
        if (cases[i].overlap) args[n++] = "--tile-overlap", args[n++] = cases[i].overlap;
        args[n++] = input, args[n++] = out;
        result r = run_env(NULL, args);
        CHECK(r.status == 0, "tiles case %zu: exit %d, stderr: %s", i, r.status, r.err);
        result_free(&r);
        if (!cases[i].tile) {
            snprintf(untiled, sizeof untiled, "%s", out);
            continue;
        }
        CHECK(same_file(out, untiled) == cases[i].same, "tiles case %zu (%s, --tile %s): %s the untiled file", i,
              cases[i].input, cases[i].tile, cases[i].same ? "not" : "the same as");
    }
}

/* --metadata with the diffusion model: A1111's `parameters` in a PNG. */
static void test_metadata_diffusion(const char *model, const char *tmp) {
    char out[PATH_LEN + 64];
    snprintf(out, sizeof out, "%s/meta.png", tmp);
    result r = RUN("upscale", "--metadata", "--model", model, "--device", "cpu", "--steps", "1", "--seed", "3",
                   "--prompt", "a cat", "--negative-prompt", "blurry", test_ref("small/golden/pipe2_input.png"), out);
    CHECK(r.status == 0, "exit %d, %s", r.status, r.err);
    result_free(&r);
    void *icc;
    size_t icc_len;
    char *text = file_text(out, "parameters", &icc, &icc_len);
    /* the weights' digest, 10 hex digits as A1111 writes it (the server
     * suite's test_metadata checks it is the server's) */
    char *hash = text ? strstr(text, "Model hash: ") : NULL;
    CHECK(hash && strspn(hash + 12, "0123456789abcdef") == 10 && hash[22] == ',', "no model hash: %s",
          text ? text : "(none)");
    if (hash && strlen(hash) > 24) memmove(hash, hash + 24, strlen(hash + 24) + 1);
    CHECK(text && !strcmp(text, "a cat\nNegative prompt: blurry\nSteps: 1, CFG scale: 9, Seed: 3, Size: 128x128, "
                                "Model: model, Noise level: 0.2, Input size: 32x32, Version: sdx4 " SDX4_VERSION),
          "the text is %s", text ? text : "(none)");
    CHECK(!icc, "a profile from an input without one");
    free(text), g_free(icc);
    /* a text a JPEG's EXIF cannot hold: refused before the run */
    char *prompt = malloc(33001);
    memset(prompt, 'a', 33000), prompt[33000] = 0;
    snprintf(out, sizeof out, "%s/meta_long.jpg", tmp);
    r = RUN("upscale", "--metadata", "--model", model, "--device", "cpu", "--steps", "1", "--prompt", prompt,
            test_ref("small/golden/pipe2_input.png"), out);
    CHECK(r.status == 1 && strstr(r.err, "may not fit its EXIF") && !strstr(r.err, "seed:") && access(out, F_OK) != 0,
          "a 33000-character prompt into a JPEG: exit %d, %s", r.status, r.err);
    result_free(&r);
    free(prompt);
}

/* Ctrl-C during a long upscale: exit 130, "canceled", nothing written. The
 * signal is sent once the seed is printed, which the CLI does after it
 * installs its SIGINT handler. No --seed: a random 63-bit one is used. */
static void test_cancel(const char *model, const char *tmp) {
    char out[PATH_LEN + 64];
    snprintf(out, sizeof out, "%s/canceled.png", tmp);
    child c;
    const char *args[] = {"upscale", "--model", model, "--device", "cpu",
                          "--steps", "1000",
                          test_ref("small/golden/pipe0_input.png"), out, NULL};
    if (spawn(&c, args, NULL) != 0) {
        CHECK(0, "cannot start %s", sdx4_bin);
        return;
    }
    int seen = pump(&c, "seed: ", now() + RUN_SECONDS) == 0;
    CHECK(seen, "no seed line before the run: %s", c.text[1]);
    if (seen) kill(c.pid, SIGINT);
    result r = finish(&c, now() + RUN_SECONDS);
    CHECK(r.status == 130, "canceled upscale: exit %d, stderr: %s", r.status,
          r.err);
    CHECK(strstr(r.err, "canceled") != NULL, "stderr: %s", r.err);
    CHECK(access(out, F_OK) != 0, "%s was written", out);
    const char *s = strstr(r.err, "seed: ");
    unsigned long long seed = s ? strtoull(s + 6, NULL, 10) : UINT64_MAX;
    CHECK(seed <= (unsigned long long)INT64_MAX, "random seed not 63-bit: %s",
          r.err);
    result_free(&r);
}

/* ------------------------------------------------------------------------ */

static int remove_entry(const char *path, const struct stat *st, int flag,
                        struct FTW *ftw) {
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

/* ------------------------------------------------------------------------
 * Parts: ctest runs each as a test of its own, test_cli.<name>
 * (CMakeLists.txt reads the names from the table below), so that `ctest -j`
 * runs them side by side instead of one 30-second test holding a core.
 * The split keeps the parts near 10 s each on two cores. Every part has a
 * scratch folder of its own; no argument runs them all.
 * ------------------------------------------------------------------------ */

/* The reference model `name` (tiny or small) into model, or 0 and a line
 * saying which cases are skipped when the reference data lacks it. */
static int reference_model(const char *name, char model[PATH_LEN]) {
    char rel[64];
    snprintf(rel, sizeof rel, "%s/model", name);
    snprintf(model, PATH_LEN, "%s", test_ref(rel));
    if (access(model, R_OK) == 0) return 1;
    printf("test_cli: %s missing, its cases skipped\n", model);
    return 0;
}

static void part_usage(const char *tmp) {
    (void)tmp;
    test_help_and_version();
    test_usage_errors();
}

static void part_errors(const char *tmp) {
    test_runtime_errors(tmp);
    test_param_ranges(tmp);
    test_fails_before_the_model(tmp);
    test_compare(tmp);
}

static void part_gan(const char *tmp) {
    test_gan(tmp);
    test_metadata_gan(tmp);
    char model[PATH_LEN];
    if (reference_model("tiny", model)) test_safety_checker(model, tmp);
}

static void part_model(const char *tmp) {
    char model[PATH_LEN];
    if (!reference_model("small", model)) return;
    test_info(model);
    test_bench(model);
    test_make_model(model, tmp);
    test_upscale_matches_diffusers(model, tmp);
}

static void part_tiles(const char *tmp) {
    char model[PATH_LEN];
    if (!reference_model("small", model)) return;
    test_tiles(model, tmp);
    test_metadata_diffusion(model, tmp);
    test_cancel(model, tmp);
}

static const struct {
    const char *name;
    void (*run)(const char *tmp);
} parts[] = {
    {"usage", part_usage},
    {"errors", part_errors},
    {"gan", part_gan},
    {"model", part_model},
    {"tiles", part_tiles},
};
enum { PART_COUNT = sizeof parts / sizeof parts[0] };

/* test_cli [PART]: one part, or all of them */
int main(int argc, char **argv) {
    if (argc > 2) {
        fprintf(stderr, "usage: test_cli [PART]\n");
        return 1;
    }
    size_t first = 0, end = PART_COUNT;
    if (argc == 2) {
        for (first = 0; first < PART_COUNT && strcmp(parts[first].name, argv[1]); first++) {}
        if (first == PART_COUNT) {
            fprintf(stderr, "test_cli: no part named %s\n", argv[1]);
            return 1;
        }
        end = first + 1;
    }
    const char *dir = getenv("SDX4_BIN");
    snprintf(sdx4_bin, sizeof sdx4_bin, "%s/sdx4", dir ? dir : ".");
    if (access(sdx4_bin, X_OK) != 0) {
        printf("test_cli: skipped, %s not built\n", sdx4_bin);
        return 77;
    }
    char tmp[] = "/tmp/test_cli.XXXXXX";
    if (!mkdtemp(tmp) || imageio_init(argv[0]) != 0) {
        fprintf(stderr, "test_cli: cannot set up\n");
        return 1;
    }

    for (size_t i = first; i < end; i++) parts[i].run(tmp);

    nftw(tmp, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    imageio_shutdown();
    char name[64];
    snprintf(name, sizeof name, "test_cli%s%s", argc == 2 ? " " : "", argc == 2 ? argv[1] : "");
    return test_finish(name);
}
