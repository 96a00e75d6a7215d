/*
 * test_server_cluster.c - cluster.c against a real redis-server: task
 * records that travel whole (every upscale parameter, UTF-8 prompts) and
 * bad ones refused by name, the cluster-wide queue bound and the
 * estimated time of the work ahead (a refusal writes nothing), finish's compare-and-set and the job's end, events
 * through real pub/sub, cancel taking waiting entries out, the results'
 * byte budget, reclaim's delivery counts and worker registrations.
 */
#include <fcntl.h>
#include <math.h>
#include <string.h>

#include "cluster.h"
#include "server.h"
#include "test.h"
#include "test_redis_server.h"

static char err[512];

/* A task of job `id` with every parameter away from its default. */
static void make_task(cluster_task *t, const char *id, int index) {
    memset(t, 0, sizeof *t);
    snprintf(t->job_id, sizeof t->job_id, "%s", id);
    t->index = index;
    t->kind = FORM_BATCH;
    snprintf(t->client, sizeof t->client, "key:abc");
    snprintf(t->request_id, sizeof t->request_id, "req-%d", index);
    snprintf(t->owner, sizeof t->owner, "owner\xc3\xa9");
    t->created = 1765000000.125;
    t->deadline = wall_now() + 60;
    t->width = 64, t->height = 48;
    snprintf(t->model, sizeof t->model, "rrdb_x4");
    snprintf(t->content_check, sizeof t->content_check, "blackout");
    for (int i = 0; i < 32; i++) t->cache_key[i] = (uint8_t)(i * 9 + index);
    t->cacheable = true;
    t->opts.prompt = strdup("caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x9a\x80 \"quoted\"\n");
    t->opts.negative_prompt = strdup("blurry, \xc3\xbc");
    t->opts.noise_level = 0.37;
    t->opts.steps = 17;
    t->opts.guidance_scale = 12.5;
    t->opts.eta = 0.3333333333333333;
    t->opts.seed = SDX4_SEED_MAX;
    t->opts.format = IMAGE_WEBP;
    t->opts.quality = 77;
    t->opts.tile = 40, t->opts.tile_overlap = 12;
    t->opts.resize_width = 300, t->opts.resize_height = 200, t->opts.crop_width = 256, t->opts.crop_height = 200;
    t->opts.metadata = true;
    t->opts.given = (1u << FIELD_SEED) | (1u << FIELD_PROMPT) | (1u << FIELD_QUALITY) | (1u << FIELD_TILE_OVERLAP) |
                    (1u << FIELD_METADATA);
    /* the input's ICC profile, which metadata keeps: any bytes, NUL included */
    t->icc_len = 300;
    t->icc = malloc(t->icc_len);
    for (size_t i = 0; i < t->icc_len; i++) ((uint8_t *)t->icc)[i] = (uint8_t)(i * 31 + index);
}

/* What the results' byte budget counts now (sdx4:results:bytes). */
static long long results_bytes(redis *r) {
    char e[256];
    redisReply *reply = redis_call(r, e, sizeof e, "GET sdx4:results:bytes");
    long long bytes = reply && reply->type == REDIS_REPLY_STRING ? atoll(reply->str) : reply ? 0 : -1;
    freeReplyObject(reply);
    return bytes;
}

static void test_record_round_trip(void) {
    cluster_task a, b;
    make_task(&a, "0123456789abcdef0123456789abcdef", 5);
    json_t *j = cluster_task_to_json(&a);
    char *text = json_dumps(j, JSON_COMPACT);
    json_t *back = json_loads(text, 0, NULL);
    CHECK(cluster_task_from_json(back, &b, err, sizeof err) == 0, "round trip refused: %s", err);
    CHECK(strcmp(a.job_id, b.job_id) == 0 && a.index == b.index && a.kind == b.kind, "identity");
    CHECK(strcmp(a.client, b.client) == 0 && strcmp(a.request_id, b.request_id) == 0 &&
              strcmp(a.owner, b.owner) == 0, "client, request id, owner");
    CHECK(a.created == b.created && a.deadline == b.deadline, "times");
    CHECK(a.width == b.width && a.height == b.height, "size");
    CHECK(strcmp(a.model, b.model) == 0, "model: %s", b.model);
    CHECK(strcmp(b.content_check, "blackout") == 0, "content check: %s", b.content_check);
    CHECK(memcmp(a.cache_key, b.cache_key, 32) == 0 && b.cacheable, "cache key");
    CHECK(strcmp(a.opts.prompt, b.opts.prompt) == 0, "prompt: %s", b.opts.prompt);
    CHECK(strcmp(a.opts.negative_prompt, b.opts.negative_prompt) == 0, "negative prompt");
    CHECK(a.opts.noise_level == b.opts.noise_level && a.opts.guidance_scale == b.opts.guidance_scale &&
              a.opts.eta == b.opts.eta, "reals not exact");
    CHECK(a.opts.steps == b.opts.steps && a.opts.seed == b.opts.seed && a.opts.format == b.opts.format &&
              a.opts.quality == b.opts.quality && a.opts.given == b.opts.given && a.opts.tile == b.opts.tile &&
              a.opts.tile_overlap == b.opts.tile_overlap && a.opts.resize_width == b.opts.resize_width &&
              a.opts.resize_height == b.opts.resize_height && a.opts.crop_width == b.opts.crop_width &&
              a.opts.crop_height == b.opts.crop_height,
          "integers: seed %llu", (unsigned long long)b.opts.seed);
    CHECK(b.opts.metadata && b.icc_len == a.icc_len && !memcmp(a.icc, b.icc, a.icc_len), "metadata and profile");
    json_t *again = cluster_task_to_json(&b);
    CHECK(json_equal(j, again), "a second trip changed the record");
    json_decref(again);

    /* the model may be missing (an API node of an earlier version, serving
     * one model): the worker's default, "" */
    cluster_task_free(&b);
    json_t *old = json_deep_copy(j);
    json_object_del(old, "model");
    CHECK(cluster_task_from_json(old, &b, err, sizeof err) == 0 && b.model[0] == '\0' && a.model[0],
          "a record without a model: %s", err);
    cluster_task_free(&b);
    json_decref(old);
    /* nor a content check: none asked for */
    old = json_deep_copy(j);
    json_object_del(old, "content_check");
    CHECK(cluster_task_from_json(old, &b, err, sizeof err) == 0 && !b.content_check[0], "no content check: %s", err);
    cluster_task_free(&b);
    json_decref(old);
    /* nor metadata and a profile: none asked for */
    old = json_deep_copy(j);
    json_object_del(old, "icc");
    json_object_del(json_object_get(old, "options"), "metadata");
    CHECK(cluster_task_from_json(old, &b, err, sizeof err) == 0 && !b.opts.metadata && !b.icc && !b.icc_len,
          "a record without metadata: %s", err);
    cluster_task_free(&b);
    json_decref(old);
    CHECK(cluster_task_from_json(back, &b, err, sizeof err) == 0, "round trip refused: %s", err);

    /* every field, of the record and of its options, missing or of the
     * wrong type, is refused by its name (the model, the profile and
     * metadata only when mistyped) */
    const char *name;
    json_t *value;
    json_t *opts = json_object_get(j, "options");
    for (int pass = 0; pass < 2; pass++) {
        json_t *holder = pass == 0 ? j : opts;
        json_object_foreach(holder, name, value) {
            bool optional = !strcmp(name, pass == 0 ? "model" : "metadata") ||
                            (pass == 0 && (!strcmp(name, "icc") || !strcmp(name, "content_check")));
            for (int how = optional; how < 2; how++) {
                json_t *bad = json_deep_copy(j);
                json_t *target = pass == 0 ? bad : json_object_get(bad, "options");
                if (how == 0) json_object_del(target, name);
                else json_object_set_new(target, name, json_array());
                char quoted[64];
                snprintf(quoted, sizeof quoted, "\"%s\"", name);
                cluster_task t;
                err[0] = '\0';
                int rc = cluster_task_from_json(bad, &t, err, sizeof err);
                CHECK(rc == -1 && strstr(err, quoted), "%s %s: rc %d, \"%s\"", how ? "mistyped" : "missing",
                      name, rc, err);
                if (rc == 0) cluster_task_free(&t);
                json_decref(bad);
            }
        }
    }
    /* values out of range */
    static const struct {
        const char *field, *json;
    } bad_values[] = {
        {"job", "\"../../etc\""}, {"index", "64"}, {"width", "0"}, {"cache_key", "\"xyz\""},
        {"steps", "0"}, {"seed", "-1"}, {"format", "\"gif\""}, {"noise_level", "1.5"}, {"quality", "101"},
        {"vae_tiling", "\"sideways\""}, {"tile", "4096"}, {"tile_overlap", "-1"},
        {"resize_width", "16385"}, {"crop_height", "-1"}, {"icc", "\"not base64!\""},
    };
    for (size_t i = 0; i < sizeof bad_values / sizeof bad_values[0]; i++) {
        json_t *bad = json_deep_copy(j);
        json_t *target = json_object_get(bad, bad_values[i].field) ? bad : json_object_get(bad, "options");
        json_object_set_new(target, bad_values[i].field, json_loads(bad_values[i].json, JSON_DECODE_ANY, NULL));
        cluster_task t;
        int rc = cluster_task_from_json(bad, &t, err, sizeof err);
        CHECK(rc == -1 && strstr(err, bad_values[i].field), "%s = %s: \"%s\"", bad_values[i].field,
              bad_values[i].json, err);
        if (rc == 0) cluster_task_free(&t);
        json_decref(bad);
    }
    cluster_task_free(&b);
    CHECK(cluster_task_from_json(NULL, &b, err, sizeof err) == -1, "NULL accepted");
    json_decref(back);
    json_decref(j);
    free(text);
    cluster_task_free(&a);
    cluster_task_free(&b);
}

static void test_state_round_trip(void) {
    cluster_task_state s = {.state = JOB_FAILED, .step = 3, .total = 20, .started = 1765000001.5,
                            .finished = 1765000002.25, .width = 256, .height = 192, .bytes = 12345,
                            .stored = true,
                            .report = {.noise_level = 4, .prompt_tokens = 12, .prompt_truncated = 1,
                                       .seconds_text = 0.5, .seconds_unet = 1.25, .seconds_vae = 0.75}};
    problem_field(&s.error, "noise_level", "0 to 1", "bad \xc3\xa9");
    s.error.retry_after = 7;
    snprintf(s.worker, sizeof s.worker, "host-1");
    snprintf(s.content_check, sizeof s.content_check, "refuse");
    s.compute = 0.375;
    json_t *j = cluster_state_to_json(&s);
    cluster_task_state b;
    CHECK(cluster_state_from_json(j, &b) == 0, "state refused");
    CHECK(!strcmp(b.content_check, "refuse") && b.compute == 0.375, "content check %s, compute %g", b.content_check,
          b.compute);
    CHECK(b.state == s.state && b.step == 3 && b.total == 20 && b.started == s.started &&
              b.finished == s.finished && b.width == 256 && b.height == 192 && b.bytes == 12345 && b.stored,
          "state fields");
    CHECK(memcmp(&b.report, &s.report, sizeof s.report) == 0, "report");
    CHECK(b.error.kind == PROBLEM_INVALID_FIELD && strcmp(b.error.detail, s.error.detail) == 0 &&
              strcmp(b.error.field, "noise_level") == 0 && strcmp(b.error.allowed, "0 to 1") == 0 &&
              b.error.retry_after == 7,
          "error");
    CHECK(strcmp(b.worker, "host-1") == 0, "worker");
    /* an earlier version's state: no check, compute unknown */
    json_object_del(j, "content_check");
    json_object_del(j, "compute_s");
    CHECK(cluster_state_from_json(j, &b) == 0 && !b.content_check[0] && b.compute == -1, "earlier state: %g",
          b.compute);
    json_object_set_new(j, "compute_s", json_integer(-2));
    CHECK(cluster_state_from_json(j, &b) == -1, "negative compute accepted");
    json_object_del(j, "compute_s");
    json_object_set_new(j, "state", json_string("sleeping"));
    CHECK(cluster_state_from_json(j, &b) == -1, "unknown state accepted");
    json_decref(j);
}

static long long integer(redis *r, const char *fmt, const char *arg) {
    redisReply *reply = redis_call(r, err, sizeof err, fmt, arg);
    long long v = reply && reply->type == REDIS_REPLY_INTEGER ? reply->integer : -1;
    freeReplyObject(reply);
    return v;
}

/* Submits job `id` of n tasks, all queued, each estimated at `estimate`
 * seconds (0: none) for `devices`, its deadline 60 s away; 0 or -1 (why set). */
static int submit_timed(redis *r, const char *id, int n, int capacity, double estimate, int devices, problem *why) {
    cluster_job job = {.kind = n > 1 ? FORM_BATCH : FORM_JOB, .listed = true, .created = wall_now(),
                       .deadline = wall_now() + 60, .ntasks = n};
    snprintf(job.id, sizeof job.id, "%s", id);
    cluster_task tasks[8];
    sdx4_image inputs[8];
    bool queued[8];
    cluster_task_state states[8] = {0};
    uint8_t pixels[64 * 48 * 3];
    memset(pixels, 0x5a, sizeof pixels);
    for (int i = 0; i < n; i++) {
        make_task(&tasks[i], id, i);
        inputs[i] = (sdx4_image){64, 48, pixels};
        queued[i] = true;
    }
    double estimates[8] = {estimate, estimate, estimate, estimate, estimate, estimate, estimate, estimate};
    int rc = cluster_submit(r, &job, tasks, inputs, queued, states, estimate > 0 ? estimates : NULL, devices,
                            capacity, 60, why, err, sizeof err);
    for (int i = 0; i < n; i++) cluster_task_free(&tasks[i]);
    return rc;
}

static int submit(redis *r, const char *id, int n, int capacity, problem *why) {
    return submit_timed(r, id, n, capacity, 0, 0, why);
}

static void test_submit_bound(redis *r) {
    problem why = {0};
    const char *a = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1", *b = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb2";
    CHECK(submit(r, a, 2, 3, &why) == 0, "first submit: %s", err);
    CHECK(submit(r, b, 2, 3, &why) == -1 && why.kind == PROBLEM_QUEUE_FULL && why.retry_after > 0,
          "over the bound: kind %d", why.kind);
    CHECK(strstr(why.detail, "2 upscales are waiting"), "detail: %s", why.detail);
    CHECK(integer(r, "EXISTS sdx4:job:%s", b) == 0, "a refused job was written");
    CHECK(integer(r, "EXISTS sdx4:input:%s:0", b) == 0, "a refused job's input was written");
    CHECK(integer(r, "XLEN %s", CLUSTER_STREAM) == 2, "a refused job's entries were added");
    CHECK(submit(r, b, 1, 3, &why) == 0, "one more fits: %s", err);
    long long waiting = -1;
    CHECK(cluster_waiting(r, &waiting, err, sizeof err) == 0 && waiting == 3, "waiting %lld", waiting);

    /* a taken task no longer waits */
    redisContext *c = redis_borrow(r, 1, err, sizeof err);
    cluster_delivery d[4];
    int got = cluster_take(c, "w1", 1, 100, d, err, sizeof err);
    redis_release(r, c, got < 0);
    CHECK(got == 1 && !d[0].invalid[0] && strcmp(d[0].task.job_id, a) == 0 && d[0].task.index == 0 &&
              d[0].task.deliveries == 1,
          "take: %d %s", got, got > 0 ? d[0].invalid : err);
    CHECK(cluster_waiting(r, &waiting, err, sizeof err) == 0 && waiting == 2, "waiting after a take %lld", waiting);
    CHECK(submit(r, "ccccccccccccccccccccccccccccccc3", 1, 3, &why) == 0, "the slot freed by a take: %s", err);

    /* its input is there, pixel for pixel */
    sdx4_image in;
    CHECK(got == 1 && cluster_load_input(r, &d[0].task, &in, err, sizeof err) == 1 && in.width == 64 &&
              in.height == 48 && in.pixels[100] == 0x5a,
          "input");
    sdx4_image_free(&in);

    /* another consumer reclaims it (min idle 0): a second delivery */
    cluster_delivery again[4];
    int n = cluster_reclaim(r, "w2", 0, 4, again, err, sizeof err);
    CHECK(n == 1 && again[0].task.deliveries == 2 && strcmp(again[0].task.entry_id, d[0].task.entry_id) == 0,
          "reclaim: %d, deliveries %d", n, n > 0 ? again[0].task.deliveries : -1);
    /* held by w2: XCLAIM JUSTID keeps the count */
    const char *ids[] = {d[0].task.entry_id};
    CHECK(cluster_hold(r, "w2", ids, 1, err, sizeof err) == 0, "hold: %s", err);
    cluster_delivery third[4];
    n = cluster_reclaim(r, "w3", 0, 4, third, err, sizeof err);
    CHECK(n == 1 && third[0].task.deliveries == 3, "hold counted a delivery: %d",
          n > 0 ? third[0].task.deliveries : -1);
    CHECK(cluster_ack(r, d[0].task.entry_id, err, sizeof err) == 0, "ack: %s", err);
    CHECK(cluster_reclaim(r, "w3", 0, 4, third + 1, err, sizeof err) == 0, "an acked entry reclaimed");
    CHECK(cluster_waiting(r, &waiting, err, sizeof err) == 0 && waiting == 3, "waiting after ack %lld", waiting);
    for (int i = 0; i < n; i++) cluster_task_free(&third[i].task);
    cluster_task_free(&again[0].task);
    if (got == 1) cluster_task_free(&d[0].task);
    freeReplyObject(redis_call(r, err, sizeof err, "FLUSHALL"));
}

/* Queue-too-long across the cluster: the estimates of the entries in the
 * stream, what a running one has left, shared by the devices, against
 * the deadline (60 s here). */
static void test_submit_time(redis *r) {
    problem why = {0};
    const char *a = "a0000000000000000000000000000001", *b = "b0000000000000000000000000000002",
               *c = "c0000000000000000000000000000003";
    CHECK(submit_timed(r, a, 2, 100, 10, 1, &why) == 0, "20 s of 60: %s", err);
    CHECK(submit_timed(r, b, 1, 100, 30, 1, &why) == 0, "50 s of 60: %s", err);
    CHECK(submit_timed(r, c, 1, 100, 20, 1, &why) == -1 && why.kind == PROBLEM_QUEUE_TOO_LONG,
          "70 s of 60 admitted: kind %d", why.kind);
    CHECK(why.estimated_seconds > 69.9 && why.estimated_seconds < 71 && fabs(why.limit_seconds - 60) < 0.01 &&
              why.retry_after == 10,
          "estimated %g, limit %g, retry after %d", why.estimated_seconds, why.limit_seconds, why.retry_after);
    CHECK(integer(r, "EXISTS sdx4:job:%s", c) == 0 && integer(r, "XLEN %s", CLUSTER_STREAM) == 3,
          "a job refused as late was written");
    CHECK(submit_timed(r, c, 1, 100, 20, 2, &why) == 0, "two devices: 35 s of 60: %s", err);
    CHECK(submit_timed(r, "d0000000000000000000000000000004", 1, 100, 0, 1, &why) == 0,
          "a job without an estimate is not judged: %s", err);

    /* a running task counts what it has left: a's first, 8 of its 10 s run */
    redisContext *conn = redis_borrow(r, 1, err, sizeof err);
    cluster_delivery d[1];
    int got = cluster_take(conn, "w1", 1, 100, d, err, sizeof err);
    redis_release(r, conn, got < 0);
    cluster_task_state running = {.state = JOB_RUNNING, .total = 17, .started = wall_now() - 8};
    CHECK(got == 1 && cluster_report_progress(r, a, 0, &running, err, sizeof err) == 1, "running: %s", err);
    /* 2 + 10 + 30 + 20 ahead, and 1 */
    CHECK(submit_timed(r, "e0000000000000000000000000000005", 1, 100, 1, 1, &why) == -1 &&
              why.kind == PROBLEM_QUEUE_TOO_LONG && why.estimated_seconds > 62.5 && why.estimated_seconds < 64,
          "with a task running for 8 s: kind %d, estimated %g", why.kind, why.estimated_seconds);
    if (got == 1) cluster_task_free(&d[0].task);
    freeReplyObject(redis_call(r, err, sizeof err, "FLUSHALL"));
}

static void test_finish_task(redis *r) {
    problem why;
    const char *id = "dddddddddddddddddddddddddddddddd";
    CHECK(submit(r, id, 2, 100, &why) == 0, "submit: %s", err);
    redisContext *sub = redis_borrow(r, 2, err, sizeof err);
    redisReply *reply = sub ? redisCommand(sub, "PSUBSCRIBE %s", CLUSTER_EVENTS_PATTERN) : NULL;
    CHECK(reply != NULL, "psubscribe");
    freeReplyObject(reply);

    cluster_task_state s = {.state = JOB_RUNNING, .step = 1, .total = 17, .started = wall_now()};
    CHECK(cluster_report_progress(r, id, 0, &s, err, sizeof err) == 1, "progress: %s", err);
    s.state = JOB_SUCCEEDED, s.step = 17, s.finished = wall_now(), s.width = 256, s.height = 192, s.bytes = 5;
    CHECK(cluster_finish_task(r, id, 0, &s, "image", 5, 60, 1 << 20, NULL, NULL, err, sizeof err) == 1, "first finish");
    cluster_task_state late = s;
    late.state = JOB_FAILED;
    problem_set(&late.error, PROBLEM_UPSCALE_FAILED, "late");
    CHECK(cluster_finish_task(r, id, 0, &late, "other", 5, 60, 1 << 20, NULL, NULL, err, sizeof err) == 0,
          "a second finish changed a final task");
    late.state = JOB_RUNNING;
    CHECK(cluster_report_progress(r, id, 0, &late, err, sizeof err) == 0, "progress after final");
    CHECK(integer(r, "EXISTS sdx4:input:%s:0", id) == 0, "the input of a finished task kept");

    cluster_job job;
    cluster_task_state states[FORM_MAX_IMAGES];
    CHECK(cluster_load_job(r, id, &job, states, err, sizeof err) == 1, "load: %s", err);
    CHECK(job.state == JOB_QUEUED && job.ntasks == 2 && job.kind == FORM_BATCH, "job before its end");
    CHECK(states[0].state == JOB_SUCCEEDED && states[0].step == 17 && states[1].state == JOB_QUEUED,
          "task states");
    cluster_job_free(&job);

    cluster_task_state f = {.state = JOB_FAILED, .finished = wall_now()};
    problem_set(&f.error, PROBLEM_TIMEOUT, "not finished in time");
    CHECK(cluster_finish_task(r, id, 1, &f, NULL, 0, 60, 1 << 20, &job, states, err, sizeof err) == 2,
          "the last task ends the job");
    /* the finish read the job as it ended: its report needs no second read,
     * which a DELETE (cluster_forget) could come before */
    CHECK(job.ntasks == 2 && job.state == JOB_FAILED && job.finished > 0 && states[0].state == JOB_SUCCEEDED &&
              states[1].state == JOB_FAILED && strcmp(job.id, id) == 0,
          "the ended job from the finish: %d %d", job.ntasks, job.state);
    cluster_job_free(&job);
    CHECK(cluster_load_job(r, id, &job, states, err, sizeof err) == 1 && job.state == JOB_FAILED && job.finished > 0,
          "a batch with an image out of time failed: %d", job.state);
    json_t *doc = cluster_job_document(&job, states, "pending");
    CHECK(strcmp(json_string_value(json_object_get(doc, "status")), "failed") == 0 &&
              json_object_get(doc, "finished_at") && json_object_get(doc, "error"),
          "document");
    json_decref(doc);
    cluster_job_free(&job);

    void *data;
    size_t len;
    CHECK(cluster_load_result(r, id, 0, &data, &len, err, sizeof err) == 1 && len == 5 && memcmp(data, "image", 5) == 0,
          "result");
    free(data);
    CHECK(cluster_load_result(r, id, 1, &data, &len, err, sizeof err) == 0, "a failed task's result");
    CHECK(cluster_load_job(r, "ffffffffffffffffffffffffffffffff", &job, states, err, sizeof err) == 0, "unknown job");
    CHECK(cluster_load_job(r, "../x", &job, states, err, sizeof err) == 0, "a malformed id");

    /* the events came through pub/sub: progress, then two finishes (not
     * the refused ones) */
    static const job_state expected[] = {JOB_RUNNING, JOB_SUCCEEDED, JOB_FAILED};
    for (int i = 0; sub && i < 3; i++) {
        redisReply *m = NULL;
        CHECK(redisGetReply(sub, (void **)&m) == REDIS_OK && m && m->elements == 4, "event %d", i);
        if (!m || m->elements != 4) break;
        char job_id[33];
        int index;
        cluster_task_state got;
        CHECK(cluster_parse_event(m->element[2]->str, m->element[3]->str, m->element[3]->len, job_id, &index, &got) == 0 &&
                  strcmp(job_id, id) == 0 && index == (i == 2) && got.state == expected[i],
              "event %d: %s", i, m->element[3]->str);
        freeReplyObject(m);
    }
    char job_id[33];
    int index;
    cluster_task_state got;
    CHECK(cluster_parse_event("sdx4:events:nope", "{}", 2, job_id, &index, &got) == -1, "bad channel");
    CHECK(cluster_parse_event("sdx4:events:dddddddddddddddddddddddddddddddd", "{\"task\":1}", 10, job_id, &index,
                              &got) == -1,
          "an event without a state");
    redis_release(r, sub, true); /* subscribed: not for the pool */

    /* a DELETE takes its results out of the results' byte budget with their keys */
    CHECK(results_bytes(r) == 5, "the result's 5 bytes counted: %lld", results_bytes(r));
    CHECK(cluster_forget(r, id, 2, err, sizeof err) == 0, "forget: %s", err);
    redisReply *left = redis_call(r, err, sizeof err, "ZCARD sdx4:results");
    CHECK(results_bytes(r) == 0 && left && left->integer == 0, "a forgotten job's result still counted: %lld bytes",
          results_bytes(r));
    freeReplyObject(left);
    CHECK(cluster_load_job(r, id, &job, states, err, sizeof err) == 0, "the forgotten job");

    /* a synchronous request's result, read once, leaves the budget; dropped again, nothing changes */
    const char *once = "dddddddddddddddddddddddddddddddf";
    CHECK(submit(r, once, 1, 100, &why) == 0, "submit: %s", err);
    CHECK(cluster_finish_task(r, once, 0, &s, "pixels", 6, 60, 1 << 20, NULL, NULL, err, sizeof err) == 2 &&
              results_bytes(r) == 6,
          "finish: %s", err);
    for (int i = 0; i < 2; i++)
        CHECK(cluster_drop_result(r, once, 0, err, sizeof err) == 0 && results_bytes(r) == 0, "drop %d: %lld bytes",
              i, results_bytes(r));
    CHECK(cluster_load_result(r, once, 0, &data, &len, err, sizeof err) == 0, "a dropped result");
    freeReplyObject(redis_call(r, err, sizeof err, "FLUSHALL"));
}

/* A webhook's delivery written by its sender: "pending" never overwrites
 * an outcome (a delivery may report first), the job's load and document
 * show it, a job gone is left alone. */
static void test_webhook_state(redis *r) {
    problem why;
    const char *id = "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeee1";
    CHECK(submit(r, id, 1, 100, &why) == 0, "submit: %s", err);
    CHECK(cluster_webhook_state(r, id, "failed", 3, "HTTP 500", err, sizeof err) == 0, "failed: %s", err);
    CHECK(cluster_webhook_state(r, id, "pending", 0, NULL, err, sizeof err) == 0, "pending: %s", err);
    cluster_job job;
    cluster_task_state states[FORM_MAX_IMAGES];
    CHECK(cluster_load_job(r, id, &job, states, err, sizeof err) == 1 && strcmp(job.webhook, "failed") == 0 &&
              job.webhook_attempts == 3 && strcmp(job.webhook_error, "HTTP 500") == 0,
          "loaded: \"%s\" %d \"%s\"", job.webhook, job.webhook_attempts, job.webhook_error);
    job.webhook_url = strdup("https://hooks.example/x");
    json_t *doc = cluster_job_document(&job, states, "pending"), *hook = json_object_get(doc, "webhook");
    CHECK(strcmp(json_string_value(json_object_get(hook, "status")), "failed") == 0 &&
              json_integer_value(json_object_get(hook, "attempts")) == 3 &&
              strcmp(json_string_value(json_object_get(hook, "error")), "HTTP 500") == 0,
          "document's webhook");
    json_decref(doc);
    cluster_job_free(&job);
    const char *gone = "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeee2";
    CHECK(cluster_webhook_state(r, gone, "delivered", 1, NULL, err, sizeof err) == 0 &&
              integer(r, "EXISTS sdx4:job:%s", gone) == 0,
          "a job gone was written");
    freeReplyObject(redis_call(r, err, sizeof err, "FLUSHALL"));
}

static void test_cancel(redis *r) {
    problem why;
    const char *id = "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";
    CHECK(submit(r, id, 3, 100, &why) == 0, "submit: %s", err);
    redisContext *c = redis_borrow(r, 1, err, sizeof err);
    cluster_delivery d[1];
    int got = cluster_take(c, "w1", 1, 100, d, err, sizeof err);
    redis_release(r, c, got < 0);
    CHECK(got == 1, "take");
    int reason = -1;
    CHECK(cluster_stop_reason(r, id, &reason, err, sizeof err) == 0 && reason == STOP_NONE, "no reason yet");
    CHECK(cluster_cancel(r, id, STOP_TIMEOUT, 60, err, sizeof err) == 0, "cancel: %s", err);
    CHECK(cluster_stop_reason(r, id, &reason, err, sizeof err) == 0 && reason == STOP_TIMEOUT, "reason %d", reason);
    CHECK(integer(r, "XLEN %s", CLUSTER_STREAM) == 1, "the waiting entries stayed");
    long long waiting = -1;
    CHECK(cluster_waiting(r, &waiting, err, sizeof err) == 0 && waiting == 0, "waiting %lld", waiting);
    CHECK(cluster_cancel(r, id, 9, 60, err, sizeof err) == -1, "an unknown reason accepted");
    if (got == 1) cluster_task_free(&d[0].task);
    freeReplyObject(redis_call(r, err, sizeof err, "FLUSHALL"));
}

static void test_budget(redis *r) {
    problem why;
    const char *id = "99999999999999999999999999999999";
    CHECK(submit(r, id, 3, 100, &why) == 0, "submit: %s", err);
    char result[1000];
    memset(result, 'r', sizeof result);
    cluster_task_state s = {.state = JOB_SUCCEEDED, .bytes = sizeof result};
    for (int i = 0; i < 3; i++)
        CHECK(cluster_finish_task(r, id, i, &s, result, sizeof result, 60, 2500, NULL, NULL, err, sizeof err) >= 1, "finish %d", i);
    void *data;
    size_t len;
    CHECK(cluster_load_result(r, id, 0, &data, &len, err, sizeof err) == 0, "the oldest kept over the budget");
    for (int i = 1; i < 3; i++) {
        CHECK(cluster_load_result(r, id, i, &data, &len, err, sizeof err) == 1 && len == sizeof result, "result %d", i);
        free(data);
    }
    redisReply *reply = redis_call(r, err, sizeof err, "GET sdx4:results:bytes");
    CHECK(reply && reply->str && atoi(reply->str) == 2000, "bytes counted: %s", reply && reply->str ? reply->str : "none");
    freeReplyObject(reply);
    freeReplyObject(redis_call(r, err, sizeof err, "FLUSHALL"));
}

static void test_bad_entries(redis *r) {
    CHECK(cluster_ensure_group(r, err, sizeof err) == 0, "group: %s", err);
    CHECK(cluster_ensure_group(r, err, sizeof err) == 0, "a second ensure: %s", err);
    freeReplyObject(redis_call(r, err, sizeof err, "XADD %s * job %s task 1 record %s", CLUSTER_STREAM,
                               "abababababababababababababababab", "{not json"));
    freeReplyObject(redis_call(r, err, sizeof err, "XADD %s * job %s task 0 record %s", CLUSTER_STREAM,
                               "abababababababababababababababab", "{\"job\":\"abababababababababababababababab\"}"));
    freeReplyObject(redis_call(r, err, sizeof err, "XADD %s * nothing here", CLUSTER_STREAM));
    redisContext *c = redis_borrow(r, 1, err, sizeof err);
    cluster_delivery d[4];
    int got = cluster_take(c, "w1", 4, 100, d, err, sizeof err);
    redis_release(r, c, got < 0);
    CHECK(got == 3, "took %d", got);
    if (got == 3) {
        CHECK(strstr(d[0].invalid, "not JSON") && d[0].task.index == 1 &&
                  strcmp(d[0].task.job_id, "abababababababababababababababab") == 0,
              "%s", d[0].invalid);
        CHECK(strstr(d[1].invalid, "\"index\""), "%s", d[1].invalid);
        CHECK(strstr(d[2].invalid, "no record") && d[2].task.index == -1, "%s", d[2].invalid);
    }
    freeReplyObject(redis_call(r, err, sizeof err, "FLUSHALL"));
}

static void test_workers(redis *r) {
    json_t *info = json_pack("{s:s,s:s}", "name", "w-1", "device", "cpu"), *list;
    CHECK(cluster_register(r, "w-1", info, 2, 10, err, sizeof err) == 0, "register: %s", err);
    CHECK(cluster_workers(r, &list, err, sizeof err) == 0 && json_array_size(list) == 1 &&
              json_integer_value(json_object_get(json_array_get(list, 0), "busy")) == 2,
          "workers");
    json_decref(list);
    /* an expired registration leaves the list */
    freeReplyObject(redis_call(r, err, sizeof err, "DEL sdx4:worker:w-1"));
    CHECK(cluster_workers(r, &list, err, sizeof err) == 0 && json_array_size(list) == 0, "expired listed");
    CHECK(integer(r, "SCARD %s", "sdx4:workers") == 0, "expired name kept");
    json_decref(list);
    CHECK(cluster_register(r, "w-1", info, 0, 10, err, sizeof err) == 0 &&
              cluster_unregister(r, "w-1", err, sizeof err) == 0 && cluster_workers(r, &list, err, sizeof err) == 0 &&
              json_array_size(list) == 0,
          "unregister");
    json_decref(list);
    json_decref(info);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    test_record_round_trip();
    test_state_round_trip();
    test_redis srv = {0};
    if (test_redis_start(&srv) != 0) {
        fprintf(stderr, "SKIP: redis-server could not be started (scripts/install-deps.sh installs it)\n");
        return test_failures ? 1 : 77;
    }
    redis *r = redis_open(srv.url, 2, err, sizeof err);
    CHECK(r != NULL, "open: %s", err);
    if (r) {
        test_submit_bound(r);
        test_submit_time(r);
        test_finish_task(r);
        test_webhook_state(r);
        test_cancel(r);
        test_budget(r);
        test_bad_entries(r);
        test_workers(r);
        redis_close(r);
    }
    test_redis_remove(&srv);
    printf("%d checks, %d failures\n", test_checks, test_failures);
    return test_failures ? 1 : 0;
}
