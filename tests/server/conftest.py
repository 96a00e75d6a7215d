"""Fixtures of the server's integration tests: the real `sdx4 serve` on a
loopback port, driven over HTTP.

The binary comes from $SDX4_BIN (default: build/sdx4) and the model from
$SDX4_TEST_MODEL (default: $SDX4_REFERENCE/tiny/model, the reference data's
tiny diffusers model). Every server listens on port 0 (any free port) and
tells its port in its JSON log; each is stopped with SIGTERM, and a test
fails if the server did not exit 0 or logged a sanitizer report.
"""
import io
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time

import pytest
import requests
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SDX4 = os.environ.get("SDX4_BIN") or os.path.join(ROOT, "build", "sdx4")
REFERENCE = os.environ.get("SDX4_REFERENCE") or os.path.join(ROOT, "..", "shared", "reference")
MODEL = os.environ.get("SDX4_TEST_MODEL") or os.path.join(REFERENCE, "tiny", "model")
# SDX4_TEST_CLUSTER=1: every Server is an API node of a cluster of its own
# (LocalCluster: Redis and one worker), to run the suite in cluster mode
CLUSTER = os.environ.get("SDX4_TEST_CLUSTER") == "1"
# every server's and worker's log, in one folder removed when the session
# passes and kept (its path printed) when it does not; under pytest-xdist
# (run.sh -n) the controller makes it, its worker processes write into it
# (pytest_configure_node) and only the controller, which knows how the whole
# session ended, removes or prints it
LOG_DIR = None


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "serial: a test whose timing or ordering assertions do not hold with another module's "
        "servers competing for the cores; scripts/test.sh runs the others with -n (pytest-xdist), "
        "then these alone (-m serial)")
    global LOG_DIR
    if hasattr(config, "workerinput"):
        LOG_DIR = config.workerinput["sdx4_log_dir"]
    else:
        LOG_DIR = tempfile.mkdtemp(prefix="sdx4-test-logs-")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    node.workerinput["sdx4_log_dir"] = LOG_DIR


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):
        return
    if exitstatus == 0:
        shutil.rmtree(LOG_DIR, ignore_errors=True)
    else:
        print(f"\nthe servers' logs: {LOG_DIR}")


def single_process_only(reason):
    """Leaves a test out in cluster mode, saying why: it tests a detail of
    one process that a cluster does otherwise (or elsewhere) by design."""
    return pytest.mark.skipif(CLUSTER, reason="cluster mode: " + reason)


class Server:
    """One `sdx4 serve` process; `url` is its base URL once started."""

    cluster = None  # its own Redis and worker (SDX4_TEST_CLUSTER=1), stopped with it

    def __init__(self, *flags, env=None, model=MODEL, wait_ready=True):
        self.log_file = tempfile.NamedTemporaryFile(prefix="serve-", suffix=".log", dir=LOG_DIR, delete=False)
        if CLUSTER and "--redis" not in [str(f) for f in flags]:  # a cluster test's node has its own
            self.cluster = LocalCluster(model, flags, env)
            flags = list(flags) + ["--redis", self.cluster.redis.url, "--workers", "0"]
        # an API node is "unavailable" until a worker (maybe its own) registers
        self.clustered = "--redis" in [str(f) for f in flags]
        cmd = [SDX4, "serve", "--model", model, "--host", "127.0.0.1", "--port", "0",
               "--warmup", "false", "--rate-limit", "0"] + [str(f) for f in flags]
        full_env = dict(os.environ, OMP_WAIT_POLICY="passive")
        full_env.update(env or {})
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log_file, env=full_env)
        try:
            self.port = self._wait_for_port()
            self.url = f"http://127.0.0.1:{self.port}"
            if wait_ready:
                self.wait_ready()
        except (RuntimeError, AssertionError):
            if self.cluster:  # the test never gets the server to stop
                self.cluster.close()
            raise

    def logs(self):
        """The JSON log lines so far (other lines, e.g. sanitizer reports, as text)."""
        with open(self.log_file.name, encoding="utf-8", errors="replace") as f:
            lines = []
            for line in f:
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    lines.append(line.rstrip("\n"))
            return lines

    def _wait_for_port(self):
        deadline = time.time() + 30
        while time.time() < deadline:
            for entry in self.logs():
                if isinstance(entry, dict) and entry.get("event") == "listening":
                    return entry["port"]
            if self.proc.poll() is not None:
                raise RuntimeError(f"sdx4 serve exited {self.proc.returncode}: {self.logs()}")
            time.sleep(0.05)
        raise RuntimeError("sdx4 serve did not start listening")

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = requests.get(self.url + "/api/v1/health", timeout=5)
            if r.status_code == 200:
                return r.json()
            assert r.json()["status"] in ("loading", "warming") + (("unavailable",) if self.clustered else ()), r.text
            time.sleep(0.1)
        raise RuntimeError("the server never became ready")

    def get(self, path, **kw):
        return requests.get(self.url + path, timeout=kw.pop("timeout", 60), **kw)

    def post(self, path, **kw):
        return requests.post(self.url + path, timeout=kw.pop("timeout", 60), **kw)

    def delete(self, path, **kw):
        return requests.delete(self.url + path, timeout=kw.pop("timeout", 60), **kw)

    def stop(self, timeout=60):
        """SIGTERM; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.cluster:
                self.cluster.close()
                self.cluster = None

    def check_clean_exit(self):
        status = self.stop()
        bad = [l for l in self.logs() if isinstance(l, str) and
               ("Sanitizer" in l or "runtime error" in l or "LeakSanitizer" in l)]
        assert not bad, f"see {self.log_file.name}:\n" + "\n".join(bad[:40])
        assert status == 0, f"sdx4 serve exited {status}; see {self.log_file.name}"
        os.unlink(self.log_file.name)


@pytest.fixture(scope="module")
def server():
    """A server with the defaults the basic tests need (no keys, no rate limit)."""
    docs = os.environ.get("SDX4_TEST_DOCS_ASSETS")  # Swagger UI's files, when run.sh found them
    s = Server("--cors-origins", "http://allowed.example", "--webhook-secret", "hook-secret",
               "--webhook-private", "true", "--request-timeout", "60",
               *(["--docs-assets", docs] if docs else []))
    yield s
    s.check_clean_exit()


def openssl(*args):
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """{name: path}: ca.pem, and a.pem/a.key and b.pem/b.key, two server
    certificates for 127.0.0.1 that the CA signed (made by the openssl
    command)."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2"]
    openssl("req", "-x509", *ec, "-keyout", d / "ca.key", "-out", d / "ca.pem", "-subj", "/CN=sdx4 test CA")
    for name in ("a", "b"):
        openssl("req", "-x509", *ec, "-keyout", d / f"{name}.key", "-out", d / f"{name}.pem",
                "-subj", f"/CN=sdx4 test {name}", "-addext", "subjectAltName=IP:127.0.0.1",
                "-CA", d / "ca.pem", "-CAkey", d / "ca.key")
    return {p.name: str(p) for p in d.iterdir()}


def tls_listening(httpd, pki):
    """Makes a socketserver on 127.0.0.1 speak HTTPS with pki's a.pem."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["a.pem"], pki["a.key"])
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)


def image_bytes(fmt="PNG", size=(64, 64), mode="RGB", seed=0, **save):
    """A small test picture with some structure, encoded by Pillow."""
    w, h = size
    img = Image.new("RGB", size)
    img.putdata([((x * 4 + seed) % 256, (y * 4) % 256, ((x + y) * 2) % 256) for y in range(h) for x in range(w)])
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def png_claiming(width, height):
    """A valid PNG stream whose header claims width x height but whose data
    is a few bytes: a decompression bomb, or a 0x0 image."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + chunk(b"IEND", b""))


def wait_idle(server, timeout=60):
    """Waits until no task is queued or running on `server`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        q = server.get("/api/v1/health").json()["queue"]
        if q["running"] == 0 and q["depth"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the workers never became idle")


def problem(r, status, slug):
    """Asserts an RFC 9457 answer of this status and type; returns it."""
    assert r.status_code == status, (r.status_code, r.text[:400])
    assert r.headers["Content-Type"] == "application/problem+json"
    p = r.json()
    assert p["type"] == "urn:sdx4:problem:" + slug, p
    assert p["status"] == status and p["title"] and p["detail"]
    assert p["request_id"] == r.headers["X-Request-Id"]
    return p


def wait_job(server, job_id, timeout=120, headers=None):
    """The job's document once it is final (polled every 50 ms), read with
    `headers` (its owner's key or token, where the server has keys)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = server.get(f"/api/v1/jobs/{job_id}", headers=headers).json()
        if j["status"] in ("succeeded", "failed", "canceled"):
            return j
        time.sleep(0.05)
    raise AssertionError("job did not finish")


class RedisServer:
    """A redis-server of the test's own on a unix socket, append-only, that
    can be stopped and started again on the same data."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="sdx4-redis-")
        self.socket = os.path.join(self.dir, "redis.sock")
        self.url = "unix://" + self.socket
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", self.socket, "--save", "",
                                      "--appendonly", "yes", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while not self.answers():  # the socket appears before the server serves
            assert self.proc.poll() is None and time.time() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def answers(self):
        if not os.path.exists(self.socket):
            return False
        import redis
        try:
            with redis.Redis(unix_socket_path=self.socket, socket_timeout=0.5) as r:
                return r.ping()
        except redis.RedisError:
            return False

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)  # writes the append-only file out
        self.proc.wait(timeout=30)

    def client(self):
        import redis
        return redis.Redis(unix_socket_path=self.socket)

    def remove(self):
        if self.proc.poll() is None:
            self.stop()
        subprocess.run(["rm", "-rf", self.dir], check=False)


@pytest.fixture(scope="module")
def redis_server():
    r = RedisServer()
    yield r
    r.remove()


class Worker(Server):
    """One `sdx4 worker` process; `url` is its health port's base URL."""

    def __init__(self, redis_url, *flags, model=MODEL, threads=1, env=None):
        self.log_file = tempfile.NamedTemporaryFile(prefix="worker-", suffix=".log", dir=LOG_DIR, delete=False)
        cmd = [SDX4, "worker", "--redis", redis_url, "--model", model, "--host", "127.0.0.1", "--port", "0",
               "--warmup", "false"] + (["--workers", str(threads)] if threads else []) + [str(f) for f in flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log_file,
                                     env=dict(os.environ, OMP_WAIT_POLICY="passive", **(env or {})))
        self.port = self._wait_for_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = next(l["worker"] for l in self.logs() if isinstance(l, dict) and l.get("event") == "listening")
        self.wait_ready()

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.get("/healthz", timeout=5).status_code == 200:
                return
            assert self.proc.poll() is None, f"sdx4 worker exited {self.proc.returncode}; see {self.log_file.name}"
            time.sleep(0.1)
        raise RuntimeError("the worker never became ready")


class LocalCluster:
    """Redis and one worker for a Server of the suite run in cluster mode
    (SDX4_TEST_CLUSTER=1): the worker gets the server's flags and
    environment, as the settings are shared, and the server --redis and
    --workers 0."""

    def __init__(self, model, flags, env=None):
        self.redis = RedisServer()
        try:
            # as many threads as the server alone would have (its --workers, else the default)
            self.worker = Worker(self.redis.url, *flags, "--name", "suite", model=model, threads=None, env=env)
        except Exception:
            self.redis.remove()
            raise

    def close(self):
        self.worker.stop()  # its exit is the worker tests' to judge
        self.redis.remove()
