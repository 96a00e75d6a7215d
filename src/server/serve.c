/*
 * serve.c - `sdx4 serve`: start-up, the model's loading, shutdown.
 *
 * Start-up order: settings, then everything that can refuse to start
 * (API keys file, trusted proxies, the history database, the listening
 * socket), then the HTTP daemon, so that health answers at once
 * ("loading", 503) while a
 * separate thread opens the models (models.c: each --model, then those of
 * --models-dir) one after the other, then runs each one's warm-up upscales
 * (one step at each of --warmup-sizes, else one at min-side) and the
 * calibration of its time estimator (cost.c: one-step upscales measured
 * at two sizes); only then does the server report ready and accept
 * upscales. A model that fails to load or to warm up is reported, with
 * its folder, in the log and in health, and the process exits 1: a server
 * never runs without a model it was told to serve.
 *
 * Shutdown (SIGTERM or SIGINT): health says "draining" and new upscales
 * get 503 with Retry-After and Connection: close, on new connections too
 * (the listening socket stays open: a client gets an answer that says when
 * to retry, not a refused connection, and a load balancer sees the
 * draining); queued and running jobs get until --shutdown-timeout to
 * finish and are canceled after it (their clients get 503); then the
 * listening socket closes, the answers still being sent are given a
 * moment, webhooks and the history's queue are flushed within the same
 * deadline, and the process exits 0. Signals are taken synchronously by
 * the main thread (sigtimedwait) with every other thread blocking them, so
 * no work happens in a signal handler.
 *
 * SIGHUP reloads --tls-cert and --tls-key (tls.c): new connections get
 * the new pair, open ones keep theirs; a pair that fails to load leaves
 * the old one serving and logs why. Without TLS it is logged and ignored
 * (no longer its default action, the end of the process).
 *
 * Cluster mode (--redis): the jobs' tasks go to the workers behind Redis
 * (dispatch_redis.c) instead of the local queue; --workers N runs N
 * consumers of them here too (worker.c, as `sdx4 worker` does). With
 * --workers 0 the node is API-only: it loads no model and is ready at
 * once, its health and model-info coming from the workers' registrations
 * (it still resolves the model list, which names what requests may ask
 * for, from the same settings as its workers).
 */
#include "serve.h"

#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "admin.h"
#include "auth.h"
#include "cache.h"
#include "cluster.h"
#include "cost.h"
#include "dispatch_redis.h"
#include "docs.h"
#include "gpu_metrics.h"
#include "history.h"
#include "http.h"
#include "jobs.h"
#include "log.h"
#include "models.h"
#include "queue.h"
#include "redis.h"
#include "ratelimit.h"
#include "redis.h"
#include "results.h"
#include "runner.h"
#include "server.h"
#include "status.h"
#include "tls.h"
#include "webhook.h"
#include "worker.h"

/* The estimator's calibration (cost_calibrate), logged. */
static int calibrate(const served_model *m, model_version *v, int w0, int h0, int w1, int h1, bool warmed1) {
    if (!v->cost) return 0;
    bool gpu = strncmp(v->info.device, "cuda", 4) == 0;
    json_t *doc = cost_calibrate(v->cost, gpu, w0, h0, w1, h1, warmed1);
    if (!doc) return -1;
    json_object_set_new(doc, "model", json_string(m->name));
    log_event(LOG_INFO, "calibrated", doc);
    return 0;
}

/* The warm-up upscales: each of --warmup-sizes, else min-side; then the
 * calibration, at the smallest of them and at the smallest with 4 times
 * its pixels, else at twice its sides (within max-side). */
int serve_warm_up(server *srv, const served_model *m, model_version *v) {
    const server_config *c = &srv->cfg;
    const string_list *sizes = &c->warmup_sizes;
    int n = sizes->count ? sizes->count : 1;
    int *dims = calloc(2 * (size_t)n, sizeof *dims), small = 0, large = -1;
    if (!dims) return -1;
    for (int i = 0; i < n; i++) {
        int *d = dims + 2 * i;
        double t0 = mono_now();
        if (!sizes->count) d[0] = d[1] = c->min_side;
        else if (config_parse_dimensions(sizes->items[i], &d[0], &d[1])) goto fail;
        if (cost_warm_up(v->engine, d[0], d[1], NULL)) goto fail;
        if (sizes->count)
            log_event(LOG_INFO, "warmed_up_size",
                      json_pack("{s:s,s:i,s:i,s:f}", "model", m->name, "width", d[0], "height", d[1], "seconds",
                                mono_now() - t0));
        if ((double)d[0] * d[1] < (double)dims[2 * small] * dims[2 * small + 1]) small = i;
    }
    double floor = 4.0 * dims[2 * small] * dims[2 * small + 1];
    for (int i = 0; i < n; i++) {
        double pixels = (double)dims[2 * i] * dims[2 * i + 1];
        if (pixels >= floor && (large < 0 || pixels < (double)dims[2 * large] * dims[2 * large + 1]))
            large = i;
    }
    int w0 = dims[2 * small], h0 = dims[2 * small + 1];
    int w1 = large >= 0 ? dims[2 * large] : 2 * w0 < c->max_side ? 2 * w0 : c->max_side;
    int h1 = large >= 0 ? dims[2 * large + 1] : 2 * h0 < c->max_side ? 2 * h0 : c->max_side;
    free(dims);
    return calibrate(m, v, w0, h0, w1, h1, large >= 0);
fail:
    free(dims);
    return -1;
}

/* A model that failed to load or warm up: the server fails (health says
 * why, naming the folder), and the process exits 1. */
static void fail(server *srv, served_model *m, const char *why) {
    snprintf(srv->failure, sizeof srv->failure, "%s", why);
    if (m) atomic_store(&m->state, MODEL_FAILED);
    log_event(LOG_ERROR, "model_failed",
              json_pack("{s:s?,s:s?,s:s}", "model", m ? m->name : NULL, "dir", m ? m->dir : NULL, "error",
                        srv->failure));
    atomic_store(&srv->phase, PHASE_FAILED);
}

int serve_load_models(server *srv) {
    char err[sizeof srv->failure];
    if (runner_content_check_open(&srv->cfg, err, sizeof err)) return fail(srv, NULL, err), -1;
    for (int i = 0; i < srv->nmodels; i++) {
        served_model *m = &srv->models[i];
        if (models_load(m, &srv->cfg, err, sizeof err)) return fail(srv, m, err), -1;
        atomic_store(&m->state, MODEL_WARMING);
    }
    int expected = PHASE_LOADING; /* unless SIGTERM came meanwhile */
    atomic_compare_exchange_strong(&srv->phase, &expected, PHASE_WARMING);
    for (int i = 0; i < srv->nmodels; i++) {
        served_model *m = &srv->models[i];
        double t0 = mono_now();
        model_version *v = models_acquire(m);
        int rc = srv->cfg.warmup ? serve_warm_up(srv, m, v) : 0;
        models_release(v);
        if (rc) {
            snprintf(err, sizeof err, "the warm-up upscale of the model %s (%s) failed: %s", m->name, m->dir,
                     sdx4_last_error());
            return fail(srv, m, err), -1;
        }
        if (srv->cfg.warmup)
            log_event(LOG_INFO, "warmed_up", json_pack("{s:s,s:f}", "model", m->name, "seconds", mono_now() - t0));
        atomic_store(&m->state, MODEL_READY);
    }
    return 0;
}

/* Cluster mode with --workers N: this node's own consumers of the
 * cluster's tasks (worker.c), once the model is loaded; the loader thread
 * sets it, the main thread reads it after joining that thread. */
static worker *consumers;

static worker *start_consumers(server *srv) {
    const server_config *c = &srv->cfg;
    char host[256] = "", name[64], err[256];
    gethostname(host, sizeof host - 1);
    if (c->name) snprintf(name, sizeof name, "%s", c->name);
    else snprintf(name, sizeof name, "%.40s-%ld", host, (long)getpid());
    json_t *info = status_registration(srv, name);
    worker_settings ws = {.name = name, .threads = c->workers, .visibility_timeout = c->visibility_timeout,
                          .max_attempts = c->max_attempts, .job_retention = c->job_retention,
                          .jobs_memory = c->jobs_memory, .results = srv->results ? srv : NULL,
                          .history = srv->history};
    worker *w = worker_start(srv->models, srv->nmodels, srv->redis, srv->webhooks, &ws, info, err, sizeof err);
    json_decref(info);
    if (!w) log_event(LOG_ERROR, "worker_failed", json_pack("{s:s}", "error", err));
    return w;
}

static void *load_model(void *arg) {
    server *srv = arg;
    if (serve_load_models(srv)) return NULL;
    if (srv->cluster) consumers = start_consumers(srv);
    int expected = PHASE_WARMING; /* unless SIGTERM came meanwhile */
    atomic_compare_exchange_strong(&srv->phase, &expected, PHASE_READY);
    log_event(LOG_INFO, "ready", json_pack("{s:s,s:i}", "model", srv->models[0].name, "models", srv->nmodels));
    return NULL;
}

static int start_parts(server *srv) {
    const server_config *c = &srv->cfg;
    srv->auth = auth_create(c, stderr);
    srv->ratelimit = ratelimit_create(c->rate_limit, c->rate_window, &c->trusted_proxies, stderr);
    if (!srv->auth || !srv->ratelimit) return -1;
    char err[256];
    if (c->history && !(srv->history = history_open(c->history, c->history_backlog, c->history_timeout, err, sizeof err))) {
        fprintf(stderr, "sdx4 serve: history: %s\n", err);
        return -1;
    }
    if (srv->history) { /* a key's jobs stay its own across restarts, and across servers sharing the database */
        uint8_t secret[32];
        history_identity_secret(srv->history, secret);
        auth_set_identity_secret(srv->auth, secret);
    }
    if (c->cache_size && !(srv->cache = cache_create(c->cache_size))) return -1;
    srv->jobs = job_store_create(srv); /* before the dispatcher, whose threads apply events to it */
    if (c->redis) { /* one queue, one allowance, one cache and one identity per key for the whole cluster */
        if (!(srv->redis = redis_open(c->redis, c->redis_timeout, err, sizeof err)) ||
            !(srv->cluster = dispatch_redis_create(srv, srv->redis, err, sizeof err))) {
            fprintf(stderr, "sdx4 serve: redis: %s\n", err);
            return -1;
        }
        srv->dispatch = dispatch_redis_dispatch(srv->cluster);
        ratelimit_share(srv->ratelimit, srv->redis, "rate");
        auth_share(srv->auth, srv->redis);
        if (srv->cache) cache_share(srv->cache, srv->redis);
    } else if ((srv->queue = queue_create(srv, c->workers, c->queue_size))) {
        srv->dispatch = queue_dispatch(srv->queue);
    }
    if (results_open(srv)) return -1;
    srv->webhooks = webhooks_create(srv);
    if (!srv->dispatch.iface || !srv->jobs || !srv->webhooks) {
        fprintf(stderr, "sdx4 serve: cannot start the worker threads\n");
        return -1;
    }
    const char *assets = docs_init(c->docs_assets);
    if (!assets)
        log_event(LOG_WARN, "docs_assets_missing",
                  json_pack("{s:s}", "message", "Swagger UI files not found: /docs shows a plain page "
                                                "(install r-cran-swagger or pass --docs-assets)"));
    if (c->tls_cert && !(srv->tls = tls_open(c->tls_cert, c->tls_key, err, sizeof err))) {
        fprintf(stderr, "sdx4 serve: %s\n", err);
        return -1;
    }
    if (srv->tls) log_event(LOG_INFO, "tls_loaded", tls_describe(srv->tls));
    if (http_start(srv, err, sizeof err)) {
        fprintf(stderr, "sdx4 serve: %s\n", err);
        return -1;
    }
    log_event(LOG_INFO, "listening",
              json_pack("{s:s,s:i,s:b,s:b,s:b,s:i,s:i}", "host", c->host, "port", http_port(srv), "tls",
                        srv->tls != NULL, "api_keys", auth_enabled(srv->auth), "docs_assets", assets != NULL,
                        "workers", c->workers, "queue_size", c->queue_size));
    return 0;
}

/* SIGHUP: the TLS pair read again. */
static void reload(server *srv) {
    char err[512];
    if (!srv->tls)
        log_event(LOG_INFO, "reload_ignored", json_pack("{s:s}", "reason", "SIGHUP reloads --tls-cert and --tls-key, "
                                                                             "and no TLS is configured"));
    else if (tls_reload(srv->tls, err, sizeof err))
        log_event(LOG_ERROR, "tls_reload_failed", json_pack("{s:s,s:s}", "error", err, "serving", "the previous pair"));
    else
        log_event(LOG_INFO, "tls_reloaded", tls_describe(srv->tls));
}

/* Waits for SIGTERM/SIGINT, or a failed model load, reloading on SIGHUP.
 * Returns the signal (0 for a failed load). */
static int wait_for_stop(server *srv, const sigset_t *signals) {
    for (;;) {
        struct timespec tick = {0, 200 * 1000 * 1000};
        int sig = sigtimedwait(signals, NULL, &tick);
        if (sig == SIGHUP) reload(srv);
        else if (sig > 0) return sig;
        if (atomic_load(&srv->phase) == PHASE_FAILED) return 0;
    }
}

/* Stops everything within the deadline. `loader` is the model-loading
 * thread, or NULL if none was started. Returns false when a thread is
 * still inside the engine (a step or a load cannot be interrupted): then
 * nothing it may touch is freed, and the process exits around it. */
static bool shut_down(server *srv, pthread_t *loader, int sig) {
    const server_config *c = &srv->cfg;
    double deadline = mono_now() + c->shutdown_timeout;
    if (atomic_load(&srv->phase) != PHASE_FAILED) atomic_store(&srv->phase, PHASE_DRAINING);
    log_event(LOG_INFO, "shutting_down",
              json_pack("{s:s,s:f}", "signal", sig ? strsignal(sig) : "none", "deadline_s", c->shutdown_timeout));
    if (srv->jobs) job_store_drain(srv->jobs, deadline);
    if (srv->daemon) http_quiesce(srv);
    /* answers of the jobs just finished or canceled are still being sent;
     * canceled workers stop at their next step boundary */
    double grace = mono_now() + 2, end = deadline > grace ? deadline : grace;
    while (srv->daemon && http_requests_open() > 0 && mono_now() < end) usleep(10 * 1000);
    http_stop(srv);

    bool stopped = true;
    if (loader) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += (time_t)(end - mono_now()) + 1;
        stopped = pthread_timedjoin_np(*loader, NULL, &ts) == 0;
    }
    if (srv->queue && queue_destroy(srv->queue, end) != 0) stopped = false;
    if (!admin_reloads_finished(srv, end)) stopped = false; /* a new version is being loaded */
    if (stopped && consumers && worker_stop(consumers, end) != 0) stopped = false;
    if (!stopped) {
        log_event(LOG_WARN, "exit_with_work",
                  json_pack("{s:s}", "message", "a thread is still inside the engine; exiting anyway"));
        return false;
    }
    srv->queue = NULL;
    worker_free(consumers);
    consumers = NULL;
    grace = mono_now() + 2; /* the drain's cancels reach Redis */
    dispatch_redis_destroy(srv->cluster, end > grace ? end : grace);
    srv->cluster = NULL;
    srv->dispatch = (dispatch){0};
    /* webhooks of the jobs finished above get until the deadline (or 2 s) */
    grace = mono_now() + 2;
    webhooks_destroy(srv->webhooks, deadline > grace ? deadline : grace);
    srv->webhooks = NULL;
    /* its last users, HTTP threads, workers, the dispatcher and the webhooks' outcomes, are gone */
    redis_close(srv->redis);
    srv->redis = NULL;
    job_store_destroy(srv->jobs);
    srv->jobs = NULL;
    /* the jobs finished or canceled above are recorded within the same deadline (or 2 s) */
    grace = mono_now() + 2;
    history_close(srv->history, (deadline > grace ? deadline : grace) - mono_now());
    srv->history = NULL;
    models_free(srv->models, srv->nmodels);
    runner_content_check_close();
    srv->models = NULL;
    srv->nmodels = 0;
    return true;
}

void serve_tune_malloc(void) {
    /* glibc gives each thread that allocates an arena of its own (up to 8
     * per core) and keeps what is freed there; a server's dozens of HTTP,
     * queue and webhook threads so held 141 MiB more after ten minutes of
     * mixed load (bench/soak.sh, docs/production/resilience.md), flat with
     * two arenas and large blocks mapped and unmapped whole. The malloc
     * calls are not where a server's time goes; the variables still win. */
    if (!getenv("MALLOC_ARENA_MAX")) mallopt(M_ARENA_MAX, 2);
    if (!getenv("MALLOC_MMAP_THRESHOLD_")) mallopt(M_MMAP_THRESHOLD, 1 << 20);
}

int serve_main(int argc, char **argv) {
    static server srv; /* threads reference it until the very end */
    serve_tune_malloc();
    int rc = config_load(&srv.cfg, argc, argv, stderr);
    if (rc) return rc > 0 ? 0 : 2;
    log_level level = LOG_INFO;
    log_level_parse(srv.cfg.log_level, &level);
    log_init(level, srv.cfg.access_log);
    if (log_start(srv.cfg.log_buffer)) {
        fprintf(stderr, "sdx4 serve: cannot start the log writer\n");
        config_free(&srv.cfg);
        return 1;
    }
    srv.started = mono_now();
    atomic_store(&srv.phase, PHASE_LOADING);
    char err[512];
    if (models_resolve(&srv.cfg, &srv.models, &srv.nmodels, err, sizeof err)) {
        fprintf(stderr, "sdx4 serve: %s\n", err);
        log_flush(2);
        config_free(&srv.cfg);
        return 2;
    }
    for (int i = 0; i < srv.nmodels; i++) srv.model_names[i] = srv.models[i].name;

    /* every thread started from here on inherits these blocked signals */
    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGTERM);
    sigaddset(&signals, SIGINT);
    sigaddset(&signals, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &signals, NULL);
    signal(SIGPIPE, SIG_IGN);

    /* the GPUs' metrics, unless told to run on the CPU (signals blocked first: a thread) */
    if (strcmp(srv.cfg.device, "cpu") != 0) gpu_metrics_start();

    /* the image codecs were initialised by main() (src/cli/main.c) */
    pthread_t loader;
    bool loader_running = false, api_only = srv.cfg.workers == 0;
    int started = start_parts(&srv);
    if (started == 0 && api_only) {
        atomic_store(&srv.phase, PHASE_READY); /* its workers are elsewhere (health says if any is live) */
        log_event(LOG_INFO, "ready",
                  json_pack("{s:s,s:i,s:s}", "model", srv.models[0].name, "models", srv.nmodels, "mode", "api-only"));
    } else if (started == 0) {
        loader_running = pthread_create(&loader, NULL, load_model, &srv) == 0;
        if (!loader_running) fail(&srv, NULL, "cannot start the loader thread");
    } else {
        atomic_store(&srv.phase, PHASE_FAILED);
    }
    int sig = srv.daemon && (loader_running || api_only) ? wait_for_stop(&srv, &signals) : 0;
    bool failed = atomic_load(&srv.phase) == PHASE_FAILED;
    bool stopped = shut_down(&srv, loader_running ? &loader : NULL, sig);
    if (stopped) cache_destroy(srv.cache);
    if (stopped) results_close(&srv); /* workers are gone: none is uploading */
    gpu_metrics_stop(); /* /metrics, its reader, is closed */
    tls_close(srv.tls); /* after the daemon (shut_down's http_stop): no handshake is left */
    srv.tls = NULL;
    ratelimit_destroy(srv.ratelimit); /* only HTTP threads used these */
    auth_destroy(srv.auth);
    log_event(LOG_INFO, "stopped", json_pack("{s:i}", "exit_status", failed ? 1 : 0));
    log_flush(2); /* a sink that takes no bytes in 2 s will not take them at all */
    /* a thread left inside the engine may still finish a job and hand its
     * webhook to a sender reading the settings (the secret): keep them */
    if (stopped) config_free(&srv.cfg);
    return failed ? 1 : 0;
}
