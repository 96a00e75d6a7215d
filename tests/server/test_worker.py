"""`sdx4 worker` driven through cluster mode's protocol (cluster_protocol.py)
against a real redis-server, with the tiny model: results byte-identical
to `sdx4 upscale`, records refused by name, a task that outlived its
workers failed with its reason, cancel, Redis restarted (append-only:
queued tasks survive; health 503 while it is away), a SIGKILLed worker's
task finished by the other, SIGTERM draining."""
import hashlib
import hmac
import json
import os
import signal
import subprocess
import time

import pytest

import cluster_protocol as cp
from conftest import MODEL, SDX4, Worker, image_bytes
from test_hooks_logs import Receiver

VISIBILITY = 2  # seconds: a killed worker's task is taken over this soon


@pytest.fixture(scope="module")
def cluster(redis_server):
    """Redis and two workers; tests that stop a worker start another."""
    flags = ("--visibility-timeout", VISIBILITY, "--shutdown-timeout", 60, "--webhook-secret", "hook-secret",
             "--webhook-private", "true")
    c = {"redis": redis_server, "r": redis_server.client(), "flags": flags,
         "workers": [Worker(redis_server.url, *flags) for _ in range(2)]}
    yield c
    for w in c["workers"]:
        if w.proc.poll() is None:
            w.check_clean_exit()


def replace(cluster, dead):
    cluster["workers"].remove(dead)
    cluster["workers"].append(Worker(cluster["redis"].url, *cluster["flags"]))


def holder(cluster, task):
    return next(w for w in cluster["workers"] if w.name == task["worker"])


def test_results_equal_cli(cluster, tmp_path):
    r = cluster["r"]
    png = image_bytes(seed=3)
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    src.write_bytes(png)
    params = {"steps": 1, "seed": 1234, "prompt": "a red car \u00e9\u65e5", "noise_level": 0.1, "guidance_scale": 5.0}
    jobs = [cp.submit(r, png, **params) for _ in range(2)] + [cp.submit(r, png, **dict(params, seed=77))]
    subprocess.run([SDX4, "upscale", "--model", MODEL, "--steps", "1", "--seed", "1234", "--prompt",
                    params["prompt"], "--noise-level", "0.1", "--guidance", "5", str(src), str(out)],
                   check=True, capture_output=True, timeout=300)
    tasks = [cp.wait(r, j) for j in jobs]
    assert all(t["state"] == "succeeded" for t in tasks), tasks
    assert cp.result(r, jobs[0]) == cp.result(r, jobs[1]) == out.read_bytes()
    assert cp.result(r, jobs[2]) != out.read_bytes()  # another seed
    assert tasks[0]["width"] == 256 and tasks[0]["step"] == tasks[0]["total"] == 1
    assert all(cp.state(r, j)[1] == "succeeded" for j in jobs)
    assert r.xlen(cp.STREAM) == 0  # acked and deleted
    assert not r.exists(f"sdx4:input:{jobs[0]}:0")  # inputs go once their task is final
    names = {w.name for w in cluster["workers"]}
    assert {m.decode() for m in r.smembers("sdx4:workers")} == names
    info = json.loads(r.hget("sdx4:worker:" + cluster["workers"][0].name, "info"))
    assert info["model"]["max_noise_level"] > 0 and info["device"]


def test_webhook_sent_by_the_worker_that_ends_the_job(cluster):
    r, receiver = cluster["r"], Receiver()
    try:
        job = cp.submit(r, image_bytes(), webhook_url=receiver.url + "/hook")
        assert cp.wait(r, job)["state"] == "succeeded"
        deadline = time.time() + 30
        while not receiver.calls and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert len(receiver.calls) == 1, receiver.calls  # once per job
        _, path, headers, body = receiver.calls[0]
        doc = json.loads(body)
        assert path == "/hook" and doc["id"] == job and doc["status"] == "succeeded" and doc["finished_at"]
        assert headers["X-Sdx4-Event"] == "job.succeeded"
        t, v1 = headers["X-Sdx4-Signature"].split(",")
        expected = hmac.new(b"hook-secret", t[2:].encode() + b"." + body, hashlib.sha256).hexdigest()
        assert v1 == "v1=" + expected
    finally:
        receiver.close()


def test_bad_record_fails_by_name(cluster):
    r = cluster["r"]
    job = cp.submit(r, image_bytes(), edit=lambda rec: rec["options"].pop("steps"))
    task = cp.wait(r, job, timeout=30)
    assert task["state"] == "failed" and '"steps"' in task["error"]["detail"], task
    assert cp.state(r, job)[1] == "failed"
    # a record that names another task than its entry
    job = cp.submit(r, image_bytes(), edit=lambda rec: rec.update(index=1))
    task = cp.wait(r, job, timeout=30)
    assert task["state"] == "failed" and "names another task" in task["error"]["detail"], task


def test_task_that_outlived_its_workers_fails(cluster):
    """Three workers took it and died (simulated: consumers that take the
    entry and never finish it): the next one fails it with the reason."""
    r = cluster["r"]
    job = cp.submit(r, image_bytes(), ghost="ghost-1")
    entry = cp.entry_of(r, job)
    for ghost in ("ghost-2", "ghost-3"):
        r.xclaim(cp.STREAM, cp.GROUP, ghost, 0, [entry])  # a delivery each
    task = cp.wait(r, job, timeout=VISIBILITY + 30)
    assert task["state"] == "failed", task
    assert task["error"]["detail"] == ("taken by 3 workers that each stopped before finishing it; "
                                       "not tried again"), task
    assert not r.xpending_range(cp.STREAM, cp.GROUP, "-", "+", 10)  # acked


def test_cancel_stops_a_running_task(cluster):
    r = cluster["r"]
    job = cp.submit(r, image_bytes(), steps=150)
    cp.wait(r, job, states=("running",))
    r.set(f"sdx4:cancel:{job}", "client", ex=60)
    task = cp.wait(r, job, timeout=30)
    assert task["state"] == "canceled" and task["error"]["detail"] == "canceled by the client", task
    assert task["step"] < 150
    # one stopped before a worker takes it is never run
    job = os.urandom(16).hex()
    r.set(f"sdx4:cancel:{job}", "timeout", ex=60)
    cp.submit(r, image_bytes(), job_id=job)
    task = cp.wait(r, job, timeout=30)
    assert task["state"] == "failed" and task["error"]["kind"] == "timeout" and task["started"] == 0, task


def test_group_made_again_when_redis_lost_it(cluster):
    r = cluster["r"]
    r.delete(cp.STREAM)  # the group with it
    job = cp.submit(r, image_bytes(), group=False)
    assert cp.wait(r, job, timeout=30)["state"] == "succeeded"


def test_redis_restart(cluster):
    """Tasks queued while Redis restarts survive it (append-only); the
    workers' health is 503 while it is away and 200 once it is back."""
    r, redis_server, workers = cluster["r"], cluster["redis"], cluster["workers"]
    logged = len(workers[0].logs())
    for w in workers:
        w.proc.send_signal(signal.SIGSTOP)  # nobody takes the tasks before the restart
    try:
        jobs = [cp.submit(r, image_bytes(seed=i), seed=i) for i in range(2)]
        redis_server.stop()
    finally:
        for w in workers:
            w.proc.send_signal(signal.SIGCONT)
    deadline = time.time() + 15
    while any(w.get("/healthz").status_code != 503 for w in workers):
        assert time.time() < deadline, "health stayed 200 with Redis stopped"
        time.sleep(0.1)
    h = workers[0].get("/healthz").json()
    assert h["error"] == "Redis does not answer" and not h["redis"]["up"]
    redis_server.start()
    for w in workers:
        w.wait_ready(timeout=15)
    assert all(cp.wait(r, j)["state"] == "succeeded" for j in jobs)
    metrics = workers[0].get("/metrics").text
    errors = next(l for l in metrics.splitlines() if l.startswith("sdx4_worker_redis_errors_total"))
    assert "sdx4_worker_redis_up 1" in metrics
    # logged once per outage, not once per failed call (an answer buffered
    # before the stop may end one outage early: at most one more)
    logs = [l for l in workers[0].logs()[logged:] if isinstance(l, dict)]
    assert 1 <= sum(l["event"] == "redis_unreachable" for l in logs) <= 2 < int(errors.split()[1])


def test_sigkill_task_finished_by_the_other(cluster):
    r = cluster["r"]
    job = cp.submit(r, image_bytes(), steps=20)
    task = cp.wait(r, job, states=("running",))
    killed = holder(cluster, task)
    killed.proc.kill()
    killed.proc.wait()
    task = cp.wait(r, job, timeout=VISIBILITY + 120)
    assert task["state"] == "succeeded" and task["worker"] != killed.name, task
    replace(cluster, killed)


def test_sigterm_drains(cluster):
    r = cluster["r"]
    job = cp.submit(r, image_bytes(), steps=10)
    task = cp.wait(r, job, states=("running",))
    w = holder(cluster, task)
    cluster["workers"].remove(w)
    assert w.stop() == 0  # SIGTERM: it finishes the task, then exits 0
    task, _ = cp.state(r, job)
    assert task["state"] == "succeeded" and task["worker"] == w.name, task
    assert w.name.encode() not in r.smembers("sdx4:workers")
    assert any(isinstance(l, dict) and l["event"] == "worker_stopped" and l["drained"] for l in w.logs())
    w.check_clean_exit()


def test_sigterm_past_the_shutdown_timeout_leaves_the_task(cluster):
    """A worker that cannot finish within --shutdown-timeout stops its
    task and leaves its entry pending: another worker takes it over."""
    r, others = cluster["r"], cluster["workers"]
    for w in others:
        w.proc.send_signal(signal.SIGSTOP)
    try:
        short = Worker(cluster["redis"].url, *cluster["flags"], "--shutdown-timeout", 0.2)
        job = cp.submit(r, image_bytes(), steps=20)
        assert cp.wait(r, job, states=("running",))["worker"] == short.name
    finally:
        for w in others:
            w.proc.send_signal(signal.SIGCONT)
    assert short.stop() == 0
    assert any(isinstance(l, dict) and l["event"] == "task_abandoned" for l in short.logs())
    short.check_clean_exit()
    task = cp.wait(r, job, timeout=VISIBILITY + 120)
    assert task["state"] == "succeeded" and task["worker"] in {w.name for w in others}, task


def test_warm_up_sizes_and_inference_metrics():
    """A worker warms up as serve does (each of --warmup-sizes, then the
    estimator's calibration) and reports the upscales it ran under serve's
    metric names."""
    from conftest import RedisServer
    redis_server = RedisServer()
    worker = None
    try:
        worker = Worker(redis_server.url, "--warmup", "true", "--warmup-sizes", "64,96x64")
        events = [l for l in worker.logs() if isinstance(l, dict)]
        warmed = [(l["width"], l["height"]) for l in events if l["event"] == "warmed_up_size"]
        assert warmed == [(64, 64), (96, 64)], warmed
        assert any(l["event"] == "calibrated" for l in events)
        r = redis_server.client()
        job = cp.submit(r, image_bytes(), steps=2)
        task = cp.wait(r, job)
        assert task["state"] == "succeeded"
        values = {l.split()[0]: float(l.split()[1]) for l in worker.get("/metrics").text.splitlines()
                  if l and not l.startswith("#")}
        for name in ("sdx4_inference_seconds_count", "sdx4_queue_wait_seconds_count"):
            assert values[name] == 1, (name, values.get(name))
        assert values["sdx4_step_seconds_count"] == task["total"], (values["sdx4_step_seconds_count"], task)
        assert values["sdx4_inference_seconds_sum"] > 0 and values["sdx4_ready"] == 1
        assert values["sdx4_resident_memory_bytes"] > 0 and values["sdx4_device_memory_peak_bytes"] > 0
    finally:
        if worker:
            worker.check_clean_exit()
        redis_server.remove()
