/*
 * status.h - what the server says about itself: health, the model list,
 * model-info, and a cluster worker's registration.
 */
#ifndef SDX4_SERVER_STATUS_H
#define SDX4_SERVER_STATUS_H

#include <jansson.h>

#include "server.h"

/* GET /api/v1/health: liveness and readiness; *status is 200 when ready
 * to take upscales, 503 otherwise. */
json_t *status_health(server *srv, int *status);

/* GET /api/v1/model-info of srv->models[model] (only once the models are
 * loaded); NULL for an API-only node while no live worker serves it. */
json_t *status_model_info(server *srv, int model);

/* GET /api/v1/models: {"models": [...]}, the default first. */
json_t *status_models(server *srv);

/* What a cluster worker (`sdx4 worker`, or serve --redis --workers N)
 * registers as `name` (cluster_register): its models, each one's
 * model-info, and (the default's, for API nodes of earlier versions) the
 * default model's at the top. The heartbeat adds each model's estimator
 * curve (worker.c). */
json_t *status_registration(server *srv, const char *name);

#endif
