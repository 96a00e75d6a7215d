/*
 * test_cpu_memory.c - the CPU backend's memory beyond single tensors: the
 * planned arenas of steps (cpu_step.c) and the freed blocks it keeps for
 * reuse, with trim() (cpu_backend.c).
 *
 * A step runs from its third call in one arena laid out by its second:
 * memory() counts the arena from then on, and no more once the step is
 * freed; what is computed there is what the unplanned runs computed. A
 * result kept past the next run (which no planned place may hold), a run
 * that leaves the plan half-way, and two threads each running a step of
 * their own compute right as well.
 *
 * Kept blocks: freed blocks stay in the process, also beyond the 512 MiB
 * kept at least, and serve the next requests for their sizes; trim()
 * gives them back to the system. Measured as the kernel counts the
 * process's resident memory (/proc/self/statm), which is not checked
 * under ASan: its allocator keeps freed memory in quarantine.
 */
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/backend.h"
#include "core/error.h"
#include "test.h"

#define C 8
#define H 256
#define W 256
#define MIB (1024 * 1024)

/* A step's function: y = upsample(2 * cat(silu(x), x)), through
 * temporaries of 2 and 4 MiB, the result 16 MiB. */
typedef struct {
    backend *be;
    tensor *x, *y;
    int keep_previous; /* leave the previous y alive (the caller frees it) */
    int detour;        /* one allocation the trace does not have */
} job;

static int forward(void *arg) {
    job *j = arg;
    backend *be = j->be;
    if (!j->keep_previous) tensor_free(j->y); /* the previous result first, as pipeline.c does */
    j->y = NULL;
    tensor *a = be->activate(be, j->x, ACT_SILU);
    tensor *d = j->detour ? be->activate(be, j->x, ACT_GELU) : NULL;
    tensor *b = a ? be->concat_channels(be, a, j->x) : NULL;
    tensor_free(a), tensor_free(d);
    if (b && be->scale_inplace(be, b, 2.0f) == 0) j->y = be->upsample_nearest(be, b, 2 * H, 2 * W);
    tensor_free(b);
    return j->y ? 0 : -1;
}

static float silu(float v) { return v / (1.0f + expf(-v)); }

/* Whether y is forward's result for x (host copy xs). */
static int result_right(backend *be, const tensor *y, const float *xs) {
    float *got = malloc(sizeof *got * 2 * C * 4 * H * W);
    int right = be->download(be, y, got) == 0;
    for (int c = 0; right && c < 2 * C; c++)
        for (int h = 0; h < 2 * H; h++)
            for (int w = 0; w < 2 * W; w++) {
                float v = xs[(c % C) * H * W + (h / 2) * W + w / 2];
                float want = 2.0f * (c < C ? silu(v) : v);
                if (fabsf(got[((size_t)c * 2 * H + h) * 2 * W + w] - want) > 1e-6f * (1.0f + fabsf(want))) {
                    right = 0;
                    break;
                }
            }
    free(got);
    return right;
}

static float *input(int seed) {
    float *xs = malloc(sizeof *xs * C * H * W);
    for (int i = 0; i < C * H * W; i++) xs[i] = (float)(((long)i * 7919 + (long)seed * 104729) % 2001 - 1000) / 250.0f;
    return xs;
}

static int64_t in_use(backend *be) {
    int64_t now;
    be->memory(be, &now, NULL);
    return now;
}

/* Runs, results and memory() of one step through its planned runs, a kept
 * result and a detour. */
static void test_planned_step(backend *be) {
    float *xs = input(1);
    job j = {.be = be};
    j.x = be->new_tensor(be, 4, (int64_t[]){1, C, H, W});
    CHECK(j.x && be->upload(be, j.x, xs) == 0, "input");
    const int64_t before = in_use(be), y_bytes = (int64_t)2 * C * 4 * H * W * 4;
    backend_step *s = sdx4_step_new(be);
    CHECK(s != NULL, "step: %s", sdx4_last_error());
    CHECK(!sdx4_step_replays(be), "the CPU replays no step");

    int64_t used[6];
    for (int run = 0; run < 6; run++) {
        CHECK(sdx4_step_run(be, s, forward, &j) == 0, "run %d: %s", run, sdx4_last_error());
        CHECK(j.y && result_right(be, j.y, xs), "run %d computed a wrong result", run);
        used[run] = in_use(be);
    }
    /* runs 0 and 1 hold x and y; from run 2 on, the arena as well: at least
     * the 6 MiB of temporaries alive at once, at most y's place beside them */
    CHECK(used[0] == before + y_bytes && used[1] == used[0], "unplanned runs: %" PRId64 ", %" PRId64,
          used[0] - before, used[1] - before);
    int64_t arena = used[2] - used[1];
    CHECK(arena >= 6 * MIB && arena <= 6 * MIB + y_bytes + 4096, "an arena of %" PRId64 " bytes", arena);
    CHECK(used[3] == used[2] && used[5] == used[2], "planned runs hold no more: %" PRId64 ", %" PRId64,
          used[3] - used[2], used[5] - used[2]);

    /* a result kept past the next run keeps its values */
    tensor *kept = j.y;
    j.keep_previous = 1;
    CHECK(sdx4_step_run(be, s, forward, &j) == 0 && j.y != kept, "run with the result kept");
    CHECK(result_right(be, kept, xs), "the kept result was overwritten by the next run");
    CHECK(result_right(be, j.y, xs), "the run beside a kept result computed a wrong result");
    tensor_free(kept);
    j.keep_previous = 0;

    /* a run that leaves the plan, and the runs after it */
    j.detour = 1;
    CHECK(sdx4_step_run(be, s, forward, &j) == 0 && result_right(be, j.y, xs), "a run off the plan");
    j.detour = 0;
    for (int run = 0; run < 2; run++)
        CHECK(sdx4_step_run(be, s, forward, &j) == 0 && result_right(be, j.y, xs), "a run after the detour");
    CHECK(in_use(be) == used[2], "after the detour: %" PRId64 " bytes more", in_use(be) - used[2]);

    sdx4_step_free(be, s);
    CHECK(in_use(be) == before + y_bytes, "the arena outlived its step: %" PRId64 " bytes",
          in_use(be) - before - y_bytes);
    tensor_free(j.y), tensor_free(j.x);
    CHECK(in_use(be) == before - (int64_t)C * H * W * 4, "memory left in use");
    free(xs);
}

/* A step whose run fails half-way: the next runs still compute right, and
 * nothing stays in use. */
static int failing(void *arg) {
    job *j = arg;
    tensor *a = j->be->activate(j->be, j->x, ACT_SILU);
    tensor_free(a);
    sdx4_set_error(SDX4_ERR_CANCELED, "canceled");
    return -1;
}

static void test_failed_run(backend *be) {
    float *xs = input(2);
    job j = {.be = be};
    j.x = be->new_tensor(be, 4, (int64_t[]){1, C, H, W});
    CHECK(j.x && be->upload(be, j.x, xs) == 0, "input");
    const int64_t before = in_use(be);
    backend_step *s = sdx4_step_new(be);
    for (int run = 0; run < 3; run++) CHECK(sdx4_step_run(be, s, forward, &j) == 0, "run %d", run);
    CHECK(sdx4_step_run(be, s, failing, &j) == -1 && sdx4_error_status() == SDX4_ERR_CANCELED,
          "a failed run reports its own error: %s", sdx4_last_error());
    CHECK(sdx4_step_run(be, s, forward, &j) == 0 && result_right(be, j.y, xs), "a run after a failed one");
    sdx4_step_free(be, s);
    tensor_free(j.y);
    CHECK(in_use(be) == before, "memory left in use: %" PRId64, in_use(be) - before);
    tensor_free(j.x);
    free(xs);
}

/* Two threads, a step each, on one backend. */
typedef struct {
    backend *be;
    int seed, wrong;
} caller;

static void *call_steps(void *arg) {
    caller *c = arg;
    float *xs = input(c->seed);
    job j = {.be = c->be};
    j.x = c->be->new_tensor(c->be, 4, (int64_t[]){1, C, H, W});
    c->be->upload(c->be, j.x, xs);
    backend_step *s = sdx4_step_new(c->be);
    for (int run = 0; run < 6; run++)
        c->wrong += sdx4_step_run(c->be, s, forward, &j) != 0 || !result_right(c->be, j.y, xs);
    sdx4_step_free(c->be, s);
    tensor_free(j.y), tensor_free(j.x);
    free(xs);
    return NULL;
}

static void test_two_threads(backend *be) {
    const int64_t before = in_use(be);
    caller c[2] = {{be, 3, 0}, {be, 4, 0}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++) CHECK(pthread_create(&t[i], NULL, call_steps, &c[i]) == 0, "thread");
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    CHECK(c[0].wrong == 0 && c[1].wrong == 0, "wrong runs: %d and %d", c[0].wrong, c[1].wrong);
    CHECK(in_use(be) == before, "memory left in use: %" PRId64, in_use(be) - before);
}

#ifndef __SANITIZE_ADDRESS__
static long resident_mib(void) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f && fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    if (f) fclose(f);
    return resident * sysconf(_SC_PAGESIZE) / MIB;
}

/* 768 MiB of blocks in use at once, freed: all of them are kept (more than
 * the 512 MiB kept at least, since the job had them all in use), so the
 * process stays as large and asking for them again takes nothing new;
 * trim() gives them back. */
static void test_kept_blocks(backend *be) {
    enum { BLOCKS = 12, FLOATS = 16 * MIB }; /* 64 MiB each */
    tensor *t[BLOCKS];
    long resident[3];
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < BLOCKS; i++) {
            t[i] = be->new_tensor(be, 1, (int64_t[]){FLOATS});
            CHECK(t[i] != NULL, "a block of 64 MiB: %s", sdx4_last_error());
            if (t[i]) memset(t[i]->data, pass + 1, (size_t)FLOATS * 4);
        }
        resident[pass] = resident_mib();
        for (int i = 0; i < BLOCKS; i++) tensor_free(t[i]);
    }
    resident[2] = resident_mib();
    CHECK(resident[1] - resident[0] < 64, "asked for again, the blocks took %ld MiB more", resident[1] - resident[0]);
    CHECK(resident[1] - resident[2] < 64, "freed, %ld of 768 MiB went back before trim()",
          resident[1] - resident[2]);
    be->trim(be);
    long trimmed = resident_mib();
    CHECK(resident[2] - trimmed >= 700, "trim() gave back %ld of 768 MiB (resident %ld -> %ld MiB)",
          resident[2] - trimmed, resident[2], trimmed);
}
#endif

int main(void) {
    backend *be = sdx4_backend_cpu_create(2);
    CHECK(be != NULL, "cpu backend: %s", sdx4_last_error());
    if (!be) return test_finish("test_cpu_memory");
    test_planned_step(be);
    test_failed_run(be);
    test_two_threads(be);
#ifndef __SANITIZE_ADDRESS__
    test_kept_blocks(be);
#else
    fprintf(stderr, "test_cpu_memory: resident memory not checked under ASan\n");
#endif
    be->destroy(be);
    return test_finish("test_cpu_memory");
}
