/*
 * auth.h - optional API keys (Authorization: Bearer KEY or X-API-Key: KEY),
 * the identity and scopes they give a client, and throttling of failed
 * attempts.
 *
 * Bearer tokens. With --jwt-jwks, a credential shaped like a JWT (jwt.h)
 * is verified as an OAuth 2 / OIDC access token instead of being matched
 * as a key: its subject is the client ("sub:" identities) and its scopes
 * are what the token grants. Keys keep working beside tokens.
 *
 * Scopes. `upscale` is everything but the admin API; `admin` is the admin
 * API (admin.h). API keys (--api-keys, --api-keys-file: one key per line,
 * # comments) have the upscale scope; admin keys (--admin-keys,
 * --admin-keys-file) have both. With no API key configured the upscale
 * scope is open to everyone, anonymously; the admin scope never is. Only
 * digests of the keys are kept, and a presented key is compared with
 * every configured digest in constant time.
 *
 * An address whose attempts keep failing (no key or a wrong one) is
 * refused for a while before its key is even looked at: --auth-failures
 * per address per minute, then 429 until the allowance refills. Thread-safe.
 */
#ifndef SDX4_SERVER_AUTH_H
#define SDX4_SERVER_AUTH_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "config.h"
#include "problem.h"

typedef struct auth auth;

/* Who made a request: "key:" and 32 hex digits derived from its key (see
 * auth.c: it reveals nothing about the key, and differs from one run of
 * the server to the next, unless shared), "sub:" and 32 hex digits derived
 * from a token's issuer and subject likewise, or "" for anonymous clients
 * when no keys or tokens are configured. Jobs and cached results belong to it. */
#define AUTH_IDENTITY_SIZE 40

/* What a credential allows (a bit set). */
enum { AUTH_SCOPE_UPSCALE = 1u << 0, AUTH_SCOPE_ADMIN = 1u << 1 };

/* The client a credential identifies. */
typedef struct {
    char identity[AUTH_IDENTITY_SIZE];
    unsigned scopes;
    const char *refusal; /* why a bearer token was refused (jwt_status_text), else NULL */
} auth_client;

/* From the settings' keys (api-keys, api-keys-file, admin-keys,
 * admin-keys-file), tokens (jwt-*) and --auth-failures: failed attempts per address per
 * minute before 429 (0: no limit). NULL with a message on `err` when the
 * keys cannot be read or the tokens' keys cannot be loaded. */
auth *auth_create(const server_config *cfg, FILE *err);
void auth_destroy(auth *a);
/* Whether the upscale scope needs a credential. */
bool auth_enabled(const auth *a);
/* Replaces the secret drawn at start, before any request: identities then
 * stay the same from one run to the next, and on every server given the
 * same secret (the request history keeps one in its database). */
void auth_set_identity_secret(auth *a, const uint8_t secret[32]);
/* Cluster mode: failed attempts are counted in Redis, and identities are
 * the same on every node (call before any check; `redis` outlives `a`). */
struct redis;
void auth_share(auth *a, struct redis *redis);

/* Judges a request from `address` (the client's address, see ratelimit.h)
 * at `now` (mono_now()) that needs the scope `required`: PROBLEM_NONE when
 * it may go on, with its client (anonymous: identity "" when the upscale
 * scope is open and that is all it needs); PROBLEM_RATE_LIMITED when the
 * address failed too often lately (its key unchecked; `retry_after`
 * seconds until the next attempt is allowed); PROBLEM_UNAUTHORIZED without
 * a key or with a refused token (`client->refusal` says why: RFC 6750's
 * invalid_token, which a client answers by getting a new one),
 * PROBLEM_FORBIDDEN with a wrong key (all three counted as failures of the
 * address) or with a valid key or token that lacks the scope (then
 * `client` names it; not a failure: nothing was guessed); PROBLEM_STORE_UNAVAILABLE
 * when shared and Redis cannot be reached. */
problem_kind auth_check(auth *a, const char *address, const char *authorization, const char *api_key,
                        unsigned required, double now, auth_client *client, double *retry_after);

#endif
