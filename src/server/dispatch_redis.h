/*
 * dispatch_redis.h - an API node's dispatcher in cluster mode (serve
 * --redis URL): jobs.c's tasks go to the workers behind Redis, and the
 * jobs of every node are found here (dispatch.h's shared dispatcher).
 */
#ifndef SDX4_SERVER_DISPATCH_REDIS_H
#define SDX4_SERVER_DISPATCH_REDIS_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "dispatch.h"
#include "redis.h"
#include "server.h"

typedef struct dispatch_redis dispatch_redis;

/* Starts the subscriber and keeper threads on `r` (which must outlive
 * dispatch_redis_destroy); NULL with `err` set if one cannot start. */
dispatch_redis *dispatch_redis_create(server *srv, redis *r, char *err, size_t err_size);
/* Stops the threads; the Redis work still asked of it (cancels of the
 * jobs just drained) gets until `deadline` (mono_now() clock). */
void dispatch_redis_destroy(dispatch_redis *d, double deadline);
dispatch dispatch_redis_dispatch(dispatch_redis *d);

/* What the cluster looked like at the last look (once a second): whether
 * Redis answered (`why` says what failed when not) and the live workers
 * (cluster_workers's list, a new reference, or NULL before the first
 * answer). */
bool dispatch_redis_status(dispatch_redis *d, json_t **workers, char *why, size_t why_size);

#endif
