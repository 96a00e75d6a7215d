"""The API's vae_tiling field on a running server: "on" decodes in tiles
and changes the image (the tiny model's tiles are 8 latents, so a 64 px
input is 11 x 11 tiles), the choice is part of the cache key ("auto", the
default, the same key as no choice), per-image values in a batch, and bad
values refused naming the choices. The decode itself is held to diffusers'
tiled_decode by tests/test_vae_tiling.c."""
import base64

from conftest import Server, image_bytes, problem

UPSCALE = "/api/v1/upscale"
PARAMS = {"num_inference_steps": "1", "seed": "11"}


def upscale(s, img, extra):
    return s.post(UPSCALE, files={"image": ("in.png", img, "image/png")}, data={**PARAMS, **extra},
                  timeout=300)


def test_tiling_changes_the_image_and_the_cache_key():
    s = Server()
    try:
        png = image_bytes(seed=3)
        base = upscale(s, png, {})  # auto: the tiny decode is far below the budget, so whole
        assert base.status_code == 200 and base.headers["X-Cache"] == "MISS", base.text
        off = upscale(s, png, {"vae_tiling": "off"})
        assert off.status_code == 200 and off.headers["X-Cache"] == "MISS" and off.content == base.content
        assert upscale(s, png, {"vae_tiling": "auto"}).headers["X-Cache"] == "HIT"
        on = upscale(s, png, {"vae_tiling": "on"})
        assert on.status_code == 200 and on.headers["X-Cache"] == "MISS" and on.content != base.content
        body = {"image": base64.b64encode(png).decode(), "num_inference_steps": 1, "seed": 11, "vae_tiling": "on"}
        again = s.post(UPSCALE, json=body, timeout=300)
        assert again.headers["X-Cache"] == "HIT" and again.content == on.content
        # per image in a batch
        files = [("image", ("a.png", png, "image/png")), ("image", ("b.png", png, "image/png"))]
        r = s.post("/api/v1/batch-upscale", files=files, data={**PARAMS, "vae_tiling[1]": "on"}, timeout=300)
        assert r.status_code == 200, r.text
        a, b = r.json()["results"]
        assert base64.b64decode(a["image"]) == base.content and base64.b64decode(b["image"]) == on.content
    finally:
        s.check_clean_exit()


def test_bad_values_are_refused_by_name(server):
    png = image_bytes()
    for value in ("sideways", "ON", ""):
        p = problem(upscale(server, png, {"vae_tiling": value}), 422, "invalid-field")
        assert p["field"] == "vae_tiling" and p["allowed"] == "off, on or auto", p
    p = problem(server.post(UPSCALE, json={"image": base64.b64encode(png).decode(), "vae_tiling": True}), 422,
                "invalid-field")
    assert p["field"] == "vae_tiling"
    described = next(p for p in server.get("/api/v1/model-info").json()["upscale_parameters"]
                     if p["name"] == "vae_tiling")
    assert described["enum"] == ["off", "on", "auto"] and described["default"] == "auto"
