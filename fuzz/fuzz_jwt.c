/*
 * fuzz_jwt.c - arbitrary bytes as what jwt.c reads from outside: a bearer
 * token (header, base64url, signature against a key set of RS256, ES256
 * and EdDSA keys), the claims of a token whose signature is good, and a
 * JWKS document. Every input must end in a verdict; none may crash, leak,
 * read out of bounds or be accepted without a subject.
 *
 * The first byte chooses what the rest is: 0 a token, 1 claims, 2 a JWKS.
 * The seeds (fuzz/corpus/fuzz_jwt/) include tokens signed by the private
 * halves of fuzz_jwt_keys.h's keys, valid at the fixed time below, so that
 * mutations start from tokens that get past the signature; both are
 * written by fuzz/make_jwt_corpus.py.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz_jwt_keys.h"
#include "jwt.h"
#include "log.h"

enum { NOW = 1800000000 }; /* 2027-01-15: inside the seeds' validity */

static jwt_verifier *verifier;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    log_init(LOG_ERROR, false); /* skipped JWKS keys are logged at debug and warn */
    char path[] = "/tmp/fuzz-jwt-jwks-XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0 || write(fd, FUZZ_JWT_JWKS, strlen(FUZZ_JWT_JWKS)) != (ssize_t)strlen(FUZZ_JWT_JWKS)) abort();
    close(fd);
    jwt_settings s = {.jwks = path, .issuer = "https://idp.example/realms/sdx4", .audience = "sdx4-api",
                      .leeway = 60, .refresh = 1e9, .unknown_kid_interval = 1e9, .fetch_timeout = 1};
    verifier = jwt_verifier_create(&s, stderr);
    unlink(path);
    if (!verifier) abort();
    return 0;
}

static void check_verdict(jwt_status s, const jwt_claims *c) {
    if (s == JWT_OK && (!c->subject[0] || strlen(c->subject) > JWT_SUBJECT_MAX)) abort();
    if (s != JWT_OK && (c->subject[0] || c->scopes)) abort();
    if (!jwt_status_text(s)[0]) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const char *text = (const char *)data + 1;
    size_t len = size - 1;
    jwt_claims c;
    if (data[0] == 0) {
        char *token = malloc(len + 1); /* a header value: NUL-terminated */
        memcpy(token, text, len);
        token[len] = '\0';
        check_verdict(jwt_verify(verifier, token, NOW, &c), &c);
        free(token);
    } else if (data[0] == 1) {
        check_verdict(jwt_check_claims(verifier, text, len, NOW, &c), &c);
    } else if (data[0] == 2) {
        if (jwt_jwks_check(text, len, NULL) == 0) abort(); /* a set is usable or refused, never empty */
    }
    return 0;
}
