/*
 * cpu_step.c - backend.h's steps on the CPU: the memory of each step laid
 * out once, in one arena, by a planning pass.
 *
 * The CPU runs a step's function at every call (it records nothing), and a
 * UNet step asks for the same buffers in the same order each time: about
 * two thousand, up to hundreds of MiB each. From the heap, the large ones
 * go back to the system when freed and are faulted in again on the next
 * step, a page at a time; the blocks that cpu_backend.c keeps cannot hold
 * a whole step's without holding several times its peak (a step needs one
 * block of each size it uses, at once or not).
 *
 * So, as the CUDA backend does before it records (cuda_graph.cu), the
 * second call of a step is a planning pass: the allocator notes every
 * allocation and free of the calling thread (core/memplan.h), and the plan
 * packs the buffers by their lifetimes into one arena of about the most
 * bytes the step has alive at once. From the third call on, each
 * allocation of that thread takes its planned place while the run repeats
 * the trace; from the first event that differs, the rest of the run takes
 * memory as usual. The first call is not traced: it may do more than the
 * later ones (fill kv_cache).
 *
 * What takes no planned place, and comes from the heap:
 *   - a buffer the trace never freed (the step's result, a cache it
 *     filled): it is still alive while the next run's buffers take their
 *     places;
 *   - every buffer of a run that starts while a buffer of an earlier run
 *     is still in the arena (a run that failed half-way), so that no place
 *     is handed out twice.
 * A buffer freed by another thread is no event of the plan; its place is
 * simply given up. An arena is freed when its step is and its last buffer
 * is, whichever comes later.
 */
#include <stdlib.h>

#include "backend/cpu/cpu_internal.h"
#include "core/error.h"
#include "core/memplan.h"

struct cpu_arena {
    char *base;
    size_t bytes;
    int refs;        /* its step's, and one per buffer placed and not freed */
    cpu_arena *next; /* cb->arenas */
};

struct backend_step {
    cpu_backend *cb;
    int runs;         /* calls that ran the step's function to the end */
    memplan *plan;    /* traced by the second call, followed by the later ones */
    cpu_arena *arena; /* the plan's memory, from the third call on */
};

typedef enum { RUN_PLAIN, RUN_TRACING, RUN_FOLLOWING } run_mode;

/* The step whose function this thread runs now, and how. */
static _Thread_local backend_step *running;
static _Thread_local run_mode mode;

backend_step *sdx4_cpu_step_new(backend *be) {
    backend_step *s = calloc(1, sizeof *s);
    if (!s) sdx4_set_error(SDX4_ERR_NO_MEMORY, "cpu backend: step: out of memory");
    else s->cb = (cpu_backend *)be;
    return s;
}

/* Drops a reference to `a`; the last frees it. Under cb->lock. */
static void arena_unref(cpu_backend *cb, cpu_arena *a) {
    if (--a->refs > 0) return;
    for (cpu_arena **at = &cb->arenas; *at; at = &(*at)->next)
        if (*at == a) {
            *at = a->next;
            break;
        }
    atomic_fetch_sub(&cb->arena_count, 1);
    sdx4_cpu_count_bytes(&cb->base, -(int64_t)a->bytes);
    free(a->base);
    free(a);
}

/* The arena of s's plan, made now; 0 (and no plan from then on) when there
 * is no memory for it: the step runs from the heap as before. */
static int make_arena(backend_step *s) {
    cpu_backend *cb = s->cb;
    cpu_arena *a = calloc(1, sizeof *a);
    size_t bytes = sdx4_memplan_arena_bytes(s->plan);
    sdx4_cpu_drop_spares(cb); /* the traced run's blocks: the arena takes their place */
    if (!a || posix_memalign((void **)&a->base, 64, bytes) != 0) {
        free(a);
        sdx4_memplan_free(s->plan);
        s->plan = NULL;
        return 0;
    }
    a->bytes = bytes;
    a->refs = 1;
    pthread_mutex_lock(&cb->lock);
    a->next = cb->arenas;
    cb->arenas = a;
    atomic_fetch_add(&cb->arena_count, 1);
    pthread_mutex_unlock(&cb->lock);
    sdx4_cpu_count_bytes(&cb->base, (int64_t)bytes);
    s->arena = a;
    return 1;
}

/* Whether no buffer of an earlier run is still in s's arena. */
static int arena_empty(backend_step *s) {
    pthread_mutex_lock(&s->cb->lock);
    int empty = s->arena->refs == 1;
    pthread_mutex_unlock(&s->cb->lock);
    return empty;
}

int sdx4_cpu_step_run(backend *be, backend_step *s, int (*fn)(void *ctx), void *ctx) {
    (void)be;
    run_mode how = RUN_PLAIN;
    if (s->runs == 1 && !s->plan && (s->plan = sdx4_memplan_new())) {
        how = RUN_TRACING;
    } else if (s->runs >= 2 && s->plan && (s->arena || make_arena(s)) && arena_empty(s)) {
        sdx4_memplan_rewind(s->plan);
        how = RUN_FOLLOWING;
    }
    backend_step *outer = running;
    run_mode outer_mode = mode;
    running = s, mode = how;
    int rc = fn(ctx);
    running = outer, mode = outer_mode;
    /* 64 bytes: posix_memalign's alignment here, which the kernels assume */
    if (how == RUN_TRACING && (rc || sdx4_memplan_finish(s->plan, 64))) {
        sdx4_memplan_free(s->plan); /* traced again by the next call */
        s->plan = NULL;
        if (!rc) sdx4_error_clear(); /* nothing allocated, or no memory to trace: no plan */
    }
    if (rc) return -1;
    s->runs++;
    return 0;
}

void sdx4_cpu_step_free(backend *be, backend_step *s) {
    (void)be;
    if (s->arena) {
        pthread_mutex_lock(&s->cb->lock);
        arena_unref(s->cb, s->arena);
        pthread_mutex_unlock(&s->cb->lock);
    }
    sdx4_memplan_free(s->plan);
    free(s);
}

void *sdx4_cpu_step_place(cpu_backend *cb, size_t bytes) {
    backend_step *s = running;
    if (mode != RUN_FOLLOWING || s->cb != cb) return NULL;
    int64_t offset = sdx4_memplan_follow_alloc(s->plan, bytes);
    if (offset < 0) {
        mode = RUN_PLAIN; /* off the plan: the rest of the run from the heap */
        return NULL;
    }
    if (sdx4_memplan_placed_outlives(s->plan)) return NULL;
    pthread_mutex_lock(&cb->lock);
    s->arena->refs++;
    pthread_mutex_unlock(&cb->lock);
    return s->arena->base + offset;
}

void sdx4_cpu_step_traced(cpu_backend *cb, void *p, size_t bytes) {
    /* out of host memory spoils the trace: that step is not planned */
    if (mode == RUN_TRACING && running->cb == cb) (void)sdx4_memplan_note_alloc(running->plan, p, bytes);
}

int sdx4_cpu_step_release(cpu_backend *cb, void *p) {
    backend_step *s = running;
    if (mode == RUN_TRACING && s->cb == cb) sdx4_memplan_note_free(s->plan, p);
    if (!atomic_load(&cb->arena_count)) return 0;
    pthread_mutex_lock(&cb->lock);
    cpu_arena *a = cb->arenas;
    while (a && !((char *)p >= a->base && (char *)p < a->base + a->bytes)) a = a->next;
    if (a) {
        if (mode == RUN_FOLLOWING && s->arena == a) sdx4_memplan_follow_free(s->plan, (char *)p - a->base);
        arena_unref(cb, a);
    }
    pthread_mutex_unlock(&cb->lock);
    return a != NULL;
}
