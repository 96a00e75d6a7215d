/*
 * curl_http.h - restricts a libcurl handle to HTTP and HTTPS, on any
 * libcurl the server builds with.
 *
 * The URLs given to webhooks (webhook.c) and the object store (objstore.c)
 * come from settings and requests; without a restriction libcurl would
 * also follow them to file://, gopher:// or smtp://. libcurl 7.85 added
 * CURLOPT_PROTOCOLS_STR and deprecated the bitmask CURLOPT_PROTOCOLS (a
 * warning there); older ones, such as Ubuntu 22.04's 7.81, have only the
 * bitmask.
 */
#ifndef SDX4_SERVER_CURL_HTTP_H
#define SDX4_SERVER_CURL_HTTP_H

#include <curl/curl.h>

static inline CURLcode curl_http_only(CURL *curl) {
#if LIBCURL_VERSION_NUM >= 0x075500
    return curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
#else
    return curl_easy_setopt(curl, CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
}

#endif
