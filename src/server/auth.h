/*
 * auth.h - optional API keys (Authorization: Bearer KEY or X-API-Key: KEY),
 * the identity they give a client, and throttling of failed attempts.
 *
 * With no key configured every request passes, anonymously. Keys come from
 * --api-keys (SDX4_API_KEYS) and --api-keys-file (one key per line, #
 * comments). Only digests of the keys are kept, and a presented key is
 * compared with every configured digest in constant time.
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
 * the server to the next), or "" for anonymous clients when no keys are
 * configured. Jobs and cached results belong to it. */
#define AUTH_IDENTITY_SIZE 40

/* `failures` failed attempts per address per minute before 429 (0: no
 * limit). NULL with a message on `err` when the keys cannot be read. */
auth *auth_create(const string_list *keys, const char *keys_file, int failures, FILE *err);
void auth_destroy(auth *a);
/* Cluster mode: the identity secret shared by every node (kept in Redis),
 * so that a key names the same identity, and owns the same jobs, on each. */
void auth_share_identity_secret(auth *a, const uint8_t secret[32]);
bool auth_enabled(const auth *a);

/* Judges a request from `address` (the client's address, see ratelimit.h)
 * at `now` (mono_now()): PROBLEM_NONE when it may go on, with its
 * identity; PROBLEM_RATE_LIMITED when the address failed too often lately
 * (its key unchecked; `retry_after` seconds until the next attempt is
 * allowed); PROBLEM_UNAUTHORIZED without a key, PROBLEM_FORBIDDEN with a
 * wrong one (both counted as failures of the address). */
problem_kind auth_check(auth *a, const char *address, const char *authorization,
                        const char *api_key, double now, char identity[AUTH_IDENTITY_SIZE],
                        double *retry_after);

#endif
