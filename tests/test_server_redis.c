/*
 * test_server_redis.c - redis.c against a real redis-server: URLs that
 * must be refused, binary-safe commands, calls that fail fast (never hang)
 * while Redis is down, and recovery when it returns.
 */
#include <fcntl.h>
#include <string.h>

#include "redis.h"
#include "server.h"
#include "test.h"
#include "test_redis_server.h"

static void test_urls(void) {
    static const char *bad[] = {
        "rediss://127.0.0.1:6379", "http://127.0.0.1", "redis://", "redis://host:0",
        "redis://host:99999", "redis://host:12ab", "redis://host/xyz", "redis://user@host",
        "redis://:%zz@host", "unix://relative/path", "unix:///tmp/s?db=x", "unix:///tmp/s?foo=1",
        "redis://[::1", "redis://host:6379junk",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char err[256] = "";
        redis *r = redis_open(bad[i], 0.2, err, sizeof err);
        CHECK(r == NULL, "%s accepted", bad[i]);
        CHECK(err[0] != '\0', "%s refused without a reason", bad[i]);
        redis_close(r);
    }
    char err[256];
    /* a well-formed URL of a Redis that is not there opens (it is retried
     * at each call) and says where without the password */
    redis *r = redis_open("redis://:s%40cret@127.0.0.1:1/3", 0.2, err, sizeof err);
    CHECK(r != NULL, "a valid URL refused: %s", err);
    if (r) {
        CHECK(strstr(redis_where(r), "cret") == NULL, "password shown: %s", redis_where(r));
        CHECK(strstr(redis_where(r), ":1/3") != NULL, "where: %s", redis_where(r));
        CHECK(!redis_up(r), "up without a server");
        redis_close(r);
    }
}

static void test_commands(redis *r) {
    char err[256];
    const char value[] = {'a', '\0', 'b', '\r', '\n'};
    const char *argv[] = {"SET", "k", value};
    size_t lens[] = {3, 1, sizeof value};
    redisReply *reply = redis_call_argv(r, err, sizeof err, 3, argv, lens);
    CHECK(reply && reply->type == REDIS_REPLY_STATUS, "SET: %s", err);
    freeReplyObject(reply);
    reply = redis_call(r, err, sizeof err, "GET %s", "k");
    CHECK(reply && reply->type == REDIS_REPLY_STRING && reply->len == sizeof value &&
              memcmp(reply->str, value, sizeof value) == 0,
          "GET did not give back the binary value");
    freeReplyObject(reply);
    reply = redis_call(r, err, sizeof err, "NOSUCHCOMMAND");
    CHECK(reply == NULL && strstr(err, "unknown command"), "an error reply: %s", err);
    CHECK(redis_up(r), "an error reply is not Redis being down");
}

int main(void) {
    signal(SIGPIPE, SIG_IGN); /* as sdx4 serve: a write to a closed socket is an error, not death */
    test_urls();
    test_redis srv = {0};
    if (test_redis_start(&srv) != 0) {
        fprintf(stderr, "SKIP: redis-server could not be started (scripts/install-deps.sh installs it)\n");
        return 77;
    }
    char err[256];
    redis *r = redis_open(srv.url, 0.5, err, sizeof err);
    CHECK(r != NULL, "open: %s", err);
    if (!r) return 1;
    CHECK(redis_up(r), "not up after open");
    test_commands(r);

    /* many threads' worth of borrowed connections come back to the pool */
    redisContext *held[20];
    for (int i = 0; i < 20; i++) held[i] = redis_borrow(r, 2.0, err, sizeof err);
    for (int i = 0; i < 20; i++) {
        CHECK(held[i] != NULL, "borrow %d: %s", i, err);
        redis_release(r, held[i], false);
    }

    /* down: every call fails within the timeout, most at once */
    test_redis_stop(&srv);
    double t0 = mono_now();
    int failed = 0;
    for (int i = 0; i < 50; i++) {
        redisReply *reply = redis_call(r, err, sizeof err, "PING");
        failed += reply == NULL;
        freeReplyObject(reply);
    }
    double spent = mono_now() - t0;
    CHECK(failed == 50, "%d of 50 calls answered with Redis stopped", 50 - failed);
    /* 50 full timeouts would be 25 s; the bound leaves room for a loaded machine */
    CHECK(spent < 10.0, "50 calls to a stopped Redis took %.2f s", spent);
    CHECK(!redis_up(r), "up while stopped");

    /* back: the next call after the retry pause reconnects */
    CHECK(test_redis_start(&srv) == 0, "restart failed");
    nanosleep(&(struct timespec){1, 100000000}, NULL);
    redisReply *reply = redis_call(r, err, sizeof err, "GET %s", "k");
    CHECK(reply != NULL, "no recovery: %s", err);
    /* appendonly: the value survived the restart */
    CHECK(reply && reply->type == REDIS_REPLY_STRING && reply->len == 5, "value lost over a restart");
    freeReplyObject(reply);
    CHECK(redis_up(r), "not up after recovery");

    redis_close(r);
    test_redis_remove(&srv);
    printf("%d checks, %d failures\n", test_checks, test_failures);
    return test_failures ? 1 : 0;
}
