/*
 * test_server_auth.c - who a credential makes a client (auth.c) without a
 * server: API keys and admin keys and their scopes, the open upscale scope
 * without API keys (never the admin one), keys from files, and which
 * refusals count as failed attempts of the address. tests/server drives
 * the same through HTTP; test_server_shared_state.c the cluster's side.
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "auth.h"
#include "server.h"
#include "test.h"

static problem_kind check(auth *a, const char *address, const char *bearer, unsigned required, auth_client *c) {
    char header[256];
    snprintf(header, sizeof header, "Bearer %s", bearer ? bearer : "");
    double retry;
    return auth_check(a, address, bearer ? header : NULL, NULL, required, mono_now(), c, &retry);
}

static void test_scopes(void) {
    server_config cfg = {.api_keys = {(char *[]){"user-key"}, 1},
                         .admin_keys = {(char *[]){"admin-key"}, 1},
                         .auth_failures = 100};
    auth *a = auth_create(&cfg, stderr);
    CHECK(a && auth_enabled(a), "keys configured: the upscale scope needs one");
    auth_client c;
    CHECK(check(a, "10.0.0.1", "user-key", AUTH_SCOPE_UPSCALE, &c) == PROBLEM_NONE &&
              c.scopes == AUTH_SCOPE_UPSCALE && strncmp(c.identity, "key:", 4) == 0,
          "an API key: scopes %u", c.scopes);
    char user[AUTH_IDENTITY_SIZE];
    memcpy(user, c.identity, sizeof user);
    CHECK(check(a, "10.0.0.1", "user-key", AUTH_SCOPE_ADMIN, &c) == PROBLEM_FORBIDDEN &&
              strcmp(c.identity, user) == 0,
          "an API key reached the admin scope, or lost its identity on refusal");
    CHECK(check(a, "10.0.0.1", "admin-key", AUTH_SCOPE_ADMIN, &c) == PROBLEM_NONE &&
              c.scopes == (AUTH_SCOPE_UPSCALE | AUTH_SCOPE_ADMIN) && strcmp(c.identity, user) != 0,
          "an admin key: scopes %u", c.scopes);
    CHECK(check(a, "10.0.0.1", "admin-key", AUTH_SCOPE_UPSCALE, &c) == PROBLEM_NONE, "an admin key may upscale");
    CHECK(check(a, "10.0.0.1", NULL, AUTH_SCOPE_UPSCALE, &c) == PROBLEM_UNAUTHORIZED && c.scopes == 0 &&
              !c.identity[0],
          "no key");
    CHECK(check(a, "10.0.0.1", "admin-kez", AUTH_SCOPE_ADMIN, &c) == PROBLEM_FORBIDDEN && !c.identity[0],
          "a wrong admin key");
    auth_destroy(a);
}

/* Without API keys anyone may upscale, anonymously, whatever they send;
 * the admin scope still needs an admin key, and without one configured
 * nobody has it. */
static void test_open_upscale(void) {
    server_config cfg = {.admin_keys = {(char *[]){"admin-key"}, 1}, .auth_failures = 100};
    auth *a = auth_create(&cfg, stderr);
    CHECK(a && !auth_enabled(a), "admin keys alone close the upscale scope");
    auth_client c;
    CHECK(check(a, "10.0.0.2", "anything", AUTH_SCOPE_UPSCALE, &c) == PROBLEM_NONE && !c.identity[0] &&
              c.scopes == AUTH_SCOPE_UPSCALE,
          "open upscale scope");
    CHECK(check(a, "10.0.0.2", NULL, AUTH_SCOPE_ADMIN, &c) == PROBLEM_UNAUTHORIZED, "admin without a key");
    CHECK(check(a, "10.0.0.2", "admin-key", AUTH_SCOPE_ADMIN, &c) == PROBLEM_NONE, "admin key refused");
    auth_destroy(a);

    server_config none = {.auth_failures = 100};
    a = auth_create(&none, stderr);
    CHECK(check(a, "10.0.0.2", NULL, AUTH_SCOPE_ADMIN, &c) == PROBLEM_UNAUTHORIZED &&
              check(a, "10.0.0.2", "x", AUTH_SCOPE_ADMIN, &c) == PROBLEM_FORBIDDEN,
          "nothing configured: the admin scope open");
    auth_destroy(a);
}

/* Guesses count against the address; a valid key that lacks a scope does
 * not (nothing was guessed), so a user's address is not throttled for
 * knocking on the admin API. */
static void test_failed_attempts(void) {
    server_config cfg = {.api_keys = {(char *[]){"user-key"}, 1}, .auth_failures = 2};
    auth *a = auth_create(&cfg, stderr);
    auth_client c;
    for (int i = 0; i < 5; i++)
        CHECK(check(a, "10.0.0.3", "user-key", AUTH_SCOPE_ADMIN, &c) == PROBLEM_FORBIDDEN, "scope refusal %d", i);
    CHECK(check(a, "10.0.0.3", "user-key", AUTH_SCOPE_UPSCALE, &c) == PROBLEM_NONE,
          "scope refusals throttled the address");
    CHECK(check(a, "10.0.0.4", "bad", AUTH_SCOPE_UPSCALE, &c) == PROBLEM_FORBIDDEN &&
              check(a, "10.0.0.4", NULL, AUTH_SCOPE_UPSCALE, &c) == PROBLEM_UNAUTHORIZED &&
              check(a, "10.0.0.4", "user-key", AUTH_SCOPE_UPSCALE, &c) == PROBLEM_RATE_LIMITED,
          "two failures did not throttle the address");
    auth_destroy(a);
}

static void test_files(void) {
    char path[] = "/tmp/sdx4-admin-keys-XXXXXX";
    int fd = mkstemp(path);
    const char text[] = "# admins\n  first-admin  \n\nsecond-admin\n";
    CHECK(fd >= 0 && write(fd, text, sizeof text - 1) == (ssize_t)(sizeof text - 1), "temporary file");
    close(fd);
    server_config cfg = {.admin_keys_file = path, .auth_failures = 100};
    auth *a = auth_create(&cfg, stderr);
    auth_client c;
    CHECK(a && check(a, "10.0.0.5", "first-admin", AUTH_SCOPE_ADMIN, &c) == PROBLEM_NONE &&
              check(a, "10.0.0.5", "second-admin", AUTH_SCOPE_ADMIN, &c) == PROBLEM_NONE &&
              check(a, "10.0.0.5", "# admins", AUTH_SCOPE_ADMIN, &c) == PROBLEM_FORBIDDEN,
          "keys from a file (trimmed, comments skipped)");
    auth_destroy(a);
    unlink(path);
    FILE *devnull = fopen("/dev/null", "w");
    CHECK(auth_create(&cfg, devnull) == NULL, "a missing admin keys file accepted");
    fclose(devnull);
}

int main(void) {
    test_scopes();
    test_open_upscale();
    test_failed_attempts();
    test_files();
    return test_finish("test_server_auth");
}
