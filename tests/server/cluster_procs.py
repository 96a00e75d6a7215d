"""Processes of a local cluster for the server tests: a redis-server of
the test's own and `sdx4 worker`s on it. test_cluster.py uses them, and
conftest.py's Server with SDX4_TEST_CLUSTER=1 (every server of the suite
then an API node with a worker of its own: LocalCluster).
"""
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SDX4 = os.environ.get("SDX4_BIN") or os.path.join(ROOT, "build", "sdx4")
WORKER_BIN = os.environ.get("SDX4_WORKER_BIN") or SDX4  # the same binary, unless told otherwise
REDIS_SERVER = shutil.which("redis-server")


class Redis:
    """A redis-server of the test's own on a unix socket; restartable with
    its data (append-only file) kept."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="sdx4-redis-")
        self.socket = os.path.join(self.dir, "redis.sock")
        self.url = "unix://" + self.socket
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", "0", "--unixsocket", self.socket, "--save", "", "--appendonly", "yes",
             "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while not os.path.exists(self.socket):
            assert self.proc.poll() is None and time.time() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        if os.path.exists(self.socket):
            os.unlink(self.socket)

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class WorkerProcess:
    """One `sdx4 worker` on the test's Redis."""

    def __init__(self, redis, name, *flags, model=None):
        from conftest import MODEL
        self.log = tempfile.NamedTemporaryFile(prefix=f"sdx4-worker-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [WORKER_BIN, "worker", "--redis", redis.url, "--model", model or MODEL, "--name", name, "--host",
             "127.0.0.1", "--port", "0", "--workers", "1", "--warmup", "false"] + [str(f) for f in flags],
            stdout=subprocess.DEVNULL, stderr=self.log, env=dict(os.environ, OMP_WAIT_POLICY="passive"))

    def logs(self):
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return [json.loads(line) if line.startswith("{") else line.rstrip("\n") for line in f]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout=60)
        assert status == 0, f"sdx4 worker exited {status}; see {self.log.name}"
        bad = [l for l in self.logs() if isinstance(l, str) and ("Sanitizer" in l or "runtime error" in l)]
        assert not bad, "\n".join(bad[:40])



class LocalCluster:
    """Redis and one worker for a Server of the suite run in cluster mode:
    the worker gets the server's flags (the settings are shared), the
    server --redis and --workers 0."""

    def __init__(self, model, flags):
        self.redis = Redis()
        self.worker = WorkerProcess(self.redis, "suite", *flags, model=model)

    def node_flags(self, flags):
        return list(flags) + ["--redis", self.redis.url, "--workers", "0"]

    def close(self):
        """Stops the worker (given a test's flags, it may have refused to
        start: its exit is not judged here) and Redis."""
        if self.worker.proc.poll() is None:
            self.worker.proc.terminate()
            self.worker.proc.wait(timeout=60)
        self.redis.close()
