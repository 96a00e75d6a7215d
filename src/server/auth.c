/*
 * auth.c - API key checks (see auth.h).
 *
 * Each key is stored as its SHA-256. A presented key is hashed, then
 * compared against every stored digest with an OR of XORs over all 32
 * bytes and no early exit: the time taken depends on neither the key's
 * length nor how many of its bytes match nor which key it is, so timing
 * reveals nothing about the configured keys.
 *
 * Identity. A client's identity must tell keys apart without standing in
 * for the key: it keys jobs, cached results, rate limits and queue lanes,
 * and may one day reach a log. A bare digest of the key would let anyone
 * who sees it test guesses offline (a short key falls quickly), so the
 * identity is an HMAC of the key's digest under a secret drawn at start:
 * 128 bits, unrelated to the key without the secret, which never leaves
 * the process. Everything it keys lives in memory too, so that it changes
 * from one run to the next costs nothing. In cluster mode the jobs it keys
 * live in Redis, read by every node: there the secret is drawn once and
 * kept in Redis beside them (auth_share_identity_secret).
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
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>

#include "cache.h"
#include "ratelimit.h"

enum { FAILURE_WINDOW = 60 }; /* seconds over which --auth-failures counts */

struct auth {
    int count;
    uint8_t (*digests)[32];
    uint8_t identity_secret[32];
    ratelimit *failures; /* failed attempts per address */
};

static int add_key(auth *a, const char *key, size_t len) {
    uint8_t(*grown)[32] = realloc(a->digests, (size_t)(a->count + 1) * sizeof *grown);
    if (!grown) return -1;
    a->digests = grown;
    sha256(a->digests[a->count++], key, len);
    return 0;
}

static int load_keys_file(auth *a, const char *path, FILE *err) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(err, "sdx4 serve: cannot read API keys file %s\n", path);
        return -1;
    }
    char line[1024];
    int rc = 0;
    while (rc == 0 && fgets(line, sizeof line, f)) {
        char *s = line, *e = line + strlen(line);
        while (isspace((unsigned char)*s)) s++;
        while (e > s && isspace((unsigned char)e[-1])) e--;
        if (e > s && *s != '#') rc = add_key(a, s, (size_t)(e - s));
    }
    fclose(f);
    return rc;
}

auth *auth_create(const string_list *keys, const char *keys_file, int failures, FILE *err) {
    auth *a = calloc(1, sizeof *a);
    if (!a) return NULL;
    for (int i = 0; i < keys->count; i++)
        if (add_key(a, keys->items[i], strlen(keys->items[i]))) goto fail;
    if (keys_file && load_keys_file(a, keys_file, err)) goto fail;
    if (getrandom(a->identity_secret, sizeof a->identity_secret, 0) != sizeof a->identity_secret) {
        fprintf(err, "sdx4 serve: no random bytes for the identity secret\n");
        goto fail;
    }
    string_list no_proxies = {0};
    if (!(a->failures = ratelimit_create(failures, FAILURE_WINDOW, &no_proxies, err))) goto fail;
    return a;
fail:
    auth_destroy(a);
    return NULL;
}

void auth_share_identity_secret(auth *a, const uint8_t secret[32]) {
    memcpy(a->identity_secret, secret, sizeof a->identity_secret);
}

void auth_destroy(auth *a) {
    if (!a) return;
    ratelimit_destroy(a->failures);
    free(a->digests);
    free(a);
}

bool auth_enabled(const auth *a) { return a->count > 0; }

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

problem_kind auth_check(auth *a, const char *address, const char *authorization,
                        const char *api_key, double now, char identity[AUTH_IDENTITY_SIZE],
                        double *retry_after) {
    identity[0] = '\0';
    *retry_after = 0;
    if (!a->count) return PROBLEM_NONE;
    rate_decision d;
    ratelimit_peek(a->failures, address, now, &d);
    if (!d.allowed) {
        *retry_after = d.retry_after;
        return PROBLEM_RATE_LIMITED;
    }

    const char *key = presented_key(authorization, api_key);
    uint8_t digest[32];
    unsigned matched = 0;
    if (key) {
        sha256(digest, key, strlen(key));
        for (int k = 0; k < a->count; k++) {
            unsigned diff = 0;
            for (int i = 0; i < 32; i++) diff |= a->digests[k][i] ^ digest[i];
            matched |= (unsigned)(diff == 0);
        }
    }
    if (!matched) {
        ratelimit_check(a->failures, address, now, &d);
        return key ? PROBLEM_FORBIDDEN : PROBLEM_UNAUTHORIZED;
    }
    uint8_t id[32];
    hmac_sha256(id, a->identity_secret, sizeof a->identity_secret, digest, sizeof digest);
    static const char hex[] = "0123456789abcdef";
    memcpy(identity, "key:", 4);
    for (int i = 0; i < 16; i++) {
        identity[4 + 2 * i] = hex[id[i] >> 4];
        identity[5 + 2 * i] = hex[id[i] & 15];
    }
    identity[36] = '\0';
    return PROBLEM_NONE;
}
