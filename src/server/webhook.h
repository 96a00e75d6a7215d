/*
 * webhook.h - calls to clients' webhook URLs when their jobs finish.
 *
 * A pool of sender threads with a per-target limit and a bounded backlog;
 * the outcome of each delivery goes back to whoever sent it (a callback).
 */
#ifndef SDX4_SERVER_WEBHOOK_H
#define SDX4_SERVER_WEBHOOK_H

#include <stdbool.h>

#include "server.h"

typedef struct webhooks webhooks;

/* A delivery's outcome: `error` says why it failed (NULL when delivered).
 * Called once per queued delivery, from a sender thread, no lock held. */
typedef void webhook_done_fn(void *arg, const char *job_id, bool delivered, int attempts,
                             const char *error);

webhooks *webhooks_create(server *srv);
/* Delivers what is pending until `deadline` (mono_now() clock), then
 * stops and frees. */
void webhooks_destroy(webhooks *w, double deadline);

/* Queues a POST of `body` (the job's status document) to `url`; `done`
 * gets the outcome. -1 and the reason in `why` when it is not queued (and
 * `done` is not called): the backlog is full, the server is stopping or
 * the URL does not parse; the caller marks the job's webhook failed.
 * Never waits for a call. */
int webhooks_send(webhooks *w, const char *job_id, const char *url, const char *event,
                  const char *body, webhook_done_fn *done, void *done_arg, char *why,
                  size_t why_size);

#endif
