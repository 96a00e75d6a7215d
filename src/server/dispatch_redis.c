/*
 * dispatch_redis.c - the API node in cluster mode (see dispatch_redis.h;
 * cluster.h has the protocol).
 *
 * An API node keeps, as in single-process mode, a local job object for
 * every job that one of its connections waits on or reads; Redis keeps the
 * truth. This dispatcher is the bridge between the two, for jobs.c:
 *
 * Submitting. push turns the job into the cluster's records and submits
 * them in one script (cluster_submit), which holds the queue bound of the
 * whole cluster: its refusal is single-process mode's 503. Admission by
 * estimated time needs no model here: the workers publish their
 * estimators (cost.h's curve), one per model they serve, the keeper keeps
 * the slowest calibrated one of each model, push refuses what needs more than the request timeout alone (422)
 * and the script what the cluster's backlog would make late (503). It
 * runs under the job store's lock (dispatch.h), so a submit makes this
 * node's other job calls wait one Redis round trip; the task records are
 * then kept in the job's hash too, so that other nodes can answer for the
 * job.
 *
 * Following. Each task this node reports is watched. A subscriber thread
 * holds one PSUBSCRIBE connection to sdx4:events:* and applies each event
 * of a watched task through jobs.c's own lifecycle calls (job_task_started,
 * _progress, _finished), so waiters, SSE streams and synchronous answers
 * work as with the local queue; a success loads the result's bytes first
 * (and puts a seeded one in the result cache, as the queue's workers do),
 * from Redis, or from the results store when the worker put them there
 * (--s3-bucket; only where this node answers with them: a synchronous
 * request, a batch's listing; such a read holds the thread that applies
 * it for at most --s3-timeout).
 * Pub/sub is at most once, so a keeper thread re-reads the hash of every
 * watched job once a second and applies what the events missed (during a
 * reconnect, say). A job made on another node is found by id (find:
 * cluster_load_job), rebuilt here (job_adopt) and watched the same way.
 *
 * Stopping. jobs.c stops a job (DELETE, its deadline, a client gone, a
 * shutdown) under its lock, where nothing may wait on Redis: withdraw and
 * forget only write down what is to be done, and the keeper does it at
 * once: cluster_cancel (workers stop at their next step), the tasks' final
 * states by compare-and-set (the first finisher wins), the webhook when
 * this node's finish ended the job, the job's removal for a DELETE (which
 * the nodes holding a copy hear, and drop theirs; its objects in the
 * results store go after it), and the history row of a job this node
 * ended. A webhook's delivery, written into the job by its sender (this
 * node or a worker), reaches the copies through the job's channel. What fails for want of Redis is retried every second, in
 * order, until it is done or a minute old (a worker still stops at the
 * task's own deadline).
 *
 * Liveness. The subscriber pings Redis when the channel is quiet, so that
 * a dead connection is noticed within the Redis timeout and replaced. The
 * keeper's look at the cluster (waiting tasks, live workers, whether Redis
 * answers) is what health, model-info and the metrics answer from.
 *
 * Locking. One mutex guards the watches, the orders and the cluster's
 * view; it is taken after the store's lock, never before it. The threads
 * apply changes with it released, the watch marked busy meanwhile; a task
 * withdrawn while busy is dropped by the thread that has it.
 */
#include "dispatch_redis.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "cluster.h"
#include "cost.h"
#include "history.h"
#include "jobs.h"
#include "log.h"
#include "models.h"
#include "results.h"
#include "webhook.h"

#define WATCH_BUCKETS 256
#define PING_SECONDS 0.5 /* a quiet subscription is pinged this often */
#define ORDER_SECONDS 60 /* how long Redis work asked by jobs.c is retried */
#define FORGOTTEN 256    /* jobs deleted here that find() must not bring back meanwhile */

/* A task this node reports. */
typedef struct watch {
    task *t;
    char job_id[33];
    bool busy;      /* a change is being applied to it, the lock released */
    bool withdrawn; /* withdrawn while busy: the thread that has it drops it */
    struct watch *next;
} watch;

typedef enum { ORDER_STOP, ORDER_FORGET, ORDER_ENDED } order_kind;

/* Redis work asked under the store's lock, done by the keeper. */
typedef struct order {
    order_kind kind;
    char job_id[33];
    int index, reason, ntasks;
    cluster_task_state state; /* ORDER_STOP: the task's final state */
    image_format formats[FORM_MAX_IMAGES]; /* ORDER_FORGET with a store: its objects' names */
    double until;             /* mono_now() past which it is given up */
    struct order *next;
} order;

struct dispatch_redis {
    server *srv;
    redis *r;
    pthread_mutex_t lock;
    pthread_cond_t wake; /* orders came, or it is time to stop */
    watch *watches[WATCH_BUCKETS];
    order *orders;
    double retry_at; /* the orders wait for Redis until then */
    bool closed, stopping;
    double stop_by; /* once stopping, orders are still tried until then */
    /* the last jobs deleted here: until the keeper has removed one from
     * Redis, a GET must not rebuild it from there */
    char forgotten[FORGOTTEN][33];
    int forgotten_next;
    /* the cluster at the last look */
    bool up;
    char down_why[256];
    json_t *workers;
    dispatch_stats stats;
    cost_curve curve[MAX_MODELS]; /* by model: the slowest calibrated worker's estimator of it */
    bool have_curve[MAX_MODELS];
    int devices; /* live workers: each runs on a device of its own */
    pthread_t subscriber, keeper;
    bool subscriber_started, keeper_started;
};

static bool final(job_state s) { return s >= JOB_SUCCEEDED; }

static void unavailable(const dispatch_redis *d, problem *why, const char *err) {
    problem_set(why, PROBLEM_STORE_UNAVAILABLE, "the cluster's store (Redis at %s) cannot be reached: %s; retry shortly",
                redis_where(d->r), err);
    why->retry_after = 1;
}

/* ---- watches (lock held) ----------------------------------------------------- */

static watch **bucket(dispatch_redis *d, const char *job_id) {
    unsigned h = 0;
    for (int i = 0; i < 8 && job_id[i]; i++) h = h * 31 + (unsigned char)job_id[i];
    return &d->watches[h % WATCH_BUCKETS];
}

static watch **watch_link(dispatch_redis *d, const char *job_id, int index) {
    watch **p = bucket(d, job_id);
    while (*p && !((*p)->t->index == index && strcmp((*p)->job_id, job_id) == 0)) p = &(*p)->next;
    return p;
}

static void watch_add(dispatch_redis *d, task *t) {
    watch *w = calloc(1, sizeof *w);
    if (!w) { /* the task then ends by its deadline, its reference kept */
        log_event(LOG_ERROR, "cluster_watch_failed", json_pack("{s:s}", "job_id", job_id(t->job)));
        return;
    }
    w->t = t;
    snprintf(w->job_id, sizeof w->job_id, "%s", job_id(t->job));
    watch **b = bucket(d, w->job_id);
    w->next = *b;
    *b = w;
}

static void watch_unlink(dispatch_redis *d, watch *w) {
    for (watch **p = bucket(d, w->job_id); *p; p = &(*p)->next)
        if (*p == w) {
            *p = w->next;
            return;
        }
}

/* ---- orders ---------------------------------------------------------------------- */

static void order_add(dispatch_redis *d, order *o) { /* lock held */
    o->until = mono_now() + ORDER_SECONDS;
    order **p = &d->orders;
    while (*p) p = &(*p)->next;
    *p = o;
    pthread_cond_broadcast(&d->wake);
}

/* webhook.c's report of a delivery (`arg` the redis): into the job's hash,
 * for every node's copy. */
static void webhook_outcome(void *arg, const char *id, bool delivered, int attempts, const char *error) {
    char err[256];
    log_event(delivered ? LOG_INFO : LOG_WARN, "webhook_outcome",
              json_pack("{s:s,s:b,s:i,s:s?}", "job_id", id, "delivered", delivered, "attempts", attempts,
                        "error", error));
    if (cluster_webhook_state(arg, id, delivered ? "delivered" : "failed", attempts, error, err, sizeof err))
        log_event(LOG_WARN, "webhook_outcome_not_kept", json_pack("{s:s,s:s}", "job_id", id, "error", err));
}

/* A job this node ended in Redis (its finish ended the job's last task,
 * cluster_finish_task's 2, read as it ended): its webhook and its
 * history row, once per job, as a worker does for the jobs it ends. */
static void report_ended(dispatch_redis *d, const cluster_job *job, const cluster_task_state *states) {
    const char *id = job->id;
    if (job->webhook_url && d->srv->webhooks) {
        json_t *doc = cluster_job_document(job, states, "pending");
        char *body = json_dumps(doc, JSON_COMPACT), why[320];
        json_decref(doc);
        if (!body || webhooks_send(d->srv->webhooks, id, job->webhook_url, job_state_name(job->state), body,
                                   webhook_outcome, d->r, why, sizeof why) != 0)
            webhook_outcome(d->r, id, false, 0, body ? why : "out of memory");
        else if (cluster_webhook_state(d->r, id, "pending", 0, NULL, why, sizeof why)) /* logged, not retried */
            log_event(LOG_WARN, "webhook_outcome_not_kept", json_pack("{s:s,s:s}", "job_id", id, "error", why));
        free(body);
    }
    history_entry e;
    char why[256];
    if (d->srv->history) { /* a failure is logged: retrying the order would resend the webhook */
        if (cluster_history_entry(d->r, job, states, &e, why, sizeof why) == 0) {
            history_record(d->srv->history, &e);
            free((char *)e.parameters);
        } else {
            log_event(LOG_ERROR, "history_not_written", json_pack("{s:s,s:s}", "job_id", id, "error", why));
        }
    }
}

/* Stops a task for its node (withdraw): the cancel key for whoever runs
 * it, then its final state, and the job's report if that ended it. */
static int stop_task(dispatch_redis *d, const order *o, char *err, size_t n) {
    const server_config *c = &d->srv->cfg;
    if (cluster_cancel(d->r, o->job_id, o->reason, c->request_timeout + ORDER_SECONDS, err, n)) return -1;
    bool reported = d->srv->webhooks || d->srv->history;
    cluster_job job;
    cluster_task_state *states = reported ? calloc(FORM_MAX_IMAGES, sizeof *states) : NULL;
    if (reported && !states) return snprintf(err, n, "out of memory"), -1;
    int rc = cluster_finish_task(d->r, o->job_id, o->index, &o->state, NULL, 0, c->job_retention, c->jobs_memory,
                                 states ? &job : NULL, states, err, n);
    if (rc == 2 && states && !job.ntasks)
        log_event(LOG_ERROR, "job_end_not_reported", json_pack("{s:s,s:s}", "job_id", o->job_id, "error", err));
    else if (rc == 2 && states)
        report_ended(d, &job, states), cluster_job_free(&job);
    free(states);
    return rc < 0 ? -1 : 0;
}

/* A job this node ended from its cache (finish_cached), reported here. */
static int cached_job_ended(dispatch_redis *d, const char *id, char *err, size_t n) {
    if (!d->srv->webhooks && !d->srv->history) return 0;
    cluster_job job;
    cluster_task_state *states = calloc(FORM_MAX_IMAGES, sizeof *states);
    if (!states) return snprintf(err, n, "out of memory"), -1;
    int rc = cluster_load_job(d->r, id, &job, states, err, n);
    if (rc > 0) {
        report_ended(d, &job, states);
        cluster_job_free(&job);
    }
    free(states);
    return rc < 0 ? -1 : 0;
}

/* A deleted job's images in the store, after the job left Redis: an
 * upload that lands later finds no task to finish and removes its own
 * object (worker.c). A failure is logged, not retried: what stays is the
 * store's lifecycle rules' to remove, as the objects of expired jobs. */
static void forget_objects(dispatch_redis *d, const order *o) {
    char err[512];
    for (int i = 0; d->srv->results && i < o->ntasks; i++)
        if (o->formats[i] != IMAGE_UNKNOWN && results_delete(d->srv, o->job_id, i, o->formats[i], err, sizeof err))
            log_event(LOG_WARN, "result_not_deleted",
                      json_pack("{s:s,s:i,s:s}", "job_id", o->job_id, "task", i, "error", err));
}

static int carry_out(dispatch_redis *d, const order *o, char *err, size_t n) {
    switch (o->kind) {
    case ORDER_STOP:
        return stop_task(d, o, err, n);
    case ORDER_FORGET:
        if (cluster_forget(d->r, o->job_id, o->ntasks, err, n)) return -1;
        forget_objects(d, o);
        return 0;
    case ORDER_ENDED:
        return cached_job_ended(d, o->job_id, err, n);
    }
    return 0;
}

/* Does the orders in the order they came; stops at the first that Redis
 * refuses, to try again from there a second later. */
static void run_orders(dispatch_redis *d) {
    pthread_mutex_lock(&d->lock);
    order *list = d->orders;
    d->orders = NULL;
    pthread_mutex_unlock(&d->lock);
    char err[256];
    while (list) {
        order *o = list;
        if (carry_out(d, o, err, sizeof err) != 0) {
            if (mono_now() < o->until) break;
            log_event(LOG_ERROR, "cluster_order_dropped",
                      json_pack("{s:s,s:i,s:s}", "job_id", o->job_id, "order", o->kind, "error", err));
        }
        list = o->next;
        free(o);
    }
    if (!list) return;
    pthread_mutex_lock(&d->lock);
    order **tail = &list;
    while (*tail) tail = &(*tail)->next;
    *tail = d->orders;
    d->orders = list;
    d->retry_at = mono_now() + 1;
    pthread_mutex_unlock(&d->lock);
}

/* ---- applying the cluster's changes ------------------------------------------------ */

/* Whether this node needs a stored image's bytes: a synchronous request
 * is answered with them, and a batch's /result lists its images; a
 * one-image job's /result redirects to the store (results.c says why). */
static bool needs_bytes(const job *j) { return !job_listed(j) || job_kind(j) == FORM_BATCH; }

/* A succeeded task's image, from Redis or from the store as its state
 * says (none when this node does not need it): 1 read, 0 lost (`lost`
 * says why: the task then fails), -1 Redis failed (`err`). */
static int load_result(dispatch_redis *d, const char *id, const task *t, const cluster_task_state *s, void **data,
                       size_t *len, problem *lost, char *err, size_t n) {
    *data = NULL, *len = 0;
    if (!s->stored && d->srv->results && job_listed(t->job)) {
        problem_set(lost, PROBLEM_STORAGE_FAILED, "worker %s kept the image in Redis, but this node gives URLs "
                    "into --s3-bucket: give the workers the same --s3-* settings", s->worker);
        return 0;
    }
    if (!s->stored) {
        int rc = cluster_load_result(d->r, id, t->index, data, len, err, n);
        if (rc == 0)
            problem_set(lost, PROBLEM_INTERNAL, "the result is no longer kept (expired, or evicted by the "
                                                "results' memory budget)");
        /* a synchronous request's image is read once, here: Redis's budget need not hold it */
        char why[256];
        if (rc == 1 && !job_listed(t->job) && cluster_drop_result(d->r, id, t->index, why, sizeof why))
            log_event(LOG_WARN, "result_not_deleted", json_pack("{s:s,s:i,s:s}", "job_id", id, "task", t->index,
                                                                "error", why));
        return rc;
    }
    if (!d->srv->results) {
        problem_set(lost, PROBLEM_STORAGE_FAILED, "the image is in object storage, but this node has no "
                                                  "--s3-bucket to read it from");
        return 0;
    }
    if (!needs_bytes(t->job)) return 1;
    char why[512];
    if (results_fetch(d->srv, id, t->index, t->opts.format, s->bytes, data, why, sizeof why) == 0) {
        *len = s->bytes;
        /* a synchronous request's image is read once, here: the store need not keep it */
        if (!job_listed(t->job) && results_delete(d->srv, id, t->index, t->opts.format, why, sizeof why))
            log_event(LOG_WARN, "result_not_deleted", json_pack("{s:s,s:i,s:s}", "job_id", id, "task", t->index,
                                                                "error", why));
        return 1;
    }
    log_event(LOG_ERROR, "result_fetch_failed",
              json_pack("{s:s,s:i,s:s}", "job_id", id, "task", t->index, "error", why));
    problem_set(lost, PROBLEM_STORAGE_FAILED, "the image was stored but cannot be read back: %s", why);
    return 0;
}

/* A final state into the local task; false when the result could not be
 * read for want of Redis (the keeper tries again). */
static bool finish(dispatch_redis *d, const char *id, task *t, const cluster_task_state *s) {
    task_outcome o = {.state = s->state, .width = s->width, .height = s->height, .report = s->report,
                      .compute_seconds = s->compute > 0 ? s->compute : 0,
                      .error = s->error};
    memcpy(o.model_hash, s->model_hash, sizeof o.model_hash);
    if (s->state == JOB_SUCCEEDED) {
        char err[256];
        int rc = load_result(d, id, t, s, &o.output, &o.len, &o.error, err, sizeof err);
        if (rc < 0) return false;
        if (rc == 0) {
            o.state = JOB_FAILED;
        } else if (t->cacheable && d->srv->cache && !strcmp(s->content_check, config_content_check(&d->srv->cfg))) {
            /* as the local queue's workers do; the key says this node's
             * content check, so an output the worker checked otherwise
             * (another setting, or an earlier version) is not kept */
            cached_result c = {o.output, o.len, o.width, o.height, o.report.prompt_tokens,
                               o.report.prompt_truncated, o.report.negative_truncated};
            cache_put(d->srv->cache, t->cache_key, &c);
        }
    }
    job_task_finished(t, &o);
    return true;
}

/* Brings a watched task to the state Redis has for it. */
static void apply(dispatch_redis *d, const char *id, int index, const cluster_task_state *s) {
    if (s->state == JOB_QUEUED) return;
    pthread_mutex_lock(&d->lock);
    watch *w = *watch_link(d, id, index);
    if (!w || w->busy) { /* not ours, or another thread applies a change to it */
        pthread_mutex_unlock(&d->lock);
        return;
    }
    w->busy = true;
    task *t = w->t;
    pthread_mutex_unlock(&d->lock);

    bool done = false;
    job_task_started(t); /* nothing when it started already, or was stopped here */
    if (final(s->state)) done = finish(d, id, t, s);
    else if (s->step > 0) job_task_progress(t, s->step, s->total);

    pthread_mutex_lock(&d->lock);
    w->busy = false;
    bool drop = done || w->withdrawn;
    if (drop) watch_unlink(d, w);
    pthread_mutex_unlock(&d->lock);
    if (drop) {
        job_release(t->job); /* the reference held for the task (dispatch.h) */
        free(w);
    }
}

/* Of the live workers serving the model named `model` whose estimators of
 * it are calibrated, the curve of the slowest (at the largest size and
 * the most steps allowed): admission must hold whichever worker takes a
 * task. */
static bool slowest_curve(const dispatch_redis *d, const json_t *workers, const char *model, cost_curve *out) {
    const server_config *c = &d->srv->cfg;
    double slowest = -1;
    size_t k;
    const json_t *w;
    json_array_foreach(workers, k, w) {
        const json_t *served = cluster_worker_model(w, model);
        cost_curve curve;
        char why[128];
        if (!served || cost_curve_from_json(json_object_get(served, "cost"), &curve, why, sizeof why) ||
            !curve.calibrated)
            continue;
        double seconds = cost_curve_estimate(&curve, c->max_side, c->max_side, 0, 0, c->max_steps, true);
        if (seconds > slowest) slowest = seconds, *out = curve;
    }
    return slowest >= 0;
}

/* Brings the watched tasks of job `id` to the states Redis has for them
 * (`states`: room for FORM_MAX_IMAGES); cluster_load_job's answer. */
static int sync_job(dispatch_redis *d, const char *id, cluster_task_state *states, char *err, size_t n) {
    cluster_job job;
    int rc = cluster_load_job(d->r, id, &job, states, err, n);
    for (int k = 0; rc > 0 && k < job.ntasks; k++) apply(d, id, k, &states[k]);
    cluster_job_free(&job);
    return rc;
}

/* A watched job whose hash does not parse cannot be followed: its tasks
 * here fail now rather than at their deadline, and Redis is not taken for
 * down for it. */
static void fail_unreadable(dispatch_redis *d, const char *id, const char *why) {
    cluster_task_state s = {.state = JOB_FAILED, .compute = -1};
    problem_set(&s.error, PROBLEM_INTERNAL, "the job's state in Redis does not parse: %s", why);
    log_event(LOG_ERROR, "job_unreadable", json_pack("{s:s,s:s}", "job_id", id, "error", why));
    for (int k = 0; k < FORM_MAX_IMAGES; k++) apply(d, id, k, &s);
}

/* Re-reads the watched jobs (what events were missed) and the cluster. */
static void look(dispatch_redis *d) {
    char (*ids)[33] = NULL;
    int n = 0, cap = 0;
    pthread_mutex_lock(&d->lock);
    for (int b = 0; b < WATCH_BUCKETS; b++)
        for (watch *w = d->watches[b]; w; w = w->next) {
            bool seen = false;
            for (int i = 0; i < n && !seen; i++) seen = strcmp(ids[i], w->job_id) == 0;
            if (seen) continue;
            if (n == cap) {
                char(*more)[33] = realloc(ids, sizeof *ids * (size_t)(cap = cap ? 2 * cap : 16));
                if (!more) break;
                ids = more;
            }
            memcpy(ids[n++], w->job_id, 33);
        }
    pthread_mutex_unlock(&d->lock);

    char err[256] = "";
    bool up = true;
    cluster_task_state *states = calloc(FORM_MAX_IMAGES, sizeof *states);
    for (int i = 0; i < n && states && up; i++) {
        int rc = sync_job(d, ids[i], states, err, sizeof err);
        if (rc == CLUSTER_JOB_UNREADABLE) fail_unreadable(d, ids[i], err);
        up = rc != -1;
    }
    free(states);
    free(ids);

    long long waiting = 0;
    json_t *workers = NULL;
    if (up) up = cluster_waiting(d->r, &waiting, err, sizeof err) == 0;
    if (up) up = cluster_workers(d->r, &workers, err, sizeof err) == 0;
    int busy = 0, threads = 0;
    size_t k;
    json_t *w;
    json_array_foreach(workers, k, w) {
        busy += (int)json_integer_value(json_object_get(w, "busy"));
        json_t *th = json_object_get(w, "threads");
        threads += json_is_integer(th) ? (int)json_integer_value(th) : 1;
    }
    cost_curve curve[MAX_MODELS];
    bool have_curve[MAX_MODELS];
    for (int m = 0; m < d->srv->nmodels; m++)
        have_curve[m] = slowest_curve(d, workers, d->srv->models[m].name, &curve[m]);
    pthread_mutex_lock(&d->lock);
    if (up != d->up)
        log_event(up ? LOG_INFO : LOG_ERROR, up ? "redis_back" : "redis_down",
                  json_pack("{s:s,s:s}", "redis", redis_where(d->r), "error", up ? "" : err));
    d->up = up;
    snprintf(d->down_why, sizeof d->down_why, "%s", up ? "" : err);
    if (up) {
        json_decref(d->workers);
        d->workers = workers;
        d->stats = (dispatch_stats){.depth = (int)waiting, .capacity = d->srv->cfg.queue_size,
                                    .running = busy, .workers = threads};
        memcpy(d->curve, curve, sizeof curve[0] * (size_t)d->srv->nmodels);
        memcpy(d->have_curve, have_curve, sizeof have_curve[0] * (size_t)d->srv->nmodels);
        d->devices = (int)json_array_size(workers);
    }
    pthread_mutex_unlock(&d->lock);
}

/* ---- the threads ----------------------------------------------------------------- */

static bool stopping(dispatch_redis *d) {
    pthread_mutex_lock(&d->lock);
    bool s = d->stopping;
    pthread_mutex_unlock(&d->lock);
    return s;
}

static void wait_until(dispatch_redis *d, double when) { /* lock held */
    struct timespec ts = {(time_t)when, (long)((when - (double)(time_t)when) * 1e9)};
    pthread_cond_timedwait(&d->wake, &d->lock, &ts);
}

/* A message of the subscription: an event, or the answer to our PING. */
static bool handle(dispatch_redis *d, const redisReply *m) {
    if (m->type != REDIS_REPLY_ARRAY || m->elements < 1 || m->element[0]->type != REDIS_REPLY_STRING) return false;
    if (strcmp(m->element[0]->str, "pong") == 0) return true;
    if (strcmp(m->element[0]->str, "pmessage") != 0 || m->elements != 4) return false;
    char id[33], status[16], error[320];
    int index, attempts;
    cluster_task_state s;
    if (cluster_parse_event(m->element[2]->str, m->element[3]->str, m->element[3]->len, id, &index, &s) == 0)
        apply(d, id, index, &s);
    else if (cluster_parse_forgotten(m->element[2]->str, m->element[3]->str, m->element[3]->len, id))
        job_forgotten(d->srv->jobs, id); /* deleted through another node */
    else if (cluster_parse_webhook(m->element[2]->str, m->element[3]->str, m->element[3]->len, id, status,
                                   sizeof status, &attempts, error, sizeof error))
        job_webhook_state(d->srv->jobs, id, status, attempts, error);
    return false;
}

/* Reads events from a subscribed connection until it fails, Redis stops
 * answering pings, or the dispatcher stops. */
static void listen_events(dispatch_redis *d, redisContext *c) {
    struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
    double pinged = 0; /* when the unanswered PING went, 0 none */
    while (!stopping(d)) {
        void *reply = NULL;
        if (redisGetReplyFromReader(c, &reply) != REDIS_OK) return;
        if (reply) {
            if (handle(d, reply)) pinged = 0;
            freeReplyObject(reply);
            continue;
        }
        int ready = poll(&pfd, 1, (int)(PING_SECONDS * 1000));
        if (ready < 0 && errno != EINTR) return;
        if (ready > 0) {
            if (redisBufferRead(c) != REDIS_OK) return;
            continue;
        }
        double now = mono_now();
        if (pinged > 0) {
            if (now - pinged > d->srv->cfg.redis_timeout) return;
            continue;
        }
        int written = 0;
        if (redisAppendCommand(c, "PING") != REDIS_OK) return;
        while (!written)
            if (redisBufferWrite(c, &written) != REDIS_OK) return;
        pinged = now;
    }
}

/* The finished jobs kept here whose job another node deleted while this
 * one heard no events (pub/sub is at most once: a dropped subscription
 * loses the forgotten message), found gone from Redis and forgotten here
 * too. The unfinished ones are the keeper's (look). Redis away: the next
 * subscription checks again. */
static void forget_missed(dispatch_redis *d) {
    char(*ids)[33] = NULL, err[256];
    int n = job_retained_ids(d->srv->jobs, &ids);
    for (int i = 0; i < n; i++) {
        redisReply *reply = redis_call(d->r, err, sizeof err, "EXISTS sdx4:job:%s", ids[i]);
        if (!reply) break;
        if (reply->type == REDIS_REPLY_INTEGER && reply->integer == 0) job_forgotten(d->srv->jobs, ids[i]);
        freeReplyObject(reply);
    }
    free(ids);
}

static void *subscriber_main(void *arg) {
    dispatch_redis *d = arg;
    bool lost = false, heard = false;
    while (!stopping(d)) {
        char err[256];
        redisContext *c = redis_borrow(d->r, PING_SECONDS, err, sizeof err);
        redisReply *reply = c ? redisCommand(c, "PSUBSCRIBE %s", CLUSTER_EVENTS_PATTERN) : NULL;
        if (reply) {
            freeReplyObject(reply);
            if (lost) log_event(LOG_INFO, "cluster_events_back", json_pack("{s:s}", "redis", redis_where(d->r)));
            lost = false;
            if (heard) forget_missed(d); /* subscribed again: what was missed meanwhile */
            heard = true;
            listen_events(d, c);
        } else if (!lost) {
            lost = true;
            log_event(LOG_WARN, "cluster_events_lost",
                      json_pack("{s:s,s:s}", "redis", redis_where(d->r), "error", c ? c->errstr : err));
        }
        if (c) redis_release(d->r, c, true); /* a subscribed connection is no use to others */
        pthread_mutex_lock(&d->lock);
        if (!d->stopping && lost) wait_until(d, mono_now() + 1);
        pthread_mutex_unlock(&d->lock);
    }
    return NULL;
}

static void *keeper_main(void *arg) {
    dispatch_redis *d = arg;
    double next_look = 0;
    pthread_mutex_lock(&d->lock);
    while (!d->stopping) {
        double now = mono_now();
        bool orders = d->orders && now >= d->retry_at;
        if (!orders && now < next_look) {
            wait_until(d, d->orders && d->retry_at < next_look ? d->retry_at : next_look);
            continue;
        }
        pthread_mutex_unlock(&d->lock);
        if (orders) run_orders(d);
        if (now >= next_look) {
            look(d);
            next_look = mono_now() + 1;
        }
        pthread_mutex_lock(&d->lock);
    }
    while (d->orders && mono_now() < d->stop_by) { /* the cancels of the jobs drained */
        pthread_mutex_unlock(&d->lock);
        run_orders(d);
        pthread_mutex_lock(&d->lock);
        if (d->orders) wait_until(d, d->retry_at < d->stop_by ? d->retry_at : d->stop_by);
    }
    pthread_mutex_unlock(&d->lock);
    return NULL;
}

/* ---- the dispatch interface ------------------------------------------------------- */

/* Each task's seconds alone on a device, by index (`estimates`), from
 * the slowest live worker's calibrated estimator of its model, else this
 * node's own (a node with models); false when neither is calibrated for
 * one of them: then the time is not judged, as in single-process mode. */
static bool estimate(dispatch_redis *d, task **tasks, int n, double *estimates) {
    for (int k = 0; k < n; k++) {
        const task *t = tasks[k];
        pthread_mutex_lock(&d->lock);
        cost_curve curve = d->curve[t->model];
        bool remote = d->have_curve[t->model];
        pthread_mutex_unlock(&d->lock);
        model_version *v = remote ? NULL : models_acquire(&d->srv->models[t->model]);
        cost_model *own = v ? v->cost : NULL;
        if (!remote && !(own && cost_calibrated(own))) {
            models_release(v);
            return false;
        }
        bool guided = (float)t->opts.guidance_scale > 1.0f;
        int w = t->input.width, h = t->input.height;
        int steps = sdx4_unet_evaluations(t->opts.scheduler, t->opts.steps);
        int tile = t->opts.tile, overlap = t->opts.tile_overlap;
        estimates[t->index] = remote ? cost_curve_estimate(&curve, w, h, tile, overlap, steps, guided)
                                     : cost_estimate(own, w, h, tile, overlap, steps, guided);
        models_release(v);
    }
    return true;
}

/* Single-process mode's 422: tasks that need more than the request
 * timeout even alone. */
static int over_time_limit(dispatch_redis *d, task **tasks, int n, const double *estimates, problem *why) {
    double alone = 0, limit = d->srv->cfg.request_timeout;
    int steps = 0, width = 0, height = 0;
    for (int k = 0; k < n; k++) {
        const task *t = tasks[k];
        alone += estimates[t->index];
        if (t->opts.steps > steps) steps = t->opts.steps;
        if ((double)t->input.width * t->input.height > (double)width * height)
            width = t->input.width, height = t->input.height;
    }
    if (alone <= limit) return 0;
    problem_set(why, PROBLEM_OVER_TIME_LIMIT,
                "estimated to take %.1f s alone on a worker (%d image%s, up to %dx%d, %d step%s), but requests "
                "must finish within %g s: send fewer steps or a smaller image", alone, n, n > 1 ? "s" : "",
                width, height, steps, steps > 1 ? "s" : "", limit);
    why->estimated_seconds = alone, why->limit_seconds = limit;
    return -1;
}

static void fill_record(cluster_task *r, const job *j, const task *t, double created, double deadline,
                        const char *model) {
    *r = (cluster_task){.index = t->index, .kind = job_kind(j), .created = created, .deadline = deadline,
                        .opts = t->opts, .width = t->input.width, .height = t->input.height,
                        .icc = t->icc, .icc_len = t->icc_len, .cacheable = t->cacheable};
    snprintf(r->model, sizeof r->model, "%s", model);
    snprintf(r->job_id, sizeof r->job_id, "%s", job_id(j));
    snprintf(r->client, sizeof r->client, "%s", job_client(j));
    snprintf(r->request_id, sizeof r->request_id, "%s", job_request_id(j));
    snprintf(r->owner, sizeof r->owner, "%s", job_owner(j));
    memcpy(r->cache_key, t->cache_key, sizeof r->cache_key);
}

/* The keeper is to report a job this node ended before any worker had it
 * (cached_job_ended). */
static void order_ended(dispatch_redis *d, const char *id) {
    order *o = calloc(1, sizeof *o);
    if (!o) return;
    o->kind = ORDER_ENDED;
    snprintf(o->job_id, sizeof o->job_id, "%s", id);
    pthread_mutex_lock(&d->lock);
    order_add(d, o);
    pthread_mutex_unlock(&d->lock);
}

/* A task answered from this node's cache is finished in Redis with the
 * cached bytes, so that every node can serve them. */
static void finish_cached(dispatch_redis *d, const char *id, const task *t) {
    const server_config *c = &d->srv->cfg;
    double now = wall_now();
    cluster_task_state s = {.state = JOB_SUCCEEDED, .step = t->opts.steps, .total = t->opts.steps,
                            .started = now, .finished = now, .width = t->out_width,
                            .height = t->out_height, .bytes = t->output_len, .report = t->report};
    snprintf(s.worker, sizeof s.worker, "cache");
    char err[256];
    int rc = cluster_finish_task(d->r, id, t->index, &s, t->output, t->output_len, c->job_retention,
                                 c->jobs_memory, NULL, NULL, err, sizeof err);
    if (rc == 2) order_ended(d, id);
    if (rc < 0)
        log_event(LOG_WARN, "cluster_cached_result_lost", json_pack("{s:s,s:s}", "job_id", id, "error", err));
}

static int push(void *ctx, job *j, task **tasks, int n, double deadline, problem *why) {
    dispatch_redis *d = ctx;
    const server_config *c = &d->srv->cfg;
    if (!n && !job_listed(j)) return 0; /* answered whole from the cache, to a client waiting here */
    pthread_mutex_lock(&d->lock);
    bool closed = d->closed;
    pthread_mutex_unlock(&d->lock);
    if (closed) return problem_set(why, PROBLEM_SHUTTING_DOWN, "the server is shutting down");

    int ntasks = job_ntasks(j), nkept = 0, rc = -1;
    cluster_job meta = {.kind = job_kind(j), .listed = job_listed(j), .created = job_created_wall(j),
                        .deadline = wall_now() + (deadline - mono_now()), .ntasks = ntasks,
                        .webhook_url = (char *)job_webhook_url(j)};
    snprintf(meta.id, sizeof meta.id, "%s", job_id(j));
    snprintf(meta.client, sizeof meta.client, "%s", job_client(j));
    snprintf(meta.request_id, sizeof meta.request_id, "%s", job_request_id(j));
    snprintf(meta.owner, sizeof meta.owner, "%s", job_owner(j));
    snprintf(meta.model, sizeof meta.model, "%s", d->srv->models[job_task(j, 0)->model].name);
    /* by task index, as cluster_submit takes them; `kept` lists the
     * records of the tasks not refused before submission */
    cluster_task *records = calloc((size_t)ntasks, sizeof *records);
    cluster_task *kept = calloc((size_t)ntasks, sizeof *kept);
    sdx4_image *inputs = calloc((size_t)ntasks, sizeof *inputs);
    bool *queued = calloc((size_t)ntasks, sizeof *queued);
    cluster_task_state *states = calloc((size_t)ntasks, sizeof *states);
    double *estimates = calloc((size_t)ntasks, sizeof *estimates);
    if (!records || !kept || !inputs || !queued || !states || !estimates) {
        problem_set(why, PROBLEM_INTERNAL, "out of memory");
        goto done;
    }
    bool judged = n && estimate(d, tasks, n, estimates);
    if (judged && over_time_limit(d, tasks, n, estimates, why)) goto done;
    pthread_mutex_lock(&d->lock);
    int devices = d->devices;
    pthread_mutex_unlock(&d->lock);
    for (int k = 0; k < n; k++) queued[tasks[k]->index] = true;
    for (int i = 0; i < ntasks; i++) {
        const task *t = job_task(j, i);
        states[i] = (cluster_task_state){.state = t->state, .total = t->opts.steps, .error = t->error};
        records[i].index = i;
        if (final(t->state)) continue; /* refused: its image may not even have decoded */
        fill_record(&records[i], j, t, meta.created, meta.deadline, d->srv->models[t->model].name);
        /* the check this node's key assumes, which the worker must do */
        snprintf(records[i].content_check, sizeof records[i].content_check, "%s", config_content_check(&d->srv->cfg));
        inputs[i] = t->input;
        kept[nkept++] = records[i];
    }
    char err[256];
    if (cluster_submit(d->r, &meta, records, inputs, queued, states, judged ? estimates : NULL, devices,
                       c->queue_size, c->job_retention, why, err, sizeof err) != 0) {
        if (!why->kind) unavailable(d, why, err);
        goto done;
    }
    if (cluster_keep_records(d->r, meta.id, kept, nkept, err, sizeof err) != 0)
        log_event(LOG_WARN, "cluster_records_not_kept", json_pack("{s:s,s:s}", "job_id", meta.id, "error", err));
    bool ended = true; /* every image refused before submission: the submit ended the job */
    for (int i = 0; i < ntasks; i++) {
        ended &= final(states[i].state);
        if (job_task(j, i)->cache_hit) finish_cached(d, meta.id, job_task(j, i));
    }
    if (ended) order_ended(d, meta.id);
    pthread_mutex_lock(&d->lock);
    for (int k = 0; k < n; k++) watch_add(d, tasks[k]);
    pthread_mutex_unlock(&d->lock);
    rc = 0;
done:
    free(records);
    free(kept);
    free(inputs);
    free(queued);
    free(states);
    free(estimates);
    return rc;
}

static int withdraw(void *ctx, task *t, int reason) {
    dispatch_redis *d = ctx;
    order *o = calloc(1, sizeof *o);
    pthread_mutex_lock(&d->lock);
    int dropped = 0;
    watch *w = *watch_link(d, job_id(t->job), t->index);
    if (w && w->busy) {
        w->withdrawn = true;
    } else if (w) {
        watch_unlink(d, w);
        free(w);
        dropped = 1;
    }
    if (o) {
        o->kind = ORDER_STOP;
        snprintf(o->job_id, sizeof o->job_id, "%s", job_id(t->job));
        o->index = t->index;
        o->reason = reason;
        o->state = (cluster_task_state){.state = reason == STOP_TIMEOUT ? JOB_FAILED : JOB_CANCELED,
                                        .step = t->step, .total = t->total, .finished = wall_now(),
                                        .error = t->error};
        order_add(d, o);
    }
    pthread_mutex_unlock(&d->lock);
    return dropped;
}

static void forget(void *ctx, job *j) {
    dispatch_redis *d = ctx;
    order *o = calloc(1, sizeof *o);
    if (!o) return;
    o->kind = ORDER_FORGET;
    snprintf(o->job_id, sizeof o->job_id, "%s", job_id(j));
    o->ntasks = job_ntasks(j);
    for (int i = 0; i < o->ntasks; i++) o->formats[i] = job_task(j, i)->opts.format;
    pthread_mutex_lock(&d->lock);
    order_add(d, o);
    memcpy(d->forgotten[d->forgotten_next], o->job_id, 33);
    d->forgotten_next = (d->forgotten_next + 1) % FORGOTTEN;
    pthread_mutex_unlock(&d->lock);
}

/* The stream has no order of its own to tell: round-robin over clients is
 * single-process mode's; here a task waits in the order it came. */
static int position(void *ctx, const task *t) {
    (void)ctx, (void)t;
    return -1;
}

static void close_dispatch(void *ctx) {
    dispatch_redis *d = ctx;
    pthread_mutex_lock(&d->lock);
    d->closed = true;
    pthread_mutex_unlock(&d->lock);
}

static void stats(void *ctx, dispatch_stats *s) {
    dispatch_redis *d = ctx;
    pthread_mutex_lock(&d->lock);
    *s = d->stats;
    pthread_mutex_unlock(&d->lock);
}

static void watch_task(void *ctx, task *t) {
    dispatch_redis *d = ctx;
    pthread_mutex_lock(&d->lock);
    watch_add(d, t);
    pthread_mutex_unlock(&d->lock);
}

/* A task of a job made elsewhere, as the hash and its record have it. */
static int restore_task(dispatch_redis *d, const char *id, task *t, cluster_task *record,
                        const cluster_task_state *s, double now, double wall, char *err, size_t n) {
    /* a model this node does not list (nodes of one cluster should list the
     * same): the default, which only names it in X-Model and the document */
    int model = models_find(d->srv->models, d->srv->nmodels, record->model);
    t->model = model < 0 ? 0 : model;
    t->opts = record->opts; /* moved: the task frees it */
    record->opts = (upscale_options){0};
    t->icc = record->icc, t->icc_len = record->icc_len; /* moved too */
    record->icc = NULL, record->icc_len = 0;
    t->input.width = record->width;
    t->input.height = record->height;
    memcpy(t->cache_key, record->cache_key, sizeof t->cache_key);
    t->cacheable = record->cacheable;
    t->state = s->state;
    t->step = s->step;
    t->total = s->total;
    t->error = s->error;
    t->report = s->report;
    memcpy(t->model_hash, s->model_hash, sizeof t->model_hash);
    t->out_width = s->width;
    t->out_height = s->height;
    t->enqueued = now - (wall - record->created);
    if (s->started > 0) t->started = now - (wall - s->started);
    if (s->finished > 0) t->finished = now - (wall - s->finished);
    if (s->state != JOB_SUCCEEDED) return 0;
    int rc = load_result(d, id, t, s, &t->output, &t->output_len, &t->error, err, n);
    if (rc == 0) t->state = JOB_FAILED;
    return rc < 0 ? -1 : 0;
}

static job *find(void *ctx, const char *id, const char *owner, problem *why) {
    dispatch_redis *d = ctx;
    pthread_mutex_lock(&d->lock);
    bool deleted = false;
    for (int i = 0; i < FORGOTTEN && !deleted; i++) deleted = strcmp(d->forgotten[i], id) == 0;
    pthread_mutex_unlock(&d->lock);
    if (deleted) return NULL;

    cluster_job meta = {0};
    cluster_task_state *states = calloc(FORM_MAX_IMAGES, sizeof *states);
    cluster_task *records = calloc(FORM_MAX_IMAGES, sizeof *records);
    job *j = NULL;
    char err[256];
    if (!states || !records) {
        problem_set(why, PROBLEM_INTERNAL, "out of memory");
        goto done;
    }
    int rc = cluster_load_job(d->r, id, &meta, states, err, sizeof err);
    if (rc == CLUSTER_JOB_UNREADABLE) {
        problem_set(why, PROBLEM_INTERNAL, "the job's state in Redis does not parse: %s", err);
        goto done;
    }
    if (rc < 0 || (rc > 0 && cluster_load_records(d->r, id, records, meta.ntasks, err, sizeof err) != 0)) {
        unavailable(d, why, err);
        goto done;
    }
    if (rc == 0 || !meta.listed || (owner && strcmp(meta.owner, owner) != 0)) goto done; /* as unknown as any other id */
    double now = mono_now(), wall = wall_now();
    j = job_create(d->srv->jobs, meta.kind, meta.ntasks, true, meta.client, meta.request_id,
                   now - (wall - meta.created));
    if (!j) {
        problem_set(why, PROBLEM_INTERNAL, "out of memory");
        goto done;
    }
    job_set_owner(j, meta.owner);
    job_set_webhook(j, meta.webhook_url);
    for (int i = 0; i < meta.ntasks; i++)
        if (restore_task(d, id, job_task(j, i), &records[i], &states[i], now, wall, err, sizeof err) != 0) {
            unavailable(d, why, err);
            job_release(j);
            j = NULL;
            goto done;
        }
    int model = models_find(d->srv->models, d->srv->nmodels, meta.model); /* the job's, whatever each record says */
    for (int i = 0; model >= 0 && i < meta.ntasks; i++) job_task(j, i)->model = model;
    j = job_adopt(j, id);
    if (meta.webhook[0]) job_webhook_state(d->srv->jobs, id, meta.webhook, meta.webhook_attempts, meta.webhook_error);
done:
    for (int i = 0; records && i < FORM_MAX_IMAGES; i++) cluster_task_free(&records[i]);
    free(records);
    free(states);
    cluster_job_free(&meta);
    return j;
}

static void refresh(void *ctx, const char *id) {
    cluster_task_state *states = calloc(FORM_MAX_IMAGES, sizeof *states);
    char err[256];
    if (states) (void)sync_job(ctx, id, states, err, sizeof err); /* Redis away: the copy stays as it is */
    free(states);
}

static json_t *list_jobs(void *ctx, const char *state, int limit, problem *why) {
    dispatch_redis *d = ctx;
    json_t *jobs = NULL;
    char err[256];
    if (cluster_list_jobs(d->r, state, limit, &jobs, err, sizeof err)) unavailable(d, why, err);
    return jobs;
}

dispatch dispatch_redis_dispatch(dispatch_redis *d) {
    static const dispatch_iface iface = {
        .push = push, .withdraw = withdraw, .position = position, .close = close_dispatch, .stats = stats,
        .shared = true, .find = find, .watch = watch_task, .forget = forget, .refresh = refresh,
        .list = list_jobs,
    };
    return (dispatch){&iface, d};
}

/* ---- life ---------------------------------------------------------------------------- */

dispatch_redis *dispatch_redis_create(server *srv, redis *r, char *err, size_t n) {
    dispatch_redis *d = calloc(1, sizeof *d);
    if (!d) return snprintf(err, n, "out of memory"), NULL;
    d->srv = srv;
    d->r = r;
    d->up = true; /* until the first look says otherwise */
    d->stats.capacity = srv->cfg.queue_size;
    snprintf(d->down_why, sizeof d->down_why, "not looked at yet");
    pthread_mutex_init(&d->lock, NULL);
    cond_init_monotonic(&d->wake);
    d->subscriber_started = pthread_create(&d->subscriber, NULL, subscriber_main, d) == 0;
    d->keeper_started = d->subscriber_started && pthread_create(&d->keeper, NULL, keeper_main, d) == 0;
    if (!d->keeper_started) {
        snprintf(err, n, "cannot start the cluster threads");
        dispatch_redis_destroy(d, mono_now());
        return NULL;
    }
    return d;
}

void dispatch_redis_destroy(dispatch_redis *d, double deadline) {
    if (!d) return;
    pthread_mutex_lock(&d->lock);
    d->stopping = true;
    d->stop_by = deadline;
    pthread_cond_broadcast(&d->wake);
    pthread_mutex_unlock(&d->lock);
    if (d->subscriber_started) pthread_join(d->subscriber, NULL);
    if (d->keeper_started) pthread_join(d->keeper, NULL);
    for (int b = 0; b < WATCH_BUCKETS; b++)
        while (d->watches[b]) {
            watch *w = d->watches[b];
            d->watches[b] = w->next;
            job_release(w->t->job);
            free(w);
        }
    while (d->orders) {
        order *o = d->orders;
        d->orders = o->next;
        free(o);
    }
    json_decref(d->workers);
    pthread_cond_destroy(&d->wake);
    pthread_mutex_destroy(&d->lock);
    free(d);
}

bool dispatch_redis_status(dispatch_redis *d, json_t **workers, char *why, size_t n) {
    pthread_mutex_lock(&d->lock);
    bool up = d->up;
    snprintf(why, n, "%s", d->down_why);
    *workers = json_incref(d->workers);
    pthread_mutex_unlock(&d->lock);
    return up;
}
