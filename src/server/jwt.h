/*
 * jwt.h - OAuth 2 / OIDC bearer tokens: a verifier of signed JWTs (RFC
 * 7519, compact JWS only) against the public keys of a JWKS (RFC 7517), a
 * file or a URL, kept fresh by a thread of its own.
 *
 * A token is accepted when its header names RS256, ES256 or EdDSA (Ed25519)
 * and a key of that type, its signature verifies, `iss` is the issuer,
 * `aud` is or contains the audience, `exp` has not passed and `nbf`/`iat`
 * are not in the future (each within the leeway), and `sub` names someone.
 * Its scopes come from `scope` (OAuth 2: space-separated) or `scp` (an
 * array or a string): `upscale` gives AUTH_SCOPE_UPSCALE, `admin`
 * AUTH_SCOPE_ADMIN, and nothing else: a token with `admin` alone may use
 * the admin API but not upscale (an admin key has both; a token says
 * exactly what its issuer granted). Thread-safe.
 */
#ifndef SDX4_SERVER_JWT_H
#define SDX4_SERVER_JWT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

typedef struct jwt_verifier jwt_verifier;

typedef struct {
    const char *jwks;     /* a file, an https:// URL, or an http:// one on a loopback address */
    const char *issuer;   /* `iss`, compared exactly */
    const char *audience; /* one of `aud` */
    double leeway;        /* seconds of clock skew forgiven on exp, nbf and iat */
    double refresh;       /* seconds between reloads of the key set */
    double unknown_kid_interval; /* at least this between reloads asked for by an unknown `kid` */
    double fetch_timeout;        /* seconds one fetch of a URL may take */
    const char *ca_file;         /* CAs a URL's server is verified against; NULL: libcurl's default */
} jwt_settings;

/* Why a token was refused: short enough for a problem's detail and a log,
 * never quoting the token. */
typedef enum {
    JWT_OK,
    JWT_MALFORMED,         /* not three base64url parts of JSON objects, or too large */
    JWT_ALG_NOT_ALLOWED,   /* alg not RS256, ES256 or EdDSA (none, HS256...) */
    JWT_KEY_MISMATCH,      /* the kid's key is of another type than alg */
    JWT_UNKNOWN_KEY,       /* no key has the kid, or none of alg's type */
    JWT_CRIT,              /* a `crit` header: extensions we do not implement */
    JWT_BAD_SIGNATURE,
    JWT_BAD_CLAIMS,        /* the payload is not an object, exp missing or not a number... */
    JWT_WRONG_ISSUER,
    JWT_WRONG_AUDIENCE,
    JWT_EXPIRED,
    JWT_NOT_YET_VALID,     /* nbf or iat in the future */
    JWT_NO_SUBJECT,        /* sub missing, empty or longer than JWT_SUBJECT_MAX */
} jwt_status;

enum {
    JWT_TOKEN_MAX = 8192,  /* bytes; an access token is rarely over 2 KiB */
    JWT_SUBJECT_MAX = 255, /* bytes of `sub` */
};

typedef struct {
    char subject[JWT_SUBJECT_MAX + 1];
    unsigned scopes; /* AUTH_SCOPE_* (auth.h) */
} jwt_claims;

/* Loads the key set (a URL is fetched now: a server that cannot get its
 * keys refuses to start, see jwt.c) and starts the refreshing thread. NULL
 * with a message on `err` on a bad setting or key set. */
jwt_verifier *jwt_verifier_create(const jwt_settings *s, FILE *err);
void jwt_verifier_destroy(jwt_verifier *v);

/* Judges the NUL-terminated `token` at `now` (seconds since the epoch);
 * JWT_OK fills `out`. An unknown kid asks the thread for a reload (at most
 * once per unknown_kid_interval) and is refused meanwhile: no request
 * waits for a fetch. */
jwt_status jwt_verify(jwt_verifier *v, const char *token, double now, jwt_claims *out);

/* The claims part of jwt_verify, for a payload whose signature is known
 * good (and for the fuzzer). */
jwt_status jwt_check_claims(const jwt_verifier *v, const char *payload, size_t len, double now, jwt_claims *out);

/* Usable keys in a JWKS document, or -1 when it is not one (the reason on
 * `err`, when given); skipped keys are logged. */
int jwt_jwks_check(const char *text, size_t len, FILE *err);

/* Whether a credential is meant as a token rather than an API key: it
 * starts as a JSON object does in base64url ("eyJ") and has a dot. */
bool jwt_shaped(const char *credential);

const char *jwt_status_text(jwt_status s);

#endif
