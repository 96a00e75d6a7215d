#!/usr/bin/env python3
"""Images per second and latency through the HTTP API with N concurrent
clients, for issue 16's batching figures (BENCHMARKS.md "Batching").

Each client sends synchronous upscales back to back, each with its own
seed (so the cache never answers), for `--warm` + `--seconds` seconds;
the upscales that end within the last `--seconds` are counted (with
their whole latency), those ending in the warm-up or after are not. Prints one JSON line per client
count: images/s, p50 and p99 latency, and the server's sdx4_batch_size
count and sum over the measured part.

    bench/batch_load.py URL --clients 1,4,8,16 [--size 128] [--steps 75] [--seconds 60]

Start the server yourself, once with batching (the default) and once with
--max-batch-size 1, with --rate-limit 0 and a --queue-size above the
client count. Standard library only: it runs where pip cannot reach.
"""
import argparse
import io
import json
import struct
import threading
import time
import urllib.request
import uuid
import zlib


def png(size, seed):
    """A size x size RGB PNG with some structure."""
    rows = b"".join(b"\0" + bytes(((x * 4 + seed) % 256, (y * 4) % 256, ((x + y) * 2) % 256)[c]
                                  for x in range(size) for c in range(3)) for y in range(size))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def upscale(url, image, steps, seed):
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in (("num_inference_steps", str(steps)), ("seed", str(seed))):
        body.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode())
    body.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"in.png\"\r\n"
               f"Content-Type: image/png\r\n\r\n".encode() + image + f"\r\n--{boundary}--\r\n".encode())
    req = urllib.request.Request(url + "/api/v1/upscale", data=body.getvalue(),
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        r.read()
        return r.status


def batches(url):
    count = total = 0.0
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("sdx4_batch_size_count "):
                count = float(line.split()[1])
            elif line.startswith("sdx4_batch_size_sum "):
                total = float(line.split()[1])
    return count, total


def run(url, clients, size, steps, seconds, warm):
    image = png(size, 0)
    latencies, lock, seeds = [], threading.Lock(), iter(range(1 << 62))
    start = time.time()
    measured_from, until = start + warm, start + warm + seconds
    before = [None]

    def client():
        while time.time() < until:
            with lock:
                seed = next(seeds)
            t0 = time.time()
            status = upscale(url, image, steps, seed)
            t1 = time.time()
            if status == 200 and measured_from <= t1 <= until:
                with lock:
                    latencies.append(t1 - t0)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, measured_from - time.time()))
    before[0] = batches(url)
    for t in threads:
        t.join()
    after = batches(url)
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None
    return {"clients": clients, "size": size, "steps": steps, "seconds": seconds, "images": len(latencies),
            "images_per_s": len(latencies) / seconds, "p50_s": pick(0.5), "p99_s": pick(0.99),
            "batches": after[0] - before[0][0], "batched_images": after[1] - before[0][1]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=75)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--warm", type=float, default=10)
    a = p.parse_args()
    for n in (int(c) for c in a.clients.split(",")):
        print(json.dumps(run(a.url.rstrip("/"), n, a.size, a.steps, a.seconds, a.warm)), flush=True)


if __name__ == "__main__":
    main()
