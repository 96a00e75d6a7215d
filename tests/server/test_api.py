"""Every endpoint of the API and every refusal the specification lists, on
one server (no API keys, no rate limit): see conftest.py."""
import base64
import hashlib
import json
import os
import re
import socket
import subprocess
import tempfile
import time

import requests

from conftest import CLUSTER, MODEL, SDX4, image_bytes, png_claiming, problem, wait_job

UPSCALE = "/api/v1/upscale"
FAST = {"num_inference_steps": "1", "seed": "42"}


def upscale(server, img=None, data=None, **kw):
    files = {"image": ("in.png", img if img is not None else image_bytes(), "image/png")}
    return server.post(UPSCALE, files=files, data=FAST if data is None else data, **kw)


# ---- service endpoints ------------------------------------------------------

def test_health(server):
    r = server.get("/api/v1/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ready" and h["ready"] and h["model_loaded"] and h["warmed_up"]
    assert h["queue"] == {"depth": 0, "capacity": 100, "running": 0, "workers": 3}
    assert h["demo_model"] is False and "note" not in h
    assert r.headers["X-Request-Id"]


def test_request_id_is_echoed_and_logged(server):
    r = server.get("/api/v1/health", headers={"X-Request-Id": "abc-123.x_y"})
    assert r.headers["X-Request-Id"] == "abc-123.x_y"
    r = upscale(server, img=b"junk")
    rid = r.headers["X-Request-Id"]
    deadline = time.time() + 5
    while time.time() < deadline:
        access = [l for l in server.logs() if isinstance(l, dict) and l.get("request_id") == rid]
        if access:
            break
        time.sleep(0.05)
    line = access[0]
    assert line["event"] == "access" and line["status"] == 415 and line["route"] == "upscale"
    assert line["method"] == "POST" and line["path"] == UPSCALE and line["duration_ms"] >= 0
    assert line["level"] == "info" and line["ts"].endswith("Z")
    r = server.get("/api/v1/health", headers={"X-Request-Id": "bad id\twith junk"})
    assert r.headers["X-Request-Id"] != "bad id\twith junk"


def test_model_info(server):
    r = server.get("/api/v1/model-info")
    assert r.status_code == 200
    m = r.json()
    assert m["model_id"] == "model" and m["demo_model"] is False
    assert m["backend"] == "cpu" and m["device"]
    assert m["max_noise_level"] == 350 and m["scale_factor"] == 4 and m["max_prompt_tokens"] == 77
    for part in ("text_encoder", "unet", "vae"):
        assert m["components"][part]["parameters"] > 0
    assert m["parameters_total"] == sum(m["components"][p]["parameters"] for p in m["components"])
    assert m["dtype"]["compute"] == "float32"
    assert m["defaults"]["num_inference_steps"] == 75 and m["defaults"]["guidance_scale"] == 9.0
    assert m["limits"]["max_upload_bytes"] == 10 * 1024 * 1024
    assert m["limits"]["min_side"] == 64 and m["limits"]["max_side"] == 512
    assert m["formats"]["output"] == ["png", "jpeg", "webp"]


def weights_digest(model):
    """models.c's digest, computed independently: each weight file's name,
    size and bytes, text encoder then UNet then VAE (float32 files: the
    server's variant is none)."""
    h = hashlib.sha256()
    for part, stem in (("text_encoder", "model"), ("unet", "diffusion_pytorch_model"),
                       ("vae", "diffusion_pytorch_model")):
        path = os.path.join(model, part, stem + ".safetensors")
        with open(path, "rb") as f:
            data = f.read()
        h.update(f"{stem}.safetensors\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def test_model_version_in_every_answer(server):
    """The weights' digest names the version: in model-info, the model list,
    each upscale's X-Model-Hash, each job, and each history row (test_history)."""
    want = weights_digest(MODEL)
    assert server.get("/api/v1/model-info").json()["model_hash"] == want
    listed = server.get("/api/v1/models").json()["models"][0]
    assert listed["model_hash"] == want  # on an API node, from a live worker's facts
    r = server.post("/api/v1/upscale", files={"image": image_bytes()}, data={"num_inference_steps": "1"})
    assert r.status_code == 200 and r.headers["X-Model-Hash"] == want, r.headers
    job = server.post("/api/v1/jobs", files={"image": image_bytes()}, data={"num_inference_steps": "1"}).json()
    assert wait_job(server, job["id"])["model_hash"] == want


def test_openapi_and_docs(server):
    r = server.get("/openapi.json")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "openapi.json"), "rb") as f:
        assert json.loads(f.read()) == doc  # the binary serves the repository's file
    for path in ("/api/v1/upscale", "/api/v1/batch-upscale", "/api/v1/jobs", "/api/v1/jobs/{id}",
                 "/api/v1/jobs/{id}/result", "/api/v1/jobs/{id}/events", "/api/v1/health",
                 "/api/v1/model-info", "/metrics", "/openapi.json", "/docs"):
        assert path in doc["paths"], path
    r = server.get("/docs")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert "/openapi.json" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # nothing from a CDN
    if os.environ.get("SDX4_TEST_DOCS_ASSETS"):  # Swagger UI's files, served locally
        assert "/docs/swagger-ui-bundle.js" in r.text and "/docs/swagger-ui.css" in r.text
        for name, kind in (("swagger-ui-bundle.js", "text/javascript"), ("swagger-ui.css", "text/css")):
            asset = server.get("/docs/" + name)
            assert asset.status_code == 200 and asset.headers["Content-Type"].startswith(kind)
            with open(os.path.join(os.environ["SDX4_TEST_DOCS_ASSETS"], name), "rb") as f:
                assert asset.content == f.read()
    else:
        assert "r-cran-swagger" in r.text  # says how to get the interactive page
    problem(server.get("/docs/../../etc/passwd"), 404, "not-found")
    problem(server.get("/docs/nothing.js"), 404, "not-found")


def test_metrics(server):
    server.get("/api/v1/health")
    problem(upscale(server, img=b"GIF89a not a png"), 415, "unsupported-image-format")
    assert upscale(server, data={"num_inference_steps": "1"}).status_code == 200
    r = server.get("/metrics")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = r.text
    for name in ("sdx4_http_requests_total{route=\"health\",status=\"200\"}",
                 "sdx4_http_request_duration_seconds_bucket{route=\"health\",le=\"+Inf\"}",
                 "sdx4_rejections_total{cause=\"unsupported-image-format\"}",
                 "sdx4_queue_depth 0", "sdx4_queue_capacity 100", "sdx4_workers 3",
                 "sdx4_http_requests_in_flight", "sdx4_inference_seconds_count", "sdx4_step_seconds_count",
                 "sdx4_cache_hits_total", "sdx4_resident_memory_bytes", "sdx4_ready 1",
                 "sdx4_device_memory_bytes", "sdx4_device_memory_peak_bytes"):
        assert name in text, name
    gauges = dict(line.rsplit(" ", 1) for line in text.splitlines()
                  if line.startswith("sdx4_device_memory"))
    # the upscale above made the backend hold tensors (in cluster mode the
    # worker's backend: an API-only node has none, and `sdx4 worker`'s
    # /metrics does not show its memory yet)
    assert CLUSTER or float(gauges["sdx4_device_memory_peak_bytes"]) > 0
    assert float(gauges["sdx4_device_memory_peak_bytes"]) >= float(gauges["sdx4_device_memory_bytes"])
    for line in text.splitlines():  # every sample line is NAME{labels} VALUE
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def test_unknown_route_and_method(server):
    problem(server.get("/api/v1/nothing"), 404, "not-found")
    problem(server.get("/api/v1/jobs/not-an-id"), 404, "not-found")
    r = server.get(UPSCALE)
    problem(r, 405, "method-not-allowed")
    assert r.headers["Allow"] == "POST, OPTIONS"
    r = requests.put(server.url + "/api/v1/health", timeout=10)
    problem(r, 405, "method-not-allowed")
    assert "GET" in r.headers["Allow"]


def test_cors_preflight(server):
    r = requests.options(server.url + UPSCALE, timeout=10, headers={
        "Origin": "http://allowed.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "Authorization, Content-Type"})
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "http://allowed.example"
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
    assert r.headers["Vary"] == "Origin" and int(r.headers["Access-Control-Max-Age"]) > 0
    problem(requests.options(server.url + UPSCALE, timeout=10, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}), 403, "forbidden")
    # actual requests from an allowed origin carry the CORS headers, others do not
    r = server.get("/api/v1/health", headers={"Origin": "http://allowed.example"})
    assert r.headers["Access-Control-Allow-Origin"] == "http://allowed.example"
    assert "X-Seed" in r.headers["Access-Control-Expose-Headers"]
    assert "Access-Control-Allow-Origin" not in server.get("/api/v1/health", headers={"Origin": "http://evil.example"}).headers
    r = requests.options(server.url + "/api/v1/health", timeout=10)
    assert r.status_code == 204 and "GET" in r.headers["Allow"]


# ---- upscale: success -------------------------------------------------------

def test_upscale_png(server):
    r = upscale(server, data={"num_inference_steps": "1", "seed": "42", "prompt": "a cat"})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "image/png" and r.content.startswith(b"\x89PNG")
    h = r.headers
    assert h["X-Seed"] == "42" and h["X-Model"] == "model"
    assert h["X-Input-Size"] == "64x64" and h["X-Output-Size"] == "256x256"
    assert int(h["X-Inference-Time-Ms"]) > 0 and int(h["X-Queue-Time-Ms"]) >= 0
    assert h["X-Cache"] in ("MISS", "HIT") and h["X-Request-Id"]
    assert h["X-Prompt-Truncated"] == "false" and int(h["X-Prompt-Tokens"]) >= 3
    from PIL import Image
    import io
    assert Image.open(io.BytesIO(r.content)).size == (256, 256)


def test_same_seed_same_bytes_and_cache(server):
    data = {"num_inference_steps": "1", "seed": "7", "noise_level": "0.25"}
    first = upscale(server, data=data)
    second = upscale(server, data=data)
    assert first.status_code == second.status_code == 200
    assert first.headers["X-Cache"] == "MISS" and second.headers["X-Cache"] == "HIT"
    assert first.content == second.content
    assert second.headers["X-Inference-Time-Ms"] == "0"
    # the same pixels in another file format hit the same entry
    webp = image_bytes("WEBP", lossless=True)
    assert upscale(server, img=webp, data=data).content == first.content
    assert "sdx4_cache_hits_total 2" in server.get("/metrics").text
    # without a seed nothing is cached, and the seed is told
    r = upscale(server, data={"num_inference_steps": "1"})
    assert r.headers["X-Cache"] == "BYPASS" and int(r.headers["X-Seed"]) < 2 ** 53


def test_upscale_equals_cli(server, tmp_path):
    src = tmp_path / "in.png"
    src.write_bytes(image_bytes(seed=3))
    out = tmp_path / "out.png"
    subprocess.run([SDX4, "upscale", "--model", MODEL, "--steps", "1", "--seed", "1234",
                    "--prompt", "a red car", "--noise-level", "0.1", "--guidance", "5",
                    str(src), str(out)], check=True, capture_output=True, timeout=300)
    r = upscale(server, img=src.read_bytes(), data={"num_inference_steps": "1", "seed": "1234",
                                                     "prompt": "a red car", "noise_level": "0.1",
                                                     "guidance_scale": "5"})
    assert r.status_code == 200
    assert r.content == out.read_bytes()


def test_json_body_base64_and_data_url(server):
    img = image_bytes()
    body = {"image": base64.b64encode(img).decode(), "num_inference_steps": 1, "seed": 42}
    r = server.post(UPSCALE, json=body)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"
    direct = upscale(server, img=img)
    assert r.content == direct.content
    body["image"] = "data:image/png;base64," + base64.b64encode(img).decode()
    assert server.post(UPSCALE, json=body).content == direct.content
    body["image"] = base64.urlsafe_b64encode(img).decode().rstrip("=")
    assert server.post(UPSCALE, json=body).content == direct.content


def test_output_formats_and_accept(server):
    r = upscale(server, data={**FAST, "output_format": "jpeg", "quality": "80"})
    assert r.headers["Content-Type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"
    r = upscale(server, headers={"Accept": "image/webp"})
    assert r.headers["Content-Type"] == "image/webp" and r.content[8:12] == b"WEBP"
    r = upscale(server, headers={"Accept": "image/avif, image/jpeg;q=0.5, image/png;q=0.9"})
    assert r.headers["Content-Type"] == "image/png"
    problem(upscale(server, headers={"Accept": "text/html"}), 406, "not-acceptable")


def test_input_kinds(server):
    """Grey, palette, alpha, 16-bit and JPEG inputs are all converted to RGB."""
    for img in (image_bytes(mode="L"), image_bytes(mode="P"), image_bytes(mode="RGBA"),
                image_bytes("JPEG", quality=90), image_bytes(mode="I;16")):
        r = upscale(server, img=img, data={"num_inference_steps": "1", "seed": "1"})
        assert r.status_code == 200, r.text
        assert r.headers["X-Output-Size"] == "256x256"
    r = upscale(server, img=image_bytes(size=(64, 96)))
    assert r.headers["X-Input-Size"] == "64x96" and r.headers["X-Output-Size"] == "256x384"
    cmyk = image_bytes("JPEG", mode="CMYK")
    assert upscale(server, img=cmyk).headers["X-Output-Size"] == "256x256"
    # EXIF orientation 6 (rotate 90 degrees): a 64x96 file is a 96x64 picture
    from PIL import Image
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = image_bytes("JPEG", size=(64, 96), exif=exif.tobytes())
    assert upscale(server, img=rotated).headers["X-Input-Size"] == "96x64"


def test_long_prompt_is_truncated_and_said(server):
    r = upscale(server, data={**FAST, "prompt": "a photo of a very small cat " * 30})
    assert r.status_code == 200
    assert r.headers["X-Prompt-Truncated"] == "true" and int(r.headers["X-Prompt-Tokens"]) > 77


# ---- upscale: refusals ------------------------------------------------------

def test_wrong_magic(server):
    p = problem(upscale(server, img=b"<html>not an image</html>" * 10), 415, "unsupported-image-format")
    assert "PNG, JPEG or WebP" in p["detail"]
    # the name and content type of the part do not matter, only the bytes
    r = server.post(UPSCALE, files={"image": ("x.gif", image_bytes(), "image/gif")}, data=FAST)
    assert r.status_code == 200


def test_truncated_images(server):
    png = image_bytes()
    problem(upscale(server, img=png[: len(png) // 2]), 422, "invalid-image")
    jpeg = image_bytes("JPEG")
    problem(upscale(server, img=jpeg[: len(jpeg) // 2]), 422, "invalid-image")
    problem(upscale(server, img=png[:20]), 422, "invalid-image")


def test_sizes_from_the_header(server):
    problem(upscale(server, img=png_claiming(0, 0)), 422, "invalid-image")
    p = problem(upscale(server, img=png_claiming(100000, 100000)), 422, "image-size")
    assert p["field"] == "image" and "64" in p["allowed"] and "512" in p["allowed"]
    problem(upscale(server, img=image_bytes(size=(63, 64))), 422, "image-size")
    problem(upscale(server, img=image_bytes(size=(64, 513))), 422, "image-size")
    # a bomb costs nothing: refused long before a decode could have finished
    t0 = time.time()
    problem(upscale(server, img=png_claiming(60000, 60000)), 422, "image-size")
    assert time.time() - t0 < 2


def test_missing_image(server):
    problem(server.post(UPSCALE, files={"prompt": (None, "x")}), 422, "missing-image")
    problem(server.post(UPSCALE, json={"prompt": "x"}), 422, "missing-image")
    problem(upscale(server, img=b""), 422, "missing-image")


def test_bad_numbers(server):
    cases = {
        "noise_level": ["nan", "NaN", "inf", "-inf", "-0.1", "1.5", "abc", "", "0x1p-2", "1e400", " 0.5"],
        "num_inference_steps": ["0", "-1", "151", "2.5", "ten", "1e2", "99999999999999999999"],
        "guidance_scale": ["-1", "51", "nan", "Infinity"],
        "eta": ["-0.5", "2", "nan"],
        "seed": ["-1", "1.5", "9223372036854775808", "abc", "0x10"],
        "quality": ["0", "101", "50.5"],
    }
    for field, values in cases.items():
        for value in values:
            p = problem(upscale(server, data={field: value}), 422, "invalid-field")
            assert p["field"] == field, (field, value, p)
            assert p["allowed"], p
    p = problem(server.post(UPSCALE, json={"noise_level": "0.5", "image": "x"}), 422, "invalid-field")
    assert p["field"] == "noise_level"
    p = problem(server.post(UPSCALE, json={"num_inference_steps": 2.5, "image": "x"}), 422, "invalid-field")
    assert p["field"] == "num_inference_steps" and p["allowed"] == "1 to 150"
    problem(upscale(server, data={"output_format": "gif"}), 422, "invalid-field")


def test_bad_text(server):
    p = problem(upscale(server, data={"prompt": b"caf\xe9"}), 422, "invalid-field")
    assert p["field"] == "prompt" and "UTF-8" in p["detail"]
    p = problem(upscale(server, data={"negative_prompt": b"\xed\xa0\x80"}), 422, "invalid-field")  # a surrogate
    assert p["field"] == "negative_prompt"
    p = problem(upscale(server, data={"prompt": "bell \x07"}), 422, "invalid-field")
    assert "control" in p["detail"]
    p = problem(upscale(server, data={"prompt": "x" * 1001}), 422, "invalid-field")
    assert p["allowed"] == "at most 1000 characters"
    # tabs and newlines are fine (they become spaces)
    assert upscale(server, data={**FAST, "prompt": "a\tcat\r\non a mat"}).status_code == 200


def test_bad_fields(server):
    p = problem(upscale(server, data={**FAST, "steps": "3"}), 422, "invalid-field")
    assert p["field"] == "steps" and "unknown" in p["detail"]
    files = [("image", ("a.png", image_bytes(), "image/png")), ("seed", (None, "1")), ("seed", (None, "2"))]
    problem(server.post(UPSCALE, files=files), 422, "invalid-field")
    files = [("image", ("a.png", image_bytes(), "image/png")), ("image", ("b.png", image_bytes(), "image/png"))]
    problem(server.post(UPSCALE, files=files), 422, "invalid-field")
    problem(upscale(server, data={**FAST, "webhook_url": "http://x.example"}), 422, "invalid-field")
    # query values are fields too
    problem(server.post(UPSCALE + "?noise_level=7", files={"image": image_bytes()}), 422, "invalid-field")


def test_wrong_content_type_and_malformed_bodies(server):
    problem(server.post(UPSCALE, data=image_bytes(), headers={"Content-Type": "image/png"}), 415,
            "unsupported-content-type")
    problem(server.post(UPSCALE, data=b"a=b", headers={"Content-Type": "application/x-www-form-urlencoded"}), 415,
            "unsupported-content-type")
    r = requests.post(server.url + UPSCALE, data=b"{}", timeout=10, headers={"Content-Type": ""})
    problem(r, 415, "unsupported-content-type")
    problem(server.post(UPSCALE, data=b'{"image": ', headers={"Content-Type": "application/json"}), 400,
            "malformed-request")
    problem(server.post(UPSCALE, data=b'["image"]', headers={"Content-Type": "application/json"}), 400,
            "malformed-request")
    problem(server.post(UPSCALE, data=b'{"image": "a", "image": "b"}', headers={"Content-Type": "application/json"}),
            400, "malformed-request")
    problem(server.post(UPSCALE, data=b"--x\r\n", headers={"Content-Type": "multipart/form-data"}), 400,
            "malformed-request")
    problem(server.post(UPSCALE, json={"image": "***"}), 422, "invalid-field")
    problem(server.post(UPSCALE, json={"image": "data:image/png,abc"}), 422, "invalid-field")


def raw_request(server, head, body_chunks=(), read_timeout=10):
    """Sends a request by hand and returns (status, headers+body text)."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=read_timeout)
    try:
        s.sendall(head)
        for chunk in body_chunks:
            try:
                s.sendall(chunk)
            except OSError:
                break  # the server answered and closed: fine
        data = b""
        while True:
            try:
                got = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not got:
                break
            data += got
            head, sep, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
            if sep and length and len(body) >= int(length.group(1)):
                break  # the whole answer, on a connection kept open (the body was read to its end)
        return int(data.split(b" ", 2)[1]), data.decode("latin-1")
    finally:
        s.close()


def test_upload_limit_before_and_while_receiving(server):
    size = 11 * 1000 * 1000
    head = (f"POST {UPSCALE} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    # the announced size is refused before a byte of the body is read
    status, text = raw_request(server, head)
    assert status == 413 and "payload-too-large" in text
    # with Expect: 100-continue the client never even sends it
    status, text = raw_request(server, head.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"))
    assert status == 413 and "100 Continue" not in text
    # a chunked body is counted while it streams: nothing past the limit is kept
    head = (f"POST {UPSCALE} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=BB\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    part = b"--BB\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n" + b"\0" * 1_000_000
    chunks = [b"%x\r\n%s\r\n" % (len(part), part)] + [b"%x\r\n%s\r\n" % (1_000_000, b"\0" * 1_000_000)] * 10 + [b"0\r\n\r\n"]
    status, text = raw_request(server, head, chunks)
    assert status == 413 and "payload-too-large" in text
    # a body that goes on far past the limit is cut off
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(head)
    sent = 0
    try:
        while sent < 100_000_000:
            s.sendall(b"%x\r\n%s\r\n" % (1_000_000, b"\0" * 1_000_000))
            sent += 1_000_000
        answer = s.recv(100)
    except (BrokenPipeError, ConnectionResetError):
        answer = b""
    s.close()
    assert answer == b"" and sent < 30_000_000
    # and with a real client the same
    r = server.post(UPSCALE, files={"image": ("big.png", b"\0" * size)}, data=FAST)
    problem(r, 413, "payload-too-large")
    assert server.get("/api/v1/health").status_code == 200


# ---- batch --------------------------------------------------------------------

def test_batch_multipart_shared_and_per_image(server):
    files = [("image", ("a.png", image_bytes(), "image/png")),
             ("image", ("b.txt", b"not an image at all", "text/plain")),
             ("image", ("c.png", image_bytes(seed=9), "image/png"))]
    r = server.post("/api/v1/batch-upscale", files=files,
                    data={"num_inference_steps": "1", "seed": "42", "seed[2]": "5", "output_format[2]": "jpeg"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["count"] == 3 and [e["index"] for e in out["results"]] == [0, 1, 2]
    a, b, c = out["results"]
    assert a["status"] == 200 and a["seed"] == 42 and a["content_type"] == "image/png"
    assert base64.b64decode(a["image"]) == upscale(server).content  # same as the single upscale
    assert b["status"] == 415 and b["error"]["type"] == "urn:sdx4:problem:unsupported-image-format"
    assert c["status"] == 200 and c["seed"] == 5 and c["content_type"] == "image/jpeg"
    assert base64.b64decode(c["image"])[:2] == b"\xff\xd8"


def test_batch_json_and_limits(server):
    img = base64.b64encode(image_bytes()).decode()
    r = server.post("/api/v1/batch-upscale", json={"images": [img, {"image": img, "seed": 3}],
                                                    "num_inference_steps": 1, "seed": 42})
    assert r.status_code == 200
    a, b = r.json()["results"]
    assert a["seed"] == 42 and b["seed"] == 3 and a["status"] == b["status"] == 200
    problem(server.post("/api/v1/batch-upscale", json={"images": [img] * 9}), 422, "invalid-field")
    problem(server.post("/api/v1/batch-upscale", json={"images": []}), 422, "missing-image")
    problem(server.post("/api/v1/batch-upscale", json={"images": [img], "seed[3]": 1}), 422, "invalid-field")
    files = [("image", ("a.png", image_bytes(), "image/png")), ("seed[1]", (None, "1"))]
    problem(server.post("/api/v1/batch-upscale", files=files), 422, "invalid-field")
    problem(server.post("/api/v1/batch-upscale", json={"images": [img], "webhook_url": "http://127.0.0.1:1/"}), 422,
            "invalid-field")


def test_batch_async_is_a_job(server):
    img = base64.b64encode(image_bytes()).decode()
    r = server.post("/api/v1/batch-upscale?async=true", json={"images": [img, img], "num_inference_steps": 1})
    assert r.status_code == 202
    job = r.json()
    assert job["kind"] == "batch" and job["images"] == 2 and r.headers["Location"] == job["links"]["self"]
    final = wait_job(server, job["id"])
    assert final["status"] == "succeeded" and final["progress"] == {"step": 2, "total": 2}
    result = server.get(job["links"]["result"]).json()
    assert [e["status"] for e in result["results"]] == [200, 200]


# ---- jobs ---------------------------------------------------------------------

def test_job_lifecycle_and_sse(server):
    r = server.post("/api/v1/jobs", files={"image": image_bytes()},
                    data={"num_inference_steps": "3", "seed": "11"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running") and len(job["id"]) == 32
    assert job["links"]["events"] == f"/api/v1/jobs/{job['id']}/events"
    events = []
    with requests.get(server.url + job["links"]["events"], stream=True, timeout=120) as stream:
        assert stream.headers["Content-Type"] == "text/event-stream"
        name = None
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    names = [n for n, _ in events]
    assert names[-1] == "succeeded" and names.count("succeeded") == 1
    steps = [d["progress"]["step"] for n, d in events if n == "running"]
    assert steps == sorted(steps) and events[-1][1]["progress"] == {"step": 3, "total": 3}
    final = server.get(job["links"]["self"]).json()
    assert final["status"] == "succeeded" and final["timings"]["inference_ms"] > 0
    assert final["created_at"] <= final["started_at"] <= final["finished_at"]
    result = server.get(job["links"]["result"])
    assert result.status_code == 200 and result.headers["X-Seed"] == "11"
    sync = upscale(server, data={"num_inference_steps": "3", "seed": "11"})
    assert result.content == sync.content
    # a finished stream replays the final state
    late = server.get(job["links"]["events"]).text
    assert "event: succeeded" in late


def test_job_cancel_between_steps(server):
    r = server.post("/api/v1/jobs", files={"image": image_bytes()}, data={"num_inference_steps": "150"})
    job = r.json()
    deadline = time.time() + 60
    while server.get(job["links"]["self"]).json()["progress"]["step"] < 1 and time.time() < deadline:
        time.sleep(0.05)
    problem(server.get(job["links"]["result"]), 409, "job-not-finished")
    r = server.delete(job["links"]["self"])
    assert r.status_code == 200
    canceled = r.json()
    assert canceled["status"] == "canceled" and canceled["error"]["type"] == "urn:sdx4:problem:canceled"
    assert canceled["progress"]["step"] < 150
    # the job is forgotten, and its worker is free again at once
    problem(server.get(job["links"]["self"]), 404, "not-found")
    problem(server.delete(job["links"]["self"]), 404, "not-found")
    deadline = time.time() + 30
    while server.get("/api/v1/health").json()["queue"]["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert server.get("/api/v1/health").json()["queue"]["running"] == 0


def test_job_webhook_signed(server):
    import http.server
    import threading
    received = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            # the first call fails: the server must retry
            self.send_response(500 if len(received) == 1 else 204)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/hook"
        r = server.post("/api/v1/jobs", files={"image": image_bytes()},
                        data={"num_inference_steps": "1", "seed": "5", "webhook_url": url})
        job = r.json()
        deadline = time.time() + 30
        while len(received) < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert len(received) == 2
        for headers, body in received:
            t, v1 = headers["X-Sdx4-Signature"].split(",")
            t = t.removeprefix("t=")
            expected = __import__("hmac").new(b"hook-secret", t.encode() + b"." + body, hashlib.sha256).hexdigest()
            assert v1 == "v1=" + expected
            assert abs(int(t) - time.time()) < 60
            assert headers["X-Sdx4-Event"] == "job.succeeded" and headers["X-Sdx4-Delivery"] == job["id"]
            assert json.loads(body)["id"] == job["id"] and json.loads(body)["status"] == "succeeded"
        deadline = time.time() + 10
        while server.get(job["links"]["self"]).json()["webhook"]["status"] != "delivered" and time.time() < deadline:
            time.sleep(0.05)
        assert server.get(job["links"]["self"]).json()["webhook"] == {"status": "delivered", "attempts": 2}
    finally:
        httpd.shutdown()


def test_job_errors(server):
    problem(server.get("/api/v1/jobs/" + "0" * 32), 404, "not-found")
    problem(server.get("/api/v1/jobs/" + "0" * 32 + "/result"), 404, "not-found")
    problem(server.get("/api/v1/jobs/" + "0" * 32 + "/events"), 404, "not-found")
    problem(server.post("/api/v1/jobs", files={"image": b"junk"}), 415, "unsupported-image-format")
    problem(server.post("/api/v1/jobs", files={"image": image_bytes()}, data={"webhook_url": "ftp://x"}), 422,
            "invalid-field")
