/*
 * cuda_profile.cu - where a CUDA run spends its GPU time, per operation.
 *
 * With the profile setting on (cuda_settings; SDX4_CUDA_PROFILE=1 for the
 * CLI and the server), every operation that names itself to cuda_lock
 * records a CUDA event before and after the work it enqueues, under a key made of its name and, where the operation gives
 * one, its shape (a convolution's channels, size and kernel, say). The
 * events are read when the stream is waited for anyway (download,
 * synchronize) or when too many are pending, and the backend prints the
 * table, largest total first, to stderr when it is destroyed, with the
 * operation during which memory() reached its peak.
 *
 * Operations recorded into a CUDA graph (cuda_graph.cu) record their
 * events as nodes of the graph, and each replay has them read: those
 * appear as "(replayed) ...", the times of a step as it runs in the
 * pipeline, without the host's launch gaps of an operation-by-operation
 * run.
 *
 * Off (the default) it costs one pointer test per operation. On, it adds
 * two event records per operation and nothing else: no synchronisation
 * inside a step, so the totals are the kernels' own times.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"

#define PROFILE_KEY 96
#define PROFILE_PENDING 4096 /* events in flight before they are read */
#define PROFILE_KEYS 1024

typedef struct {
    cudaEvent_t start, end;
    char key[PROFILE_KEY];
    int kept; /* a recorded operation's events: they serve every replay */
} pending_op;

typedef struct {
    char key[PROFILE_KEY];
    int64_t calls;
    double ms, min_ms; /* the minimum: first calls also load kernels lazily */
} op_total;

struct cuda_profile {
    pending_op pending[PROFILE_PENDING];
    int n_pending;
    op_total totals[PROFILE_KEYS];
    int n_totals;
    cudaEvent_t spare[2 * PROFILE_PENDING]; /* events to reuse */
    int n_spare;
    int64_t peak, peak_before;  /* the highest memory() peak, and in_use */
    char peak_op[PROFILE_KEY];  /* before the operation that reached it */
    int64_t op_in_use;          /* in_use when the running operation began */
    pending_op *current;        /* the running operation, or NULL */
    pending_op *recorded;       /* the operations captured into graphs */
    int n_recorded, max_recorded;
};

cuda_profile *cuda_profile_create(void) {
    return (cuda_profile *)calloc(1, sizeof(cuda_profile)); /* NULL: no profile */
}

static cudaEvent_t take_event(cuda_profile *p) {
    if (p->n_spare) return p->spare[--p->n_spare];
    cudaEvent_t e = NULL;
    if (cudaEventCreate(&e) != cudaSuccess) {
        (void)cudaGetLastError();
        return NULL;
    }
    return e;
}

static void add_total(cuda_profile *p, const char *key, double ms) {
    for (int i = 0; i < p->n_totals; i++) {
        if (!strcmp(p->totals[i].key, key)) {
            p->totals[i].calls++;
            p->totals[i].ms += ms;
            if (ms < p->totals[i].min_ms) p->totals[i].min_ms = ms;
            return;
        }
    }
    if (p->n_totals == PROFILE_KEYS) key = "(other)";
    op_total *t = &p->totals[p->n_totals < PROFILE_KEYS ? p->n_totals++ : PROFILE_KEYS - 1];
    snprintf(t->key, sizeof t->key, "%s", key);
    t->calls++;
    t->ms += ms;
    t->min_ms = ms;
}

void cuda_profile_collect(cuda_profile *p) {
    if (!p) return;
    /* a running operation outside a recording is the last pending one:
     * it stays */
    const int open = p->current && !p->current->kept;
    int done = p->n_pending - open;
    for (int i = 0; i < done; i++) {
        pending_op *op = &p->pending[i];
        float ms = 0.0f;
        if (cudaEventSynchronize(op->end) == cudaSuccess &&
            cudaEventElapsedTime(&ms, op->start, op->end) == cudaSuccess)
            add_total(p, op->key, ms);
        (void)cudaGetLastError();
        if (op->kept) continue;
        p->spare[p->n_spare++] = op->start;
        p->spare[p->n_spare++] = op->end;
    }
    if (open) {
        p->pending[0] = p->pending[done];
        p->current = &p->pending[0];
    }
    p->n_pending = open;
}

/* An operation being recorded into a graph: its events become event
 * record nodes of the graph (cudaEventRecordExternal), so each replay
 * records them again, and cuda_profile_replayed() has them read. */
static pending_op *begin_recorded(cuda_profile *p) {
    if (p->n_recorded == p->max_recorded) {
        int max = p->max_recorded ? 2 * p->max_recorded : 1024;
        pending_op *r = (pending_op *)realloc(p->recorded, (size_t)max * sizeof *r);
        if (!r) return NULL;
        p->recorded = r, p->max_recorded = max;
    }
    pending_op *o = &p->recorded[p->n_recorded];
    o->start = take_event(p);
    o->end = take_event(p);
    if (!o->start || !o->end) return NULL;
    o->kept = 1;
    p->n_recorded++;
    return o;
}

void cuda_profile_begin(cuda_profile *p, cudaStream_t stream, const char *op, int64_t in_use,
                        bool recording) {
    p->op_in_use = in_use;
    if (recording) {
        pending_op *o = begin_recorded(p);
        if (!o) return;
        snprintf(o->key, sizeof o->key, "(replayed) %s", op);
        cuda_ignore(cudaEventRecordWithFlags(o->start, stream, cudaEventRecordExternal));
        p->current = o;
        return;
    }
    if (p->n_pending == PROFILE_PENDING) cuda_profile_collect(p);
    pending_op *o = &p->pending[p->n_pending];
    o->start = take_event(p);
    o->end = take_event(p);
    if (!o->start || !o->end) return;
    snprintf(o->key, sizeof o->key, "%s", op);
    o->kept = 0;
    cuda_ignore(cudaEventRecord(o->start, stream));
    p->n_pending++;
    p->current = o;
}

int cuda_profile_recorded(const cuda_profile *p) { return p ? p->n_recorded : 0; }

void cuda_profile_replayed(cuda_profile *p, int first, int count) {
    if (!p) return;
    for (int i = first; i < first + count && i < p->n_recorded; i++) {
        if (p->n_pending == PROFILE_PENDING) cuda_profile_collect(p);
        p->pending[p->n_pending++] = p->recorded[i];
    }
}

void cuda_profile_label(cuda_profile *p, const char *fmt, ...) {
    if (!p || !p->current) return;
    pending_op *o = p->current;
    size_t used = strlen(o->key);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(o->key + used, sizeof o->key - used, fmt, ap);
    va_end(ap);
}

void cuda_profile_end(cuda_profile *p, cudaStream_t stream, int64_t peak) {
    pending_op *o = p->current;
    if (!o) return;
    if (peak > p->peak) {
        p->peak = peak;
        p->peak_before = p->op_in_use;
        snprintf(p->peak_op, sizeof p->peak_op, "%s", o->key);
    }
    if (o->kept) cuda_ignore(cudaEventRecordWithFlags(o->end, stream, cudaEventRecordExternal));
    else cuda_ignore(cudaEventRecord(o->end, stream));
    p->current = NULL;
}

static int by_time(const void *a, const void *b) {
    double x = ((const op_total *)a)->ms, y = ((const op_total *)b)->ms;
    return x < y ? 1 : x > y ? -1 : 0;
}

void cuda_profile_destroy(cuda_profile *p) {
    if (!p) return;
    cuda_profile_collect(p);
    qsort(p->totals, p->n_totals, sizeof *p->totals, by_time);
    double all = 0.0;
    for (int i = 0; i < p->n_totals; i++) all += p->totals[i].ms;
    fprintf(stderr, "cuda profile: %.1f ms of GPU time in operations\n", all);
    if (p->peak)
        fprintf(stderr, "peak memory %.1f MiB, reached in %s (%.1f MiB in use before it)\n",
                p->peak / 1048576.0, p->peak_op, p->peak_before / 1048576.0);
    fprintf(stderr, "%10s %6s %8s %9s %9s  %s\n", "total ms", "%", "calls", "us/call", "min us",
            "operation");
    for (int i = 0; i < p->n_totals; i++) {
        const op_total *t = &p->totals[i];
        fprintf(stderr, "%10.2f %6.2f %8" PRId64 " %9.1f %9.1f  %s\n", t->ms, 100.0 * t->ms / all,
                t->calls, 1e3 * t->ms / (double)t->calls, 1e3 * t->min_ms, t->key);
    }
    for (int i = 0; i < p->n_spare; i++) cuda_ignore(cudaEventDestroy(p->spare[i]));
    for (int i = 0; i < p->n_recorded; i++) {
        cuda_ignore(cudaEventDestroy(p->recorded[i].start));
        cuda_ignore(cudaEventDestroy(p->recorded[i].end));
    }
    free(p->recorded);
    free(p);
}
