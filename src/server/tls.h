/*
 * tls.h - the server's certificate and key for HTTPS (--tls-cert,
 * --tls-key), reloadable while it serves.
 *
 * tls_open loads and checks the pair; libmicrohttpd asks for it on every
 * handshake through tls_retrieve (MHD_OPTION_HTTPS_CERT_CALLBACK), and
 * http.c reports each connection's end with tls_connection_closed, which
 * lets go of the pair that connection was given. tls_reload reads the
 * files again: new handshakes get the new pair, open connections keep
 * theirs. Thread-safe. One per process: GnuTLS's certificate callback
 * carries no user pointer, so the open one is the one it serves.
 */
#ifndef SDX4_SERVER_TLS_H
#define SDX4_SERVER_TLS_H

#include <stddef.h>

#include <gnutls/abstract.h>
#include <gnutls/gnutls.h>
#include <jansson.h>

typedef struct tls tls;

/* TLS 1.2 and 1.3 only: GnuTLS's default suites otherwise
 * (MHD_OPTION_HTTPS_PRIORITIES). */
#define TLS_PRIORITIES "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"

/* Loads the PEM certificate chain (the server's certificate first) and its
 * private key (unencrypted PEM) and checks that they belong together. NULL
 * with the reason in err if a file cannot be read or parsed, the chain is
 * empty, or the key is not the certificate's; NULL too if one is open. */
tls *tls_open(const char *cert_file, const char *key_file, char *err, size_t errlen);
/* After the daemon has stopped (no handshake, no open connection). */
void tls_close(tls *t);

/* Reads both files again. On success the new pair serves new handshakes
 * and the old one is freed when its last connection closes; on failure
 * (err says why) nothing changes. */
int tls_reload(tls *t, char *err, size_t errlen);

/* The loaded pair's description for the log: files, subject, expiry. */
json_t *tls_describe(tls *t);

/* libmicrohttpd's certificate callback (gnutls_certificate_retrieve_function2). */
int tls_retrieve(gnutls_session_t session, const gnutls_datum_t *req_ca_rdn, int nreqs,
                 const gnutls_pk_algorithm_t *pk_algos, int pk_algos_length, gnutls_pcert_st **pcert,
                 unsigned int *pcert_length, gnutls_privkey_t *pkey);
/* A connection ended: `fd` is its socket, not yet closed
 * (MHD_CONNECTION_NOTIFY_CLOSED). */
void tls_connection_closed(tls *t, int fd);

#endif
