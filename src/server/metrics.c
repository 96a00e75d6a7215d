/*
 * metrics.c - Prometheus counters and histograms (see metrics.h).
 *
 * Everything is a fixed array of atomic counters indexed by route, status
 * class or bucket, sized at compile time: recording never allocates and
 * label cardinality is bounded whatever the clients send (unknown paths
 * count as route "unknown", unusual statuses as "other"). Histograms keep
 * per-bucket counts and are made cumulative when rendered.
 */
#include "metrics.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gpu_metrics.h"
#include "log.h"
#include "models.h"
#include "process_metrics.h"

const char *const route_names[ROUTE_COUNT] = {
    [ROUTE_UPSCALE] = "upscale",       [ROUTE_BATCH] = "batch_upscale",
    [ROUTE_JOB_CREATE] = "job_create", [ROUTE_JOB_GET] = "job_get",
    [ROUTE_JOB_RESULT] = "job_result", [ROUTE_JOB_CANCEL] = "job_cancel",
    [ROUTE_JOB_EVENTS] = "job_events", [ROUTE_JOB_LIST] = "job_list",
    [ROUTE_HEALTH] = "health",
    [ROUTE_MODEL_INFO] = "model_info", [ROUTE_MODELS] = "models",
    [ROUTE_METRICS] = "metrics",
    [ROUTE_OPENAPI] = "openapi",       [ROUTE_DOCS] = "docs",
    [ROUTE_A1111_UPSCALERS] = "a1111_upscalers", [ROUTE_A1111_SINGLE] = "a1111_extra_single_image",
    [ROUTE_A1111_BATCH] = "a1111_extra_batch_images",
    [ROUTE_ADMIN_DRAIN] = "admin_drain", [ROUTE_ADMIN_UNDRAIN] = "admin_undrain",
    [ROUTE_ADMIN_JOBS] = "admin_jobs",   [ROUTE_ADMIN_JOB] = "admin_job",
    [ROUTE_ADMIN_JOB_CANCEL] = "admin_job_cancel", [ROUTE_ADMIN_USAGE] = "admin_usage",
    [ROUTE_ADMIN_RELOAD] = "admin_reload",
    [ROUTE_PREFLIGHT] = "preflight",   [ROUTE_UNKNOWN] = "unknown",
};

static const int statuses[] = {200, 202, 204, 304, 400, 401, 403, 404, 405, 406,
                               409, 413, 415, 422, 429, 499, 500, 503, 504};
enum { STATUS_COUNT = sizeof statuses / sizeof statuses[0] + 1 }; /* + "other" */

static const double latency_bounds[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                        0.1,    0.25,  0.5,    1,     2.5,  5,     10,
                                        30,     60,    120};
static const double batch_bounds[] = {1, 2, 3, 4, 6, 8, 12, 16};
#define BATCH_BUCKETS (sizeof batch_bounds / sizeof batch_bounds[0] + 1)
static const double step_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                     0.25,  0.5,    1,     2.5,  5,     10,   30};
#define LATENCY_BUCKETS (sizeof latency_bounds / sizeof latency_bounds[0] + 1)
#define STEP_BUCKETS (sizeof step_bounds / sizeof step_bounds[0] + 1)

typedef struct {
    _Atomic uint64_t count[LATENCY_BUCKETS];
    _Atomic uint64_t sum_us;
} latency_histogram;

static struct {
    _Atomic uint64_t requests[ROUTE_COUNT][STATUS_COUNT];
    latency_histogram latency[ROUTE_COUNT];
    latency_histogram queue_wait, inference;
    _Atomic uint64_t step_count[STEP_BUCKETS];
    _Atomic uint64_t step_sum_us;
    _Atomic uint64_t rejections[PROBLEM_KIND_COUNT];
    _Atomic int64_t in_flight;
    _Atomic uint64_t cache_hits, cache_upload_hits, cache_misses;
    _Atomic uint64_t webhooks_ok, webhooks_failed;
    _Atomic uint64_t auth_throttled;
    _Atomic uint64_t safety_checks, safety_flagged, safety_us;
    _Atomic uint64_t ratelimit_unavailable;
    _Atomic uint64_t webhooks_given_up[HOOK_FAIL_COUNT];
    _Atomic int64_t webhooks_pending;
    latency_histogram overrun;
    _Atomic uint64_t batch_count[BATCH_BUCKETS];
    _Atomic uint64_t batch_sum;
} m;

#define ADD(counter, n) atomic_fetch_add_explicit(&(counter), (n), memory_order_relaxed)
#define GET(counter) atomic_load_explicit(&(counter), memory_order_relaxed)

static int bucket(const double *bounds, size_t n, double v) {
    size_t i = 0;
    while (i < n && v > bounds[i]) i++;
    return (int)i;
}

static void observe(latency_histogram *h, double seconds) {
    if (!(seconds >= 0)) seconds = 0;
    ADD(h->count[bucket(latency_bounds, LATENCY_BUCKETS - 1, seconds)], 1);
    ADD(h->sum_us, (uint64_t)(seconds * 1e6));
}

void metrics_request(route_id route, int status, double seconds) {
    if ((unsigned)route >= ROUTE_COUNT) route = ROUTE_UNKNOWN;
    int s = STATUS_COUNT - 1;
    for (int i = 0; i < STATUS_COUNT - 1; i++)
        if (statuses[i] == status) s = i;
    ADD(m.requests[route][s], 1);
    observe(&m.latency[route], seconds);
}

void metrics_rejection(problem_kind cause) {
    if (cause > PROBLEM_NONE && cause < PROBLEM_KIND_COUNT) ADD(m.rejections[cause], 1);
}

void metrics_in_flight(int delta) { ADD(m.in_flight, delta); }
void metrics_queue_wait(double seconds) { observe(&m.queue_wait, seconds); }

void metrics_inference(double seconds, int steps) {
    observe(&m.inference, seconds);
    if (steps <= 0) return;
    double per_step = seconds / steps;
    ADD(m.step_count[bucket(step_bounds, STEP_BUCKETS - 1, per_step)], (uint64_t)steps);
    ADD(m.step_sum_us, (uint64_t)(seconds * 1e6));
}

void metrics_batch(int n) {
    ADD(m.batch_count[bucket(batch_bounds, BATCH_BUCKETS - 1, n)], 1);
    ADD(m.batch_sum, (uint64_t)n);
}

double metrics_mean_inference(void) {
    uint64_t n = 0;
    for (size_t i = 0; i < LATENCY_BUCKETS; i++) n += GET(m.inference.count[i]);
    return n ? (double)GET(m.inference.sum_us) * 1e-6 / (double)n : 0;
}

void metrics_cache(bool hit, bool by_upload) {
    ADD(*(hit ? &m.cache_hits : &m.cache_misses), 1);
    if (hit && by_upload) ADD(m.cache_upload_hits, 1);
}
void metrics_webhook(bool delivered) { ADD(*(delivered ? &m.webhooks_ok : &m.webhooks_failed), 1); }
void metrics_auth_throttled(void) { ADD(m.auth_throttled, 1); }
void metrics_content_check(bool flagged, double seconds) {
    ADD(m.safety_checks, 1);
    if (flagged) ADD(m.safety_flagged, 1);
    ADD(m.safety_us, (uint64_t)(seconds * 1e6));
}
void metrics_ratelimit_unavailable(void) { ADD(m.ratelimit_unavailable, 1); }
void metrics_webhook_failed(webhook_failure reason) {
    if ((unsigned)reason < HOOK_FAIL_COUNT) ADD(m.webhooks_given_up[reason], 1);
}
void metrics_webhooks_pending(int delta) { ADD(m.webhooks_pending, delta); }
void metrics_worker_overrun(double seconds) { observe(&m.overrun, seconds); }

/* ---- rendering ----------------------------------------------------------- */

typedef struct {
    char *buf;
    size_t len, cap;
} text;

static void emit(text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void emit(text *t, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(t->buf + t->len, t->cap - t->len, fmt, ap);
        va_end(ap);
        if (n < 0) return;
        if ((size_t)n < t->cap - t->len) {
            t->len += (size_t)n;
            return;
        }
        size_t cap = (t->cap + (size_t)n) * 2;
        char *grown = realloc(t->buf, cap);
        if (!grown) return;
        t->buf = grown;
        t->cap = cap;
    }
}

static void emit_histogram(text *t, const char *name, const char *labels,
                           const double *bounds, size_t nb, _Atomic uint64_t *counts,
                           uint64_t sum_us) {
    uint64_t cumulative = 0;
    const char *sep = *labels ? "," : "";
    for (size_t i = 0; i <= nb; i++) {
        cumulative += GET(counts[i]);
        if (i < nb) emit(t, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, sep, bounds[i], (unsigned long long)cumulative);
        else emit(t, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep, (unsigned long long)cumulative);
    }
    const char *open = *labels ? "{" : "", *close = *labels ? "}" : "";
    emit(t, "%s_sum%s%s%s %.6f\n", name, open, labels, close, (double)sum_us * 1e-6);
    emit(t, "%s_count%s%s%s %llu\n", name, open, labels, close, (unsigned long long)cumulative);
}

static int64_t current_rss_bytes(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    long long size = 0, resident = 0;
    if (!f) return 0;
    int ok = fscanf(f, "%lld %lld", &size, &resident) == 2;
    fclose(f);
    return ok ? resident * sysconf(_SC_PAGESIZE) : 0;
}

/* The upscales run in this process: waits, inference and step times. */
static void emit_inference(text *t) {
    emit(t, "# HELP sdx4_queue_wait_seconds Time an upscale waited for a worker.\n"
            "# TYPE sdx4_queue_wait_seconds histogram\n");
    emit_histogram(t, "sdx4_queue_wait_seconds", "", latency_bounds, LATENCY_BUCKETS - 1,
                   m.queue_wait.count, GET(m.queue_wait.sum_us));
    emit(t, "# HELP sdx4_inference_seconds Time of one upscale on a worker.\n"
            "# TYPE sdx4_inference_seconds histogram\n");
    emit_histogram(t, "sdx4_inference_seconds", "", latency_bounds, LATENCY_BUCKETS - 1,
                   m.inference.count, GET(m.inference.sum_us));
    emit(t, "# HELP sdx4_step_seconds Time per denoising step (an upscale's time over its steps).\n"
            "# TYPE sdx4_step_seconds histogram\n");
    emit_histogram(t, "sdx4_step_seconds", "", step_bounds, STEP_BUCKETS - 1, m.step_count,
                   GET(m.step_sum_us));
    emit(t, "# HELP sdx4_batch_size Upscales that shared one UNet call a step (1: alone).\n"
            "# TYPE sdx4_batch_size histogram\n");
    emit_histogram(t, "sdx4_batch_size", "", batch_bounds, BATCH_BUCKETS - 1, m.batch_count,
                   GET(m.batch_sum) * 1000000); /* the sum in the seconds' millionths it expects */
}

/* The process: memory, readiness, uptime, the engine's device memory, the
 * standard process_* metrics and the GPUs. */
static void emit_process(text *t, const server *srv) {
    emit(t, "# HELP sdx4_resident_memory_bytes Resident memory of the process.\n"
            "# TYPE sdx4_resident_memory_bytes gauge\nsdx4_resident_memory_bytes %lld\n"
            "# HELP sdx4_peak_resident_memory_bytes Peak resident memory so far.\n"
            "# TYPE sdx4_peak_resident_memory_bytes gauge\nsdx4_peak_resident_memory_bytes %lld\n"
            "# HELP sdx4_ready Whether the model is loaded and warmed up.\n"
            "# TYPE sdx4_ready gauge\nsdx4_ready %d\n"
            "# HELP sdx4_uptime_seconds Seconds since start.\n"
            "# TYPE sdx4_uptime_seconds gauge\nsdx4_uptime_seconds %.3f\n",
        (long long)current_rss_bytes(), (long long)sdx4_peak_rss_bytes(),
        atomic_load(&((server *)srv)->phase) == PHASE_READY, mono_now() - srv->started);

    /* each model's engine (a backend of its own) is published before its
     * state leaves loading: their memory, added */
    sdx4_model_info info = {0};
    for (int i = 0; i < srv->nmodels; i++) {
        served_model *m = &srv->models[i];
        int state = atomic_load(&m->state);
        sdx4_model_info mi;
        model_version *v = state == MODEL_LOADING || state == MODEL_FAILED ? NULL : models_acquire(m);
        if (!v) continue;
        sdx4_engine_info(v->engine, &mi); /* (an old version still finishing work is not counted) */
        models_release(v);
        info.device_memory_bytes += mi.device_memory_bytes;
        info.device_memory_peak_bytes += mi.device_memory_peak_bytes;
    }
    emit(t, "# HELP sdx4_device_memory_bytes Memory the compute backend holds now: weights it "
            "copied, live tensors, workspaces (GPU memory with --device cuda).\n"
            "# TYPE sdx4_device_memory_bytes gauge\nsdx4_device_memory_bytes %lld\n"
            "# HELP sdx4_device_memory_peak_bytes The most the compute backend has held.\n"
            "# TYPE sdx4_device_memory_peak_bytes gauge\nsdx4_device_memory_peak_bytes %lld\n",
        (long long)info.device_memory_bytes, (long long)info.device_memory_peak_bytes);

    /* process_* under the standard names, and the GPUs as NVML sees them */
    char *more[] = {process_metrics_render(), gpu_metrics_render()};
    for (size_t i = 0; i < sizeof more / sizeof more[0]; i++) {
        if (more[i]) emit(t, "%s", more[i]);
        free(more[i]);
    }
}

/* The webhooks this process sent: `sdx4 worker` sends those of the jobs it
 * ends in cluster mode. */
static void emit_webhooks(text *t) {
    emit(t, "# HELP sdx4_webhook_deliveries_total Webhook calls, by outcome.\n"
            "# TYPE sdx4_webhook_deliveries_total counter\n"
            "sdx4_webhook_deliveries_total{outcome=\"delivered\"} %llu\n"
            "sdx4_webhook_deliveries_total{outcome=\"failed\"} %llu\n",
        (unsigned long long)GET(m.webhooks_ok), (unsigned long long)GET(m.webhooks_failed));
    static const char *const hook_failures[HOOK_FAIL_COUNT] = {
        [HOOK_FAIL_BACKLOG] = "backlog_full", [HOOK_FAIL_REFUSED] = "refused",
        [HOOK_FAIL_ATTEMPTS] = "attempts_exhausted", [HOOK_FAIL_SHUTDOWN] = "shutdown"};
    emit(t, "# HELP sdx4_webhooks_failed_total Webhooks given up (their job's webhook marked failed), by reason.\n"
            "# TYPE sdx4_webhooks_failed_total counter\n");
    for (int r = 0; r < HOOK_FAIL_COUNT; r++)
        emit(t, "sdx4_webhooks_failed_total{reason=\"%s\"} %llu\n", hook_failures[r],
             (unsigned long long)GET(m.webhooks_given_up[r]));
    emit(t, "# HELP sdx4_webhooks_pending Webhook deliveries queued, in flight or awaiting a retry.\n"
            "# TYPE sdx4_webhooks_pending gauge\nsdx4_webhooks_pending %lld\n",
        (long long)GET(m.webhooks_pending));
}

char *metrics_render(const server *srv, const metrics_gauges *g, size_t *len) {
    text t = {0};
    emit(&t, "# HELP sdx4_http_requests_total HTTP requests answered, by route and status.\n"
             "# TYPE sdx4_http_requests_total counter\n");
    for (int r = 0; r < ROUTE_COUNT; r++)
        for (int s = 0; s < STATUS_COUNT; s++) {
            uint64_t n = GET(m.requests[r][s]);
            if (!n) continue;
            char status[8];
            if (s < STATUS_COUNT - 1) snprintf(status, sizeof status, "%d", statuses[s]);
            else snprintf(status, sizeof status, "other");
            emit(&t, "sdx4_http_requests_total{route=\"%s\",status=\"%s\"} %llu\n", route_names[r], status, (unsigned long long)n);
        }

    emit(&t, "# HELP sdx4_http_request_duration_seconds Time from a request's arrival to its answer.\n"
             "# TYPE sdx4_http_request_duration_seconds histogram\n");
    for (int r = 0; r < ROUTE_COUNT; r++) {
        char labels[48];
        snprintf(labels, sizeof labels, "route=\"%s\"", route_names[r]);
        emit_histogram(&t, "sdx4_http_request_duration_seconds", labels, latency_bounds,
                       LATENCY_BUCKETS - 1, m.latency[r].count, GET(m.latency[r].sum_us));
    }

    emit(&t, "# HELP sdx4_http_requests_in_flight Requests received and not yet answered.\n"
             "# TYPE sdx4_http_requests_in_flight gauge\nsdx4_http_requests_in_flight %lld\n",
         (long long)GET(m.in_flight));

    const conns_stats ns = g->conns;
    emit(&t, "# HELP sdx4_http_connections_open Open HTTP connections.\n"
             "# TYPE sdx4_http_connections_open gauge\nsdx4_http_connections_open %lld\n"
             "# HELP sdx4_http_connections_refused_total Connections refused at accept, by reason.\n"
             "# TYPE sdx4_http_connections_refused_total counter\n"
             "sdx4_http_connections_refused_total{reason=\"per_address_limit\"} %llu\n"
             "# HELP sdx4_http_connections_cut_total Connections closed for being too slow, by "
             "reason (keepalive_idle: no next request within the header timeout).\n"
             "# TYPE sdx4_http_connections_cut_total counter\n"
             "sdx4_http_connections_cut_total{reason=\"header_timeout\"} %llu\n"
             "sdx4_http_connections_cut_total{reason=\"keepalive_idle\"} %llu\n"
             "sdx4_http_connections_cut_total{reason=\"min_upload_rate\"} %llu\n"
             "# HELP sdx4_client_disconnect_cancels_total Synchronous jobs canceled because their "
             "client disconnected.\n"
             "# TYPE sdx4_client_disconnect_cancels_total counter\n"
             "sdx4_client_disconnect_cancels_total %llu\n"
             "# HELP sdx4_upload_bytes Request body bytes held in memory now.\n"
             "# TYPE sdx4_upload_bytes gauge\nsdx4_upload_bytes %zu\n"
             "# HELP sdx4_upload_budget_bytes Request body bytes allowed at once (0: no budget).\n"
             "# TYPE sdx4_upload_budget_bytes gauge\nsdx4_upload_budget_bytes %zu\n"
             "# HELP sdx4_upload_budget_refusals_total Bodies refused because the upload budget was spent.\n"
             "# TYPE sdx4_upload_budget_refusals_total counter\nsdx4_upload_budget_refusals_total %llu\n",
         ns.open, ns.refused_per_address, ns.cut_header_timeout, ns.cut_keepalive_idle,
         ns.cut_min_upload_rate, ns.client_disconnect_cancels, ns.upload_bytes, ns.upload_budget,
         ns.upload_refusals);

    emit(&t, "# HELP sdx4_safety_checks_total Upscale outputs checked by the content check (--safety-checker).\n"
             "# TYPE sdx4_safety_checks_total counter\nsdx4_safety_checks_total %llu\n"
             "# HELP sdx4_safety_flagged_total Outputs the content check flagged (refused or blacked out).\n"
             "# TYPE sdx4_safety_flagged_total counter\nsdx4_safety_flagged_total %llu\n"
             "# HELP sdx4_safety_check_seconds_total Time spent in content checks.\n"
             "# TYPE sdx4_safety_check_seconds_total counter\nsdx4_safety_check_seconds_total %.6f\n",
         (unsigned long long)GET(m.safety_checks), (unsigned long long)GET(m.safety_flagged),
         (double)GET(m.safety_us) / 1e6);

    emit(&t, "# HELP sdx4_rejections_total Requests refused, by cause (the problem type).\n"
             "# TYPE sdx4_rejections_total counter\n");
    for (int k = 1; k < PROBLEM_KIND_COUNT; k++)
        if (GET(m.rejections[k]))
            emit(&t, "sdx4_rejections_total{cause=\"%s\"} %llu\n", problem_slug((problem_kind)k),
                 (unsigned long long)GET(m.rejections[k]));

    const dispatch_stats qs = g->queue;
    emit(&t, "# HELP sdx4_queue_depth Upscales waiting for a worker.\n"
             "# TYPE sdx4_queue_depth gauge\nsdx4_queue_depth %d\n"
             "# HELP sdx4_queue_capacity Upscales that may wait at most.\n"
             "# TYPE sdx4_queue_capacity gauge\nsdx4_queue_capacity %d\n"
             "# HELP sdx4_workers_busy Workers running an upscale.\n"
             "# TYPE sdx4_workers_busy gauge\nsdx4_workers_busy %d\n"
             "# HELP sdx4_workers Workers.\n# TYPE sdx4_workers gauge\nsdx4_workers %d\n"
             "# HELP sdx4_workers_busy_after_deadline Workers still running a task whose "
             "request's deadline has passed.\n"
             "# TYPE sdx4_workers_busy_after_deadline gauge\nsdx4_workers_busy_after_deadline %d\n",
         qs.depth, qs.capacity, qs.running, qs.workers, qs.busy_after_deadline);
    emit(&t, "# HELP sdx4_worker_overrun_seconds How long after its request's deadline a worker "
             "ended a task (only tasks that ran past it).\n"
             "# TYPE sdx4_worker_overrun_seconds histogram\n");
    emit_histogram(&t, "sdx4_worker_overrun_seconds", "", latency_bounds, LATENCY_BUCKETS - 1,
                   m.overrun.count, GET(m.overrun.sum_us));

    emit_inference(&t);

    const cache_stats cs = g->cache;
    emit(&t, "# HELP sdx4_cache_hits_total Upscales answered from the result cache.\n"
             "# TYPE sdx4_cache_hits_total counter\nsdx4_cache_hits_total %llu\n"
             "# HELP sdx4_cache_upload_hits_total Cache hits found by the upload's bytes, without decoding it.\n"
             "# TYPE sdx4_cache_upload_hits_total counter\nsdx4_cache_upload_hits_total %llu\n"
             "# HELP sdx4_cache_misses_total Cacheable upscales not in the cache.\n"
             "# TYPE sdx4_cache_misses_total counter\nsdx4_cache_misses_total %llu\n"
             "# HELP sdx4_cache_bytes Bytes held by the result cache (results and upload links).\n"
             "# TYPE sdx4_cache_bytes gauge\nsdx4_cache_bytes %zu\n"
             "# HELP sdx4_cache_entries Results held by the cache.\n"
             "# TYPE sdx4_cache_entries gauge\nsdx4_cache_entries %zu\n"
             "# HELP sdx4_cache_links Uploads the cache links to the pixels they decoded to.\n"
             "# TYPE sdx4_cache_links gauge\nsdx4_cache_links %zu\n",
         (unsigned long long)GET(m.cache_hits), (unsigned long long)GET(m.cache_upload_hits),
         (unsigned long long)GET(m.cache_misses), cs.bytes, cs.entries, cs.links);

    emit_webhooks(&t);
    emit(&t, "# HELP sdx4_log_lines_dropped_total Log lines dropped because stderr's reader was too slow (or gone).\n"
             "# TYPE sdx4_log_lines_dropped_total counter\nsdx4_log_lines_dropped_total %llu\n"
             "# HELP sdx4_log_queue_bytes Bytes of log lines waiting to be written.\n"
             "# TYPE sdx4_log_queue_bytes gauge\nsdx4_log_queue_bytes %zu\n",
         (unsigned long long)log_lines_dropped(), log_queued_bytes());

    if (g->history_on) {
        const history_stats hs = g->history;
        emit(&t, "# HELP sdx4_history_entries_total Finished jobs given to the history database, by "
                 "outcome (dropped: the queue was full while it was slow or down; rejected: it "
                 "refused the entry).\n"
                 "# TYPE sdx4_history_entries_total counter\n"
                 "sdx4_history_entries_total{outcome=\"written\"} %llu\n"
                 "sdx4_history_entries_total{outcome=\"dropped\"} %llu\n"
                 "sdx4_history_entries_total{outcome=\"rejected\"} %llu\n"
                 "# HELP sdx4_history_queued Finished jobs waiting to be written to the history database.\n"
                 "# TYPE sdx4_history_queued gauge\nsdx4_history_queued %zu\n"
                 "# HELP sdx4_history_up Whether the last write to the history database succeeded.\n"
                 "# TYPE sdx4_history_up gauge\nsdx4_history_up %d\n",
             (unsigned long long)hs.written, (unsigned long long)hs.dropped,
             (unsigned long long)hs.rejected, hs.queued, hs.up);
    }

    emit(&t, "# HELP sdx4_auth_throttled_total Requests refused (429) because their address "
             "failed to authenticate too often.\n"
             "# TYPE sdx4_auth_throttled_total counter\nsdx4_auth_throttled_total %llu\n",
         (unsigned long long)GET(m.auth_throttled));
    emit(&t, "# HELP sdx4_ratelimit_unavailable_total Requests refused (503) because Redis, which "
             "holds the cluster's rate limits, could not be reached.\n"
             "# TYPE sdx4_ratelimit_unavailable_total counter\nsdx4_ratelimit_unavailable_total %llu\n"
             "# HELP sdx4_cache_redis_errors_total Cache lookups (then misses) and stores (then skipped) "
             "that Redis did not answer.\n"
             "# TYPE sdx4_cache_redis_errors_total counter\nsdx4_cache_redis_errors_total %llu\n",
         (unsigned long long)GET(m.ratelimit_unavailable), (unsigned long long)cs.redis_errors);

    emit_process(&t, srv);
    if (len) *len = t.len;
    return t.buf;
}

char *metrics_render_inference(const server *srv) {
    text t = {0};
    emit_inference(&t);
    emit_webhooks(&t);
    emit_process(&t, srv);
    return t.buf;
}
