"""Logs and webhooks under hostile sinks and receivers (issue 12: D3, D6,
D9, D18): a stalled reader of stderr, a receiver that never answers, a
full webhook backlog, proxy variables in the server's environment and
IPv6 ranges that lead back to internal networks.

Every receiver listens on 127.0.0.1. New settings are passed as SDX4_*
variables, which a build without them ignores, so each test runs (and
fails on what it checks) against such a build too.
"""
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

import requests

from conftest import MODEL, SDX4, Server, image_bytes

NO_PROXY_ENV = {"http_proxy": "", "https_proxy": "", "ALL_PROXY": "", "all_proxy": "", "no_proxy": "",
                "NO_PROXY": ""}


def metric(text, name):
    """The value of a sample line `name value` of /metrics (None if absent)."""
    m = re.search(r"^" + re.escape(name) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


# ---- D3: logs ---------------------------------------------------------------

def test_stalled_log_reader_never_blocks_requests():
    """stderr into a pipe nobody reads: once the pipe and the log queue are
    full, health keeps answering at once, the lines that did not fit are
    counted in /metrics, a line says how many once the pipe is read, and
    SIGTERM with the pipe stalled again still exits within a bounded time."""
    cmd = [SDX4, "serve", "--model", MODEL, "--host", "127.0.0.1", "--port", "0", "--warmup", "false",
           "--rate-limit", "0"]
    # an 8 KB queue (~35 access lines) beside the pipe's 64 KB (~280)
    env = dict(os.environ, OMP_WAIT_POLICY="passive", SDX4_LOG_BUFFER="8K")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    lines, reading = [], threading.Event()
    try:
        port = None
        while port is None:  # the port from the "listening" line; then nobody reads
            line = proc.stderr.readline()
            assert line, "sdx4 serve exited before listening"
            entry = json.loads(line)
            lines.append(entry)
            port = entry.get("port") if entry.get("event") == "listening" else None
        url = f"http://127.0.0.1:{port}"
        session = requests.Session()
        deadline = time.time() + 60
        while session.get(url + "/api/v1/health", timeout=5).status_code != 200:
            assert time.time() < deadline, "never ready"
            time.sleep(0.1)

        started = time.time()
        for _ in range(500):  # ~440 lines more than the pipe and the queue hold
            assert session.get(url + "/api/v1/health", timeout=5).status_code == 200
        assert time.time() - started < 60  # ~1 s here; a stalled server never gets there
        dropped = metric(session.get(url + "/metrics", timeout=5).text, "sdx4_log_lines_dropped_total")
        assert dropped is not None and dropped >= 100, dropped

        def reader():
            while reading.is_set():
                line = proc.stderr.readline()
                if not line:
                    return
                lines.append(line.decode(errors="replace").rstrip("\n"))
        reading.set()
        threading.Thread(target=reader, daemon=True).start()

        def notices():
            found = []
            for l in lines:
                try:
                    entry = json.loads(l) if isinstance(l, str) else l
                except ValueError:
                    continue
                if entry.get("event") == "log_lines_dropped":
                    found.append(entry)
            return found
        deadline = time.time() + 30
        while not notices() and time.time() < deadline:
            session.get(url + "/api/v1/health", timeout=5)  # the next line carries the notice
            time.sleep(0.1)
        assert notices(), "no log_lines_dropped line after the pipe was read"
        total = metric(session.get(url + "/metrics", timeout=5).text, "sdx4_log_lines_dropped_total")
        time.sleep(0.5)
        assert sum(n["lines"] for n in notices()) == total, (notices(), total)
        assert notices()[0]["level"] == "warn"

        # stalled again, then SIGTERM: the exit waits for the sink a bounded time
        reading.clear()
        session.get(url + "/api/v1/health", timeout=5)  # unblocks the reader's readline
        time.sleep(0.3)
        for _ in range(500):
            assert session.get(url + "/api/v1/health", timeout=5).status_code == 200
        stop = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.time() - stop < 15
        lines += proc.stderr.read().decode(errors="replace").splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    bad = [l for l in lines if isinstance(l, str) and ("Sanitizer" in l or "runtime error" in l)]
    assert not bad, bad
