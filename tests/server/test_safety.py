"""The content check (--safety-checker): every upscale's output goes through
diffusers' StableDiffusionSafetyChecker; a flagged one is refused with the
problem content-flagged (sync and async) or blacked out, and counted.

The checker is tests/data/safety's random-weight one, whose thresholds
(tools/safety_goldens.py) flag what the tiny model makes of tiny0_input.png
and pass what it makes of tiny1_input.png, with these parameters."""
import io
import os
import subprocess

from PIL import Image

from conftest import CLUSTER, MODEL, ROOT, SDX4, RedisServer, Server, Worker, problem, wait_job

DATA = os.path.join(ROOT, "tests", "data", "safety")
CHECKER = os.path.join(DATA, "checker")
UPSCALE = "/api/v1/upscale"
# the goldens' case: prompt, 3 steps, guidance 6, noise_level 20 of 350, seed 0
CASE = {"prompt": "a white cat", "num_inference_steps": "3", "guidance_scale": "6",
        "noise_level": repr(20 / 350), "seed": "0"}


def tiny_input(k):
    with open(os.path.join(DATA, f"tiny{k}_input.png"), "rb") as f:
        return f.read()


def metric(server, name):
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_refuse_sync_and_async():
    s = Server("--safety-checker", CHECKER, "--min-side", "32", "--warmup", "false")
    try:
        health = s.get("/api/v1/health").json()
        assert health["content_check"] == {"enabled": True, "action": "refuse"}
        assert s.get("/api/v1/model-info").json()["content_check"] == {"enabled": True, "action": "refuse"}

        p = problem(s.post(UPSCALE, files={"image": tiny_input(0)}, data=CASE), 422, "content-flagged")
        assert "content check" in p["detail"]
        ok = s.post(UPSCALE, files={"image": tiny_input(1)}, data=CASE)
        assert ok.status_code == 200, ok.text
        # the image that passed is the model's own, as diffusers makes it
        got = Image.open(io.BytesIO(ok.content)).convert("RGB")
        want = Image.open(os.path.join(DATA, "image1.png")).convert("RGB")
        assert got.size == want.size == (128, 128)
        assert max(abs(a - b) for a, b in zip(got.tobytes(), want.tobytes())) <= 1

        # a batch: the flagged entry fails alone
        files = [("image", ("a.png", tiny_input(0), "image/png")), ("image", ("b.png", tiny_input(1), "image/png"))]
        out = s.post("/api/v1/batch-upscale", files=files, data=CASE).json()
        assert [e["status"] for e in out["results"]] == [422, 200], out
        assert out["results"][0]["error"]["type"] == "urn:sdx4:problem:content-flagged"

        r = s.post("/api/v1/jobs", files={"image": tiny_input(0)}, data=CASE)
        assert r.status_code == 202, r.text
        job = wait_job(s, r.json()["id"])
        assert job["status"] == "failed" and job["error"]["type"] == "urn:sdx4:problem:content-flagged", job
        # its result is the failed job's 409, saying why
        assert "content check" in problem(s.get(f"/api/v1/jobs/{job['id']}/result"), 409,
                                          "job-not-finished")["detail"]

        if not CLUSTER:  # a cluster counts them on its workers
            # the batch's second image came from the cache: checked when it was made
            assert metric(s, "sdx4_safety_checks_total") == 4
            assert metric(s, "sdx4_safety_flagged_total") == 3
            assert metric(s, "sdx4_safety_check_seconds_total") > 0
    finally:
        s.stop()
    s.check_clean_exit()


def test_blackout():
    s = Server("--safety-checker", CHECKER, "--safety-action", "blackout", "--min-side", "32",
               "--warmup", "false")
    try:
        assert s.get("/api/v1/health").json()["content_check"] == {"enabled": True, "action": "blackout"}
        r = s.post(UPSCALE, files={"image": tiny_input(0)}, data=CASE)
        assert r.status_code == 200, r.text
        img = Image.open(io.BytesIO(r.content)).convert("RGB")
        assert img.size == (128, 128) and img.getextrema() == ((0, 0), (0, 0), (0, 0))
        if not CLUSTER:
            assert metric(s, "sdx4_safety_flagged_total") == 1
    finally:
        s.stop()
    s.check_clean_exit()


def test_cluster_keeps_checked_and_unchecked_outputs_apart():
    """Two API nodes on one Redis share its cache, one with the check and
    one without: the output one node would serve never reaches the other,
    and a task of the checking node that reaches a worker without the
    check fails rather than go out unchecked."""
    redis = RedisServer()
    plain = Server("--redis", redis.url, "--workers", "0", "--min-side", "32", wait_ready=False)
    checked = Server("--redis", redis.url, "--workers", "0", "--min-side", "32", "--safety-checker", CHECKER,
                     wait_ready=False)
    worker = Worker(redis.url, "--name", "checks", "--min-side", "32", "--safety-checker", CHECKER)
    try:
        def post(node, k):
            return node.post(UPSCALE, files={"image": tiny_input(k)}, data=CASE, timeout=300)

        for node in (plain, checked):
            node.wait_ready()
        # a worker with the check: the checking node's outputs are kept...
        assert [post(checked, 1).headers.get("X-Cache") for _ in range(2)] == ["MISS", "HIT"]
        # ...for it alone; and what the worker checked is not kept under the
        # plain node's key, which says "not checked"
        assert [post(plain, 1).headers.get("X-Cache") for _ in range(2)] == ["MISS", "MISS"]
        worker.stop()

        worker = Worker(redis.url, "--name", "plain", "--min-side", "32")
        first = post(plain, 0)
        assert first.status_code == 200 and first.headers["X-Cache"] == "MISS", first.text
        assert post(plain, 0).headers["X-Cache"] == "HIT"
        # the plain node's output of this input, which the check would
        # flag, is not the checking node's; nor is a run without the check
        p = problem(post(checked, 0), 500, "upscale-failed")
        assert "runs without the content check" in p["detail"], p
    finally:
        plain.check_clean_exit()
        checked.check_clean_exit()
        worker.stop()
        redis.remove()


def test_off_by_default(server):
    assert server.get("/api/v1/health").json()["content_check"] == {"enabled": False}
    assert metric(server, "sdx4_safety_checks_total") == 0


def serve_fails(*flags):
    """sdx4 serve with these flags exits non-zero; its stderr."""
    r = subprocess.run([SDX4, "serve", "--model", MODEL, "--port", "0", "--warmup", "false", *flags],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, r.stderr
    return r.stderr


def test_bad_settings(tmp_path):
    assert "config.json: missing" in serve_fails("--safety-checker", str(tmp_path))
    assert "safety-action must be refuse or blackout" in serve_fails("--safety-checker", CHECKER,
                                                                     "--safety-action", "warn")
