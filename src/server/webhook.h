/*
 * webhook.h - calls to clients' webhook URLs when their jobs finish.
 */
#ifndef SDX4_SERVER_WEBHOOK_H
#define SDX4_SERVER_WEBHOOK_H

#include "server.h"

typedef struct webhooks webhooks;

webhooks *webhooks_create(server *srv);
/* Delivers what is pending until `deadline` (mono_now() clock), then
 * stops and frees. */
void webhooks_destroy(webhooks *w, double deadline);

/* Queues a POST of `body` (the job's status document) to `url`. */
int webhooks_send(webhooks *w, const char *job_id, const char *url, const char *event,
                  const char *body);

#endif
