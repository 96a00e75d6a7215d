"""Batching on a running server (queue.c, --max-batch-size, --batch-window):
upscales from different requests that can share their UNet calls (same
size, steps, sampler, guidance or not) run as one batch; each image is the
one it is alone (within a level of 255: the batched products may round
differently); a canceled one leaves the batch without changing the
others; incompatible ones run alone; sdx4_batch_size counts the batches.
A cluster worker batches the tasks its threads take. The engine's side
is tests/test_batch.c."""
import io
import time

import pytest
from PIL import Image

from conftest import RedisServer, Server, Worker, image_bytes, single_process_only, wait_idle, wait_job

SPECS = [{"prompt": "a cat", "seed": "1", "guidance_scale": "5", "noise_level": "0.1"},
         {"prompt": "a dog on a beach", "seed": "2", "negative_prompt": "blurry"},
         {"prompt": "", "seed": "3", "guidance_scale": "7", "noise_level": "0.15"}]


@pytest.fixture(scope="module")
def servers():
    # one worker, so that every job waits for the batch in hand; a long
    # window, so that three posts in a row always meet
    batched = Server("--workers", "1", "--max-batch-size", "4", "--batch-window", "1")
    alone = Server("--workers", "1", "--max-batch-size", "1")
    yield batched, alone
    batched.check_clean_exit()
    alone.check_clean_exit()


def batches(server):
    """sdx4_batch_size's count and sum."""
    values = {}
    for line in server.get("/metrics").text.splitlines():
        for part in ("count", "sum"):
            if line.startswith(f"sdx4_batch_size_{part} "):
                values[part] = float(line.split()[1])
    return values["count"], values["sum"]


def pixels(png):
    return Image.open(io.BytesIO(png)).convert("RGB").tobytes()


def levels_apart(a, b):
    a, b = pixels(a), pixels(b)
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def post_jobs(server, steps, specs=SPECS):
    return [server.post("/api/v1/jobs", files={"image": image_bytes(seed=k)},
                        data={**spec, "num_inference_steps": str(steps)}).json() for k, spec in enumerate(specs)]


def alone_image(alone, k, steps):
    r = alone.post("/api/v1/upscale", files={"image": image_bytes(seed=k)},
                   data={**SPECS[k], "num_inference_steps": str(steps)}, timeout=300)
    assert r.status_code == 200, r.text
    return r.content


@single_process_only("cluster workers take tasks one at a time")
def test_concurrent_upscales_share_their_unet_calls_and_keep_their_images(servers):
    batched, alone = servers
    count, total = batches(batched)
    jobs = post_jobs(batched, 3)
    assert all(wait_job(batched, j["id"])["status"] == "succeeded" for j in jobs)
    assert batches(batched) == (count + 1, total + 3)  # one batch of three
    for k, job in enumerate(jobs):
        assert levels_apart(batched.get(job["links"]["result"]).content, alone_image(alone, k, 3)) <= 1
    count, total = batches(alone)
    assert count >= 3 and total == count  # --max-batch-size 1: every upscale alone


@single_process_only("cluster workers take tasks one at a time")
def test_usage_splits_a_batchs_time_between_its_upscales(tmp_path):
    """Per-client compute seconds (the admin API's usage, for cost
    tracking) count a batch's time once, split between its upscales: not
    once for each, as their start-to-end times would."""
    root = {"Authorization": "Bearer key-root"}
    s = Server("--workers", "1", "--max-batch-size", "4", "--batch-window", "1", "--admin-keys", "key-root",
               "--history", str(tmp_path / "history.db"))
    try:
        count, _ = batches(s)
        jobs = [wait_job(s, j["id"]) for j in post_jobs(s, 8)]
        assert all(j["status"] == "succeeded" for j in jobs) and batches(s)[0] == count + 1, jobs
        spans = sum(j["timings"]["inference_ms"] for j in jobs) / 1e3  # each job's start to end
        deadline = time.time() + 10
        while True:  # the history is written behind the answers
            usage = s.get("/api/v1/admin/usage", headers=root).json()["usage"]
            if usage and usage[0]["requests"] == 3 or time.time() > deadline:
                break
            time.sleep(0.1)
        compute = usage[0]["compute_seconds"]
        # one batch: its time is each job's span, and the three shares make it up once
        assert 0.25 * spans < compute < 0.45 * spans, (compute, spans)
    finally:
        s.check_clean_exit()


@single_process_only("cluster workers take tasks one at a time")
def test_a_canceled_upscale_leaves_the_batch_and_the_others_go_on(servers):
    batched, alone = servers
    count, total = batches(batched)
    jobs = post_jobs(batched, 16)
    deadline = time.time() + 60
    while batched.get(jobs[1]["links"]["self"]).json()["progress"]["step"] < 2 and time.time() < deadline:
        time.sleep(0.02)
    canceled = batched.delete(jobs[1]["links"]["self"]).json()
    assert canceled["status"] == "canceled" and canceled["progress"]["step"] < 16
    for k in (0, 2):
        assert wait_job(batched, jobs[k]["id"])["status"] == "succeeded"
        assert levels_apart(batched.get(jobs[k]["links"]["result"]).content, alone_image(alone, k, 16)) <= 1
    assert batches(batched) == (count + 1, total + 3)
    wait_idle(batched)


@single_process_only("cluster workers take tasks one at a time")
def test_upscales_that_cannot_share_run_alone(servers):
    batched, _ = servers
    count, total = batches(batched)
    specs = [dict(SPECS[0]), {**SPECS[1], "scheduler": "euler"}]
    jobs = [batched.post("/api/v1/jobs", files={"image": image_bytes(seed=k)},
                         data={**spec, "num_inference_steps": str(2 + k)}).json() for k, spec in enumerate(specs)]
    assert all(wait_job(batched, j["id"])["status"] == "succeeded" for j in jobs)
    assert batches(batched) == (count + 2, total + 2)


def test_a_cluster_worker_batches_the_tasks_its_threads_take(servers):
    _, alone = servers
    redis = RedisServer()
    worker = node = None
    try:
        worker = Worker(redis.url, "--name", "batcher", "--max-batch-size", "4", "--batch-window", "1", threads=3)
        node = Server("--redis", redis.url, "--workers", "0", "--request-timeout", "300", wait_ready=False)
        deadline = time.time() + 120
        while node.get("/api/v1/health", timeout=10).status_code != 200 and time.time() < deadline:
            time.sleep(0.1)
        jobs = post_jobs(node, 3)
        assert all(wait_job(node, j["id"])["status"] == "succeeded" for j in jobs)
        assert batches(worker) == (1, 3)
        for k, job in enumerate(jobs):
            assert levels_apart(node.get(job["links"]["result"]).content, alone_image(alone, k, 3)) <= 1
    finally:
        if node:
            node.check_clean_exit()
        if worker:
            worker.stop()
        redis.remove()
