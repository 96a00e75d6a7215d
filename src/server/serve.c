/*
 * serve.c - `sdx4 serve`: start-up, the model's loading, shutdown.
 *
 * Start-up order: settings, then everything that can refuse to start
 * (API keys file, trusted proxies, the listening socket), then the HTTP
 * daemon, so that health answers at once ("loading", 503) while a
 * separate thread opens the model and runs the warm-up upscales (one step
 * at each of --warmup-sizes, else one at min-side); only then does the
 * server report ready and accept upscales. A model
 * that fails to load is reported in the log and in health, and the
 * process exits 1.
 *
 * Shutdown (SIGTERM or SIGINT): health says "draining" and new upscales
 * get 503 with Retry-After and Connection: close, on new connections too
 * (the listening socket stays open: a client gets an answer that says when
 * to retry, not a refused connection, and a load balancer sees the
 * draining); queued and running jobs get until --shutdown-timeout to
 * finish and are canceled after it (their clients get 503); then the
 * listening socket closes, the answers still being sent are given a
 * moment, webhooks are flushed within the same deadline, and the process
 * exits 0. Signals are taken synchronously by
 * the main thread (sigtimedwait) with every other thread blocking them, so
 * no work happens in a signal handler.
 */
#include "serve.h"

#include <errno.h>
#include <libgen.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "auth.h"
#include "cache.h"
#include "docs.h"
#include "http.h"
#include "jobs.h"
#include "log.h"
#include "queue.h"
#include "ratelimit.h"
#include "server.h"
#include "webhook.h"

/* Runs a one-step upscale of width x height, so that the first client of
 * that size does not pay for lazy allocations and the GPU's choice of
 * algorithms (made once per shape; one step and the decode meet every
 * shape of the size). */
static int warm_up(server *srv, int width, int height) {
    sdx4_image in = {width, height, malloc((size_t)width * height * 3)}, out = {0};
    if (!in.pixels) return -1;
    for (size_t i = 0; i < (size_t)width * height * 3; i++) in.pixels[i] = (uint8_t)(i * 7);
    sdx4_upscale_params p;
    sdx4_upscale_params_default(&p);
    p.num_inference_steps = 1;
    p.seed = 0;
    sdx4_status st = sdx4_upscale(srv->engine, &in, &p, &out, NULL);
    free(in.pixels);
    sdx4_image_free(&out);
    return st == SDX4_OK ? 0 : -1;
}

/* The warm-up upscales: each of --warmup-sizes, else min-side. */
static int warm_up_sizes(server *srv) {
    const string_list *sizes = &srv->cfg.warmup_sizes;
    if (sizes->count == 0) return warm_up(srv, srv->cfg.min_side, srv->cfg.min_side);
    for (int i = 0; i < sizes->count; i++) {
        int width, height;
        double t0 = mono_now();
        if (config_parse_dimensions(sizes->items[i], &width, &height) || warm_up(srv, width, height))
            return -1;
        log_event(LOG_INFO, "warmed_up_size",
                  json_pack("{s:i,s:i,s:f}", "width", width, "height", height, "seconds", mono_now() - t0));
    }
    return 0;
}

static void fail(server *srv, const char *what) {
    snprintf(srv->failure, sizeof srv->failure, "%s: %s", what, sdx4_last_error());
    log_event(LOG_ERROR, "model_failed", json_pack("{s:s,s:s}", "model", srv->cfg.model, "error", srv->failure));
    atomic_store(&srv->phase, PHASE_FAILED);
}

static void *load_model(void *arg) {
    server *srv = arg;
    const server_config *c = &srv->cfg;
    double t0 = mono_now();
    sdx4_engine_options o;
    sdx4_engine_options_default(&o);
    o.model_dir = c->model;
    o.variant = c->variant;
    o.device = c->device;
    o.threads = c->threads;
    sdx4_engine *engine = NULL;
    if (sdx4_engine_open(&o, &engine) != SDX4_OK) {
        fail(srv, "cannot open the model");
        return NULL;
    }
    sdx4_engine_info(engine, &srv->info);
    srv->engine = engine;
    const sdx4_model_info *mi = &srv->info;
    json_t *fields = json_pack("{s:s,s:s,s:s,s:s,s:I,s:f}", "model", srv->model_id, "dir", c->model,
                               "device", mi->device, "dtype", mi->compute_dtype, "parameters",
                               (json_int_t)(mi->text_encoder_params + mi->unet_params + mi->vae_params),
                               "seconds", mono_now() - t0);
    if (srv->demo) json_object_set_new(fields, "note", json_string(DEMO_NOTE));
    log_event(srv->demo ? LOG_WARN : LOG_INFO, "model_loaded", fields);

    atomic_store(&srv->phase, PHASE_WARMING);
    if (c->warmup) {
        t0 = mono_now();
        if (warm_up_sizes(srv)) {
            fail(srv, "the warm-up upscale failed");
            return NULL;
        }
        log_event(LOG_INFO, "warmed_up", json_pack("{s:f}", "seconds", mono_now() - t0));
    }
    int expected = PHASE_WARMING; /* unless SIGTERM came meanwhile */
    atomic_compare_exchange_strong(&srv->phase, &expected, PHASE_READY);
    log_event(LOG_INFO, "ready", json_pack("{s:s}", "model", srv->model_id));
    return NULL;
}

/* The model's name: --model-id, else the folder's name. */
static void set_model_id(server *srv) {
    if (srv->cfg.model_id) {
        snprintf(srv->model_id, sizeof srv->model_id, "%s", srv->cfg.model_id);
        return;
    }
    char path[1024];
    snprintf(path, sizeof path, "%s", srv->cfg.model);
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/') path[--n] = '\0';
    snprintf(srv->model_id, sizeof srv->model_id, "%s", basename(path));
}

static int start_parts(server *srv) {
    const server_config *c = &srv->cfg;
    srv->auth = auth_create(&c->api_keys, c->api_keys_file, c->auth_failures, stderr);
    srv->ratelimit = ratelimit_create(c->rate_limit, c->rate_window, &c->trusted_proxies, stderr);
    if (!srv->auth || !srv->ratelimit) return -1;
    if (c->cache_size && !(srv->cache = cache_create(c->cache_size))) return -1;
    srv->queue = queue_create(srv, c->workers, c->queue_size);
    srv->jobs = job_store_create(srv);
    srv->webhooks = webhooks_create(srv);
    if (!srv->queue || !srv->jobs || !srv->webhooks) {
        fprintf(stderr, "sdx4 serve: cannot start the worker threads\n");
        return -1;
    }
    const char *assets = docs_init(c->docs_assets);
    if (!assets)
        log_event(LOG_WARN, "docs_assets_missing",
                  json_pack("{s:s}", "message", "Swagger UI files not found: /docs shows a plain page "
                                                "(install r-cran-swagger or pass --docs-assets)"));
    char err[256];
    if (http_start(srv, err, sizeof err)) {
        fprintf(stderr, "sdx4 serve: %s\n", err);
        return -1;
    }
    log_event(LOG_INFO, "listening",
              json_pack("{s:s,s:i,s:b,s:b,s:i,s:i}", "host", c->host, "port", http_port(srv), "api_keys",
                        auth_enabled(srv->auth), "docs_assets", assets != NULL, "workers", c->workers,
                        "queue_size", c->queue_size));
    return 0;
}

/* Waits for SIGTERM/SIGINT, or a failed model load. Returns the signal
 * (0 for a failed load). */
static int wait_for_stop(server *srv, const sigset_t *stop) {
    for (;;) {
        struct timespec tick = {0, 200 * 1000 * 1000};
        int sig = sigtimedwait(stop, NULL, &tick);
        if (sig > 0) return sig;
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
    if (!stopped) {
        log_event(LOG_WARN, "exit_with_work",
                  json_pack("{s:s}", "message", "a thread is still inside the engine; exiting anyway"));
        return false;
    }
    srv->queue = NULL;
    /* webhooks of the jobs finished above get until the deadline (or 2 s) */
    grace = mono_now() + 2;
    webhooks_destroy(srv->webhooks, deadline > grace ? deadline : grace);
    srv->webhooks = NULL;
    job_store_destroy(srv->jobs);
    srv->jobs = NULL;
    sdx4_engine_close(srv->engine);
    srv->engine = NULL;
    return true;
}

int serve_main(int argc, char **argv) {
    static server srv; /* threads reference it until the very end */
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
    set_model_id(&srv);
    char marker[1100];
    snprintf(marker, sizeof marker, "%s/DEMO_MODEL", srv.cfg.model);
    srv.demo = access(marker, F_OK) == 0;

    /* every thread started from here on inherits these blocked signals */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);
    signal(SIGPIPE, SIG_IGN);

    /* the image codecs were initialised by main() (src/cli/main.c) */
    pthread_t loader;
    bool loader_running = false;
    if (start_parts(&srv) == 0) {
        loader_running = pthread_create(&loader, NULL, load_model, &srv) == 0;
        if (!loader_running) fail(&srv, "cannot start the loader thread");
    } else {
        atomic_store(&srv.phase, PHASE_FAILED);
    }
    int sig = srv.daemon && loader_running ? wait_for_stop(&srv, &stop) : 0;
    bool failed = atomic_load(&srv.phase) == PHASE_FAILED;
    bool stopped = shut_down(&srv, loader_running ? &loader : NULL, sig);
    if (stopped) cache_destroy(srv.cache);
    ratelimit_destroy(srv.ratelimit); /* only HTTP threads used these */
    auth_destroy(srv.auth);
    log_event(LOG_INFO, "stopped", json_pack("{s:i}", "exit_status", failed ? 1 : 0));
    log_flush(2); /* a sink that takes no bytes in 2 s will not take them at all */
    /* a thread left inside the engine may still finish a job and hand its
     * webhook to a sender reading the settings (the secret): keep them */
    if (stopped) config_free(&srv.cfg);
    return failed ? 1 : 0;
}
