"""HTTP framing and the edges of request parsing (defects D8, D16 and D17
of ../shared/attack): requests whose body length cannot be trusted are
answered 400 and their connection closed, so that nothing after them runs
as another request; NULs never cut a value short unnoticed; valid multipart
bodies that libmicrohttpd's post processor refused are read; the
API description's examples are requests the server accepts, and the values
its schemas allow pass the field checks.

Framing is tested over raw sockets, each request followed by a second one
that must never be answered (the smuggling the checks prevent)."""
import base64
import copy
import json
import socket

import pytest

from conftest import image_bytes, problem

UPSCALE = "/api/v1/upscale"
SMUGGLED = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n"


def exchange(server, data, timeout=10):
    """Sends data on a fresh connection; returns what came back until the
    server closed it (or `timeout` seconds passed: closed is then False)."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    out, closed = b"", False
    try:
        s.sendall(data)
        while True:
            got = s.recv(65536)
            if not got:
                closed = True
                break
            out += got
    except ConnectionResetError:
        closed = True
    except socket.timeout:
        pass
    finally:
        s.close()
    return out, closed


def responses(raw):
    """The HTTP responses in raw (bodies by Content-Length), and what is left."""
    found = []
    while raw.startswith(b"HTTP/1.1 "):
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines[1:])}
        n = int(headers.get(b"content-length", b"0"))
        found.append((int(lines[0].split()[1]), headers, rest[:n]))
        raw = rest[n:]
    return found, raw


def refused_and_closed(server, request, detail):
    """The request gets one 400 problem naming `detail`, and its connection
    is closed before the request that follows it is read."""
    raw, closed = exchange(server, request + SMUGGLED)
    found, rest = responses(raw)
    assert closed, f"the connection stayed open after {raw[:300]!r}"
    assert len(found) == 1 and not rest, raw[:600]
    status, headers, body = found[0]
    assert status == 400 and headers[b"connection"].lower() == b"close", raw[:600]
    p = json.loads(body)
    assert p["type"] == "urn:sdx4:problem:malformed-request" and detail in p["detail"], p


def post_head(*headers):
    return (f"POST {UPSCALE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + "".join(h + "\r\n" for h in headers) + "\r\n").encode()


@pytest.mark.parametrize("headers,body,detail", [
    (["Content-Length: 2", "Content-Length: 40"], b"{}", "Content-Length is given 2 times"),
    (["Content-Length: 2", "Content-Length: 2"], b"{}", "Content-Length is given 2 times"),
    (["Content-Length: 100", "Transfer-Encoding: chunked"], b"2\r\n{}\r\n0\r\n\r\n",
     "Content-Length and Transfer-Encoding"),
    (["Transfer-Encoding: gzip, chunked"], b"2\r\n{}\r\n0\r\n\r\n", "only the chunked transfer coding"),
    (["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"], b"2\r\n{}\r\n0\r\n\r\n",
     "only the chunked transfer coding"),
])
def test_untrustworthy_body_length_is_refused_and_closed(server, headers, body, detail):
    refused_and_closed(server, post_head(*headers) + body, detail)


def test_bad_header_lines_are_refused_and_closed(server):
    health = b"GET /api/v1/health HTTP/1.1\r\n"
    refused_and_closed(server, health + b"\r\n", "no Host header")
    refused_and_closed(server, health + b"Host: a\r\nHost: b\r\n\r\n", "Host is given 2 times")
    refused_and_closed(server, health + b"Host: x\r\nX-API-Key: good\0junk\r\n\r\n",
                       "the X-API-Key header has a NUL byte")
    refused_and_closed(server, health + b"Host: x\r\nX-Long: a\r\n folded\r\n\r\n", "folded line")
    refused_and_closed(server, b"POST /api/v1/upscale HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                       "Transfer-Encoding in an HTTP/1.0 request")
    # what stays valid: HTTP/1.0 without Host, headers with spaces, bare LF
    for ok in (b"GET /api/v1/health HTTP/1.0\r\n\r\n",
               health + b"Host: x\r\nX-Empty:\r\nX-Spaces:  a b  \r\nConnection: close\r\n\r\n",
               b"GET /api/v1/health HTTP/1.1\nHost: x\nConnection: close\n\n"):
        found, _ = responses(exchange(server, ok)[0])
        assert [f[0] for f in found] == [200], ok


def test_chunked_upload_still_works(server):
    body = json.dumps({"image": base64.b64encode(image_bytes()).decode(), "num_inference_steps": 1,
                       "seed": 5}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000]) for i in range(0, len(body), 1000))
    raw, _ = exchange(server, post_head("Transfer-Encoding: chunked", "Connection: close") + chunks + b"0\r\n\r\n",
                      timeout=60)
    found, _ = responses(raw)
    assert [f[0] for f in found] == [200], raw[:300]


def test_nul_in_query_values_and_names(server):
    body = {"image": base64.b64encode(image_bytes()).decode(), "num_inference_steps": 1, "seed": 1}
    p = problem(server.post(UPSCALE + "?prompt=a%00b", json=body), 422, "invalid-field")
    assert p["field"] == "prompt" and "U+0000" in p["detail"]
    p = problem(server.post(UPSCALE + "?num_inference_steps%00x=1", json={**body, "num_inference_steps": 2}),
                422, "invalid-field")
    assert "NUL" in p["detail"]


def multipart(boundary, *parts, epilogue=b"", preamble=b""):
    body = preamble
    for name, value in parts:
        filename = b'; filename="a.png"' if name == b"image" else b""
        body += b"--%s\r\nContent-Disposition: form-data; name=\"%s\"%s\r\n\r\n%s\r\n" % (boundary, name, filename,
                                                                                        value)
    return body + b"--%s--\r\n" % boundary + epilogue


def post_multipart(server, boundary, body):
    return server.post(UPSCALE, data=body, headers={"Content-Type": "multipart/form-data; boundary=" + boundary})


def test_multipart_that_rfc_2046_allows(server):
    png = image_bytes()
    fast = [(b"num_inference_steps", b"1"), (b"seed", b"9")]
    # a one-character boundary, a preamble and an epilogue
    r = post_multipart(server, "B", multipart(b"B", (b"image", png), *fast, preamble=b"ignored\r\n",
                                              epilogue=b"ignored too\r\n--B\r\n"))
    assert r.status_code == 200, r.text
    # a quoted boundary followed by another parameter
    r = server.post(UPSCALE, data=multipart(b"a:b", (b"image", png), *fast),
                    headers={"Content-Type": 'multipart/form-data; boundary="a:b"; charset=utf-8'})
    assert r.status_code == 200, r.text
    # a body that ends before its closing delimiter is incomplete
    body = multipart(b"xyz", (b"image", png), *fast)
    p = problem(post_multipart(server, "xyz", body[:-len(b"--xyz--\r\n")]), 400, "malformed-request")
    assert "closing boundary" in p["detail"]


def test_too_long_multipart_prompt_reports_its_length(server):
    png = image_bytes()
    for text, chars in ((b"a" * 1_000_000, 1_000_000), ("\U0001F600".encode() * 300_000, 300_000)):
        p = problem(post_multipart(server, "xyz", multipart(b"xyz", (b"image", png), (b"prompt", text))), 422,
                    "invalid-field")
        assert p["field"] == "prompt" and f"prompt is {chars} characters long" in p["detail"], p


def test_integers_beyond_64_bits_are_out_of_range(server):
    image = base64.b64encode(image_bytes()).decode()
    for field, literal in (("seed", "9223372036854775808"), ("seed", "-99999999999999999999"),
                           ("num_inference_steps", "18446744073709551616")):
        body = '{"image": "%s", "%s": %s}' % (image, field, literal)
        p = problem(server.post(UPSCALE, data=body, headers={"Content-Type": "application/json"}), 422,
                    "invalid-field")
        assert p["field"] == field, p
    body = '{"images": [{"image": "%s", "seed": 1}, {"image": "%s", "seed": 1e2, "quality": %s}]}' % (
        image, image, "1" * 30)
    p = problem(server.post("/api/v1/batch-upscale", data=body, headers={"Content-Type": "application/json"}), 422,
                "invalid-field")
    assert p["field"] == "quality", p
    # a real number too big for a double stays malformed JSON
    body = '{"image": "%s", "seed": 1e400}' % image
    problem(server.post(UPSCALE, data=body, headers={"Content-Type": "application/json"}), 400, "malformed-request")


def test_openapi_examples_are_accepted(server):
    doc = server.get("/openapi.json").json()  # as served: the document clients read
    posted = 0
    for path, item in doc["paths"].items():
        if path.startswith("/sdapi/"):
            continue  # AUTOMATIC1111's name a GAN this server lacks: test_a1111.py posts them
        for op in item.values():
            example = isinstance(op, dict) and op.get("requestBody", {}).get("content", {}).get(
                "application/json", {}).get("example")
            if not example:
                continue
            body = copy.deepcopy(example)
            body["num_inference_steps"] = 1  # the example's own value only costs time here
            r = server.post(path, json=body)
            assert r.status_code in (200, 202), (path, r.status_code, r.text[:300])
            if path == "/api/v1/batch-upscale":
                assert all(item["status"] == 200 for item in r.json()["results"]), r.text[:500]
            posted += 1
    assert posted == 3


def test_what_the_schema_allows_is_what_the_server_takes(server):
    """Values openapi.json calls valid pass the field checks: each request
    carries a 1x1 image, so getting as far as the image's size check (and
    no further: nothing is upscaled) shows its fields were taken."""
    tiny = image_bytes(size=(1, 1))
    problem(server.post(UPSCALE, json={"image": base64.b64encode(tiny).decode(), "seed": 42.0}), 422, "image-size")
    body = multipart(b"xyz", (b"image", tiny), (b"eta", b"1.1125369292536007e-308"))
    problem(post_multipart(server, "xyz", body), 422, "image-size")
    # and what it does not allow is refused
    body = multipart(b"xyz", (b"image", image_bytes()), (b"async", b"1"))
    p = problem(server.post("/api/v1/batch-upscale", data=body,
                            headers={"Content-Type": "multipart/form-data; boundary=xyz"}), 422, "invalid-field")
    assert p["field"] == "async", p
    # an image sent as a text part is not a file
    body = b'--xyz\r\nContent-Disposition: form-data; name="image"\r\n\r\n%s\r\n--xyz--\r\n' % image_bytes()
    p = problem(post_multipart(server, "xyz", body), 422, "invalid-field")
    assert p["field"] == "image" and "file part" in p["detail"], p
    # parameters for an image the batch does not have: the images are too few
    body = multipart(b"xyz", (b"image", image_bytes()), (b"seed[3]", b"1"))
    p = problem(server.post("/api/v1/batch-upscale", data=body,
                            headers={"Content-Type": "multipart/form-data; boundary=xyz"}), 422, "invalid-field")
    assert p["field"] == "image", p
