/*
 * jobs.c - jobs, their tasks, deadlines and retention (see jobs.h).
 *
 * Locking. One mutex guards every job's state; the dispatcher (dispatch.h:
 * the queue, or Redis) has its own lock, always taken after this one (never
 * the reverse), and the webhook sender likewise. Waiters are detached under the lock and woken after it is
 * released, so a wake (MHD_resume_connection) never runs under our lock.
 *
 * Lifetime. A job is reference-counted: by the request or SSE stream that
 * holds it, by the store while it is listed, and once per task that the
 * dispatcher holds. It is freed when the last reference goes, so
 * a worker finishing a task whose client gave up, or a connection reading
 * a job that retention just dropped, never touches freed memory.
 *
 * Deadlines and retention. A reaper thread sleeps until the earliest
 * deadline among unfinished jobs (or at most a second); it cancels expired
 * jobs (504 for their clients; their workers stop at the next step) and
 * drops finished listed jobs past the retention time, beyond the maximum
 * count or beyond the memory budget for results, oldest first.
 *
 * Ownership. A listed job belongs to the identity that made it (its API
 * key's, auth.h); to any other, its id is as unknown as a random one.
 * Without API keys every client is anonymous and the id, 128 random bits,
 * is the only thing that admits to a job: whoever holds it may read and
 * cancel it, as with any capability URL.
 */
#include "jobs.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "auth.h"
#include "base64.h"
#include "history.h"
#include "log.h"
#include "metrics.h"
#include "models.h"
#include "results.h"
#include "webhook.h"

enum { WEBHOOK_NONE, WEBHOOK_PENDING, WEBHOOK_DELIVERED, WEBHOOK_FAILED };

struct job {
    job_store *store;
    char id[33];
    form_kind kind;
    bool listed;
    char client[64], request_id[48];
    char owner[AUTH_IDENTITY_SIZE]; /* identity that may find the job by id ("" anonymous) */
    int ntasks, unfinished;
    task *tasks;
    job_state state;
    double created, created_wall, started, finished, deadline;
    unsigned version;
    waiter *waiters;
    char *webhook_url;
    int webhook_state, webhook_attempts;
    char webhook_error[320]; /* why the webhook failed */
    int refs;
    size_t held_bytes; /* while retained (--jobs-memory): its outputs, and the inputs it still holds */
    bool in_store;                  /* in the id table (listed, not dropped) */
    bool adopted;                   /* made on another node (job_adopt): a copy here */
    bool never_dispatched;          /* unlisted, and nothing of it to run (every image answered
                                       from the cache or refused): a shared store never hears of it */
    job *hash_next;                 /* id table chain */
    job *list_prev, *list_next;     /* the active list, or the retained list */
};

typedef struct {
    job *head, *tail;
    int count;
} job_list;

#define ID_BUCKETS 1024

struct job_store {
    server *srv;
    pthread_mutex_t lock;
    pthread_cond_t reaper_wake, idle;
    job *ids[ID_BUCKETS];
    job_list active, retained;
    size_t retained_bytes;
    bool draining, closing;
    pthread_t reaper;
};

const char *job_state_name(job_state s) {
    static const char *const names[] = {"queued", "running", "succeeded", "failed", "canceled"};
    return (unsigned)s <= JOB_CANCELED ? names[s] : "unknown";
}

static bool final(job_state s) { return s >= JOB_SUCCEEDED; }

/* ---- lists and the id table ------------------------------------------------ */

static void list_append(job_list *l, job *j) {
    j->list_prev = l->tail;
    j->list_next = NULL;
    if (l->tail) l->tail->list_next = j;
    else l->head = j;
    l->tail = j;
    l->count++;
}

static void list_remove(job_list *l, job *j) {
    if (j->list_prev) j->list_prev->list_next = j->list_next;
    else l->head = j->list_next;
    if (j->list_next) j->list_next->list_prev = j->list_prev;
    else l->tail = j->list_prev;
    j->list_prev = j->list_next = NULL;
    l->count--;
}

static unsigned id_bucket(const char *id) {
    unsigned h = 0;
    for (int i = 0; i < 8 && id[i]; i++) h = h * 16 + (unsigned)(id[i] <= '9' ? id[i] - '0' : id[i] - 'a' + 10);
    return h % ID_BUCKETS;
}

static void id_remove(job_store *s, job *j) {
    for (job **p = &s->ids[id_bucket(j->id)]; *p; p = &(*p)->hash_next)
        if (*p == j) {
            *p = j->hash_next;
            break;
        }
    j->in_store = false;
}

/* ---- reference counting ---------------------------------------------------- */

static void job_free(job *j) {
    for (int i = 0; i < j->ntasks; i++) {
        task *t = &j->tasks[i];
        sdx4_image_free(&t->input);
        free(t->icc);
        options_free(&t->opts);
        free(t->output);
    }
    free(j->tasks);
    free(j->webhook_url);
    free(j);
}

void job_release(job *j) {
    if (!j) return;
    job_store *s = j->store;
    pthread_mutex_lock(&s->lock);
    int left = --j->refs;
    pthread_mutex_unlock(&s->lock);
    if (!left) job_free(j);
}

/* ---- waking waiters ---------------------------------------------------------- */

/* Detaches the waiters interested in this change; the caller wakes them
 * after unlocking. */
static waiter *take_waiters(job *j, bool finished) {
    waiter *woken = NULL, **p = &j->waiters;
    while (*p) {
        waiter *w = *p;
        if (finished || !w->final_only) {
            *p = w->next;
            w->next = woken;
            woken = w;
        } else p = &w->next;
    }
    return woken;
}

/* Moves every waiter of `w` to the front of `list`; returns the new list. */
static waiter *prepend_waiters(waiter *w, waiter *list) {
    while (w) {
        waiter *next = w->next;
        w->next = list;
        list = w;
        w = next;
    }
    return list;
}

static void wake_all(waiter *w) {
    while (w) {
        waiter *next = w->next; /* w may be freed by its wake */
        w->next = NULL;
        w->wake(w->arg);
        w = next;
    }
}

/* ---- documents ---------------------------------------------------------------- */

static void set_time(json_t *doc, const char *key, const job *j, double mono) {
    char buf[40];
    iso_time(buf, sizeof buf, j->created_wall + (mono - j->created));
    json_object_set_new(doc, key, json_string(buf));
}

static json_t *job_document_locked(job *j) {
    static const char *const webhook_states[] = {"none", "pending", "delivered", "failed"};
    double now = mono_now();
    json_t *d = json_object();
    json_object_set_new(d, "id", json_string(j->id));
    json_object_set_new(d, "status", json_string(job_state_name(j->state)));
    json_object_set_new(d, "kind", json_string(j->kind == FORM_BATCH ? "batch" : "upscale"));
    json_object_set_new(d, "images", json_integer(j->ntasks));
    json_object_set_new(d, "model", json_string(j->store->srv->models[j->tasks[0].model].name));
    if (j->tasks[0].model_hash[0]) /* the version that ran it, or that was current when it came */
        json_object_set_new(d, "model_hash", json_string(j->tasks[0].model_hash));
    set_time(d, "created_at", j, j->created);
    if (j->started > 0) set_time(d, "started_at", j, j->started);
    if (final(j->state)) set_time(d, "finished_at", j, j->finished);

    int step = 0, total = 0, position = -1;
    for (int i = 0; i < j->ntasks; i++) {
        task *t = &j->tasks[i];
        step += t->step;
        total += t->total;
        if (t->state == JOB_QUEUED) {
            int p = dispatch_position(&j->store->srv->dispatch, t);
            if (p >= 0 && (position < 0 || p < position)) position = p;
        }
    }
    json_object_set_new(d, "progress", json_pack("{s:i,s:i}", "step", step, "total", total));
    if (j->state == JOB_QUEUED && position >= 0)
        json_object_set_new(d, "queue_position", json_integer(position));

    double end = final(j->state) ? j->finished : now;
    double started = j->started > 0 ? j->started : end;
    json_object_set_new(d, "timings", json_pack("{s:f,s:f}", "queue_ms", (started - j->created) * 1e3,
                                                "inference_ms", (end - started) * 1e3));
    for (int i = 0; i < j->ntasks; i++)
        if ((j->state == JOB_FAILED || j->state == JOB_CANCELED) && j->tasks[i].error.kind) {
            json_object_set_new(d, "error", problem_object(&j->tasks[i].error, j->request_id));
            break;
        }
    char path[80];
    snprintf(path, sizeof path, "/api/v1/jobs/%s", j->id);
    json_object_set_new(d, "links", json_pack("{s:s,s:s+,s:s+}", "self", path, "result", path,
                                              "/result", "events", path, "/events"));
    if (results_stored(j->store->srv, j->listed) && final(j->state))
        json_object_set_new(d, "results", results_links(j->store->srv, j->id, j->tasks, j->ntasks));
    if (j->webhook_url) {
        json_t *hook = json_pack("{s:s,s:i}", "status", webhook_states[j->webhook_state], "attempts",
                                 j->webhook_attempts);
        if (j->webhook_error[0]) json_object_set_new(hook, "error", json_string(j->webhook_error));
        json_object_set_new(d, "webhook", hook);
    }
    return d;
}

json_t *job_document(job *j) {
    pthread_mutex_lock(&j->store->lock);
    json_t *d = job_document_locked(j);
    pthread_mutex_unlock(&j->store->lock);
    return d;
}

json_t *job_store_list(job_store *s, const char *state, int limit) {
    json_t *jobs = json_array();
    pthread_mutex_lock(&s->lock);
    const job_list *lists[] = {&s->active, &s->retained};
    for (int l = 0; l < 2; l++)
        for (job *j = lists[l]->tail; j && (int)json_array_size(jobs) < limit; j = j->list_prev) {
            if (state && strcmp(job_state_name(j->state), state) != 0) continue;
            json_t *d = job_document_locked(j);
            json_object_set_new(d, "owner", json_string(j->owner));
            json_object_set_new(d, "client", json_string(j->client));
            json_object_set_new(d, "request_id", json_string(j->request_id));
            json_object_set_new(d, "listed", json_boolean(j->listed));
            json_array_append_new(jobs, d);
        }
    pthread_mutex_unlock(&s->lock);
    return jobs;
}

/* Reads outputs without the lock: the caller saw the job final, and a
 * final task never changes. */
json_t *job_batch_results(job *j) {
    json_t *results = json_array();
    for (int i = 0; i < j->ntasks; i++) {
        task *t = &j->tasks[i];
        json_t *e;
        if (t->state == JOB_SUCCEEDED) {
            char *b64 = base64_encode(t->output, t->output_len, NULL);
            char size[32];
            snprintf(size, sizeof size, "%dx%d", t->out_width, t->out_height);
            e = json_pack("{s:i,s:i,s:s,s:s,s:I,s:s,s:b,s:s,s:f}", "index", i, "status", 200,
                          "content_type", imageio_mime_type(t->opts.format), "image", b64 ? b64 : "",
                          "seed", (json_int_t)t->opts.seed, "output_size", size,
                          "prompt_truncated", t->report.prompt_truncated != 0, "cache",
                          t->cache_hit ? "HIT" : t->cacheable ? "MISS" : "BYPASS", "inference_ms",
                          t->cache_hit ? 0.0 : (t->finished - t->started) * 1e3);
            free(b64);
        } else {
            problem p = t->error;
            if (!p.kind) problem_set(&p, PROBLEM_INTERNAL, "no result");
            e = json_pack("{s:i,s:i,s:o}", "index", i, "status", problem_status(p.kind), "error",
                          problem_object(&p, j->request_id));
        }
        json_array_append_new(results, e);
    }
    return json_pack("{s:s,s:i,s:o}", "id", j->id, "count", j->ntasks, "results", results);
}

/* ---- state changes (lock held) ----------------------------------------------- */

static void drop_retained(job_store *s, job *j, job **release) {
    list_remove(&s->retained, j);
    s->retained_bytes -= j->held_bytes;
    id_remove(s, j);
    /* the store's reference goes after unlocking: chain through hash_next */
    j->hash_next = *release;
    *release = j;
}

static void record_history(job *j);
static webhook_done_fn webhook_done;

static void job_finished_locked(job_store *s, job *j) {
    job_state state = JOB_SUCCEEDED;
    for (int i = 0; i < j->ntasks; i++) {
        job_state ts = j->tasks[i].state;
        if (ts == JOB_CANCELED) state = JOB_CANCELED;
        else if (ts == JOB_FAILED && state != JOB_CANCELED) state = JOB_FAILED;
        /* an image that ran gave its input back (job_task_finished); one canceled or
         * timed out in the queue, or answered from the cache, holds it until the job goes */
        const sdx4_image *in = &j->tasks[i].input;
        j->held_bytes += j->tasks[i].output_len + (in->pixels ? (size_t)3 * in->width * in->height : 0);
    }
    /* a batch that ran to its end succeeded, even if some images failed:
     * each image's entry carries its own error */
    if (j->kind == FORM_BATCH && state == JOB_FAILED) {
        bool expired = false;
        for (int i = 0; i < j->ntasks; i++) expired |= j->tasks[i].error.kind == PROBLEM_TIMEOUT;
        if (!expired) state = JOB_SUCCEEDED;
    }
    j->state = state;
    j->finished = mono_now();
    list_remove(&s->active, j);
    if (j->in_store) {
        list_append(&s->retained, j);
        s->retained_bytes += j->held_bytes;
    }
    /* a job of a shared store is finished once there, by whoever does it */
    const dispatch *d = &s->srv->dispatch;
    if (j->in_store && j->webhook_url && s->srv->webhooks && !(d->iface && d->iface->shared)) {
        json_t *doc = job_document_locked(j);
        char *body = json_dumps(doc, JSON_COMPACT);
        json_decref(doc);
        if (body && webhooks_send(s->srv->webhooks, j->id, j->webhook_url, job_state_name(state), body,
                                  webhook_done, s, j->webhook_error, sizeof j->webhook_error) == 0)
            j->webhook_state = WEBHOOK_PENDING;
        else
            j->webhook_state = WEBHOOK_FAILED;
        free(body);
    }
    /* one row per job: in a shared store by whoever ended it there (a
     * worker, or the dispatcher), here only a job that never went there */
    if (s->srv->history && !j->adopted && (!(d->iface && d->iface->shared) || j->never_dispatched))
        record_history(j);
    pthread_cond_broadcast(&s->idle);
    log_event(LOG_INFO, "job_finished",
              json_pack("{s:s,s:s,s:s,s:i,s:f}", "request_id", j->request_id, "job_id", j->id,
                        "status", job_state_name(state), "images", j->ntasks,
                        "seconds", j->finished - j->created));
}

/* Marks one task final (if it is not already); true if it was. */
static bool finish_task_locked(task *t, job_state state) {
    job *j = t->job;
    if (final(t->state)) return false;
    t->state = state;
    t->finished = mono_now();
    j->version++;
    if (--j->unfinished == 0) job_finished_locked(j->store, j);
    return true;
}

static void stop_problem(problem *p, int reason, double timeout) {
    if (reason == STOP_TIMEOUT)
        problem_set(p, PROBLEM_TIMEOUT, "not finished within %g s of arrival; the work was canceled",
                    timeout);
    else if (reason == STOP_SHUTDOWN)
        problem_set(p, PROBLEM_SHUTTING_DOWN, "the server shut down before the work finished");
    else
        problem_set(p, PROBLEM_CANCELED, "canceled by the client");
}

/* Stops the job's unfinished tasks; queued ones leave the dispatcher here,
 * running ones see `stop` at their next step. */
static int cancel_locked(job *j, int reason) {
    job_store *s = j->store;
    if (final(j->state)) return 0;
    for (int i = 0; i < j->ntasks; i++) {
        task *t = &j->tasks[i];
        if (final(t->state)) continue;
        atomic_store(&t->stop, reason);
        stop_problem(&t->error, reason, s->srv->cfg.request_timeout);
        if (dispatch_withdraw(&s->srv->dispatch, t, reason)) j->refs--; /* the dispatcher's */
        finish_task_locked(t, reason == STOP_TIMEOUT ? JOB_FAILED : JOB_CANCELED);
    }
    return 1;
}

/* ---- the reaper -------------------------------------------------------------- */

static void sweep_retained(job_store *s, double now, job **release) {
    const server_config *c = &s->srv->cfg;
    while (s->retained.head) {
        job *j = s->retained.head;
        bool expired = j->finished + c->job_retention <= now;
        bool over = s->retained.count > c->max_jobs || s->retained_bytes > c->jobs_memory;
        if (!expired && !over) break;
        drop_retained(s, j, release);
    }
}

static void *reaper_main(void *arg) {
    job_store *s = arg;
    pthread_mutex_lock(&s->lock);
    while (!s->closing) {
        double now = mono_now(), next = now + 1.0;
        waiter *woken = NULL;
        job *release = NULL;
        for (job *j = s->active.head, *n; j; j = n) {
            n = j->list_next;
            if (j->deadline <= now) {
                log_event(LOG_WARN, "job_timeout", json_pack("{s:s,s:s}", "request_id", j->request_id, "job_id", j->id));
                cancel_locked(j, STOP_TIMEOUT); /* removes j from the active list */
                woken = prepend_waiters(take_waiters(j, true), woken);
            } else if (j->deadline < next) next = j->deadline;
        }
        sweep_retained(s, now, &release);
        if (woken || release) {
            pthread_mutex_unlock(&s->lock);
            wake_all(woken);
            while (release) {
                job *n = release->hash_next;
                job_release(release);
                release = n;
            }
            pthread_mutex_lock(&s->lock);
            continue;
        }
        struct timespec ts = {(time_t)next, (long)((next - (double)(time_t)next) * 1e9)};
        pthread_cond_timedwait(&s->reaper_wake, &s->lock, &ts);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

job_store *job_store_create(server *srv) {
    job_store *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->srv = srv;
    pthread_mutex_init(&s->lock, NULL);
    cond_init_monotonic(&s->reaper_wake);
    cond_init_monotonic(&s->idle);
    if (pthread_create(&s->reaper, NULL, reaper_main, s) != 0) {
        free(s);
        return NULL;
    }
    return s;
}

void job_store_destroy(job_store *s) {
    if (!s) return;
    pthread_mutex_lock(&s->lock);
    s->closing = true;
    pthread_cond_signal(&s->reaper_wake);
    pthread_mutex_unlock(&s->lock);
    pthread_join(s->reaper, NULL);
    job *release = NULL;
    pthread_mutex_lock(&s->lock);
    while (s->retained.head) drop_retained(s, s->retained.head, &release);
    pthread_mutex_unlock(&s->lock);
    while (release) {
        job *n = release->hash_next;
        job_release(release);
        release = n;
    }
    pthread_cond_destroy(&s->reaper_wake);
    pthread_cond_destroy(&s->idle);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

void job_store_drain(job_store *s, double deadline) {
    pthread_mutex_lock(&s->lock);
    s->draining = true;
    dispatch_close(&s->srv->dispatch);
    while (s->active.head && mono_now() < deadline) {
        struct timespec ts = {(time_t)deadline, (long)((deadline - (double)(time_t)deadline) * 1e9)};
        pthread_cond_timedwait(&s->idle, &s->lock, &ts);
    }
    waiter *woken = NULL;
    while (s->active.head) {
        job *j = s->active.head;
        cancel_locked(j, STOP_SHUTDOWN);
        woken = prepend_waiters(take_waiters(j, true), woken);
    }
    pthread_mutex_unlock(&s->lock);
    wake_all(woken);
}

/* ---- creating and submitting --------------------------------------------------- */

job *job_create(job_store *s, form_kind kind, int ntasks, bool listed, const char *client,
                const char *request_id, double arrival) {
    job *j = calloc(1, sizeof *j);
    if (!j || !(j->tasks = calloc((size_t)ntasks, sizeof *j->tasks))) {
        free(j);
        return NULL;
    }
    j->store = s;
    j->kind = kind;
    j->listed = listed;
    j->ntasks = j->unfinished = ntasks;
    j->refs = 1;
    j->created = arrival;
    j->created_wall = wall_now() - (mono_now() - arrival);
    j->deadline = j->created + s->srv->cfg.request_timeout;
    snprintf(j->client, sizeof j->client, "%s", client);
    snprintf(j->request_id, sizeof j->request_id, "%s", request_id);
    uint8_t random[16];
    if (getrandom(random, sizeof random, 0) != sizeof random) {
        /* never short for 16 bytes once the pool is ready; keep ids unique anyway */
        static atomic_ullong counter;
        unsigned long long c = atomic_fetch_add(&counter, 1);
        memcpy(random, &c, sizeof c);
    }
    for (int i = 0; i < 16; i++) snprintf(j->id + 2 * i, 3, "%02x", random[i]);
    for (int i = 0; i < ntasks; i++) {
        j->tasks[i].job = j;
        j->tasks[i].index = i;
    }
    return j;
}

task *job_task(job *j, int i) { return &j->tasks[i]; }
int job_ntasks(const job *j) { return j->ntasks; }
const char *job_id(const job *j) { return j->id; }
const char *job_client(const job *j) { return j->client; }
const char *job_request_id(const job *j) { return j->request_id; }
const char *job_owner(const job *j) { return j->owner; }
const char *job_webhook_url(const job *j) { return j->webhook_url; }
bool job_listed(const job *j) { return j->listed; }
double job_created_wall(const job *j) { return j->created_wall; }
double job_deadline(const job *j) { return j->deadline; }
form_kind job_kind(const job *j) { return j->kind; }

void job_set_webhook(job *j, const char *url) {
    free(j->webhook_url);
    j->webhook_url = url ? strdup(url) : NULL;
}

void job_set_owner(job *j, const char *owner) { snprintf(j->owner, sizeof j->owner, "%s", owner); }

void job_task_reject(task *t, const problem *why) {
    t->state = JOB_FAILED;
    t->error = *why;
    t->job->unfinished--;
}

int job_submit(job *j, problem *err) {
    job_store *s = j->store;
    server *srv = s->srv;
    task **pending = calloc((size_t)j->ntasks, sizeof *pending);
    int npending = 0, rc = -1;
    if (!pending) {
        problem_set(err, PROBLEM_INTERNAL, "out of memory");
        goto done;
    }
    for (int i = 0; i < j->ntasks; i++) {
        task *t = &j->tasks[i];
        if (final(t->state)) continue; /* rejected before submission */
        /* a GAN's progress counts its tiles, one unit until it says how many */
        t->total = models_is_gan(&s->srv->models[t->model]) ? 1 : t->opts.steps;
        if (!t->cache_hit) pending[npending++] = t;
    }

    pthread_mutex_lock(&s->lock);
    if (s->draining) {
        pthread_mutex_unlock(&s->lock);
        problem_set(err, PROBLEM_SHUTTING_DOWN, "the server is shutting down");
        goto done;
    }
    double now = mono_now();
    for (int i = 0; i < npending; i++) pending[i]->enqueued = now;
    j->never_dispatched = !j->listed && npending == 0; /* as dispatch_redis.c's push sees it */
    if (dispatch_push(&srv->dispatch, j, pending, npending, j->deadline, err) != 0) {
        pthread_mutex_unlock(&s->lock);
        goto done;
    }
    j->refs += npending; /* one per task the dispatcher now holds */
    list_append(&s->active, j);
    if (j->listed) {
        unsigned b = id_bucket(j->id);
        j->hash_next = s->ids[b];
        s->ids[b] = j;
        j->in_store = true;
        j->refs++;
    }
    for (int i = 0; i < j->ntasks; i++) {
        task *t = &j->tasks[i];
        if (!t->cache_hit) continue;
        t->step = t->total;
        t->started = now;
        if (j->started <= 0) j->started = now;
        finish_task_locked(t, JOB_SUCCEEDED);
    }
    if (j->unfinished == 0 && !final(j->state)) job_finished_locked(s, j); /* nothing to run */
    /* the reaper watches deadlines and retention: a job answered whole
     * from the cache and not listed gives it nothing to do, and waking it
     * would cost a cached answer a thread switch */
    if (!final(j->state) || j->in_store) pthread_cond_signal(&s->reaper_wake);
    pthread_mutex_unlock(&s->lock);
    rc = 0;
done:
    free(pending);
    return rc;
}

static job *find_locked(job_store *s, const char *id) {
    job *j = s->ids[id_bucket(id)];
    while (j && strcmp(j->id, id) != 0) j = j->hash_next;
    return j;
}

/* An unlisted job (a synchronous upscale) by id: only the admin API looks
 * for one, so a walk of the unfinished ones does. */
static job *find_unlisted_locked(job_store *s, const char *id) {
    job *j = s->active.head;
    while (j && strcmp(j->id, id) != 0) j = j->list_next;
    return j;
}

int job_retained_ids(job_store *s, char (**ids)[33]) {
    pthread_mutex_lock(&s->lock);
    int n = 0;
    char(*out)[33] = malloc(sizeof *out * (size_t)(s->retained.count + 1));
    for (job *j = s->retained.head; out && j; j = j->list_next)
        if (j->in_store) memcpy(out[n++], j->id, sizeof *out);
    pthread_mutex_unlock(&s->lock);
    *ids = out;
    return out ? n : -1;
}

job *job_find(job_store *s, const char *id, const char *owner, problem *why) {
    pthread_mutex_lock(&s->lock);
    job *j = find_locked(s, id);
    if (!j && !owner) j = find_unlisted_locked(s, id);
    bool known = j != NULL;
    if (j && owner && strcmp(j->owner, owner) != 0) j = NULL;
    if (j) j->refs++;
    bool stale = j && !final(j->state); /* another node may have seen more of it */
    pthread_mutex_unlock(&s->lock);
    why->kind = PROBLEM_NONE;
    const dispatch *d = &s->srv->dispatch;
    if (!known && d->iface && d->iface->find) j = d->iface->find(d->ctx, id, owner, why);
    else if (stale && d->iface && d->iface->refresh) d->iface->refresh(d->ctx, id);
    return j;
}

job *job_adopt(job *j, const char *id) {
    job_store *s = j->store;
    pthread_mutex_lock(&s->lock);
    job *known = find_locked(s, id);
    if (known) { /* adopted meanwhile by another request */
        known->refs++;
        pthread_mutex_unlock(&s->lock);
        job_release(j);
        return known;
    }
    snprintf(j->id, sizeof j->id, "%s", id);
    j->adopted = true;
    const dispatch *d = &s->srv->dispatch;
    double now = mono_now();
    j->unfinished = 0;
    for (int i = 0; i < j->ntasks; i++) {
        task *t = &j->tasks[i];
        if (t->state != JOB_QUEUED && j->started <= 0) j->started = now;
        if (final(t->state)) continue;
        j->unfinished++;
        j->refs++; /* the dispatcher's, for the task it now reports */
        d->iface->watch(d->ctx, t);
    }
    j->refs++; /* the store's */
    list_append(&s->active, j);
    unsigned b = id_bucket(j->id);
    j->hash_next = s->ids[b];
    s->ids[b] = j;
    j->in_store = true;
    if (!j->unfinished) job_finished_locked(s, j);
    else if (j->started > 0) j->state = JOB_RUNNING;
    pthread_cond_signal(&s->reaper_wake);
    pthread_mutex_unlock(&s->lock);
    return j;
}

/* Cancels and forgets `j` here; `everywhere`: in a shared store too. */
static void delete_job(job *j, bool everywhere) {
    job_store *s = j->store;
    job *release = NULL;
    const dispatch *d = &s->srv->dispatch;
    pthread_mutex_lock(&s->lock);
    cancel_locked(j, STOP_CLIENT);
    if (everywhere && d->iface && d->iface->forget) d->iface->forget(d->ctx, j);
    waiter *woken = take_waiters(j, true);
    if (j->in_store) drop_retained(s, j, &release); /* final now: it is retained */
    pthread_mutex_unlock(&s->lock);
    wake_all(woken);
    if (release) job_release(release);
}

void job_delete(job *j) { delete_job(j, true); }

void job_cancel(job *j) {
    pthread_mutex_lock(&j->store->lock);
    bool stopping[FORM_MAX_IMAGES];
    for (int i = 0; i < j->ntasks; i++) stopping[i] = !final(j->tasks[i].state);
    waiter *woken = cancel_locked(j, STOP_CLIENT) ? take_waiters(j, true) : NULL;
    for (int i = 0; i < j->ntasks; i++) /* whose cancel it was, for the owner */
        if (stopping[i]) problem_set(&j->tasks[i].error, PROBLEM_CANCELED, "canceled by an administrator");
    pthread_mutex_unlock(&j->store->lock);
    wake_all(woken);
}

void job_forgotten(job_store *s, const char *id) {
    pthread_mutex_lock(&s->lock);
    job *j = find_locked(s, id);
    if (j) j->refs++;
    pthread_mutex_unlock(&s->lock);
    if (!j) return;
    delete_job(j, false);
    job_release(j);
}

int job_wait(job *j, unsigned seen_version, waiter *w) {
    pthread_mutex_lock(&j->store->lock);
    bool changed = w->final_only ? final(j->state) : j->version != seen_version;
    if (!changed) {
        w->next = j->waiters;
        j->waiters = w;
        w->suspend(w->arg);
    }
    pthread_mutex_unlock(&j->store->lock);
    return changed;
}

void job_unwait(job *j, waiter *w) {
    pthread_mutex_lock(&j->store->lock);
    for (waiter **p = &j->waiters; *p; p = &(*p)->next)
        if (*p == w) {
            *p = w->next;
            break;
        }
    pthread_mutex_unlock(&j->store->lock);
}

void job_get_view(job *j, job_view *v) {
    pthread_mutex_lock(&j->store->lock);
    v->state = j->state;
    v->version = j->version;
    v->error.kind = PROBLEM_NONE;
    for (int i = 0; i < j->ntasks && !v->error.kind; i++)
        if (j->tasks[i].error.kind) v->error = j->tasks[i].error;
    pthread_mutex_unlock(&j->store->lock);
}

/* ---- worker callbacks ------------------------------------------------------------ */

bool job_task_started(task *t) {
    job *j = t->job;
    job_store *s = j->store;
    pthread_mutex_lock(&s->lock);
    bool run = t->state == JOB_QUEUED;
    waiter *woken = NULL;
    if (run) {
        t->state = JOB_RUNNING;
        t->started = mono_now();
        metrics_queue_wait(t->started - t->enqueued);
        if (j->state == JOB_QUEUED) {
            j->state = JOB_RUNNING;
            j->started = t->started;
        }
        j->version++;
        woken = take_waiters(j, false);
    }
    pthread_mutex_unlock(&s->lock);
    wake_all(woken);
    return run;
}

int job_task_progress(task *t, int step, int total) {
    job *j = t->job;
    pthread_mutex_lock(&j->store->lock);
    waiter *woken = NULL;
    if (!final(t->state) && (t->step != step || t->total != total)) { /* a re-read tells no news */
        t->step = step;
        t->total = total;
        j->version++;
        woken = take_waiters(j, false);
    }
    pthread_mutex_unlock(&j->store->lock);
    wake_all(woken);
    return atomic_load(&t->stop);
}

void job_task_finished(task *t, task_outcome *o) {
    job *j = t->job;
    job_store *s = j->store;
    pthread_mutex_lock(&s->lock);
    waiter *woken = NULL;
    t->compute = o->compute_seconds; /* spent, even if the task ended meanwhile */
    /* the pixels are the runner's no more: a retained job keeps the input's size only */
    sdx4_image_free(&t->input);
    if (!final(t->state)) {
        t->output = o->output;
        t->output_len = o->len;
        t->out_width = o->width;
        t->out_height = o->height;
        t->report = o->report;
        if (o->model_hash[0]) memcpy(t->model_hash, o->model_hash, sizeof t->model_hash);
        o->output = NULL;
        job_state state = o->state;
        if (state == JOB_CANCELED) { /* stopped without a cancel on record */
            stop_problem(&t->error, atomic_load(&t->stop), s->srv->cfg.request_timeout);
            if (atomic_load(&t->stop) == STOP_TIMEOUT) state = JOB_FAILED;
        } else if (state == JOB_FAILED) {
            t->error = o->error;
        }
        if (state == JOB_SUCCEEDED) t->step = t->total;
        finish_task_locked(t, state);
        woken = take_waiters(j, final(j->state));
    }
    pthread_mutex_unlock(&s->lock);
    free(o->output); /* the task was canceled meanwhile: nobody wants it */
    wake_all(woken);
}

/* webhook.c's callback: the delivery outcome for the status document. */
static void webhook_done(void *store, const char *id, bool delivered, int attempts, const char *error) {
    job_store *s = store;
    pthread_mutex_lock(&s->lock);
    job *j = find_locked(s, id);
    if (j) {
        j->webhook_state = delivered ? WEBHOOK_DELIVERED : WEBHOOK_FAILED;
        j->webhook_attempts = attempts;
        snprintf(j->webhook_error, sizeof j->webhook_error, "%s", error ? error : "");
    }
    pthread_mutex_unlock(&s->lock);
}

void job_webhook_state(job_store *s, const char *id, const char *status, int attempts, const char *error) {
    int state = strcmp(status, "pending") == 0     ? WEBHOOK_PENDING
                : strcmp(status, "delivered") == 0 ? WEBHOOK_DELIVERED
                                                   : WEBHOOK_FAILED;
    pthread_mutex_lock(&s->lock);
    job *j = find_locked(s, id);
    if (j && !(state == WEBHOOK_PENDING && j->webhook_state > WEBHOOK_PENDING)) { /* events may cross */
        j->webhook_state = state;
        j->webhook_attempts = attempts;
        snprintf(j->webhook_error, sizeof j->webhook_error, "%s", error ? error : "");
    }
    pthread_mutex_unlock(&s->lock);
}

/* ---- request history ---------------------------------------------------------------- */

/* The finished job as plain values for history.c (lock held): each
 * image's parameters and sizes as JSON, the first error, wall times. */
static void record_history(job *j) {
    static const char *const kinds[] = {[FORM_UPSCALE] = "upscale", [FORM_JOB] = "job", [FORM_BATCH] = "batch"};
    history_entry e = {.images = j->ntasks, .created = j->created_wall,
                       .finished = j->created_wall + (j->finished - j->created)};
    if (j->started > 0) e.started = j->created_wall + (j->started - j->created);
    snprintf(e.id, sizeof e.id, "%s", j->id);
    snprintf(e.owner, sizeof e.owner, "%s", j->owner);
    snprintf(e.client, sizeof e.client, "%s", j->client);
    snprintf(e.kind, sizeof e.kind, "%s", kinds[j->kind]);
    snprintf(e.request_id, sizeof e.request_id, "%s", j->request_id);
    snprintf(e.state, sizeof e.state, "%s", job_state_name(j->state));
    gethostname(e.worker, sizeof e.worker - 1); /* one process is its only worker */
    snprintf(e.model, sizeof e.model, "%s", j->store->srv->models[j->tasks[0].model].name);
    json_t *images = json_array();
    for (int i = 0; i < j->ntasks; i++) {
        const task *t = &j->tasks[i];
        const upscale_options *o = &t->opts;
        char in[32] = "", out[32] = "";
        if (t->input.width) snprintf(in, sizeof in, "%dx%d", t->input.width, t->input.height);
        if (t->output) snprintf(out, sizeof out, "%dx%d", t->out_width, t->out_height);
        /* an image refused before submission has no options, size or output: nulls */
        json_array_append_new(
            images,
            json_pack("{s:s,s:s?,s:s?,s:s?,s:i,s:f,s:f,s:f,s:s?,s:s?,s:I,s:s?,s:s?,s:s?,s:I,s:b}",
                      "status", job_state_name(t->state),
                      "error", t->error.kind ? problem_slug(t->error.kind) : NULL,
                      "prompt", o->prompt, "negative_prompt", o->negative_prompt,
                      "steps", o->steps, "guidance_scale", o->guidance_scale,
                      "noise_level", o->noise_level, "eta", o->eta, "scheduler", o->scheduler,
                      "scheduler_options", o->scheduler_options, "seed", (json_int_t)o->seed,
                      "format", o->format ? imageio_format_name(o->format) : NULL,
                      "input_size", in[0] ? in : NULL, "output_size", out[0] ? out : NULL,
                      "output_bytes", (json_int_t)t->output_len, "cache_hit", t->cache_hit));
        if (t->model_hash[0]) /* the version of `model` that made it */
            json_object_set_new(json_array_get(images, (size_t)i), "model_hash", json_string(t->model_hash));
        e.input_pixels += (int64_t)t->input.width * t->input.height;
        e.output_bytes += (int64_t)t->output_len;
        e.compute += t->compute;
        if (t->error.kind && !e.error_kind[0] && j->state != JOB_SUCCEEDED) {
            snprintf(e.error_kind, sizeof e.error_kind, "%s", problem_slug(t->error.kind));
            snprintf(e.error_detail, sizeof e.error_detail, "%s", t->error.detail);
        }
    }
    char *parameters = json_dumps(images, JSON_COMPACT);
    json_decref(images);
    e.parameters = parameters;
    history_record(j->store->srv->history, &e);
    free(parameters);
}
