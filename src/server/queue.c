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
 * somewhere unbounded. Deadlines are enforced by jobs.c, which removes
 * expired tasks from here; a running task stops at the next step boundary
 * through the engine's progress callback.
 *
 * A worker's life: pop a task, ask jobs.c whether it still wants running,
 * run sdx4_upscale with a progress callback that reports each step and
 * returns the task's stop flag, encode the image, fill the cache, report
 * the outcome, release its reference to the job.
 */
#include "queue.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "imageio.h"
#include "jobs.h"
#include "log.h"
#include "metrics.h"

typedef struct queue_lane {
    char client[64];
    task *head, *tail;
    int length;
    struct queue_lane *next; /* rotation order */
} queue_lane;

struct queue {
    server *srv;
    pthread_mutex_t lock;
    pthread_cond_t work;
    queue_lane *first, *last; /* the next lane served is `first` */
    int depth, capacity, running, nworkers;
    bool closed;
    pthread_t *threads;
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

int queue_push(queue *q, task **tasks, int n) {
    pthread_mutex_lock(&q->lock);
    int ok = !q->closed && q->depth + n <= q->capacity;
    queue_lane *l = ok && n ? lane_for(q, job_client(tasks[0]->job)) : NULL;
    if (ok && n && !l) ok = 0;
    for (int i = 0; ok && i < n; i++) {
        task *t = tasks[i];
        t->queue_next = NULL;
        t->lane = l;
        if (l->tail) l->tail->queue_next = t;
        else l->head = t;
        l->tail = t;
        l->length++;
        q->depth++;
    }
    if (ok) pthread_cond_broadcast(&q->work);
    pthread_mutex_unlock(&q->lock);
    return ok ? 0 : -1;
}

int queue_remove(queue *q, task *t) {
    pthread_mutex_lock(&q->lock);
    queue_lane *l = t->lane;
    int removed = 0;
    if (l) {
        task **p = &l->head, *prev = NULL;
        while (*p && *p != t) prev = *p, p = &(*p)->queue_next;
        if (*p) {
            *p = t->queue_next;
            if (l->tail == t) l->tail = prev;
            t->queue_next = NULL;
            t->lane = NULL;
            l->length--;
            q->depth--;
            removed = 1;
            if (!l->length) {
                unlink_lane(q, l);
                free(l);
            }
        }
    }
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
    pthread_mutex_unlock(&q->lock);
}

/* ---- workers -------------------------------------------------------------- */

static int on_progress(void *user, int step, int total) {
    return job_task_progress(user, step, total);
}

static void run(queue *q, task *t) {
    server *srv = q->srv;
    task_outcome out = {.state = JOB_FAILED};
    sdx4_upscale_params p;
    sdx4_upscale_params_default(&p);
    p.prompt = t->opts.prompt;
    p.negative_prompt = t->opts.negative_prompt;
    p.num_inference_steps = t->opts.steps;
    p.guidance_scale = (float)t->opts.guidance_scale;
    p.noise_level = (float)t->opts.noise_level;
    p.seed = t->opts.seed;
    p.eta = (float)t->opts.eta;
    p.progress = on_progress;
    p.progress_user = t;

    sdx4_image image = {0};
    double t0 = mono_now();
    sdx4_status st = sdx4_upscale(srv->engine, &t->input, &p, &image, &out.report);
    double seconds = mono_now() - t0;
    if (st == SDX4_ERR_CANCELED) {
        out.state = JOB_CANCELED;
    } else if (st != SDX4_OK) {
        /* an invalid argument is a limit of this model that the generic
         * checks cannot know (e.g. a test model's few noise-level classes) */
        if (st == SDX4_ERR_INVALID_ARGUMENT)
            problem_set(&out.error, PROBLEM_MODEL_REFUSED, "the model refused the inputs: %s", sdx4_last_error());
        else
            problem_set(&out.error, PROBLEM_UPSCALE_FAILED, "the engine failed: %s: %s", sdx4_status_name(st),
                        sdx4_last_error());
        log_event(LOG_ERROR, "upscale_failed",
                  json_pack("{s:s,s:s}", "status", sdx4_status_name(st), "error", sdx4_last_error()));
    } else {
        metrics_inference(seconds, t->opts.steps);
        char err[256];
        if (imageio_encode(&image, t->opts.format, t->opts.quality, &out.output, &out.len, err,
                           sizeof err) == 0) {
            out.state = JOB_SUCCEEDED;
            out.width = image.width;
            out.height = image.height;
            if (t->cacheable && srv->cache) {
                cached_result r = {out.output, out.len, out.width, out.height,
                                   out.report.prompt_tokens, out.report.prompt_truncated,
                                   out.report.negative_truncated};
                cache_put(srv->cache, t->cache_key, &r);
            }
        } else {
            problem_set(&out.error, PROBLEM_INTERNAL, "encoding the result failed: %s", err);
        }
        sdx4_image_free(&image);
    }
    job_task_finished(t, &out);
}

static void *worker_main(void *arg) {
    queue *q = arg;
    pthread_mutex_lock(&q->lock);
    for (;;) {
        while (!q->first && !q->closed) pthread_cond_wait(&q->work, &q->lock);
        if (!q->first) break; /* closed and empty */
        task *t = pop(q);
        q->running++;
        pthread_mutex_unlock(&q->lock);

        job *j = t->job;
        if (job_task_started(t)) run(q, t);
        job_release(j); /* the reference the queue held for this task */

        pthread_mutex_lock(&q->lock);
        q->running--;
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
    pthread_mutex_init(&q->lock, NULL);
    pthread_cond_init(&q->work, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&q->exit, &attr);
    pthread_condattr_destroy(&attr);
    for (int i = 0; q->threads && i < workers; i++) {
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
    free(q);
    return 0;
}
