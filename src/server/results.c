/*
 * results.c - async jobs' images in S3-compatible storage (see results.h).
 *
 * Why a failed upload fails the task. A job that says "succeeded" promises
 * a URL per image; keeping the image in memory and saying the upload failed
 * would break that promise for every client that reads only result_url,
 * and in cluster mode no API node holds the image at all. A failure is
 * reported at once (storage-failed, 502, with the store's answer), so the
 * client can submit again; the upload takes at most --s3-timeout.
 *
 * Why /result redirects (307) rather than streams the object through: the
 * bytes never cross an HTTP thread, so a slow or unreachable store cannot
 * hold the server's few HTTP threads, and an API node needs no memory for
 * results. The redirect carries no credentials: the presigned URL is its
 * own authorization.
 *
 * Cluster mode. A worker stores every image, a synchronous request's
 * too: whichever node waits on a task, the bytes then never pass through
 * Redis (whose memory is the cluster's scarcest), and the task's state
 * carries only that the object exists. The waiting node reads a
 * synchronous answer back (bounded by the size the task recorded) and
 * deletes its object, which nobody can ask for again. Keys are derived
 * from the settings, so API nodes and workers must share --s3-prefix.
 */
#include "results.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "imageio.h"
#include "log.h"
#include "objstore.h"

int results_open(server *srv) {
    const server_config *c = &srv->cfg;
    if (!c->s3_bucket) return 0;
    char err[256];
    objstore_settings s = {.bucket = c->s3_bucket, .endpoint = c->s3_endpoint, .region = c->s3_region,
                           .path_style = c->s3_path_style, .timeout = c->s3_timeout,
                           .ca_file = c->outbound_ca_file};
    if (!(srv->results = objstore_open(&s, err, sizeof err))) {
        fprintf(stderr, "sdx4: %s\n", err);
        return -1;
    }
    log_event(LOG_INFO, "results_store",
              json_pack("{s:s,s:s?,s:s?,s:b,s:i}", "bucket", c->s3_bucket, "endpoint", c->s3_endpoint,
                        "prefix", c->s3_prefix, "path_style", c->s3_path_style, "url_ttl", c->s3_url_ttl));
    return 0;
}

void results_close(server *srv) {
    objstore_close(srv->results);
    srv->results = NULL;
}

bool results_stored(const server *srv, bool listed) { return srv->results && listed; }

/* <prefix>/<job id>/<index>.<ext>; the prefix without its slashes at the ends. */
static void object_key(const server *srv, const char *job_id, int index, image_format format, char *key,
                       size_t size) {
    const char *prefix = srv->cfg.s3_prefix ? srv->cfg.s3_prefix : "";
    while (*prefix == '/') prefix++;
    int plen = (int)strlen(prefix);
    while (plen && prefix[plen - 1] == '/') plen--;
    const char *ext = format == IMAGE_JPEG ? "jpg" : imageio_format_name(format);
    snprintf(key, size, "%.*s%s%s/%d.%s", plen, prefix, plen ? "/" : "", job_id, index, ext);
}

void results_store(server *srv, const char *job_id, bool listed, const task *t, task_outcome *out) {
    if (out->state == JOB_SUCCEEDED && results_stored(srv, listed))
        results_upload(srv, job_id, t->index, t->opts.format, out);
}

int results_upload(server *srv, const char *job_id, int index, image_format format, task_outcome *out) {
    char key[1024], err[512];
    object_key(srv, job_id, index, format, key, sizeof key);
    double t0 = mono_now();
    if (objstore_put(srv->results, key, out->output, out->len, imageio_mime_type(format), err, sizeof err) == 0) {
        log_event(LOG_DEBUG, "result_stored", json_pack("{s:s,s:I,s:f}", "key", key, "bytes",
                                                        (json_int_t)out->len, "seconds", mono_now() - t0));
        return 0;
    }
    log_event(LOG_ERROR, "result_store_failed", json_pack("{s:s,s:s}", "key", key, "error", err));
    problem_set(&out->error, PROBLEM_STORAGE_FAILED, "the image was made but could not be stored: %s", err);
    out->state = JOB_FAILED;
    free(out->output);
    out->output = NULL;
    out->len = 0;
    return -1;
}

int results_fetch(server *srv, const char *job_id, int index, image_format format, size_t bytes, void **data,
                  char *err, size_t n) {
    char key[1024];
    object_key(srv, job_id, index, format, key, sizeof key);
    size_t len;
    if (objstore_get(srv->results, key, bytes, data, &len, err, n)) return -1;
    if (len == bytes) return 0;
    snprintf(err, n, "GET %s: %zu bytes, but its task recorded %zu", key, len, bytes);
    free(*data);
    *data = NULL;
    return -1;
}

int results_delete(server *srv, const char *job_id, int index, image_format format, char *err, size_t n) {
    char key[1024];
    object_key(srv, job_id, index, format, key, sizeof key);
    return objstore_delete(srv->results, key, err, n);
}

int results_url(const server *srv, const char *job_id, const task *t, time_t now, char *url,
                size_t size) {
    char key[1024];
    object_key(srv, job_id, t->index, t->opts.format, key, sizeof key);
    return objstore_presign_at(srv->results, key, srv->cfg.s3_url_ttl, now, url, size);
}

json_t *results_link(const server *srv, const char *job_id, int index, image_format format, time_t now) {
    char key[1024], url[RESULTS_URL_SIZE], expires_at[32];
    object_key(srv, job_id, index, format, key, sizeof key);
    if (objstore_presign_at(srv->results, key, srv->cfg.s3_url_ttl, now, url, sizeof url)) return NULL;
    time_t expires = now + srv->cfg.s3_url_ttl;
    struct tm tm;
    gmtime_r(&expires, &tm);
    strftime(expires_at, sizeof expires_at, "%Y-%m-%dT%H:%M:%SZ", &tm);
    return json_pack("{s:i,s:s,s:s}", "index", index, "result_url", url, "expires_at", expires_at);
}

json_t *results_links(const server *srv, const char *job_id, const task *tasks, int ntasks) {
    json_t *links = json_array();
    time_t now = time(NULL);
    for (int i = 0; i < ntasks; i++) {
        json_t *link = tasks[i].state == JOB_SUCCEEDED
                           ? results_link(srv, job_id, tasks[i].index, tasks[i].opts.format, now)
                           : NULL;
        if (link) json_array_append_new(links, link);
    }
    return links;
}
