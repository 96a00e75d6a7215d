/*
 * tls.c - the certificate chain and key that HTTPS handshakes get, and
 * their reload (see tls.h).
 *
 * libmicrohttpd does TLS with GnuTLS. Given the pair as PEM text at start
 * (MHD_OPTION_HTTPS_MEM_CERT/KEY) it could never change it, so the pair is
 * handed over per handshake instead: MHD_OPTION_HTTPS_CERT_CALLBACK makes
 * GnuTLS call tls_retrieve, which returns pointers into a loaded `pair`.
 * GnuTLS neither copies nor frees what that callback returns, and uses it
 * for the handshake (a renegotiation would use it again), so a pair must
 * live as long as any connection it was given to.
 *
 * Reference counting. A pair counts one reference for being current and
 * one per connection it was handed to. tls_retrieve takes a reference for
 * the connection and records it under the connection's socket, in `held`
 * (an array indexed by fd); the connection's end (MHD_CONNECTION_NOTIFY_
 * CLOSED, which libmicrohttpd 0.9.75 reports before it closes the socket,
 * so no other connection can have that fd yet) drops it. A reload loads
 * and checks the new pair first, then swaps `current` and drops the old
 * one's current reference: connections opened before keep theirs, and the
 * old pair is freed when the last of them closes. The fd is the key
 * because it is what both sides can name with documented calls: GnuTLS
 * gives the session's socket (gnutls_transport_get_int, set by
 * libmicrohttpd) and libmicrohttpd the connection's (CONNECTION_FD);
 * GnuTLS's session pointer belongs to libmicrohttpd. One mutex guards
 * `current`, `held` and the counts; it is held for a few pointer moves,
 * never while a file is read or a pair freed.
 *
 * Only one `tls` exists per process: GnuTLS's callback has no user
 * pointer, so it serves the one in `served`.
 */
#include "tls.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <gnutls/x509.h>

#define MAX_CHAIN 16               /* certificates in a chain, the server's first */
#define MAX_FILE_BYTES (1 << 20)   /* a PEM file larger than this is not a chain and key */

typedef struct pair {
    gnutls_pcert_st certs[MAX_CHAIN]; /* [ncerts], what handshakes send */
    unsigned ncerts;
    gnutls_privkey_t key;
    int refs;                         /* under tls->lock: current (1) + connections */
    char subject[256];
    time_t not_after;
} pair;

struct tls {
    char *cert_file, *key_file;
    pthread_mutex_t lock;
    pair *current;
    pair **held; /* [nheld]: the pair each open connection's socket was given */
    size_t nheld;
};

static _Atomic(tls *) served;

/* ---- loading ---------------------------------------------------------------- */

static void pair_free(pair *p) {
    if (!p) return;
    for (unsigned i = 0; i < p->ncerts; i++) gnutls_pcert_deinit(&p->certs[i]);
    gnutls_privkey_deinit(p->key);
    free(p);
}

/* The whole file, NUL-terminated (a key's copy is wiped when freed: wipe_free). */
static int read_whole(const char *what, const char *path, gnutls_datum_t *out, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "%s %s: %s", what, path, strerror(errno));
        return -1;
    }
    unsigned char *buf = malloc(MAX_FILE_BYTES + 1);
    size_t n = buf ? fread(buf, 1, MAX_FILE_BYTES + 1, f) : 0;
    bool failed = ferror(f);
    fclose(f);
    if (!buf || failed || n > MAX_FILE_BYTES || n == 0) {
        snprintf(err, errlen, "%s %s: %s", what, path,
                 !buf ? "out of memory" : failed ? "cannot be read" : n ? "larger than 1 MiB" : "empty");
        free(buf);
        return -1;
    }
    buf[n] = 0;
    *out = (gnutls_datum_t){buf, (unsigned)n};
    return 0;
}

static void wipe_free(gnutls_datum_t *d) {
    if (d->data) explicit_bzero(d->data, d->size);
    free(d->data);
    d->data = NULL;
}

/* Whether the private key is the one whose public half the certificate holds. */
static bool key_matches(gnutls_privkey_t key, gnutls_pubkey_t cert_key) {
    gnutls_pubkey_t pub = NULL;
    gnutls_datum_t a = {0}, b = {0};
    bool same = gnutls_pubkey_init(&pub) == 0 && gnutls_pubkey_import_privkey(pub, key, 0, 0) == 0 &&
                gnutls_pubkey_export2(pub, GNUTLS_X509_FMT_DER, &a) == 0 &&
                gnutls_pubkey_export2(cert_key, GNUTLS_X509_FMT_DER, &b) == 0 && a.size == b.size &&
                memcmp(a.data, b.data, a.size) == 0;
    gnutls_free(a.data);
    gnutls_free(b.data);
    gnutls_pubkey_deinit(pub);
    return same;
}

/* The server certificate's subject and expiry, for the log. */
static void describe_leaf(pair *p) {
    gnutls_x509_crt_t crt;
    if (gnutls_x509_crt_init(&crt) < 0) return;
    if (gnutls_x509_crt_import(crt, &p->certs[0].cert, GNUTLS_X509_FMT_DER) == 0) {
        size_t len = sizeof p->subject;
        if (gnutls_x509_crt_get_dn(crt, p->subject, &len) < 0) p->subject[0] = 0;
        p->not_after = gnutls_x509_crt_get_expiration_time(crt);
    }
    gnutls_x509_crt_deinit(crt);
}

static pair *pair_load(const char *cert_file, const char *key_file, char *err, size_t errlen) {
    gnutls_datum_t cert_pem = {0}, key_pem = {0};
    pair *p = calloc(1, sizeof *p);
    if (!p) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    if (read_whole("tls-cert", cert_file, &cert_pem, err, errlen) ||
        read_whole("tls-key", key_file, &key_pem, err, errlen))
        goto fail;
    p->ncerts = MAX_CHAIN;
    int rc = gnutls_pcert_list_import_x509_raw(p->certs, &p->ncerts, &cert_pem, GNUTLS_X509_FMT_PEM,
                                               GNUTLS_X509_CRT_LIST_FAIL_IF_UNSORTED);
    if (rc < 0) {
        p->ncerts = 0;
        snprintf(err, errlen, "tls-cert %s: not a PEM certificate chain (server certificate first, at most %d): %s",
                 cert_file, MAX_CHAIN, gnutls_strerror(rc));
        goto fail;
    }
    if ((rc = gnutls_privkey_init(&p->key)) < 0 ||
        (rc = gnutls_privkey_import_x509_raw(p->key, &key_pem, GNUTLS_X509_FMT_PEM, NULL, 0)) < 0) {
        snprintf(err, errlen, "tls-key %s: not an unencrypted PEM private key: %s", key_file, gnutls_strerror(rc));
        goto fail;
    }
    if (!key_matches(p->key, p->certs[0].pubkey)) {
        snprintf(err, errlen, "tls-key %s is not the key of the certificate in tls-cert %s", key_file, cert_file);
        goto fail;
    }
    describe_leaf(p);
    p->refs = 1;
    wipe_free(&key_pem);
    free(cert_pem.data);
    return p;
fail:
    wipe_free(&key_pem);
    free(cert_pem.data);
    pair_free(p);
    return NULL;
}

/* ---- the handle ------------------------------------------------------------------- */

tls *tls_open(const char *cert_file, const char *key_file, char *err, size_t errlen) {
    tls *t = calloc(1, sizeof *t);
    if (!t || !(t->cert_file = strdup(cert_file)) || !(t->key_file = strdup(key_file))) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    if (!(t->current = pair_load(cert_file, key_file, err, errlen))) goto fail;
    pthread_mutex_init(&t->lock, NULL);
    tls *none = NULL;
    if (!atomic_compare_exchange_strong(&served, &none, t)) {
        snprintf(err, errlen, "a TLS configuration is already open");
        pthread_mutex_destroy(&t->lock);
        goto fail;
    }
    return t;
fail:
    if (t) pair_free(t->current);
    if (t) free(t->cert_file), free(t->key_file);
    free(t);
    return NULL;
}

void tls_close(tls *t) {
    if (!t) return;
    atomic_store(&served, NULL);
    /* the daemon has stopped: every connection reported its end, but a
     * pair still held (a missed report) is freed once, with its last user */
    for (size_t fd = 0; fd < t->nheld; fd++) {
        pair *p = t->held[fd];
        if (p && --p->refs == 0) pair_free(p);
    }
    if (--t->current->refs == 0) pair_free(t->current);
    free(t->held);
    pthread_mutex_destroy(&t->lock);
    free(t->cert_file);
    free(t->key_file);
    free(t);
}

int tls_reload(tls *t, char *err, size_t errlen) {
    pair *fresh = pair_load(t->cert_file, t->key_file, err, errlen);
    if (!fresh) return -1;
    pthread_mutex_lock(&t->lock);
    pair *old = t->current;
    t->current = fresh;
    bool last = --old->refs == 0;
    pthread_mutex_unlock(&t->lock);
    if (last) pair_free(old);
    return 0;
}

json_t *tls_describe(tls *t) {
    pthread_mutex_lock(&t->lock);
    pair *p = t->current;
    char expires[32] = "";
    struct tm tm;
    if (p->not_after > 0 && gmtime_r(&p->not_after, &tm)) strftime(expires, sizeof expires, "%Y-%m-%dT%H:%M:%SZ", &tm);
    json_t *doc = json_pack("{s:s,s:s,s:s,s:i,s:s}", "cert", t->cert_file, "key", t->key_file, "subject",
                            p->subject, "chain", (int)p->ncerts, "not_after", expires);
    pthread_mutex_unlock(&t->lock);
    return doc;
}

/* ---- handshakes and connections ------------------------------------------------------ */

/* Makes held[fd] addressable (lock held). */
static bool held_fits(tls *t, int fd) {
    if ((size_t)fd < t->nheld) return true;
    size_t n = t->nheld ? t->nheld : 64;
    while (n <= (size_t)fd) n *= 2;
    pair **grown = realloc(t->held, n * sizeof *grown);
    if (!grown) return false;
    memset(grown + t->nheld, 0, (n - t->nheld) * sizeof *grown);
    t->held = grown;
    t->nheld = n;
    return true;
}

int tls_retrieve(gnutls_session_t session, const gnutls_datum_t *req_ca_rdn, int nreqs,
                 const gnutls_pk_algorithm_t *pk_algos, int pk_algos_length, gnutls_pcert_st **pcert,
                 unsigned int *pcert_length, gnutls_privkey_t *pkey) {
    (void)req_ca_rdn, (void)nreqs, (void)pk_algos, (void)pk_algos_length;
    tls *t = atomic_load(&served);
    int fd = gnutls_transport_get_int(session);
    if (!t || fd < 0) return -1;
    pthread_mutex_lock(&t->lock);
    pair *given = NULL, *dropped = NULL;
    if (held_fits(t, fd)) {
        given = t->current;
        given->refs++;
        /* a second handshake on the connection (renegotiation) replaces the first's */
        dropped = t->held[fd];
        if (dropped && --dropped->refs > 0) dropped = NULL;
        t->held[fd] = given;
    }
    pthread_mutex_unlock(&t->lock);
    pair_free(dropped);
    if (!given) return -1; /* no memory to record it: the handshake fails */
    *pcert = given->certs;
    *pcert_length = given->ncerts;
    *pkey = given->key;
    return 0;
}

void tls_connection_closed(tls *t, int fd) {
    if (!t || fd < 0) return;
    pthread_mutex_lock(&t->lock);
    pair *p = (size_t)fd < t->nheld ? t->held[fd] : NULL;
    if (p) t->held[fd] = NULL;
    bool last = p && --p->refs == 0;
    pthread_mutex_unlock(&t->lock);
    if (last) pair_free(p);
}
