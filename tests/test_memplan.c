/*
 * test_memplan.c - the planning pass of a recording's arena (core/memplan).
 *
 * A layout is right when no two buffers alive at the same time share a
 * byte, and good when its extent is close to the most bytes alive at once
 * (no layout can do better than that). Following a plan must give the
 * planned places while a run repeats the trace, and nothing once it
 * differs.
 */
#include <stdint.h>

#include "core/error.h"
#include "core/memplan.h"
#include "test.h"

#define ALIGN 256

/* A trace to plan and follow: events in order, buffer sizes, and the
 * offsets a faithful run was given. */
typedef struct {
    int n_events, n_buffers;
    int event[4096];        /* b >= 0: allocate buffer b; ~b: free it */
    size_t bytes[4096];
    int alloc_at[4096], free_at[4096];
    int64_t offset[4096];
} trace;

static void add_alloc(trace *t, size_t bytes) {
    int b = t->n_buffers++;
    t->bytes[b] = bytes;
    t->alloc_at[b] = t->n_events;
    t->free_at[b] = INT32_MAX;
    t->event[t->n_events++] = b;
}

static void add_free(trace *t, int b) {
    t->free_at[b] = t->n_events;
    t->event[t->n_events++] = ~b;
}

/* The address a buffer had while tracing: any distinct non-null value. */
static const void *address(int b) { return (const void *)(uintptr_t)(0x1000 + 64 * (uintptr_t)b); }

static memplan *plan_of(const trace *t) {
    memplan *p = sdx4_memplan_new();
    CHECK(p != NULL, "sdx4_memplan_new");
    for (int e = 0; e < t->n_events; e++) {
        int b = t->event[e] >= 0 ? t->event[e] : ~t->event[e];
        if (t->event[e] >= 0) CHECK(sdx4_memplan_note_alloc(p, address(b), t->bytes[b]) == 0, "note");
        else sdx4_memplan_note_free(p, address(b));
    }
    CHECK(sdx4_memplan_finish(p, ALIGN) == 0, "finish: %s", sdx4_last_error());
    return p;
}

/* Follows the whole trace; every event must match, giving t->offset. */
static void follow_faithfully(memplan *p, trace *t) {
    sdx4_memplan_rewind(p);
    for (int e = 0; e < t->n_events; e++) {
        int b = t->event[e] >= 0 ? t->event[e] : ~t->event[e];
        if (t->event[e] >= 0) t->offset[b] = sdx4_memplan_follow_alloc(p, t->bytes[b]);
        else sdx4_memplan_follow_free(p, t->offset[b]);
    }
    CHECK(sdx4_memplan_on_track(p) && sdx4_memplan_position(p) == t->n_events,
          "faithful run left the plan at event %d of %d", sdx4_memplan_position(p), t->n_events);
}

static size_t rounded(size_t bytes) { return bytes ? (bytes + ALIGN - 1) / ALIGN * ALIGN : ALIGN; }

/* No two buffers alive at once overlap; every offset is aligned and inside
 * the arena. */
static void check_layout(const memplan *p, const trace *t) {
    int bad = 0;
    for (int a = 0; a < t->n_buffers; a++) {
        bad += t->offset[a] < 0 || t->offset[a] % ALIGN ||
               (size_t)t->offset[a] + rounded(t->bytes[a]) > sdx4_memplan_arena_bytes(p);
        for (int b = a + 1; b < t->n_buffers; b++) {
            int together = t->alloc_at[a] < t->free_at[b] && t->alloc_at[b] < t->free_at[a];
            int apart = t->offset[a] + (int64_t)t->bytes[a] <= t->offset[b] ||
                        t->offset[b] + (int64_t)t->bytes[b] <= t->offset[a];
            bad += together && !apart;
        }
    }
    CHECK(bad == 0, "%d buffers misplaced or overlapping a buffer alive beside them", bad);
}

/* Each buffer is the input of the next and freed after it: two alive at
 * once, so two places suffice. */
static void check_chain(void) {
    static trace t;
    add_alloc(&t, 1000);
    for (int i = 1; i < 50; i++) {
        add_alloc(&t, 1000);
        add_free(&t, i - 1);
    }
    memplan *p = plan_of(&t);
    follow_faithfully(p, &t);
    check_layout(p, &t);
    CHECK(sdx4_memplan_peak_bytes(p) == 2 * 1024, "peak %zu", sdx4_memplan_peak_bytes(p));
    CHECK(sdx4_memplan_arena_bytes(p) == 2 * 1024, "arena %zu", sdx4_memplan_arena_bytes(p));
    sdx4_memplan_free(p);
}

/* A U-Net in miniature: skip connections held across the whole run while
 * temporaries come and go, sizes halving on the way down. */
static void check_unet_like(void) {
    static trace t;
    int skip[8];
    size_t size = (size_t)64 << 20;
    int h = t.n_buffers;
    add_alloc(&t, size);
    for (int level = 0; level < 8; level++, size /= 2) {
        skip[level] = h;
        int tmp = t.n_buffers;
        add_alloc(&t, size * 2); /* a wider temporary */
        add_alloc(&t, size / 2);
        add_free(&t, tmp);
        h = tmp + 1;
    }
    for (int level = 7; level >= 0; level--) {
        int up = t.n_buffers;
        add_alloc(&t, (size_t)64 << (20 - level));
        add_free(&t, h);
        add_free(&t, skip[level]);
        h = up;
    }
    memplan *p = plan_of(&t);
    follow_faithfully(p, &t);
    check_layout(p, &t);
    printf("u-net-like: %d buffers, peak %.1f MiB, arena %.1f MiB\n", sdx4_memplan_buffers(p),
           sdx4_memplan_peak_bytes(p) / 1048576.0, sdx4_memplan_arena_bytes(p) / 1048576.0);
    CHECK(sdx4_memplan_arena_bytes(p) <= sdx4_memplan_peak_bytes(p) * 5 / 4, "arena %zu for peak %zu",
          sdx4_memplan_arena_bytes(p), sdx4_memplan_peak_bytes(p));
    sdx4_memplan_free(p);
}

/* Random sizes over four decades, random lifetimes, some never freed. */
static void check_random(unsigned seed) {
    static trace t;
    memset(&t, 0, sizeof t);
    int live[4096], n_live = 0;
    size_t sum = 0;
    srand(seed);
    while (t.n_events < 4000 && t.n_buffers < 2000) {
        if (n_live && (n_live > 40 || rand() % 2)) {
            int i = rand() % n_live;
            add_free(&t, live[i]);
            live[i] = live[--n_live];
        } else {
            size_t bytes = (size_t)(rand() % 1000 + 1) << (rand() % 14);
            live[n_live++] = t.n_buffers;
            add_alloc(&t, bytes);
            sum += rounded(bytes);
        }
    }
    memplan *p = plan_of(&t);
    follow_faithfully(p, &t);
    check_layout(p, &t);
    printf("random %u: %d buffers, peak %.2f MiB, arena %.2f MiB, all of them %.1f MiB\n", seed,
           sdx4_memplan_buffers(p), sdx4_memplan_peak_bytes(p) / 1048576.0,
           sdx4_memplan_arena_bytes(p) / 1048576.0, sum / 1048576.0);
    CHECK(sdx4_memplan_arena_bytes(p) >= sdx4_memplan_peak_bytes(p), "arena below the peak");
    CHECK(sdx4_memplan_arena_bytes(p) <= sdx4_memplan_peak_bytes(p) * 3 / 2, "arena %zu for peak %zu",
          sdx4_memplan_arena_bytes(p), sdx4_memplan_peak_bytes(p));

    /* a second faithful run gets the same places */
    int64_t first[4096];
    memcpy(first, t.offset, sizeof first);
    follow_faithfully(p, &t);
    CHECK(!memcmp(first, t.offset, sizeof first), "a second run got other places");
    sdx4_memplan_free(p);
}

/* A run that differs, at an allocation or at a free, leaves the plan there
 * and is given no place after. */
static void check_leaving(void) {
    static trace t;
    memset(&t, 0, sizeof t);
    for (int i = 0; i < 4; i++) add_alloc(&t, 4096);
    add_free(&t, 1);
    add_alloc(&t, 4096);
    add_free(&t, 0);
    memplan *p = plan_of(&t);

    sdx4_memplan_rewind(p);
    CHECK(sdx4_memplan_follow_alloc(p, 4096) >= 0, "first allocation");
    CHECK(sdx4_memplan_follow_alloc(p, 4000) == -1, "another size is not the plan's");
    CHECK(!sdx4_memplan_on_track(p) && sdx4_memplan_position(p) == 1, "left at %d", sdx4_memplan_position(p));
    CHECK(sdx4_memplan_follow_alloc(p, 4096) == -1, "a place after leaving");

    sdx4_memplan_rewind(p);
    int64_t o[4];
    for (int i = 0; i < 4; i++) o[i] = sdx4_memplan_follow_alloc(p, 4096);
    sdx4_memplan_follow_free(p, o[0]); /* the trace frees 1 here */
    CHECK(!sdx4_memplan_on_track(p) && sdx4_memplan_position(p) == 4, "free out of order: at %d",
          sdx4_memplan_position(p));
    CHECK(sdx4_memplan_follow_alloc(p, 4096) == -1, "a place after a wrong free");

    sdx4_memplan_rewind(p); /* more than the trace */
    for (int i = 0; i < 4; i++) o[i] = sdx4_memplan_follow_alloc(p, 4096);
    sdx4_memplan_follow_free(p, o[1]);
    sdx4_memplan_follow_alloc(p, 4096);
    sdx4_memplan_follow_free(p, o[0]);
    CHECK(sdx4_memplan_on_track(p), "the whole trace");
    CHECK(sdx4_memplan_follow_alloc(p, 4096) == -1 && !sdx4_memplan_on_track(p), "past the trace");
    sdx4_memplan_free(p);
}

/* Frees of memory from before the trace are no events; an empty trace and
 * a finished one are refused. */
static void check_tracing(void) {
    memplan *p = sdx4_memplan_new();
    sdx4_memplan_note_free(p, address(7)); /* allocated before tracing began */
    CHECK(sdx4_memplan_finish(p, ALIGN) == -1, "an empty trace was planned");
    CHECK(strstr(sdx4_last_error(), "nothing was allocated") != NULL, "%s", sdx4_last_error());
    CHECK(sdx4_memplan_note_alloc(p, address(1), 10) == 0, "note");
    sdx4_memplan_note_free(p, address(2));
    sdx4_memplan_note_free(p, address(1));
    CHECK(sdx4_memplan_finish(p, ALIGN) == 0, "finish");
    CHECK(sdx4_memplan_events(p) == 2 && sdx4_memplan_buffers(p) == 1, "%d events, %d buffers",
          sdx4_memplan_events(p), sdx4_memplan_buffers(p));
    CHECK(sdx4_memplan_note_alloc(p, address(3), 10) == -1, "noted into a finished plan");
    CHECK(sdx4_memplan_follow_alloc(p, 10) == 0, "the one place");
    sdx4_memplan_free(p);

    memplan *odd = sdx4_memplan_new();
    CHECK(sdx4_memplan_note_alloc(odd, address(1), 10) == 0, "note");
    CHECK(sdx4_memplan_finish(odd, 96) == -1, "alignment 96 accepted");
    CHECK(sdx4_memplan_finish(odd, 0) == -1, "alignment 0 accepted");
    CHECK(sdx4_memplan_note_alloc(odd, address(2), SIZE_MAX - 10) == -1, "a buffer of SIZE_MAX");
    CHECK(sdx4_memplan_finish(odd, ALIGN) == -1, "a spoiled trace was planned");
    sdx4_memplan_free(odd);

    memplan *unfinished = sdx4_memplan_new();
    CHECK(sdx4_memplan_follow_alloc(unfinished, 10) == -1, "followed an unfinished plan");
    sdx4_memplan_free(unfinished);
}

/* A run's result (never freed in the trace) is told apart from its
 * temporaries as each is placed. */
static void check_outliving(void) {
    static trace t;
    add_alloc(&t, 4096); /* a temporary */
    add_alloc(&t, 2048); /* the result */
    add_free(&t, 0);
    memplan *p = plan_of(&t);
    CHECK(!sdx4_memplan_placed_outlives(p), "nothing placed yet");
    CHECK(sdx4_memplan_follow_alloc(p, 4096) >= 0 && !sdx4_memplan_placed_outlives(p), "the temporary");
    CHECK(sdx4_memplan_follow_alloc(p, 2048) >= 0 && sdx4_memplan_placed_outlives(p), "the result");
    sdx4_memplan_free(p);
}

int main(void) {
    check_chain();
    check_unet_like();
    for (unsigned seed = 1; seed <= 5; seed++) check_random(seed);
    check_leaving();
    check_tracing();
    check_outliving();
    return test_finish("test_memplan");
}
