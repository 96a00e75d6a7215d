/*
 * server.h - the state that the modules of `sdx4 serve` share.
 *
 * serve.c builds one `server` at start and tears it down at exit; the HTTP
 * layer reads it from every request. Fields set before the daemon starts
 * are read-only afterwards; `phase` moves forward only
 * (loading -> warming -> ready -> draining), and each model's engine is
 * published by the loader before its state (and the phase) becomes ready.
 *
 * Models. A server serves one or more models (models.c: --model, repeated,
 * and --models-dir), in `models`, the first the default; a request names
 * one by its `model` field, and a task carries the index of its model in
 * this array, which never changes once the daemon starts.
 */
#ifndef SDX4_SERVER_SERVER_H
#define SDX4_SERVER_SERVER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <time.h>

#include "config.h"
#include "dispatch.h"
#include "sdx4.h"

typedef enum {
    PHASE_LOADING,  /* model being read */
    PHASE_WARMING,  /* first upscale running */
    PHASE_READY,
    PHASE_DRAINING, /* SIGTERM: finishing in-flight work, refusing new */
    PHASE_FAILED    /* model failed to load: health says why, then exit */
} server_phase;

/* Routes, for metrics and logs. */
typedef enum {
    ROUTE_UPSCALE,
    ROUTE_BATCH,
    ROUTE_JOB_CREATE,
    ROUTE_JOB_GET,
    ROUTE_JOB_RESULT,
    ROUTE_JOB_CANCEL,
    ROUTE_JOB_EVENTS,
    ROUTE_JOB_LIST, /* GET /jobs: the request history */
    ROUTE_HEALTH,
    ROUTE_MODEL_INFO, /* GET /model-info[?model=NAME], GET /models/NAME */
    ROUTE_MODELS,     /* GET /models: the list */
    ROUTE_METRICS,
    ROUTE_OPENAPI,
    ROUTE_DOCS,
    ROUTE_A1111_UPSCALERS, /* AUTOMATIC1111's API (a1111.h): GET /sdapi/v1/upscalers */
    ROUTE_A1111_SINGLE,    /* POST /sdapi/v1/extra-single-image */
    ROUTE_A1111_BATCH,     /* POST /sdapi/v1/extra-batch-images */
    ROUTE_ADMIN_DRAIN,     /* the admin API (admin.h): POST /api/v1/admin/drain */
    ROUTE_ADMIN_UNDRAIN,   /* POST /api/v1/admin/undrain */
    ROUTE_ADMIN_JOBS,      /* GET /api/v1/admin/jobs */
    ROUTE_ADMIN_JOB,       /* GET /api/v1/admin/jobs/{id} */
    ROUTE_ADMIN_JOB_CANCEL, /* DELETE /api/v1/admin/jobs/{id} */
    ROUTE_ADMIN_USAGE,     /* GET /api/v1/admin/usage */
    ROUTE_ADMIN_RELOAD,    /* POST /api/v1/admin/models/{name}/reload */
    ROUTE_PREFLIGHT,
    ROUTE_UNKNOWN,
    ROUTE_COUNT
} route_id;

extern const char *const route_names[ROUTE_COUNT];

/* A model's loading, as health shows it (served_model.state). */
typedef enum { MODEL_LOADING, MODEL_WARMING, MODEL_READY, MODEL_FAILED } model_state;

struct cost_model;

/* One loaded version of a model: its engine and what depends on it.
 * Reference-counted (models.h): whoever uses it, a batch, a warm-up, a
 * reader of its facts, holds a reference, so that a reload (the admin API)
 * swaps in a new version while the work on the old one finishes, and the
 * old one is freed by its last holder. Immutable once made, but for the
 * estimator, which is thread-safe. */
typedef struct model_version {
    sdx4_engine *engine;
    sdx4_model_info info;    /* its strings point into engine */
    struct cost_model *cost; /* its time estimator (cost.c), NULL none */
    char hash[65];           /* its weights' digest (models.c): which version answers */
    char dir[1024];          /* the folder it came from */
    bool demo;               /* that folder holds a DEMO_MODEL marker: random weights */
    atomic_int refs;
} model_version;

/* One model this server (or worker) serves. name and dir are set before
 * the daemon starts; `current` by the loader before `state` becomes
 * MODEL_WARMING (an API-only node of a cluster loads none: it stays NULL,
 * its models' facts coming from the workers), then by each reload. */
typedef struct served_model {
    char name[64];   /* what requests' `model` field and X-Model say */
    char dir[1024];  /* its folder as configured */
    atomic_bool demo; /* the version in service is a demo (its `demo`; before one
                         is loaded, the configured folder holds the marker) */
    bool gan;        /* a GAN (no steps, no prompt); a reload keeps the kind */
    atomic_int state; /* model_state */
    atomic_bool reloading; /* a reload is loading a new version */
    pthread_mutex_t lock;  /* guards `current` and `reload_error` */
    model_version *current;
    char reload_error[512]; /* why the last reload failed, "" none */
} served_model;

/* The most models one server serves. */
#define MAX_MODELS 32

struct queue;
struct job_store;
struct cache;
struct ratelimit;
struct auth;
struct webhooks;
struct conns;
struct tls;
struct history;
struct redis;
struct objstore;
struct dispatch_redis;
struct MHD_Daemon;

typedef struct server {
    server_config cfg;
    served_model *models; /* [nmodels], models[0] the default (models.c) */
    int nmodels;
    const char *model_names[MAX_MODELS]; /* models[i].name: the names requests may give */
    atomic_int phase;
    atomic_bool drained; /* by the admin API: no new upscales (admin.c) */
    char failure[512]; /* why loading failed (PHASE_FAILED): the model folder and the reason */
    double started;    /* mono_now() at start */
    struct queue *queue;
    dispatch dispatch; /* what runs the jobs' tasks: the queue, or Redis */
    struct redis *redis;            /* cluster mode (--redis): the shared store, NULL otherwise */
    struct dispatch_redis *cluster; /* cluster mode: the dispatcher to the workers behind it */
    struct job_store *jobs;
    struct cache *cache;
    struct ratelimit *ratelimit;
    struct auth *auth;
    struct webhooks *webhooks;
    struct MHD_Daemon *daemon;
    struct conns *conns; /* connection limits and deadlines (http.c's) */
    struct tls *tls;     /* HTTPS's certificate (--tls-cert), NULL for plain HTTP */
    struct history *history; /* finished jobs' records; NULL without --history */
    struct objstore *results; /* where async jobs' images go (--s3-bucket), or NULL */
} server;

#define DEMO_NOTE "demo model (random weights): output is noise"

/* Seconds on the monotonic clock (deadlines, durations). */
static inline double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* A condition variable whose timed waits take mono_now() deadlines, so
 * that a change of the wall clock neither cuts nor stretches a wait. */
static inline void cond_init_monotonic(pthread_cond_t *cond) {
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(cond, &attr);
    pthread_condattr_destroy(&attr);
}

/* "2026-01-02T03:04:05.678Z": seconds since the epoch as documents show them. */
static inline void iso_time(char *buf, size_t size, double wall) {
    time_t secs = (time_t)wall;
    struct tm tm;
    gmtime_r(&secs, &tm);
    size_t n = strftime(buf, size, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf + n, size - n, ".%03dZ", (int)((wall - (double)secs) * 1000));
}

/* Seconds since the epoch (timestamps shown to clients). */
static inline double wall_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#endif
