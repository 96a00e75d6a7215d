"""AUTOMATIC1111's upscaling routes (src/server/a1111.c): GET /sdapi/v1/upscalers,
POST /sdapi/v1/extra-single-image and /sdapi/v1/extra-batch-images, as its
clients call them. One server for the module: the tiny diffusion model (the
default, "model") and the two small GANs of tests/data/gan (rrdb_x4, 4x;
srvgg_x2_relu, 2x), with an API key; the upscales are GAN ones on 64 to 80
px inputs, a fraction of a second each."""
import base64
import copy
import io
import json
import os

import pytest
from PIL import Image

from conftest import ROOT, Server, image_bytes, problem

GAN = os.path.join(ROOT, "tests", "data", "gan")
KEY = {"Authorization": "Bearer a1111-key"}
SINGLE = "/sdapi/v1/extra-single-image"
BATCH = "/sdapi/v1/extra-batch-images"


@pytest.fixture(scope="module")
def a1111():
    s = Server("--model", os.path.join(GAN, "rrdb_x4"), "--model", os.path.join(GAN, "srvgg_x2_relu"),
               "--api-keys", "a1111-key")
    yield s
    s.check_clean_exit()


def b64(data):
    return base64.b64encode(data).decode()


def single(s, img, **fields):
    return s.post(SINGLE, json=dict({"image": b64(img)}, **fields), headers=KEY)


def decoded(text):
    """A base64 PNG of an answer: its bytes and size."""
    data = base64.b64decode(text)
    assert data.startswith(b"\x89PNG")
    return data, Image.open(io.BytesIO(data)).size


def test_upscalers_are_the_models(a1111):
    r = a1111.get("/sdapi/v1/upscalers", headers=KEY)
    assert r.status_code == 200, r.text
    assert r.json() == [
        {"name": "model", "model_name": "StableDiffusionUpscalePipeline", "model_path": None, "model_url": None,
         "scale": 4.0},
        {"name": "rrdb_x4", "model_name": "RRDBNet", "model_path": None, "model_url": None, "scale": 4.0},
        {"name": "srvgg_x2_relu", "model_name": "SRVGGNetCompact", "model_path": None, "model_url": None,
         "scale": 2.0}]
    problem(a1111.get("/sdapi/v1/upscalers"), 401, "unauthorized")  # the native routes' keys


def test_single_image_at_the_models_scale_is_the_native_upscale(a1111):
    img = image_bytes(size=(80, 64), seed=1)
    native = a1111.post("/api/v1/upscale", files={"image": ("in.png", img, "image/png")}, data={"model": "rrdb_x4"},
                        headers=KEY)
    assert native.status_code == 200
    r = single(a1111, img, upscaler_1="rrdb_x4", upscaling_resize=4)
    assert r.status_code == 200, r.text[:300]
    assert r.headers["Content-Type"] == "application/json"
    doc = r.json()
    assert set(doc) == {"html_info", "image"}
    assert doc["html_info"] == "<p>Postprocess upscale by: 4.0, Postprocess upscaler: rrdb_x4</p>"
    data, size = decoded(doc["image"])
    assert size == (320, 256) and data == native.content
    # A1111's default factor, 2: the model's output resized to half (Lanczos-3)
    r = single(a1111, img, upscaler_1="rrdb_x4")
    data, size = decoded(r.json()["image"])
    assert size == (160, 128)
    expected = Image.open(io.BytesIO(native.content)).resize((160, 128), Image.LANCZOS)
    got = Image.open(io.BytesIO(data))
    diffs = [abs(a - b) for a, b in zip(got.tobytes(), expected.tobytes())]
    # libvips' Lanczos-3 and Pillow's differ in rounding and at the edges (4 and 0.12 here)
    assert max(diffs) <= 8 and sum(diffs) / len(diffs) < 0.5, (max(diffs), sum(diffs) / len(diffs))
    # a factor above the model's scale: once through the model, then enlarged; int(side x factor)
    r = single(a1111, img, upscaler_1="srvgg_x2_relu", upscaling_resize=2.3)
    assert decoded(r.json()["image"])[1] == (int(80 * 2.3), int(64 * 2.3)) == (184, 147)
    assert r.json()["html_info"] == "<p>Postprocess upscale by: 2.3, Postprocess upscaler: srvgg_x2_relu</p>"


def test_data_url_and_the_default_model(a1111):
    img = image_bytes(size=(64, 64), seed=2)
    bare = single(a1111, img, upscaler_1="srvgg_x2_relu", upscaling_resize=2)
    url = a1111.post(SINGLE, json={"image": "data:image/png;base64," + b64(img), "upscaler_1": "srvgg_x2_relu",
                                   "upscaling_resize": 2}, headers=KEY)
    assert bare.status_code == url.status_code == 200
    assert url.json()["image"] == bare.json()["image"]
    # what A1111's clients send with it: neutral values of what sdx4 does not do
    full = {"image": b64(img), "resize_mode": 0, "show_extras_results": False, "gfpgan_visibility": 0,
            "codeformer_visibility": 0, "codeformer_weight": 0.5, "upscaling_resize": 2, "upscaling_resize_w": 512,
            "upscaling_resize_h": 512, "upscaling_crop": True, "upscaler_1": "srvgg_x2_relu", "upscaler_2": "None",
            "extras_upscaler_2_visibility": 0.7, "upscale_first": False}
    r = a1111.post(SINGLE, json=full, headers=KEY)
    assert r.status_code == 200 and r.json()["image"] == bare.json()["image"]
    # no Content-Type: read as JSON, as A1111's FastAPI does
    r = a1111.post(SINGLE, data=json.dumps(full), headers=KEY)
    assert "Content-Type" not in r.request.headers
    assert r.status_code == 200, r.text[:300]


def test_resize_to_a_size(a1111):
    img = image_bytes(size=(80, 64), seed=3)
    # scaled by max(100/80, 100/64): 125 x 100, then its centre 100 x 100
    r = single(a1111, img, upscaler_1="rrdb_x4", resize_mode=1, upscaling_resize_w=100, upscaling_resize_h=100)
    assert r.status_code == 200, r.text[:300]
    assert decoded(r.json()["image"])[1] == (100, 100)
    assert r.json()["html_info"] == ("<p>Postprocess upscale to: 100x100, Postprocess crop to: 100x100, "
                                     "Postprocess upscaler: rrdb_x4</p>")
    uncropped = single(a1111, img, upscaler_1="rrdb_x4", resize_mode=1, upscaling_resize_w=100,
                       upscaling_resize_h=100, upscaling_crop=False)
    wide, size = decoded(uncropped.json()["image"])
    assert size == (125, 100)
    left = 125 // 2 - 100 // 2
    assert Image.open(io.BytesIO(wide)).crop((left, 0, left + 100, 100)).tobytes() == \
        Image.open(io.BytesIO(decoded(r.json()["image"])[0])).tobytes()
    # too large for the server: 8 x --max-side (4096) per side
    p = problem(single(a1111, img, upscaler_1="rrdb_x4", resize_mode=1, upscaling_resize_w=4097,
                       upscaling_resize_h=1), 422, "invalid-field")
    assert p["field"] == "upscaling_resize_w" and "4097x3277" in p["detail"], p


def test_batch_of_two(a1111):
    imgs = [image_bytes(size=(64, 64), seed=4), image_bytes(size=(72, 64), seed=5)]
    body = {"imageList": [{"data": b64(imgs[0]), "name": "a.png"}, {"data": "data:image/png;base64," + b64(imgs[1]),
                                                                    "name": "b.png"}],
            "upscaler_1": "srvgg_x2_relu", "upscaling_resize": 2}
    r = a1111.post(BATCH, json=body, headers=KEY)
    assert r.status_code == 200, r.text[:300]
    doc = r.json()
    assert set(doc) == {"html_info", "images"} and len(doc["images"]) == 2
    for img, text in zip(imgs, doc["images"]):
        native = a1111.post("/api/v1/upscale", json={"image": b64(img), "model": "srvgg_x2_relu"}, headers=KEY)
        assert decoded(text)[0] == native.content
    # one bad image answers for the batch, named by its place
    body["imageList"][1]["data"] = b64(image_bytes(size=(32, 64)))
    p = problem(a1111.post(BATCH, json=body, headers=KEY), 422, "image-size")
    assert p["field"] == "imageList[1].data" and p["detail"].startswith("imageList[1]: the image is 32x64"), p
    p = problem(a1111.post(BATCH, json=dict(body, imageList=[{"data": "!!!", "name": "x"}]), headers=KEY), 422,
                "invalid-field")
    assert p["field"] == "imageList[0].data" and "not valid base64" in p["detail"], p


def test_refusals_are_the_native_ones(a1111):
    img = image_bytes(seed=6)
    # the same problem as POST /api/v1/upscale for the same image field
    for bad in ("!!!", "data:image/png,abc", b64(b"GIF89a" + b"\0" * 40), b64(image_bytes(size=(32, 32)))):
        native = a1111.post("/api/v1/upscale", json={"image": bad}, headers=KEY)
        mine = a1111.post(SINGLE, json={"image": bad, "upscaler_1": "rrdb_x4"}, headers=KEY)
        assert mine.status_code == native.status_code >= 400
        a, b = native.json(), mine.json()
        for k in ("type", "detail", "field", "allowed"):
            assert a.get(k) == b.get(k), (k, a, b)
    problem(a1111.post(SINGLE, json={"image": b64(img)}), 401, "unauthorized")
    problem(a1111.post(SINGLE, files={"image": ("in.png", img, "image/png")}, headers=KEY), 415,
            "unsupported-content-type")
    problem(a1111.post(SINGLE, data="{", headers=dict(KEY, **{"Content-Type": "application/json"})), 400,
            "malformed-request")
    problem(a1111.post(SINGLE, json={"upscaler_1": "rrdb_x4"}, headers=KEY), 422, "missing-image")
    p = problem(a1111.post(SINGLE + "?model=rrdb_x4", json={"image": b64(img)}, headers=KEY), 422, "invalid-field")
    assert p["field"] == "model", p
    p = problem(a1111.get(SINGLE, headers=KEY), 405, "method-not-allowed")


@pytest.mark.parametrize("fields, field, words", [
    ({"upscaler_1": "R-ESRGAN 4x+"}, "upscaler_1", "rrdb_x4"),
    ({"upscaler_1": "None"}, "upscaler_1", "upscales nothing"),
    ({"upscaler_2": "Lanczos"}, "upscaler_2", "unknown upscaler"),
    ({"gfpgan_visibility": 0.5}, "gfpgan_visibility", "GFPGAN"),
    ({"codeformer_visibility": 1}, "codeformer_visibility", "CodeFormer"),
    ({"upscaler_2": "srvgg_x2_relu", "extras_upscaler_2_visibility": 0.3}, "extras_upscaler_2_visibility",
     "blends no second upscaler"),
    ({"gfpgan_visibility": 1.5}, "gfpgan_visibility", "from 0 to 1"),
    ({"upscaling_resize": 0}, "upscaling_resize", "above 0"),
    ({"upscaling_resize": 8.5}, "upscaling_resize", "at most 8"),
    ({"upscaling_resize": "2"}, "upscaling_resize", "a number"),
    ({"resize_mode": 2}, "resize_mode", "0 or 1"),
    ({"upscaling_resize_w": 0}, "upscaling_resize_w", "from 1"),
    ({"upscaling_crop": 1}, "upscaling_crop", "true or false"),
    ({"steps": 20}, "steps", "unknown field"),
    ({"imageList": []}, "imageList", "unknown field"),
])
def test_what_sdx4_cannot_do_is_refused(a1111, fields, field, words):
    p = problem(single(a1111, image_bytes(seed=7), **dict({"upscaler_1": "rrdb_x4"}, **fields)), 422,
                "invalid-field")
    assert p["field"] == field and words in p["detail"] + " " + (p.get("allowed") or ""), p


def test_openapi_examples(a1111):
    """The API description's examples, with upscaler_1 a model this server has."""
    doc = a1111.get("/openapi.json").json()
    for path in (SINGLE, BATCH):
        body = copy.deepcopy(doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"])
        assert body["upscaler_1"] == "realesrgan-x4plus"
        p = problem(a1111.post(path, json=body, headers=KEY), 422, "invalid-field")
        assert p["field"] == "upscaler_1"
        body["upscaler_1"] = "rrdb_x4"
        r = a1111.post(path, json=body, headers=KEY)
        assert r.status_code == 200, (path, r.text[:300])
    assert [m["name"] for m in a1111.get("/sdapi/v1/upscalers", headers=KEY).json()][1:] == ["rrdb_x4",
                                                                                             "srvgg_x2_relu"]
    metrics = a1111.get("/metrics", headers=KEY).text
    assert 'sdx4_http_requests_total{route="a1111_extra_single_image",status="200"}' in metrics
