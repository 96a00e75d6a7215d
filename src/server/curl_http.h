/*
 * curl_http.h - the settings every libcurl handle of the server's own
 * HTTP calls shares (webhook.c, objstore.c, jwt.c's JWKS fetch), on any
 * libcurl the server builds with.
 *
 * Protocols. The URLs come from settings and requests; without a
 * restriction libcurl would also follow them to file://, gopher:// or
 * smtp://. libcurl 7.85 added CURLOPT_PROTOCOLS_STR and
 * CURLOPT_REDIR_PROTOCOLS_STR and deprecated the bitmasks (a warning
 * there); older ones, such as Ubuntu 22.04's 7.81, have only the bitmasks.
 *
 * Trust. libcurl verifies HTTPS peers against its default CA bundle (the
 * system's); the library reads no variable to change it (CURL_CA_BUNDLE
 * is the curl tool's), so an IdP or a store behind a private CA needs the
 * outbound-ca-file setting, which replaces that bundle.
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

/* Redirects followed to https:// only. */
static inline CURLcode curl_https_redirects_only(CURL *curl) {
#if LIBCURL_VERSION_NUM >= 0x075500
    return curl_easy_setopt(curl, CURLOPT_REDIR_PROTOCOLS_STR, "https");
#else
    return curl_easy_setopt(curl, CURLOPT_REDIR_PROTOCOLS, (long)CURLPROTO_HTTPS);
#endif
}

/* The CAs that HTTPS peers are verified against: the file of the
 * outbound-ca-file setting, or libcurl's default for NULL. */
static inline CURLcode curl_http_trust(CURL *curl, const char *ca_file) {
    return ca_file ? curl_easy_setopt(curl, CURLOPT_CAINFO, ca_file) : CURLE_OK;
}

#endif
