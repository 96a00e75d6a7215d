/*
 * http.h - the HTTP side of `sdx4 serve` (libmicrohttpd).
 */
#ifndef SDX4_SERVER_HTTP_H
#define SDX4_SERVER_HTTP_H

#include <stddef.h>

#include "server.h"

/* Starts listening on cfg.host:cfg.port; -1 with a message in `err`. */
int http_start(server *srv, char *err, size_t errlen);
/* The port actually bound (for --port 0). */
int http_port(const server *srv);
/* Stops accepting connections; open ones are still served. */
void http_quiesce(server *srv);
/* Requests received and not yet fully answered. */
int http_requests_open(void);
void http_stop(server *srv);

#endif
