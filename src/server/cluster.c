/*
 * cluster.c - cluster mode's protocol over Redis (see cluster.h).
 *
 * Records. A task travels as one JSON object, and its parameters
 * (upscale_options) are written and read through one table of their names,
 * types and offsets: a parameter added to the table travels, one missing
 * from it cannot travel half-way. Reading is strict: a record that lacks
 * a field, or has one of the wrong type or out of range, is refused with
 * the field's name, so a worker of another version fails the task with a
 * reason instead of running it with a default.
 *
 * Atomicity. Every change that must be all-or-nothing, or compared before
 * it is made, is one Lua script (EVAL): Redis runs a script alone, so no
 * other node sees half of it. Submit checks the cluster-wide bound and
 * writes the job, inputs and stream entries together; finish is a
 * compare-and-set of a task's state, with the result stored, the budget
 * enforced, the change published and the job closed in the same step.
 *
 * Counting what waits. Workers XACK and XDEL an entry together once its
 * task is final, and a cancel deletes only entries no worker holds, so
 * the stream holds exactly the waiting and the in-flight entries: waiting
 * = XLEN - the pending count of the group, both read inside the script.
 * For the same reason the work ahead of a submit is the sum of the
 * estimates its entries carry (the running ones' less what they ran),
 * read inside the script too: no counter to drift when a node dies.
 *
 * Results' budget. Each stored result is a member "<key> <bytes>" of a
 * sorted set scored by its expiry, and their sum is a counter; the finish
 * script drops expired members (their keys are gone by TTL) and evicts
 * the oldest while the sum is over the budget. The scripts build keys of
 * stored results from the members, which holds on one Redis (not Redis
 * Cluster, whose scripts must name every key in KEYS).
 */
#include "cluster.h"

#include <math.h>
#include <stdarg.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "base64.h"
#include "server.h"

#define INPUT_MARGIN 60.0 /* seconds an input outlives its deadline: a late reclaim still finds it */

/* ---- keys ------------------------------------------------------------------- */

static void key(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void key(char *buf, size_t size, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, size, fmt, ap);
    va_end(ap);
}

/* A TTL in whole seconds, at least 1 (EX 0 is an error, and a job whose
 * retention is 0 must still be seen final by whoever waits on it). */
static long long ttl_of(double seconds) {
    return seconds < 1 ? 1 : seconds > 1e9 ? 1000000000LL : (long long)ceil(seconds);
}

/* ---- names ------------------------------------------------------------------- */

static const char *const kind_names[] = {"upscale", "job", "batch"};
static const char *const state_names[] = {"queued", "running", "succeeded", "failed", "canceled"};
static const char *const stop_names[] = {"", "client", "timeout", "shutdown"};

static int name_index(const char *const *names, int n, const char *name) {
    for (int i = 0; name && i < n; i++)
        if (strcmp(names[i], name) == 0) return i;
    return -1;
}

static problem_kind problem_from_slug(const char *slug) {
    for (int k = 1; k < PROBLEM_KIND_COUNT; k++)
        if (strcmp(problem_slug(k), slug) == 0) return k;
    return PROBLEM_NONE;
}

/* ---- reading JSON strictly ----------------------------------------------------- */

typedef struct {
    char *err;
    size_t size;
    const char *what; /* "record", "state", "meta" */
} reader;

static int refuse(reader *r, const char *field, const char *expected) {
    snprintf(r->err, r->size, "%s: \"%s\" %s", r->what, field, expected);
    return -1;
}

static int get_number(reader *r, const json_t *o, const char *name, double min, double max, double *out) {
    const json_t *v = json_object_get(o, name);
    if (!json_is_number(v)) return refuse(r, name, "must be a number");
    double d = json_number_value(v);
    if (!(d >= min && d <= max)) return refuse(r, name, "is out of range");
    *out = d;
    return 0;
}

static int get_int(reader *r, const json_t *o, const char *name, long long min, long long max, long long *out) {
    const json_t *v = json_object_get(o, name);
    if (!json_is_integer(v)) return refuse(r, name, "must be an integer");
    long long i = json_integer_value(v);
    if (i < min || i > max) return refuse(r, name, "is out of range");
    *out = i;
    return 0;
}

/* A string into `buf` (`size` bytes with its NUL), or NULL when null is allowed. */
static int get_text(reader *r, const json_t *o, const char *name, char *buf, size_t size) {
    const json_t *v = json_object_get(o, name);
    if (!json_is_string(v)) return refuse(r, name, "must be a string");
    if (json_string_length(v) >= size || strlen(json_string_value(v)) != json_string_length(v))
        return refuse(r, name, "is too long or holds a NUL");
    memcpy(buf, json_string_value(v), json_string_length(v) + 1);
    return 0;
}

static int get_bool(reader *r, const json_t *o, const char *name, bool *out) {
    const json_t *v = json_object_get(o, name);
    if (!json_is_boolean(v)) return refuse(r, name, "must be true or false");
    *out = json_is_true(v);
    return 0;
}

static int get_name(reader *r, const json_t *o, const char *name, const char *const *names, int n, int *out) {
    const json_t *v = json_object_get(o, name);
    int i = json_is_string(v) ? name_index(names, n, json_string_value(v)) : -1;
    if (i < 0) return refuse(r, name, "is not a known name");
    *out = i;
    return 0;
}

static bool is_job_id(const char *id) {
    size_t n = strlen(id);
    if (n != 32) return false;
    for (size_t i = 0; i < n; i++)
        if (!((id[i] >= '0' && id[i] <= '9') || (id[i] >= 'a' && id[i] <= 'f'))) return false;
    return true;
}

/* ---- the upscale parameters: one table ------------------------------------------- */

typedef enum { PARAM_TEXT, PARAM_REAL, PARAM_INT, PARAM_SEED, PARAM_FORMAT, PARAM_BITS, PARAM_CHOICE, PARAM_FLAG } param_type;

/* A parameter of the engine travels under the name of its row of
 * sdx4_params and is held to that row's range; "steps" keeps the name
 * records have always had. */
static const struct {
    const char *engine; /* its row of sdx4_params, or NULL: the server's own */
    const char *name;   /* the record's name where it is not the row's */
    param_type type;
    size_t offset;
    double min, max; /* the server's own PARAM_INT */
} params[] = {
#define P(field) offsetof(upscale_options, field)
    {"prompt", NULL, PARAM_TEXT, P(prompt), 0, 0},
    {"negative_prompt", NULL, PARAM_TEXT, P(negative_prompt), 0, 0},
    {"noise_level", NULL, PARAM_REAL, P(noise_level), 0, 0},
    {"num_inference_steps", "steps", PARAM_INT, P(steps), 0, 0},
    {"guidance_scale", NULL, PARAM_REAL, P(guidance_scale), 0, 0},
    {"eta", NULL, PARAM_REAL, P(eta), 0, 0},
    {"seed", NULL, PARAM_SEED, P(seed), 0, 0},
    {"scheduler", NULL, PARAM_TEXT, P(scheduler), 0, 0},
    {"scheduler_options", NULL, PARAM_TEXT, P(scheduler_options), 0, 0},
    {"vae_tiling", NULL, PARAM_CHOICE, P(vae_tiling), 0, 0}, /* null: the default */
    {"tile", NULL, PARAM_INT, P(tile), 0, 0},
    {"tile_overlap", NULL, PARAM_INT, P(tile_overlap), 0, 0},
    {NULL, "format", PARAM_FORMAT, P(format), 0, 0},
    {NULL, "quality", PARAM_INT, P(quality), 0, 100}, /* 0: the encoder's default */
    /* the resize after the model (a1111.c): 0 none; imageio's largest side */
    {NULL, "resize_width", PARAM_INT, P(resize_width), 0, 16384},
    {NULL, "resize_height", PARAM_INT, P(resize_height), 0, 16384},
    {NULL, "crop_width", PARAM_INT, P(crop_width), 0, 16384},
    {NULL, "crop_height", PARAM_INT, P(crop_height), 0, 16384},
    /* absent from records of earlier versions: false (a worker of such a
     * version refuses a record asking for it: its bit is past their given) */
    {NULL, "metadata", PARAM_FLAG, P(metadata), 0, 0},
    {NULL, "given", PARAM_BITS, P(given), 0, 0},
#undef P
};

static const char *param_name(size_t i) { return params[i].name ? params[i].name : params[i].engine; }

static void param_range(size_t i, double *min, double *max) {
    const sdx4_param *p = params[i].engine ? sdx4_param_find(params[i].engine) : NULL;
    if (!p) *min = params[i].min, *max = params[i].max;
    else if (p->type == SDX4_PARAM_REAL) *min = p->real_min, *max = p->real_max;
    else *min = (double)p->int_min, *max = (double)p->int_max;
}

static json_t *options_to_json(const upscale_options *o) {
    json_t *j = json_object();
    for (size_t i = 0; i < sizeof params / sizeof params[0]; i++) {
        const void *f = (const char *)o + params[i].offset;
        json_t *v = NULL;
        switch (params[i].type) {
        case PARAM_TEXT:
        case PARAM_CHOICE: v = *(char *const *)f ? json_string(*(char *const *)f) : json_null(); break;
        case PARAM_REAL: v = json_real(*(const double *)f); break;
        case PARAM_INT: v = json_integer(*(const int *)f); break;
        case PARAM_SEED: v = json_integer((json_int_t)*(const uint64_t *)f); break;
        case PARAM_FORMAT: v = json_string(imageio_format_name(*(const image_format *)f)); break;
        case PARAM_FLAG: v = json_boolean(*(const bool *)f); break;
        case PARAM_BITS: /* the options' bits: a form marks its other fields there too */
            v = json_integer(*(const unsigned *)f & ((1u << FIELD_OPTION_COUNT) - 1));
            break;
        }
        json_object_set_new(j, param_name(i), v);
    }
    return j;
}

static int options_from_json(reader *r, const json_t *j, upscale_options *o) {
    if (!json_is_object(j)) return refuse(r, "options", "must be an object");
    for (size_t i = 0; i < sizeof params / sizeof params[0]; i++) {
        void *f = (char *)o + params[i].offset;
        const char *name = param_name(i);
        const json_t *v = json_object_get(j, name);
        long long n;
        double min, max;
        param_range(i, &min, &max);
        switch (params[i].type) {
        case PARAM_TEXT:
            if (json_is_null(v)) break;
            if (!json_is_string(v) || strlen(json_string_value(v)) != json_string_length(v))
                return refuse(r, name, "must be a string without NUL");
            if (!(*(char **)f = strdup(json_string_value(v)))) return refuse(r, name, "does not fit in memory");
            break;
        case PARAM_REAL:
            if (get_number(r, j, name, min, max, f)) return -1;
            break;
        case PARAM_INT:
            if (get_int(r, j, name, (long long)min, (long long)max, &n)) return -1;
            *(int *)f = (int)n;
            break;
        case PARAM_SEED:
            if (get_int(r, j, name, 0, sdx4_param_find("seed")->int_max, &n)) return -1;
            *(uint64_t *)f = (uint64_t)n;
            break;
        case PARAM_FORMAT: {
            image_format fmt = json_is_string(v) ? imageio_format_from_name(json_string_value(v)) : IMAGE_UNKNOWN;
            if (fmt == IMAGE_UNKNOWN) return refuse(r, name, "must be png, jpeg or webp");
            *(image_format *)f = fmt;
            break;
        }
        case PARAM_FLAG:
            if (v && get_bool(r, j, name, (bool *)f)) return -1;
            break;
        case PARAM_BITS:
            if (get_int(r, j, name, 0, (1 << FIELD_OPTION_COUNT) - 1, &n)) return -1;
            *(unsigned *)f = (unsigned)n;
            break;
        case PARAM_CHOICE: {
            if (json_is_null(v)) break;
            const char *const *c = sdx4_param_find(params[i].engine)->choices;
            while (*c && (!json_is_string(v) || strcmp(*c, json_string_value(v)))) c++;
            if (!*c) return refuse(r, name, "must be null or one of the engine's choices");
            if (!(*(char **)f = strdup(*c))) return refuse(r, name, "does not fit in memory");
            break;
        }
        }
    }
    return 0;
}

/* ---- task records ------------------------------------------------------------ */

void cluster_task_free(cluster_task *t) {
    if (!t) return;
    options_free(&t->opts);
    free(t->icc);
    t->icc = NULL, t->icc_len = 0;
}

static void hex(const uint8_t *bytes, size_t n, char *out) {
    for (size_t i = 0; i < n; i++) snprintf(out + 2 * i, 3, "%02x", bytes[i]);
}

static int unhex(const char *s, uint8_t *bytes, size_t n) {
    if (strlen(s) != 2 * n) return -1;
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1) return -1;
        bytes[i] = (uint8_t)v;
    }
    return 0;
}

json_t *cluster_task_to_json(const cluster_task *t) {
    char cache_key[65];
    hex(t->cache_key, sizeof t->cache_key, cache_key);
    json_t *record = json_pack("{s:s,s:i,s:s,s:s,s:s,s:s,s:f,s:f,s:i,s:i,s:s,s:b,s:o,s:s}", "job", t->job_id, "index",
                     t->index, "kind", kind_names[t->kind], "client", t->client, "request_id", t->request_id,
                     "owner", t->owner, "created", t->created, "deadline", t->deadline, "width", t->width,
                     "height", t->height, "cache_key", cache_key, "cacheable", t->cacheable, "options",
                     options_to_json(&t->opts), "model", t->model);
    if (record && t->content_check[0]) json_object_set_new(record, "content_check", json_string(t->content_check));
    if (record && t->icc) { /* only where the output keeps it (metadata) */
        char *b64 = base64_encode(t->icc, t->icc_len, NULL);
        if (!b64 || json_object_set_new(record, "icc", json_string(b64))) json_decref(record), record = NULL;
        free(b64);
    }
    return record;
}

int cluster_task_from_json(const json_t *record, cluster_task *t, char *err, size_t err_size) {
    memset(t, 0, sizeof *t);
    reader r = {err, err_size, "task record"};
    if (!json_is_object(record)) return refuse(&r, "(whole)", "must be a JSON object");
    long long index, width, height;
    int kind;
    char cache_key[65];
    if (get_text(&r, record, "job", t->job_id, sizeof t->job_id)) return -1;
    if (!is_job_id(t->job_id)) return refuse(&r, "job", "must be 32 hexadecimal digits");
    if (get_int(&r, record, "index", 0, FORM_MAX_IMAGES - 1, &index) ||
        get_name(&r, record, "kind", kind_names, 3, &kind) ||
        get_text(&r, record, "client", t->client, sizeof t->client) ||
        get_text(&r, record, "request_id", t->request_id, sizeof t->request_id) ||
        get_text(&r, record, "owner", t->owner, sizeof t->owner) ||
        get_number(&r, record, "created", 0, 1e11, &t->created) ||
        get_number(&r, record, "deadline", 0, 1e11, &t->deadline) ||
        get_int(&r, record, "width", 1, 65536, &width) || get_int(&r, record, "height", 1, 65536, &height) ||
        get_text(&r, record, "cache_key", cache_key, sizeof cache_key) ||
        get_bool(&r, record, "cacheable", &t->cacheable))
        return -1;
    if (unhex(cache_key, t->cache_key, sizeof t->cache_key)) return refuse(&r, "cache_key", "must be 64 hexadecimal digits");
    /* absent from an API node of an earlier version, which served one model: the worker's default */
    if (json_object_get(record, "model") && get_text(&r, record, "model", t->model, sizeof t->model)) return -1;
    if (json_object_get(record, "content_check") && /* absent: none asked */
        get_text(&r, record, "content_check", t->content_check, sizeof t->content_check))
        return -1;
    t->index = (int)index, t->kind = (form_kind)kind, t->width = (int)width, t->height = (int)height;
    if (options_from_json(&r, json_object_get(record, "options"), &t->opts)) {
        cluster_task_free(t);
        return -1;
    }
    const json_t *icc = json_object_get(record, "icc"); /* absent: none */
    if (icc && (!json_is_string(icc) ||
                !(t->icc = base64_decode(json_string_value(icc), json_string_length(icc), &t->icc_len)))) {
        cluster_task_free(t);
        return refuse(&r, "icc", "must be base64");
    }
    return 0;
}

/* ---- task states --------------------------------------------------------------- */

static bool final_state(job_state s) { return s >= JOB_SUCCEEDED; }

json_t *cluster_state_to_json(const cluster_task_state *s) {
    const sdx4_upscale_report *rp = &s->report;
    json_t *j = json_pack("{s:s,s:i,s:i,s:f,s:f,s:i,s:i,s:I,s:b,s:s}", "state", state_names[s->state], "step",
                          s->step, "total", s->total, "started", s->started, "finished", s->finished, "width",
                          s->width, "height", s->height, "bytes", (json_int_t)s->bytes, "stored", s->stored,
                          "worker", s->worker);
    if (s->model_hash[0]) json_object_set_new(j, "model_hash", json_string(s->model_hash));
    if (s->content_check[0]) json_object_set_new(j, "content_check", json_string(s->content_check));
    json_object_set_new(j, "compute_s", json_real(s->compute));
    json_object_set_new(j, "report",
                        json_pack("{s:i,s:i,s:i,s:i,s:f,s:f,s:f}", "noise_level", rp->noise_level, "prompt_tokens",
                                  rp->prompt_tokens, "prompt_truncated", rp->prompt_truncated,
                                  "negative_truncated", rp->negative_truncated, "seconds_text", rp->seconds_text,
                                  "seconds_unet", rp->seconds_unet, "seconds_vae", rp->seconds_vae));
    const problem *p = &s->error;
    if (p->kind)
        json_object_set_new(j, "error",
                            json_pack("{s:s,s:s,s:s,s:s,s:f,s:f,s:i}", "kind", problem_slug(p->kind), "detail",
                                      p->detail, "field", p->field, "allowed", p->allowed, "estimated_seconds",
                                      p->estimated_seconds, "limit_seconds", p->limit_seconds, "retry_after",
                                      p->retry_after));
    return j;
}

int cluster_state_from_json(const json_t *j, cluster_task_state *s) {
    char ignored[256];
    reader r = {ignored, sizeof ignored, "state"};
    memset(s, 0, sizeof *s);
    int state;
    long long step, total, width, height, bytes, v[4];
    double secs[3];
    if (!json_is_object(j) || get_name(&r, j, "state", state_names, 5, &state) ||
        /* a tiled upscale's progress counts UNet calls: steps x calls */
        get_int(&r, j, "step", 0, INT_MAX, &step) || get_int(&r, j, "total", 0, INT_MAX, &total) ||
        get_number(&r, j, "started", 0, 1e11, &s->started) ||
        get_number(&r, j, "finished", 0, 1e11, &s->finished) || get_int(&r, j, "width", 0, 1 << 20, &width) ||
        get_int(&r, j, "height", 0, 1 << 20, &height) || get_int(&r, j, "bytes", 0, 1LL << 50, &bytes) ||
        get_bool(&r, j, "stored", &s->stored) || get_text(&r, j, "worker", s->worker, sizeof s->worker))
        return -1;
    s->state = (job_state)state, s->step = (int)step, s->total = (int)total;
    s->width = (int)width, s->height = (int)height, s->bytes = (size_t)bytes;
    const json_t *hash = json_object_get(j, "model_hash"); /* absent from earlier versions' records */
    if (hash && (!json_is_string(hash) || json_string_length(hash) >= sizeof s->model_hash)) return -1;
    snprintf(s->model_hash, sizeof s->model_hash, "%s", hash ? json_string_value(hash) : "");
    const json_t *check = json_object_get(j, "content_check"); /* absent: no check (or an earlier version) */
    if (check && (!json_is_string(check) || json_string_length(check) >= sizeof s->content_check)) return -1;
    snprintf(s->content_check, sizeof s->content_check, "%s", check ? json_string_value(check) : "");
    s->compute = -1; /* absent: an earlier version's state */
    if (json_object_get(j, "compute_s") && get_number(&r, j, "compute_s", 0, 1e9, &s->compute)) return -1;
    const json_t *rp = json_object_get(j, "report");
    if (!json_is_object(rp) || get_int(&r, rp, "noise_level", 0, 1 << 20, &v[0]) ||
        get_int(&r, rp, "prompt_tokens", 0, 1 << 20, &v[1]) || get_int(&r, rp, "prompt_truncated", 0, 1, &v[2]) ||
        get_int(&r, rp, "negative_truncated", 0, 1, &v[3]) ||
        get_number(&r, rp, "seconds_text", 0, 1e9, &secs[0]) ||
        get_number(&r, rp, "seconds_unet", 0, 1e9, &secs[1]) || get_number(&r, rp, "seconds_vae", 0, 1e9, &secs[2]))
        return -1;
    s->report = (sdx4_upscale_report){.noise_level = (int)v[0], .prompt_tokens = (int)v[1],
                                      .prompt_truncated = (int)v[2], .negative_truncated = (int)v[3],
                                      .seconds_text = secs[0], .seconds_unet = secs[1], .seconds_vae = secs[2]}; /* vae_tiles: not in the state */
    const json_t *e = json_object_get(j, "error");
    if (!e) return 0;
    problem *p = &s->error;
    long long retry;
    if (!json_is_object(e) || !json_is_string(json_object_get(e, "kind")) ||
        !(p->kind = problem_from_slug(json_string_value(json_object_get(e, "kind")))) ||
        get_text(&r, e, "detail", p->detail, sizeof p->detail) || get_text(&r, e, "field", p->field, sizeof p->field) ||
        get_text(&r, e, "allowed", p->allowed, sizeof p->allowed) ||
        get_number(&r, e, "estimated_seconds", 0, 1e12, &p->estimated_seconds) ||
        get_number(&r, e, "limit_seconds", 0, 1e12, &p->limit_seconds) ||
        get_int(&r, e, "retry_after", 0, 1 << 30, &retry))
        return -1;
    p->retry_after = (int)retry;
    return 0;
}

/* ---- job meta ------------------------------------------------------------------- */

static json_t *meta_to_json(const cluster_job *job) {
    return json_pack("{s:s,s:s,s:b,s:s,s:s,s:s,s:f,s:f,s:i,s:o,s:s}", "id", job->id, "kind", kind_names[job->kind],
                     "listed", job->listed, "client", job->client, "request_id", job->request_id, "owner",
                     job->owner, "created", job->created, "deadline", job->deadline, "ntasks", job->ntasks,
                     "webhook_url", job->webhook_url ? json_string(job->webhook_url) : json_null(), "model",
                     job->model);
}

static int meta_from_json(const json_t *j, cluster_job *job, char *err, size_t err_size) {
    reader r = {err, err_size, "job meta"};
    memset(job, 0, sizeof *job);
    int kind;
    long long ntasks;
    if (!json_is_object(j)) return refuse(&r, "(whole)", "must be a JSON object");
    if (get_text(&r, j, "id", job->id, sizeof job->id) || get_name(&r, j, "kind", kind_names, 3, &kind) ||
        get_bool(&r, j, "listed", &job->listed) || get_text(&r, j, "client", job->client, sizeof job->client) ||
        get_text(&r, j, "request_id", job->request_id, sizeof job->request_id) ||
        get_text(&r, j, "owner", job->owner, sizeof job->owner) ||
        get_number(&r, j, "created", 0, 1e11, &job->created) ||
        get_number(&r, j, "deadline", 0, 1e11, &job->deadline) ||
        get_int(&r, j, "ntasks", 1, FORM_MAX_IMAGES, &ntasks))
        return -1;
    job->kind = (form_kind)kind, job->ntasks = (int)ntasks;
    if (json_object_get(j, "model") && get_text(&r, j, "model", job->model, sizeof job->model)) return -1;
    const json_t *hook = json_object_get(j, "webhook_url");
    if (json_is_string(hook) && !(job->webhook_url = strdup(json_string_value(hook))))
        return refuse(&r, "webhook_url", "does not fit in memory");
    if (hook && !json_is_string(hook) && !json_is_null(hook)) return refuse(&r, "webhook_url", "must be a string or null");
    return 0;
}

static const char *const webhook_names[] = {"pending", "delivered", "failed"};

/* A webhook's delivery ({status, attempts, error}) into its fields. */
static bool webhook_from_json(const json_t *j, char *status, size_t status_size, int *attempts, char *error,
                              size_t error_size) {
    char ignored[256];
    reader r = {ignored, sizeof ignored, "webhook"};
    int which;
    long long tries;
    if (!json_is_object(j) || get_name(&r, j, "status", webhook_names, 3, &which) ||
        get_int(&r, j, "attempts", 0, 1000000, &tries) || get_text(&r, j, "error", error, error_size))
        return false;
    snprintf(status, status_size, "%s", webhook_names[which]);
    *attempts = (int)tries;
    return true;
}

/* A delivery's JSON into its fields; false when it is not one. */
static bool webhook_from_text(const char *text, size_t len, char *status, size_t status_size, int *attempts,
                              char *error, size_t error_size) {
    json_t *j = json_loadb(text, len, 0, NULL);
    bool ok = webhook_from_json(j, status, status_size, attempts, error, error_size);
    json_decref(j);
    return ok;
}

void cluster_job_free(cluster_job *job) {
    if (!job) return;
    free(job->webhook_url);
    job->webhook_url = NULL;
}

/* ---- scripts --------------------------------------------------------------------- */

/* Shared by the scripts: whether a task's state (JSON) is final, and the
 * final state of a job whose tasks all are (jobs.c's rule: canceled over
 * failed over succeeded; a batch that ran to its end succeeded unless one
 * of its images ran out of time). */
#define LUA_COMMON                                                                               \
    "local function final(state)\n"                                                              \
    "  local s = cjson.decode(state).state\n"                                                    \
    "  return s == 'succeeded' or s == 'failed' or s == 'canceled'\n"                            \
    "end\n"                                                                                      \
    "local function job_state(job)\n"                                                            \
    "  local meta = cjson.decode(redis.call('HGET', job, 'meta'))\n"                             \
    "  local state, expired = 'succeeded', false\n"                                              \
    "  for i = 0, meta.ntasks - 1 do\n"                                                          \
    "    local t = cjson.decode(redis.call('HGET', job, 'task:' .. i))\n"                        \
    "    if t.state == 'canceled' then state = 'canceled'\n"                                     \
    "    elseif t.state == 'failed' and state ~= 'canceled' then state = 'failed' end\n"         \
    "    if t.error and t.error.kind == 'timeout' then expired = true end\n"                     \
    "  end\n"                                                                                    \
    "  if meta.kind == 'batch' and state == 'failed' and not expired then state = 'succeeded' end\n" \
    "  return state\n"                                                                           \
    "end\n"                                                                                      \
    "local function waiting(stream, group)\n"                                                    \
    "  local pending = redis.pcall('XPENDING', stream, group)\n"                                 \
    "  return redis.call('XLEN', stream) - (type(pending[1]) == 'number' and pending[1] or 0)\n" \
    "end\n"

/* The seconds of work in the stream, alone on a device: every entry
 * (waiting or running: acknowledged ones are deleted) carries its
 * estimate, and a running one counts what is left of it since its task
 * started (its state in the job's hash). Entries of workers without an
 * estimator carry none and count 0. */
#define LUA_BACKLOG                                                                                \
    "local function backlog(stream, group, now)\n"                                                 \
    "  local held, total = {}, 0\n"                                                               \
    "  local summary = redis.pcall('XPENDING', stream, group)\n"                                  \
    "  if type(summary[1]) == 'number' and summary[1] > 0 then\n"                                 \
    "    for _, p in ipairs(redis.call('XPENDING', stream, group, '-', '+', summary[1])) do\n"    \
    "      held[p[1]] = true\n"                                                                   \
    "    end\n"                                                                                   \
    "  end\n"                                                                                     \
    "  for _, e in ipairs(redis.call('XRANGE', stream, '-', '+')) do\n"                           \
    "    local f = {}\n"                                                                          \
    "    for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end\n"                                   \
    "    local estimate = tonumber(f.estimate) or 0\n"                                            \
    "    if held[e[1]] and estimate > 0 and f.job and f.task then\n"                              \
    "      local state = redis.call('HGET', 'sdx4:job:' .. f.job, 'task:' .. f.task)\n"           \
    "      local started = state and cjson.decode(state).started or 0\n"                          \
    "      if started > 0 then estimate = math.max(0, estimate - (now - started)) end\n"          \
    "    end\n"                                                                                   \
    "    total = total + estimate\n"                                                              \
    "  end\n"                                                                                     \
    "  return total\n"                                                                            \
    "end\n"

/* KEYS: stream, job hash, then the inputs of the queued tasks.
 * ARGV: group, capacity, job TTL, input TTL, job id, meta, ntasks,
 * unfinished, finished (wall), the ntasks states, then index, record,
 * pixels and estimate of each queued task, then the devices serving the
 * cluster (0: no time check) and the seconds left to the job's deadline.
 * Returns {1, waiting}, or refused: {0, waiting} over capacity, {2,
 * seconds until the job's last task would end} too late. The backlog
 * is shared evenly by the devices (each worker one, whatever its threads:
 * they share its device), and no task ends before its own estimate. */
static const char submit_script[] = LUA_COMMON LUA_BACKLOG
    "redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')\n"
    "local queued = #KEYS - 2\n"
    "local ahead = waiting(KEYS[1], ARGV[1])\n"
    "if ahead + queued > tonumber(ARGV[2]) then return {0, ahead} end\n"
    "local ntasks = tonumber(ARGV[7])\n"
    "local after = 10 + ntasks + 4 * queued\n"
    "local devices, left = tonumber(ARGV[after]), tonumber(ARGV[after + 1])\n"
    "local mine, longest = 0, 0\n"
    "for q = 1, queued do\n"
    "  local e = tonumber(ARGV[10 + ntasks + 4 * q - 1])\n"
    "  mine, longest = mine + e, math.max(longest, e)\n"
    "end\n"
    "if devices > 0 and mine > 0 then\n"
    "  local finish = math.max((backlog(KEYS[1], ARGV[1], tonumber(ARGV[9])) + mine) / devices, longest)\n"
    "  if finish > left then return {2, tostring(finish)} end\n"
    "end\n"
    "redis.call('HSET', KEYS[2], 'meta', ARGV[6], 'unfinished', ARGV[8])\n"
    "for i = 0, ntasks - 1 do redis.call('HSET', KEYS[2], 'task:' .. i, ARGV[10 + i]) end\n"
    "local a = 10 + ntasks\n"
    "for q = 1, queued do\n"
    "  redis.call('SET', KEYS[2 + q], ARGV[a + 2], 'EX', ARGV[4])\n"
    "  local id = redis.call('XADD', KEYS[1], '*', 'job', ARGV[5], 'task', ARGV[a], 'record', ARGV[a + 1],\n"
    "                        'estimate', ARGV[a + 3])\n"
    "  redis.call('HSET', KEYS[2], 'entry:' .. ARGV[a], id)\n"
    "  a = a + 4\n"
    "end\n"
    "if tonumber(ARGV[8]) == 0 then\n" /* every task answered before submission */
    "  redis.call('HSET', KEYS[2], 'state', job_state(KEYS[2]), 'finished', ARGV[9])\n"
    "end\n"
    "redis.call('EXPIRE', KEYS[2], ARGV[3])\n"
    "return {1, ahead}\n";

/* KEYS: job hash, result, results set, results byte count, input.
 * ARGV: index, state, channel, event, has result ("1"/"0"), result,
 * retention TTL, budget, now (wall). Returns 0 already final (or no such
 * job), 1 finished the task, 2 and the job. */
static const char finish_script[] = LUA_COMMON
    "local cur = redis.call('HGET', KEYS[1], 'task:' .. ARGV[1])\n"
    "if not cur or final(cur) then return 0 end\n"
    "redis.call('DEL', KEYS[5])\n"
    "if ARGV[5] == '1' then\n"
    "  local now = tonumber(ARGV[9])\n"
    "  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do\n" /* gone by TTL */
    "    redis.call('DECRBY', KEYS[4], string.match(m, ' (%d+)$'))\n"
    "  end\n"
    "  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)\n"
    "  redis.call('SET', KEYS[2], ARGV[6], 'EX', ARGV[7])\n"
    "  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[7]), KEYS[2] .. ' ' .. #ARGV[6])\n"
    "  local total = redis.call('INCRBY', KEYS[4], #ARGV[6])\n"
    "  while total > tonumber(ARGV[8]) do\n" /* evict the oldest */
    "    local oldest = redis.call('ZPOPMIN', KEYS[3])\n"
    "    if #oldest == 0 then break end\n"
    "    local k, bytes = string.match(oldest[1], '^(.*) (%d+)$')\n"
    "    redis.call('DEL', k)\n"
    "    total = redis.call('DECRBY', KEYS[4], bytes)\n"
    "  end\n"
    "end\n"
    "redis.call('HSET', KEYS[1], 'task:' .. ARGV[1], ARGV[2])\n"
    "redis.call('PUBLISH', ARGV[3], ARGV[4])\n"
    "if redis.call('HINCRBY', KEYS[1], 'unfinished', -1) > 0 then return 1 end\n"
    "redis.call('HSET', KEYS[1], 'state', job_state(KEYS[1]), 'finished', ARGV[9])\n"
    "redis.call('EXPIRE', KEYS[1], ARGV[7])\n"
    "return redis.call('HGETALL', KEYS[1])\n"; /* the ended job, read in the same step (cluster.h) */

/* KEYS: job hash. ARGV: index, state, channel, event. */
static const char progress_script[] = LUA_COMMON
    "local cur = redis.call('HGET', KEYS[1], 'task:' .. ARGV[1])\n"
    "if not cur or final(cur) then return 0 end\n"
    "redis.call('HSET', KEYS[1], 'task:' .. ARGV[1], ARGV[2])\n"
    "redis.call('PUBLISH', ARGV[3], ARGV[4])\n"
    "return 1\n";

/* KEYS: cancel key, job hash, stream. ARGV: reason, TTL, group. Deletes
 * the job's entries that no worker holds (one held is stopped through
 * the cancel key, and acked by its worker). */
static const char cancel_script[] =
    "redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])\n"
    "local fields = redis.call('HGETALL', KEYS[2])\n"
    "for i = 1, #fields, 2 do\n"
    "  if string.sub(fields[i], 1, 6) == 'entry:' then\n"
    "    local id = fields[i + 1]\n"
    "    local held = redis.pcall('XPENDING', KEYS[3], ARGV[3], id, id, 1)\n"
    "    if type(held) == 'table' and #held == 0 then redis.call('XDEL', KEYS[3], id) end\n"
    "  end\n"
    "end\n"
    "return 1\n";

/* KEYS: stream. ARGV: group. */
static const char waiting_script[] = LUA_COMMON "return waiting(KEYS[1], ARGV[1])\n";

/* KEYS: stream. ARGV: group, entry. Together, so that XLEN never counts
 * an entry that is no longer pending. */
static const char ack_script[] =
    "redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])\n"
    "return redis.call('XDEL', KEYS[1], ARGV[2])\n";

/* KEYS: registration, the set of names. ARGV: name, info, busy, TTL. */
static const char register_script[] =
    "redis.call('HSET', KEYS[1], 'info', ARGV[2], 'busy', ARGV[3])\n"
    "redis.call('EXPIRE', KEYS[1], ARGV[4])\n"
    "return redis.call('SADD', KEYS[2], ARGV[1])\n";

/* Arguments of one EVAL, grown as they are added (binary-safe). */
typedef struct {
    const char **argv;
    size_t *lens;
    char **owned; /* copies made by eval_addf, freed with the call */
    int argc, cap, nowned;
    bool failed;
} eval_args;

static void eval_add(eval_args *a, const void *data, size_t len) {
    if (a->argc == a->cap) {
        int cap = a->cap ? 2 * a->cap : 32;
        const char **argv = realloc(a->argv, sizeof *argv * (size_t)cap);
        if (argv) a->argv = argv;
        size_t *lens = realloc(a->lens, sizeof *lens * (size_t)cap);
        if (lens) a->lens = lens;
        char **owned = realloc(a->owned, sizeof *owned * (size_t)cap);
        if (owned) a->owned = owned;
        if (!argv || !lens || !owned) {
            a->failed = true;
            return;
        }
        a->cap = cap;
    }
    a->argv[a->argc] = data;
    a->lens[a->argc++] = len;
}

static void eval_str(eval_args *a, const char *s) { eval_add(a, s, strlen(s)); }

static void eval_addf(eval_args *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void eval_addf(eval_args *a, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    int n = vasprintf(&s, fmt, ap);
    va_end(ap);
    if (n < 0) {
        a->failed = true;
        return;
    }
    eval_add(a, s, (size_t)n);
    if (!a->failed) a->owned[a->nowned++] = s;
    else free(s);
}

/* Runs the script; frees the arguments. */
static redisReply *eval_run(redis *r, eval_args *a, char *err, size_t n) {
    redisReply *reply = NULL;
    if (a->failed) snprintf(err, n, "out of memory");
    else reply = redis_call_argv(r, err, n, a->argc, a->argv, a->lens);
    for (int i = 0; i < a->nowned; i++) free(a->owned[i]);
    free(a->argv);
    free(a->lens);
    free(a->owned);
    return reply;
}

static void eval_begin(eval_args *a, const char *script, int nkeys) {
    *a = (eval_args){0};
    eval_str(a, "EVAL");
    eval_str(a, script);
    eval_addf(a, "%d", nkeys);
}

/* A JSON value's compact text, owned by the call's arguments. */
static void eval_json(eval_args *a, json_t *j) {
    char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (!s) {
        a->failed = true;
        return;
    }
    eval_add(a, s, strlen(s));
    if (!a->failed) a->owned[a->nowned++] = s;
    else free(s);
}

static int integer_reply(redisReply *reply, long long *out, char *err, size_t n) {
    if (!reply) return -1;
    int rc = reply->type == REDIS_REPLY_INTEGER ? 0 : -1;
    if (rc == 0) *out = reply->integer;
    else snprintf(err, n, "redis: unexpected answer");
    freeReplyObject(reply);
    return rc;
}

/* ---- jobs ---------------------------------------------------------------------- */

/* Single-process mode's 503 queue-too-long (queue.c) for a job whose
 * last task would end `finish` seconds from now. */
static void too_late(problem *why, double finish, const cluster_job *job, double now) {
    double limit = round((job->deadline - job->created) * 1e3) / 1e3; /* the request timeout, wall clocks apart */
    problem_set(why, PROBLEM_QUEUE_TOO_LONG,
                "after the work ahead of it, it would end in about %.0f s, past its limit of %g s from arrival; "
                "retry later", finish, limit);
    why->estimated_seconds = finish + (now - job->created), why->limit_seconds = limit;
    /* a retry has the whole limit, and the work ahead will have shrunk by the seconds waited */
    double wait = finish - limit;
    why->retry_after = wait < 1 ? 1 : wait > 86400 ? 86400 : (int)ceil(wait);
}

int cluster_submit(redis *r, const cluster_job *job, const cluster_task *tasks, const sdx4_image *inputs,
                   const bool *queued, const cluster_task_state *states, const double *estimates, int devices,
                   int capacity, double retention, problem *why, char *err, size_t n) {
    double now = wall_now(), left = job->deadline - now;
    int nqueued = 0, unfinished = 0;
    for (int i = 0; i < job->ntasks; i++) {
        nqueued += queued[i];
        unfinished += !final_state(states[i].state);
    }
    eval_args a;
    eval_begin(&a, submit_script, 2 + nqueued);
    char job_key[64];
    key(job_key, sizeof job_key, "sdx4:job:%s", job->id);
    eval_str(&a, CLUSTER_STREAM);
    eval_str(&a, job_key);
    for (int i = 0; i < job->ntasks; i++)
        if (queued[i]) eval_addf(&a, "sdx4:input:%s:%d", job->id, i);
    eval_str(&a, CLUSTER_GROUP);
    eval_addf(&a, "%d", capacity);
    eval_addf(&a, "%lld", ttl_of(left + retention + INPUT_MARGIN));
    eval_addf(&a, "%lld", ttl_of(left + INPUT_MARGIN));
    eval_str(&a, job->id);
    eval_json(&a, meta_to_json(job));
    eval_addf(&a, "%d", job->ntasks);
    eval_addf(&a, "%d", unfinished);
    eval_addf(&a, "%.6f", now);
    for (int i = 0; i < job->ntasks; i++) eval_json(&a, cluster_state_to_json(&states[i]));
    for (int i = 0; i < job->ntasks; i++) {
        if (!queued[i]) continue;
        eval_addf(&a, "%d", i);
        eval_json(&a, cluster_task_to_json(&tasks[i]));
        eval_add(&a, inputs[i].pixels, (size_t)inputs[i].width * inputs[i].height * 3);
        eval_addf(&a, "%.6f", estimates ? estimates[i] : 0.0);
    }
    eval_addf(&a, "%d", estimates ? devices : 0);
    eval_addf(&a, "%.6f", left);
    why->kind = PROBLEM_NONE;
    redisReply *reply = eval_run(r, &a, err, n);
    if (!reply) return -1;
    int rc = -1;
    if (reply->type == REDIS_REPLY_ARRAY && reply->elements == 2 && reply->element[0]->type == REDIS_REPLY_INTEGER) {
        rc = 0;
        if (reply->element[0]->integer == 0) {
            long long ahead = reply->element[1]->integer;
            problem_set(why, PROBLEM_QUEUE_FULL, "%lld upscales are waiting (the most allowed is %d); retry later",
                        ahead, capacity);
            why->retry_after = 1;
            snprintf(err, n, "%s", why->detail);
            rc = -1;
        } else if (reply->element[0]->integer == 2) {
            too_late(why, reply->element[1]->str ? atof(reply->element[1]->str) : 0, job, now);
            snprintf(err, n, "%s", why->detail);
            rc = -1;
        }
    } else {
        snprintf(err, n, "redis: unexpected answer to submit");
    }
    freeReplyObject(reply);
    return rc;
}

/* A job's hash (HGETALL's answer) into its meta and its tasks' states;
 * 1 read, 0 empty (no such job), -1 not Redis's answer to HGETALL,
 * CLUSTER_JOB_UNREADABLE a hash that does not parse. */
static int job_from_hash(const redisReply *reply, const char *id, cluster_job *job, cluster_task_state *states,
                         char *err, size_t n) {
    memset(job, 0, sizeof *job);
    if (reply->type != REDIS_REPLY_ARRAY) return snprintf(err, n, "redis: unexpected answer to HGETALL"), -1;
    if (reply->elements == 0) return 0;
    int rc = CLUSTER_JOB_UNREADABLE;
    json_t *meta = NULL;
    const char *state = NULL, *finished = NULL, *webhook = NULL;
    for (size_t i = 0; i + 1 < reply->elements; i += 2) {
        const char *f = reply->element[i]->str, *v = reply->element[i + 1]->str;
        if (strcmp(f, "meta") == 0) meta = json_loads(v, 0, NULL);
        else if (strcmp(f, "state") == 0) state = v;
        else if (strcmp(f, "finished") == 0) finished = v;
        else if (strcmp(f, "webhook") == 0) webhook = v;
    }
    if (meta_from_json(meta, job, err, n)) goto done;
    if (webhook) webhook_from_text(webhook, strlen(webhook), job->webhook, sizeof job->webhook,
                                   &job->webhook_attempts, job->webhook_error, sizeof job->webhook_error);
    job->state = state && name_index(state_names, 5, state) >= 0 ? (job_state)name_index(state_names, 5, state) : JOB_QUEUED;
    job->finished = finished ? atof(finished) : 0;
    int found = 0;
    for (size_t i = 0; i + 1 < reply->elements; i += 2) {
        const char *f = reply->element[i]->str;
        int index;
        char end;
        if (sscanf(f, "task:%d%c", &index, &end) != 1 || index < 0 || index >= job->ntasks) continue;
        json_t *j = json_loads(reply->element[i + 1]->str, 0, NULL);
        int bad = cluster_state_from_json(j, &states[index]);
        json_decref(j);
        if (bad) {
            snprintf(err, n, "job %s: the state of task %d does not parse", id, index);
            goto done;
        }
        found++;
    }
    if (found != job->ntasks) snprintf(err, n, "job %s: %d of %d task states", id, found, job->ntasks);
    else rc = 1;
done:
    if (rc != 1) cluster_job_free(job);
    json_decref(meta);
    return rc;
}

int cluster_load_job(redis *r, const char *id, cluster_job *job, cluster_task_state *states, char *err,
                     size_t n) {
    memset(job, 0, sizeof *job);
    if (!is_job_id(id)) return 0;
    redisReply *reply = redis_call(r, err, n, "HGETALL sdx4:job:%s", id);
    if (!reply) return -1;
    int rc = job_from_hash(reply, id, job, states, err, n);
    freeReplyObject(reply);
    return rc;
}

/* The listing so far: documents and their creation times, to sort. */
typedef struct {
    json_t *doc;
    double created;
} listed_job;

typedef struct {
    listed_job *items;
    size_t count, room;
} job_listing;

static int newest_first(const void *a, const void *b) {
    double x = ((const listed_job *)a)->created, y = ((const listed_job *)b)->created;
    return (x < y) - (x > y);
}

/* One job's listing entry, added when it has `state` (or any). */
static int list_one(redis *r, const char *id, const char *state, job_listing *out, char *err, size_t n) {
    cluster_job job;
    cluster_task_state *states = calloc(FORM_MAX_IMAGES, sizeof *states);
    if (!states) return snprintf(err, n, "out of memory"), -1;
    int rc = cluster_load_job(r, id, &job, states, err, n);
    if (rc <= 0) { /* 0: gone since the scan saw it; a hash that does not parse is left out, as GET
                      refuses it (dispatch_redis.c), not the listing of the others */
        free(states);
        return rc == CLUSTER_JOB_UNREADABLE ? 0 : rc;
    }
    rc = 0;
    json_t *d = cluster_job_document(&job, states, "pending");
    free(states);
    if (out->count == out->room) {
        size_t room = out->room ? 2 * out->room : 64;
        listed_job *items = realloc(out->items, room * sizeof *items);
        if (items) out->items = items, out->room = room;
    }
    if (state && strcmp(json_string_value(json_object_get(d, "status")), state)) {
        json_decref(d);
    } else if (out->count == out->room) {
        json_decref(d);
        snprintf(err, n, "out of memory");
        rc = -1;
    } else {
        json_object_set_new(d, "owner", json_string(job.owner));
        json_object_set_new(d, "client", json_string(job.client));
        json_object_set_new(d, "request_id", json_string(job.request_id));
        json_object_set_new(d, "listed", json_boolean(job.listed));
        out->items[out->count++] = (listed_job){d, job.created};
    }
    cluster_job_free(&job);
    return rc;
}

int cluster_list_jobs(redis *r, const char *state, int limit, json_t **jobs, char *err, size_t n) {
    job_listing all = {0};
    char cursor[32] = "0";
    int rc = 0;
    do {
        redisReply *reply = redis_call(r, err, n, "SCAN %s MATCH sdx4:job:* COUNT 500", cursor);
        if (!reply) {
            rc = -1;
            break;
        }
        if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2 ||
            reply->element[0]->type != REDIS_REPLY_STRING || reply->element[1]->type != REDIS_REPLY_ARRAY) {
            snprintf(err, n, "SCAN answered something else than a cursor and keys");
            rc = -1;
        } else {
            snprintf(cursor, sizeof cursor, "%s", reply->element[0]->str);
            for (size_t i = 0; rc == 0 && i < reply->element[1]->elements; i++) {
                const redisReply *k = reply->element[1]->element[i];
                const char *id = k->type == REDIS_REPLY_STRING ? k->str + strlen("sdx4:job:") : "";
                if (is_job_id(id)) rc = list_one(r, id, state, &all, err, n); /* not another key of the prefix */
            }
        }
        freeReplyObject(reply);
    } while (rc == 0 && strcmp(cursor, "0"));
    if (rc == 0) {
        qsort(all.items, all.count, sizeof *all.items, newest_first);
        *jobs = json_array();
        for (size_t i = 0; i < all.count && (int)i < limit; i++) json_array_append(*jobs, all.items[i].doc);
    }
    for (size_t i = 0; i < all.count; i++) json_decref(all.items[i].doc);
    free(all.items);
    return rc;
}

/* {"task": i, "state": {...}}, the message of a change. */
static json_t *event_json(int index, const cluster_task_state *s) {
    return json_pack("{s:i,s:o}", "task", index, "state", cluster_state_to_json(s));
}

int cluster_finish_task(redis *r, const char *job_id, int index, const cluster_task_state *state,
                        const void *result, size_t result_len, double retention, size_t budget, cluster_job *ended,
                        cluster_task_state *ended_states, char *err, size_t n) {
    eval_args a;
    eval_begin(&a, finish_script, 5);
    eval_addf(&a, "sdx4:job:%s", job_id);
    eval_addf(&a, "sdx4:result:%s:%d", job_id, index);
    eval_str(&a, "sdx4:results");
    eval_str(&a, "sdx4:results:bytes");
    eval_addf(&a, "sdx4:input:%s:%d", job_id, index);
    eval_addf(&a, "%d", index);
    eval_json(&a, cluster_state_to_json(state));
    eval_addf(&a, "sdx4:events:%s", job_id);
    eval_json(&a, event_json(index, state));
    eval_str(&a, result ? "1" : "0");
    eval_add(&a, result ? result : "", result ? result_len : 0);
    eval_addf(&a, "%lld", ttl_of(retention));
    eval_addf(&a, "%zu", budget);
    eval_addf(&a, "%.6f", wall_now());
    redisReply *reply = eval_run(r, &a, err, n);
    if (!reply || reply->type != REDIS_REPLY_ARRAY) {
        long long rc;
        return integer_reply(reply, &rc, err, n) ? -1 : (int)rc;
    }
    if (ended && job_from_hash(reply, job_id, ended, ended_states, err, n) != 1) ended->ntasks = 0;
    freeReplyObject(reply);
    return 2;
}

int cluster_report_progress(redis *r, const char *job_id, int index, const cluster_task_state *state,
                            char *err, size_t n) {
    eval_args a;
    eval_begin(&a, progress_script, 1);
    eval_addf(&a, "sdx4:job:%s", job_id);
    eval_addf(&a, "%d", index);
    eval_json(&a, cluster_state_to_json(state));
    eval_addf(&a, "sdx4:events:%s", job_id);
    eval_json(&a, event_json(index, state));
    long long rc;
    return integer_reply(eval_run(r, &a, err, n), &rc, err, n) ? -1 : (int)rc;
}

int cluster_load_result(redis *r, const char *job_id, int index, void **data, size_t *len, char *err,
                        size_t n) {
    *data = NULL, *len = 0;
    redisReply *reply = redis_call(r, err, n, "GET sdx4:result:%s:%d", job_id, index);
    if (!reply) return -1;
    int rc = 0;
    if (reply->type == REDIS_REPLY_STRING) {
        *data = malloc(reply->len ? reply->len : 1);
        if (*data) memcpy(*data, reply->str, reply->len), *len = reply->len, rc = 1;
        else snprintf(err, n, "out of memory"), rc = -1;
    }
    freeReplyObject(reply);
    return rc;
}

int cluster_cancel(redis *r, const char *job_id, int reason, double ttl, char *err, size_t n) {
    if (reason <= STOP_NONE || reason > STOP_SHUTDOWN) {
        snprintf(err, n, "cancel: no such stop reason %d", reason);
        return -1;
    }
    eval_args a;
    eval_begin(&a, cancel_script, 3);
    eval_addf(&a, "sdx4:cancel:%s", job_id);
    eval_addf(&a, "sdx4:job:%s", job_id);
    eval_str(&a, CLUSTER_STREAM);
    eval_str(&a, stop_names[reason]);
    eval_addf(&a, "%lld", ttl_of(ttl));
    eval_str(&a, CLUSTER_GROUP);
    long long rc;
    return integer_reply(eval_run(r, &a, err, n), &rc, err, n) ? -1 : 0;
}

int cluster_stop_reason(redis *r, const char *job_id, int *reason, char *err, size_t n) {
    *reason = STOP_NONE;
    redisReply *reply = redis_call(r, err, n, "GET sdx4:cancel:%s", job_id);
    if (!reply) return -1;
    if (reply->type == REDIS_REPLY_STRING) {
        int i = name_index(stop_names, 4, reply->str);
        *reason = i > 0 ? i : STOP_CLIENT; /* a reason this version does not know still stops */
    }
    freeReplyObject(reply);
    return 0;
}

/* ---- events ----------------------------------------------------------------------- */

int cluster_parse_event(const char *channel, const char *message, size_t len, char job_id[33], int *index,
                        cluster_task_state *state) {
    static const char prefix[] = "sdx4:events:";
    if (strncmp(channel, prefix, sizeof prefix - 1) != 0 || !is_job_id(channel + sizeof prefix - 1)) return -1;
    json_t *j = json_loadb(message, len, 0, NULL);
    const json_t *task = json_object_get(j, "task");
    int rc = -1;
    if (json_is_integer(task) && json_integer_value(task) >= 0 && json_integer_value(task) < FORM_MAX_IMAGES &&
        cluster_state_from_json(json_object_get(j, "state"), state) == 0) {
        memcpy(job_id, channel + sizeof prefix - 1, 33);
        *index = (int)json_integer_value(task);
        rc = 0;
    }
    json_decref(j);
    return rc;
}

/* ---- the cluster as a whole ------------------------------------------------------------ */

int cluster_workers(redis *r, json_t **list, char *err, size_t n) {
    *list = NULL;
    redisReply *names = redis_call(r, err, n, "SMEMBERS sdx4:workers");
    if (!names) return -1;
    json_t *out = json_array();
    int rc = 0;
    for (size_t i = 0; names->type == REDIS_REPLY_ARRAY && i < names->elements; i++) {
        const char *name = names->element[i]->str;
        redisReply *reply = redis_call(r, err, n, "HMGET sdx4:worker:%s info busy", name);
        if (!reply) {
            rc = -1;
            break;
        }
        json_t *info = reply->type == REDIS_REPLY_ARRAY && reply->elements == 2 && reply->element[0]->str
                           ? json_loads(reply->element[0]->str, 0, NULL)
                           : NULL;
        if (json_is_object(info)) {
            json_object_set_new(info, "busy", json_integer(reply->element[1]->str ? atoi(reply->element[1]->str) : 0));
            json_array_append(out, info);
        } else { /* expired: its worker stopped refreshing it */
            freeReplyObject(redis_call(r, err, n, "SREM sdx4:workers %s", name));
        }
        json_decref(info);
        freeReplyObject(reply);
    }
    freeReplyObject(names);
    if (rc == 0) *list = out;
    else json_decref(out);
    return rc;
}

const json_t *cluster_worker_model(const json_t *worker, const char *model) {
    const json_t *models = json_object_get(worker, "models");
    if (json_is_object(models)) return json_object_get(models, model);
    const char *only = json_string_value(json_object_get(worker, "model_id")); /* one model, an earlier version */
    return only && model && strcmp(only, model) == 0 ? worker : NULL;
}

int cluster_waiting(redis *r, long long *waiting, char *err, size_t n) {
    eval_args a;
    eval_begin(&a, waiting_script, 1);
    eval_str(&a, CLUSTER_STREAM);
    eval_str(&a, CLUSTER_GROUP);
    return integer_reply(eval_run(r, &a, err, n), waiting, err, n);
}

static void set_time(json_t *doc, const char *name, double wall) {
    char buf[40];
    iso_time(buf, sizeof buf, wall);
    json_object_set_new(doc, name, json_string(buf));
}

json_t *cluster_job_document(const cluster_job *job, const cluster_task_state *states, const char *webhook) {
    bool done = final_state(job->state);
    int step = 0, total = 0;
    double started = 0;
    job_state state = job->state;
    for (int i = 0; i < job->ntasks; i++) {
        step += states[i].step, total += states[i].total;
        if (states[i].started > 0 && (started == 0 || states[i].started < started)) started = states[i].started;
        if (!done && (states[i].state == JOB_RUNNING || final_state(states[i].state))) state = JOB_RUNNING;
    }
    json_t *d = json_pack("{s:s,s:s,s:s,s:i}", "id", job->id, "status", state_names[state], "kind",
                          job->kind == FORM_BATCH ? "batch" : "upscale", "images", job->ntasks);
    if (job->model[0]) json_object_set_new(d, "model", json_string(job->model));
    set_time(d, "created_at", job->created);
    if (started > 0) set_time(d, "started_at", started);
    if (done) set_time(d, "finished_at", job->finished);
    json_object_set_new(d, "progress", json_pack("{s:i,s:i}", "step", step, "total", total));
    double end = done ? job->finished : wall_now(), begun = started > 0 ? started : end;
    json_object_set_new(d, "timings", json_pack("{s:f,s:f}", "queue_ms", (begun - job->created) * 1e3,
                                                "inference_ms", (end - begun) * 1e3));
    for (int i = 0; i < job->ntasks; i++)
        if ((state == JOB_FAILED || state == JOB_CANCELED) && states[i].error.kind) {
            json_object_set_new(d, "error", problem_object(&states[i].error, job->request_id));
            break;
        }
    char path[80];
    snprintf(path, sizeof path, "/api/v1/jobs/%s", job->id);
    json_object_set_new(d, "links", json_pack("{s:s,s:s+,s:s+}", "self", path, "result", path, "/result",
                                              "events", path, "/events"));
    if (job->webhook_url) {
        json_t *hook = json_pack("{s:s,s:i}", "status", job->webhook[0] ? job->webhook : webhook, "attempts",
                                 job->webhook_attempts);
        if (job->webhook_error[0]) json_object_set_new(hook, "error", json_string(job->webhook_error));
        json_object_set_new(d, "webhook", hook);
    }
    return d;
}

int cluster_history_entry(redis *r, const cluster_job *job, const cluster_task_state *states, history_entry *e,
                          char *err, size_t n) {
    *e = (history_entry){.images = job->ntasks, .created = job->created, .finished = job->finished};
    cluster_task *records = calloc(FORM_MAX_IMAGES, sizeof *records);
    json_t *images = json_array();
    if (!records || !images || cluster_load_records(r, job->id, records, job->ntasks, err, n)) {
        if (!records || !images) snprintf(err, n, "out of memory");
        free(records);
        json_decref(images);
        return -1;
    }
    snprintf(e->id, sizeof e->id, "%s", job->id);
    snprintf(e->owner, sizeof e->owner, "%s", job->owner);
    snprintf(e->client, sizeof e->client, "%s", job->client);
    snprintf(e->kind, sizeof e->kind, "%s", kind_names[job->kind]);
    snprintf(e->request_id, sizeof e->request_id, "%s", job->request_id);
    snprintf(e->state, sizeof e->state, "%s", state_names[job->state]);
    snprintf(e->model, sizeof e->model, "%s", job->model[0] ? job->model : records[0].model);
    for (int i = 0; i < job->ntasks; i++) {
        const cluster_task_state *s = &states[i];
        const cluster_task *t = &records[i];
        const upscale_options *o = &t->opts;
        char in[32] = "", out[32] = "";
        if (t->width) snprintf(in, sizeof in, "%dx%d", t->width, t->height);
        if (s->state == JOB_SUCCEEDED) snprintf(out, sizeof out, "%dx%d", s->width, s->height);
        json_array_append_new(
            images, json_pack("{s:s,s:s?,s:s?,s:s?,s:i,s:f,s:f,s:f,s:s?,s:s?,s:I,s:s?,s:s?,s:s?,s:I,s:b}", "status",
                              state_names[s->state], "error", s->error.kind ? problem_slug(s->error.kind) : NULL,
                              "prompt", o->prompt, "negative_prompt", o->negative_prompt, "steps", o->steps,
                              "guidance_scale", o->guidance_scale, "noise_level", o->noise_level, "eta", o->eta,
                              "scheduler", o->scheduler, "scheduler_options", o->scheduler_options,
                              "seed", (json_int_t)o->seed, "format",
                              o->format ? imageio_format_name(o->format) : NULL, "input_size", in[0] ? in : NULL,
                              "output_size", out[0] ? out : NULL, "output_bytes", (json_int_t)s->bytes,
                              "cache_hit", strcmp(s->worker, "cache") == 0));
        e->input_pixels += (int64_t)t->width * t->height;
        e->output_bytes += (int64_t)s->bytes;
        if (s->started > 0 && (e->started == 0 || s->started < e->started)) e->started = s->started;
        /* unknown for the whole job when a task that ran does not say */
        if (e->compute >= 0 && s->started > 0) e->compute = s->compute < 0 ? -1 : e->compute + s->compute;
        if (s->worker[0] && !e->worker[0]) snprintf(e->worker, sizeof e->worker, "%s", s->worker);
        if (s->error.kind && !e->error_kind[0] && job->state != JOB_SUCCEEDED) {
            snprintf(e->error_kind, sizeof e->error_kind, "%s", problem_slug(s->error.kind));
            snprintf(e->error_detail, sizeof e->error_detail, "%s", s->error.detail);
        }
        cluster_task_free(&records[i]);
    }
    e->parameters = json_dumps(images, JSON_COMPACT);
    json_decref(images);
    free(records);
    if (!e->parameters) return snprintf(err, n, "out of memory"), -1;
    return 0;
}

/* KEYS: job hash. ARGV: delivery (JSON), channel, event, "1" to write
 * only if none is yet. */
static const char webhook_script[] =
    "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end\n"
    "if ARGV[4] == '1' and redis.call('HEXISTS', KEYS[1], 'webhook') == 1 then return 0 end\n"
    "redis.call('HSET', KEYS[1], 'webhook', ARGV[1])\n"
    "redis.call('PUBLISH', ARGV[2], ARGV[3])\n"
    "return 1\n";

int cluster_webhook_state(redis *r, const char *job_id, const char *status, int attempts, const char *error,
                          char *err, size_t n) {
    json_t *delivery = json_pack("{s:s,s:i,s:s}", "status", status, "attempts", attempts, "error", error ? error : "");
    eval_args a;
    eval_begin(&a, webhook_script, 1);
    eval_addf(&a, "sdx4:job:%s", job_id);
    eval_json(&a, json_incref(delivery));
    eval_addf(&a, "sdx4:events:%s", job_id);
    eval_json(&a, json_pack("{s:O}", "webhook", delivery));
    eval_str(&a, strcmp(status, "pending") == 0 ? "1" : "0");
    json_decref(delivery);
    long long written;
    return integer_reply(eval_run(r, &a, err, n), &written, err, n);
}

bool cluster_parse_webhook(const char *channel, const char *message, size_t len, char job_id[33], char *status,
                           size_t status_size, int *attempts, char *error, size_t error_size) {
    static const char prefix[] = "sdx4:events:";
    if (strncmp(channel, prefix, sizeof prefix - 1) != 0 || !is_job_id(channel + sizeof prefix - 1)) return false;
    json_t *j = json_loadb(message, len, 0, NULL);
    bool ok = webhook_from_json(json_object_get(j, "webhook"), status, status_size, attempts, error, error_size);
    json_decref(j);
    if (ok) memcpy(job_id, channel + sizeof prefix - 1, 33);
    return ok;
}

/* ---- workers ------------------------------------------------------------------------- */

int cluster_ensure_group(redis *r, char *err, size_t n) {
    redisReply *reply = redis_call(r, err, n, "XGROUP CREATE %s %s 0 MKSTREAM", CLUSTER_STREAM, CLUSTER_GROUP);
    if (reply) {
        freeReplyObject(reply);
        return 0;
    }
    return strstr(err, "BUSYGROUP") ? 0 : -1; /* made by another node first */
}

/* One entry [id, [field, value, ...]] into a delivery. */
static void parse_entry(const redisReply *e, cluster_delivery *d) {
    memset(d, 0, sizeof *d);
    cluster_task *t = &d->task;
    if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 || e->element[0]->type != REDIS_REPLY_STRING) {
        snprintf(d->invalid, sizeof d->invalid, "a stream entry of an unexpected shape");
        return;
    }
    snprintf(t->entry_id, sizeof t->entry_id, "%s", e->element[0]->str);
    const redisReply *fields = e->element[1];
    const char *job = NULL, *index = NULL, *record = NULL;
    size_t record_len = 0;
    for (size_t i = 0; fields->type == REDIS_REPLY_ARRAY && i + 1 < fields->elements; i += 2) {
        const char *f = fields->element[i]->str;
        const redisReply *v = fields->element[i + 1];
        if (strcmp(f, "job") == 0) job = v->str;
        else if (strcmp(f, "task") == 0) index = v->str;
        else if (strcmp(f, "record") == 0) record = v->str, record_len = v->len;
    }
    char entry_id[sizeof t->entry_id];
    memcpy(entry_id, t->entry_id, sizeof entry_id);
    if (!record) {
        snprintf(d->invalid, sizeof d->invalid, "the stream entry has no record");
    } else {
        json_error_t jerr;
        json_t *j = json_loadb(record, record_len, JSON_REJECT_DUPLICATES, &jerr);
        if (!j) snprintf(d->invalid, sizeof d->invalid, "task record: not JSON: %s", jerr.text);
        else if (cluster_task_from_json(j, t, d->invalid, sizeof d->invalid) == 0 &&
                 (!job || strcmp(job, t->job_id) != 0 || !index || atoi(index) != t->index)) {
            snprintf(d->invalid, sizeof d->invalid, "task record: names another task than its entry");
            cluster_task_free(t);
        }
        json_decref(j);
        if (d->invalid[0]) memset(t, 0, sizeof *t);
    }
    memcpy(t->entry_id, entry_id, sizeof entry_id); /* cluster_task_from_json cleared it */
    if (d->invalid[0] && job && is_job_id(job) && index) { /* enough to fail the task by name */
        snprintf(t->job_id, sizeof t->job_id, "%s", job);
        t->index = atoi(index);
    } else if (d->invalid[0]) {
        t->index = -1;
    }
    t->deliveries = 1;
}

static int parse_entries(const redisReply *list, int max, cluster_delivery *out) {
    int n = 0;
    for (size_t i = 0; list->type == REDIS_REPLY_ARRAY && i < list->elements && n < max; i++)
        if (list->element[i]->type == REDIS_REPLY_ARRAY) parse_entry(list->element[i], &out[n++]);
    return n;
}

int cluster_take(redisContext *c, const char *consumer, int max, int block_ms, cluster_delivery *out, char *err,
                 size_t n) {
    redisReply *reply = redisCommand(c, "XREADGROUP GROUP %s %s COUNT %d BLOCK %d STREAMS %s >", CLUSTER_GROUP,
                                     consumer, max, block_ms, CLUSTER_STREAM);
    if (!reply) {
        snprintf(err, n, "redis connection: %s", c->errstr[0] ? c->errstr : "no answer");
        return -1;
    }
    int got = 0;
    if (reply->type == REDIS_REPLY_ERROR) {
        snprintf(err, n, "redis: %s", reply->str);
        got = -1;
    } else if (reply->type == REDIS_REPLY_ARRAY && reply->elements == 1 &&
               reply->element[0]->type == REDIS_REPLY_ARRAY && reply->element[0]->elements == 2) {
        got = parse_entries(reply->element[0]->element[1], max, out);
    }
    freeReplyObject(reply);
    return got;
}

int cluster_reclaim(redis *r, const char *consumer, double min_idle, int max, cluster_delivery *out, char *err,
                    size_t n) {
    redisReply *reply = redis_call(r, err, n, "XAUTOCLAIM %s %s %s %lld 0-0 COUNT %d", CLUSTER_STREAM, CLUSTER_GROUP,
                                   consumer, (long long)(min_idle * 1000), max);
    if (!reply) return -1;
    int got = 0;
    if (reply->type == REDIS_REPLY_ARRAY && reply->elements >= 2) got = parse_entries(reply->element[1], max, out);
    freeReplyObject(reply);
    for (int i = 0; i < got; i++) { /* XAUTOCLAIM counted this delivery */
        const char *id = out[i].task.entry_id;
        redisReply *p = redis_call(r, err, n, "XPENDING %s %s %s %s 1", CLUSTER_STREAM, CLUSTER_GROUP, id, id);
        if (p && p->type == REDIS_REPLY_ARRAY && p->elements == 1 && p->element[0]->elements == 4)
            out[i].task.deliveries = (int)p->element[0]->element[3]->integer;
        freeReplyObject(p);
    }
    return got;
}

int cluster_hold(redis *r, const char *consumer, const char *const *entry_ids, int count, char *err, size_t n) {
    if (count <= 0) return 0;
    eval_args a = {0};
    eval_str(&a, "XCLAIM");
    eval_str(&a, CLUSTER_STREAM);
    eval_str(&a, CLUSTER_GROUP);
    eval_str(&a, consumer);
    eval_str(&a, "0");
    for (int i = 0; i < count; i++) eval_str(&a, entry_ids[i]);
    eval_str(&a, "JUSTID");
    redisReply *reply = eval_run(r, &a, err, n);
    freeReplyObject(reply);
    return reply ? 0 : -1;
}

int cluster_ack(redis *r, const char *entry_id, char *err, size_t n) {
    eval_args a;
    eval_begin(&a, ack_script, 1);
    eval_str(&a, CLUSTER_STREAM);
    eval_str(&a, CLUSTER_GROUP);
    eval_str(&a, entry_id);
    long long deleted;
    return integer_reply(eval_run(r, &a, err, n), &deleted, err, n);
}

int cluster_load_input(redis *r, const cluster_task *t, sdx4_image *image, char *err, size_t n) {
    memset(image, 0, sizeof *image);
    redisReply *reply = redis_call(r, err, n, "GET sdx4:input:%s:%d", t->job_id, t->index);
    if (!reply) return -1;
    int rc = 0;
    size_t bytes = (size_t)t->width * t->height * 3;
    if (reply->type == REDIS_REPLY_STRING && reply->len == bytes) {
        image->pixels = malloc(bytes);
        if (image->pixels) {
            memcpy(image->pixels, reply->str, bytes);
            image->width = t->width, image->height = t->height;
            rc = 1;
        } else {
            snprintf(err, n, "out of memory");
            rc = -1;
        }
    }
    freeReplyObject(reply);
    return rc;
}

int cluster_register(redis *r, const char *name, const json_t *info, int busy, double ttl, char *err, size_t n) {
    eval_args a;
    eval_begin(&a, register_script, 2);
    eval_addf(&a, "sdx4:worker:%s", name);
    eval_str(&a, "sdx4:workers");
    eval_str(&a, name);
    eval_json(&a, json_incref((json_t *)info));
    eval_addf(&a, "%d", busy);
    eval_addf(&a, "%lld", ttl_of(ttl));
    long long added;
    return integer_reply(eval_run(r, &a, err, n), &added, err, n);
}

int cluster_unregister(redis *r, const char *name, char *err, size_t n) {
    redisReply *reply = redis_call(r, err, n, "DEL sdx4:worker:%s", name);
    freeReplyObject(reply);
    if (!reply) return -1;
    reply = redis_call(r, err, n, "SREM sdx4:workers %s", name);
    freeReplyObject(reply);
    return reply ? 0 : -1;
}

/* ---- API nodes ------------------------------------------------------------------------- */

/* KEYS: job hash. ARGV: field, value, ... Written only into a job that
 * exists: a job forgotten or expired meanwhile is not brought back. */
static const char keep_script[] =
    "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end\n"
    "redis.call('HSET', KEYS[1], unpack(ARGV))\n"
    "return 1\n";

int cluster_keep_records(redis *r, const char *job_id, const cluster_task *tasks, int ntasks, char *err,
                         size_t n) {
    eval_args a;
    eval_begin(&a, keep_script, 1);
    eval_addf(&a, "sdx4:job:%s", job_id);
    for (int i = 0; i < ntasks; i++) {
        eval_addf(&a, "record:%d", tasks[i].index);
        eval_json(&a, cluster_task_to_json(&tasks[i]));
    }
    long long kept;
    return integer_reply(eval_run(r, &a, err, n), &kept, err, n);
}

int cluster_load_records(redis *r, const char *job_id, cluster_task *tasks, int ntasks, char *err, size_t n) {
    eval_args a = {0};
    eval_str(&a, "HMGET");
    eval_addf(&a, "sdx4:job:%s", job_id);
    for (int i = 0; i < ntasks; i++) eval_addf(&a, "record:%d", i);
    redisReply *reply = eval_run(r, &a, err, n);
    if (!reply) return -1;
    for (int i = 0; i < ntasks; i++) {
        cluster_task *t = &tasks[i];
        const redisReply *e = reply->type == REDIS_REPLY_ARRAY && (size_t)i < reply->elements ? reply->element[i] : NULL;
        json_t *record = e && e->type == REDIS_REPLY_STRING ? json_loadb(e->str, e->len, 0, NULL) : NULL;
        char why[256];
        if (!record || cluster_task_from_json(record, t, why, sizeof why) != 0) {
            memset(t, 0, sizeof *t);
            snprintf(t->job_id, sizeof t->job_id, "%s", job_id);
        }
        t->index = i;
        json_decref(record);
    }
    freeReplyObject(reply);
    return 0;
}

/* Lua: deletes the result keys KEYS[first..] and takes them out of the
 * results' byte budget (the set `set` of "key bytes" members, the count
 * `count`), as finish_script's evictions do. */
#define LUA_DROP_RESULTS                                                                  \
    "local function drop_results(set, count, first)\n"                                    \
    "  for i = first, #KEYS do\n"                                                          \
    "    local bytes = redis.call('STRLEN', KEYS[i])\n"                                    \
    "    if bytes > 0 and redis.call('ZREM', set, KEYS[i] .. ' ' .. bytes) == 1 then\n"    \
    "      redis.call('DECRBY', count, bytes)\n"                                           \
    "    end\n"                                                                            \
    "    redis.call('DEL', KEYS[i])\n"                                                     \
    "  end\n"                                                                              \
    "end\n"

/* KEYS: job hash, results set, results byte count, results. ARGV:
 * channel, message. */
static const char forget_script[] = LUA_DROP_RESULTS
    "drop_results(KEYS[2], KEYS[3], 4)\n"
    "redis.call('DEL', KEYS[1])\n"
    "return redis.call('PUBLISH', ARGV[1], ARGV[2])\n";

/* KEYS: results set, results byte count, result. */
static const char drop_result_script[] = LUA_DROP_RESULTS
    "drop_results(KEYS[1], KEYS[2], 3)\n"
    "return 1\n";

int cluster_drop_result(redis *r, const char *job_id, int index, char *err, size_t n) {
    eval_args a;
    eval_begin(&a, drop_result_script, 3);
    eval_str(&a, "sdx4:results");
    eval_str(&a, "sdx4:results:bytes");
    eval_addf(&a, "sdx4:result:%s:%d", job_id, index);
    long long done;
    return integer_reply(eval_run(r, &a, err, n), &done, err, n);
}

int cluster_forget(redis *r, const char *job_id, int ntasks, char *err, size_t n) {
    eval_args a;
    eval_begin(&a, forget_script, 3 + ntasks);
    eval_addf(&a, "sdx4:job:%s", job_id);
    eval_str(&a, "sdx4:results");
    eval_str(&a, "sdx4:results:bytes");
    for (int i = 0; i < ntasks; i++) eval_addf(&a, "sdx4:result:%s:%d", job_id, i);
    eval_addf(&a, "sdx4:events:%s", job_id);
    eval_str(&a, "{\"forgotten\":true}");
    long long heard;
    return integer_reply(eval_run(r, &a, err, n), &heard, err, n);
}

bool cluster_parse_forgotten(const char *channel, const char *message, size_t len, char job_id[33]) {
    static const char prefix[] = "sdx4:events:";
    if (strncmp(channel, prefix, sizeof prefix - 1) != 0 || !is_job_id(channel + sizeof prefix - 1)) return false;
    json_t *j = json_loadb(message, len, 0, NULL);
    bool forgotten = json_is_true(json_object_get(j, "forgotten"));
    json_decref(j);
    if (forgotten) memcpy(job_id, channel + sizeof prefix - 1, 33);
    return forgotten;
}

