/*
 * queue.c - the bounded queue of upscale tasks and its worker threads.
 *
 * Bounds. At most `capacity` tasks wait (running ones do not count) and
 * `workers` run at once; the engine is shared by the workers (sdx4.h
 * allows concurrent calls). A batch is admitted whole or not at all, so a
 * client never gets half of its images done.
 *
 * Fairness. Waiting tasks are kept in one lane per client (API key or
 * address), and workers serve the lanes round-robin, oldest first within
 * a lane: a client who sends a batch of 8 delays another client's single
 * image by at most one task, not eight. With one client this is plain
 * FIFO.
 *
 * Overload. When the queue is full, queue_push fails and the HTTP layer
 * answers 503 with Retry-After at once: a request is never parked
 * somewhere unbounded. Nor is one queued that cannot finish by its
 * deadline: once cost.c is calibrated, each task carries its estimated
 * seconds alone on the device, and queue_push refuses a request whose own
 * tasks need more than the request timeout (422, the estimate in the
 * problem) or that the work ahead of it would make late (503, Retry-After
 * the seconds it is late by). "Ahead" is what round-robin would start
 * before its last task, after what the running tasks have left; the
 * device is taken as shared evenly by the tasks running on it (processor
 * sharing), so a small request beside a long one is slowed, not blocked.
 * The check and the queueing are one step under the lock: two requests
 * cannot both take the last of the slack.
 *
 * Models. The workers serve every model of the server (srv->models): a
 * task runs on its own model's engine, is estimated by that model's
 * estimator, and teaches it. One queue holds them all, so that the bound,
 * the fairness between clients and the admission by time hold across
 * models: the device is one, whichever model keeps it busy.
 *
 * Batches. Tasks of the same model that can share their UNet calls (the
 * same latent size, steps, sampler, guidance or not: sdx4_batchable; a
 * GAN never batches) run together, up to
 * --max-batch-size and what the engine's memory budget allows: each step
 * is one UNet call for all, which keeps a GPU busier, and each image is
 * the one it would be alone (sdx4_upscale_batch). A worker takes the next
 * task in turn, then the waiting tasks that can share with it, a lane at
 * a time in rotation order; when nothing else waits, it waits up to
 * --batch-window for more, while the other workers leave new tasks to it.
 * A batch holds one worker and counts as its tasks running. A task whose
 * stop flag is set leaves its batch at the next step; the others go on.
 *
 * Device time. A virtual clock advances by 1/n of a second each second
 * while n tasks run: a task's span on it is the time it would have taken
 * alone, which is what the estimates are in, what the running tasks have
 * left is measured in, and what cost.c learns from.
 *
 * Deadlines are enforced by jobs.c, which removes expired tasks from here
 * and sets the task's stop flag; the engine reads that flag
 * (sdx4_upscale_params.cancel) at step boundaries and inside long
 * operations. A worker still busy past its task's deadline is counted
 * (queue_stats) and, when it ends, how long past is recorded
 * (metrics_worker_overrun).
 *
 * A worker's life: take a batch, ask jobs.c which tasks it still wants
 * running, run them through runner.c (the engine with the task's stop flag and a
 * progress callback that reports each step, then the encoding: the same
 * calls as cluster mode's workers), fill the cache, teach cost.c, report
 * the outcome, release its reference to the job.
 */
#include "queue.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "cost.h"
#include "jobs.h"
#include "log.h"
#include "metrics.h"
#include "models.h"
#include "results.h"
#include "runner.h"

typedef struct queue_lane {
    char client[64];
    task *head, *tail;
    int length;
    struct queue_lane *next; /* rotation order */
} queue_lane;

/* What a worker is running (copies: the task may be freed first). */
typedef struct {
    bool busy;
    double started, deadline; /* mono_now() */
    double device_started;    /* the virtual clock at the start */
    double estimate;          /* seconds alone (cost.c), 0 unknown: its tasks' sum */
    int tasks;                /* sharing its UNet calls */
    int model;                /* their model */
    char request_id[48];      /* its first task's */
} worker_slot;

struct queue {
    server *srv;
    pthread_mutex_t lock;
    pthread_cond_t work;
    queue_lane *first, *last; /* the next lane served is `first` */
    int depth, capacity, running, nworkers;
    int gathering; /* workers waiting for tasks to share their batch */
    bool closed;
    pthread_t *threads;
    worker_slot *slots;           /* [nworkers] */
    double device_clock, clock_at; /* the virtual clock, and when it was read */
    int exited; /* workers that have returned */
    pthread_cond_t exit;
};

/* ---- lanes ---------------------------------------------------------------- */

static queue_lane *lane_for(queue *q, const char *client) {
    for (queue_lane *l = q->first; l; l = l->next)
        if (strcmp(l->client, client) == 0) return l;
    queue_lane *l = calloc(1, sizeof *l);
    if (!l) return NULL;
    snprintf(l->client, sizeof l->client, "%s", client);
    if (q->last) q->last->next = l;
    else q->first = l;
    q->last = l;
    return l;
}

static void unlink_lane(queue *q, queue_lane *l) {
    queue_lane **p = &q->first, *prev = NULL;
    while (*p && *p != l) prev = *p, p = &(*p)->next;
    if (!*p) return;
    *p = l->next;
    if (q->last == l) q->last = prev;
    l->next = NULL;
}

static task *pop(queue *q) {
    queue_lane *l = q->first;
    task *t = l->head;
    l->head = t->queue_next;
    if (!l->head) l->tail = NULL;
    l->length--;
    t->queue_next = NULL;
    t->lane = NULL;
    q->depth--;
    unlink_lane(q, l);
    if (l->length) { /* to the back of the rotation */
        if (q->last) q->last->next = l;
        else q->first = l;
        q->last = l;
    } else free(l);
    return t;
}

/* Takes t out of its lane, wherever it waits: 1, or 0 when it is not
 * waiting. Lock held. */
static int unlink_task(queue *q, task *t) {
    queue_lane *l = t->lane;
    if (!l) return 0;
    task **p = &l->head, *prev = NULL;
    while (*p && *p != t) prev = *p, p = &(*p)->queue_next;
    if (!*p) return 0;
    *p = t->queue_next;
    if (l->tail == t) l->tail = prev;
    t->queue_next = NULL;
    t->lane = NULL;
    l->length--;
    q->depth--;
    if (!l->length) {
        unlink_lane(q, l);
        free(l);
    }
    return 1;
}

/* ---- device time and admission --------------------------------------------- */

/* The virtual clock now (lock held). */
static double device_now(queue *q, double now) {
    if (q->running > 0) q->device_clock += (now - q->clock_at) / q->running;
    q->clock_at = now;
    return q->device_clock;
}

static double locked_device_now(queue *q) {
    pthread_mutex_lock(&q->lock);
    double v = device_now(q, mono_now());
    pthread_mutex_unlock(&q->lock);
    return v;
}

/* The estimates of the waiting tasks and then of `n` new ones of `client`,
 * in the order pop() would take them, up to the last new one (mine[i]
 * marks the new ones): round r serves the r-th task of every lane that
 * has one, lanes in rotation order, a new client's lane last. Returns the
 * count, or -1 out of memory. Lock held. */
static int pop_order(queue *q, const char *client, task **tasks, int n, double *est, bool *mine) {
    int nlanes = 1, ours = -1, count = 0, done = 0;
    for (queue_lane *l = q->first; l; l = l->next) nlanes++;
    const task **next = calloc((size_t)nlanes, sizeof *next);
    if (!next) return -1;
    int i = 0;
    for (queue_lane *l = q->first; l; l = l->next, i++) {
        next[i] = l->head;
        if (strcmp(l->client, client) == 0) ours = i;
    }
    if (ours < 0) ours = i; /* a new lane, at the back of the rotation */
    while (done < n)
        for (i = 0; i < nlanes && done < n; i++) {
            if (next[i]) {
                est[count] = next[i]->estimate, mine[count++] = false;
                next[i] = next[i]->queue_next;
            } else if (i == ours) {
                est[count] = tasks[done++]->estimate, mine[count++] = true;
            }
        }
    free(next);
    return count;
}

/* Seconds from now until the last of `n` new tasks of `client` would end:
 * the running tasks with what they have left, then the tasks in pop
 * order, at most nworkers at a time, all sharing the device evenly. -1
 * out of memory. Lock held. */
static double finish_time(queue *q, const char *client, task **tasks, int n, double now) {
    double *order = malloc(sizeof *order * (size_t)(q->depth + n));
    bool *mine = malloc(sizeof *mine * (size_t)(q->depth + n));
    int len = order && mine ? pop_order(q, client, tasks, n, order, mine) : -1;
    double left[MAX_WORKERS], elapsed = 0, clock = device_now(q, now);
    bool own[MAX_WORKERS];
    int active = 0, taken = 0, pending = n;
    for (int w = 0; w < q->nworkers; w++)
        if (q->slots[w].busy) {
            /* each of a batch's tasks has had its share of the device */
            double rest = q->slots[w].estimate - q->slots[w].tasks * (clock - q->slots[w].device_started);
            left[active] = rest > 0 ? rest : 0, own[active++] = false;
        }
    while (len >= 0 && pending > 0) {
        while (active < q->nworkers && taken < len)
            left[active] = order[taken], own[active++] = mine[taken++];
        if (!active) break;
        double least = left[0];
        for (int a = 1; a < active; a++)
            if (left[a] < least) least = left[a];
        elapsed += least * active; /* each of `active` gets 1/active of the device */
        for (int a = 0; a < active;) {
            left[a] -= least;
            if (left[a] > 1e-9) {
                a++;
                continue;
            }
            pending -= own[a];
            left[a] = left[--active], own[a] = own[active];
        }
    }
    free(order);
    free(mine);
    return len < 0 ? -1 : elapsed;
}

/* Refuses (-1, `why` set) a request that cannot end by `deadline`: 422
 * when it needs more than the request timeout alone, 503 when the work
 * ahead makes it late. Lock held. */
static int judge_time(queue *q, task **tasks, int n, double deadline, problem *why) {
    server *srv = q->srv;
    double alone = 0, now = mono_now(), limit = srv->cfg.request_timeout;
    int steps = 0, width = 0, height = 0;
    for (int i = 0; i < n; i++) {
        alone += tasks[i]->estimate;
        if (tasks[i]->opts.steps > steps) steps = tasks[i]->opts.steps;
        if ((double)tasks[i]->input.width * tasks[i]->input.height > (double)width * height)
            width = tasks[i]->input.width, height = tasks[i]->input.height;
    }
    if (alone > limit) {
        problem_set(why, PROBLEM_OVER_TIME_LIMIT,
                    "estimated to take %.1f s alone on this server (%d image%s, up to %dx%d, %d "
                    "step%s), but requests must finish within %g s: send fewer steps or a "
                    "smaller image", alone, n, n > 1 ? "s" : "", width, height, steps,
                    steps > 1 ? "s" : "", limit);
        why->estimated_seconds = alone, why->limit_seconds = limit;
        return -1;
    }
    double finish = finish_time(q, job_client(tasks[0]->job), tasks, n, now);
    if (finish < 0) return problem_set(why, PROBLEM_INTERNAL, "out of memory");
    if (finish <= deadline - now) return 0;
    problem_set(why, PROBLEM_QUEUE_TOO_LONG,
                "after the work ahead of it, it would end in about %.0f s, past its limit of %g s "
                "from arrival; retry later", finish, limit);
    why->estimated_seconds = finish + (now - (deadline - limit)), why->limit_seconds = limit;
    /* a retry has the whole limit, and the work ahead will have shrunk by
     * the seconds waited */
    double wait = finish - limit;
    why->retry_after = wait < 1 ? 1 : wait > 86400 ? 86400 : (int)ceil(wait);
    return -1;
}

int queue_push(queue *q, task **tasks, int n, double deadline, problem *why) {
    bool judged = n > 0; /* by time, when every task's model has a calibrated estimator */
    for (int i = 0; i < n; i++) {
        task *t = tasks[i];
        model_version *v = models_acquire(&q->srv->models[t->model]);
        cost_model *cost = v ? v->cost : NULL;
        int evaluations = sdx4_unet_evaluations(t->opts.scheduler, t->opts.steps);
        t->estimate = cost ? cost_estimate(cost, t->input.width, t->input.height, t->opts.tile,
                                           t->opts.tile_overlap, evaluations, (float)t->opts.guidance_scale > 1.0f)
                           : 0;
        judged = judged && cost && cost_calibrated(cost);
        models_release(v);
    }
    pthread_mutex_lock(&q->lock);
    int rc = 0;
    if (q->closed) rc = problem_set(why, PROBLEM_SHUTTING_DOWN, "the server is shutting down");
    else if (q->depth + n > q->capacity)
        rc = problem_set(why, PROBLEM_QUEUE_FULL,
                         "%d upscales are waiting (the most allowed is %d); retry later", q->depth,
                         q->capacity);
    else if (judged) rc = judge_time(q, tasks, n, deadline, why);
    queue_lane *l = rc == 0 && n ? lane_for(q, job_client(tasks[0]->job)) : NULL;
    if (rc == 0 && n && !l) rc = problem_set(why, PROBLEM_INTERNAL, "out of memory");
    for (int i = 0; rc == 0 && i < n; i++) {
        task *t = tasks[i];
        t->queue_next = NULL;
        t->lane = l;
        if (l->tail) l->tail->queue_next = t;
        else l->head = t;
        l->tail = t;
        l->length++;
        q->depth++;
    }
    if (rc == 0) pthread_cond_broadcast(&q->work);
    pthread_mutex_unlock(&q->lock);
    return rc;
}

int queue_remove(queue *q, task *t) {
    pthread_mutex_lock(&q->lock);
    int removed = unlink_task(q, t);
    pthread_mutex_unlock(&q->lock);
    return removed;
}

int queue_position(queue *q, const task *t) {
    pthread_mutex_lock(&q->lock);
    int position = -1;
    const queue_lane *mine = t->lane;
    if (mine) {
        int k = 0; /* tasks ahead of t in its own lane */
        for (const task *x = mine->head; x && x != t; x = x->queue_next) k++;
        /* round-robin: every lane gives min(length, k) tasks before t's
         * turn, plus one more for lanes served before t's in the round */
        bool before = true;
        position = 0;
        for (const queue_lane *l = q->first; l; l = l->next) {
            if (l == mine) {
                before = false;
                position += k;
                continue;
            }
            position += l->length < k ? l->length : k;
            if (before && l->length > k) position++;
        }
    }
    pthread_mutex_unlock(&q->lock);
    return position;
}

void queue_close(queue *q) {
    pthread_mutex_lock(&q->lock);
    q->closed = true;
    pthread_cond_broadcast(&q->work);
    pthread_mutex_unlock(&q->lock);
}

void queue_get_stats(queue *q, queue_stats *s) {
    pthread_mutex_lock(&q->lock);
    s->depth = q->depth;
    s->capacity = q->capacity;
    s->running = q->running;
    s->workers = q->nworkers;
    s->busy_after_deadline = 0;
    double now = mono_now();
    for (int i = 0; i < q->nworkers; i++)
        s->busy_after_deadline += q->slots[i].busy && now > q->slots[i].deadline;
    pthread_mutex_unlock(&q->lock);
}

int queue_get_workers(queue *q, queue_worker *out, int max) {
    pthread_mutex_lock(&q->lock);
    double now = mono_now();
    int n = 0;
    for (int i = 0; i < q->nworkers && n < max; i++) {
        const worker_slot *w = &q->slots[i];
        if (!w->busy) continue;
        out[n] = (queue_worker){.tasks = w->tasks, .model = w->model, .seconds = now - w->started,
                                .past_deadline = now > w->deadline ? now - w->deadline : 0,
                                .estimate = w->estimate};
        snprintf(out[n++].request_id, sizeof out->request_id, "%s", w->request_id);
    }
    pthread_mutex_unlock(&q->lock);
    return n;
}

/* ---- workers -------------------------------------------------------------- */

static int on_progress(void *user, int step, int total) {
    return job_task_progress(user, step, total);
}

/* Runs tasks that share their UNet calls (one alone is a batch of one):
 * then, for each, what a finished upscale does: metrics, cost learning
 * (from one alone only: a batch's seconds are shared), the encoding, the
 * cache, the result store, the job. */
static void run_batch(queue *q, model_version *v, task **tasks, int n) {
    server *srv = q->srv;
    served_model *model = &srv->models[tasks[0]->model]; /* the batch's tasks share it, and `v` */
    runner_item items[SDX4_MAX_BATCH];
    sdx4_image images[SDX4_MAX_BATCH];
    task_outcome outs[SDX4_MAX_BATCH];
    for (int k = 0; k < n; k++) {
        outs[k] = (task_outcome){.state = JOB_FAILED};
        /* t->stop is set by jobs.c on a deadline, a DELETE, a shutdown */
        items[k] = (runner_item){&tasks[k]->input, &tasks[k]->opts, &tasks[k]->stop, tasks[k], &images[k], &outs[k]};
    }
    double t0 = mono_now(), device0 = locked_device_now(q);
    runner_upscale_batch(v->engine, items, n, on_progress);
    for (int k = 0; k < n; k++) memcpy(outs[k].model_hash, v->hash, sizeof outs[k].model_hash);
    double seconds = mono_now() - t0, device_seconds = locked_device_now(q) - device0;
    metrics_batch(n);
    for (int k = 0; k < n; k++) {
        task *t = tasks[k];
        task_outcome *out = &outs[k];
        if (out->state == JOB_SUCCEEDED) {
            metrics_inference(seconds, models_is_gan(model) ? 0 : t->opts.steps); /* a GAN has no steps */
            if (n == 1 && v->cost && seconds > 0)
                cost_observe(v->cost, t->input.width, t->input.height, t->opts.tile, t->opts.tile_overlap,
                             sdx4_unet_evaluations(t->opts.scheduler, t->opts.steps),
                             (float)t->opts.guidance_scale > 1.0f, &out->report, device_seconds / seconds, false);
            runner_encode(&images[k], &t->opts,
                          &(runner_origin){model->name, v->hash, models_is_gan(model), t->input.width,
                                           t->input.height, t->icc, t->icc_len},
                          out);
            /* under the key of the version the request found (http.c): kept only when
             * that version ran it, else a swap back would serve this one's image */
            if (out->state == JOB_SUCCEEDED && t->cacheable && srv->cache &&
                !strcmp(t->model_hash, v->hash)) {
                cached_result r = {out->output, out->len, out->width, out->height,
                                   out->report.prompt_tokens, out->report.prompt_truncated,
                                   out->report.negative_truncated};
                cache_put(srv->cache, t->cache_key, &r);
            }
        }
        results_store(srv, job_id(t->job), job_listed(t->job), t, out); /* with --s3-bucket */
        job_task_finished(t, out);
    }
}

/* A free slot for task t, now running (lock held). */
static worker_slot *occupy(queue *q, const task *t) {
    worker_slot *w = q->slots;
    while (w->busy) w++; /* a worker per slot: one is free */
    double now = mono_now();
    *w = (worker_slot){.busy = true, .started = now, .deadline = job_deadline(t->job),
                       .device_started = device_now(q, now), .estimate = t->estimate, .tasks = 1,
                       .model = t->model};
    snprintf(w->request_id, sizeof w->request_id, "%s", job_request_id(t->job));
    q->running++;
    return w;
}

/* Task t joins the batch of slot w, now running (lock held): tasks that
 * share the device take about what they take in turn. */
static void join_slot(queue *q, worker_slot *w, const task *t) {
    device_now(q, mono_now()); /* the clock so far at the rate of the tasks before */
    w->estimate += t->estimate;
    if (job_deadline(t->job) > w->deadline) w->deadline = job_deadline(t->job);
    w->tasks++;
    q->running++;
}

/* ---- batches: waiting tasks that share a UNet call --------------------------- */

/* Adds to batch[0..n) waiting tasks of its model that can share batch[0]'s
 * UNet calls, up to `room`, each joining slot w: the first such task of each lane in
 * the rotation's order, round after round, so that one client's many
 * tasks do not fill a batch before another's one. Returns the new n.
 * Lock held. */
static int gather(queue *q, sdx4_engine *engine, worker_slot *w, task **batch, int n, int room) {
    for (bool took = true; took && n < room;) {
        took = false;
        for (queue_lane *l = q->first, *next; l && n < room; l = next) {
            next = l->next; /* unlink_task frees a lane it empties */
            task *t = l->head;
            while (t && (t->model != batch[0]->model ||
                         !runner_batchable(engine, &batch[0]->input, &batch[0]->opts, &t->input, &t->opts)))
                t = t->queue_next;
            if (t && unlink_task(q, t)) join_slot(q, w, batch[n++] = t), took = true;
        }
    }
    return n;
}

/* The next batch, lock held, in slot *w: the next task in turn, the
 * waiting tasks that can share its calls, and, while nothing else waits,
 * those that arrive within --batch-window (a lone task waits no longer
 * than that). While a worker waits so, the others leave new tasks to it.
 * *v: the model's version that runs it, referenced. */
static int next_batch(queue *q, task **batch, worker_slot **w, model_version **v) {
    batch[0] = pop(q);
    *w = occupy(q, batch[0]);
    *v = models_acquire(&q->srv->models[batch[0]->model]); /* loaded before any task is queued */
    sdx4_engine *engine = (*v)->engine;
    int room = runner_batch_room(engine, &batch[0]->input, &batch[0]->opts, q->srv->cfg.max_batch_size);
    int n = gather(q, engine, *w, batch, 1, room);
    double window = q->srv->cfg.batch_window;
    if (n < room && window > 0 && !q->first) {
        double until = mono_now() + window;
        struct timespec ts = {(time_t)until, (long)((until - (double)(time_t)until) * 1e9)};
        q->gathering++;
        while (n < room && !q->closed && !q->first && pthread_cond_timedwait(&q->work, &q->lock, &ts) == 0)
            n = gather(q, engine, *w, batch, n, room);
        n = gather(q, engine, *w, batch, n, room);
        q->gathering--;
        pthread_cond_broadcast(&q->work); /* the others may take what is left */
    }
    return n;
}

static void *worker_main(void *arg) {
    queue *q = arg;
    pthread_mutex_lock(&q->lock);
    for (;;) {
        while ((!q->first || q->gathering) && !q->closed) pthread_cond_wait(&q->work, &q->lock);
        if (!q->first) break; /* closed and empty */
        task *batch[SDX4_MAX_BATCH], *wanted[SDX4_MAX_BATCH];
        worker_slot *slot;
        model_version *v;
        int n = next_batch(q, batch, &slot, &v), m = 0;
        pthread_mutex_unlock(&q->lock);

        job *jobs[SDX4_MAX_BATCH];
        for (int k = 0; k < n; k++) {
            jobs[k] = batch[k]->job;
            if (job_task_started(batch[k])) wanted[m++] = batch[k];
        }
        if (m) run_batch(q, v, wanted, m);
        models_release(v); /* the last batch of a replaced version frees it */
        for (int k = 0; k < n; k++) job_release(jobs[k]); /* the references the queue held */

        pthread_mutex_lock(&q->lock);
        double now = mono_now();
        if (m && now > slot->deadline) metrics_worker_overrun(now - slot->deadline);
        device_now(q, now);
        slot->busy = false;
        q->running -= slot->tasks;
    }
    q->exited++;
    pthread_cond_broadcast(&q->exit);
    pthread_mutex_unlock(&q->lock);
    return NULL;
}

queue *queue_create(server *srv, int workers, int capacity) {
    queue *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    q->srv = srv;
    q->capacity = capacity;
    q->threads = calloc((size_t)workers, sizeof *q->threads);
    q->slots = calloc((size_t)workers, sizeof *q->slots);
    pthread_mutex_init(&q->lock, NULL);
    cond_init_monotonic(&q->work); /* next_batch's window */
    cond_init_monotonic(&q->exit);
    for (int i = 0; q->threads && q->slots && i < workers; i++) {
        if (pthread_create(&q->threads[i], NULL, worker_main, q) != 0) break;
        q->nworkers++;
    }
    if (q->nworkers < workers) {
        queue_destroy(q, mono_now() + 3600);
        return NULL;
    }
    return q;
}

int queue_destroy(queue *q, double deadline) {
    if (!q) return 0;
    queue_close(q);
    pthread_mutex_lock(&q->lock);
    while (q->exited < q->nworkers) {
        struct timespec ts = {(time_t)deadline, (long)((deadline - (double)(time_t)deadline) * 1e9)};
        if (pthread_cond_timedwait(&q->exit, &q->lock, &ts) != 0 && mono_now() >= deadline) break;
    }
    int all = q->exited == q->nworkers;
    pthread_mutex_unlock(&q->lock);
    if (!all) return -1;
    for (int i = 0; i < q->nworkers; i++) pthread_join(q->threads[i], NULL);
    pthread_cond_destroy(&q->work);
    pthread_cond_destroy(&q->exit);
    pthread_mutex_destroy(&q->lock);
    free(q->threads);
    free(q->slots);
    free(q);
    return 0;
}

/* ---- the dispatch interface (dispatch.h) ---------------------------------- */

static int dispatch_push_tasks(void *q, job *j, task **tasks, int n, double deadline, problem *why) {
    (void)j;
    return queue_push(q, tasks, n, deadline, why);
}

/* A task a worker holds is stopped by its flag, which jobs.c has set. */
static int dispatch_withdraw_task(void *q, task *t, int reason) {
    (void)reason;
    return queue_remove(q, t);
}

static int dispatch_task_position(void *q, const task *t) { return queue_position(q, t); }
static void dispatch_close_queue(void *q) { queue_close(q); }
static void dispatch_queue_stats(void *q, dispatch_stats *s) { queue_get_stats(q, s); }

dispatch queue_dispatch(queue *q) {
    static const dispatch_iface iface = {.push = dispatch_push_tasks, .withdraw = dispatch_withdraw_task,
                                         .position = dispatch_task_position, .close = dispatch_close_queue,
                                         .stats = dispatch_queue_stats};
    return (dispatch){&iface, q};
}
