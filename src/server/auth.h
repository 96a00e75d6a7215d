/*
 * auth.h - optional API keys (Authorization: Bearer KEY or X-API-Key: KEY)
 * and the identity they give a client.
 *
 * With no key configured every request passes, anonymously. Keys come from
 * --api-keys (SDX4_API_KEYS) and --api-keys-file (one key per line, #
 * comments). Only digests of the keys are kept, and a presented key is
 * compared with every configured digest in constant time.
 */
#ifndef SDX4_SERVER_AUTH_H
#define SDX4_SERVER_AUTH_H

#include <stdbool.h>
#include <stdio.h>

#include "config.h"
#include "problem.h"

typedef struct auth auth;

/* Who made a request: "key:" and 32 hex digits derived from its key (see
 * auth.c: it reveals nothing about the key, and differs from one run of
 * the server to the next), or "" for anonymous clients when no keys are
 * configured. Jobs and cached results belong to it. */
#define AUTH_IDENTITY_SIZE 40

auth *auth_create(const string_list *keys, const char *keys_file, FILE *err);
void auth_destroy(auth *a);
bool auth_enabled(const auth *a);

/* PROBLEM_NONE when the request may go on, with its identity;
 * PROBLEM_UNAUTHORIZED without a key, PROBLEM_FORBIDDEN with a wrong one. */
problem_kind auth_check(const auth *a, const char *authorization, const char *api_key,
                        char identity[AUTH_IDENTITY_SIZE]);

#endif
