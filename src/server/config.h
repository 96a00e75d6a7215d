/*
 * config.h - the settings of `sdx4 serve`.
 *
 * Every setting has one name used three ways: the flag --name, the
 * environment variable SDX4_NAME (dashes become underscores) and the key
 * "name" of an optional JSON settings file (--config / SDX4_CONFIG).
 * Precedence, lowest first: built-in default, file, environment, flag.
 */
#ifndef SDX4_SERVER_CONFIG_H
#define SDX4_SERVER_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "sdx4.h"

/* The most --workers allows: queue.c and status.c keep per-worker arrays of it. */
#define MAX_WORKERS 64

typedef struct {
    char **items;
    int count;
} string_list;

typedef struct {
    /* models (models.c turns these into the served list) */
    string_list models; /* model folders, the first the default (--model, repeatable) */
    char *models_dir;   /* every model folder inside it (--models-dir) */
    char *model_id, *device, *variant;
    int threads;
    char *cuda_dtype, *cuda_vae, *cuda_conv; /* sdx4_cuda_options, checked by the engine */
    bool cuda_graph, cuda_plan, cuda_profile;
    char *plan_cache; /* sdx4_cuda_options.plan_cache: a path or "off" (config_load sets the default) */
    char *cpu_dtype; /* sdx4_cpu_options, checked by the engine */
    char *safety_checker; /* the content check's folder (--safety-checker), NULL: off */
    char *safety_action;  /* "refuse" or "blackout" */
    bool warmup;
    string_list warmup_sizes; /* "N" or "WxH" items, checked by config_load */
    /* network */
    char *host;
    int port, http_threads, max_connections, per_ip_connections;
    char *tls_cert, *tls_key; /* HTTPS (tls.h): both or neither */
    int hsts;                 /* Strict-Transport-Security max-age; 0: not sent */
    double connection_timeout, header_timeout;
    size_t min_upload_rate, upload_budget; /* bytes/s; bytes of bodies held at once */
    /* request limits */
    size_t max_upload;
    int min_side, max_side, max_steps, max_prompt_chars, max_batch;
    /* queue */
    int workers, queue_size;
    int max_batch_size;  /* upscales sharing a UNet call (queue.c); 1: no batching */
    double batch_window; /* seconds a lone upscale waits for company */
    char *redis;          /* cluster mode: the Redis URL (redis.h), NULL single-process */
    bool ready_without_workers; /* an API-only node ready with no live worker (scale from zero) */
    double redis_timeout; /* seconds a Redis connect or answer may take */
    char *name;                /* cluster mode: this worker's name, NULL hostname-pid */
    double visibility_timeout; /* seconds a task may go unrefreshed before another worker takes it */
    int max_attempts;          /* deliveries of a task before it is failed instead of run */
    double request_timeout, shutdown_timeout;
    /* jobs and webhooks */
    double job_retention;
    int max_jobs;
    size_t jobs_memory;
    char *webhook_secret;
    int webhook_attempts;
    double webhook_backoff, webhook_timeout;
    bool webhook_private;
    int webhook_senders, webhook_per_target, webhook_backlog;
    char *webhook_proxy;
    /* clients */
    int rate_limit;
    double rate_window;
    string_list trusted_proxies, api_keys, admin_keys, cors_origins;
    char *api_keys_file, *admin_keys_file;
    int auth_failures; /* failed key attempts per address per minute */
    char *jwt_jwks, *jwt_issuer, *jwt_audience; /* bearer tokens (jwt.h); jwt_jwks NULL: none */
    double jwt_jwks_refresh, jwt_leeway;
    char *outbound_ca_file; /* CAs trusted by outbound HTTPS (curl_http.h); NULL: libcurl's default */
    /* cache, logs, docs */
    size_t cache_size;
    bool cache_shared; /* cached results shared between API keys */
    char *log_level;
    bool access_log;
    char *docs_assets;
    size_t log_buffer;
    /* request history (history.h) */
    char *history; /* a file (SQLite) or a postgresql:// URL; NULL: off */
    int history_backlog;
    double history_timeout;
    /* async jobs' results in S3-compatible storage (objstore.h); credentials
     * only from AWS_* variables, never settings that `ps` would show */
    char *s3_bucket, *s3_endpoint, *s3_region, *s3_prefix;
    int s3_url_ttl;
    bool s3_path_style;
    double s3_timeout;
} server_config;

/* Fills `cfg` from defaults, the settings file, the environment and argv
 * (argv[0] is "serve"). Returns 0 to run, 1 when --help was printed, -1 on
 * a bad setting (message written to `err`). */
int config_load(server_config *cfg, int argc, char **argv, FILE *err);
void config_free(server_config *cfg);
/* "N" (N x N) or "WxH" -> width, height (1..65536); -1 if malformed. */
int config_parse_dimensions(const char *text, int *width, int *height);
void config_print_help(FILE *out);

/* The engine's open options that the settings give for the model folder
 * `model_dir` (variant, device, threads, the cuda-* settings): one
 * mapping for serve and worker. */
void config_engine_options(const server_config *cfg, const char *model_dir, sdx4_engine_options *o);
/* The content check these settings ask of every output: "" none,
 * "refuse" or "blackout". An API-only node of a cluster keys its cache
 * by it and asks it of the workers, without loading the checker. */
const char *config_content_check(const server_config *cfg);

#endif
