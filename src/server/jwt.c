/*
 * jwt.c - bearer tokens verified against a JWKS (see jwt.h).
 *
 * Libraries. The signatures are GnuTLS's (already linked through
 * libmicrohttpd), the JSON jansson's, the fetch libcurl's; what is ours is
 * the JOSE glue: splitting the token, checking its header and claims, and
 * turning a JWK's numbers into a GnuTLS public key
 * (gnutls_pubkey_import_rsa_raw / _ecc_raw) that gnutls_pubkey_verify_data2
 * then uses. Debian's libjwt (1.10) was the other candidate and was not
 * taken: it has no EdDSA and no JWKS, so Ed25519 and every key import
 * would go through GnuTLS anyway, and its jwt_decode verifies with one key
 * for whatever `alg` the token names, which is the algorithm-confusion
 * trap (an HS256 "signature" keyed with the public key's PEM) unless the
 * caller re-parses the header first; with GnuTLS alone there is one path,
 * and the algorithm is ours to choose, never the token's. An HMAC
 * algorithm cannot even be expressed here: the table below has RS256,
 * ES256 and EdDSA, each bound to a key type, and a key verifies only
 * tokens of its own algorithm.
 *
 * Keys. A JWKS is read whole into an immutable key set: RSA keys of 2048
 * bits or more (RS256), EC P-256 (ES256), OKP Ed25519 (EdDSA), `use` sig
 * or absent, `alg` absent or the one its type verifies. Other keys are
 * skipped and logged with the reason (an IdP's encryption keys, say); a
 * set without one usable key is an error. The current set is a pointer
 * swapped under a mutex and reference-counted, so a verification holds
 * its set for as long as it needs while the refresher installs the next.
 *
 * Refreshing. One thread reloads the source (file or URL) every `refresh`
 * seconds, and sooner when a token names a kid no key has (an IdP rotated
 * its keys), but at most once per `unknown_kid_interval`, so that tokens
 * with made-up kids cannot turn the server into a load on the IdP. A
 * request never waits for a fetch: the token with the new kid is refused
 * now and accepted once the reload is in. A failed reload keeps the keys
 * it had (logged at warn): an IdP outage does not lock everyone out.
 *
 * Start. The first load happens in jwt_verifier_create, and a failure
 * there (URL unreachable, not a JWKS, no usable key) refuses to start the
 * server. Starting without keys would be as closed (every token refused),
 * but would report ready and answer every client 401 because of what is
 * an operator's mistake far more often than an outage (a typo, a missing
 * CA, a firewall); refusing to start shows it at once, where the rollout
 * stops and the old servers keep serving.
 *
 * Transport. A URL must be https://, except http:// to a loopback address
 * (a local sidecar, the tests): keys fetched in the clear over a network
 * could be replaced by anyone on the path, and with them every identity.
 * Redirects are followed to https:// only. The environment's proxy
 * variables apply, as for any libcurl program.
 */
#include "jwt.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>
#include <gnutls/abstract.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <jansson.h>

#include "auth.h"
#include "base64.h"
#include "curl_http.h"
#include "log.h"
#include "server.h"

enum {
    JWKS_MAX = 1 << 20, /* bytes of a key set; real ones are a few KiB */
    RSA_MIN_BITS = 2048,
};

/* ---- algorithms and keys ------------------------------------------------------------- */

typedef enum { ALG_RS256, ALG_ES256, ALG_EDDSA, ALG_COUNT } jws_alg;

static const struct {
    const char *name;             /* the JWS header's alg */
    gnutls_sign_algorithm_t sign; /* what GnuTLS verifies it with */
} algs[ALG_COUNT] = {
    [ALG_RS256] = {"RS256", GNUTLS_SIGN_RSA_SHA256},
    [ALG_ES256] = {"ES256", GNUTLS_SIGN_ECDSA_SHA256},
    [ALG_EDDSA] = {"EdDSA", GNUTLS_SIGN_EDDSA_ED25519},
};

typedef struct {
    char *kid;  /* NULL when the JWK has none */
    jws_alg alg; /* the one algorithm this key verifies */
    gnutls_pubkey_t pub;
} jwk;

typedef struct {
    atomic_int refs;
    int count;
    jwk keys[];
} key_set;

static void key_set_release(key_set *ks) {
    if (!ks || atomic_fetch_sub(&ks->refs, 1) != 1) return;
    for (int i = 0; i < ks->count; i++) {
        free(ks->keys[i].kid);
        gnutls_pubkey_deinit(ks->keys[i].pub);
    }
    free(ks);
}

/* base64url without padding (RFC 7515 section 2): anything else is refused
 * here, before base64_decode, which would also take padding, the standard
 * alphabet and whitespace. */
static uint8_t *b64url_decode(const char *text, size_t len, size_t *out_len) {
    if (len % 4 == 1) return NULL;
    for (size_t i = 0; i < len; i++) {
        char c = text[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_'))
            return NULL;
    }
    return base64_decode(text, len, out_len);
}

/* A base64url member of a JWK; NULL when missing or malformed. */
static uint8_t *jwk_bytes(json_t *k, const char *name, size_t *len) {
    const char *text = json_string_value(json_object_get(k, name));
    return text && *text ? b64url_decode(text, strlen(text), len) : NULL;
}

/* The key of a JWK, or why it is not usable. */
static const char *jwk_import(json_t *k, jwk *out) {
    const char *kty = json_string_value(json_object_get(k, "kty"));
    const char *crv = json_string_value(json_object_get(k, "crv"));
    json_t *use = json_object_get(k, "use"), *alg = json_object_get(k, "alg");
    if (!kty) return "no kty";
    if (use && !(json_is_string(use) && strcmp(json_string_value(use), "sig") == 0)) return "use is not sig";
    if (strcmp(kty, "RSA") == 0) out->alg = ALG_RS256;
    else if (strcmp(kty, "EC") == 0 && crv && strcmp(crv, "P-256") == 0) out->alg = ALG_ES256;
    else if (strcmp(kty, "OKP") == 0 && crv && strcmp(crv, "Ed25519") == 0) out->alg = ALG_EDDSA;
    else return "key type or curve not supported (RSA, EC P-256, OKP Ed25519)";
    if (alg && !(json_is_string(alg) && strcmp(json_string_value(alg), algs[out->alg].name) == 0))
        return "alg not supported for its key type (RS256, ES256, EdDSA)";

    const char *why = NULL;
    size_t alen = 0, blen = 0;
    uint8_t *a = NULL, *b = NULL;
    if (gnutls_pubkey_init(&out->pub) < 0) return "out of memory";
    if (out->alg == ALG_RS256) {
        a = jwk_bytes(k, "n", &alen);
        b = jwk_bytes(k, "e", &blen);
        unsigned bits = 0;
        if (!a || !b) why = "n or e missing or not base64url";
        else if (gnutls_pubkey_import_rsa_raw(out->pub, &(gnutls_datum_t){a, (unsigned)alen},
                                              &(gnutls_datum_t){b, (unsigned)blen}) < 0)
            why = "not an RSA public key";
        else if (gnutls_pubkey_get_pk_algorithm(out->pub, &bits) != GNUTLS_PK_RSA || bits < RSA_MIN_BITS)
            why = "RSA key under 2048 bits";
    } else if (out->alg == ALG_ES256) {
        a = jwk_bytes(k, "x", &alen);
        b = jwk_bytes(k, "y", &blen);
        if (!a || !b || alen != 32 || blen != 32) why = "x or y not 32 bytes of base64url";
        else if (gnutls_pubkey_import_ecc_raw(out->pub, GNUTLS_ECC_CURVE_SECP256R1, &(gnutls_datum_t){a, 32},
                                              &(gnutls_datum_t){b, 32}) < 0)
            why = "not a P-256 public key";
    } else {
        a = jwk_bytes(k, "x", &alen);
        if (!a || alen != 32) why = "x not 32 bytes of base64url";
        else if (gnutls_pubkey_import_ecc_raw(out->pub, GNUTLS_ECC_CURVE_ED25519, &(gnutls_datum_t){a, 32}, NULL) < 0)
            why = "not an Ed25519 public key";
    }
    free(a);
    free(b);
    if (!why && gnutls_pubkey_verify_params(out->pub) < 0) why = "not a valid public key (a point off the curve?)";
    json_t *kid = json_object_get(k, "kid");
    if (!why && kid && !json_is_string(kid)) why = "kid is not a string";
    if (!why && kid && !(out->kid = strdup(json_string_value(kid)))) why = "out of memory";
    if (why) {
        gnutls_pubkey_deinit(out->pub);
        out->pub = NULL;
    }
    return why;
}

/* The usable keys of a JWKS document; NULL with the reason in `why`.
 * Skipped keys are logged at `skip_level`. */
static key_set *jwks_parse(const char *text, size_t len, log_level skip_level, char *why, size_t why_size) {
    json_error_t error;
    json_t *doc = json_loadb(text, len, JSON_REJECT_DUPLICATES, &error);
    json_t *keys = json_object_get(doc, "keys");
    key_set *ks = NULL;
    if (!json_is_object(doc) || !json_is_array(keys)) {
        snprintf(why, why_size, "not a JWKS (an object with a keys array)");
        goto done;
    }
    size_t n = json_array_size(keys);
    if (!(ks = calloc(1, sizeof *ks + n * sizeof ks->keys[0]))) {
        snprintf(why, why_size, "out of memory");
        goto done;
    }
    atomic_init(&ks->refs, 1);
    for (size_t i = 0; i < n; i++) {
        json_t *k = json_array_get(keys, i);
        jwk key = {0};
        const char *skipped = json_is_object(k) ? jwk_import(k, &key) : "not an object";
        if (skipped) {
            const char *kid = json_string_value(json_object_get(k, "kid"));
            log_event(skip_level, "jwks_key_skipped",
                      json_pack("{s:i,s:s?,s:s}", "index", (int)i, "kid", kid, "reason", skipped));
        } else {
            ks->keys[ks->count++] = key;
        }
    }
    if (!ks->count) {
        snprintf(why, why_size, "no usable key (RSA of %d bits or more, EC P-256, OKP Ed25519; use sig)",
                 RSA_MIN_BITS);
        key_set_release(ks);
        ks = NULL;
    }
done:
    json_decref(doc);
    return ks;
}

int jwt_jwks_check(const char *text, size_t len, FILE *err) {
    char why[160];
    key_set *ks = jwks_parse(text, len, LOG_DEBUG, why, sizeof why);
    if (!ks && err) fprintf(err, "%s\n", why);
    int count = ks ? ks->count : -1;
    key_set_release(ks);
    return count;
}

/* ---- the verifier and its refreshing thread ------------------------------------------ */

struct jwt_verifier {
    char *jwks, *issuer, *audience;
    char *ca_file; /* NULL: libcurl's default CAs */
    bool is_url;
    double leeway, refresh, unknown_kid_interval, fetch_timeout;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    key_set *keys;       /* the current set (under lock) */
    double loaded_at;    /* mono_now() of the last load, good or failed */
    bool reload_asked;   /* by an unknown kid */
    atomic_bool stopping; /* read by a fetch in progress too */
    pthread_t thread;
    bool thread_started;
};

typedef struct {
    char *data;
    size_t len;
} fetched;

static size_t fetch_write(char *data, size_t size, size_t n, void *cls) {
    fetched *f = cls;
    size_t add = size * n;
    if (add > JWKS_MAX - f->len) return 0; /* too large: the transfer fails */
    char *grown = realloc(f->data, f->len + add);
    if (!grown) return 0;
    memcpy(grown + f->len, data, add);
    f->data = grown;
    f->len += add;
    return add;
}

static int fetch_progress(void *cls, curl_off_t a, curl_off_t b, curl_off_t c, curl_off_t d) {
    (void)a, (void)b, (void)c, (void)d;
    return atomic_load(&((jwt_verifier *)cls)->stopping); /* nonzero aborts: shutting down */
}

static int fetch_url(jwt_verifier *v, fetched *f, char *why, size_t why_size) {
    CURL *curl = curl_easy_init();
    if (!curl) {
        snprintf(why, why_size, "cannot start libcurl");
        return -1;
    }
    char error[CURL_ERROR_SIZE] = "";
    curl_easy_setopt(curl, CURLOPT_URL, v->jwks);
    curl_http_only(curl); /* http only on loopback: checked at create */
    curl_http_trust(curl, v->ca_file);
    curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 1L);
    curl_https_redirects_only(curl);
    curl_easy_setopt(curl, CURLOPT_MAXREDIRS, 3L);
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, (long)(v->fetch_timeout * 1000));
    curl_easy_setopt(curl, CURLOPT_USERAGENT, "sdx4/" SDX4_VERSION);
    curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, error);
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, fetch_write);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, f);
    curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, fetch_progress);
    curl_easy_setopt(curl, CURLOPT_XFERINFODATA, v);
    curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
    CURLcode rc = curl_easy_perform(curl);
    long status = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(curl);
    if (rc == CURLE_WRITE_ERROR && f->len) snprintf(why, why_size, "larger than %d bytes, or out of memory", JWKS_MAX);
    else if (rc != CURLE_OK) snprintf(why, why_size, "%s", *error ? error : curl_easy_strerror(rc));
    else if (status != 200) snprintf(why, why_size, "HTTP status %ld", status);
    else return 0;
    return -1;
}

static int read_file(const char *path, fetched *f, char *why, size_t why_size) {
    FILE *file = fopen(path, "rb");
    if (!file) {
        snprintf(why, why_size, "cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    if (!(f->data = malloc(JWKS_MAX + 1))) {
        fclose(file);
        snprintf(why, why_size, "out of memory");
        return -1;
    }
    f->len = fread(f->data, 1, JWKS_MAX + 1, file);
    bool failed = ferror(file);
    fclose(file);
    if (failed) snprintf(why, why_size, "cannot read %s", path);
    else if (f->len > JWKS_MAX) snprintf(why, why_size, "%s is larger than %d bytes", path, JWKS_MAX);
    else return 0;
    return -1;
}

static key_set *load_keys(jwt_verifier *v, log_level skip_level, char *why, size_t why_size) {
    fetched f = {0};
    key_set *ks = NULL;
    if ((v->is_url ? fetch_url(v, &f, why, why_size) : read_file(v->jwks, &f, why, why_size)) == 0)
        ks = jwks_parse(f.data, f.len, skip_level, why, why_size);
    free(f.data);
    return ks;
}

static void *refresher(void *arg) {
    jwt_verifier *v = arg;
    pthread_mutex_lock(&v->lock);
    while (!atomic_load(&v->stopping)) {
        double due = v->loaded_at + v->refresh;
        if (!v->reload_asked && mono_now() < due) {
            struct timespec ts = {(time_t)due, (long)((due - (double)(time_t)due) * 1e9)};
            pthread_cond_timedwait(&v->wake, &v->lock, &ts);
            continue;
        }
        pthread_mutex_unlock(&v->lock);
        char why[256];
        key_set *fresh = load_keys(v, LOG_DEBUG, why, sizeof why);
        if (fresh)
            log_event(LOG_DEBUG, "jwks_loaded", json_pack("{s:s,s:i}", "source", v->jwks, "keys", fresh->count));
        else if (!atomic_load(&v->stopping))
            log_event(LOG_WARN, "jwks_refresh_failed",
                      json_pack("{s:s,s:s,s:s}", "source", v->jwks, "reason", why, "message",
                                "the keys loaded before stay in use"));
        pthread_mutex_lock(&v->lock);
        key_set *old = fresh ? v->keys : NULL;
        if (fresh) v->keys = fresh;
        v->loaded_at = mono_now();
        v->reload_asked = false;
        pthread_mutex_unlock(&v->lock);
        key_set_release(old); /* freed here, or by the last verification holding it */
        pthread_mutex_lock(&v->lock);
    }
    pthread_mutex_unlock(&v->lock);
    return NULL;
}

/* "" when `url` may be fetched, else why not. */
static const char *url_refused(const char *url) {
    if (strncmp(url, "https://", 8) == 0) return "";
    if (strncmp(url, "http://", 7) != 0) return "a URL must be https:// (or http:// to a loopback address)";
    CURLU *u = curl_url();
    char *host = NULL;
    bool loopback = u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
                    curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK &&
                    (strcmp(host, "localhost") == 0 || strncmp(host, "127.", 4) == 0 || strcmp(host, "[::1]") == 0);
    curl_free(host);
    curl_url_cleanup(u);
    return loopback ? "" : "http:// only to a loopback address (keys fetched in the clear could be replaced)";
}

jwt_verifier *jwt_verifier_create(const jwt_settings *s, FILE *err) {
    if (!s->jwks || !*s->jwks || !s->issuer || !*s->issuer || !s->audience || !*s->audience) {
        fprintf(err, "sdx4 serve: jwt-jwks, jwt-issuer and jwt-audience go together\n");
        return NULL;
    }
    bool is_url = strstr(s->jwks, "://") != NULL;
    const char *refused = is_url ? url_refused(s->jwks) : "";
    if (*refused) {
        fprintf(err, "sdx4 serve: jwt-jwks: %s\n", refused);
        return NULL;
    }
    jwt_verifier *v = calloc(1, sizeof *v);
    if (!v) return NULL;
    pthread_mutex_init(&v->lock, NULL);
    cond_init_monotonic(&v->wake);
    if (is_url) curl_global_init(CURL_GLOBAL_DEFAULT); /* reference-counted by libcurl */
    v->is_url = is_url;
    v->leeway = s->leeway;
    v->refresh = s->refresh;
    v->unknown_kid_interval = s->unknown_kid_interval;
    v->fetch_timeout = s->fetch_timeout;
    char why[256];
    if (!(v->jwks = strdup(s->jwks)) || !(v->issuer = strdup(s->issuer)) || !(v->audience = strdup(s->audience)) ||
        (s->ca_file && !(v->ca_file = strdup(s->ca_file)))) {
        snprintf(why, sizeof why, "out of memory");
        goto fail;
    }
    if (!(v->keys = load_keys(v, LOG_WARN, why, sizeof why))) goto fail;
    v->loaded_at = mono_now();
    log_event(LOG_INFO, "jwks_loaded", json_pack("{s:s,s:i}", "source", v->jwks, "keys", v->keys->count));
    if (pthread_create(&v->thread, NULL, refresher, v) != 0) {
        snprintf(why, sizeof why, "cannot start the refreshing thread");
        goto fail;
    }
    v->thread_started = true;
    return v;
fail:
    fprintf(err, "sdx4 serve: jwt-jwks %s: %s\n", s->jwks, why);
    jwt_verifier_destroy(v);
    return NULL;
}

void jwt_verifier_destroy(jwt_verifier *v) {
    if (!v) return;
    if (v->thread_started) {
        pthread_mutex_lock(&v->lock);
        atomic_store(&v->stopping, true);
        pthread_cond_signal(&v->wake);
        pthread_mutex_unlock(&v->lock);
        pthread_join(v->thread, NULL);
    }
    key_set_release(v->keys);
    if (v->is_url) curl_global_cleanup();
    pthread_cond_destroy(&v->wake);
    pthread_mutex_destroy(&v->lock);
    free(v->jwks);
    free(v->ca_file);
    free(v->issuer);
    free(v->audience);
    free(v);
}

/* An unknown kid: the IdP may have rotated its keys. */
static void ask_reload(jwt_verifier *v) {
    pthread_mutex_lock(&v->lock);
    if (!v->reload_asked && mono_now() - v->loaded_at >= v->unknown_kid_interval) {
        v->reload_asked = true;
        pthread_cond_signal(&v->wake);
    }
    pthread_mutex_unlock(&v->lock);
}

/* ---- tokens ---------------------------------------------------------------------------- */

static bool signature_ok(const jwk *k, const char *data, size_t len, const uint8_t *sig, size_t sig_len) {
    gnutls_datum_t signature = {(unsigned char *)sig, (unsigned)sig_len}, der = {NULL, 0};
    if (k->alg == ALG_ES256) { /* JWS: r || s, 32 bytes each; GnuTLS: DER */
        if (sig_len != 64 ||
            gnutls_encode_rs_value(&der, &(gnutls_datum_t){(unsigned char *)sig, 32},
                                   &(gnutls_datum_t){(unsigned char *)sig + 32, 32}) < 0)
            return false;
        signature = der;
    } else if (k->alg == ALG_EDDSA && sig_len != 64) {
        return false;
    }
    int rc = gnutls_pubkey_verify_data2(k->pub, algs[k->alg].sign, 0,
                                        &(gnutls_datum_t){(unsigned char *)data, (unsigned)len}, &signature);
    gnutls_free(der.data);
    return rc >= 0;
}

/* The keys that may have signed: the kid's (its type must be alg's), or
 * without a kid every key of alg's type. */
static jwt_status verify_signature(const key_set *ks, const char *kid, jws_alg alg, const char *data, size_t len,
                                   const uint8_t *sig, size_t sig_len) {
    jwt_status status = JWT_UNKNOWN_KEY;
    for (int i = 0; i < ks->count; i++) {
        const jwk *k = &ks->keys[i];
        if (kid && (!k->kid || strcmp(k->kid, kid) != 0)) continue;
        if (k->alg != alg) {
            if (kid && status != JWT_BAD_SIGNATURE) status = JWT_KEY_MISMATCH;
            continue;
        }
        if (signature_ok(k, data, len, sig, sig_len)) return JWT_OK;
        status = JWT_BAD_SIGNATURE;
    }
    return status;
}

static jwt_status check_header(json_t *header, jws_alg *alg, const char **kid) {
    if (!json_is_object(header)) return JWT_MALFORMED;
    const char *name = json_string_value(json_object_get(header, "alg"));
    if (!name) return JWT_MALFORMED;
    for (*alg = 0; *alg < ALG_COUNT && strcmp(algs[*alg].name, name) != 0; (*alg)++) {}
    if (*alg == ALG_COUNT) return JWT_ALG_NOT_ALLOWED;
    if (json_object_get(header, "crit")) return JWT_CRIT;
    json_t *k = json_object_get(header, "kid");
    if (k && !json_is_string(k)) return JWT_MALFORMED;
    *kid = json_string_value(k);
    return JWT_OK;
}

jwt_status jwt_verify(jwt_verifier *v, const char *token, double now, jwt_claims *out) {
    memset(out, 0, sizeof *out);
    size_t len = strnlen(token, JWT_TOKEN_MAX + 1);
    if (len > JWT_TOKEN_MAX) return JWT_MALFORMED;
    const char *dot1 = memchr(token, '.', len);
    const char *dot2 = dot1 ? memchr(dot1 + 1, '.', len - (size_t)(dot1 + 1 - token)) : NULL;
    if (!dot2 || memchr(dot2 + 1, '.', len - (size_t)(dot2 + 1 - token))) return JWT_MALFORMED;

    size_t header_len = 0, sig_len = 0, payload_len = 0;
    uint8_t *header_text = b64url_decode(token, (size_t)(dot1 - token), &header_len);
    json_t *header = header_text ? json_loadb((char *)header_text, header_len, JSON_REJECT_DUPLICATES, NULL) : NULL;
    free(header_text);
    jws_alg alg = ALG_COUNT;
    const char *kid = NULL;
    jwt_status status = check_header(header, &alg, &kid);
    uint8_t *sig = NULL, *payload = NULL;
    if (status == JWT_OK && (dot2[1] == '\0' || !(sig = b64url_decode(dot2 + 1, strlen(dot2 + 1), &sig_len)) ||
                             !(payload = b64url_decode(dot1 + 1, (size_t)(dot2 - dot1 - 1), &payload_len))))
        status = JWT_MALFORMED;
    if (status == JWT_OK) {
        pthread_mutex_lock(&v->lock);
        key_set *ks = v->keys;
        atomic_fetch_add(&ks->refs, 1);
        pthread_mutex_unlock(&v->lock);
        status = verify_signature(ks, kid, alg, token, (size_t)(dot2 - token), sig, sig_len);
        key_set_release(ks);
        if (status == JWT_UNKNOWN_KEY && kid) ask_reload(v);
    }
    json_decref(header); /* kid pointed into it */
    free(sig);
    if (status == JWT_OK) status = jwt_check_claims(v, (char *)payload, payload_len, now, out);
    free(payload);
    return status;
}

/* ---- claims ---------------------------------------------------------------------------- */

/* AUTH_SCOPE_* of a space-separated list; unknown words are someone
 * else's scopes and ignored. */
static unsigned scope_words(const char *text) {
    unsigned scopes = 0;
    while (*text) {
        size_t n = strcspn(text, " ");
        if (n == 7 && strncmp(text, "upscale", 7) == 0) scopes |= AUTH_SCOPE_UPSCALE;
        if (n == 5 && strncmp(text, "admin", 5) == 0) scopes |= AUTH_SCOPE_ADMIN;
        text += n;
        text += strspn(text, " ");
    }
    return scopes;
}

/* The scopes of a claim that is a space-separated string or an array of
 * them (absent: none); -1 for any other type. */
static int claim_scopes(json_t *claim, unsigned *scopes) {
    if (json_is_string(claim)) {
        *scopes |= scope_words(json_string_value(claim));
    } else if (json_is_array(claim)) {
        size_t i;
        json_t *item;
        json_array_foreach(claim, i, item) {
            if (!json_is_string(item)) return -1;
            *scopes |= scope_words(json_string_value(item));
        }
    } else if (claim) {
        return -1;
    }
    return 0;
}

/* Scopes from `scope` (RFC 8693/9068: a string), `scp` (Entra's delegated
 * and Okta's: a string or an array) and `roles` (Entra's app roles, what
 * a token of the client-credentials flow carries: an array); -1 when one
 * has another type. */
static int claimed_scopes(json_t *claims, unsigned *scopes) {
    json_t *scope = json_object_get(claims, "scope");
    if (scope && !json_is_string(scope)) return -1;
    if (claim_scopes(scope, scopes) || claim_scopes(json_object_get(claims, "scp"), scopes)) return -1;
    return claim_scopes(json_object_get(claims, "roles"), scopes);
}

static bool audience_matches(json_t *aud, const char *audience) {
    if (json_is_string(aud)) return strcmp(json_string_value(aud), audience) == 0;
    size_t i;
    json_t *item;
    json_array_foreach(aud, i, item) {
        if (json_is_string(item) && strcmp(json_string_value(item), audience) == 0) return true;
    }
    return false;
}

jwt_status jwt_check_claims(const jwt_verifier *v, const char *payload, size_t len, double now, jwt_claims *out) {
    memset(out, 0, sizeof *out);
    json_t *claims = json_loadb(payload, len, JSON_REJECT_DUPLICATES, NULL);
    json_t *exp = json_object_get(claims, "exp"), *nbf = json_object_get(claims, "nbf"),
           *iat = json_object_get(claims, "iat");
    const char *iss = json_string_value(json_object_get(claims, "iss"));
    const char *sub = json_string_value(json_object_get(claims, "sub"));
    unsigned scopes = 0;
    jwt_status status = JWT_OK;
    if (!json_is_object(claims)) status = JWT_BAD_CLAIMS;
    else if (!iss || strcmp(iss, v->issuer) != 0) status = JWT_WRONG_ISSUER;
    else if (!audience_matches(json_object_get(claims, "aud"), v->audience)) status = JWT_WRONG_AUDIENCE;
    else if (!json_is_number(exp) || (nbf && !json_is_number(nbf)) || (iat && !json_is_number(iat)))
        status = JWT_BAD_CLAIMS;
    else if (now >= json_number_value(exp) + v->leeway) status = JWT_EXPIRED;
    else if ((nbf && now + v->leeway < json_number_value(nbf)) || (iat && now + v->leeway < json_number_value(iat)))
        status = JWT_NOT_YET_VALID;
    else if (!sub || !*sub || strlen(sub) > JWT_SUBJECT_MAX) status = JWT_NO_SUBJECT;
    else if (claimed_scopes(claims, &scopes)) status = JWT_BAD_CLAIMS;
    if (status == JWT_OK) {
        strcpy(out->subject, sub);
        out->scopes = scopes;
    }
    json_decref(claims);
    return status;
}

bool jwt_shaped(const char *credential) {
    return strncmp(credential, "eyJ", 3) == 0 && strchr(credential, '.') != NULL;
}

const char *jwt_status_text(jwt_status s) {
    static const char *const texts[] = {
        [JWT_OK] = "valid",
        [JWT_MALFORMED] = "malformed token",
        [JWT_ALG_NOT_ALLOWED] = "algorithm not allowed",
        [JWT_KEY_MISMATCH] = "algorithm does not fit the key",
        [JWT_UNKNOWN_KEY] = "unknown key",
        [JWT_CRIT] = "critical header extension not supported",
        [JWT_BAD_SIGNATURE] = "bad signature",
        [JWT_BAD_CLAIMS] = "malformed claims",
        [JWT_WRONG_ISSUER] = "wrong issuer",
        [JWT_WRONG_AUDIENCE] = "wrong audience",
        [JWT_EXPIRED] = "expired",
        [JWT_NOT_YET_VALID] = "not yet valid",
        [JWT_NO_SUBJECT] = "no subject",
    };
    return (unsigned)s < sizeof texts / sizeof texts[0] && texts[s] ? texts[s] : "refused";
}
