"""A job's progress over a WebSocket (src/server/websocket.c): the events
of its SSE stream, one text message each, from the same route with the
handshake's headers; the same keys and owners; bad handshakes refused.

The client is written here on a plain socket (RFC 6455's handshake and
frames), so that what travels is checked byte by byte and no client
library is needed."""
import base64
import hashlib
import json
import os
import socket
import struct
from urllib.parse import urlparse

import pytest

from conftest import Server, image_bytes, problem

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@pytest.fixture(scope="module")
def keyed():
    s = Server("--api-keys", "alice-key,bob-key")
    yield s
    s.check_clean_exit()


def handshake(server, path, key=None, version="13", headers=()):
    """Sends the upgrade request; returns (socket, status, headers, key)."""
    url = urlparse(server.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=60)
    key = key or base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {url.hostname}:{url.port}", "Upgrade: websocket",
             "Connection: keep-alive, Upgrade", f"Sec-WebSocket-Key: {key}", f"Sec-WebSocket-Version: {version}",
             *headers]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    status_line, *rest = head.decode().split("\r\n")
    fields = {}
    for line in rest:
        if ":" in line:
            name, value = line.split(":", 1)
            fields[name.strip().lower()] = value.strip()
    return sock, int(status_line.split()[1]), fields, key


def read_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the server closed the stream mid-frame"
        data += chunk
    return data


def frames(sock):
    """(opcode, payload) until the close frame, which ends the list."""
    out = []
    while True:
        b0, b1 = read_exact(sock, 2)
        assert b0 & 0x80 and not b1 & 0x80, "whole, unmasked frames from a server"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", read_exact(sock, 2))[0]
        elif n == 127:
            n = struct.unpack(">Q", read_exact(sock, 8))[0]
        out.append((b0 & 0x0F, read_exact(sock, n)))
        if b0 & 0x0F == 0x8:
            return out


def test_events_over_websocket(server):
    r = server.post("/api/v1/jobs", files={"image": image_bytes()}, data={"num_inference_steps": "3", "seed": "5"})
    assert r.status_code == 202, r.text
    job = r.json()
    sock, status, fields, key = handshake(server, job["links"]["events"])
    assert status == 101 and fields["upgrade"].lower() == "websocket"
    assert fields["sec-websocket-accept"] == base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    got = frames(sock)
    sock.close()
    assert got[-1] == (0x8, b"\x03\xe8"), "a normal closure after the final state"
    events = [json.loads(p) for op, p in got[:-1]]
    assert all(op == 0x1 for op, _ in got[:-1])
    names = [e["event"] for e in events]
    assert names[-1] == "succeeded" and names.count("succeeded") == 1
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids)), "each message a new version of the job"
    steps = [e["data"]["progress"]["step"] for e in events if e["event"] == "running"]
    assert steps == sorted(steps) and events[-1]["data"]["progress"] == {"step": 3, "total": 3}
    assert events[-1]["data"] == server.get(job["links"]["self"]).json() | {"links": events[-1]["data"]["links"]}
    # a finished job's stream replays its final state, as SSE does
    sock, status, _, _ = handshake(server, job["links"]["events"])
    late = frames(sock)
    sock.close()
    assert status == 101 and [json.loads(p)["event"] for op, p in late if op == 0x1] == ["succeeded"]
    # plain SSE still answers on the same route
    assert "event: succeeded" in server.get(job["links"]["events"]).text


def test_bad_handshakes(server):
    r = server.post("/api/v1/jobs", files={"image": image_bytes()}, data={"num_inference_steps": "1"})
    path = r.json()["links"]["events"]
    for kw, needle in [({"version": "8"}, "Sec-WebSocket-Version must be 13"),
                       ({"key": base64.b64encode(b"short").decode()}, "Sec-WebSocket-Key of 16 bytes")]:
        sock, status, _, _ = handshake(server, path, **kw)
        body = sock.recv(65536).decode(errors="replace")
        sock.close()
        assert status == 400 and needle in body, body
    sock, status, _, _ = handshake(server, "/api/v1/jobs/" + "0" * 32 + "/events")
    sock.close()
    assert status == 404


def test_keys_and_owners(keyed):
    r = keyed.post("/api/v1/jobs", files={"image": image_bytes()}, data={"num_inference_steps": "1"},
                   headers={"Authorization": "Bearer alice-key"})
    assert r.status_code == 202, r.text
    path = r.json()["links"]["events"]
    for headers, want in [((), 401), (("Authorization: Bearer bob-key",), 404),
                          (("Authorization: Bearer alice-key",), 101)]:
        sock, status, _, _ = handshake(keyed, path, headers=headers)
        if status == 101:
            assert frames(sock)[-1][0] == 0x8
        sock.close()
        assert status == want, (headers, status)
