/*
 * worker.h - cluster mode's consumer of tasks: threads that take tasks
 * from the Redis stream, run them on a shared engine, store their
 * outcomes and acknowledge them. `sdx4 worker` runs one; `sdx4 serve
 * --redis URL --workers N` may run one inside an API node.
 */
#ifndef SDX4_SERVER_WORKER_H
#define SDX4_SERVER_WORKER_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "redis.h"
#include "sdx4.h"

struct server;
struct served_model;
struct webhooks;
struct history;

typedef struct {
    const char *name;          /* consumer and registration name, unique in the cluster */
    int threads;               /* tasks run at once (they share the engine) */
    double visibility_timeout; /* seconds an entry may go unrefreshed before another worker takes it */
    int max_attempts;          /* deliveries of one task before it is failed instead of run */
    double job_retention;      /* seconds results (and finished jobs) are kept */
    size_t jobs_memory;        /* bytes of results kept, the whole cluster's */
    struct server *results;    /* a server whose results store is open (--s3-bucket, results.h):
                                  every image goes there, not to Redis; NULL: to Redis */
    struct history *history;   /* where the jobs this worker ends are recorded; NULL none */
    int max_batch_size;        /* tasks of its threads that share one UNet call (1: none) */
    double batch_window;       /* seconds a lone task waits for others' company */
} worker_settings;

typedef struct worker worker;

/* Starts the threads, serving the loaded models models[0..nmodels) (the
 * first the default, for tasks that name none; each one's estimator, if
 * any, is published in the registration and taught by the tasks run);
 * the models and `r` must outlive worker_stop. `info` is what the
 * registration says of this worker (name, models, device:
 * status_registration, cluster_register); `hooks` sends the webhooks of
 * the jobs it ends, NULL when this process cannot sign them (they are
 * then failed with a log line). NULL with `err` set if a thread cannot
 * start. */
worker *worker_start(struct served_model *models, int nmodels, redis *r, struct webhooks *hooks,
                     const worker_settings *settings, const json_t *info, char *err, size_t err_size);

/* Takes nothing new and lets the running tasks finish until `deadline`
 * (mono_now() clock); then stops them, leaving their entries pending for
 * other workers to reclaim; unregisters. -1 when a thread is still inside
 * the engine after the deadline (then keep everything it may touch). */
int worker_stop(worker *w, double deadline);
/* After a worker_stop that returned 0. */
void worker_free(worker *w);

typedef struct {
    long long succeeded, failed, canceled; /* tasks this process ended, by outcome */
    long long refused_model;               /* tasks for a model this worker does not serve (failed) */
    long long redis_errors;                /* calls to Redis that failed */
    int busy, threads;
    bool redis_up, stopping;
} worker_stats;

void worker_get_stats(worker *w, worker_stats *s);

#endif
