"""Admission by estimated time, and workers after a deadline (issue 12, D1).

A server with warm-up on calibrates its time estimator (cost.c) and then
refuses at once what cannot finish within --request-timeout: 422 when the
request alone is too long, 503 + Retry-After when the work ahead of it
makes it late. A server without warm-up admits as before. A worker still
busy after its request's deadline is visible (metrics, health), and is
freed shortly after the 504 (here at 64 px, where a step boundary comes
soon).
"""
import concurrent.futures
import io
import time

import pytest
import requests
from PIL import Image

from conftest import Server, image_bytes, problem, single_process_only, wait_idle

LIMIT = 20  # --request-timeout of the calibrated server, seconds


def metric(server, name):
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def small_file_large_image(side=512):
    """A JPEG of a few KB whose header (and pixels) say side x side."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 30, 200)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def calibrated():
    # min-side 32: the calibration runs at 32 and 64 px, a few seconds
    s = Server("--warmup", "true", "--min-side", "32", "--workers", "1",
               "--request-timeout", str(LIMIT))
    yield s
    s.check_clean_exit()


def test_model_info_shows_the_calibration(calibrated):
    cost = calibrated.get("/api/v1/model-info").json()["cost"]
    assert cost["calibrated"] is True and cost["observations"] >= 2
    for part in ("text", "step", "decode"):
        assert cost["gflops"][part]["dense"] > 0 and cost["gflops"][part]["attention"] > 0
    low, high = cost["estimates"]
    assert (low["width"], high["width"]) == (32, 512)
    # the decode's attention is quadratic in the pixels: 256 times the
    # pixels cost far more than 256 times the time
    assert high["other_seconds"] > 300 * low["other_seconds"]


def test_too_long_alone_is_refused_at_once_and_what_fits_is_admitted(calibrated):
    image = small_file_large_image()
    assert len(image) < 8000  # costed by its size in pixels, not its bytes
    for path in ("/api/v1/jobs", "/api/v1/upscale"):
        t0 = time.time()
        r = calibrated.post(path, files={"image": ("big.jpg", image, "image/jpeg")},
                            data={"num_inference_steps": "1"})
        p = problem(r, 422, "over-time-limit")
        assert time.time() - t0 < LIMIT / 4  # refused, not run until the deadline
        assert p["limit_seconds"] == LIMIT and p["estimated_seconds"] > LIMIT, p
        assert "512x512" in p["detail"]
    assert calibrated.get("/api/v1/health").json()["queue"]["running"] == 0
    assert 'sdx4_rejections_total{cause="over-time-limit"} 2' in calibrated.get("/metrics").text
    # a request that fits is admitted as before
    r = calibrated.post("/api/v1/upscale", files={"image": image_bytes(size=(32, 32))},
                        data={"num_inference_steps": "1"})
    assert r.status_code == 200, r.text[:300]
    assert r.headers["X-Output-Size"] == "128x128"


def test_a_second_order_sampler_is_estimated_at_twice_the_unet_work(calibrated):
    # Heun runs the UNet 2n - 1 times for n steps: its steps cost about
    # twice DDIM's (refused at 512 px, so nothing runs)
    high = calibrated.get("/api/v1/model-info").json()["cost"]["estimates"][1]
    image, steps = small_file_large_image(), 150
    estimated = {}
    for name in ("ddim", "heun"):
        r = calibrated.post("/api/v1/jobs", files={"image": ("big.jpg", image, "image/jpeg")},
                            data={"num_inference_steps": str(steps), "scheduler": name})
        estimated[name] = problem(r, 422, "over-time-limit")["estimated_seconds"] - high["other_seconds"]
    assert estimated["ddim"] == pytest.approx(steps * high["step_seconds"], rel=0.02), estimated
    assert estimated["heun"] == pytest.approx((2 * steps - 1) * high["step_seconds"], rel=0.02), estimated


def job_costing(calibrated, seconds):
    """(side, steps) of a job estimated at about `seconds` (from the
    estimate at 32 px, scaled with the pixels: a rough guess is enough)."""
    low = calibrated.get("/api/v1/model-info").json()["cost"]["estimates"][0]
    for side in (32, 48, 64, 96, 128):
        scale = (side / 32) ** 2
        step, other = low["step_seconds"] * scale, low["other_seconds"] * scale
        if other < seconds / 2 and other + 150 * step >= seconds:
            return side, max(1, round((seconds - other) / step))
    raise AssertionError(f"no job costs about {seconds} s: {low}")


def fill_until_refused(server, side, steps, admitted):
    """Submits async jobs of side x side px and `steps` steps until one is
    refused (one worker: the third or fourth cannot end in time), adding
    the admitted ones' documents to `admitted` (the caller deletes them);
    checks that the refusal is a quick 503 queue-too-long with a
    Retry-After, and that the first job alone fitted."""
    image = image_bytes(size=(side, side))
    refused = None
    for _ in range(12):
        t0 = time.time()
        r = server.post("/api/v1/jobs", files={"image": image}, data={"num_inference_steps": str(steps)})
        if r.status_code != 202:
            refused = r
            break
        admitted.append(r.json())
    assert refused is not None, f"{len(admitted)} jobs of {side} px, {steps} steps all admitted"
    p = problem(refused, 503, "queue-too-long")
    assert time.time() - t0 < 5
    assert int(refused.headers["Retry-After"]) >= 1
    assert p["estimated_seconds"] > p["limit_seconds"] == LIMIT
    assert admitted  # alone it fits: only the work ahead made it late


@single_process_only("health's list of running jobs and their estimates is a node's own workers'; test_cluster_admission.py checks the cluster's 503")
def test_queue_ahead_too_long_gives_503_with_retry_after(calibrated):
    side, steps = job_costing(calibrated, LIMIT * 0.3)
    admitted = []
    try:
        fill_until_refused(calibrated, side, steps, admitted)
        busy = calibrated.get("/api/v1/health").json()["busy_workers"]
        # the jobs share their UNet calls (--max-batch-size): each alone fits
        assert len(busy) == 1 and 0 < busy[0]["estimated_s"] / busy[0]["tasks"] < LIMIT, busy
    finally:
        for job in admitted:
            calibrated.delete(job["links"]["self"])
    wait_idle(calibrated)


@pytest.fixture(scope="module")
def cold():
    s = Server("--workers", "1", "--request-timeout", "3")  # conftest: --warmup false
    yield s
    s.check_clean_exit()


@single_process_only("health's busy_workers and the overrun metrics are of a node's own workers (an API-only "
                     "node has none); test_cluster.py's test_deadline_on_api_node_answers_504_and_frees_the_worker "
                     "checks that a deadline frees a cluster worker")
def test_cold_estimator_admits_and_a_deadline_frees_the_worker(cold):
    answers = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # 150 steps at 64 px cannot end in 3 s, but no estimate refuses it
        future = pool.submit(lambda: cold.post(
            "/api/v1/upscale", files={"image": image_bytes()}, data={"num_inference_steps": "150"},
            headers={"X-Request-Id": "admit-deadline"}))
        seen = None
        deadline = time.time() + 30
        while seen is None and not future.done() and time.time() < deadline:
            busy = cold.get("/api/v1/health").json()["busy_workers"]
            seen = next((b for b in busy if b["request_id"] == "admit-deadline"), None)
            time.sleep(0.02)
        answers.append(future.result())
    assert seen is not None, "the busy worker never showed its request"
    assert seen["running_s"] >= 0 and seen["estimated_s"] == 0
    problem(answers[0], 504, "timeout")
    t0 = time.time()
    # until the worker is free, every busy worker is counted as past its deadline
    while True:
        text = cold.get("/metrics").text
        values = {l.split()[0]: float(l.split()[1]) for l in text.splitlines()
                  if l.startswith("sdx4_workers_busy")}
        assert values["sdx4_workers_busy"] == values["sdx4_workers_busy_after_deadline"], values
        if values["sdx4_workers_busy"] == 0:
            break
        assert time.time() - t0 < 15, "the worker is still busy 15 s after the deadline"
        time.sleep(0.02)
    assert metric(cold, "sdx4_worker_overrun_seconds_count") == 1
    assert 0 < metric(cold, "sdx4_worker_overrun_seconds_sum") < 15
    assert cold.get("/api/v1/model-info").json()["cost"]["calibrated"] is False
