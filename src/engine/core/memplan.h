/*
 * memplan.h - lays out the memory of a repeated sequence of allocations in
 * one arena (a planning pass), then hands out the planned places while a
 * later run asks for the same buffers in the same order.
 *
 * A GPU backend records a UNet step once and replays it; every buffer of
 * the step (activations and scratch) lives at a fixed address from then
 * on. A caching allocator gives the recording a block per size class and
 * reuses only blocks of the same class, so the recording holds more than
 * the step ever has alive. A plan knows every buffer's size and lifetime in
 * advance, from a run of the same step with tracing on, and packs them:
 * two buffers share bytes only when one is freed before the other is
 * allocated. The packing is the "greedy by size" of Pisarchyk and Lee
 * (arXiv:2001.03288), which TensorFlow Lite's arena planner also uses:
 * largest buffer first, each at the lowest-waste gap among the buffers
 * already placed whose lifetimes overlap its own.
 *
 * Following a plan checks every allocation and free against the trace; at
 * the first one that differs the run has left the plan, and every later
 * allocation is answered -1 (the caller allocates elsewhere). Buffers
 * already handed out stay where they are: no new buffer is placed over
 * them, so leaving the plan is always safe.
 *
 * Not thread-safe: one plan belongs to one run on one thread.
 */
#ifndef SDX4_MEMPLAN_H
#define SDX4_MEMPLAN_H

#include <stddef.h>
#include <stdint.h>

typedef struct memplan memplan;

memplan *sdx4_memplan_new(void); /* NULL: out of memory */
void sdx4_memplan_free(memplan *p);

/* --- tracing: the allocations and frees of one run, in order ----------- */
/* -1 when out of memory or for more than SIZE_MAX / 2 bytes (the trace is
 * then spoiled: sdx4_memplan_finish fails). */
int sdx4_memplan_note_alloc(memplan *p, const void *ptr, size_t bytes);
/* A free of memory that was allocated before tracing began is no event. */
void sdx4_memplan_note_free(memplan *p, const void *ptr);

/* Ends the trace and places every buffer at a multiple of `align` (a power
 * of two); -1 with the error set when the trace is spoiled or empty. */
int sdx4_memplan_finish(memplan *p, size_t align);
size_t sdx4_memplan_arena_bytes(const memplan *p); /* the layout's extent */
size_t sdx4_memplan_peak_bytes(const memplan *p);  /* most bytes alive at once */
int sdx4_memplan_buffers(const memplan *p);

/* --- following a finished plan ---------------------------------------- */
/* Starts over at the first event (each run of the step follows it anew). */
void sdx4_memplan_rewind(memplan *p);
/* The offset of this allocation in the arena, or -1 when it is not the
 * one the trace has next. */
int64_t sdx4_memplan_follow_alloc(memplan *p, size_t bytes);
/* Whether the buffer that sdx4_memplan_follow_alloc has just placed was
 * never freed in the trace (a result of the run, or a cache it filled):
 * where the next run calls the step's code again rather than replaying it
 * (the CPU), such a buffer is still alive when that run's buffers take
 * their places, so it must live elsewhere. */
int sdx4_memplan_placed_outlives(const memplan *p);
/* The free of a buffer at `offset` that sdx4_memplan_follow_alloc gave. */
void sdx4_memplan_follow_free(memplan *p, int64_t offset);
/* 1 while every event so far was the trace's, 0 once the run has left it. */
int sdx4_memplan_on_track(const memplan *p);
/* Events matched so far (for diagnostics: where a run left the plan). */
int sdx4_memplan_position(const memplan *p);
int sdx4_memplan_events(const memplan *p);

#endif
