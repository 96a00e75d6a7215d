/*
 * page.h - the web page at GET / (page.c).
 */
#ifndef SDX4_SERVER_PAGE_H
#define SDX4_SERVER_PAGE_H

#include <microhttpd.h>

/* A new response with the page and its headers (type, a
 * Content-Security-Policy that admits only its own inline style and
 * script, no framing, no sniffing); the caller queues and destroys it.
 * NULL when out of memory. Thread-safe. */
struct MHD_Response *page_response(void);

#endif
