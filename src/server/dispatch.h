/*
 * dispatch.h - where jobs.c sends the tasks it wants run.
 *
 * jobs.c keeps the jobs that clients wait on; something else runs their
 * tasks: the in-memory queue and its worker threads (queue.c), or, in
 * cluster mode, the workers behind Redis (dispatch_redis.c). jobs.c sees
 * either only through this table of functions, as the engine sees its
 * backend, so that neither includes jobs.c's callers nor jobs.c theirs.
 *
 * The contract, whatever runs the tasks:
 *   - push takes all of a job's tasks or none, and is called under the job
 *     store's lock (so a task cannot be reported before its job is known).
 *   - From then on the dispatcher holds one job reference per task. It
 *     reports each task through job_task_started, job_task_progress and
 *     job_task_finished (jobs.h), then drops the reference (job_release).
 *   - withdraw is called, under the store's lock, for each unfinished task
 *     of a job being stopped (`reason` STOP_*; the task's error already
 *     says why): it returns 1 when the task will never be reported (the
 *     caller drops its reference), 0 when a worker has it and will report
 *     it (its stop flag is already set).
 *   - A shared dispatcher (cluster mode) keeps jobs where every node sees
 *     them: a job made elsewhere is found through `find` and rebuilt here
 *     (job_adopt), whose unfinished tasks `watch` then reports like pushed
 *     ones; and whoever finishes a job in the shared store sends its
 *     webhook, not each node holding a copy. The queue has neither.
 */
#ifndef SDX4_SERVER_DISPATCH_H
#define SDX4_SERVER_DISPATCH_H

#include <stdbool.h>

#include <jansson.h>

#include "problem.h"

struct task;
struct job;

typedef struct {
    int depth, capacity, running, workers;
    int busy_after_deadline; /* running tasks whose job's deadline passed */
} dispatch_stats;

typedef struct {
    /* Queues all of `tasks` (those of job `j` that need running, maybe
     * none, ending at `deadline`, mono_now() clock) or none: -1 with `why`
     * set when they are refused. */
    int (*push)(void *ctx, struct job *j, struct task **tasks, int n, double deadline, problem *why);
    int (*withdraw)(void *ctx, struct task *t, int reason);
    /* How many tasks will be started before this one; -1 not known. */
    int (*position)(void *ctx, const struct task *t);
    /* Refuse new tasks from now on (shutdown). */
    void (*close)(void *ctx);
    void (*stats)(void *ctx, dispatch_stats *stats);
    bool shared;
    /* A listed job of `owner` made elsewhere, adopted here (referenced),
     * or NULL: not found (`why` untouched), or the store cannot be read
     * (`why` says why). */
    struct job *(*find)(void *ctx, const char *id, const char *owner, problem *why);
    /* Reports task `t`, submitted elsewhere, from now on (under the
     * store's lock, holding a reference as after push). */
    void (*watch)(void *ctx, struct task *t);
    /* DELETE (under the store's lock): the job is forgotten by every node. */
    void (*forget)(void *ctx, struct job *j);
    /* Brings this node's copy of job `id` (unfinished, watched here) to
     * the shared store's state now, so that a read through this node never
     * shows less than another node already showed; the change events and
     * the keeper's sweep would bring it a moment later. NULL for the
     * queue, whose copy is the only one. */
    void (*refresh)(void *ctx, const char *id);
    /* The admin API's listing of every job in the shared store (documents
     * with owner, client, request id; newest first; `state` or NULL for
     * any; at most `limit`), or NULL with `why` set. NULL for the queue,
     * whose jobs are all in this node's store. */
    json_t *(*list)(void *ctx, const char *state, int limit, problem *why);
} dispatch_iface;

typedef struct dispatch {
    const dispatch_iface *iface;
    void *ctx;
} dispatch;

static inline int dispatch_push(const dispatch *d, struct job *j, struct task **tasks, int n,
                                double deadline, problem *why) {
    return d->iface->push(d->ctx, j, tasks, n, deadline, why);
}
static inline int dispatch_withdraw(const dispatch *d, struct task *t, int reason) {
    return d->iface->withdraw(d->ctx, t, reason);
}
static inline int dispatch_position(const dispatch *d, const struct task *t) {
    return d->iface->position(d->ctx, t);
}
static inline void dispatch_close(const dispatch *d) { d->iface->close(d->ctx); }
static inline void dispatch_stats_get(const dispatch *d, dispatch_stats *s) {
    if (d->iface) d->iface->stats(d->ctx, s);
    else *s = (dispatch_stats){0};
}

#endif
