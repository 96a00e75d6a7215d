/*
 * metrics.h - counters for GET /metrics (Prometheus text format 0.0.4).
 *
 * Recording is lock-free (relaxed atomics) so that it costs a few
 * nanoseconds on the request path; rendering reads the counters, the log
 * queue and the live gauges that the caller gathers from the dispatcher,
 * the connections and the cache when a scraper asks (so that none of
 * those modules, which record here, is called back from here).
 */
#ifndef SDX4_SERVER_METRICS_H
#define SDX4_SERVER_METRICS_H

#include <stdbool.h>
#include <stddef.h>

#include "cache.h"
#include "conns.h"
#include "dispatch.h"
#include "history.h"
#include "problem.h"
#include "server.h"

void metrics_request(route_id route, int status, double seconds);
void metrics_rejection(problem_kind cause);
void metrics_in_flight(int delta);
void metrics_queue_wait(double seconds);
/* A finished upscale: its whole time and its number of steps. */
void metrics_inference(double seconds, int steps);
/* A batch of n upscales that shared their UNet calls (1: one alone). */
void metrics_batch(int n);
/* A cacheable upscale looked up: found or not, and when found, whether by
 * the upload's bytes (no decoding) or by its decoded pixels. */
void metrics_cache(bool hit, bool by_upload);
/* Mean seconds of the upscales so far (0 before the first), for Retry-After. */
double metrics_mean_inference(void);
void metrics_webhook(bool delivered);
/* A request refused with 429 because its address failed to authenticate
 * too often (auth.h). */
void metrics_auth_throttled(void);
/* One output checked by the content check (--safety-checker), flagged or
 * not, and how long the check took. */
void metrics_content_check(bool flagged, double seconds);
/* A request refused with 503 because the rate limits it is counted
 * against (kept in Redis in cluster mode) could not be reached. */
void metrics_ratelimit_unavailable(void);
/* Why a webhook was given up: the backlog was full, its target is not
 * allowed (or its URL does not parse), every attempt failed, or the
 * server stopped first. */
typedef enum { HOOK_FAIL_BACKLOG, HOOK_FAIL_REFUSED, HOOK_FAIL_ATTEMPTS, HOOK_FAIL_SHUTDOWN, HOOK_FAIL_COUNT } webhook_failure;
void metrics_webhook_failed(webhook_failure reason);
/* Deliveries queued, in flight or awaiting a retry: +1 queued, -1 done. */
void metrics_webhooks_pending(int delta);
/* A worker ended a task this many seconds after its job's deadline. */
void metrics_worker_overrun(double seconds);

/* The gauges of other modules, read by the caller. */
typedef struct {
    dispatch_stats queue;
    conns_stats conns;
    cache_stats cache;
    bool history_on; /* --history: `history` holds its writer's counts */
    history_stats history;
} metrics_gauges;

/* The exposition text (malloc'd). */
char *metrics_render(const server *srv, const metrics_gauges *g, size_t *len);
/* Its part about the upscales this process ran, the webhooks it sent and
 * the process itself (waits, inference and step times, memory, device
 * memory, process_*, the GPUs), for `sdx4 worker`, which has no HTTP API
 * to report on (malloc'd). */
char *metrics_render_inference(const server *srv);

#endif
