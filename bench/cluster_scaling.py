"""Cluster mode against single-process mode on the tiny model (CPU).

1. The same 40 async jobs (64x64, --steps each) through one API-only node
   with 1 worker, then with 2 workers (each worker one engine thread), and
   through a single-process server with one worker thread of one engine
   thread: the wall time from the first submit to the last result.
2. One synchronous upscale, repeated: its latency through a single-process
   server and through an API node with one worker (the overhead of cluster
   mode for one request: submit script, stream, events, result read back).

Runs the real processes through tests/server/conftest.py's helpers:
    python3 bench/cluster_scaling.py [--steps 10] [--repeats 20]
with SDX4_BIN (default build/sdx4) and SDX4_REFERENCE as for the tests,
and the tests' venv (tests/server/run.sh makes it) for requests and Pillow.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "server"))
from conftest import RedisServer, Server, Worker, image_bytes  # noqa: E402


def wait_serving(node, workers):
    deadline = time.time() + 120
    while time.time() < deadline:
        r = node.get("/api/v1/health", timeout=10)
        if r.status_code == 200 and len(r.json()["cluster"]["workers"]) >= workers:
            return
        time.sleep(0.1)
    raise RuntimeError("workers never registered")


def forty_jobs(server, steps, first_seed):
    """New seeds for each run: a shared cache would answer repeated ones."""
    images = [image_bytes(seed=s % 7) for s in range(40)]
    t0 = time.time()
    ids = []
    for seed, img in enumerate(images):
        r = server.post("/api/v1/jobs", files={"image": img},
                        data={"seed": str(first_seed + seed), "num_inference_steps": steps})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    for job_id in ids:
        while server.get(f"/api/v1/jobs/{job_id}").json()["status"] not in ("succeeded", "failed", "canceled"):
            time.sleep(0.02)
        assert server.get(f"/api/v1/jobs/{job_id}/result").status_code == 200
    return time.time() - t0


def sync_latencies(server, steps, repeats):
    img = image_bytes(seed=1)
    out = []
    for i in range(repeats + 1):
        t0 = time.time()
        r = server.post("/api/v1/upscale", files={"image": img},
                        data={"seed": str(1000 + i), "num_inference_steps": steps})  # new seeds: no cache hits
        assert r.status_code == 200, r.text
        out.append(time.time() - t0)
    return out[1:]  # the first warms the engine's buffers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="10")
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    flags = ("--request-timeout", "600", "--queue-size", "100", "--threads", "1")

    single = Server("--workers", "1", *flags)
    try:
        t_single = forty_jobs(single, a.steps, 0)
        lat_single = sync_latencies(single, a.steps, a.repeats)
    finally:
        single.stop()

    redis = RedisServer()
    try:
        workers = [Worker(redis.url, "--name", "w1", "--threads", "1")]
        node = Server("--redis", redis.url, "--workers", "0", *flags, wait_ready=False)
        wait_serving(node, 1)
        lat_cluster = sync_latencies(node, a.steps, a.repeats)
        # the worker's own view of each: from the request's arrival on the node to its result stored
        in_worker = [l["seconds"] for l in workers[0].logs()
                     if isinstance(l, dict) and l.get("event") == "job_finished"][1:]
        t_one = forty_jobs(node, a.steps, 100)
        workers.append(Worker(redis.url, "--name", "w2", "--threads", "1"))
        wait_serving(node, 2)
        t_two = forty_jobs(node, a.steps, 200)
        node.stop()
        for w in workers:
            w.stop()
    finally:
        redis.remove()

    print(f"40 async jobs, 64x64, {a.steps} steps, one engine thread per worker:")
    print(f"  single process, 1 worker thread: {t_single:6.2f} s")
    print(f"  cluster, 1 worker:               {t_one:6.2f} s")
    print(f"  cluster, 2 workers:              {t_two:6.2f} s  ({t_one / t_two:.2f}x the 1-worker rate)")
    ms = lambda xs: f"median {statistics.median(xs) * 1e3:7.1f} ms, min {min(xs) * 1e3:7.1f} ms"
    print(f"one synchronous upscale ({a.repeats} runs):")
    print(f"  single process: {ms(lat_single)}")
    print(f"  cluster:        {ms(lat_cluster)}")
    print(f"  overhead (medians): {(statistics.median(lat_cluster) - statistics.median(lat_single)) * 1e3:.1f} ms")
    print(f"  cluster, arrival to result stored by the worker: {ms(in_worker)}")
    print(f"  cluster, result stored to the client's answer (medians): "
          f"{(statistics.median(lat_cluster) - statistics.median(in_worker)) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
