/*
 * memplan.c - the planning pass behind a recording's arena (memplan.h).
 *
 * The trace is a list of events, each the allocation or the free of one
 * buffer; a buffer lives from the index of its allocation to the index of
 * its free (or to the end). Placement is quadratic in the number of
 * buffers, about two thousand for a UNet step: a few milliseconds, once
 * per recording.
 */
#include "core/memplan.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

typedef struct {
    size_t asked;         /* the bytes the allocation asked for */
    size_t bytes;         /* rounded up to the alignment */
    int alloc_at, free_at; /* event indices; free_at INT_MAX if never freed */
    int64_t offset;
} buffer;

typedef struct {
    const void *ptr;
    int buffer;
} live_buffer;

struct memplan {
    buffer *buffers;
    int n_buffers, cap_buffers;
    int *events; /* b >= 0: buffer b allocated; ~b: buffer b freed */
    int n_events, cap_events;
    live_buffer *live; /* while tracing: traced buffers not yet freed */
    int n_live, cap_live;
    int spoiled, finished;
    size_t arena_bytes, peak_bytes;
    int position, on_track; /* following */
};

memplan *sdx4_memplan_new(void) {
    return (memplan *)calloc(1, sizeof(memplan));
}

void sdx4_memplan_free(memplan *p) {
    if (!p) return;
    free(p->buffers);
    free(p->events);
    free(p->live);
    free(p);
}

/* Room for one more element in *array (of *cap elements of `size`). */
static int reserve(void **array, int *cap, int n, size_t size) {
    if (n < *cap) return 0;
    if (*cap > INT_MAX / 2) return -1; /* no more elements than an int counts */
    int cap2 = *cap ? *cap * 2 : 256;
    void *a = realloc(*array, (size_t)cap2 * size);
    if (!a) return -1;
    *array = a;
    *cap = cap2;
    return 0;
}

static int add_event(memplan *p, int event) {
    if (reserve((void **)&p->events, &p->cap_events, p->n_events, sizeof *p->events)) return -1;
    p->events[p->n_events++] = event;
    return 0;
}

int sdx4_memplan_note_alloc(memplan *p, const void *ptr, size_t bytes) {
    if (p->spoiled || p->finished) return -1;
    if (bytes > SIZE_MAX / 2 || /* no offset could hold it */
        reserve((void **)&p->buffers, &p->cap_buffers, p->n_buffers, sizeof *p->buffers) ||
        reserve((void **)&p->live, &p->cap_live, p->n_live, sizeof *p->live)) {
        p->spoiled = 1;
        return -1;
    }
    int b = p->n_buffers;
    if (add_event(p, b)) {
        p->spoiled = 1;
        return -1;
    }
    p->buffers[p->n_buffers++] = (buffer){bytes, 0, p->n_events - 1, INT_MAX, 0};
    p->live[p->n_live++] = (live_buffer){ptr, b};
    return 0;
}

void sdx4_memplan_note_free(memplan *p, const void *ptr) {
    if (p->spoiled || p->finished) return;
    for (int i = p->n_live - 1; i >= 0; i--) { /* recent buffers go first */
        if (p->live[i].ptr != ptr) continue;
        int b = p->live[i].buffer;
        if (add_event(p, ~b)) {
            p->spoiled = 1;
            return;
        }
        p->buffers[b].free_at = p->n_events - 1;
        p->live[i] = p->live[--p->n_live];
        return;
    }
}

typedef struct {
    size_t bytes;
    int alloc_at, buffer;
} by_size;

/* Largest first; equal sizes in the order they were allocated. */
static int larger_first(const void *a, const void *b) {
    const by_size *x = (const by_size *)a, *y = (const by_size *)b;
    if (x->bytes != y->bytes) return x->bytes > y->bytes ? -1 : 1;
    return (x->alloc_at > y->alloc_at) - (x->alloc_at < y->alloc_at);
}

static int lifetimes_overlap(const buffer *a, const buffer *b) {
    return a->alloc_at < b->free_at && b->alloc_at < a->free_at;
}

/* The lowest-waste offset for b among the buffers already placed (`placed`,
 * n of them, in increasing offset) whose lifetimes overlap b's: the
 * smallest gap that holds it, else the end of the last of them. */
static int64_t best_offset(const memplan *p, const int *placed, int n, const buffer *b) {
    size_t end = 0, best_gap = SIZE_MAX;
    int64_t best = -1;
    for (int i = 0; i < n; i++) {
        const buffer *o = &p->buffers[placed[i]];
        if (!lifetimes_overlap(o, b)) continue;
        size_t start = (size_t)o->offset;
        if (start > end && start - end >= b->bytes && start - end < best_gap) {
            best_gap = start - end;
            best = (int64_t)end;
        }
        if (start + o->bytes > end) end = start + o->bytes;
    }
    return best >= 0 ? best : (int64_t)end;
}

int sdx4_memplan_finish(memplan *p, size_t align) {
    if (p->finished) return 0;
    if (p->spoiled || !p->n_buffers) {
        sdx4_set_error(p->spoiled ? SDX4_ERR_NO_MEMORY : SDX4_ERR_INVALID_ARGUMENT,
                  p->spoiled ? "memory plan: out of memory while tracing, or a buffer too large"
                             : "memory plan: nothing was allocated");
        return -1;
    }
    if (!align || (align & (align - 1))) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "memory plan: alignment %zu is not a power of two",
                  align);
        return -1;
    }
    by_size *order = (by_size *)malloc((size_t)p->n_buffers * sizeof *order);
    int *placed = (int *)malloc((size_t)p->n_buffers * sizeof *placed);
    if (!order || !placed) {
        free(order);
        free(placed);
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "memory plan: out of memory");
        return -1;
    }
    size_t live = 0;
    for (int e = 0; e < p->n_events; e++) {
        buffer *b = &p->buffers[p->events[e] >= 0 ? p->events[e] : ~p->events[e]];
        if (p->events[e] >= 0) {
            b->bytes = (b->asked + align - 1) & ~(align - 1);
            if (!b->bytes) b->bytes = align;
            live += b->bytes;
            if (live > p->peak_bytes) p->peak_bytes = live;
        } else {
            live -= b->bytes;
        }
    }
    for (int i = 0; i < p->n_buffers; i++)
        order[i] = (by_size){p->buffers[i].bytes, p->buffers[i].alloc_at, i};
    qsort(order, (size_t)p->n_buffers, sizeof *order, larger_first);
    for (int n = 0; n < p->n_buffers; n++) {
        buffer *b = &p->buffers[order[n].buffer];
        b->offset = best_offset(p, placed, n, b);
        int at = n; /* keep `placed` in increasing offset */
        while (at > 0 && p->buffers[placed[at - 1]].offset > b->offset) {
            placed[at] = placed[at - 1];
            at--;
        }
        placed[at] = order[n].buffer;
        if ((size_t)b->offset + b->bytes > p->arena_bytes)
            p->arena_bytes = (size_t)b->offset + b->bytes;
    }
    free(order);
    free(placed);
    free(p->live);
    p->live = NULL;
    p->n_live = p->cap_live = 0;
    p->finished = 1;
    sdx4_memplan_rewind(p);
    return 0;
}

size_t sdx4_memplan_arena_bytes(const memplan *p) { return p->arena_bytes; }
size_t sdx4_memplan_peak_bytes(const memplan *p) { return p->peak_bytes; }
int sdx4_memplan_buffers(const memplan *p) { return p->n_buffers; }

void sdx4_memplan_rewind(memplan *p) {
    p->position = 0;
    p->on_track = p->finished;
}

int64_t sdx4_memplan_follow_alloc(memplan *p, size_t bytes) {
    if (p->on_track && p->position < p->n_events && p->events[p->position] >= 0) {
        const buffer *b = &p->buffers[p->events[p->position]];
        if (b->asked == bytes) {
            p->position++;
            return b->offset;
        }
    }
    p->on_track = 0;
    return -1;
}

int sdx4_memplan_placed_outlives(const memplan *p) {
    if (p->position < 1 || p->events[p->position - 1] < 0) return 0;
    return p->buffers[p->events[p->position - 1]].free_at == INT_MAX;
}

void sdx4_memplan_follow_free(memplan *p, int64_t offset) {
    if (p->on_track && p->position < p->n_events && p->events[p->position] < 0 &&
        p->buffers[~p->events[p->position]].offset == offset) {
        p->position++;
        return;
    }
    p->on_track = 0;
}

int sdx4_memplan_on_track(const memplan *p) { return p->on_track; }
int sdx4_memplan_position(const memplan *p) { return p->position; }
int sdx4_memplan_events(const memplan *p) { return p->n_events; }
