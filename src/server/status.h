/*
 * status.h - what the server says about itself: health and model-info.
 */
#ifndef SDX4_SERVER_STATUS_H
#define SDX4_SERVER_STATUS_H

#include <jansson.h>

#include "server.h"

/* GET /api/v1/health: liveness and readiness; *status is 200 when ready
 * to take upscales, 503 otherwise. */
json_t *status_health(server *srv, int *status);

/* GET /api/v1/model-info (only once the model is loaded); NULL for an
 * API-only node while no live worker serves its model. */
json_t *status_model_info(server *srv);

#endif
