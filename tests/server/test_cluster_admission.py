"""Admission by estimated time on an API-only node (`sdx4 serve --redis URL
--workers 0`, no model): the same 422 over-time-limit and 503
queue-too-long as single-process mode (test_admission.py), from the
estimator a calibrated worker publishes in its registration and the
estimates the stream's entries carry.

Real redis-server, a real `sdx4 worker` with warm-up (its calibration at
32 and 64 px takes a few seconds), the tiny reference model.
"""
import shutil
import time

import pytest

from conftest import Server, Worker, image_bytes, problem, wait_idle
from test_admission import LIMIT, fill_until_refused, job_costing, small_file_large_image

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"),
                                reason="redis-server is not installed (scripts/install-deps.sh)")


@pytest.fixture(scope="module")
def node(redis_server):
    worker = Worker(redis_server.url, "--warmup", "true", "--min-side", "32", "--name", "calibrated")
    node = Server("--redis", redis_server.url, "--workers", "0", "--min-side", "32",
                  "--request-timeout", str(LIMIT), wait_ready=False)
    try:
        deadline = time.time() + 60
        while True:  # the node has looked at the cluster: the worker's curve is known
            workers = node.get("/api/v1/model-info").json().get("workers", [])
            if node.get("/api/v1/health").status_code == 200 and workers and workers[0].get("cost"):
                break
            assert time.time() < deadline, "the node never saw a calibrated worker"
            time.sleep(0.1)
        assert workers[0]["cost"]["calibrated"] is True, workers[0]
        time.sleep(1.1)  # the look that saw the worker may have been before its curve
        node.redis = redis_server.client()
        yield node
    finally:
        node.check_clean_exit()
        worker.check_clean_exit()


def test_too_long_alone_is_refused_by_the_workers_estimate(node):
    image = small_file_large_image()
    for path in ("/api/v1/jobs", "/api/v1/upscale"):
        t0 = time.time()
        r = node.post(path, files={"image": ("big.jpg", image, "image/jpeg")}, data={"num_inference_steps": "1"})
        p = problem(r, 422, "over-time-limit")
        assert time.time() - t0 < LIMIT / 4
        assert p["limit_seconds"] == LIMIT and p["estimated_seconds"] > LIMIT, p
        assert "512x512" in p["detail"]
    assert node.redis.xlen("sdx4:tasks") == 0  # nothing was queued
    # a request that fits is admitted and runs on the worker
    r = node.post("/api/v1/upscale", files={"image": image_bytes(size=(32, 32))}, data={"num_inference_steps": "1"})
    assert r.status_code == 200, r.text[:300]
    assert r.headers["X-Output-Size"] == "128x128"


def test_cluster_backlog_too_long_gives_503_with_retry_after(node):
    side, steps = job_costing(node, LIMIT * 0.3)
    admitted = []
    try:
        fill_until_refused(node, side, steps, admitted)
        # each entry carries its estimate; together they fit in the limit
        # (the running one less what it ran), one more would not
        estimates = [float(f[b"estimate"]) for _, f in node.redis.xrange("sdx4:tasks")]
        assert len(estimates) == len(admitted) and all(0 < e <= LIMIT for e in estimates), estimates
        assert sum(estimates) <= LIMIT + 2 < sum(estimates) + estimates[-1] + 4, estimates
    finally:
        for job in admitted:
            node.delete(job["links"]["self"])
    wait_idle(node)
