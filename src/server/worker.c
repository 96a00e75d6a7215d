/*
 * worker.c - cluster mode's consumer of tasks (see worker.h).
 *
 * Threads. Each of `threads` consumers takes one task at a time from the
 * stream (XREADGROUP, blocking up to a second on a connection of its
 * own), so a process never holds more tasks than it can run; all share
 * the engine (sdx4.h allows concurrent calls). A consumer with nothing to
 * do also looks, every few seconds, for entries idle longer than the
 * visibility timeout: those of workers that died (XAUTOCLAIM).
 *
 * Batches. A thread whose task can share its UNet calls with the task
 * of a thread that is waiting for company (the same size, steps, sampler,
 * guidance or not: sdx4_batchable) joins that batch instead of running
 * alone; the first waits --batch-window for others (up to
 * --max-batch-size, the threads, the engine's memory budget), then runs
 * them all, and every thread goes on with its own task's outcome. Each
 * keeps its stop flag and progress callback: a canceled one leaves the
 * batch, the others go on (sdx4_upscale_batch).
 *
 * A task's life: a record refused, a task delivered more than
 * max_attempts times (it killed every worker that took it), a job
 * stopped (cancel key) or past its deadline, or an input gone, ends the
 * task at once with its reason; otherwise it is marked running and run
 * through runner.c, the engine's stop flag set from the progress
 * callback, which at each step reads the job's cancel key and the
 * deadline (wall clock: nodes share no other) and reports progress at
 * most every PROGRESS_INTERVAL. The outcome is stored by
 * cluster_finish_task's compare-and-set, and only then is the entry
 * acknowledged: a worker that dies first leaves the entry pending, to be
 * reclaimed and run again (at least once; a second finish is a no-op).
 * Whoever ends a job's last task sends its webhook, writes its delivery
 * into the job (cluster_webhook_state) for the API nodes, and writes the
 * job's history row (--history): exactly once per job, whichever node
 * made it and whether or not that node is still alive. With a results
 * store (--s3-bucket) the image is uploaded before the finish, which then
 * carries no bytes; an upload that fails fails the task (storage-failed),
 * and one whose finish found the task ended elsewhere is removed again.
 *
 * Models. A worker serves the models its settings name (models.c, the
 * same list as the API nodes'), all loaded at start; a task names its
 * model (the default when its record names none), and runs on that
 * model's engine, batched only with tasks of the same model. A task for
 * a model this worker does not have fails at once, saying which models
 * it has: the workers of a cluster are meant to serve the same list, and
 * a task left for another would wait for a worker that may never come.
 *
 * Estimates. With a time estimator (cost.c) per model the registration
 * carries each one's curve, refreshed with every heartbeat, so that API
 * nodes without a model can admit by estimated time; a worker of one
 * thread teaches them with every task it runs, as single-process mode's
 * queue does.
 *
 * Liveness. A heartbeat thread refreshes the registration (TTL
 * REGISTRATION_TTL) and resets the idle time of the entries being run
 * (XCLAIM JUSTID, which leaves their delivery counts alone), often enough
 * that no live worker's entry reaches the visibility timeout.
 *
 * Redis away. Calls fail within redis.h's timeout; consumers retry every
 * second, an outcome waiting to be stored is retried until the task's
 * deadline has long passed, and the outage is logged once, its end once
 * (error replies, which are Redis answering, apart).
 *
 * Shutdown. worker_stop takes nothing new and lets the running tasks
 * finish until its deadline; then it stops them and leaves their entries
 * pending (not acknowledged, not failed): another worker reclaims them
 * after the visibility timeout.
 */
#include "worker.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "cluster.h"
#include "cost.h"
#include "history.h"
#include "log.h"
#include "metrics.h"
#include "models.h"
#include "results.h"
#include "runner.h"
#include "server.h"
#include "webhook.h"

#define TAKE_BLOCK_MS 1000
#define REGISTRATION_TTL 10.0
#define HEARTBEAT_SECONDS 2.0
#define RECLAIM_SECONDS 5.0
#define PROGRESS_INTERVAL 0.1
#define RETRY_SECONDS 1.0
#define STORE_MARGIN 60.0 /* seconds past a task's deadline its outcome is still worth storing */

typedef struct slot {
    struct worker *w;
    pthread_t thread;
    /* the task running, for the heartbeat (under w->lock) */
    bool busy;
    char entry_id[32];
    /* for the progress callback */
    const cluster_task *task;
    int model;              /* the task's, an index into w->models */
    cluster_task_state state;
    double last_report; /* mono_now() */
    sdx4_atomic_int stop;   /* STOP_*: the engine's cancel flag */
} slot;

struct worker {
    served_model *models; /* [nmodels], models[0] the default */
    int nmodels;
    redis *r;
    struct webhooks *hooks;
    worker_settings s;
    char name[64];
    json_t *info;
    pthread_mutex_t lock;
    pthread_cond_t changed; /* mono_now() clock: naps, exits, the heartbeat */
    pthread_cond_t batched; /* mono_now() clock: a batch joined, run */
    struct forming_batch *forming; /* the batch open to the threads' tasks, or NULL */
    slot *slots;
    int nthreads, exited;
    double next_reclaim; /* mono_now() */
    pthread_t heartbeat;
    bool heartbeat_running, heartbeat_stop;
    atomic_bool stopping, abandon;
    atomic_bool redis_down, redis_refusing; /* logged once per outage, once per run of error replies */
    atomic_llong succeeded, failed, canceled, redis_errors, refused_model;
    atomic_int busy;
};

/* ---- Redis's health, logged once per outage ----------------------------------- */

static void redis_trouble(worker *w, const char *err) {
    atomic_fetch_add(&w->redis_errors, 1);
    /* an error reply ("redis: ..." from redis.c and cluster.c) is Redis
     * answering: logged, but the worker is not cut off */
    bool answered = strncmp(err, "redis: ", 7) == 0;
    if (!atomic_exchange(answered ? &w->redis_refusing : &w->redis_down, true))
        log_event(LOG_WARN, answered ? "redis_error" : "redis_unreachable",
                  json_pack("{s:s,s:s,s:s}", "worker", w->name, "redis", redis_where(w->r), "error", err));
}

static void redis_fine(worker *w) {
    atomic_store(&w->redis_refusing, false);
    if (atomic_exchange(&w->redis_down, false))
        log_event(LOG_INFO, "redis_reachable", json_pack("{s:s,s:s}", "worker", w->name, "redis", redis_where(w->r)));
}

/* Waits `seconds` unless the worker starts stopping. */
static void nap(worker *w, double seconds) {
    double until = mono_now() + seconds;
    struct timespec ts = {(time_t)until, (long)((until - (double)(time_t)until) * 1e9)};
    pthread_mutex_lock(&w->lock);
    if (!atomic_load(&w->stopping)) pthread_cond_timedwait(&w->changed, &w->lock, &ts);
    pthread_mutex_unlock(&w->lock);
}

/* ---- ending a task ----------------------------------------------------------------- */

/* jobs.c's problems for a stopped task, and the state it ends in. */
static job_state stopped(problem *p, int reason, double timeout) {
    if (reason == STOP_TIMEOUT) {
        problem_set(p, PROBLEM_TIMEOUT, "not finished within %g s of arrival; the work was canceled", timeout);
        return JOB_FAILED;
    }
    if (reason == STOP_SHUTDOWN) problem_set(p, PROBLEM_SHUTTING_DOWN, "the server shut down before the work finished");
    else problem_set(p, PROBLEM_CANCELED, "canceled by the client");
    return JOB_CANCELED;
}

/* webhook.c's report of a delivery (`arg` the redis): logged, and written
 * into the job's hash for the API nodes' copies. */
static void webhook_outcome(void *arg, const char *job_id, bool delivered, int attempts, const char *error) {
    char err[256];
    log_event(delivered ? LOG_INFO : LOG_WARN, "webhook_outcome",
              json_pack("{s:s,s:b,s:i,s:s?}", "job_id", job_id, "delivered", delivered, "attempts", attempts,
                        "error", error));
    if (cluster_webhook_state(arg, job_id, delivered ? "delivered" : "failed", attempts, error, err, sizeof err))
        log_event(LOG_WARN, "webhook_outcome_not_kept", json_pack("{s:s,s:s}", "job_id", job_id, "error", err));
}

/* The "results" an API node's job document gives (results.h), for the
 * webhook: each stored image's presigned URL. Formats come from the
 * records the API node kept; `t`, the task just run, names its own in
 * case they are not there yet. */
static void add_result_links(worker *w, const cluster_task *t, const cluster_job *job,
                             const cluster_task_state *states, json_t *doc) {
    char err[256];
    cluster_task *records = calloc(FORM_MAX_IMAGES, sizeof *records);
    if (!records || cluster_load_records(w->r, job->id, records, job->ntasks, err, sizeof err)) {
        free(records);
        return; /* the webhook goes without them, as a document read meanwhile would show */
    }
    json_t *links = json_array();
    time_t now = time(NULL);
    for (int i = 0; i < job->ntasks; i++) {
        image_format format = i == t->index ? t->opts.format : records[i].opts.format;
        json_t *link = states[i].state == JOB_SUCCEEDED && states[i].stored && format != IMAGE_UNKNOWN
                           ? results_link(w->s.results, job->id, i, format, now)
                           : NULL;
        if (link) json_array_append_new(links, link);
        cluster_task_free(&records[i]);
    }
    free(records);
    json_object_set_new(doc, "results", links);
}

/* The webhook of a job this worker ended with task `t`. */
static void send_webhook(worker *w, const cluster_task *t, const cluster_job *job,
                         const cluster_task_state *states) {
    char err[256];
    json_t *doc = cluster_job_document(job, states, "pending");
    if (w->s.results && job->listed) add_result_links(w, t, job, states, doc);
    char *body = json_dumps(doc, JSON_COMPACT);
    char why[256] = "this worker has no --webhook-secret to sign it";
    if (!body || !w->hooks ||
        webhooks_send(w->hooks, job->id, job->webhook_url, job_state_name(job->state), body, webhook_outcome, w->r,
                      why, sizeof why)) {
        log_event(LOG_ERROR, "webhook_not_sent", json_pack("{s:s,s:s}", "job_id", job->id, "error", why));
        webhook_outcome(w->r, job->id, false, 0, body ? why : "out of memory");
    } else if (cluster_webhook_state(w->r, job->id, "pending", 0, NULL, err, sizeof err)) {
        redis_trouble(w, err);
    }
    free(body);
    json_decref(doc);
}

/* The history row of a job this worker ended (--history). */
static void write_history(worker *w, const cluster_job *job, const cluster_task_state *states) {
    char err[256];
    history_entry e;
    if (cluster_history_entry(w->r, job, states, &e, err, sizeof err)) {
        log_event(LOG_ERROR, "history_not_written", json_pack("{s:s,s:s}", "job_id", job->id, "error", err));
        return;
    }
    history_record(w->s.history, &e);
    free((char *)e.parameters);
}

/* A job this worker ended (its finish ended the job's last task, and
 * read the job as it ended: `job`, its ntasks 0 when that read failed,
 * `why` says how): its webhook, its history row, its log line; once per
 * job, by whoever ended it (cluster_finish_task's 2). */
static void job_ended(worker *w, const cluster_task *t, cluster_job *job, cluster_task_state *states,
                      const char *why) {
    if (!job->ntasks) {
        log_event(LOG_ERROR, "job_end_not_reported", json_pack("{s:s,s:s}", "job_id", t->job_id, "error", why));
        return;
    }
    if (job->webhook_url) send_webhook(w, t, job, states);
    if (w->s.history) write_history(w, job, states);
    log_event(LOG_INFO, "job_finished",
              json_pack("{s:s,s:s,s:s,s:i,s:f}", "request_id", job->request_id, "job_id", job->id, "status",
                        job_state_name(job->state), "images", job->ntasks, "seconds", job->finished - job->created));
    cluster_job_free(job);
}

/* Stores a task's final state (and result), retrying while Redis is
 * away, then acknowledges its entry. An outcome that cannot be stored
 * (the worker abandons its tasks, or the job is long past its deadline)
 * leaves the entry pending (-1); else cluster_finish_task's answer. */
static int conclude(worker *w, const cluster_task *t, cluster_task_state *st, const void *result, size_t len) {
    char err[256], why[256] = "";
    double give_up = mono_now() + (t->deadline - wall_now()) + STORE_MARGIN;
    int rc = 1; /* a task without a job to store it in ends here */
    st->finished = wall_now();
    snprintf(st->worker, sizeof st->worker, "%s", w->name);
    cluster_job ended = {0};
    cluster_task_state *states = calloc(FORM_MAX_IMAGES, sizeof *states);
    if (t->job_id[0] && t->index >= 0) {
        while ((rc = cluster_finish_task(w->r, t->job_id, t->index, st, result, len, w->s.job_retention,
                                         w->s.jobs_memory, states ? &ended : NULL, states, why, sizeof why)) < 0) {
            redis_trouble(w, why);
            if (atomic_load(&w->abandon) || mono_now() > give_up) return free(states), -1;
            nap(w, RETRY_SECONDS);
        }
        redis_fine(w);
    }
    if (rc != 0) /* 0: ended already, by another party */
        atomic_fetch_add(st->state == JOB_SUCCEEDED ? &w->succeeded : st->state == JOB_FAILED ? &w->failed : &w->canceled, 1);
    while (cluster_ack(w->r, t->entry_id, err, sizeof err) < 0) {
        redis_trouble(w, err);
        if (atomic_load(&w->abandon) || mono_now() > give_up) break; /* reclaimed later, found final */
        nap(w, RETRY_SECONDS);
    }
    if (rc == 2) job_ended(w, t, &ended, states, states ? why : "out of memory");
    free(states);
    return rc;
}

/* An image uploaded for a task that was ended meanwhile by another party
 * (a cancel, a deadline) or whose job is gone (a DELETE, which removed
 * the job's objects before this one arrived) is nobody's: removed, unless
 * the task's state points at it (an earlier run of the same task that
 * succeeded, whose key this run wrote again). Kept when Redis cannot say. */
static void drop_unclaimed(worker *w, const cluster_task *t) {
    char err[256];
    cluster_job job;
    cluster_task_state *states = calloc(FORM_MAX_IMAGES, sizeof *states);
    int found = states ? cluster_load_job(w->r, t->job_id, &job, states, err, sizeof err) : -1;
    bool claimed = found < 0 || (found == 1 && t->index < job.ntasks && states[t->index].stored);
    if (found == 1) cluster_job_free(&job);
    free(states);
    if (!claimed && results_delete(w->s.results, t->job_id, t->index, t->opts.format, err, sizeof err))
        log_event(LOG_WARN, "result_not_deleted",
                  json_pack("{s:s,s:i,s:s}", "job_id", t->job_id, "task", t->index, "error", err));
}

/* Ends a task that is not run, with `kind` and the detail. */
static void refuse_task(worker *w, const cluster_task *t, job_state state, problem_kind kind, const char *detail) {
    cluster_task_state st = {.state = state};
    problem_set(&st.error, kind, "%s", detail);
    log_event(LOG_WARN, "task_not_run",
              json_pack("{s:s,s:s,s:i,s:s,s:s}", "request_id", t->request_id, "job_id", t->job_id, "task", t->index,
                        "entry", t->entry_id, "reason", detail));
    conclude(w, t, &st, NULL, 0);
}

/* ---- running a task ---------------------------------------------------------------- */

static int on_progress(void *user, int step, int total) {
    slot *sl = user;
    worker *w = sl->w;
    const cluster_task *t = sl->task;
    int stop = atomic_load(&sl->stop);
    char err[256];
    if (!stop && wall_now() > t->deadline) stop = STOP_TIMEOUT;
    if (!stop) { /* a GET a step: cheap beside a step */
        if (cluster_stop_reason(w->r, t->job_id, &stop, err, sizeof err)) redis_trouble(w, err);
    }
    double now = mono_now();
    if (!stop && (now - sl->last_report >= PROGRESS_INTERVAL || step == total)) {
        sl->state.step = step, sl->state.total = total;
        int rc = cluster_report_progress(w->r, t->job_id, t->index, &sl->state, err, sizeof err);
        if (rc < 0) redis_trouble(w, err);
        else if (rc == 0) stop = STOP_CLIENT; /* ended elsewhere (a cancel): nobody wants it */
        sl->last_report = now;
    }
    if (stop) atomic_store(&sl->stop, stop);
    return stop;
}

static void set_busy(slot *sl, bool busy) {
    worker *w = sl->w;
    pthread_mutex_lock(&w->lock);
    sl->busy = busy;
    if (busy) memcpy(sl->entry_id, sl->task->entry_id, sizeof sl->entry_id);
    pthread_mutex_unlock(&w->lock);
    atomic_fetch_add(&w->busy, busy ? 1 : -1);
}

/* ---- batches: the threads' tasks that share their UNet calls ------------------------ */

/* A batch in the making, on its leader's stack. A thread whose task can
 * share its UNet calls joins it while it is open and waits for it to be
 * run; the leader waits --batch-window for them (or until it is full),
 * closes it, runs it, and returns once every thread that joined has seen
 * it done. */
typedef struct forming_batch {
    runner_item items[SDX4_MAX_BATCH];
    int model; /* every item's */
    int n, room, waiting;
    bool done;
} forming_batch;

/* Runs this thread's task alone, or in the batch of another thread's that
 * it can share (waiting until that one has run), or as the leader of a
 * new batch that others may join for --batch-window. */
static void upscale(worker *w, int model, runner_item *item) {
    model_version *v = models_acquire(&w->models[model]);
    sdx4_engine *engine = v->engine;
    pthread_mutex_lock(&w->lock);
    forming_batch *b = w->forming;
    if (b && b->n < b->room && b->model == model &&
        runner_batchable(engine, b->items[0].input, b->items[0].opts, item->input, item->opts)) {
        b->items[b->n++] = *item; /* the leader's run writes through its pointers */
        b->waiting++;
        pthread_cond_broadcast(&w->batched);
        while (!b->done) pthread_cond_wait(&w->batched, &w->lock);
        if (--b->waiting == 0) pthread_cond_broadcast(&w->batched);
        pthread_mutex_unlock(&w->lock);
        models_release(v);
        return;
    }
    /* room: --max-batch-size, the threads, the memory budget */
    int most = w->s.max_batch_size < w->nthreads ? w->s.max_batch_size : w->nthreads;
    forming_batch mine = {.n = 1, .model = model,
                          .room = b || w->s.batch_window <= 0 ? 1
                                                              : runner_batch_room(engine, item->input, item->opts, most)};
    mine.items[0] = *item;
    if (mine.room > 1) {
        double until = mono_now() + w->s.batch_window;
        struct timespec ts = {(time_t)until, (long)((until - (double)(time_t)until) * 1e9)};
        w->forming = &mine;
        while (mine.n < mine.room && !atomic_load(&w->stopping) &&
               pthread_cond_timedwait(&w->batched, &w->lock, &ts) == 0) {
        }
        w->forming = NULL;
    }
    pthread_mutex_unlock(&w->lock);
    runner_upscale_batch(engine, mine.items, mine.n, on_progress);
    metrics_batch(mine.n);
    pthread_mutex_lock(&w->lock);
    mine.done = true;
    pthread_cond_broadcast(&w->batched);
    while (mine.waiting > 0) pthread_cond_wait(&w->batched, &w->lock);
    pthread_mutex_unlock(&w->lock);
    models_release(v);
}

static void run(slot *sl, const cluster_task *t, int model, sdx4_image *input) {
    worker *w = sl->w;
    model_version *v = models_acquire(&w->models[model]);
    struct cost_model *cost = v->cost;
    char err[256];
    sl->task = t;
    sl->state = (cluster_task_state){.state = JOB_RUNNING, .started = wall_now(),
                                     .total = models_is_gan(&w->models[model]) ? 1 : t->opts.steps};
    snprintf(sl->state.worker, sizeof sl->state.worker, "%s", w->name);
    snprintf(sl->state.model_hash, sizeof sl->state.model_hash, "%s", v->hash);
    snprintf(sl->state.content_check, sizeof sl->state.content_check, "%s", runner_content_check_policy());
    sl->last_report = mono_now();
    atomic_store(&sl->stop, STOP_NONE);
    int rc = cluster_report_progress(w->r, t->job_id, t->index, &sl->state, err, sizeof err);
    if (rc < 0) redis_trouble(w, err);
    if (rc == 0) { /* final already: ended while the entry waited, or by a run before a crash */
        if (cluster_ack(w->r, t->entry_id, err, sizeof err)) redis_trouble(w, err);
        models_release(v);
        return;
    }
    set_busy(sl, true);
    metrics_queue_wait(fmax(0, sl->state.started - t->created)); /* wall clocks of two machines */
    task_outcome out = {.state = JOB_FAILED};
    sdx4_image image;
    double t0 = mono_now();
    upscale(w, model, &(runner_item){input, &t->opts, &sl->stop, sl, &image, &out});
    if (out.state == JOB_SUCCEEDED) {
        metrics_inference(mono_now() - t0, models_is_gan(&w->models[model]) ? 0 : t->opts.steps);
        /* measured alone on the device only with one thread: several share it unevenly */
        if (cost && w->nthreads == 1 && out.report.batch_size == 1)
            cost_observe(cost, input->width, input->height, t->opts.tile, t->opts.tile_overlap,
                         sdx4_unet_evaluations(t->opts.scheduler, t->opts.steps),
                         (float)t->opts.guidance_scale > 1.0f, &out.report, 1.0, false);
        runner_encode(&image, &t->opts,
                      &(runner_origin){w->models[model].name, v->hash, models_is_gan(&w->models[model]),
                                       input->width, input->height, t->icc, t->icc_len},
                      &out);
    }
    /* with a store, the image goes there before the task is finished: its
     * state then says so, and Redis never holds the bytes */
    bool stored = out.state == JOB_SUCCEEDED && w->s.results &&
                  results_upload(w->s.results, t->job_id, t->index, t->opts.format, &out) == 0;
    int stop = atomic_load(&sl->stop);
    if (out.state == JOB_CANCELED && atomic_load(&w->abandon)) {
        log_event(LOG_WARN, "task_abandoned",
                  json_pack("{s:s,s:s,s:i,s:s}", "request_id", t->request_id, "job_id", t->job_id, "task", t->index,
                            "message", "shutdown deadline passed; left for another worker"));
    } else {
        cluster_task_state st = sl->state;
        st.state = out.state;
        st.report = out.report;
        if (out.state == JOB_SUCCEEDED) st.step = st.total, st.width = out.width, st.height = out.height, st.bytes = out.len;
        else if (out.state == JOB_CANCELED) st.state = stopped(&st.error, stop, t->deadline - t->created);
        else st.error = out.error;
        st.stored = stored;
        st.compute = out.compute_seconds;
        if (conclude(w, t, &st, stored ? NULL : out.output, stored ? 0 : out.len) == 0 && stored)
            drop_unclaimed(w, t);
    }
    free(out.output);
    set_busy(sl, false);
    models_release(v);
}

static void handle(slot *sl, cluster_delivery *d) {
    worker *w = sl->w;
    cluster_task *t = &d->task;
    char detail[384], err[256];
    int reason = STOP_NONE;
    if (d->invalid[0]) {
        snprintf(detail, sizeof detail, "the task's record was refused: %s", d->invalid);
        refuse_task(w, t, JOB_FAILED, PROBLEM_INTERNAL, detail);
        return;
    }
    int model = t->model[0] ? models_find(w->models, w->nmodels, t->model) : 0;
    if (model < 0) {
        char *names = models_names(w->models, w->nmodels);
        snprintf(detail, sizeof detail, "the worker %s does not serve the model \"%s\" (it serves %s): give every "
                 "worker of the cluster the API nodes' model list", w->name, t->model, names ? names : "");
        free(names);
        atomic_fetch_add(&w->refused_model, 1);
        refuse_task(w, t, JOB_FAILED, PROBLEM_UPSCALE_FAILED, detail);
        cluster_task_free(t);
        return;
    }
    if (t->content_check[0] && !runner_content_check_policy()[0]) {
        /* fail closed: the node that took the request checks its outputs */
        snprintf(detail, sizeof detail, "the worker %s runs without the content check that the API node asks "
                 "for (%s): give every worker of the cluster the API nodes' --safety-checker", w->name,
                 t->content_check);
        refuse_task(w, t, JOB_FAILED, PROBLEM_UPSCALE_FAILED, detail);
        cluster_task_free(t);
        return;
    }
    if (t->deliveries > w->s.max_attempts) {
        int n = t->deliveries - 1;
        snprintf(detail, sizeof detail, "taken by %d worker%s that %s before finishing it; not tried again", n,
                 n == 1 ? "" : "s", n == 1 ? "stopped" : "each stopped");
        refuse_task(w, t, JOB_FAILED, PROBLEM_UPSCALE_FAILED, detail);
    } else if (wall_now() > t->deadline ||
               (cluster_stop_reason(w->r, t->job_id, &reason, err, sizeof err) == 0 && reason != STOP_NONE)) {
        cluster_task_state st = {0};
        st.state = stopped(&st.error, reason ? reason : STOP_TIMEOUT, t->deadline - t->created);
        conclude(w, t, &st, NULL, 0);
    } else {
        sdx4_image input;
        int found = cluster_load_input(w->r, t, &input, err, sizeof err);
        if (found < 0) { /* Redis away: the entry stays pending, reclaimed once it is back */
            redis_trouble(w, err);
        } else if (found == 0) {
            refuse_task(w, t, JOB_FAILED, PROBLEM_INTERNAL, "the task's input expired before a worker took it");
        } else {
            run(sl, t, model, &input);
            sdx4_image_free(&input);
        }
    }
    cluster_task_free(t);
}

/* ---- threads ----------------------------------------------------------------------- */

/* Whether this consumer should look for dead workers' entries now. */
static bool reclaim_due(worker *w) {
    double now = mono_now(), every = w->s.visibility_timeout / 2;
    pthread_mutex_lock(&w->lock);
    bool due = now >= w->next_reclaim;
    if (due) w->next_reclaim = now + (every < RECLAIM_SECONDS ? every : RECLAIM_SECONDS);
    pthread_mutex_unlock(&w->lock);
    return due;
}

static void *consumer_main(void *arg) {
    slot *sl = arg;
    worker *w = sl->w;
    redisContext *c = NULL;
    char err[256];
    while (!atomic_load(&w->stopping)) {
        if (!c && !(c = redis_borrow(w->r, TAKE_BLOCK_MS / 1000.0, err, sizeof err))) {
            redis_trouble(w, err);
            nap(w, RETRY_SECONDS);
            continue;
        }
        cluster_delivery d;
        int got = cluster_take(c, w->name, 1, TAKE_BLOCK_MS, &d, err, sizeof err);
        if (got < 0) {
            redis_release(w->r, c, true);
            c = NULL;
            redis_trouble(w, err);
            if (strstr(err, "NOGROUP") && cluster_ensure_group(w->r, err, sizeof err) == 0) /* Redis lost it */
                continue;
            nap(w, RETRY_SECONDS);
            continue;
        }
        redis_fine(w);
        if (got == 0 && !atomic_load(&w->stopping) && reclaim_due(w)) {
            got = cluster_reclaim(w->r, w->name, w->s.visibility_timeout, 1, &d, err, sizeof err);
            if (got < 0) redis_trouble(w, err);
            else if (got > 0)
                log_event(LOG_INFO, "task_reclaimed",
                          json_pack("{s:s,s:s,s:i,s:i}", "entry", d.task.entry_id, "job_id", d.task.job_id, "task",
                                    d.task.index, "deliveries", d.task.deliveries));
        }
        if (got > 0) handle(sl, &d); /* taken: run even when stopping began meanwhile */
    }
    redis_release(w->r, c, false);
    pthread_mutex_lock(&w->lock);
    w->exited++;
    pthread_cond_broadcast(&w->changed);
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

/* Each model's estimator curve into the registration: under models.<name>,
 * and the default's at the top too (API nodes of earlier versions). */
static void publish_costs(worker *w) {
    json_t *models = json_object_get(w->info, "models");
    for (int i = 0; i < w->nmodels; i++) {
        cost_curve curve;
        model_version *v = models_acquire(&w->models[i]);
        bool none = !v || !v->cost || cost_get_curve(v->cost, &curve);
        models_release(v);
        if (none) continue;
        json_t *entry = json_object_get(models, w->models[i].name);
        if (json_is_object(entry)) json_object_set_new(entry, "cost", cost_curve_to_json(&curve));
        if (i == 0) json_object_set_new(w->info, "cost", cost_curve_to_json(&curve));
    }
}

static void *heartbeat_main(void *arg) {
    worker *w = arg;
    double every = w->s.visibility_timeout / 4 < HEARTBEAT_SECONDS ? w->s.visibility_timeout / 4 : HEARTBEAT_SECONDS;
    /* sized by the setting: the consumers start after this thread */
    const char **held = calloc((size_t)w->s.threads, sizeof *held);
    char (*ids)[32] = calloc((size_t)w->s.threads, sizeof *ids);
    char err[256];
    pthread_mutex_lock(&w->lock);
    while (!w->heartbeat_stop) {
        int n = 0;
        for (int i = 0; held && ids && i < w->nthreads; i++)
            if (w->slots[i].busy) {
                memcpy(ids[n], w->slots[i].entry_id, sizeof ids[n]);
                held[n] = ids[n], n++;
            }
        pthread_mutex_unlock(&w->lock);
        publish_costs(w); /* what they learned since the last */
        if (cluster_register(w->r, w->name, w->info, atomic_load(&w->busy), REGISTRATION_TTL, err, sizeof err) ||
            cluster_hold(w->r, w->name, held, n, err, sizeof err))
            redis_trouble(w, err);
        else
            redis_fine(w);
        double until = mono_now() + every;
        struct timespec ts = {(time_t)until, (long)((until - (double)(time_t)until) * 1e9)};
        pthread_mutex_lock(&w->lock);
        if (!w->heartbeat_stop) pthread_cond_timedwait(&w->changed, &w->lock, &ts);
    }
    pthread_mutex_unlock(&w->lock);
    free(held);
    free(ids);
    return NULL;
}

/* ---- the interface --------------------------------------------------------------------- */

worker *worker_start(served_model *models, int nmodels, redis *r, struct webhooks *hooks,
                     const worker_settings *settings, const json_t *info, char *err, size_t n) {
    worker *w = calloc(1, sizeof *w);
    if (!w || !(w->slots = calloc((size_t)settings->threads, sizeof *w->slots))) {
        free(w);
        snprintf(err, n, "out of memory");
        return NULL;
    }
    w->models = models, w->nmodels = nmodels, w->r = r, w->hooks = hooks, w->s = *settings;
    snprintf(w->name, sizeof w->name, "%s", settings->name);
    w->s.name = w->name;
    w->info = json_deep_copy(info);
    if (w->info) /* API nodes count the cluster's workers by it (health, /metrics) */
        json_object_set_new(w->info, "threads", json_integer(settings->threads));
    pthread_mutex_init(&w->lock, NULL);
    cond_init_monotonic(&w->changed);
    cond_init_monotonic(&w->batched);
    if (cluster_ensure_group(r, err, n)) /* not fatal: a consumer's first take fails and retries */
        redis_trouble(w, err);
    w->heartbeat_running = pthread_create(&w->heartbeat, NULL, heartbeat_main, w) == 0;
    for (int i = 0; w->heartbeat_running && i < settings->threads; i++) {
        w->slots[i].w = w;
        if (pthread_create(&w->slots[i].thread, NULL, consumer_main, &w->slots[i]) != 0) break;
        w->nthreads++;
    }
    if (w->nthreads < settings->threads) {
        snprintf(err, n, "cannot start the worker's threads");
        if (worker_stop(w, mono_now() + 5) == 0) worker_free(w);
        return NULL;
    }
    log_event(LOG_INFO, "worker_started",
              json_pack("{s:s,s:i,s:f,s:i,s:s}", "worker", w->name, "threads", w->nthreads, "visibility_timeout_s",
                        w->s.visibility_timeout, "max_attempts", w->s.max_attempts, "redis", redis_where(r)));
    return w;
}

/* Waits until every consumer has returned or `deadline` passes (lock held). */
static bool wait_exits(worker *w, double deadline) {
    struct timespec ts = {(time_t)deadline, (long)((deadline - (double)(time_t)deadline) * 1e9)};
    while (w->exited < w->nthreads)
        if (pthread_cond_timedwait(&w->changed, &w->lock, &ts) != 0 && mono_now() >= deadline) break;
    return w->exited == w->nthreads;
}

int worker_stop(worker *w, double deadline) {
    if (!w) return 0;
    atomic_store(&w->stopping, true);
    pthread_mutex_lock(&w->lock);
    pthread_cond_broadcast(&w->changed);
    bool all = wait_exits(w, deadline);
    if (!all) { /* stop what runs; the engine notices within a fraction of a second */
        atomic_store(&w->abandon, true);
        for (int i = 0; i < w->nthreads; i++) atomic_store(&w->slots[i].stop, STOP_SHUTDOWN);
        pthread_cond_broadcast(&w->changed);
        all = wait_exits(w, mono_now() + 5);
    }
    w->heartbeat_stop = true;
    pthread_cond_broadcast(&w->changed);
    pthread_mutex_unlock(&w->lock);
    if (w->heartbeat_running) pthread_join(w->heartbeat, NULL);
    char err[256];
    if (cluster_unregister(w->r, w->name, err, sizeof err)) redis_trouble(w, err);
    log_event(LOG_INFO, "worker_stopped",
              json_pack("{s:s,s:b,s:I,s:I,s:I}", "worker", w->name, "drained", !atomic_load(&w->abandon), "succeeded",
                        (json_int_t)atomic_load(&w->succeeded), "failed", (json_int_t)atomic_load(&w->failed),
                        "canceled", (json_int_t)atomic_load(&w->canceled)));
    if (!all) return -1;
    for (int i = 0; i < w->nthreads; i++) pthread_join(w->slots[i].thread, NULL);
    w->nthreads = 0;
    return 0;
}

void worker_free(worker *w) {
    if (!w) return;
    pthread_cond_destroy(&w->changed);
    pthread_cond_destroy(&w->batched);
    pthread_mutex_destroy(&w->lock);
    json_decref(w->info);
    free(w->slots);
    free(w);
}

void worker_get_stats(worker *w, worker_stats *s) {
    *s = (worker_stats){.succeeded = atomic_load(&w->succeeded), .failed = atomic_load(&w->failed),
                        .canceled = atomic_load(&w->canceled), .redis_errors = atomic_load(&w->redis_errors),
                        .refused_model = atomic_load(&w->refused_model),
                        .busy = atomic_load(&w->busy), .threads = w->nthreads,
                        .redis_up = !atomic_load(&w->redis_down), .stopping = atomic_load(&w->stopping)};
}
