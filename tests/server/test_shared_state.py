"""Two API nodes that share one Redis (--redis): the rate limit holds across
both (10 a minute per client in total), a result cached through one is a
hit through the other, an API key has one identity on both (its cache
entries and its failed attempts), and with Redis stopped the rate-limited
routes answer 503 store-unavailable at once, the cache misses without
failing a request, and both recover when Redis returns.

Each node still runs its jobs on its own workers here: the job side of
cluster mode is not what these tests are about."""
import re
import time

import pytest

from conftest import RedisServer, Server, image_bytes, problem

UPSCALE = "/api/v1/upscale"
PARAMS = {"num_inference_steps": "1", "seed": "21"}


@pytest.fixture
def redis():
    r = RedisServer()
    yield r
    r.remove()


def nodes(redis, *flags):
    """Two API nodes on one Redis."""
    return [Server("--redis", redis.url, *flags) for _ in range(2)]


def upscale(s, img, headers=None):
    return s.post(UPSCALE, files={"image": ("in.png", img, "image/png")}, data=PARAMS,
                  headers=headers or {}, timeout=300)


def metric(s, name, headers=None):
    m = re.search(rf"^{name} (\S+)$", s.get("/metrics", headers=headers or {}).text, re.M)
    assert m, f"no {name} in /metrics"
    return float(m[1])


def test_rate_limit_holds_across_two_nodes(redis):
    a, b = nodes(redis, "--rate-limit", "10", "--rate-window", "60")
    try:
        # the limiter decides before the body is read: bodies without an
        # image (422) count as well, and cost no inference
        answers = [(a, b)[i % 2].post(UPSCALE, json={}) for i in range(14)]
        assert [r.status_code for r in answers] == [422] * 10 + [429] * 4
        assert [int(r.headers["RateLimit-Remaining"]) for r in answers[:10]] == list(range(9, -1, -1))
        for r in answers[10:]:
            problem(r, 429, "rate-limited")
            # the 11th is allowed one interval (6 s) after the first
            assert 1 <= int(r.headers["Retry-After"]) <= 6
        # a node started now finds the allowance already spent
        c = Server("--redis", redis.url, "--rate-limit", "10", "--rate-window", "60")
        try:
            problem(c.post(UPSCALE, json={}), 429, "rate-limited")
        finally:
            c.check_clean_exit()
    finally:
        a.check_clean_exit()
        b.check_clean_exit()


def test_result_cached_through_one_node_hits_through_the_other(redis):
    a, b = nodes(redis, "--api-keys", "key-one,key-two")
    try:
        one, two = ({"Authorization": "Bearer " + k} for k in ("key-one", "key-two"))
        png = image_bytes(seed=9)
        first = upscale(a, png, one)
        assert first.status_code == 200 and first.headers["X-Cache"] == "MISS"
        # the same upload through the other node: found by its bytes
        again = upscale(b, png, one)
        assert again.status_code == 200 and again.headers["X-Cache"] == "HIT"
        assert again.content == first.content and again.headers["X-Inference-Time-Ms"] == "0"
        assert metric(b, "sdx4_cache_upload_hits_total", one) == 1
        # the same pixels in another file: found by the decoded pixels
        other = upscale(b, image_bytes(seed=9, compress_level=1), one)
        assert other.headers["X-Cache"] == "HIT" and other.content == first.content
        # one budget for both nodes: each sees the entry and the two links
        for s in (a, b):
            assert (metric(s, "sdx4_cache_entries", one), metric(s, "sdx4_cache_links", one)) == (1, 2)
        # a key's identity is the same on both nodes, and another key's
        # differs: its results are its own
        assert upscale(b, png, two).headers["X-Cache"] == "MISS"
        assert metric(a, "sdx4_cache_redis_errors_total", one) == 0
    finally:
        a.check_clean_exit()
        b.check_clean_exit()


def test_failed_key_attempts_are_counted_across_nodes_and_need_redis(redis):
    a, b = nodes(redis, "--api-keys", "right-key", "--auth-failures", "3")
    try:
        wrong = {"Authorization": "Bearer wrong-key"}
        answers = [(a, b)[i % 2].get("/api/v1/jobs/" + "0" * 32, headers=wrong) for i in range(4)]
        assert [r.status_code for r in answers] == [403, 403, 403, 429]
        problem(answers[3], 429, "rate-limited")
        # with Redis stopped no key can be judged: 503, not a guess
        redis.stop()
        r = b.get("/api/v1/jobs/" + "0" * 32, headers={"Authorization": "Bearer right-key"})
        problem(r, 503, "store-unavailable")
        assert r.headers["Retry-After"] == "1"
    finally:
        a.check_clean_exit()
        b.check_clean_exit()


def test_redis_down_refuses_fast_and_recovers(redis):
    limited = Server("--redis", redis.url, "--rate-limit", "100", "--redis-timeout", "0.5")
    unlimited = Server("--redis", redis.url, "--redis-timeout", "0.5")  # the fixture's --rate-limit 0
    try:
        png = image_bytes(seed=13)
        assert upscale(limited, png).status_code == 200
        redis.stop()

        t0 = time.time()
        for _ in range(5):
            r = limited.post(UPSCALE, json={})
            problem(r, 503, "store-unavailable")
            assert r.headers["Retry-After"] == "1" and "RateLimit-Remaining" not in r.headers
        assert time.time() - t0 < 5, "503s took too long"
        assert metric(limited, "sdx4_ratelimit_unavailable_total") == 5

        # without a rate limit the cache is asked first: it misses (counted,
        # not an error), and then the cluster's queue, in Redis too, refuses
        r = upscale(unlimited, png)
        problem(r, 503, "store-unavailable")
        assert r.headers["Retry-After"] == "1"
        assert metric(unlimited, "sdx4_cache_redis_errors_total") >= 1

        redis.start()
        deadline = time.time() + 10
        while limited.post(UPSCALE, json={}).status_code == 503:
            assert time.time() < deadline, "no recovery after Redis came back"
            time.sleep(0.2)
        # the result stored before the outage is a hit again (append-only),
        # once the node's pause between reconnects (1 s) has passed
        while upscale(unlimited, png).headers.get("X-Cache") != "HIT":  # a 503 in the reconnect pause has none
            assert time.time() < deadline, "the cache did not recover after Redis came back"
            time.sleep(0.2)
    finally:
        limited.check_clean_exit()
        unlimited.check_clean_exit()
