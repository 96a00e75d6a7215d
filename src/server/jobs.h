/*
 * jobs.h - upscale jobs: one or more images, their progress and results.
 *
 * Every upscale request becomes a job of one task per image, whether the
 * client waits for it (POST /upscale, /batch-upscale) or polls it (POST
 * /jobs, async batches: "listed" jobs, found by id). A job has a deadline
 * from its arrival; when it passes, or the client deletes the job, or the
 * server shuts down, its unfinished tasks are canceled at once: queued ones
 * leave the queue, running ones are told to stop at the next step boundary.
 *
 * Waiting is by callback, never by blocking a thread: an HTTP connection
 * registers a waiter (and suspends itself) and is woken when the job
 * changes. All job state is guarded by the store's lock; a task's outputs
 * are written before it is marked finished and never change afterwards.
 */
#ifndef SDX4_SERVER_JOBS_H
#define SDX4_SERVER_JOBS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include "form.h"
#include "problem.h"
#include "sdx4.h"
#include "server.h"

typedef enum { JOB_QUEUED, JOB_RUNNING, JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELED } job_state;

/* Why a task stops early (task.stop). */
enum { STOP_NONE, STOP_CLIENT, STOP_TIMEOUT, STOP_SHUTDOWN };

typedef struct job job;
typedef struct job_store job_store;

typedef struct task {
    job *job;
    int index;
    /* input, set before the job is submitted */
    sdx4_image input;
    upscale_options opts;
    int model;      /* its model: an index into srv->models (a job's tasks share it) */
    void *icc;      /* the input's ICC profile where opts.metadata keeps it, else NULL */
    size_t icc_len;
    uint8_t cache_key[32];
    bool cacheable; /* explicit seed and a cache */
    double estimate; /* seconds alone on the device (cost.c, set by queue_push); 0 unknown */
    /* progress, under the store lock */
    job_state state;
    int step, total;
    double enqueued, started, finished; /* mono_now() */
    atomic_int stop;                    /* STOP_*: read by the worker each step */
    /* output, written before `state` becomes final */
    void *output; /* encoded image */
    size_t output_len;
    int out_width, out_height;
    sdx4_upscale_report report;
    char model_hash[65]; /* the weights that made the output (models.c), "" unknown */
    double compute; /* its share of device seconds (task_outcome's), 0 when it never ran */
    bool cache_hit; /* output came from the cache, before submission */
    problem error;
    /* queue links (queue.c) */
    struct task *queue_next;
    struct queue_lane *lane;
} task;

/* Something waiting for a job to change: an HTTP connection. `suspend`
 * runs under the store lock when the waiter is registered, `wake` after
 * the lock is released; every registration gets exactly one wake. */
typedef struct waiter {
    void (*suspend)(void *arg);
    void (*wake)(void *arg);
    void *arg;
    bool final_only; /* wake on completion only, not on each step */
    struct waiter *next;
} waiter;

job_store *job_store_create(server *srv);
/* Stops the reaper; jobs still referenced by connections stay valid until
 * they are released. */
void job_store_destroy(job_store *s);

/* A new job of `ntasks` tasks, referenced once by the caller. `listed`
 * jobs get an id and are found by job_find until retention drops them. */
job *job_create(job_store *s, form_kind kind, int ntasks, bool listed, const char *client,
                const char *request_id, double arrival);
task *job_task(job *j, int i);
int job_ntasks(const job *j);
const char *job_id(const job *j);
const char *job_client(const job *j);
const char *job_request_id(const job *j);
const char *job_owner(const job *j);
const char *job_webhook_url(const job *j); /* NULL none */
bool job_listed(const job *j);
double job_created_wall(const job *j); /* epoch seconds */
double job_deadline(const job *j); /* mono_now() clock */
form_kind job_kind(const job *j);
void job_set_webhook(job *j, const char *url);
/* The identity that made the job (auth.h): only it finds the job by id.
 * "" (the default) for anonymous clients, whom the id alone admits. */
void job_set_owner(job *j, const char *owner);

/* Fails a task before submission (a batch image that did not decode). */
void job_task_reject(task *t, const problem *why);

/* Finishes the tasks answered from the cache (cache_hit, their output
 * filled in by the caller), then queues the rest (all or none).
 * -1 and a problem (queue full, shutting down) if they cannot be queued. */
int job_submit(job *j, problem *err);

/* A referenced listed job by id, or NULL; job_release drops a reference.
 * A job of another owner is not found: its id answers exactly as an
 * unknown one, so that ids cannot be probed across keys. `owner` NULL
 * (the admin API) finds any owner's, and this node's synchronous upscales
 * too. In cluster mode a listed job unknown here is looked for in the
 * shared store (dispatch.h): NULL with `why` set when that cannot be read
 * (else why->kind is NONE). */
job *job_find(job_store *s, const char *id, const char *owner, problem *why);

/* The admin API's listing: the jobs this store holds, unfinished then
 * retained, newest first within each, at most `limit`, only those in
 * `state` (a job_state_name, NULL any): job documents with their owner,
 * client, request id and whether they are listed. */
json_t *job_store_list(job_store *s, const char *state, int limit);

/* Cluster mode: `j` (from job_create, listed, its owner, webhook and
 * tasks filled in, each task's state, step and outputs as the shared store
 * has them) is a job made on another node, known here from now on by `id`
 * and kept up to date by the dispatcher (dispatch.h, watch). Returns the
 * job known by that id, referenced: j, or one adopted meanwhile by another
 * request (j is then released). */
job *job_adopt(job *j, const char *id);
void job_release(job *j);

/* DELETE: cancels the unfinished tasks and forgets the job (its id then
 * answers 404); connections holding it still see its final state. */
void job_delete(job *j);
/* The admin API's cancel: the unfinished tasks stop as with DELETE, but
 * the job stays, canceled, for its owner to see. */
void job_cancel(job *j);
/* Cluster mode: another node deleted the job; it is forgotten here too. */
void job_forgotten(job_store *s, const char *id);
/* The ids of the finished jobs kept for GET (malloc'd into *ids): what a
 * node re-checks against the shared store after it may have missed its
 * forgotten messages. Their count, or -1 out of memory. */
int job_retained_ids(job_store *s, char (**ids)[33]);
/* Cluster mode: the delivery of the job's webhook as its sender wrote it
 * ("pending", "delivered", "failed"; error NULL or "" none). */
void job_webhook_state(job_store *s, const char *id, const char *status, int attempts, const char *error);

/* Registers `w` unless the job changed since `seen_version` (or finished,
 * for a final_only waiter): 0 registered (the connection is now
 * suspended), 1 changed. */
int job_wait(job *j, unsigned seen_version, waiter *w);

/* Unregisters `w` if it is still waiting (its connection is going away). */
void job_unwait(job *j, waiter *w);

/* A consistent view of the job for answers (under the lock). */
typedef struct {
    job_state state;
    unsigned version;
    problem error; /* failed or canceled: why */
} job_view;
void job_get_view(job *j, job_view *v);

/* The status document (GET /jobs/{id}, SSE events, webhooks). */
json_t *job_document(job *j);

/* The per-image entries of a finished batch ({"results":[...]}). */
json_t *job_batch_results(job *j);

/* Shutdown: refuse new jobs, wait for active ones until `deadline`
 * (mono_now() clock), then cancel what is left. */
void job_store_drain(job_store *s, double deadline);

/* From the dispatcher (dispatch.h): the task lifecycle. job_task_started returns false
 * when the task was canceled before it could start. */
bool job_task_started(task *t);
/* Returns nonzero to stop the upscale (the task's `stop` reason). */
int job_task_progress(task *t, int step, int total);
/* What a worker made of a task; `output` passes to the task. */
typedef struct {
    job_state state;
    void *output;
    size_t len;
    int width, height;
    sdx4_upscale_report report;
    char model_hash[65]; /* the weights that made it, "" unknown */
    double compute_seconds; /* its share of the device time of the run it was in */
    problem error; /* when failed */
} task_outcome;
void job_task_finished(task *t, task_outcome *outcome);

const char *job_state_name(job_state s);

#endif
