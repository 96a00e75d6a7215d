"""HTTPS in the server (--tls-cert, --tls-key, --hsts; src/server/tls.c):
the API over TLS as over HTTP (upscales, keep-alive, a suspended
synchronous request and its client's disconnect, async jobs' WebSocket
events), TLS 1.2 and 1.3 only, HSTS, the certificate's reload on SIGHUP
(new connections get the new one, open ones keep theirs, a bad pair
changes nothing) and the start-up errors. The certificates are made here,
by the openssl command: a test CA and two server certificates it signs
(conftest's pki). The server's own HTTPS calls (--outbound-ca-file) are
tested where they are made: test_jwt.py and test_hooks_logs.py."""
import http.client
import json
import shutil
import signal
import socket
import ssl
import subprocess
import time

import pytest
import requests

from conftest import MODEL, SDX4, Server, image_bytes, wait_job
from test_connections import multipart_upscale, wait_for
from test_websocket import frames


@pytest.fixture(autouse=True)
def trust_test_ca(pki, monkeypatch):
    """requests (and the suite's Server helpers) verify against the test CA."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki["ca.pem"])


class TlsServer(Server):
    """A Server whose url is https://; flags must include the TLS pair."""

    def __init__(self, *flags, **kw):
        super().__init__(*flags, wait_ready=False, **kw)
        self.url = self.url.replace("http://", "https://")
        try:
            self.wait_ready()
        except (RuntimeError, AssertionError, requests.exceptions.RequestException):
            self.stop()
            raise


@pytest.fixture
def live_pair(pki, tmp_path):
    """cert and key files that start as a's and that a test may overwrite."""
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(pki["a.pem"], cert)
    shutil.copy(pki["a.key"], key)
    return str(cert), str(key)


def der(pem_file):
    with open(pem_file) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def client_context(pki, version=None):
    ctx = ssl.create_default_context(cafile=pki["ca.pem"])
    if version:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def handshake(port, ctx):
    """A TLS connection to the server: (socket, its TLS version, the certificate it got)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    return s, s.version(), s.getpeercert(binary_form=True)


def tls11_server_accepts(pki, ctx):
    """Whether `ctx` completes a TLS 1.1 handshake with `openssl s_server`:
    the client side of the check that the server refuses TLS 1.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "1", "-tls1_1",
                               "-cipher", "DEFAULT:@SECLEVEL=0", "-cert", pki["a.pem"], "-key", pki["a.key"]],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for line in server.stdout:  # "Using default temp DH parameters", then "ACCEPT"
            if line.startswith(b"ACCEPT"):
                break
        sock, version, _ = handshake(port, ctx)
        sock.close()
        return version == "TLSv1.1"
    finally:
        server.kill()
        server.wait()


def test_the_api_over_https(pki, live_pair):
    cert, key = live_pair
    plain = Server()
    s = TlsServer("--tls-cert", cert, "--tls-key", key, "--workers", "1", "--request-timeout", "900")
    try:
        # a synchronous upscale (its connection suspended while the job runs) gives what HTTP gives
        form = {"num_inference_steps": "2", "seed": "7"}
        r = s.post("/api/v1/upscale", files={"image": image_bytes()}, data=form)
        assert r.status_code == 200, r.text
        assert r.url.startswith("https://") and "Strict-Transport-Security" not in r.headers
        want = plain.post("/api/v1/upscale", files={"image": image_bytes()}, data=form)
        assert want.status_code == 200 and r.content == want.content

        # keep-alive: several requests on one TLS connection
        c = http.client.HTTPSConnection("127.0.0.1", s.port, context=client_context(pki), timeout=10)
        for _ in range(3):
            c.request("GET", "/api/v1/health")
            assert c.getresponse().read() and c.sock is not None
        first_sock = c.sock
        c.request("GET", "/api/v1/health")
        c.getresponse().read()
        assert c.sock is first_sock
        c.close()

        # an async job's events over a WebSocket on TLS (libmicrohttpd relays the upgraded stream)
        r = s.post("/api/v1/jobs", files={"image": image_bytes()}, data=form)
        assert r.status_code == 202, r.text
        ws, _, _ = handshake(s.port, client_context(pki))
        ws.sendall((f"GET {r.json()['links']['events']} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += ws.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        events = [json.loads(p)["event"] for op, p in frames(ws) if op == 0x1]
        ws.close()
        assert events[-1] == "succeeded", events
        done = wait_job(s, r.json()["id"])
        assert s.get(done["links"]["result"]).content == want.content

        # a client that leaves during its synchronous upscale is noticed on the TCP socket under TLS
        leaver, _, _ = handshake(s.port, client_context(pki))
        leaver.sendall(multipart_upscale(150, "tls-leaver"))
        wait_for(lambda: s.get("/api/v1/health").json()["queue"]["running"] == 1, 30, "the upscale to start")
        leaver.close()
        wait_for(lambda: any(isinstance(l, dict) and l.get("request_id") == "tls-leaver" and l.get("event") == "access"
                             for l in s.logs()), 30, "the leaver's access line")
        access = [l for l in s.logs() if isinstance(l, dict) and l.get("request_id") == "tls-leaver"
                  and l.get("event") == "access"]
        assert access[0]["outcome"] == "client_disconnected", access

        # plain HTTP to the TLS port: the connection fails, the server goes on
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{s.port}/api/v1/health", timeout=10)
        assert s.get("/api/v1/health").status_code == 200
    finally:
        plain.check_clean_exit()
        s.check_clean_exit()


def test_tls_versions_and_hsts(pki):
    s = TlsServer("--tls-cert", pki["a.pem"], "--tls-key", pki["a.key"], "--hsts", "31536000",
                  "--header-timeout", "0.5")
    try:
        for version, name in ((ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")):
            sock, got, _ = handshake(s.port, client_context(pki, version))
            sock.close()
            assert got == name
        old = client_context(pki, ssl.TLSVersion.TLSv1_1)
        old.set_ciphers("DEFAULT:@SECLEVEL=0")  # below OpenSSL's own floor
        assert tls11_server_accepts(pki, old), "the client can speak TLS 1.1 (to openssl's server)"
        with pytest.raises(ssl.SSLError):  # GnuTLS ends the handshake (EOF, no alert)
            handshake(s.port, old)

        r = s.get("/api/v1/health")
        assert r.headers["Strict-Transport-Security"] == "max-age=31536000"
        assert s.get("/no/such/route").headers["Strict-Transport-Security"] == "max-age=31536000"

        # the header deadline covers the handshake: a client that never says hello is cut
        silent = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        t0 = time.time()
        assert silent.recv(1) == b""
        assert time.time() - t0 < 3
        silent.close()
    finally:
        s.check_clean_exit()


def test_sighup_reloads_the_pair(pki, live_pair):
    cert, key = live_pair
    s = TlsServer("--tls-cert", cert, "--tls-key", key)
    try:
        def events(name):
            return [l for l in s.logs() if isinstance(l, dict) and l.get("event") == name]

        assert events("tls_loaded")[0]["subject"] == "CN=sdx4 test a"
        kept = http.client.HTTPSConnection("127.0.0.1", s.port, context=client_context(pki), timeout=10)
        kept.request("GET", "/api/v1/health")
        r = kept.getresponse()
        assert r.status == 200 and r.read()
        assert kept.sock.getpeercert(binary_form=True) == der(pki["a.pem"])

        shutil.copy(pki["b.pem"], cert)
        shutil.copy(pki["b.key"], key)
        s.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: events("tls_reloaded"), 10, "the reload")
        assert events("tls_reloaded")[0]["subject"] == "CN=sdx4 test b"
        sock, _, got = handshake(s.port, client_context(pki))
        sock.close()
        assert got == der(pki["b.pem"]), "a new connection gets the new certificate"
        kept.request("GET", "/api/v1/health")
        r = kept.getresponse()
        assert r.status == 200 and r.read(), "a connection opened before stays usable"
        assert kept.sock.getpeercert(binary_form=True) == der(pki["a.pem"])
        kept.close()

        # a key that is not the certificate's: the old pair goes on serving
        shutil.copy(pki["a.key"], key)
        s.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: events("tls_reload_failed"), 10, "the failed reload")
        assert "is not the key of the certificate" in events("tls_reload_failed")[0]["error"]
        with open(key, "w") as f:
            f.write("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
        s.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(events("tls_reload_failed")) == 2, 10, "the second failed reload")
        sock, _, got = handshake(s.port, client_context(pki))
        sock.close()
        assert got == der(pki["b.pem"])
        assert s.get("/api/v1/health").status_code == 200
    finally:
        s.check_clean_exit()


def test_sighup_without_tls_is_logged_not_fatal():
    s = Server()
    try:
        s.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any(isinstance(l, dict) and l.get("event") == "reload_ignored" for l in s.logs()), 10,
                 "the ignored reload")
        assert s.get("/api/v1/health").status_code == 200
    finally:
        s.check_clean_exit()


@pytest.mark.parametrize("flags, status, message", [
    (["--tls-cert", "a.pem"], 2, "tls-cert and tls-key go together"),
    (["--tls-key", "a.key"], 2, "tls-cert and tls-key go together"),
    (["--hsts", "60"], 2, "hsts needs tls-cert and tls-key"),
    (["--tls-cert", "a.pem", "--tls-key", "missing"], 1, "No such file or directory"),
    (["--tls-cert", "a.pem", "--tls-key", "b.key"], 1, "is not the key of the certificate"),
    (["--tls-cert", "a.key", "--tls-key", "a.key"], 1, "not a PEM certificate chain"),
    (["--tls-cert", "a.pem", "--tls-key", "a.pem"], 1, "not an unencrypted PEM private key"),
    (["--outbound-ca-file", "missing"], 2, "outbound-ca-file"),
    (["--outbound-ca-file", "a.key"], 2, "no PEM certificate in it"),
])
def test_start_up_errors(pki, tmp_path, flags, status, message):
    names = dict(pki, missing=str(tmp_path / "missing.key"))
    cmd = [SDX4, "serve", "--model", MODEL, "--port", "0", "--warmup", "false"] + [names.get(f, f) for f in flags]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert p.returncode == status, p.stderr
    assert message in p.stderr, p.stderr
