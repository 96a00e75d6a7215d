/*
 * cluster.h - the protocol of cluster mode: what API nodes and workers
 * keep in Redis and say to each other through it. docs/cluster.md
 * describes it whole; this header is its only implementation's interface
 * (cluster.c), so that no other module spells a key or a field.
 *
 * Keys (all under "sdx4:"):
 *   sdx4:tasks            stream of tasks, consumer group "sdx4-workers";
 *                         an entry: job <id>, task <i>, record <JSON>,
 *                         estimate <seconds alone on a device, 0 unknown>
 *   sdx4:input:<id>:<i>   a task's input pixels (RGB8, row-major)
 *   sdx4:job:<id>         hash: meta <JSON>, task:<i> <JSON>, unfinished <n>,
 *                         state <name>, finished <wall seconds>, webhook
 *                         <JSON: its delivery>
 *   sdx4:result:<id>:<i>  a finished task's encoded image (unless its state
 *                         says "stored": then it is in object storage)
 *   sdx4:results          sorted set of stored results for the byte budget
 *                         ("<key> <bytes>" scored by expiry); their sum
 *                         in sdx4:results:bytes
 *   sdx4:cancel:<id>      why the job was stopped ("client", "timeout",
 *                         "shutdown"); workers read it at every step
 *   sdx4:events:<id>      pub/sub channel of the job's changes
 *   sdx4:worker:<name>    a worker's registration (hash, expires unless
 *                         refreshed); sdx4:workers is the set of names
 *
 * A task travels as one record (cluster_task) serialised from one
 * description of the parameters; its state as one JSON object per task in
 * the job's hash, changed only through cluster_finish_task's compare-and-
 * set, so that whoever finishes a task first (its worker, a cancel, a
 * deadline, a reclaim that gave up) finishes it once, and whoever takes the
 * job's last task to a final state finishes the job (webhook, history).
 *
 * Every function returns 0 on success and -1 with `err` set when Redis is
 * unreachable or answered with an error; none blocks longer than the
 * redis.h timeout unless it says so.
 */
#ifndef SDX4_SERVER_CLUSTER_H
#define SDX4_SERVER_CLUSTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "form.h"
#include "history.h"
#include "jobs.h"
#include "problem.h"
#include "redis.h"
#include "sdx4.h"

#define CLUSTER_STREAM "sdx4:tasks"
#define CLUSTER_GROUP "sdx4-workers"

/* One task as it travels: everything a worker needs, nothing it must look
 * up elsewhere but the input pixels. */
typedef struct {
    char job_id[33];
    int index;
    form_kind kind;
    char client[64], request_id[48], owner[65];
    double created, deadline; /* wall clock (epoch seconds): nodes share no monotonic clock */
    upscale_options opts;     /* prompt strings owned by the record */
    char model[64];           /* the model's name ("" in records of earlier
                                 versions: the worker's default model) */
    int width, height;        /* of the input */
    void *icc;                /* the input's ICC profile, kept for the output's
                                 metadata (NULL none; owned as opts is) */
    size_t icc_len;
    uint8_t cache_key[32];
    bool cacheable;
    char content_check[16]; /* what the API node's key assumes: "" none,
                               "refuse" or "blackout" (runner.h) */
    char entry_id[32]; /* the stream entry it came from (workers) */
    int deliveries;    /* times the stream delivered it (workers), 1 the first */
} cluster_task;

void cluster_task_free(cluster_task *t);
json_t *cluster_task_to_json(const cluster_task *t);
int cluster_task_from_json(const json_t *record, cluster_task *t, char *err, size_t err_size);

/* A task's state as kept in the job's hash. */
typedef struct {
    job_state state;
    int step, total;
    double started, finished; /* wall clock, 0 when not yet */
    int width, height;        /* of the result */
    size_t bytes;             /* of the encoded result */
    bool stored;              /* the result is in object storage (--s3-bucket), not in Redis */
    sdx4_upscale_report report;
    problem error;
    char worker[64];
    char model_hash[65]; /* the worker's weights (models.c), "" unknown */
    char content_check[16]; /* the worker's runner_content_check_policy() */
    double compute; /* its share of device seconds (task_outcome's), -1 unknown:
                       a state of an earlier version */
} cluster_task_state;

json_t *cluster_state_to_json(const cluster_task_state *s);
int cluster_state_from_json(const json_t *j, cluster_task_state *s);

/* The job's meta record (kind, owner, client, request id, times, task
 * count, webhook URL). */
typedef struct {
    char id[33];
    form_kind kind;
    bool listed;
    char client[64], request_id[48], owner[65];
    double created, deadline; /* wall clock */
    int ntasks;
    char model[64];    /* the model that runs its tasks ("" unknown: an earlier version's) */
    char *webhook_url; /* owned, NULL none */
    /* filled by cluster_load_job from the hash */
    job_state state;  /* JOB_QUEUED until the last task is final */
    double finished;  /* wall clock, 0 when not yet */
    char webhook[16]; /* its delivery as its sender wrote it ("pending"...), "" none yet */
    int webhook_attempts;
    char webhook_error[320];
} cluster_job;

/* Submits a job atomically (one script): its hash, the inputs and one
 * stream entry per task in `tasks` (the others, cache hits or rejected,
 * are written final in `states`). Refused with `why` (its retry_after
 * set), nothing then written: PROBLEM_QUEUE_FULL when the tasks waiting
 * in the whole cluster plus these would exceed `capacity`;
 * PROBLEM_QUEUE_TOO_LONG when the estimated seconds of the work in the
 * stream (waiting, and what the running tasks have left) and of these,
 * shared by `devices` workers, would end past the job's deadline.
 * `estimates` (by task index, NULL none) are each task's seconds alone
 * on a device (cost.h), kept in its entry for the next submits; devices
 * 0 leaves the time out. -1 both ways: why->kind is PROBLEM_NONE when
 * Redis failed (`err` says how). */
int cluster_submit(redis *r, const cluster_job *job, const cluster_task *tasks, const sdx4_image *inputs,
                   const bool *queued, const cluster_task_state *states, const double *estimates, int devices,
                   int capacity, double retention, problem *why, char *err, size_t err_size);

/* The job's meta and its tasks' states (`states` has room for ntasks,
 * FORM_MAX_IMAGES at most). 1 found, 0 no such job, -1 Redis failed,
 * CLUSTER_JOB_UNREADABLE when the job's hash does not parse (a node of
 * another version, a hand edit); `err` says why. */
#define CLUSTER_JOB_UNREADABLE (-2)
int cluster_load_job(redis *r, const char *id, cluster_job *job, cluster_task_state *states,
                     char *err, size_t err_size);
void cluster_job_free(cluster_job *job);

/* Compare-and-set of a task to a final state (stores `result` first when
 * given, under the byte budget; none for a state that says `stored`): 1
 * this call finished it, 2 it also finished the job, 0 it was already
 * final, -1 error. Publishes the change. On 2 the caller sends the
 * webhook and writes history from `ended` and `ended_states` (as
 * cluster_load_job's; free with cluster_job_free), read in the same
 * script: a DELETE right after (cluster_forget) cannot take the job from
 * under its report. NULL `ended`: not wanted; its ntasks 0: the hash
 * did not read (`err` says why). */
int cluster_finish_task(redis *r, const char *job_id, int index, const cluster_task_state *state,
                        const void *result, size_t result_len, double retention, size_t budget,
                        cluster_job *ended, cluster_task_state *ended_states, char *err, size_t err_size);

/* Progress of a running task (not final): updates its state, publishes.
 * 1 done, 0 the task is final already (finished by another party, e.g. a
 * cancel, or its job is gone): whoever runs it may stop; -1 error. */
int cluster_report_progress(redis *r, const char *job_id, int index, const cluster_task_state *state,
                            char *err, size_t err_size);

/* A stored result (malloc'd, free it); 1 found, 0 gone (expired), -1 error. */
int cluster_load_result(redis *r, const char *job_id, int index, void **data, size_t *len, char *err,
                        size_t err_size);
/* Deletes a stored result and takes it out of the results' byte budget
 * (a synchronous request's, once read); 0 done (or gone already), -1 error. */
int cluster_drop_result(redis *r, const char *job_id, int index, char *err, size_t err_size);

/* Asks whoever runs the job's tasks to stop (`reason` STOP_*), and takes
 * its waiting tasks out of the stream. */
int cluster_cancel(redis *r, const char *job_id, int reason, double ttl, char *err, size_t err_size);
/* The stop reason on record for a job (STOP_NONE if none), for workers. */
int cluster_stop_reason(redis *r, const char *job_id, int *reason, char *err, size_t err_size);

/* Events: API nodes subscribe to the pattern (one connection, redis_borrow)
 * and apply each message to the job they hold, if they hold it. The
 * message carries the task's whole state, so a node that missed some
 * loses nothing but intermediate steps; nodes still re-read the hash of
 * the jobs they wait on now and then (cluster_load_job) for the final
 * state, in case a message was lost over a reconnect. */
#define CLUSTER_EVENTS_PATTERN "sdx4:events:*"
int cluster_parse_event(const char *channel, const char *message, size_t len, char job_id[33],
                        int *index, cluster_task_state *state);

/* The registered, live workers: [{name, model_id, device, variant, model:
 * {...model-info...}, cost, models: {<name>: {model, cost}}, busy,
 * started}], for health and model-info. model_id, model and cost are
 * the worker's default model's (all that workers of earlier versions,
 * serving one model, register). */
int cluster_workers(redis *r, json_t **list, char *err, size_t err_size);

/* What a registered worker (an entry of cluster_workers) says of the
 * model named `model`: an object with "model" (its model-info) and
 * "cost" (its estimator's curve, once published), or NULL when the
 * worker does not serve it. */
const json_t *cluster_worker_model(const json_t *worker, const char *model);

/* Tasks waiting in the whole cluster (not yet taken by a worker). */
int cluster_waiting(redis *r, long long *waiting, char *err, size_t err_size);

/* Every job in the shared store (the admin API's listing in cluster mode):
 * their status documents with owner, client, request id and listed,
 * newest first, `state` ("queued"... or NULL: any) and at most `limit`.
 * It walks the job keys with SCAN, reading each job's hash: a cost in
 * proportion to the jobs retained (--job-retention, --jobs-memory) that
 * an administrator's listing may pay, not a request. 0, or -1 with `err`. */
int cluster_list_jobs(redis *r, const char *state, int limit, json_t **jobs, char *err, size_t err_size);

/* The job's status document, as GET /api/v1/jobs/{id} and webhooks show
 * it (jobs.c's job_document for a job kept in Redis); `webhook` is its
 * webhook's status ("pending"...) unless the hash has one, ignored when
 * the job has none. */
json_t *cluster_job_document(const cluster_job *job, const cluster_task_state *states,
                             const char *webhook);

/* The history row (history.h) of an ended job, as jobs.c writes it in
 * single-process mode, from its meta, its tasks' states and the records
 * kept in its hash (an image without one gets nulls, as one refused
 * before it ran). `e->parameters` is malloc'd: free it. */
int cluster_history_entry(redis *r, const cluster_job *job, const cluster_task_state *states, history_entry *e,
                          char *err, size_t err_size);

/* The delivery of a job's webhook, written by the party that sends it
 * (whoever finished the job) into the job's hash and published on its
 * channel, so that every node's copy shows it as single-process mode
 * does: `status` "pending" (written only if nothing is yet: a delivery
 * may report before its sender has), "delivered" or "failed", with the
 * attempts made and why it failed (NULL none). A job gone is left alone. */
int cluster_webhook_state(redis *r, const char *job_id, const char *status, int attempts, const char *error,
                          char *err, size_t err_size);
/* A message of the job's channel that is a webhook's delivery. */
bool cluster_parse_webhook(const char *channel, const char *message, size_t len, char job_id[33], char *status,
                           size_t status_size, int *attempts, char *error, size_t error_size);

/* ---- workers ---------------------------------------------------------------- */

/* Creates the consumer group (and the stream) unless it exists. */
int cluster_ensure_group(redis *r, char *err, size_t err_size);

/* A stream entry as a worker receives it: the task, or why its record was
 * refused (`invalid` not empty; task.job_id and task.index are then set
 * when the entry named them, task.entry_id always). */
typedef struct {
    cluster_task task;
    char invalid[256];
} cluster_delivery;

/* Takes up to `max` new tasks for `consumer` (XREADGROUP), waiting up to
 * `block_ms` on `c`, a connection borrowed for it (redis_borrow). Returns
 * the number taken (0 when none came), -1 on error (the connection is then
 * broken). Free each delivery's task with cluster_task_free. */
int cluster_take(redisContext *c, const char *consumer, int max, int block_ms, cluster_delivery *out,
                 char *err, size_t err_size);

/* Takes over up to `max` entries idle for `min_idle` seconds, those of
 * dead workers (XAUTOCLAIM), with their delivery counts. */
int cluster_reclaim(redis *r, const char *consumer, double min_idle, int max, cluster_delivery *out,
                    char *err, size_t err_size);

/* Resets the idle time of entries `consumer` holds, so that no one
 * reclaims them (XCLAIM JUSTID: the delivery count stays). */
int cluster_hold(redis *r, const char *consumer, const char *const *entry_ids, int n, char *err,
                 size_t err_size);

/* Acknowledges and deletes an entry whose task is final. */
int cluster_ack(redis *r, const char *entry_id, char *err, size_t err_size);

/* A task's input pixels into `image` (pixels malloc'd): 1 found, 0 gone
 * (expired, or the wrong size), -1 error. */
int cluster_load_input(redis *r, const cluster_task *t, sdx4_image *image, char *err, size_t err_size);

/* Registers a worker for `ttl` seconds (call again to refresh): `info` is
 * its {name, model_id, device, variant, model, started} object, `busy` its
 * running tasks. */
int cluster_register(redis *r, const char *name, const json_t *info, int busy, double ttl, char *err,
                     size_t err_size);
int cluster_unregister(redis *r, const char *name, char *err, size_t err_size);

/* ---- API nodes ----------------------------------------------------------------
 * Added by the API node (dispatch_redis.c): what a node needs to rebuild a
 * job made on another one, and to forget a deleted job everywhere. */

/* Keeps the records of the job's tasks (`tasks`, ntasks of them) in its
 * hash, so that another node can answer for them (format, seed, sizes)
 * once their stream entries are gone. Nothing is written if the job is
 * gone. */
int cluster_keep_records(redis *r, const char *job_id, const cluster_task *tasks, int ntasks, char *err,
                         size_t err_size);
/* The records kept for the job's first `ntasks` tasks; a task without a
 * readable one gets only its job id and index. Free each with
 * cluster_task_free. */
int cluster_load_records(redis *r, const char *job_id, cluster_task *tasks, int ntasks, char *err,
                         size_t err_size);
/* Drops the job and its results (DELETE): it is then unknown to every node.
 * Its running tasks' finishes become no-ops (cluster_finish_task finds no
 * task to finish). Nodes holding a copy hear it on the job's channel:
 * cluster_parse_forgotten tells that message from the others. */
int cluster_forget(redis *r, const char *job_id, int ntasks, char *err, size_t err_size);
bool cluster_parse_forgotten(const char *channel, const char *message, size_t len, char job_id[33]);

#endif
