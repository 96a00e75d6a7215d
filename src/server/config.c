/*
 * config.c - settings from defaults, a JSON file, SDX4_* variables and flags.
 *
 * One table describes every setting: its name, type, range, default (as
 * text) and help line. Each source is parsed with the same text parser, the
 * defaults included, so a default can never disagree with what a flag would
 * accept, and `sdx4 serve --help` is generated from the table: it cannot
 * forget a setting. Later sources overwrite earlier ones field by field.
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>

#include "log.h"

typedef enum { OPT_STRING, OPT_INT, OPT_DOUBLE, OPT_SIZE, OPT_BOOL, OPT_LIST } opt_type;

typedef struct {
    const char *name;
    opt_type type;
    size_t offset;
    double min, max; /* for OPT_INT, OPT_DOUBLE and OPT_SIZE */
    const char *fallback; /* default, as text; NULL: unset */
    const char *help;
} option;

#define O(field) offsetof(server_config, field)
static const option options[] = {
    /* no default here: check() gives models/x4-upscaler when neither
     * --model nor --models-dir names any */
    {"model", OPT_LIST, O(models), 0, 0, NULL,
     "model folder: a diffusers one (model_index.json) or a GAN upscaler's (config.json and "
     "model.safetensors); repeat it (or separate folders by commas) to serve several, each named "
     "by its folder's name, the first being the default [default: models/x4-upscaler unless "
     "--models-dir is given]"},
    {"models-dir", OPT_STRING, O(models_dir), 0, 0, NULL,
     "serve every model folder inside this folder too (after the --model ones; the first by name "
     "is the default when no --model is given)"},
    {"model-id", OPT_STRING, O(model_id), 0, 0, NULL,
     "name of the first model, reported in X-Model and model-info and chosen by requests' model "
     "field (default: the folder's name)"},
    {"device", OPT_STRING, O(device), 0, 0, "auto", "cpu, cuda or auto"},
    {"variant", OPT_STRING, O(variant), 0, 0, NULL, "weights variant, e.g. fp16"},
    {"threads", OPT_INT, O(threads), 0, SDX4_MAX_THREADS, "0", "CPU threads of the engine (0: all cores)"},
    {"cuda-dtype", OPT_STRING, O(cuda_dtype), 0, 0, "fp16",
     "CUDA: fp16 (half weights and activations, float accumulation) or fp32 (float everywhere)"},
    {"cuda-vae", OPT_STRING, O(cuda_vae), 0, 0, "bf16", "CUDA: the VAE decode of fp16 mode in bf16 or fp32"},
    {"cuda-conv", OPT_STRING, O(cuda_conv), 0, 0, "cudnn",
     "CUDA convolutions: cudnn, cudnn-legacy (a new size is chosen faster, every step is slower), "
     "cudnn-graph or im2col"},
    {"cuda-graph", OPT_BOOL, O(cuda_graph), 0, 0, "true",
     "CUDA: replay each denoising step as a recorded CUDA graph (false: operation by operation)"},
    {"cuda-plan", OPT_BOOL, O(cuda_plan), 0, 0, "true",
     "CUDA: lay out a recorded step's memory in one arena planned by the step before"},
    {"cuda-profile", OPT_BOOL, O(cuda_profile), 0, 0, "false",
     "CUDA: GPU time per operation, on stderr when the engine closes"},
    /* its default, sdx4_default_plan_cache, follows XDG_CACHE_HOME (config_load) */
    {"plan-cache", OPT_STRING, O(plan_cache), 0, 0, NULL,
     "CUDA: the file keeping the algorithms and plans chosen by timing per input size, so that "
     "a restart at the same sizes (and the other workers) do not time them again; warm-up "
     "fills it; off: none [default: $XDG_CACHE_HOME/sdx4/cuda-plans, else "
     "~/.cache/sdx4/cuda-plans]"},
    {"cpu-dtype", OPT_STRING, O(cpu_dtype), 0, 0, "fp32",
     "CPU: fp32 (float32 through OpenBLAS) or bf16 (convolutions and linear layers in bfloat16 "
     "with float accumulation through oneDNN: AMX or AVX512-BF16; the server does not start on a "
     "CPU without them)"},
    {"safety-checker", OPT_STRING, O(safety_checker), 0, 0, NULL,
     "check every upscale's output with this content checker (CompVis/stable-diffusion-"
     "safety-checker's folder: scripts/download-safety-checker.sh) on the engine's device; "
     "off when unset"},
    {"safety-action", OPT_STRING, O(safety_action), 0, 0, "refuse",
     "what a flagged output gets: refuse (422 content-flagged, no image) or blackout (a black "
     "image, as diffusers returns)"},
    {"warmup", OPT_BOOL, O(warmup), 0, 0, "true",
     "run one-step upscales before reporting ready, and measure two of them to "
     "calibrate the time estimates that refuse requests unable to finish in time"},
    {"warmup-sizes", OPT_LIST, O(warmup_sizes), 0, 0, NULL,
     "input sizes to warm up, N or WxH pixels (default: min-side): on a GPU the "
     "first upscale of each size chooses its algorithms, seconds that its "
     "client would otherwise wait"},
    {"host", OPT_STRING, O(host), 0, 0, "127.0.0.1", "address to listen on"},
    {"port", OPT_INT, O(port), 0, 65535, "8000", "TCP port (0: any free port)"},
    {"tls-cert", OPT_STRING, O(tls_cert), 0, 0, NULL,
     "serve HTTPS (TLS 1.2 and 1.3) with this PEM certificate chain, the server's "
     "certificate first (with tls-key; SIGHUP reloads both)"},
    {"tls-key", OPT_STRING, O(tls_key), 0, 0, NULL,
     "the unencrypted PEM private key of tls-cert's certificate"},
    /* 0: HSTS binds browsers for max-age; an operator turns it on knowingly */
    {"hsts", OPT_INT, O(hsts), 0, 1000000000, "0",
     "seconds of Strict-Transport-Security sent on every HTTPS answer (0: none)"},
    {"http-threads", OPT_INT, O(http_threads), 1, 256, "2",
     "threads serving HTTP (they never run inference)"},
    {"max-connections", OPT_INT, O(max_connections), 1, 100000, "1024",
     "open connections at most"},
    /* 32: a browser opens 6 connections to a host, a client library's pool
     * 10 (requests) to a few dozen, and an office behind one NAT address a
     * few of those; one address still cannot take more than 1/32 of the
     * default --max-connections */
    {"per-ip-connections", OPT_INT, O(per_ip_connections), 0, 100000, "32",
     "open connections per client address, IPv6 per /64 (0: no limit); trusted "
     "proxies are exempt, a proxy carrying many clients. 32 fits a browser's 6, "
     "a client library's pool or a small office behind one NAT address"},
    {"connection-timeout", OPT_DOUBLE, O(connection_timeout), 1, 3600, "30",
     "seconds an idle or stalled connection is kept"},
    {"header-timeout", OPT_DOUBLE, O(header_timeout), 0.1, 3600, "10",
     "seconds from a connection's opening, or its previous answer, to the end "
     "of a request's headers, however steadily they trickle in (the connection "
     "is closed after it; idle keep-alive connections too)"},
    /* 1K: 8 kbit/s is below any real uplink (GPRS sends about 20) and far
     * above a client that trickles a byte now and then to hold a connection */
    {"min-upload-rate", OPT_SIZE, O(min_upload_rate), 0, 1e12, "1K",
     "bytes per second a request body must average over each 5 s, the first "
     "5 s included, or the connection is closed (0: no minimum)"},
    /* 128M: about four default-size uploads (10M) per default worker (3),
     * more than the workers can start on while they arrive; it bounds the
     * memory that unfinished bodies pin, whatever the number of connections */
    {"upload-budget", OPT_SIZE, O(upload_budget), 0, 1e13, "128M",
     "bytes of request bodies held in memory at once, all connections together "
     "(0: no budget); a body that does not fit gets 503 with Retry-After"},
    {"max-upload", OPT_SIZE, O(max_upload), 1024, 1e12, "10M",
     "largest request body (413 beyond, checked while receiving)"},
    {"min-side", OPT_INT, O(min_side), 1, 65536, "64", "smallest input side in pixels"},
    {"max-side", OPT_INT, O(max_side), 1, SDX4_MAX_INPUT_SIDE, "512",
     "largest input side in pixels (inputs above 512 want the tile field: the UNet in windows)"},
    {"max-steps", OPT_INT, O(max_steps), 1, SDX4_MAX_STEPS, "150", "largest num_inference_steps"},
    {"max-prompt-chars", OPT_INT, O(max_prompt_chars), 1, 1 << 18, "1000",
     "longest prompt in characters (longer prompts get 422; prompts over the "
     "model's 77 tokens are truncated as CLIP does)"},
    {"max-batch", OPT_INT, O(max_batch), 1, 64, "8", "images per batch-upscale request"},
    {"workers", OPT_INT, O(workers), 0, MAX_WORKERS, "3",
     "upscales running at once (0 with --redis: an API-only node, no model loaded)"},
    {"max-batch-size", OPT_INT, O(max_batch_size), 1, SDX4_MAX_BATCH, "8",
     "upscales, from any requests, that share one UNet call a step when they can "
     "(same size, steps, sampler, guidance or not; within the UNet's memory budget); 1: none"},
    {"batch-window", OPT_DOUBLE, O(batch_window), 0, 1, "0.01",
     "seconds a lone upscale waits for others to share its UNet calls (0: only those already waiting)"},
    {"queue-size", OPT_INT, O(queue_size), 0, 100000, "100",
     "pending upscales at most (then 503 with Retry-After)"},
    {"ready-without-workers", OPT_BOOL, O(ready_without_workers), 0, 0, "false",
     "an API-only node (--workers 0) stays ready while no live worker serves its model, its tasks "
     "waiting in Redis for one: for workers that scale from zero (KEDA)"},
    {"redis", OPT_STRING, O(redis), 0, 0, NULL,
     "cluster mode: the Redis that nodes and workers share, "
     "redis://[[user]:password@]host[:port][/db] or unix:///path[?db=N] "
     "(unset: one process holds everything)"},
    {"redis-timeout", OPT_DOUBLE, O(redis_timeout), 0.05, 60, "2",
     "seconds a Redis connect or answer may take before the call fails"},
    {"name", OPT_STRING, O(name), 0, 0, NULL,
     "cluster mode: this worker's name, unique in the cluster (default: hostname-pid)"},
    {"visibility-timeout", OPT_DOUBLE, O(visibility_timeout), 1, 3600, "30",
     "cluster mode: seconds a task's worker may go without a heartbeat before "
     "another worker takes the task over (its worker is taken for dead)"},
    {"max-attempts", OPT_INT, O(max_attempts), 1, 100, "3",
     "cluster mode: workers a task may be taken by; one whose workers all stopped "
     "before finishing it fails instead of being tried again"},
    {"request-timeout", OPT_DOUBLE, O(request_timeout), 0.01, 86400, "60",
     "seconds from arrival until a request fails with 504 and its job is canceled"},
    {"shutdown-timeout", OPT_DOUBLE, O(shutdown_timeout), 0, 3600, "30",
     "seconds given to in-flight work on SIGTERM before it is canceled"},
    {"job-retention", OPT_DOUBLE, O(job_retention), 0, 1e7, "3600",
     "seconds a finished job and its result are kept"},
    {"max-jobs", OPT_INT, O(max_jobs), 1, 1000000, "1000",
     "finished jobs kept at most (oldest dropped first)"},
    {"jobs-memory", OPT_SIZE, O(jobs_memory), 0, 1e13, "512M",
     "bytes that finished jobs kept for GET may hold at most: their results, and the "
     "inputs of images that never ran (canceled or timed out in the queue, cached)"},
    {"webhook-secret", OPT_STRING, O(webhook_secret), 0, 0, NULL,
     "HMAC-SHA256 key signing webhook calls (webhooks are refused without it)"},
    {"webhook-attempts", OPT_INT, O(webhook_attempts), 1, 100, "5",
     "deliveries tried per webhook"},
    {"webhook-backoff", OPT_DOUBLE, O(webhook_backoff), 0, 3600, "1",
     "seconds before the first retry, doubled after each"},
    {"webhook-timeout", OPT_DOUBLE, O(webhook_timeout), 0.1, 600, "10",
     "seconds one webhook call may take"},
    {"webhook-private", OPT_BOOL, O(webhook_private), 0, 0, "false",
     "allow webhooks to loopback and private addresses"},
    {"webhook-senders", OPT_INT, O(webhook_senders), 1, 64, "8",
     "threads making webhook calls (a call mostly waits on its receiver)"},
    {"webhook-per-target", OPT_INT, O(webhook_per_target), 1, 64, "2",
     "webhook calls at once to one host:port, so that one slow receiver holds "
     "at most this many senders"},
    {"webhook-backlog", OPT_INT, O(webhook_backlog), 1, 1000000, "1000",
     "webhook deliveries pending at most, in flight or awaiting a retry (beyond: "
     "the job's webhook fails at once)"},
    {"webhook-proxy", OPT_STRING, O(webhook_proxy), 0, 0, NULL,
     "proxy for webhook calls, scheme://host:port (http, https, socks4, socks4a, "
     "socks5, socks5h); without it the proxy variables of the environment "
     "(http_proxy, ALL_PROXY...) are ignored"},
    {"rate-limit", OPT_INT, O(rate_limit), 0, 1000000, "10",
     "upscale requests per client per window (0: no limit)"},
    {"rate-window", OPT_DOUBLE, O(rate_window), 1, 86400, "60", "rate limit window in seconds"},
    {"trusted-proxies", OPT_LIST, O(trusted_proxies), 0, 0, NULL,
     "addresses or CIDR ranges whose X-Forwarded-For is believed"},
    {"api-keys", OPT_LIST, O(api_keys), 0, 0, NULL,
     "accepted API keys, comma-separated (none: no authentication)"},
    {"api-keys-file", OPT_STRING, O(api_keys_file), 0, 0, NULL,
     "file of accepted API keys, one per line"},
    {"admin-keys", OPT_LIST, O(admin_keys), 0, 0, NULL,
     "keys of the admin API (/api/v1/admin/...), comma-separated; they are API keys too"},
    {"admin-keys-file", OPT_STRING, O(admin_keys_file), 0, 0, NULL,
     "file of admin keys, one per line"},
    {"auth-failures", OPT_INT, O(auth_failures), 0, 1000000, "10",
     "failed API key attempts per client address per minute; past them the "
     "address gets 429 until its allowance refills (0: no limit)"},
    {"jwt-jwks", OPT_STRING, O(jwt_jwks), 0, 0, NULL,
     "accept OAuth 2 / OIDC bearer tokens (JWT: RS256, ES256, EdDSA) signed by the keys of "
     "this JWKS: a file, or an https:// URL (the IdP's jwks_uri); API keys keep working beside them"},
    {"jwt-jwks-refresh", OPT_DOUBLE, O(jwt_jwks_refresh), 1, 86400, "300",
     "seconds between reloads of the JWKS (and at most one reload per 30 s for a token "
     "naming an unknown kid)"},
    {"jwt-issuer", OPT_STRING, O(jwt_issuer), 0, 0, NULL, "a token's iss, exactly (required with jwt-jwks)"},
    {"jwt-audience", OPT_STRING, O(jwt_audience), 0, 0, NULL,
     "a token's aud must be or contain this (required with jwt-jwks)"},
    {"jwt-leeway", OPT_DOUBLE, O(jwt_leeway), 0, 600, "60",
     "seconds of clock skew forgiven on a token's exp, nbf and iat"},
    {"outbound-ca-file", OPT_STRING, O(outbound_ca_file), 0, 0, NULL,
     "PEM file of the CA certificates that the server's own HTTPS calls trust (the JWKS URL, "
     "webhooks, the S3 endpoint), in place of the system's bundle: an IdP or a store behind a "
     "private CA (to keep trusting the system's CAs too, give a file holding both)"},
    {"cors-origins", OPT_LIST, O(cors_origins), 0, 0, NULL,
     "origins allowed by CORS, comma-separated, or *"},
    {"cache-size", OPT_SIZE, O(cache_size), 0, 1e13, "256M",
     "bytes of cached results and upload links (0: no cache); only requests with a seed are cached"},
    {"cache-shared", OPT_BOOL, O(cache_shared), 0, 0, "false",
     "share cached results between API keys (a hit then tells a key that another "
     "sent the same request)"},
    {"log-level", OPT_STRING, O(log_level), 0, 0, "info", "debug, info, warn or error"},
    {"access-log", OPT_BOOL, O(access_log), 0, 0, "true", "log one line per request"},
    {"docs-assets", OPT_STRING, O(docs_assets), 0, 0, NULL,
     "folder with Swagger UI's dist files for /docs (default: the Debian packages' "
     "copies)"},
    {"log-buffer", OPT_SIZE, O(log_buffer), 4096, 1 << 30, "1M",
     "bytes of log lines held while stderr's reader is slow (beyond: lines are "
     "dropped and counted, never waited for)"},
    {"history", OPT_STRING, O(history), 0, 0, NULL,
     "record every finished job for GET /api/v1/jobs: an SQLite file (one server), "
     "or a postgresql:// URL (servers sharing one database) (default: off)"},
    /* 10000: minutes of a busy server's jobs at about 1 KB each, a PostgreSQL
     * restart's worth, for 10 MB at most */
    {"history-backlog", OPT_INT, O(history_backlog), 1, 1000000, "10000",
     "finished jobs held while the history database is slow or down (beyond: "
     "dropped and counted, never waited for)"},
    /* 15: past the statement_timeout of 10 s that the server is given, so
     * that a live server's own error comes first */
    {"history-timeout", OPT_DOUBLE, O(history_timeout), 1, 3600, "15",
     "seconds a PostgreSQL history call waits for an answer before the connection is "
     "dropped and remade (a frozen host enforces no statement_timeout); a listing then "
     "gets 503"},
    {"s3-bucket", OPT_STRING, O(s3_bucket), 0, 0, NULL,
     "store async jobs' images (in cluster mode every image) in this S3 bucket and give "
     "presigned URLs to them (credentials from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)"},
    {"s3-endpoint", OPT_STRING, O(s3_endpoint), 0, 0, NULL,
     "S3-compatible endpoint, http[s]://host[:port] (default: AWS_ENDPOINT_URL, else AWS "
     "S3 of the region)"},
    {"s3-region", OPT_STRING, O(s3_region), 0, 0, NULL,
     "region signed for (default: AWS_REGION, AWS_DEFAULT_REGION, else us-east-1)"},
    {"s3-prefix", OPT_STRING, O(s3_prefix), 0, 0, NULL,
     "key prefix: objects are PREFIX/<job id>/<index>.<ext>"},
    {"s3-url-ttl", OPT_INT, O(s3_url_ttl), 1, 604800, "3600",
     "seconds a presigned result URL stays valid (each job document gives a fresh one)"},
    {"s3-path-style", OPT_BOOL, O(s3_path_style), 0, 0, "false",
     "address objects as endpoint/bucket/key instead of bucket.endpoint/key (local "
     "servers, MinIO, endpoints given as an address)"},
    {"s3-timeout", OPT_DOUBLE, O(s3_timeout), 0.1, 3600, "30",
     "seconds one request to the store may take; an upload that fails fails its job"},
};
#undef O
enum { OPTION_COUNT = sizeof options / sizeof options[0] };

/* "10M", "512k", "1G", "1048576" -> bytes (powers of 1024). -1 if bad. */
static int parse_size(const char *text, size_t *bytes) {
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (end == text || errno || !(v >= 0)) return -1;
    double scale = 1;
    switch (toupper((unsigned char)*end)) {
    case 'K': scale = 1024.0; end++; break;
    case 'M': scale = 1024.0 * 1024; end++; break;
    case 'G': scale = 1024.0 * 1024 * 1024; end++; break;
    default: break;
    }
    if (toupper((unsigned char)*end) == 'B' || toupper((unsigned char)*end) == 'I') end++;
    if (toupper((unsigned char)*end) == 'B') end++;
    if (*end || v * scale > (double)SIZE_MAX / 2) return -1;
    *bytes = (size_t)(v * scale);
    return 0;
}

static void list_free(string_list *l) {
    for (int i = 0; i < l->count; i++) free(l->items[i]);
    free(l->items);
    l->items = NULL;
    l->count = 0;
}

/* Splits on commas, trimming spaces and dropping empty items. */
static int list_parse(string_list *l, const char *text) {
    list_free(l);
    const char *p = text;
    while (*p) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        const char *s = p, *e = p + len;
        while (s < e && isspace((unsigned char)*s)) s++;
        while (e > s && isspace((unsigned char)e[-1])) e--;
        if (e > s) {
            char **grown = realloc(l->items, (l->count + 1) * sizeof *grown);
            if (!grown) return -1;
            l->items = grown;
            l->items[l->count++] = strndup(s, (size_t)(e - s));
        }
        p = comma ? comma + 1 : p + len;
    }
    return 0;
}

/* Adds the items of `text` to the list (a list flag given again). */
static int list_append(string_list *l, const char *text) {
    string_list more = {0};
    if (list_parse(&more, text)) return -1;
    char **grown = realloc(l->items, (size_t)(l->count + more.count + 1) * sizeof *grown);
    if (!grown) {
        list_free(&more);
        return -1;
    }
    l->items = grown;
    for (int i = 0; i < more.count; i++) l->items[l->count++] = more.items[i];
    free(more.items);
    return 0;
}

static int parse_bool(const char *text, bool *out) {
    static const char *const yes[] = {"1", "true", "yes", "on"}, *const no[] = {"0", "false", "no", "off"};
    for (int i = 0; i < 4; i++) {
        if (strcasecmp(text, yes[i]) == 0) return *out = true, 0;
        if (strcasecmp(text, no[i]) == 0) return *out = false, 0;
    }
    return -1;
}

/* Stores `text` into the setting; -1 with a message when it does not fit. */
static int set_option(server_config *cfg, const option *o, const char *text,
                      const char *source, FILE *err) {
    void *field = (char *)cfg + o->offset;
    char *end;
    switch (o->type) {
    case OPT_STRING:
        free(*(char **)field);
        *(char **)field = *text ? strdup(text) : NULL;
        return 0;
    case OPT_LIST:
        return list_parse(field, text);
    case OPT_BOOL:
        if (parse_bool(text, field) == 0) return 0;
        fprintf(err, "sdx4 serve: %s: %s must be true or false, not \"%s\"\n", source,
                o->name, text);
        return -1;
    case OPT_INT: {
        errno = 0;
        long v = strtol(text, &end, 10);
        if (end != text && !*end && !errno && v >= o->min && v <= o->max) {
            *(int *)field = (int)v;
            return 0;
        }
        break;
    }
    case OPT_DOUBLE: {
        errno = 0;
        double v = strtod(text, &end);
        if (end != text && !*end && !errno && isfinite(v) && v >= o->min && v <= o->max) {
            *(double *)field = v;
            return 0;
        }
        break;
    }
    case OPT_SIZE: {
        size_t v;
        if (parse_size(text, &v) == 0 && (double)v >= o->min && (double)v <= o->max) {
            *(size_t *)field = v;
            return 0;
        }
        break;
    }
    }
    fprintf(err, "sdx4 serve: %s: %s must be a %s from %g to %g, not \"%s\"\n", source,
            o->name, o->type == OPT_SIZE ? "size in bytes (K, M, G suffixes)" : "number",
            o->min, o->max, text);
    return -1;
}

static const option *find_option(const char *name, size_t len) {
    for (int i = 0; i < OPTION_COUNT; i++)
        if (strlen(options[i].name) == len && strncmp(options[i].name, name, len) == 0)
            return &options[i];
    return NULL;
}

/* SDX4_ + the name upper-cased with dashes as underscores. */
static void env_name(const option *o, char *buf, size_t size) {
    size_t n = (size_t)snprintf(buf, size, "SDX4_");
    for (const char *c = o->name; *c && n + 1 < size; c++)
        buf[n++] = *c == '-' ? '_' : (char)toupper((unsigned char)*c);
    buf[n] = '\0';
}

static int load_file(server_config *cfg, const char *path, FILE *err) {
    json_error_t jerr;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!json_is_object(root)) {
        fprintf(err, "sdx4 serve: %s:%d: %s\n", path, jerr.line,
                root ? "settings must be a JSON object" : jerr.text);
        json_decref(root);
        return -1;
    }
    const char *key;
    json_t *value;
    int rc = 0;
    json_object_foreach(root, key, value) {
        const option *o = find_option(key, strlen(key));
        if (!o || strcmp(key, "config") == 0) {
            fprintf(err, "sdx4 serve: %s: unknown setting \"%s\"\n", path, key);
            rc = -1;
            break;
        }
        char text[64];
        const char *s = text;
        char *joined = NULL;
        if (json_is_string(value)) s = json_string_value(value);
        else if (json_is_integer(value)) snprintf(text, sizeof text, "%lld", (long long)json_integer_value(value));
        else if (json_is_real(value)) snprintf(text, sizeof text, "%.17g", json_real_value(value));
        else if (json_is_boolean(value)) s = json_is_true(value) ? "true" : "false";
        else if (json_is_array(value) && o->type == OPT_LIST) {
            size_t i, total = 1;
            json_t *item;
            json_array_foreach(value, i, item) total += strlen(json_string_value(item) ? json_string_value(item) : "") + 1;
            joined = calloc(1, total);
            json_array_foreach(value, i, item) {
                if (i) strcat(joined, ",");
                strcat(joined, json_string_value(item) ? json_string_value(item) : "");
            }
            s = joined;
        } else {
            fprintf(err, "sdx4 serve: %s: \"%s\" has an unsupported JSON type\n", path, key);
            rc = -1;
            break;
        }
        rc = set_option(cfg, o, s, path, err);
        free(joined);
        if (rc) break;
    }
    json_decref(root);
    return rc;
}

int config_parse_dimensions(const char *text, int *width, int *height) {
    char *end;
    errno = 0;
    long w = strtol(text, &end, 10), h = w;
    if (end != text && (*end == 'x' || *end == 'X')) {
        const char *rest = end + 1;
        h = strtol(rest, &end, 10);
        if (end == rest) return -1;
    }
    if (end == text || *end || errno || w < 1 || h < 1 || w > 65536 || h > 65536) return -1;
    *width = (int)w, *height = (int)h;
    return 0;
}

/* Whether `url` names a proxy scheme libcurl speaks (a bare host:port would
 * silently mean http://). */
static bool proxy_scheme_known(const char *url) {
    static const char *const schemes[] = {"http://", "https://", "socks4://", "socks4a://", "socks5://", "socks5h://"};
    for (size_t i = 0; i < sizeof schemes / sizeof schemes[0]; i++)
        if (strncasecmp(url, schemes[i], strlen(schemes[i])) == 0 && url[strlen(schemes[i])]) return true;
    return false;
}

/* Why `path` is no file of PEM certificates, or NULL: checked at start,
 * since libcurl would only say so at each call (a wrong path, a private key
 * or a DER file given by mistake). */
static const char *ca_file_problem(const char *path) {
    FILE *f = *path ? fopen(path, "r") : NULL;
    if (!f) return *path ? strerror(errno) : "empty";
    char line[256];
    bool found = false;
    while (!found && fgets(line, sizeof line, f)) found = strncmp(line, "-----BEGIN CERTIFICATE-----", 27) == 0;
    fclose(f);
    return found ? NULL : "no PEM certificate in it (-----BEGIN CERTIFICATE-----)";
}

static int check(const server_config *cfg, FILE *err) {
    const char *bad = NULL;
    log_level level;
    const char *ca = cfg->outbound_ca_file ? ca_file_problem(cfg->outbound_ca_file) : NULL;
    if (ca) {
        fprintf(err, "sdx4 serve: outbound-ca-file %s: %s\n", cfg->outbound_ca_file, ca);
        return -1;
    }
    for (int i = 0; i < cfg->warmup_sizes.count; i++) {
        const char *item = cfg->warmup_sizes.items[i];
        int w, h;
        if (config_parse_dimensions(item, &w, &h) || w < cfg->min_side || h < cfg->min_side ||
            w > cfg->max_side || h > cfg->max_side) {
            fprintf(err, "sdx4 serve: warmup-sizes: \"%s\" must be N or WxH with sides from "
                         "min-side (%d) to max-side (%d)\n", item, cfg->min_side, cfg->max_side);
            return -1;
        }
    }
    long long default_steps = sdx4_param_find("num_inference_steps")->int_default;
    if (cfg->max_steps < default_steps) {
        fprintf(err, "sdx4 serve: max-steps must allow the default of %lld steps\n", default_steps);
        return -1;
    }
    if (cfg->min_side > cfg->max_side) bad = "min-side is larger than max-side";
    else if (cfg->upload_budget && cfg->upload_budget < cfg->max_upload)
        bad = "upload-budget must be at least max-upload (or 0: no budget)";
    else if (cfg->models_dir && !*cfg->models_dir) bad = "models-dir is empty";
    else if (strcmp(cfg->safety_action, "refuse") && strcmp(cfg->safety_action, "blackout"))
        bad = "safety-action must be refuse or blackout";
    else if (cfg->safety_checker && !*cfg->safety_checker) bad = "safety-checker is empty";
    else if (!cfg->workers && !cfg->redis) bad = "workers 0 (an API-only node) needs --redis: its workers are elsewhere";
    else if (cfg->ready_without_workers && (cfg->workers || !cfg->redis))
        bad = "ready-without-workers is for an API-only node: --redis and --workers 0";
    else if (!cfg->log_level || log_level_parse(cfg->log_level, &level) != 0) bad = "log-level must be debug, info, warn or error";
    else if (cfg->webhook_proxy && !proxy_scheme_known(cfg->webhook_proxy))
        bad = "webhook-proxy must start with http://, https://, socks4://, socks4a://, socks5:// or socks5h://";
    else if (cfg->jwt_jwks && !(cfg->jwt_issuer && *cfg->jwt_issuer && cfg->jwt_audience && *cfg->jwt_audience))
        bad = "jwt-jwks needs jwt-issuer and jwt-audience";
    else if (!cfg->jwt_jwks && (cfg->jwt_issuer || cfg->jwt_audience))
        bad = "jwt-issuer and jwt-audience need jwt-jwks";
    else if (!cfg->tls_cert != !cfg->tls_key) bad = "tls-cert and tls-key go together: give both or neither";
    else if (cfg->hsts && !cfg->tls_cert) bad = "hsts needs tls-cert and tls-key (browsers ignore it over plain HTTP)";
    else if (!cfg->s3_bucket && (cfg->s3_endpoint || cfg->s3_region || cfg->s3_prefix))
        bad = "s3-endpoint, s3-region and s3-prefix need s3-bucket";
    if (!bad) return 0;
    fprintf(err, "sdx4 serve: %s\n", bad);
    return -1;
}

/* The model folder served when the settings name none. */
static int default_model(server_config *cfg) {
    if (cfg->models.count || cfg->models_dir) return 0;
    return list_parse(&cfg->models, "models/x4-upscaler");
}

int config_load(server_config *cfg, int argc, char **argv, FILE *err) {
    memset(cfg, 0, sizeof *cfg);
    bool flagged[OPTION_COUNT] = {false}; /* a list flag given again adds to the list */
    for (int i = 0; i < OPTION_COUNT; i++)
        if (options[i].fallback && set_option(cfg, &options[i], options[i].fallback, "default", err))
            return -1;

    /* the settings file comes first so that env and flags override it */
    const char *file = getenv("SDX4_CONFIG");
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            config_print_help(stdout);
            return 1;
        }
        if (strcmp(argv[i], "--config") == 0 && i + 1 < argc) file = argv[i + 1];
        else if (strncmp(argv[i], "--config=", 9) == 0) file = argv[i] + 9;
    }
    if (file && *file && load_file(cfg, file, err)) return -1;

    for (int i = 0; i < OPTION_COUNT; i++) {
        char name[64];
        env_name(&options[i], name, sizeof name);
        const char *v = getenv(name);
        if (v && set_option(cfg, &options[i], v, name, err)) return -1;
    }

    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "--", 2) != 0) {
            fprintf(err, "sdx4 serve: unexpected argument \"%s\" (see --help)\n", arg);
            return -1;
        }
        const char *name = arg + 2, *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        const char *value = eq ? eq + 1 : NULL;
        if (len == 6 && strncmp(name, "config", 6) == 0) {
            if (!value) i++;
            continue;
        }
        const option *o = find_option(name, len);
        if (!o) {
            fprintf(err, "sdx4 serve: unknown option \"%s\" (see --help)\n", arg);
            return -1;
        }
        if (!value && o->type == OPT_BOOL && (i + 1 >= argc || strncmp(argv[i + 1], "--", 2) == 0))
            value = "true"; /* a bare boolean flag turns it on */
        if (!value) {
            if (i + 1 >= argc) {
                fprintf(err, "sdx4 serve: %s needs a value\n", arg);
                return -1;
            }
            value = argv[++i];
        }
        size_t which = (size_t)(o - options);
        if (o->type == OPT_LIST && flagged[which]) {
            if (list_append((string_list *)((char *)cfg + o->offset), value)) return -1;
        } else if (set_option(cfg, o, value, "flag", err)) {
            return -1;
        }
        flagged[which] = true;
    }
    if (default_model(cfg)) return -1;
    char plans[4096];
    if (!cfg->plan_cache && sdx4_default_plan_cache(plans, sizeof plans) && !(cfg->plan_cache = strdup(plans)))
        return -1;
    return check(cfg, err);
}

void config_free(server_config *cfg) {
    for (int i = 0; i < OPTION_COUNT; i++) {
        void *field = (char *)cfg + options[i].offset;
        if (options[i].type == OPT_STRING) free(*(char **)field);
        else if (options[i].type == OPT_LIST) list_free(field);
    }
    memset(cfg, 0, sizeof *cfg);
}

void config_print_help(FILE *out) {
    fprintf(out,
            "usage: sdx4 serve [--model DIR]... [--models-dir DIR] [--host ADDR] [--port N] [options]\n"
            "\n"
            "Serves the upscaling API (see /docs and /openapi.json once running).\n"
            "Each option --name VALUE can also be set by the environment variable\n"
            "SDX4_NAME (dashes as underscores) or by the key \"name\" of a JSON file\n"
            "given by --config FILE or SDX4_CONFIG; flags win over the environment,\n"
            "which wins over the file. Booleans: true/false, on/off, 1/0. A list\n"
            "flag (A,B,...) given more than once adds to the list.\n"
            "\n"
            "  --config FILE\n      JSON settings file\n");
    for (int i = 0; i < OPTION_COUNT; i++) {
        const option *o = &options[i];
        char env[64];
        env_name(o, env, sizeof env);
        static const char *const metavar[] = {"TEXT", "N", "X", "SIZE", "BOOL", "A,B,..."};
        fprintf(out, "  --%s %s  (%s)\n      %s", o->name, metavar[o->type], env, o->help);
        if (o->fallback) fprintf(out, " [default: %s]", o->fallback);
        fputc('\n', out);
    }
}

const char *config_content_check(const server_config *cfg) {
    return cfg->safety_checker ? cfg->safety_action : "";
}

void config_engine_options(const server_config *cfg, const char *model_dir, sdx4_engine_options *o) {
    sdx4_engine_options_default(o);
    o->model_dir = model_dir;
    o->variant = cfg->variant;
    o->device = cfg->device;
    o->threads = cfg->threads;
    o->cuda = (sdx4_cuda_options){.dtype = cfg->cuda_dtype, .vae = cfg->cuda_vae,
                                  .conv = cfg->cuda_conv, .no_graphs = !cfg->cuda_graph,
                                  .no_plans = !cfg->cuda_plan, .profile = cfg->cuda_profile,
                                  .plan_cache = cfg->plan_cache};
    o->cpu = (sdx4_cpu_options){.dtype = cfg->cpu_dtype};
}
