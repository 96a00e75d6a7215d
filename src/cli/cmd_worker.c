/*
 * cmd_worker.c - `sdx4 worker`: an inference process of cluster mode.
 *
 * It reads the settings of `sdx4 serve` (config.c: the same names as
 * flags, SDX4_* variables or a file; those that apply: --redis, --model,
 * --device, --variant, --threads, --workers (tasks run at once), --name,
 * --host and --port, --visibility-timeout, --max-attempts,
 * --shutdown-timeout, --job-retention, --jobs-memory, --redis-timeout,
 * --history, the webhook settings and the --s3-* ones), opens Redis (and the history),
 * answers GET /healthz and GET /metrics on a small HTTP port of its own
 * (no public API: clients talk to API nodes), loads the models (each
 * --model, repeatable, and those of --models-dir: the same list as the
 * API nodes'), warms each up and calibrates its time estimator as serve
 * does (serve_load_models: one step at each of --warmup-sizes, else at
 * --min-side, unless --warmup false; the estimators' curves in the
 * registration let API nodes admit by estimated time), and runs
 * worker.c's consumer until SIGTERM or SIGINT. A task for a model this
 * worker does not serve fails, saying so.
 *
 * Health is 200 once the model is loaded while Redis answers, 503
 * otherwise, with the reason; a probe never touches the engine or Redis
 * (it reads what the worker's own calls saw, at least every heartbeat).
 *
 * Shutdown: take nothing new, finish what is held within
 * --shutdown-timeout, then stop it and leave it to other workers (see
 * worker.h), unregister, send the webhooks already due within the same
 * deadline, exit 0. As in serve.c, signals are taken synchronously by the
 * main thread, every other thread blocking them.
 *
 * The jobs this worker ends are recorded with --history (PostgreSQL, from
 * which the cluster's API nodes list them), once per job by whoever ends
 * it (worker.c). Their webhooks go out through webhook.c; the outcome of
 * a delivery is logged and written into the job in Redis (worker.c),
 * where every API node reads it.
 */
#include <microhttpd.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "config.h"
#include "cost.h"
#include "gpu_metrics.h"
#include "history.h"
#include "log.h"
#include "metrics.h"
#include "models.h"
#include "redis.h"
#include "results.h"
#include "runner.h"
#include "serve.h"
#include "server.h"
#include "status.h"
#include "webhook.h"
#include "worker.h"

typedef struct {
    server srv; /* settings, engine, model facts and phase, as status.c and webhook.c read them */
    redis *r;
    worker *w; /* set once started: read by the HTTP thread */
    char name[64];
} worker_process;

/* ---- /healthz and /metrics ------------------------------------------------------ */

static json_t *health(worker_process *p, int *status) {
    int phase = atomic_load(&p->srv.phase);
    worker *w = p->w;
    worker_stats ws = {.redis_up = redis_up(p->r)};
    if (w) worker_get_stats(w, &ws);
    const char *why = phase == PHASE_LOADING   ? "the model is loading"
                      : phase == PHASE_WARMING ? "warming up"
                      : phase == PHASE_FAILED ? p->srv.failure
                      : phase == PHASE_DRAINING ? "shutting down: taking no new tasks"
                      : !ws.redis_up ? "Redis does not answer"
                                     : NULL;
    *status = why ? 503 : 200;
    json_t *models = json_array();
    for (int i = 0; i < p->srv.nmodels; i++) json_array_append_new(models, json_string(p->srv.models[i].name));
    json_t *h = json_pack("{s:s,s:s,s:s,s:o,s:b,s:{s:b,s:s},s:i,s:i,s:f}", "status", why ? "unavailable" : "ready",
                          "worker", p->name, "model", p->srv.models[0].name, "models", models, "model_loaded",
                          phase >= PHASE_WARMING && phase != PHASE_FAILED, "redis", "up", ws.redis_up, "where",
                          redis_where(p->r), "busy", ws.busy, "threads", ws.threads, "uptime_s",
                          mono_now() - p->srv.started);
    if (why) json_object_set_new(h, "error", json_string(why));
    for (int i = 0; i < p->srv.nmodels; i++)
        if (p->srv.models[i].demo) {
            json_object_set_new(h, "note", json_string(DEMO_NOTE));
            break;
        }
    return h;
}

static char *metrics(worker_process *p) {
    worker_stats ws = {.redis_up = redis_up(p->r)};
    if (p->w) worker_get_stats(p->w, &ws);
    char *text = NULL;
    int phase = atomic_load(&p->srv.phase);
    if (asprintf(&text,
                 "# HELP sdx4_worker_tasks_total Tasks this worker ended, by outcome.\n"
                 "# TYPE sdx4_worker_tasks_total counter\n"
                 "sdx4_worker_tasks_total{outcome=\"succeeded\"} %lld\n"
                 "sdx4_worker_tasks_total{outcome=\"failed\"} %lld\n"
                 "sdx4_worker_tasks_total{outcome=\"canceled\"} %lld\n"
                 "# HELP sdx4_worker_busy_threads Threads running a task now.\n"
                 "# TYPE sdx4_worker_busy_threads gauge\n"
                 "sdx4_worker_busy_threads %d\n"
                 "# HELP sdx4_worker_threads Threads taking tasks.\n"
                 "# TYPE sdx4_worker_threads gauge\n"
                 "sdx4_worker_threads %d\n"
                 "# HELP sdx4_worker_redis_errors_total Calls to Redis that failed.\n"
                 "# TYPE sdx4_worker_redis_errors_total counter\n"
                 "sdx4_worker_redis_errors_total %lld\n"
                 "# HELP sdx4_worker_redis_up Whether the worker's last call to Redis was answered.\n"
                 "# TYPE sdx4_worker_redis_up gauge\n"
                 "sdx4_worker_redis_up %d\n"
                 "# HELP sdx4_worker_model_loaded Whether the models are loaded.\n"
                 "# TYPE sdx4_worker_model_loaded gauge\n"
                 "sdx4_worker_model_loaded %d\n"
                 "# HELP sdx4_worker_tasks_unknown_model_total Tasks failed for naming a model this worker "
                 "does not serve.\n"
                 "# TYPE sdx4_worker_tasks_unknown_model_total counter\n"
                 "sdx4_worker_tasks_unknown_model_total %lld\n",
                 ws.succeeded, ws.failed, ws.canceled, ws.busy, ws.threads, ws.redis_errors, ws.redis_up,
                 phase >= PHASE_WARMING && phase != PHASE_FAILED, ws.refused_model) < 0)
        return NULL;
    char *inference = metrics_render_inference(&p->srv), *more = NULL; /* under serve's names */
    if (inference && asprintf(&more, "%s%s", text, inference) >= 0) free(text), text = more;
    free(inference);
    history_stats hs;
    if (!p->srv.history) return text;
    history_get_stats(p->srv.history, &hs); /* the jobs this worker ended, under serve's names */
    if (asprintf(&more,
                 "%s# HELP sdx4_history_entries_total Finished jobs given to the history database, by outcome.\n"
                 "# TYPE sdx4_history_entries_total counter\n"
                 "sdx4_history_entries_total{outcome=\"written\"} %llu\n"
                 "sdx4_history_entries_total{outcome=\"dropped\"} %llu\n"
                 "sdx4_history_entries_total{outcome=\"rejected\"} %llu\n"
                 "# HELP sdx4_history_up Whether the last write to the history database succeeded.\n"
                 "# TYPE sdx4_history_up gauge\nsdx4_history_up %d\n",
                 text, (unsigned long long)hs.written, (unsigned long long)hs.dropped,
                 (unsigned long long)hs.rejected, hs.up) < 0)
        more = NULL;
    free(text);
    return more;
}

static enum MHD_Result answer(struct MHD_Connection *conn, int status, const char *type, char *body) {
    if (!body) return MHD_NO;
    struct MHD_Response *resp = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(resp, "Content-Type", type);
    MHD_add_response_header(resp, "Cache-Control", "no-store");
    enum MHD_Result rc = MHD_queue_response(conn, (unsigned)status, resp);
    MHD_destroy_response(resp);
    return rc;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_size, void **state) {
    (void)version, (void)upload_data, (void)state;
    worker_process *p = cls;
    if (*upload_size) { /* a body nobody asked for: drop it */
        *upload_size = 0;
        return MHD_YES;
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
        return answer(conn, 405, "text/plain", strdup("only GET /healthz and GET /metrics\n"));
    if (strcmp(url, "/metrics") == 0) return answer(conn, 200, "text/plain; version=0.0.4", metrics(p));
    if (strcmp(url, "/healthz") != 0) return answer(conn, 404, "text/plain", strdup("only /healthz and /metrics\n"));
    int status;
    json_t *h = health(p, &status);
    char *body = json_dumps(h, JSON_COMPACT);
    json_decref(h);
    return answer(conn, status, "application/json", body);
}

static struct MHD_Daemon *listen_health(worker_process *p, char *err, size_t n) {
    const server_config *c = &p->srv.cfg;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *ai;
    char port[16];
    snprintf(port, sizeof port, "%d", c->port);
    int gai = getaddrinfo(c->host, port, &hints, &ai);
    if (gai) {
        snprintf(err, n, "cannot resolve --host %s: %s", c->host, gai_strerror(gai));
        return NULL;
    }
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | (ai->ai_family == AF_INET6 ? MHD_USE_IPv6 : 0);
    struct MHD_Daemon *d = MHD_start_daemon(flags, (uint16_t)c->port, NULL, NULL, on_request, p, MHD_OPTION_SOCK_ADDR,
                                            ai->ai_addr, MHD_OPTION_CONNECTION_LIMIT, 64u,
                                            MHD_OPTION_CONNECTION_TIMEOUT, 10u, MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!d) snprintf(err, n, "cannot listen on %s:%d (address in use or not allowed?)", c->host, c->port);
    return d;
}

/* ---- start and stop ----------------------------------------------------------------- */

/* Every model, warmed up (serve_load_models); -1 when one fails, the
 * phase then FAILED and health saying why. */
static int load_models(server *srv) {
    if (serve_load_models(srv)) return -1;
    atomic_store(&srv->phase, PHASE_READY);
    return 0;
}

static int wait_for_stop(const sigset_t *stop) {
    for (;;) {
        int sig = sigwaitinfo(stop, NULL);
        if (sig > 0) return sig;
    }
}

static const char help[] =
    "usage: sdx4 worker --redis URL --model DIR [--workers N] [--name NAME] [--port N] [options]\n"
    "\n"
    "Takes upscale tasks from a cluster's Redis, runs them and stores their\n"
    "results (cluster mode: docs/cluster.md); answers GET /healthz and GET\n"
    "/metrics on --host:--port. It reads the settings of `sdx4 serve`, below;\n"
    "those that apply: redis, redis-timeout, model (repeatable), models-dir,\n"
    "model-id, device, variant,\n"
    "threads, warmup, warmup-sizes, min-side, max-side, workers (tasks run at\n"
    "once), name, host, port,\n"
    "visibility-timeout, max-attempts, shutdown-timeout, job-retention,\n"
    "jobs-memory, history, history-backlog, log-level, log-buffer, the webhook\n"
    "settings and the s3 ones (with s3-bucket, results go to object storage,\n"
    "not to Redis).\n"
    "\n";

int cmd_worker(int argc, char **argv) {
    static worker_process p; /* threads reference it until the very end */
    server *srv = &p.srv;
    serve_tune_malloc();
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) fputs(help, stdout);
    int rc = config_load(&srv->cfg, argc, argv, stderr);
    if (rc) return rc > 0 ? 0 : EXIT_USAGE;
    const server_config *c = &srv->cfg;
    char err[256];
    const char *bad = !c->redis       ? "--redis URL (or SDX4_REDIS) is required: the Redis the cluster shares"
                      : c->workers < 1 ? "--workers (tasks run at once) must be at least 1"
                                       : NULL;
    if (bad) {
        fprintf(stderr, "sdx4 worker: %s\n", bad);
        config_free(&srv->cfg);
        return EXIT_USAGE;
    }
    if (!(p.r = redis_open(c->redis, c->redis_timeout, err, sizeof err))) {
        fprintf(stderr, "sdx4 worker: %s\n", err);
        config_free(&srv->cfg);
        return EXIT_USAGE;
    }
    if (c->history && !(srv->history = history_open(c->history, c->history_backlog, c->history_timeout, err, sizeof err))) {
        fprintf(stderr, "sdx4 worker: history: %s\n", err);
        redis_close(p.r);
        config_free(&srv->cfg);
        return EXIT_USAGE;
    }
    log_level level = LOG_INFO;
    log_level_parse(c->log_level, &level);
    log_init(level, false);
    if (log_start(c->log_buffer)) {
        fprintf(stderr, "sdx4 worker: cannot start the log writer\n");
        return EXIT_RUNTIME;
    }
    if (results_open(srv)) return EXIT_USAGE; /* a setting or a credential missing: said on stderr */
    char host[48] = "worker";
    gethostname(host, sizeof host - 1);
    if (c->name) snprintf(p.name, sizeof p.name, "%s", c->name);
    else snprintf(p.name, sizeof p.name, "%s-%ld", host, (long)getpid());
    srv->started = mono_now();
    atomic_store(&srv->phase, PHASE_LOADING);
    if (models_resolve(c, &srv->models, &srv->nmodels, err, sizeof err)) {
        fprintf(stderr, "sdx4 worker: %s\n", err);
        return EXIT_USAGE;
    }
    for (int i = 0; i < srv->nmodels; i++) srv->model_names[i] = srv->models[i].name;

    /* every thread started from here on inherits these blocked signals */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct MHD_Daemon *daemon = listen_health(&p, err, sizeof err);
    if (!daemon) {
        fprintf(stderr, "sdx4 worker: %s\n", err);
        return EXIT_USAGE;
    }
    const union MHD_DaemonInfo *bound = MHD_get_daemon_info(daemon, MHD_DAEMON_INFO_BIND_PORT);
    log_event(LOG_INFO, "listening",
              json_pack("{s:s,s:i,s:s,s:s,s:i}", "host", c->host, "port", bound ? bound->port : 0, "worker", p.name,
                        "redis", redis_where(p.r), "workers", c->workers));
    if (strcmp(c->device, "cpu") != 0) gpu_metrics_start(); /* for /metrics */

    int status = EXIT_RUNTIME, sig = 0;
    if (load_models(srv) == 0) {
        if (c->webhook_secret) srv->webhooks = webhooks_create(srv);
        json_t *info = status_registration(srv, p.name);
        worker_settings ws = {.name = p.name, .threads = c->workers, .max_batch_size = c->max_batch_size,
                              .batch_window = c->batch_window, .visibility_timeout = c->visibility_timeout,
                              .max_attempts = c->max_attempts, .job_retention = c->job_retention,
                              .jobs_memory = c->jobs_memory, .results = srv->results ? srv : NULL,
                              .history = srv->history};
        p.w = worker_start(srv->models, srv->nmodels, p.r, srv->webhooks, &ws, info, err, sizeof err);
        json_decref(info);
        if (p.w) {
            sig = wait_for_stop(&stop);
            atomic_store(&srv->phase, PHASE_DRAINING);
            double deadline = mono_now() + c->shutdown_timeout;
            log_event(LOG_INFO, "shutting_down",
                      json_pack("{s:s,s:f}", "signal", strsignal(sig), "deadline_s", c->shutdown_timeout));
            status = worker_stop(p.w, deadline) == 0 ? 0 : EXIT_RUNTIME;
        } else {
            log_event(LOG_ERROR, "worker_failed", json_pack("{s:s}", "error", err));
        }
    }
    MHD_stop_daemon(daemon);
    gpu_metrics_stop();
    if (status == 0) { /* else a thread is still inside the engine: exit around it */
        worker_free(p.w);
        double grace = mono_now() + 2; /* webhooks and history rows of the jobs just ended */
        webhooks_destroy(srv->webhooks, grace);
        history_close(srv->history, grace - mono_now());
    }
    log_event(LOG_INFO, "stopped", json_pack("{s:i}", "exit_status", status));
    log_flush(2);
    if (status == 0) {
        models_free(srv->models, srv->nmodels);
        runner_content_check_close();
        results_close(srv);
        redis_close(p.r);
        config_free(&srv->cfg);
    }
    return status;
}
