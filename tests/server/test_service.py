"""Overload, deadlines, rate limits, API keys, start-up and shutdown: each
test runs its own server with the settings it needs (see conftest.py)."""
import concurrent.futures
import json
import os
import re
import subprocess
import threading
import time

import pytest
import requests

from conftest import MODEL, SDX4, Server, image_bytes, problem, single_process_only, wait_idle

UPSCALE = "/api/v1/upscale"


def upscale(server, steps=1, seed=None, headers=None, timeout=120):
    data = {"num_inference_steps": str(steps)}
    if seed is not None:
        data["seed"] = str(seed)
    return requests.post(server.url + UPSCALE, files={"image": ("a.png", image_bytes(), "image/png")},
                         data=data, headers=headers or {}, timeout=timeout)


def test_overload_30_parallel_against_queue_of_5():
    # deadline out of the way: a slow (sanitizer) build must not turn waits into 504s
    s = Server("--workers", "1", "--queue-size", "5", "--request-timeout", "900")
    try:
        with concurrent.futures.ThreadPoolExecutor(30) as pool:
            answers = list(pool.map(lambda i: upscale(s, steps=2, seed=i, timeout=900), range(30)))
        ok = [r for r in answers if r.status_code == 200]
        busy = [r for r in answers if r.status_code == 503]
        assert len(ok) + len(busy) == 30, [r.status_code for r in answers]  # none lost
        assert len(ok) >= 6 and busy  # the queue and the worker were used, the surplus refused
        for r in busy:
            assert problem(r, 503, "queue-full")
            assert int(r.headers["Retry-After"]) >= 1
        for r in ok:
            assert r.content.startswith(b"\x89PNG")
        assert f'sdx4_rejections_total{{cause="queue-full"}} {len(busy)}' in s.get("/metrics").text
        wait_idle(s)
    finally:
        s.check_clean_exit()


def test_deadline_504_cancels_and_frees_the_worker():
    s = Server("--workers", "1", "--request-timeout", "1")
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            t0 = time.time()
            # the first runs past its deadline, the second expires while queued
            answers = list(pool.map(lambda i: upscale(s, steps=150), range(2)))
        for r in answers:
            p = problem(r, 504, "timeout")
            assert "canceled" in p["detail"]
        assert time.time() - t0 < 10
        wait_idle(s, timeout=30)  # the running one stopped at a step boundary
        # an async job that runs out of time fails the same way
        job = s.post("/api/v1/jobs", files={"image": image_bytes()}, data={"num_inference_steps": "150"}).json()
        deadline = time.time() + 30
        while s.get(job["links"]["self"]).json()["status"] in ("queued", "running") and time.time() < deadline:
            time.sleep(0.05)
        final = s.get(job["links"]["self"]).json()
        assert final["status"] == "failed" and final["error"]["type"] == "urn:sdx4:problem:timeout"
        wait_idle(s, timeout=30)
        assert s.get("/api/v1/health").status_code == 200  # still serving
    finally:
        s.check_clean_exit()


@single_process_only("an API node drops its copies, and GET finds the jobs in Redis, kept under its own budget")
def test_jobs_memory_counts_the_inputs_retained_jobs_hold():
    """Images that never ran (their deadline passed in the queue) keep their
    decoded input while their job is retained: --jobs-memory counts those
    bytes, and drops the oldest jobs to stay within them (they counted
    nothing: a client's failed batches held inputs beyond any budget)."""
    s = Server("--jobs-memory", "4M", "--workers", "1", "--request-timeout", "1", "--max-batch-size", "1")
    try:
        big = image_bytes(size=(512, 512))  # 768 KiB decoded
        ids = []
        for _ in range(3):
            r = s.post("/api/v1/batch-upscale?async=true", files=[("image", (f"{i}.png", big, "image/png"))
                                                                   for i in range(4)],
                       data={"num_inference_steps": "50"})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        deadline = time.time() + 30
        while True:
            found = [i for i in ids if s.get(f"/api/v1/jobs/{i}").status_code == 200]
            if len(found) <= 1:
                break
            assert time.time() < deadline, f"{len(found)} jobs of 3 MiB or so each kept within 4 MiB"
            time.sleep(0.2)
    finally:
        s.check_clean_exit()


def test_rate_limit_per_client():
    s = Server("--rate-limit", "3", "--rate-window", "60", "--trusted-proxies", "127.0.0.1/32")
    try:
        def bad_request(headers=None):  # cheap: refused after the rate limit
            return requests.post(s.url + UPSCALE, files={"image": b"junk"}, headers=headers or {}, timeout=30)
        for i in range(3):
            r = bad_request()
            assert r.status_code == 415
            assert r.headers["RateLimit-Limit"] == "3" and r.headers["RateLimit-Remaining"] == str(2 - i)
            assert r.headers["RateLimit-Policy"] == "3;w=60"
        r = bad_request()
        problem(r, 429, "rate-limited")
        assert 1 <= int(r.headers["Retry-After"]) <= 20 and r.headers["RateLimit-Remaining"] == "0"
        # behind a trusted proxy, the forwarded address is the client
        assert bad_request({"X-Forwarded-For": "203.0.113.7"}).status_code == 415
        assert bad_request({"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}).status_code == 415
        # reads are not limited
        assert s.get("/api/v1/health").status_code == 200
        assert s.get("/api/v1/model-info").status_code == 200
    finally:
        s.check_clean_exit()


def test_forwarded_for_ignored_from_untrusted_peers():
    s = Server("--rate-limit", "1")
    try:
        assert requests.post(s.url + UPSCALE, files={"image": b"junk"}, timeout=30).status_code == 415
        r = requests.post(s.url + UPSCALE, files={"image": b"junk"}, headers={"X-Forwarded-For": "1.2.3.4"}, timeout=30)
        problem(r, 429, "rate-limited")
    finally:
        s.check_clean_exit()


def test_api_keys(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# keys of the tests\nfile-key\n\n")
    s = Server("--api-keys-file", str(keys), "--rate-limit", "2", env={"SDX4_API_KEYS": "env-key, other-key"})
    try:
        r = s.get("/api/v1/model-info")
        problem(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        problem(s.get("/api/v1/model-info", headers={"Authorization": "Bearer wrong"}), 403, "forbidden")
        problem(s.get("/api/v1/model-info", headers={"X-API-Key": "env-ke"}), 403, "forbidden")
        problem(s.get("/api/v1/model-info", headers={"Authorization": "Basic ZW52LWtleQ=="}), 401, "unauthorized")
        for h in ({"Authorization": "Bearer env-key"}, {"authorization": "bearer other-key"},
                  {"X-API-Key": "file-key"}):
            assert s.get("/api/v1/model-info", headers=h).status_code == 200, h
        problem(s.get("/metrics"), 401, "unauthorized")
        problem(requests.post(s.url + UPSCALE, files={"image": image_bytes()}, timeout=30), 401, "unauthorized")
        problem(s.get("/api/v1/jobs/" + "a" * 32), 401, "unauthorized")
        # health, the API description and the docs stay open
        for path in ("/api/v1/health", "/openapi.json", "/docs"):
            assert s.get(path).status_code == 200, path
        # the rate limit counts per key, not per address
        bad = lambda key: requests.post(s.url + UPSCALE, files={"image": b"junk"}, timeout=30,
                                        headers={"X-API-Key": key}).status_code
        assert [bad("env-key"), bad("env-key"), bad("env-key")] == [415, 415, 429]
        assert bad("file-key") == 415
    finally:
        s.check_clean_exit()


def running(s):
    """Upscales running now: in cluster mode the worker's own count, which
    the node's health hears from its heartbeats, seconds late (a short
    upscale can end unseen there)."""
    if s.cluster:
        return int(re.search(r"^sdx4_worker_busy_threads (\d+)$", s.cluster.worker.get("/metrics").text, re.M)[1])
    return s.get("/api/v1/health").json()["queue"]["running"]


def test_graceful_shutdown_finishes_in_flight_work():
    s = Server("--workers", "1", "--shutdown-timeout", "300")
    answers = []
    t = threading.Thread(target=lambda: answers.append(upscale(s, steps=3, seed=1, timeout=300)))
    t.start()
    deadline = time.time() + 30
    while running(s) == 0 and time.time() < deadline:
        time.sleep(0.02)
    t0 = time.time()
    s.proc.send_signal(15)
    t.join(300)
    assert answers and answers[0].status_code == 200 and answers[0].content.startswith(b"\x89PNG")
    assert s.proc.wait(30) == 0
    with pytest.raises(requests.ConnectionError):
        s.get("/api/v1/health", timeout=2)
    events = [l.get("event") for l in s.logs() if isinstance(l, dict)]
    assert "shutting_down" in events and events[-1] == "stopped"
    s.check_clean_exit()


def test_shutdown_deadline_cancels_long_work():
    s = Server("--workers", "1", "--shutdown-timeout", "0.5")
    answers = []
    job = s.post("/api/v1/jobs", files={"image": image_bytes()}, data={"num_inference_steps": "150"}).json()
    # other steps: it cannot share the job's batch, so it waits in the queue
    t = threading.Thread(target=lambda: answers.append(upscale(s, steps=149)))
    t.start()
    deadline = time.time() + 30
    while s.get("/api/v1/health").json()["queue"]["depth"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    t0 = time.time()
    s.proc.send_signal(15)
    t.join(60)
    problem(answers[0], 503, "shutting-down")
    assert s.proc.wait(30) == 0
    assert time.time() - t0 < 15
    s.check_clean_exit()


def test_demo_model_is_announced(tmp_path):
    demo = tmp_path / "demo-model"
    demo.mkdir()
    for entry in os.listdir(MODEL):
        (demo / entry).symlink_to(os.path.join(MODEL, entry))
    (demo / "DEMO_MODEL").write_text("random weights\n")
    s = Server(model=str(demo))
    try:
        h = s.get("/api/v1/health").json()
        note = "demo model (random weights): output is noise"
        assert h["demo_model"] is True and h["note"] == note
        m = s.get("/api/v1/model-info").json()
        assert m["demo_model"] is True and m["note"] == note and m["model_id"] == "demo-model"
        loader = s.cluster.worker if s.cluster else s  # who loads the model
        assert any(isinstance(l, dict) and l.get("note") == note for l in loader.logs())
    finally:
        s.check_clean_exit()


def test_warm_up_then_ready():
    s = Server("--warmup", "true", "--warmup-sizes", "64, 72x64", "--model-id", "tiny-x4", wait_ready=False)
    try:
        s.wait_ready()
        if s.cluster:  # the worker loads and warms up (at one size: it has no --warmup-sizes yet)
            events = [l.get("event") for l in s.cluster.worker.logs() if isinstance(l, dict)]
            assert events.index("model_loaded") < events.index("warmed_up")
        else:
            logs = [l for l in s.logs() if isinstance(l, dict)]
            events = [l.get("event") for l in logs]
            assert events.index("model_loaded") < events.index("warmed_up") < events.index("ready")
            sizes = [(l["width"], l["height"]) for l in logs if l.get("event") == "warmed_up_size"]
            assert sizes == [(64, 64), (72, 64)]
        assert s.get("/api/v1/model-info").json()["model_id"] == "tiny-x4"
        r = upscale(s, seed=1)
        assert r.headers["X-Model"] == "tiny-x4"
    finally:
        s.check_clean_exit()


def test_settings_from_file_env_and_flags(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"queue-size": 7, "workers": 2, "max-side": 256, "cors-origins": ["http://a.example"]}))
    s = Server("--workers", "1", env={"SDX4_CONFIG": str(settings), "SDX4_QUEUE_SIZE": "9"})
    try:
        q = s.get("/api/v1/health").json()["queue"]
        assert q["capacity"] == 9 and q["workers"] == 1  # env over file, flag over env
        assert s.get("/api/v1/model-info").json()["limits"]["max_side"] == 256  # from the file
    finally:
        s.check_clean_exit()


def test_help_and_bad_settings():
    out = subprocess.run([SDX4, "serve", "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for flag in ("--model", "--host", "--port", "--workers", "--queue-size", "--request-timeout",
                 "--max-upload", "--rate-limit", "--api-keys", "--cors-origins", "--cache-size",
                 "--webhook-secret", "--shutdown-timeout", "SDX4_MODEL", "SDX4_PORT", "--config"):
        assert flag in out.stdout, flag
    for args in (["--workers", "0"], ["--port", "x"], ["--no-such-flag"], ["--max-upload", "lots"],
                 ["--trusted-proxies", "not-an-address"], ["--min-side", "600"],
                 ["--warmup-sizes", "32"], ["--warmup-sizes", "64x"], ["--warmup-sizes", "64,9999x64"]):
        r = subprocess.run([SDX4, "serve", "--model", MODEL, "--port", "0"] + args, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode != 0 and "sdx4 serve" in r.stderr, (args, r.stderr)


def test_missing_model_fails_visibly(tmp_path):
    r = subprocess.run([SDX4, "serve", "--model", str(tmp_path / "none"), "--port", "0"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    lines = [json.loads(l) for l in r.stderr.splitlines() if l.startswith("{")]
    assert any(l["event"] == "model_failed" for l in lines)


def test_webhooks_never_reach_internal_addresses():
    """Without --webhook-private a webhook to loopback is refused after DNS,
    not retried (the answer would not change), and reported as failed with
    the reason."""
    import http.server
    hits = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            hits.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    s = Server("--webhook-secret", "x", "--webhook-attempts", "2", "--webhook-backoff", "0.05")
    try:
        for host in ("127.0.0.1", "localhost"):
            url = f"http://{host}:{httpd.server_port}/hook"
            job = s.post("/api/v1/jobs", files={"image": image_bytes()},
                         data={"num_inference_steps": "1", "seed": "1", "webhook_url": url}).json()
            deadline = time.time() + 30
            while time.time() < deadline:
                hook = s.get(job["links"]["self"]).json().get("webhook", {})
                if hook.get("status") == "failed":
                    break
                time.sleep(0.05)
            assert hook["status"] == "failed" and hook["attempts"] == 1, hook
            assert "internal address" in hook["error"], hook
        assert hits == []
    finally:
        httpd.shutdown()
        s.check_clean_exit()
