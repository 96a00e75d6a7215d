/*
 * results.h - async jobs' images in S3-compatible storage (--s3-bucket).
 *
 * With a bucket set, each image of a listed job (POST /jobs, an async
 * batch) is uploaded by the worker that made it, under
 * <s3-prefix>/<job id>/<index>.<ext>, before the task is reported done; the
 * job document then gives a presigned URL per image ("results"), and GET
 * /jobs/{id}/result of a one-image job redirects to it (307). Synchronous
 * requests are answered from memory as without a bucket.
 *
 * In cluster mode (--redis) a worker uploads every image it makes, a
 * synchronous request's included, and its task's state says so ("stored")
 * instead of carrying the bytes through Redis: the API node that waits on
 * a synchronous request fetches the image back (results_fetch), and a
 * DELETE removes the job's objects (results_delete).
 *
 * A job is named by its id and a task read for its index, format and
 * state only: this module never calls into jobs.c, so that the job store
 * (jobs.c today, a Redis one in cluster mode) can call it.
 */
#ifndef SDX4_SERVER_RESULTS_H
#define SDX4_SERVER_RESULTS_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include <jansson.h>

#include "imageio.h"
#include "jobs.h"
#include "server.h"

/* Room for a presigned URL, a session token's included. */
#define RESULTS_URL_SIZE 4096

/* Opens srv->results when --s3-bucket is set: 0, or -1 with the reason on
 * stderr. Nothing is contacted: a store that is down fails the first job. */
int results_open(server *srv);
void results_close(server *srv);

/* Whether the images of a job, listed or not, go to the store. Such jobs
 * bypass the result cache: an image taken from the cache would have no
 * object behind its URL. */
bool results_stored(const server *srv, bool listed);

/* From a worker, once task t's image is encoded into `out`: uploads it when
 * its job's images are stored. An upload that fails fails the task (a
 * storage-failed problem saying why); its image is dropped. */
void results_store(server *srv, const char *job_id, bool listed, const task *t, task_outcome *out);

/* Uploads the image in `out` (a success) as image `index` of the job: 0,
 * or -1 with `out` turned into a failure (storage-failed, saying why) and
 * its image dropped. results_store's upload, for cluster workers, which
 * store every image. */
int results_upload(server *srv, const char *job_id, int index, image_format format, task_outcome *out);

/* Image `index` of the job back from the store, `bytes` long as its task
 * recorded (a larger object is not read past that): 0 with `*data`
 * (malloc'd) set, or -1 with `err` saying why. */
int results_fetch(server *srv, const char *job_id, int index, image_format format, size_t bytes, void **data,
                  char *err, size_t err_size);

/* Removes image `index` of the job from the store (none there is no
 * error). */
int results_delete(server *srv, const char *job_id, int index, image_format format, char *err, size_t err_size);

/* The presigned URL of image `index` of a job, valid for --s3-url-ttl from
 * `now`; -1 if it does not fit `size`. */
int results_url(const server *srv, const char *job_id, const task *t, time_t now, char *url,
                size_t size);

/* The job document's "results": [{index, result_url, expires_at}] for each
 * of the `ntasks` tasks that succeeded. */
json_t *results_links(const server *srv, const char *job_id, const task *tasks, int ntasks);
/* One entry of them, for image `index` of the job, signed at `now`; NULL
 * if its URL does not fit. */
json_t *results_link(const server *srv, const char *job_id, int index, image_format format, time_t now);

#endif
