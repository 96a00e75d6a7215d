/*
 * websocket.h - a job's events over a WebSocket (see websocket.c).
 */
#ifndef SDX4_SERVER_WEBSOCKET_H
#define SDX4_SERVER_WEBSOCKET_H

#include <microhttpd.h>

#include "jobs.h"

typedef enum {
    WS_NOT_ASKED,   /* no Upgrade: websocket: answer as before (SSE) */
    WS_UPGRADE,     /* a valid handshake: accept holds Sec-WebSocket-Accept */
    WS_BAD_REQUEST, /* Upgrade without a Connection: upgrade or a 16-byte key */
    WS_BAD_VERSION, /* a version other than 13: 426 with Sec-WebSocket-Version */
} ws_request;

ws_request ws_check_handshake(struct MHD_Connection *c, char accept[32]);

/* The 101 response that streams job j's events, or NULL when too many
 * streams run (503) or out of memory. The request's reference to j must
 * last until the stream closes the connection, as it does: libmicrohttpd
 * completes an upgraded request when it is closed. */
struct MHD_Response *ws_events_response(job *j, const char *accept);

#endif
