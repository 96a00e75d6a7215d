/*
 * auth.c - API key checks (see auth.h).
 *
 * Each key is stored as its SHA-256 with its scopes. A presented key is
 * hashed, then compared against every stored digest with an OR of XORs
 * over all 32 bytes and no early exit, its scopes gathered by masks: the
 * time taken depends on neither the key's length nor how many of its
 * bytes match nor which key it is, so timing reveals nothing about the
 * configured keys.
 *
 * Identity. A client's identity must tell keys apart without standing in
 * for the key: it keys jobs, cached results, rate limits and queue lanes,
 * and may one day reach a log. A bare digest of the key would let anyone
 * who sees it test guesses offline (a short key falls quickly), so the
 * identity is an HMAC of the key's digest under a secret drawn at start:
 * 128 bits, unrelated to the key without the secret, which never leaves
 * the process. Everything it keys lives in memory too, so that it changes
 * from one run to the next costs nothing; except the request history,
 * which outlives the process and lists a key's jobs by identity: its
 * database holds a secret drawn once, which replaces this one
 * (auth_set_identity_secret).
 *
 * Tokens. A bearer token (jwt.c verifies it) names its client by `sub`,
 * unique within its issuer: the identity is "sub:" and the first 128 bits
 * of an HMAC of (SHA-256 of the issuer, subject) under the same secret as keys', so
 * a subject keeps its jobs, history and allowance across tokens, restarts
 * (with --history) and cluster nodes, exactly as a key does, and cannot
 * collide with a key's identity. A refused token counts as a failed
 * attempt of the address like a wrong key; the reason goes to the client
 * (expired, wrong audience...: what it needs to get a good token, nothing
 * that helps forge one) and to the log at debug level.
 *
 * Cluster mode. What identities key (jobs, cached results, rate limits)
 * lives in Redis and is read by every node, so every node must give a key
 * the same identity: the secret is then drawn once for the cluster and
 * kept in Redis (sdx4:identity-secret, SET NX: the first node's draw wins,
 * every other node reads it), fetched at the first keyed request rather
 * than at start, so that a node may start while Redis is down. It is as
 * safe there as the jobs and results it guards; if Redis loses it, a new
 * one is drawn, and the jobs of the old identities are lost with it.
 *
 * Throttling. Failed attempts (401 and 403) are counted per client
 * address by a rate limiter of `failures` a minute (ratelimit.c's GCRA:
 * a burst of that many, then one more every 60/failures s). An address
 * with no allowance left gets 429 before its key is looked at, whether
 * the key is right or not: a guesser learns nothing more until the
 * allowance refills, and its refusals do not push the refill further
 * away. Addresses behind one unconfigured proxy, or one NAT, share an
 * allowance: --trusted-proxies is what tells them apart.
 */
#include "auth.h"

#include <ctype.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>

#include "cache.h"
#include "jwt.h"
#include "log.h"
#include "ratelimit.h"
#include "redis.h"
#include "server.h"

enum { FAILURE_WINDOW = 60 }; /* seconds over which --auth-failures counts */

struct auth {
    int count;
    uint8_t (*digests)[32];
    unsigned *scopes;  /* each key's */
    bool upscale_open; /* no API key: the upscale scope needs no credential */
    uint8_t identity_secret[32];
    ratelimit *failures; /* failed attempts per address */
    redis *redis;        /* shared: the secret comes from there */
    pthread_mutex_t lock; /* one fetch of the shared secret at a time */
    atomic_bool secret_ready; /* identity_secret is final */
    bool secret_given;        /* by auth_set_identity_secret: Redis's is not fetched */
    jwt_verifier *jwt;        /* bearer tokens, NULL without --jwt-jwks */
    uint8_t jwt_issuer_digest[32]; /* SHA-256 of --jwt-issuer: part of a token's identity */
};

static int add_key(auth *a, const char *key, size_t len, unsigned scopes) {
    uint8_t(*grown)[32] = realloc(a->digests, (size_t)(a->count + 1) * sizeof *grown);
    if (!grown) return -1;
    a->digests = grown;
    unsigned *grown_scopes = realloc(a->scopes, (size_t)(a->count + 1) * sizeof *grown_scopes);
    if (!grown_scopes) return -1;
    a->scopes = grown_scopes;
    a->scopes[a->count] = scopes;
    sha256(a->digests[a->count++], key, len);
    return 0;
}

static int add_keys(auth *a, const string_list *keys, unsigned scopes) {
    for (int i = 0; i < keys->count; i++)
        if (add_key(a, keys->items[i], strlen(keys->items[i]), scopes)) return -1;
    return 0;
}

static int load_keys_file(auth *a, const char *path, unsigned scopes, FILE *err) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(err, "sdx4 serve: cannot read %s keys file %s\n", scopes & AUTH_SCOPE_ADMIN ? "admin" : "API",
                path);
        return -1;
    }
    char line[1024];
    int rc = 0;
    while (rc == 0 && fgets(line, sizeof line, f)) {
        char *s = line, *e = line + strlen(line);
        while (isspace((unsigned char)*s)) s++;
        while (e > s && isspace((unsigned char)e[-1])) e--;
        if (e > s && *s != '#') rc = add_key(a, s, (size_t)(e - s), scopes);
    }
    fclose(f);
    return rc;
}

auth *auth_create(const server_config *cfg, FILE *err) {
    auth *a = calloc(1, sizeof *a);
    if (!a) return NULL;
    pthread_mutex_init(&a->lock, NULL);
    const unsigned admin = AUTH_SCOPE_UPSCALE | AUTH_SCOPE_ADMIN;
    if (add_keys(a, &cfg->api_keys, AUTH_SCOPE_UPSCALE)) goto fail;
    if (cfg->api_keys_file && load_keys_file(a, cfg->api_keys_file, AUTH_SCOPE_UPSCALE, err)) goto fail;
    if (cfg->jwt_jwks) {
        jwt_settings js = {.jwks = cfg->jwt_jwks, .issuer = cfg->jwt_issuer, .audience = cfg->jwt_audience,
                           .leeway = cfg->jwt_leeway, .refresh = cfg->jwt_jwks_refresh,
                           .unknown_kid_interval = 30, .fetch_timeout = 10,
                           .ca_file = cfg->outbound_ca_file};
        if (!(a->jwt = jwt_verifier_create(&js, err))) goto fail;
        sha256(a->jwt_issuer_digest, cfg->jwt_issuer, strlen(cfg->jwt_issuer));
    }
    a->upscale_open = a->count == 0 && !a->jwt;
    if (add_keys(a, &cfg->admin_keys, admin)) goto fail;
    if (cfg->admin_keys_file && load_keys_file(a, cfg->admin_keys_file, admin, err)) goto fail;
    if (getrandom(a->identity_secret, sizeof a->identity_secret, 0) != sizeof a->identity_secret) {
        fprintf(err, "sdx4 serve: no random bytes for the identity secret\n");
        goto fail;
    }
    atomic_store(&a->secret_ready, true);
    string_list no_proxies = {0};
    if (!(a->failures = ratelimit_create(cfg->auth_failures, FAILURE_WINDOW, &no_proxies, err))) goto fail;
    return a;
fail:
    auth_destroy(a);
    return NULL;
}

void auth_destroy(auth *a) {
    if (!a) return;
    ratelimit_destroy(a->failures);
    jwt_verifier_destroy(a->jwt);
    pthread_mutex_destroy(&a->lock);
    free(a->digests);
    free(a->scopes);
    free(a);
}

bool auth_enabled(const auth *a) { return !a->upscale_open; }

void auth_set_identity_secret(auth *a, const uint8_t secret[32]) {
    memcpy(a->identity_secret, secret, sizeof a->identity_secret);
    a->secret_given = true;
    atomic_store(&a->secret_ready, true);
}

void auth_share(auth *a, redis *redis) {
    a->redis = redis;
    ratelimit_share(a->failures, redis, "auth-failures");
    if (!a->secret_given) atomic_store(&a->secret_ready, false);
}

/* Replaces the secret drawn at start by the cluster's (see the top of the
 * file); false while Redis cannot be reached. */
static bool fetch_shared_secret(auth *a) {
    pthread_mutex_lock(&a->lock);
    bool ready = atomic_load(&a->secret_ready);
    if (!ready) {
        char err[256];
        const char *argv[] = {"SET", "sdx4:identity-secret", (const char *)a->identity_secret, "NX"};
        size_t lens[] = {3, 20, sizeof a->identity_secret, 2};
        redisReply *set = redis_call_argv(a->redis, err, sizeof err, 4, argv, lens);
        redisReply *get = set ? redis_call(a->redis, err, sizeof err, "GET sdx4:identity-secret") : NULL;
        if (get && get->type == REDIS_REPLY_STRING && get->len == sizeof a->identity_secret) {
            memcpy(a->identity_secret, get->str, sizeof a->identity_secret);
            atomic_store(&a->secret_ready, ready = true);
        }
        freeReplyObject(set);
        freeReplyObject(get);
    }
    pthread_mutex_unlock(&a->lock);
    return ready;
}

/* The presented key, or NULL when none is presented in a usable form. */
static const char *presented_key(const char *authorization, const char *api_key) {
    const char *key = api_key;
    if (authorization) {
        if (strncasecmp(authorization, "Bearer ", 7) != 0) return NULL;
        key = authorization + 7;
        while (*key == ' ') key++;
    }
    return key && *key ? key : NULL;
}

/* `prefix` and the first 128 bits of the HMAC of `data` under the identity
 * secret, in hex. */
static void set_identity(auth *a, auth_client *client, const char *prefix, const void *data, size_t len) {
    uint8_t id[32];
    hmac_sha256(id, a->identity_secret, sizeof a->identity_secret, data, len);
    static const char hex[] = "0123456789abcdef";
    char *out = client->identity + strlen(prefix);
    memcpy(client->identity, prefix, strlen(prefix));
    for (int i = 0; i < 16; i++) {
        out[2 * i] = hex[id[i] >> 4];
        out[2 * i + 1] = hex[id[i] & 15];
    }
    out[32] = '\0';
}

static problem_kind check_token(auth *a, const char *address, const char *token, unsigned required, double now,
                                auth_client *client) {
    jwt_claims claims;
    jwt_status status = jwt_verify(a->jwt, token, wall_now(), &claims);
    if (status != JWT_OK) {
        rate_decision d;
        ratelimit_check(a->failures, address, now, &d);
        client->refusal = jwt_status_text(status);
        log_event(LOG_DEBUG, "token_refused", json_pack("{s:s?,s:s}", "address", address, "reason", client->refusal));
        return PROBLEM_UNAUTHORIZED;
    }
    if (!atomic_load(&a->secret_ready) && !fetch_shared_secret(a)) return PROBLEM_STORE_UNAVAILABLE;
    uint8_t named[32 + JWT_SUBJECT_MAX]; /* the issuer's digest, then the subject */
    size_t subject_len = strlen(claims.subject);
    memcpy(named, a->jwt_issuer_digest, 32);
    memcpy(named + 32, claims.subject, subject_len);
    set_identity(a, client, "sub:", named, 32 + subject_len);
    client->scopes = claims.scopes;
    return (claims.scopes & required) == required ? PROBLEM_NONE : PROBLEM_FORBIDDEN;
}

problem_kind auth_check(auth *a, const char *address, const char *authorization, const char *api_key,
                        unsigned required, double now, auth_client *client, double *retry_after) {
    client->identity[0] = '\0';
    client->scopes = 0;
    client->refusal = NULL;
    *retry_after = 0;
    if (a->upscale_open && !(required & ~(unsigned)AUTH_SCOPE_UPSCALE)) {
        client->scopes = AUTH_SCOPE_UPSCALE;
        return PROBLEM_NONE;
    }
    rate_decision d;
    ratelimit_peek(a->failures, address, now, &d);
    if (d.unavailable) return PROBLEM_STORE_UNAVAILABLE;
    if (!d.allowed) {
        *retry_after = d.retry_after;
        return PROBLEM_RATE_LIMITED;
    }

    const char *key = presented_key(authorization, api_key);
    if (key && a->jwt && jwt_shaped(key)) return check_token(a, address, key, required, now, client);
    uint8_t digest[32];
    unsigned scopes = 0;
    if (key) {
        sha256(digest, key, strlen(key));
        for (int k = 0; k < a->count; k++) {
            unsigned diff = 0;
            for (int i = 0; i < 32; i++) diff |= a->digests[k][i] ^ digest[i];
            scopes |= a->scopes[k] & (0u - (unsigned)(diff == 0));
        }
    }
    if (!scopes) {
        ratelimit_check(a->failures, address, now, &d);
        return key ? PROBLEM_FORBIDDEN : PROBLEM_UNAUTHORIZED;
    }
    if (!atomic_load(&a->secret_ready) && !fetch_shared_secret(a)) return PROBLEM_STORE_UNAVAILABLE;
    set_identity(a, client, "key:", digest, sizeof digest);
    client->scopes = scopes;
    return (scopes & required) == required ? PROBLEM_NONE : PROBLEM_FORBIDDEN;
}
