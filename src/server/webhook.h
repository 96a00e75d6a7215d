/*
 * webhook.h - calls to clients' webhook URLs when their jobs finish.
 *
 * A pool of sender threads with a per-target limit and a bounded backlog;
 * the outcome of each delivery goes back to the job (job_store_webhook_done).
 */
#ifndef SDX4_SERVER_WEBHOOK_H
#define SDX4_SERVER_WEBHOOK_H

#include "server.h"

typedef struct webhooks webhooks;

webhooks *webhooks_create(server *srv);
/* Delivers what is pending until `deadline` (mono_now() clock), then
 * stops and frees. */
void webhooks_destroy(webhooks *w, double deadline);

/* Queues a POST of `body` (the job's status document) to `url`. -1 and
 * the reason in `why` when it is not queued: the backlog is full, the
 * server is stopping or the URL does not parse; the caller marks the
 * job's webhook failed. Never waits for a call. */
int webhooks_send(webhooks *w, const char *job_id, const char *url, const char *event,
                  const char *body, char *why, size_t why_size);

#endif
