/*
 * cluster_control_plane.c - what cluster mode's control plane costs, alone.
 *
 * A benchmark tool, not a product mode: it runs the protocol of cluster.h
 * against a real Redis with the engine replaced by a fixed sleep, so that
 * what is measured is Redis and the protocol, not inference.
 *
 *   submitters  cluster_submit a one-image job (a 64x64 input, as an API
 *               node does after decoding), at --rate jobs per second in
 *               all (0: as fast as they can);
 *   workers     --workers threads, each: cluster_take (XREADGROUP BLOCK),
 *               cluster_load_input, sleep --sleep-ms, cluster_finish_task
 *               with a 1 KB result, cluster_ack -- a worker's every call;
 *   listener    one PSUBSCRIBE of the job events, as an API node holds:
 *               a job is done when its final state arrives there.
 *
 * Added latency of a job = (final event received - submit started) - the
 * sleep: everything cluster mode adds to a job's own inference time.
 * Throughput = jobs completed / (last completion - first submit).
 *
 * bench/cluster_control_plane.sh starts a redis-server and runs it.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cluster.h"
#include "redis.h"
#include "server.h"

static struct {
    redis *r;
    int jobs, workers, submitters, sleep_ms;
    double rate;
    unsigned long long nonce;
    double *submitted, *done; /* [jobs], mono_now() */
    atomic_int next, completed, failed;
    atomic_bool stop;
    double start;
} B;

static void job_id_of(int i, char out[33]) { snprintf(out, 33, "%016llx%016llx", B.nonce, (unsigned long long)i); }

static int index_of(const char *id) {
    unsigned long long nonce, i;
    if (sscanf(id, "%16llx%16llx", &nonce, &i) != 2 || nonce != B.nonce || i >= (unsigned long long)B.jobs)
        return -1;
    return (int)i;
}

static void *submitter(void *arg) {
    (void)arg;
    static uint8_t pixels[64 * 64 * 3];
    sdx4_image input = {.width = 64, .height = 64, .pixels = pixels};
    char err[256];
    for (;;) {
        int i = atomic_fetch_add(&B.next, 1);
        if (i >= B.jobs) break;
        if (B.rate > 0) { /* paced: job i is due at start + i / rate */
            double wait = B.start + i / B.rate - mono_now();
            if (wait > 0) nanosleep(&(struct timespec){(time_t)wait, (long)((wait - (time_t)wait) * 1e9)}, NULL);
        }
        double wall = wall_now();
        cluster_job job = {.kind = FORM_JOB, .listed = true, .created = wall, .deadline = wall + 600, .ntasks = 1};
        job_id_of(i, job.id);
        snprintf(job.client, sizeof job.client, "bench");
        snprintf(job.request_id, sizeof job.request_id, "bench-%d", i);
        cluster_task task = {.index = 0, .kind = FORM_JOB, .created = wall, .deadline = wall + 600,
                             .width = 64, .height = 64};
        memcpy(task.job_id, job.id, sizeof task.job_id);
        task.opts.steps = 20;
        task.opts.format = IMAGE_PNG;
        task.opts.guidance_scale = 9;
        task.opts.noise_level = 20.0 / 350;
        task.opts.prompt = "";
        task.opts.negative_prompt = "";
        bool queued = true;
        cluster_task_state state = {.state = JOB_QUEUED, .total = 20};
        problem why = {0};
        B.submitted[i] = mono_now();
        if (cluster_submit(B.r, &job, &task, &input, &queued, &state, NULL, 0, 1000000, 600, &why, err,
                           sizeof err) != 0) {
            fprintf(stderr, "submit %d: %s %s\n", i, why.detail, err);
            atomic_fetch_add(&B.failed, 1);
        }
    }
    return NULL;
}

static void *worker(void *arg) {
    char name[32], err[256];
    snprintf(name, sizeof name, "bench-%d", (int)(intptr_t)arg);
    static uint8_t result[1024];
    redisContext *c = NULL;
    while (!atomic_load(&B.stop)) {
        if (!c && !(c = redis_borrow(B.r, 0.1, err, sizeof err))) continue;
        cluster_delivery d;
        int n = cluster_take(c, name, 1, 100, &d, err, sizeof err);
        if (n < 0) {
            redis_release(B.r, c, true);
            c = NULL;
            continue;
        }
        if (n == 0) continue;
        sdx4_image input = {0};
        if (d.invalid[0]) fprintf(stderr, "a refused record: %s\n", d.invalid);
        else if (cluster_load_input(B.r, &d.task, &input, err, sizeof err) != 1) fprintf(stderr, "no input: %s\n", err);
        else {
            free(input.pixels);
            nanosleep(&(struct timespec){B.sleep_ms / 1000, (long)(B.sleep_ms % 1000) * 1000000}, NULL);
            double wall = wall_now();
            cluster_task_state s = {.state = JOB_SUCCEEDED, .step = 20, .total = 20, .started = wall,
                                    .finished = wall, .width = 256, .height = 256, .bytes = sizeof result};
            snprintf(s.worker, sizeof s.worker, "%s", name);
            cluster_job job; /* read as it ends, as a worker does for its report */
            cluster_task_state states[1];
            int rc = cluster_finish_task(B.r, d.task.job_id, 0, &s, result, sizeof result, 600, (size_t)1 << 32,
                                         &job, states, err, sizeof err);
            if (rc < 0) fprintf(stderr, "finish: %s\n", err);
            if (rc == 2) cluster_job_free(&job);
        }
        cluster_ack(B.r, d.task.entry_id, err, sizeof err);
        cluster_task_free(&d.task);
    }
    if (c) redis_release(B.r, c, false);
    return NULL;
}

static void *listener(void *arg) {
    (void)arg;
    char err[256];
    redisContext *c = redis_borrow(B.r, 1.0, err, sizeof err);
    redisReply *reply = c ? redisCommand(c, "PSUBSCRIBE %s", CLUSTER_EVENTS_PATTERN) : NULL;
    if (!reply) {
        fprintf(stderr, "listener: %s\n", c ? c->errstr : err);
        exit(1);
    }
    freeReplyObject(reply);
    while (atomic_load(&B.completed) + atomic_load(&B.failed) < B.jobs) {
        void *r;
        if (redisGetReply(c, &r) != REDIS_OK) {
            if (c->err == REDIS_ERR_IO || c->err == REDIS_ERR_EOF) break;
            continue;
        }
        reply = r;
        /* pmessage, pattern, channel, message */
        if (reply->type == REDIS_REPLY_ARRAY && reply->elements == 4) {
            char id[33];
            int index;
            cluster_task_state s;
            if (cluster_parse_event(reply->element[2]->str, reply->element[3]->str, reply->element[3]->len, id,
                                    &index, &s) == 0 &&
                s.state >= JOB_SUCCEEDED) {
                int i = index_of(id);
                if (i >= 0 && B.done[i] == 0) {
                    B.done[i] = mono_now();
                    atomic_fetch_add(&B.completed, 1);
                }
            }
        }
        freeReplyObject(reply);
    }
    redis_release(B.r, c, true);
    return NULL;
}

static int compare(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    const char *url = NULL;
    B.jobs = 10000, B.workers = 64, B.submitters = 8, B.sleep_ms = 10;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--redis")) url = argv[i + 1];
        else if (!strcmp(argv[i], "--jobs")) B.jobs = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--workers")) B.workers = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--submitters")) B.submitters = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--sleep-ms")) B.sleep_ms = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--rate")) B.rate = atof(argv[i + 1]);
        else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (!url || B.jobs < 1 || B.workers < 1 || B.submitters < 1 || B.sleep_ms < 0) {
        fprintf(stderr, "usage: cluster_control_plane --redis URL [--jobs N] [--workers M] [--submitters K] "
                        "[--sleep-ms S] [--rate JOBS_PER_S]\n");
        return 2;
    }
    char err[256];
    if (!(B.r = redis_open(url, 2.0, err, sizeof err)) || cluster_ensure_group(B.r, err, sizeof err) != 0) {
        fprintf(stderr, "redis: %s\n", err);
        return 1;
    }
    B.nonce = ((unsigned long long)time(NULL) << 20) ^ (unsigned long long)clock();
    B.submitted = calloc((size_t)B.jobs, sizeof *B.submitted);
    B.done = calloc((size_t)B.jobs, sizeof *B.done);
    pthread_t listen_thread, *workers = calloc((size_t)B.workers, sizeof *workers),
                            *submitters = calloc((size_t)B.submitters, sizeof *submitters);
    pthread_create(&listen_thread, NULL, listener, NULL);
    for (int i = 0; i < B.workers; i++) pthread_create(&workers[i], NULL, worker, (void *)(intptr_t)i);
    nanosleep(&(struct timespec){0, 300000000}, NULL); /* subscribed, workers blocked in XREADGROUP */
    B.start = mono_now();
    for (int i = 0; i < B.submitters; i++) pthread_create(&submitters[i], NULL, submitter, NULL);
    for (int i = 0; i < B.submitters; i++) pthread_join(submitters[i], NULL);
    pthread_join(listen_thread, NULL);
    atomic_store(&B.stop, true);
    for (int i = 0; i < B.workers; i++) pthread_join(workers[i], NULL);

    int n = 0;
    double last = B.start, *added = calloc((size_t)B.jobs, sizeof *added);
    for (int i = 0; i < B.jobs; i++) {
        if (B.done[i] == 0) continue;
        added[n++] = (B.done[i] - B.submitted[i]) * 1e3 - B.sleep_ms;
        if (B.done[i] > last) last = B.done[i];
    }
    qsort(added, (size_t)n, sizeof *added, compare);
    double seconds = last - B.start;
    char rate[32] = "max";
    if (B.rate > 0) snprintf(rate, sizeof rate, "%g/s", B.rate);
    printf("jobs %d done %d failed %d | workers %d, sleep %d ms, submitters %d, offered %s\n", B.jobs, n,
           atomic_load(&B.failed), B.workers, B.sleep_ms, B.submitters, rate);
    if (n) {
        printf("throughput %.0f jobs/s over %.2f s\n", n / seconds, seconds);
        printf("added latency ms: p50 %.2f  p90 %.2f  p99 %.2f  max %.2f\n", added[n / 2], added[n * 9 / 10],
               added[n * 99 / 100], added[n - 1]);
    }
    redis_close(B.r);
    free(added);
    free(B.submitted);
    free(B.done);
    free(workers);
    free(submitters);
    return n == B.jobs ? 0 : 1;
}
