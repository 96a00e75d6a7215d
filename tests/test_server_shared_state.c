/*
 * test_server_shared_state.c - what the nodes of a cluster share through a
 * real redis-server: two rate limiters (two nodes) count one allowance per
 * client, two caches see each other's results and links within one byte
 * budget, two auths give a key the same identity and count its failures
 * together; with Redis stopped every one of them answers at once (refused,
 * a miss, unavailable) and counts it, and all recover when it returns.
 */
#include <fcntl.h>
#include <pthread.h>
#include <string.h>

#include "auth.h"
#include "cache.h"
#include "ratelimit.h"
#include "redis.h"
#include "server.h"
#include "test.h"
#include "test_redis_server.h"

static string_list no_proxies;

static void test_rate_limit(redis *a, redis *b) {
    /* 10 a minute, as the server's default, split over two nodes */
    ratelimit *node[2] = {ratelimit_create(10, 60, &no_proxies, stderr),
                          ratelimit_create(10, 60, &no_proxies, stderr)};
    ratelimit_share(node[0], a, "rate");
    ratelimit_share(node[1], b, "rate");
    rate_decision d;
    ratelimit_peek(node[0], "10.0.0.1", mono_now(), &d);
    CHECK(d.allowed && !d.unavailable && d.remaining == 10, "fresh peek: %d left", d.remaining);
    int allowed = 0;
    for (int i = 0; i < 14; i++) {
        ratelimit_check(node[i % 2], "10.0.0.1", mono_now(), &d);
        CHECK(!d.unavailable, "unavailable with Redis up");
        if (d.allowed) {
            allowed++;
            CHECK(d.remaining == 10 - allowed, "request %d: %d left", i, d.remaining);
        } else {
            /* the 11th comes back one interval (6 s) after the first (the
             * margin: a loaded machine between the first and now) */
            CHECK(d.retry_after > 4 && d.retry_after <= 6, "retry after %.3f s", d.retry_after);
            CHECK(d.remaining == 0 && d.reset > 58 && d.reset <= 60, "reset %.3f", d.reset);
        }
    }
    CHECK(allowed == 10, "%d of 14 allowed over two nodes, 10 expected", allowed);
    ratelimit_peek(node[1], "10.0.0.1", mono_now(), &d);
    CHECK(!d.allowed, "a peek on the other node allowed one more");
    ratelimit_check(node[1], "10.0.0.2", mono_now(), &d);
    CHECK(d.allowed && d.remaining == 9, "another client shares the allowance");

    /* a window that the limit does not divide: still a burst of `limit` */
    ratelimit *seven = ratelimit_create(7, 60, &no_proxies, stderr);
    ratelimit_share(seven, a, "seven");
    allowed = 0;
    for (int i = 0; i < 8; i++) {
        ratelimit_check(seven, "10.0.0.1", mono_now(), &d);
        allowed += d.allowed;
    }
    CHECK(allowed == 7, "%d of 8 allowed at 7 a minute", allowed);
    ratelimit_destroy(seven);

    /* the limiters' names keep them apart: the auth failures count elsewhere */
    ratelimit *other = ratelimit_create(10, 60, &no_proxies, stderr);
    ratelimit_share(other, a, "auth-failures");
    ratelimit_check(other, "10.0.0.1", mono_now(), &d);
    CHECK(d.allowed && d.remaining == 9, "another limiter's count seen: %d left", d.remaining);
    ratelimit_destroy(other);

    /* the key expires with its debt: a quick limit refills and the key goes */
    ratelimit *fast = ratelimit_create(2, 0.2, &no_proxies, stderr);
    ratelimit_share(fast, b, "fast");
    const char *client = "192.168.7.7";
    ratelimit_check(fast, client, mono_now(), &d);
    ratelimit_check(fast, client, mono_now(), &d);
    ratelimit_check(fast, client, mono_now(), &d);
    CHECK(!d.allowed, "third of 2 per 0.2 s allowed");
    nanosleep(&(struct timespec){0, 300 * 1000 * 1000}, NULL);
    ratelimit_check(fast, client, mono_now(), &d);
    CHECK(d.allowed && d.remaining == 1, "no refill after the window: %d left", d.remaining);
    char err[256];
    redisReply *keys = redis_call(a, err, sizeof err, "KEYS sdx4:fast:*");
    CHECK(keys && keys->elements == 1 && keys->element[0]->len == strlen("sdx4:fast:") + 32,
          "one key of 128 hex bits per client");
    CHECK(keys && keys->elements == 1 && !strstr(keys->element[0]->str, client),
          "the client's name spelled in Redis");
    freeReplyObject(keys);
    nanosleep(&(struct timespec){0, 250 * 1000 * 1000}, NULL);
    keys = redis_call(a, err, sizeof err, "KEYS sdx4:fast:*");
    CHECK(keys && keys->elements == 0, "a full allowance still holds a key");
    freeReplyObject(keys);
    ratelimit_destroy(fast);
    ratelimit_destroy(node[0]);
    ratelimit_destroy(node[1]);
}

/* Two nodes race for the last requests of one allowance: the script makes
 * exactly `limit` win. */
typedef struct {
    ratelimit *r;
    int allowed;
} racer;

static void *race(void *arg) {
    racer *x = arg;
    for (int i = 0; i < 50; i++) {
        rate_decision d;
        ratelimit_check(x->r, "racer", mono_now(), &d);
        x->allowed += d.allowed;
    }
    return NULL;
}

static void test_rate_race(redis *a, redis *b) {
    racer x[4];
    pthread_t t[4];
    for (int i = 0; i < 4; i++) {
        x[i] = (racer){ratelimit_create(30, 3600, &no_proxies, stderr), 0};
        ratelimit_share(x[i].r, i % 2 ? b : a, "race");
        pthread_create(&t[i], NULL, race, &x[i]);
    }
    int total = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        total += x[i].allowed;
        ratelimit_destroy(x[i].r);
    }
    CHECK(total == 30, "%d of 200 racing requests allowed, limit 30", total);
}

static cached_result result_of(const char *bytes, int width) {
    return (cached_result){(void *)bytes, strlen(bytes), width, width / 2, 7, 1, 0};
}

static void test_cache(redis *a, redis *b) {
    cache *node[2] = {cache_create(1 << 20), cache_create(1 << 20)};
    cache_share(node[0], a);
    cache_share(node[1], b);
    uint8_t key[32], other[32], upload[32];
    memset(key, 1, 32);
    memset(other, 2, 32);
    memset(upload, 3, 32);
    cached_result got;
    CHECK(cache_get(node[1], key, &got) == 0, "hit before any put");

    /* binary-safe: a NUL and CRLF in the image */
    char image[] = "PNG\0\r\nbytes";
    cached_result r = {image, sizeof image, 256, 128, 7, 1, 0};
    cache_put(node[0], key, &r);
    CHECK(cache_get(node[1], key, &got) == 1, "a result put on node A missed on node B");
    if (got.data) {
        CHECK(got.len == sizeof image && memcmp(got.data, image, sizeof image) == 0, "bytes differ");
        CHECK(got.width == 256 && got.height == 128 && got.prompt_tokens == 7 && got.prompt_truncated == 1 &&
                  got.negative_truncated == 0,
              "numbers differ: %dx%d %d %d %d", got.width, got.height, got.prompt_tokens,
              got.prompt_truncated, got.negative_truncated);
        free(got.data);
    }
    CHECK(cache_get_upload(node[1], upload, &got) == 0, "a link hit before any link");
    cache_link(node[0], upload, key);
    CHECK(cache_get_upload(node[1], upload, &got) == 1, "a link made on A missed on B");
    if (got.data) free(got.data);
    cache_stats s;
    cache_get_stats(node[1], &s);
    CHECK(s.entries == 1 && s.links == 1 && s.bytes > sizeof image && s.redis_errors == 0,
          "stats: %zu entries, %zu links, %zu bytes", s.entries, s.links, s.bytes);

    /* a link whose result has gone is a miss, not an error */
    cache_link(node[0], upload, other);
    CHECK(cache_get_upload(node[1], upload, &got) == 0, "a link to nothing hit");

    /* the budget holds for the cluster: each result about 100 KB, budget
     * 1 MB, half of them put through each node: the oldest go */
    char *big = malloc(100000);
    memset(big, 'x', 99999);
    big[99999] = '\0';
    for (int i = 0; i < 30; i++) {
        uint8_t k[32] = {0};
        k[0] = (uint8_t)(10 + i);
        cached_result br = result_of(big, i);
        cache_put(node[i % 2], k, &br);
    }
    cache_get_stats(node[0], &s);
    CHECK(s.bytes <= 1 << 20 && s.bytes > (1 << 20) - 2 * 101000, "%zu bytes held, budget %d", s.bytes, 1 << 20);
    CHECK(s.entries >= 9 && s.entries <= 10, "%zu results held", s.entries);
    uint8_t first[32] = {10}, last[32] = {39};
    CHECK(cache_get(node[1], first, &got) == 0, "the oldest result survived eviction");
    CHECK(cache_get(node[1], last, &got) == 1, "the newest result was evicted");
    if (got.data) free(got.data);
    /* the index and the sizes agree with the count: nothing leaks */
    char err[256];
    redisReply *n = redis_call(a, err, sizeof err, "ZCARD sdx4:cache-index");
    redisReply *m = redis_call(a, err, sizeof err, "HLEN sdx4:cache-sizes");
    CHECK(n && m && (size_t)n->integer == s.entries + s.links && m->integer == n->integer,
          "index %lld, sizes %lld, counted %zu", n ? n->integer : -1, m ? m->integer : -1, s.entries + s.links);
    freeReplyObject(n);
    freeReplyObject(m);
    /* over half the budget is not kept, as in memory */
    char *huge = malloc(600000);
    memset(huge, 'y', 599999);
    huge[599999] = '\0';
    cached_result hr = result_of(huge, 1);
    cache_put(node[0], other, &hr);
    CHECK(cache_get(node[1], other, &got) == 0, "a result over half the budget kept");

    /* an entry deleted behind the cache's back (FLUSH, maxmemory) is
     * forgotten at the next miss: its bytes are given back */
    cache_get_stats(node[0], &s);
    size_t before = s.bytes;
    redisReply *del = redis_call(a, err, sizeof err, "DEL sdx4:cache:27%062d", 0); /* `last` */
    CHECK(del && del->integer == 1, "the newest result is not where cache.h says");
    freeReplyObject(del);
    CHECK(cache_get(node[0], last, &got) == 0, "a deleted entry hit");
    cache_get_stats(node[0], &s);
    CHECK(s.bytes < before - 99000, "bytes of a vanished entry still counted: %zu -> %zu", before, s.bytes);

    /* an entry unused for longer than the TTL has expired in Redis; the
     * next store forgets it and gives its bytes back, looked up or not */
    uint8_t stale[32] = {38}; /* the second newest */
    redisReply *age = redis_call(a, err, sizeof err, "ZADD sdx4:cache-index 1 sdx4:cache:26%062d", 0);
    CHECK(age && age->type == REDIS_REPLY_INTEGER, "ZADD: %s", err);
    freeReplyObject(age);
    del = redis_call(a, err, sizeof err, "DEL sdx4:cache:26%062d", 0);
    freeReplyObject(del);
    cache_get_stats(node[0], &s);
    before = s.bytes;
    size_t entries = s.entries;
    cache_link(node[1], upload, key);
    cache_get_stats(node[0], &s);
    CHECK(s.entries == entries - 1 && s.bytes < before - 99000, "an expired entry still counted: %zu entries",
          s.entries);
    CHECK(cache_get(node[1], stale, &got) == 0, "an expired entry hit");
    free(big);
    free(huge);
    cache_destroy(node[0]);
    cache_destroy(node[1]);
}

static void test_auth(redis *a, redis *b) {
    server_config cfg = {.api_keys = {.count = 1, .items = (char *[]){"secret-key-1"}}, .auth_failures = 3};
    auth *node[3] = {auth_create(&cfg, stderr), auth_create(&cfg, stderr), auth_create(&cfg, stderr)};
    auth_share(node[0], a);
    auth_share(node[1], b);
    auth_client id[3];
    double retry;
    for (int i = 0; i < 3; i++)
        CHECK(auth_check(node[i], "10.1.1.1", "Bearer secret-key-1", NULL, AUTH_SCOPE_UPSCALE, mono_now(), &id[i],
                         &retry) == PROBLEM_NONE,
              "node %d refused the key", i);
    CHECK(strcmp(id[0].identity, id[1].identity) == 0 && strncmp(id[0].identity, "key:", 4) == 0,
          "two nodes, two identities: %s %s", id[0].identity, id[1].identity);
    CHECK(strcmp(id[0].identity, id[2].identity) != 0, "an unshared auth has the cluster's identity");

    /* 3 failures a minute per address, counted across nodes */
    int refused = 0;
    for (int i = 0; i < 4; i++) {
        problem_kind k = auth_check(node[i % 2], "10.1.1.2", "Bearer wrong", NULL, AUTH_SCOPE_UPSCALE, mono_now(),
                                    &id[2], &retry);
        refused += k == PROBLEM_RATE_LIMITED;
        CHECK(k == (i < 3 ? PROBLEM_FORBIDDEN : PROBLEM_RATE_LIMITED), "attempt %d: %d", i, k);
    }
    CHECK(refused == 1 && retry > 0, "the fourth failure across two nodes not throttled");
    for (int i = 0; i < 3; i++) auth_destroy(node[i]);
}

/* Redis stopped: everything answers within the timeout, and says so. */
static void test_down(redis *a, test_redis *server) {
    ratelimit *rl = ratelimit_create(10, 60, &no_proxies, stderr);
    ratelimit_share(rl, a, "rate");
    cache *c = cache_create(1 << 20);
    cache_share(c, a);
    server_config cfg = {.api_keys = {.count = 1, .items = (char *[]){"k2"}}, .auth_failures = 3};
    auth *au = auth_create(&cfg, stderr);
    auth_share(au, a);

    test_redis_stop(server);
    double t0 = mono_now();
    rate_decision d;
    uint8_t key[32] = {1};
    cached_result got, r = result_of("abc", 1);
    auth_client id;
    double retry;
    for (int i = 0; i < 20; i++) {
        ratelimit_check(rl, "10.0.0.9", mono_now(), &d);
        CHECK(d.unavailable && !d.allowed && d.retry_after == 1, "a decision without Redis");
        CHECK(cache_get(c, key, &got) == 0, "a hit without Redis");
        CHECK(cache_get_upload(c, key, &got) == 0, "a link hit without Redis");
        cache_put(c, key, &r);
        cache_link(c, key, key);
        CHECK(auth_check(au, "10.0.0.9", "Bearer k2", NULL, AUTH_SCOPE_UPSCALE, mono_now(), &id, &retry) == PROBLEM_STORE_UNAVAILABLE,
              "a key judged without Redis");
    }
    double spent = mono_now() - t0;
    CHECK(spent < 3, "120 calls to a stopped Redis took %.2f s", spent);
    cache_stats s;
    cache_get_stats(c, &s);
    CHECK(s.redis_errors >= 80, "%zu cache errors counted of 80", s.redis_errors);

    CHECK(test_redis_start(server) == 0, "restart failed");
    nanosleep(&(struct timespec){1, 100 * 1000 * 1000}, NULL); /* redis.c's retry pause */
    ratelimit_check(rl, "10.0.0.9", mono_now(), &d);
    CHECK(!d.unavailable && d.allowed, "the limiter did not recover");
    cache_put(c, key, &r);
    CHECK(cache_get(c, key, &got) == 1, "the cache did not recover");
    if (got.data) free(got.data);
    CHECK(auth_check(au, "10.0.0.9", "Bearer k2", NULL, AUTH_SCOPE_UPSCALE, mono_now(), &id, &retry) == PROBLEM_NONE,
          "auth did not recover");
    ratelimit_destroy(rl);
    cache_destroy(c);
    auth_destroy(au);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    test_redis server = {0};
    if (test_redis_start(&server) != 0) {
        fprintf(stderr, "SKIP: redis-server could not be started (scripts/install-deps.sh installs it)\n");
        return 77;
    }
    char err[256];
    /* two handles, as two nodes have */
    redis *a = redis_open(server.url, 0.5, err, sizeof err), *b = redis_open(server.url, 0.5, err, sizeof err);
    CHECK(a && b, "open: %s", err);
    if (!a || !b) return 1;
    test_rate_limit(a, b);
    test_rate_race(a, b);
    test_cache(a, b);
    test_auth(a, b);
    test_down(a, &server);
    redis_close(a);
    redis_close(b);
    test_redis_remove(&server);
    printf("%d checks, %d failures\n", test_checks, test_failures);
    return test_failures ? 1 : 0;
}
