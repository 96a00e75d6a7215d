"""Tenants kept apart: a job belongs to the API key that made it (another
key gets the 404 of an unknown id on every job route), cached results are
not shared between keys unless --cache-shared says so, the rate limit
applies to the real client behind a trusted proxy however many
X-Forwarded-For lines a request carries, and an address that keeps failing
to authenticate is refused (429) before its key is looked at."""
import base64
import http.client
import re

import pytest
import requests

from conftest import Server, image_bytes, problem, wait_job

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"X-API-Key": "key-bob"}
SEEDED = {"num_inference_steps": "1", "seed": "21"}


@pytest.fixture(scope="module")
def keyed():
    s = Server("--api-keys", "key-alice,key-bob")
    yield s
    s.check_clean_exit()


def assert_unknown(s, job_id, headers):
    """Every job route answers `headers`' key as it answers an unknown id."""
    base = f"/api/v1/jobs/{job_id}"
    for path in (base, base + "/result", base + "/events"):
        p = problem(s.get(path, headers=headers), 404, "not-found")
        unknown = problem(s.get(path.replace(job_id, "f" * 32), headers=headers), 404, "not-found")
        assert p["detail"].replace(job_id, "f" * 32) == unknown["detail"], (p, unknown)
    problem(s.delete(base, headers=headers), 404, "not-found")
    assert requests.head(s.url + base, headers=headers, timeout=30).status_code == 404


def test_jobs_belong_to_their_key(keyed):
    r = keyed.post("/api/v1/jobs", files={"image": image_bytes()}, data=SEEDED, headers=ALICE)
    assert r.status_code == 202, r.text
    job = r.json()
    assert wait_job(keyed, job["id"], headers=ALICE)["status"] == "succeeded"
    assert_unknown(keyed, job["id"], BOB)
    # bob's DELETE canceled nothing: alice still reads her job and its result
    assert keyed.get(job["links"]["self"], headers=ALICE).json()["status"] == "succeeded"
    result = keyed.get(job["links"]["result"], headers=ALICE)
    assert result.status_code == 200 and result.content.startswith(b"\x89PNG")
    assert "event: succeeded" in keyed.get(job["links"]["events"], headers=ALICE).text

    # an async batch is a job like the others
    img = base64.b64encode(image_bytes(seed=3)).decode()
    r = keyed.post("/api/v1/batch-upscale?async=true", json={"images": [img], "num_inference_steps": 1},
                   headers=BOB)
    assert r.status_code == 202, r.text
    batch = r.json()
    assert wait_job(keyed, batch["id"], headers=BOB)["status"] == "succeeded"
    assert_unknown(keyed, batch["id"], ALICE)
    assert [e["status"] for e in keyed.get(batch["links"]["result"], headers=BOB).json()["results"]] == [200]
    # and alice's DELETE of it changed nothing either
    assert keyed.get(batch["links"]["self"], headers=BOB).json()["status"] == "succeeded"


def upscale(s, img, headers):
    r = s.post("/api/v1/upscale", files={"image": ("in.png", img, "image/png")}, data=SEEDED,
               headers=headers, timeout=300)
    assert r.status_code == 200, r.text
    return r


def test_cache_is_not_shared_between_keys(keyed):
    png = image_bytes(seed=7)
    same_pixels = image_bytes(seed=7, compress_level=1)
    assert png != same_pixels
    first = upscale(keyed, png, ALICE)
    assert first.headers["X-Cache"] == "MISS"
    # neither the upload's bytes nor its pixels find alice's result for bob
    bob = upscale(keyed, png, BOB)
    assert bob.headers["X-Cache"] == "MISS" and bob.content == first.content
    # each key finds its own, by bytes and by pixels
    for headers in (ALICE, BOB):
        assert upscale(keyed, png, headers).headers["X-Cache"] == "HIT"
        assert upscale(keyed, same_pixels, headers).headers["X-Cache"] == "HIT"


def test_cache_shared_when_the_operator_says_so():
    s = Server("--api-keys", "key-alice,key-bob", "--cache-shared", "true")
    try:
        png = image_bytes(seed=8)
        first = upscale(s, png, ALICE)
        assert first.headers["X-Cache"] == "MISS"
        bob = upscale(s, png, BOB)
        assert bob.headers["X-Cache"] == "HIT" and bob.content == first.content
        assert upscale(s, image_bytes(seed=8, compress_level=1), BOB).headers["X-Cache"] == "HIT"
    finally:
        s.check_clean_exit()


def post_with_forwarded(s, *lines):
    """A cheap upscale request (refused after the rate limit is checked) with
    one X-Forwarded-For header line per item of `lines`; its status."""
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    try:
        body = b'{"image": "x"}'
        conn.putrequest("POST", "/api/v1/upscale")
        for line in lines:
            conn.putheader("X-Forwarded-For", line)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        return conn.getresponse().status
    finally:
        conn.close()


def test_rate_limit_reads_every_forwarded_for_line():
    s = Server("--trusted-proxies", "127.0.0.1/32", "--rate-limit", "2")
    try:
        # a client forges a first line; the trusted proxy appends the real
        # address in a second one: the limit counts the real client
        statuses = [post_with_forwarded(s, f"198.51.100.{i}", "203.0.113.9") for i in range(3)]
        assert 429 not in statuses[:2] and statuses[2] == 429, statuses
        assert post_with_forwarded(s, "198.51.100.77, 203.0.113.9") == 429
        # another real client is not affected, whatever it forged left of
        # the address the proxy saw
        assert post_with_forwarded(s, "198.51.100.5", "garbage", "203.0.113.10") != 429
        # an entry that is not an address stops the walk at the hop to its
        # right: here the proxy itself, so a client cannot pick its name
        # by sending garbage; the proxy's own allowance is spent first
        assert 429 not in [post_with_forwarded(s) for _ in range(2)]
        assert post_with_forwarded(s) == 429
        assert post_with_forwarded(s, "203.0.113.12", "unknown") == 429
        assert post_with_forwarded(s, "203.0.113.12, [::1]:80") == 429
        assert post_with_forwarded(s, "203.0.113.12,") == 429
    finally:
        s.check_clean_exit()


def get_from(s, source, path, headers=None):
    """GET from another loopback source address: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_failed_keys_are_throttled_per_address():
    s = Server("--api-keys", "good-key", env={"SDX4_AUTH_FAILURES": "3"})
    try:
        info = "/api/v1/model-info"
        wrong = {"X-API-Key": "wrong-key"}
        assert [get_from(s, "127.0.0.1", info, wrong)[0] for _ in range(3)] == [403] * 3
        status, headers, body = get_from(s, "127.0.0.1", info, wrong)
        assert status == 429 and b"urn:sdx4:problem:rate-limited" in body
        first_wait = int(headers["Retry-After"])
        assert 1 <= first_wait <= 20  # 60 s / 3 failures
        assert "RateLimit-Limit" not in headers  # the upscale limit's headers describe another policy
        # refused before the key is looked at, even the right one; and the
        # refusals do not push the refill further away
        status, headers, _ = get_from(s, "127.0.0.1", info, {"X-API-Key": "good-key"})
        assert status == 429 and int(headers["Retry-After"]) <= first_wait
        # other addresses are not affected; a missing key counts as a failure
        assert get_from(s, "127.0.0.2", info, {"Authorization": "Bearer good-key"})[0] == 200
        assert [get_from(s, "127.0.0.3", info)[0] for _ in range(4)] == [401, 401, 401, 429]
        # routes without a key stay open to a throttled address
        assert get_from(s, "127.0.0.1", "/api/v1/health")[0] == 200
        metrics = get_from(s, "127.0.0.2", "/metrics", {"X-API-Key": "good-key"})[2].decode()
        assert re.search(r"^sdx4_auth_throttled_total 3$", metrics, re.M), metrics[-600:]
    finally:
        s.check_clean_exit()
