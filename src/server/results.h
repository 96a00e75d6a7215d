/*
 * results.h - async jobs' images in S3-compatible storage (--s3-bucket).
 *
 * With a bucket set, each image of a listed job (POST /jobs, an async
 * batch) is uploaded by the worker that made it, under
 * <s3-prefix>/<job id>/<index>.<ext>, before the task is reported done; the
 * job document then gives a presigned URL per image ("results"), and GET
 * /jobs/{id}/result of a one-image job redirects to it (307). Synchronous
 * requests are answered from memory as without a bucket.
 */
#ifndef SDX4_SERVER_RESULTS_H
#define SDX4_SERVER_RESULTS_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "jobs.h"
#include "server.h"

/* Room for a presigned URL, a session token's included. */
#define RESULTS_URL_SIZE 4096

/* Opens srv->results when --s3-bucket is set: 0, or -1 with the reason on
 * stderr. Nothing is contacted: a store that is down fails the first job. */
int results_open(server *srv);
void results_close(server *srv);

/* Whether the images of a job go to the store (it is listed and a bucket
 * is set). Such jobs bypass the result cache: an image taken from the
 * cache would have no object behind its URL. */
bool results_stored(const server *srv, const job *j);

/* From a worker, once task t's image is encoded into `out`: uploads it when
 * its job's images are stored. An upload that fails fails the task (a
 * storage-failed problem saying why); its image is dropped. */
void results_store(server *srv, const task *t, task_outcome *out);

/* Task t's presigned URL, valid for --s3-url-ttl from now; -1 if it does
 * not fit `size`. */
int results_url(const server *srv, const task *t, char *url, size_t size);

/* The job document's "results": [{index, result_url, expires_at}] for the
 * first `ntasks` tasks of j that succeeded. */
json_t *results_links(const server *srv, job *j, int ntasks);

#endif
