#!/usr/bin/env python3
"""A soak of the real server: `sdx4 serve` on a model under mixed load for
`--seconds` (600), its resident memory sampled every `--every` seconds.

The load, each kind from its own threads, all at once:
  sync       synchronous upscales with fresh seeds (the cache never answers)
  cached     the same upscale again and again (the result cache answers)
  batch      batch-upscale of three images, one of them not an image
  jobs       async jobs polled to the end and their results fetched; every
             other one canceled (DELETE) once it has begun
  websocket  a job's progress over a WebSocket, read to the close frame, or
             dropped after the first message
  sse        a job's Server-Sent Events, dropped after the first event
  malformed  bad JSON, bad fields, truncated and lying PNGs, text sent as an
             image, unknown routes, bad WebSocket handshakes
  oversize   bodies over --max-upload (11 MB against the default 10 MB)
  slow       headers sent a byte a second (past --header-timeout), a body
             trickled below --min-upload-rate, a client gone mid-upscale
  probes     health and metrics

The server keeps results in its cache and finished jobs by design, up to
--cache-size (256M) and --jobs-memory (512M) for --job-retention (1 h);
here those are 16M, 32M and 20 s, so that they are full before the
warm-up ends and evict all along (more flags after `--` override them).

Verdict. The first `--warmup` seconds (60) fill the server's caches and
pools; "after warm-up" is the median RSS of the next 30 s, "end" the
median of the last 30 s. The soak passes when end - after warm-up is
below `--bound` MiB (32), the server answered no request with a 500, it
is still ready at the end and it exits 0 on SIGTERM. Prints one line per
minute while it runs, then the figures; --csv writes every sample.

    bench/soak.py --sdx4 build/sdx4 --model ../shared/reference/tiny/model [--seconds 600]

bench/soak.sh runs it with the Python of tests/server's virtual
environment (it needs requests).
"""
import argparse
import base64
import collections
import io
import json
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import requests


def png(width, height, seed):
    """A width x height RGB PNG with some structure."""
    rows = b"".join(b"\0" + bytes(((x * 5 + seed) % 256, (y * 3 + seed) % 256, ((x + y) * 2) % 256)[c]
                                  for x in range(width) for c in range(3)) for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


IMAGE = png(64, 64, 1)
IMAGE_B64 = base64.b64encode(IMAGE).decode()
# a PNG whose header claims 100000 x 100000 pixels: refused from the header
HUGE_CLAIM = IMAGE[:16] + struct.pack(">II", 100000, 100000) + IMAGE[24:]


class Soak:
    def __init__(self, args):
        self.args = args
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts = collections.Counter()  # (kind, outcome) -> n
        self.errors = []                     # unexpected answers, the first few kept
        self.samples = []                    # (seconds since start, RSS bytes)
        self.log = tempfile.NamedTemporaryFile(prefix="soak-serve-", suffix=".log", delete=False)
        # every client here is one address: no rate limit, no per-address
        # cap; what the server keeps by design (cached results, finished
        # jobs) bounded small, so that it is full before the warm-up ends
        # and evicted all along
        cmd = [args.sdx4, "serve", "--model", args.model, "--host", "127.0.0.1", "--port", "0",
               "--rate-limit", "0", "--per-ip-connections", "0",
               "--header-timeout", str(args.header_timeout), "--cache-size", "16M",
               "--job-retention", "20", "--jobs-memory", "32M"] + args.serve_args
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log,
                                     env=dict(os.environ, OMP_WAIT_POLICY="passive"))
        self.url = f"http://127.0.0.1:{self._port()}"
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/api/v1/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        else:
            sys.exit("soak: the server never became ready; log: " + self.log.name)

    def _port(self):
        deadline = time.time() + 60
        while time.time() < deadline:
            with open(self.log.name, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    if entry.get("event") == "listening":
                        return entry["port"]
            if self.proc.poll() is not None:
                sys.exit(f"soak: sdx4 serve exited {self.proc.returncode}; log: {self.log.name}")
            time.sleep(0.1)
        sys.exit("soak: sdx4 serve did not start listening")

    def rss(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def cache_mib(self):
        """The result cache's bytes, from /metrics."""
        try:
            for line in requests.get(self.url + "/metrics", timeout=30).text.splitlines():
                if line.startswith("sdx4_cache_bytes "):
                    return float(line.split()[1]) / 2**20
        except requests.RequestException:
            pass
        return float("nan")

    def note(self, kind, outcome, unexpected=None):
        with self.lock:
            self.counts[(kind, outcome)] += 1
            if unexpected and len(self.errors) < 20:
                self.errors.append(f"{kind}: {unexpected}")

    def expect(self, kind, r, *ok):
        """Counts an answer; one outside `ok` (or any 500) is an error. 503
        (queue full) and 504 (over --request-timeout) are the server's
        answers to more work than the cores do: counted, not errors."""
        ok = ok + (503, 504)
        status = r.status_code
        self.note(kind, status, None if status in ok and status != 500 else f"{status} {r.text[:200]}")
        return status

    # ---- the kinds of load ------------------------------------------------
    def sync(self, rnd):
        r = requests.post(self.url + "/api/v1/upscale", files={"image": ("in.png", IMAGE, "image/png")},
                          data={"num_inference_steps": "2", "seed": str(rnd.randrange(1 << 30))}, timeout=120)
        self.expect("sync", r, 200)

    def cached(self, rnd):
        r = requests.post(self.url + "/api/v1/upscale", json={"image": IMAGE_B64, "num_inference_steps": 2,
                                                               "seed": 7}, timeout=120)
        self.expect("cached", r, 200)

    def batch(self, rnd):
        images = [IMAGE_B64, {"image": IMAGE_B64, "seed": rnd.randrange(1000)},
                  base64.b64encode(b"not an image at all").decode()]
        r = requests.post(self.url + "/api/v1/batch-upscale", json={"images": images, "num_inference_steps": 2},
                          timeout=300)
        if self.expect("batch", r, 200) == 200:
            statuses = [e["status"] for e in r.json()["results"]]
            if statuses[2] != 415:
                self.note("batch", "wrong", f"statuses {statuses}")

    def submit(self, steps=3):
        r = requests.post(self.url + "/api/v1/jobs", files={"image": ("in.png", IMAGE, "image/png")},
                          data={"num_inference_steps": str(steps), "seed": str(random.randrange(1 << 30))},
                          timeout=60)
        return r.json() if self.expect("jobs", r, 202) == 202 else None

    def jobs(self, rnd):
        cancel = rnd.random() < 0.5
        job = self.submit(steps=8 if cancel else 3)
        if not job:
            return
        deadline = time.time() + 300
        while time.time() < deadline and not self.stop.is_set():
            state = requests.get(self.url + job["links"]["self"], timeout=30).json()
            if cancel and state["status"] in ("queued", "running") and state["progress"]["step"] >= 1:
                r = requests.delete(self.url + job["links"]["self"], timeout=30)
                self.expect("cancel", r, 200, 404, 409)
                return
            if state["status"] not in ("queued", "running"):
                if state["status"] == "succeeded":
                    r = requests.get(self.url + job["links"]["result"], timeout=30)
                    self.expect("result", r, 200)
                else:
                    self.note("jobs", state["status"])
                return
            time.sleep(0.2)

    def websocket(self, rnd):
        job = self.submit()
        if not job:
            return
        sock = socket.create_connection(("127.0.0.1", int(self.url.rsplit(":", 1)[1])), timeout=120)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            sock.sendall((f"GET {job['links']['events']} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                          "Sec-WebSocket-Version: 13\r\n\r\n").encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(1)
                if not chunk:
                    break
                head += chunk
            if not head.startswith(b"HTTP/1.1 101"):
                self.note("websocket", "refused", head[:100])
                return
            drop = rnd.random() < 0.3
            while True:
                b0, b1 = self._read(sock, 2)
                n = b1 & 0x7F
                if n == 126:
                    n = struct.unpack(">H", self._read(sock, 2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", self._read(sock, 8))[0]
                self._read(sock, n)
                if drop:
                    self.note("websocket", "dropped")
                    self.cancel(job)
                    return
                if b0 & 0x0F == 0x8:
                    self.note("websocket", "closed")
                    return
        finally:
            sock.close()

    @staticmethod
    def _read(sock, n):
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed mid-frame")
            data += chunk
        return data

    def sse(self, rnd):
        job = self.submit()
        if not job:
            return
        with requests.get(self.url + job["links"]["events"], stream=True, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith(b"event:"):
                    break
        self.note("sse", "dropped")
        self.cancel(job)
        time.sleep(0.5)

    def cancel(self, job):
        """A dropped stream's job would run on for nobody."""
        self.expect("cancel", requests.delete(self.url + job["links"]["self"], timeout=30), 200, 404, 409)

    def malformed(self, rnd):
        u = self.url
        cases = [
            (lambda: requests.post(u + "/api/v1/upscale", data=b"{not json", timeout=30,
                                   headers={"Content-Type": "application/json"}), (400, 415, 422)),
            (lambda: requests.post(u + "/api/v1/upscale", json={"image": IMAGE_B64, "num_inference_steps": 0},
                                   timeout=30), (422,)),
            (lambda: requests.post(u + "/api/v1/upscale", json={"image": IMAGE_B64, "no_such_field": 1},
                                   timeout=30), (422,)),
            (lambda: requests.post(u + "/api/v1/upscale", files={"image": ("t.png", IMAGE[:len(IMAGE) // 2])},
                                   timeout=30), (400, 415, 422)),
            (lambda: requests.post(u + "/api/v1/upscale", files={"image": ("h.png", HUGE_CLAIM)}, timeout=30),
             (413, 422)),
            (lambda: requests.post(u + "/api/v1/upscale", files={"image": ("a.txt", b"hello")}, timeout=30),
             (415,)),
            (lambda: requests.post(u + "/api/v1/upscale", data=os.urandom(2000), timeout=30,
                                   headers={"Content-Type": "multipart/form-data; boundary=zz"}), (400, 415, 422)),
            (lambda: requests.get(u + "/api/v1/no/such/route", timeout=30), (404,)),
            (lambda: requests.get(u + "/api/v1/jobs/" + "0" * 32, timeout=30), (404,)),
            (lambda: requests.put(u + "/api/v1/upscale", timeout=30), (405,)),
            (lambda: requests.get(u + "/api/v1/jobs/" + "0" * 32 + "/events", timeout=30,
                                  headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                           "Sec-WebSocket-Version": "8", "Sec-WebSocket-Key": "x"}),
             (400, 404, 426)),
        ]
        call, ok = rnd.choice(cases)
        self.expect("malformed", call(), *ok)
        time.sleep(0.1)

    def oversize(self, rnd):
        body = b"\0" * (11 << 20)
        try:
            r = requests.post(self.url + "/api/v1/upscale", data=body, timeout=60,
                              headers={"Content-Type": "application/octet-stream"})
            self.expect("oversize", r, 413, 415)
        except requests.ConnectionError:  # the server may close while the body still streams
            self.note("oversize", "closed")
        time.sleep(1)

    def slow(self, rnd):
        port = int(self.url.rsplit(":", 1)[1])
        kind = rnd.choice(("headers", "body", "gone"))
        if kind == "gone":  # a synchronous upscale whose client leaves at once
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            body = json.dumps({"image": IMAGE_B64, "num_inference_steps": 3, "seed": rnd.randrange(1 << 30)})
            s.sendall((f"POST /api/v1/upscale HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
            time.sleep(rnd.uniform(0.1, 1.0))
            s.close()
            self.note("slow", "gone")
            return
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        try:
            if kind == "headers":
                head = b"POST /api/v1/upscale HTTP/1.1\r\nHost: x\r\n"
            else:
                head = (b"POST /api/v1/upscale HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100000\r\n\r\n")
                s.sendall(head)
                head = b"x" * 400  # a body at ~10 bytes/s
            start = time.time()
            for b in head:
                s.sendall(bytes([b]))
                time.sleep(1.0 if kind == "headers" else 0.1)
                if self.stop.is_set() or time.time() - start > 60:
                    break
            if self.stop.is_set():
                self.note("slow", kind + " unfinished at the end")
            else:
                self.note("slow", kind + " not cut", f"a slow {kind} client was not cut in {time.time() - start:.0f} s")
        except OSError:
            self.note("slow", kind + " cut")
        finally:
            s.close()

    def probes(self, rnd):
        self.expect("probes", requests.get(self.url + "/api/v1/health", timeout=30), 200)
        self.expect("probes", requests.get(self.url + "/metrics", timeout=30), 200)
        time.sleep(1)

    # ---- the run ----------------------------------------------------------
    def loop(self, name, fn, seed):
        rnd = random.Random(seed)
        while not self.stop.is_set():
            try:
                fn(rnd)
            except (requests.RequestException, OSError, ValueError) as e:
                self.note(name, "exception", f"{type(e).__name__}: {e}")
                time.sleep(0.5)

    def run(self):
        a = self.args
        kinds = [("sync", self.sync, 2), ("cached", self.cached, 1), ("batch", self.batch, 1),
                 ("jobs", self.jobs, 2), ("websocket", self.websocket, 1), ("sse", self.sse, 1),
                 ("malformed", self.malformed, 2), ("oversize", self.oversize, 1), ("slow", self.slow, 3),
                 ("probes", self.probes, 1)]
        threads = [threading.Thread(target=self.loop, args=(name, fn, 1000 * i + k), daemon=True)
                   for i, (name, fn, n) in enumerate(kinds) for k in range(n)]
        t0 = time.time()
        for t in threads:
            t.start()
        next_line = 60
        while (elapsed := time.time() - t0) < a.seconds:
            self.samples.append((elapsed, self.rss()))
            if elapsed >= next_line:
                print(f"  {elapsed:5.0f} s  RSS {self.samples[-1][1] / 2**20:7.1f} MiB  "
                      f"result cache {self.cache_mib():5.1f} MiB  {sum(self.counts.values())} requests",
                      flush=True)
                next_line += 60
            if self.proc.poll() is not None:
                break
            time.sleep(a.every)
        self.stop.set()
        for t in threads:
            t.join(timeout=120)
        return self.verdict()

    def verdict(self):
        a = self.args
        alive = self.proc.poll() is None
        ready = alive and requests.get(self.url + "/api/v1/health", timeout=30).status_code == 200
        if alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = "hung"
        else:
            code = self.proc.returncode
        mib = lambda b: b / 2**20  # noqa: E731
        warm = [r for t, r in self.samples if a.warmup <= t < a.warmup + 30]
        end = [r for t, r in self.samples if t >= self.samples[-1][0] - 30]
        start, peak = self.samples[0][1], max(r for _, r in self.samples)
        after, last = statistics.median(warm or [start]), statistics.median(end)
        growth = mib(last - after)
        if a.csv:
            with open(a.csv, "w") as f:
                f.write("seconds,rss_bytes\n" + "".join(f"{t:.1f},{r}\n" for t, r in self.samples))
        by_kind = collections.defaultdict(dict)
        for (kind, outcome), n in sorted(self.counts.items(), key=str):
            by_kind[kind][str(outcome)] = n
        print(f"soak: {self.samples[-1][0]:.0f} s, {sum(self.counts.values())} requests")
        for kind, outcomes in by_kind.items():
            print(f"  {kind:10s} " + ", ".join(f"{o}: {n}" for o, n in outcomes.items()))
        print(f"RSS: start {mib(start):.1f} MiB, after warm-up {mib(after):.1f} MiB, peak {mib(peak):.1f} MiB, "
              f"end {mib(last):.1f} MiB; end - after warm-up {growth:+.1f} MiB (bound {a.bound} MiB)")
        failures = []
        if growth >= a.bound:
            failures.append(f"RSS grew {growth:.1f} MiB after warm-up")
        if self.errors:
            failures.append(f"{len(self.errors)}+ unexpected answers: " + "; ".join(self.errors[:5]))
        if not ready:
            failures.append("the server was not ready at the end")
        if code != 0:
            failures.append(f"sdx4 serve exited {code} on SIGTERM")
        print("verdict: " + ("PASS" if not failures else "FAIL: " + " | ".join(failures)))
        print(f"server log: {self.log.name}")
        return 0 if not failures else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sdx4", required=True, help="the sdx4 binary")
    p.add_argument("--model", required=True, help="the model folder it serves")
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--warmup", type=float, default=60)
    p.add_argument("--every", type=float, default=2, help="seconds between RSS samples")
    p.add_argument("--bound", type=float, default=32, help="MiB of RSS growth after warm-up that fails")
    p.add_argument("--header-timeout", type=float, default=5)
    p.add_argument("--csv", help="write every RSS sample here")
    p.add_argument("serve_args", nargs="*", help="more flags for sdx4 serve (after --)")
    sys.exit(Soak(p.parse_args()).run())


if __name__ == "__main__":
    main()
