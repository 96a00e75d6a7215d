"""The API's tile and tile_overlap fields (the tiled UNet) on a running
server: windows smaller than the image change it and the cache key, a tile
at least as large as the image gives the untiled bytes, tile 0 (automatic:
whole at these sizes) with the default overlap is the key of no tile at
all, per-image values in a batch, and bad values refused
naming the field. The windows and their blending are held to their rules
by tests/test_tiled_unet.c; the cost of tiled requests by
tests/test_server_cost.c."""
import base64

from conftest import Server, image_bytes, problem

UPSCALE = "/api/v1/upscale"
PARAMS = {"num_inference_steps": "1", "seed": "5"}


def upscale(s, img, extra):
    return s.post(UPSCALE, files={"image": ("in.png", img, "image/png")}, data={**PARAMS, **extra},
                  timeout=300)


def test_tiles_change_the_image_and_the_cache_key():
    s = Server()
    try:
        png = image_bytes(seed=7)  # 64 x 64
        base = upscale(s, png, {})
        assert base.status_code == 200 and base.headers["X-Cache"] == "MISS", base.text
        assert upscale(s, png, {"tile": "0", "tile_overlap": "32"}).headers["X-Cache"] == "HIT"
        # another overlap is a key of its own (automatic windows would use it), the same bytes here
        auto = upscale(s, png, {"tile": "0", "tile_overlap": "16"})
        assert auto.headers["X-Cache"] == "MISS" and auto.content == base.content
        tiled = upscale(s, png, {"tile": "32", "tile_overlap": "8"})
        assert tiled.status_code == 200 and tiled.headers["X-Cache"] == "MISS", tiled.text
        assert tiled.content != base.content
        whole = upscale(s, png, {"tile": "64"})  # one window: the untiled bytes, under a key of its own
        assert whole.status_code == 200 and whole.headers["X-Cache"] == "MISS" and whole.content == base.content
        body = {"image": base64.b64encode(png).decode(), "num_inference_steps": 1, "seed": 5, "tile": 32,
                "tile_overlap": 8}
        again = s.post(UPSCALE, json=body, timeout=300)
        assert again.headers["X-Cache"] == "HIT" and again.content == tiled.content
        # per image in a batch, the overlap shared
        files = [("image", ("a.png", png, "image/png")), ("image", ("b.png", png, "image/png"))]
        r = s.post("/api/v1/batch-upscale", files=files, data={**PARAMS, "tile_overlap": "8", "tile[1]": "32"},
                   timeout=300)
        assert r.status_code == 200, r.text
        a, b = r.json()["results"]
        assert base64.b64decode(a["image"]) == base.content and base64.b64decode(b["image"]) == tiled.content
    finally:
        s.check_clean_exit()


def test_bad_values_are_refused_by_name(server):
    png = image_bytes()
    cases = [({"tile": "16"}, "tile", "tile 16 is outside 32..2048"),
             ({"tile": "2049"}, "tile", None), ({"tile": "-1"}, "tile", None), ({"tile": "big"}, "tile", None),
             ({"tile": "64", "tile_overlap": "64"}, "tile_overlap", "tile_overlap 64 must be smaller than tile 64"),
             ({"tile": "64", "tile_overlap": "96"}, "tile_overlap", "tile_overlap 96 must be smaller than tile 64"),
             ({"tile": "32"}, "tile_overlap", "tile_overlap 32 must be smaller than tile 32 (32 is tile_overlap's "
              "default: give a smaller one, or a larger tile)"),
             ({"tile_overlap": "1025"}, "tile_overlap", None), ({"tile_overlap": "8.5"}, "tile_overlap", None)]
    for extra, field, detail in cases:
        p = problem(upscale(server, png, extra), 422, "invalid-field")
        assert p["field"] == field and (detail is None or detail in p["detail"]), (extra, p)
    for value in ("32", 32.5, True):
        p = problem(server.post(UPSCALE, json={"image": base64.b64encode(png).decode(), "tile": value}), 422,
                    "invalid-field")
        assert p["field"] == "tile", (value, p)
    files = [("image", ("a.png", png, "image/png")), ("image", ("b.png", png, "image/png"))]
    r = server.post("/api/v1/batch-upscale", files=files, data={"tile": "64", "tile_overlap[0]": "64"})
    assert problem(r, 422, "invalid-field")["field"] == "tile_overlap"

    described = {p["name"]: p for p in server.get("/api/v1/model-info").json()["upscale_parameters"]}
    assert {k: described["tile"][k] for k in ("type", "minimum", "maximum", "default")} == \
        {"type": "integer", "minimum": 0, "maximum": 2048, "default": 0}
    assert {k: described["tile_overlap"][k] for k in ("type", "minimum", "maximum", "default")} == \
        {"type": "integer", "minimum": 0, "maximum": 1024, "default": 32}
