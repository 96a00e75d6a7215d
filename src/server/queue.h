/*
 * queue.h - the bounded queue of upscale tasks and the workers that run them.
 */
#ifndef SDX4_SERVER_QUEUE_H
#define SDX4_SERVER_QUEUE_H

#include <stdbool.h>

#include "dispatch.h"
#include "problem.h"
#include "server.h"

struct task;
typedef struct queue queue;

typedef dispatch_stats queue_stats;

/* A busy worker's batch. */
typedef struct {
    char request_id[48];  /* its first task's */
    int model;            /* its model (srv->models): a batch's tasks share it */
    int tasks;            /* sharing its UNet calls */
    double seconds;       /* since it started */
    double past_deadline; /* seconds since its job's deadline, 0 before */
    double estimate;      /* seconds its tasks were estimated to take alone, added; 0 unknown */
} queue_worker;

/* Starts `workers` threads running upscales on the engines of srv->models
 * (each task on its own model's). */
queue *queue_create(server *srv, int workers, int capacity);
/* Stops the workers after the tasks in hand; returns 0 if all of them
 * stopped before `deadline` (mono_now() clock) and the queue was freed,
 * -1 if one is still inside the engine (then the queue is left to the
 * process's exit). */
int queue_destroy(queue *q, double deadline);

/* Queues all of `tasks` (of one job, ending at `deadline`) or none: -1
 * with `why` set when fewer than n places are free, the queue is closed,
 * or (once cost.c is calibrated) the tasks cannot end by the deadline.
 * Sets each task's estimate. */
int queue_push(queue *q, struct task **tasks, int n, double deadline, problem *why);
/* Takes a task out if it is still waiting: 1 if removed, 0 if a worker
 * already has it (or it was never queued). */
int queue_remove(queue *q, struct task *t);
/* How many tasks will be started before this one; -1 if not waiting. */
int queue_position(queue *q, const struct task *t);
/* Refuse new tasks from now on (shutdown). */
void queue_close(queue *q);
void queue_get_stats(queue *q, queue_stats *stats);
/* The busy workers' tasks, at most `max`; returns how many. */
int queue_get_workers(queue *q, queue_worker *out, int max);

/* The queue as jobs.c's dispatcher (dispatch.h). */
dispatch queue_dispatch(queue *q);

#endif
