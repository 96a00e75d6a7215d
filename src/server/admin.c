/*
 * admin.c - the admin API (see admin.h).
 *
 * Drain is a flag beside the server's phase, not a phase: a drained node
 * is still ready in every other sense (its model loaded, its queue
 * running), and undraining must return it exactly there. A shutdown's
 * draining (PHASE_DRAINING) cannot be undone and wins over it.
 *
 * The job listing reads this node's job store in a single process, where
 * that is every job, and the shared store in cluster mode (the dispatcher's
 * list: every node's jobs, read from Redis); a job is also found by id in
 * the shared store (as its owner would find it), so that any node can
 * cancel any job.
 *
 * Reload. A new version is opened, its digest taken and warmed up beside
 * the old one (so memory must hold both for a while), by a thread of its
 * own, then installed (models_install): new batches take it, running ones
 * hold the old version, whose last reference frees it. A version of
 * another kind (a GAN for a diffusion model) is refused: requests and
 * their parameters are judged by the kind the model was started with.
 */
#include "admin.h"

#include <ctype.h>
#include <pthread.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dispatch.h"
#include "history.h"
#include "jobs.h"
#include "log.h"
#include "models.h"
#include "serve.h"

static void log_action(const admin_request *a, const char *action, const char *target) {
    log_event(LOG_INFO, "admin_action",
              json_pack("{s:s,s:s,s:s,s:s?}", "action", action, "admin", a->admin, "request_id", a->request_id,
                        "target", target));
}

json_t *admin_drain(const admin_request *a, bool drain, problem *p) {
    server *srv = a->srv;
    if (atomic_load(&srv->phase) == PHASE_DRAINING) {
        problem_set(p, PROBLEM_SHUTTING_DOWN, "the server is shutting down");
        return NULL;
    }
    bool was = atomic_exchange(&srv->drained, drain);
    if (was != drain) log_action(a, drain ? "drain" : "undrain", NULL);
    dispatch_stats qs;
    dispatch_stats_get(&srv->dispatch, &qs);
    return json_pack("{s:b,s:b,s:{s:i,s:i}}", "drained", drain, "changed", was != drain, "queue", "depth", qs.depth,
                     "running", qs.running);
}

/* An integer query parameter in [lo, hi], `fallback` when absent. */
static int int_arg(const admin_request *a, const char *name, int lo, int hi, int fallback, int *out, problem *p) {
    const char *v = a->arg(a->ctx, name);
    if (!v) {
        *out = fallback;
        return 0;
    }
    char *end;
    long n = strtol(v, &end, 10);
    if (!isdigit((unsigned char)*v) || *end || n < lo || n > hi) {
        char allowed[64];
        snprintf(allowed, sizeof allowed, "an integer from %d to %d", lo, hi);
        problem_field(p, name, allowed, "%s must be %s", name, allowed);
        return -1;
    }
    *out = (int)n;
    return 0;
}

json_t *admin_list_jobs(const admin_request *a, problem *p) {
    static const char *const states[] = {"queued", "running", "succeeded", "failed", "canceled"};
    const char *state = a->arg(a->ctx, "state");
    if (state) {
        const char *known = NULL;
        for (size_t i = 0; i < sizeof states / sizeof *states; i++)
            if (strcmp(state, states[i]) == 0) known = states[i];
        if (!known) {
            problem_field(p, "state", "queued, running, succeeded, failed or canceled",
                          "state must be queued, running, succeeded, failed or canceled");
            return NULL;
        }
        state = known;
    }
    int limit;
    if (int_arg(a, "limit", 1, 1000, 100, &limit, p)) return NULL;
    const dispatch *d = &a->srv->dispatch;
    json_t *jobs = d->iface->list ? d->iface->list(d->ctx, state, limit, p) : job_store_list(a->srv->jobs, state, limit);
    return jobs ? json_pack("{s:o}", "jobs", jobs) : NULL;
}

json_t *admin_job(const admin_request *a, const char *id, bool cancel, problem *p) {
    problem why = {0};
    job *j = job_find(a->srv->jobs, id, NULL, &why);
    if (!j) {
        if (why.kind) *p = why;
        else problem_set(p, PROBLEM_NOT_FOUND, "no job %s on this server", id);
        return NULL;
    }
    if (cancel) {
        job_cancel(j);
        log_action(a, "cancel_job", id);
    }
    json_t *doc = job_document(j);
    json_object_set_new(doc, "owner", json_string(job_owner(j)));
    json_object_set_new(doc, "client", json_string(job_client(j)));
    json_object_set_new(doc, "request_id", json_string(job_request_id(j)));
    job_release(j);
    return doc;
}

json_t *admin_usage(const admin_request *a, problem *p) {
    server *srv = a->srv;
    if (!srv->history) {
        problem_set(p, PROBLEM_NOT_FOUND, "usage comes from the request history, which is off on this server "
                                          "(sdx4 serve --history FILE or postgresql://... turns it on)");
        return NULL;
    }
    history_usage_query q = {.since = -INFINITY, .until = INFINITY, .client = a->arg(a->ctx, "client")};
    const char *names[] = {"since", "until"};
    double *times[] = {&q.since, &q.until};
    for (int i = 0; i < 2; i++) {
        const char *v = a->arg(a->ctx, names[i]);
        if (v && history_parse_time(v, times[i])) {
            problem_field(p, names[i], "an RFC 3339 time, e.g. 2026-12-06T00:00:00Z",
                          "%s must be an RFC 3339 time, e.g. 2026-12-06T00:00:00Z", names[i]);
            return NULL;
        }
    }
    if (int_arg(a, "limit", 1, HISTORY_MAX_USAGE_ROWS, 1000, &q.limit, p)) return NULL;
    json_t *rows;
    char err[256];
    if (history_usage(srv->history, &q, &rows, err, sizeof err) != HISTORY_OK) {
        log_event(LOG_WARN, "history_read_failed", json_pack("{s:s,s:s}", "request_id", a->request_id, "error", err));
        problem_set(p, PROBLEM_HISTORY_UNAVAILABLE, "the request history cannot be read now; retry shortly");
        return NULL;
    }
    return json_pack("{s:o}", "usage", rows);
}

typedef struct {
    server *srv;
    served_model *m;
    char dir[1024];
} reload_job;

static void reload_failed(served_model *m, const char *why) {
    pthread_mutex_lock(&m->lock);
    snprintf(m->reload_error, sizeof m->reload_error, "%s", why);
    pthread_mutex_unlock(&m->lock);
    log_event(LOG_ERROR, "model_reload_failed", json_pack("{s:s,s:s}", "model", m->name, "error", why));
}

static void *reload_main(void *arg) {
    reload_job *r = arg;
    served_model *m = r->m;
    double t0 = mono_now();
    char err[512];
    model_version *v = models_open(m, r->dir, &r->srv->cfg, err, sizeof err);
    bool gan = v && strcmp(v->info.kind, "gan") == 0;
    if (!v) {
        reload_failed(m, err);
    } else if (gan != m->gan) {
        snprintf(err, sizeof err, "%s holds a %s model and %s is a %s model: a reload keeps the kind", r->dir,
                 gan ? "GAN" : "diffusion", m->name, m->gan ? "GAN" : "diffusion");
        reload_failed(m, err);
    } else if (r->srv->cfg.warmup && serve_warm_up(r->srv, m, v)) {
        snprintf(err, sizeof err, "the warm-up upscale of %s failed: %s", r->dir, sdx4_last_error());
        reload_failed(m, err);
    } else {
        model_version *old = models_acquire(m);
        json_t *fields = json_pack("{s:s,s:s,s:s,s:s,s:f}", "model", m->name, "dir", v->dir, "old_hash", old->hash,
                                   "hash", v->hash, "seconds", mono_now() - t0);
        models_release(old);
        models_install(m, v);
        v = NULL; /* m's now */
        log_event(LOG_INFO, "model_reloaded", fields);
    }
    models_release(v);
    atomic_store(&m->reloading, false);
    free(r);
    return NULL;
}

json_t *admin_reload(const admin_request *a, const char *name, problem *p) {
    server *srv = a->srv;
    int i = models_find(srv->models, srv->nmodels, name);
    if (i < 0) {
        problem_set(p, PROBLEM_NOT_FOUND, "no model \"%.64s\" on this server", name);
        return NULL;
    }
    served_model *m = &srv->models[i];
    if (srv->cluster) {
        problem_set(p, PROBLEM_CONFLICT, "in cluster mode the workers load the models: restart them one at a "
                                         "time with the new folder (a rolling update)");
        return NULL;
    }
    if (atomic_load(&srv->phase) != PHASE_READY) {
        problem_set(p, PROBLEM_NOT_READY, "the server is not ready: models reload once it is");
        return NULL;
    }
    const char *dir = a->arg(a->ctx, "dir");
    if (dir && (!*dir || strlen(dir) >= sizeof ((reload_job *)0)->dir)) {
        problem_field(p, "dir", "a model folder", "dir must be a model folder's path");
        return NULL;
    }
    bool idle = false;
    if (!atomic_compare_exchange_strong(&m->reloading, &idle, true)) {
        problem_set(p, PROBLEM_CONFLICT, "a reload of the model %s is under way", m->name);
        return NULL;
    }
    reload_job *r = calloc(1, sizeof *r);
    model_version *v = models_acquire(m);
    char from[sizeof r->dir] = "";
    if (v) snprintf(from, sizeof from, "%s", dir ? dir : v->dir);
    if (r) *r = (reload_job){srv, m, ""}, memcpy(r->dir, from, sizeof from);
    models_release(v);
    pthread_mutex_lock(&m->lock);
    m->reload_error[0] = '\0';
    pthread_mutex_unlock(&m->lock);
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (!r || !v || pthread_create(&thread, &attr, reload_main, r) != 0) {
        pthread_attr_destroy(&attr);
        free(r);
        atomic_store(&m->reloading, false);
        problem_set(p, PROBLEM_INTERNAL, "the reload could not be started");
        return NULL;
    }
    pthread_attr_destroy(&attr);
    log_action(a, "reload_model", m->name);
    return json_pack("{s:s,s:s,s:b}", "model", m->name, "dir", from, "reloading", true); /* r is the thread's */
}

bool admin_reloads_finished(server *srv, double deadline) {
    for (;;) {
        bool busy = false;
        for (int i = 0; i < srv->nmodels; i++) busy = busy || atomic_load(&srv->models[i].reloading);
        if (!busy) return true;
        if (mono_now() >= deadline) return false;
        usleep(20 * 1000);
    }
}
