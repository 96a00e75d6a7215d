"""The result cache's two keys: a seeded repeat of the same upload is found
by the upload's bytes without decoding it, the same pixels in another file
by the decoded pixels; parameters are part of both keys, refusals come
before either, and links and results share one byte budget. Each test runs
its own server, so that the cache counters start at zero (see conftest.py)."""
import base64
import re

from conftest import Server, image_bytes, problem

UPSCALE = "/api/v1/upscale"
PARAMS = {"num_inference_steps": "1", "seed": "11"}


def upscale(s, img, data=PARAMS):
    return s.post(UPSCALE, files={"image": ("in.png", img, "image/png")}, data=data, timeout=300)


def cache_metrics(s):
    """The sdx4_cache_* samples of /metrics, by name without the prefix."""
    text = s.get("/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(r"^sdx4_cache_(\w+) (\S+)$", text, re.M)}


def test_repeat_upload_hits_without_decoding_and_other_files_by_pixels():
    s = Server()
    try:
        png = image_bytes(seed=5)
        first = upscale(s, png)
        assert first.status_code == 200 and first.headers["X-Cache"] == "MISS"
        m = cache_metrics(s)
        assert (m["misses_total"], m["hits_total"], m["entries"], m["links"]) == (1, 0, 1, 1)

        again = upscale(s, png)
        assert again.headers["X-Cache"] == "HIT" and again.content == first.content
        assert again.headers["X-Input-Size"] == "64x64" and again.headers["X-Output-Size"] == "256x256"
        assert again.headers["X-Inference-Time-Ms"] == "0"
        # the key is over the image's bytes, not the body's encoding of them
        body = {"image": base64.b64encode(png).decode(), "num_inference_steps": 1, "seed": 11}
        assert s.post(UPSCALE, json=body).content == first.content
        m = cache_metrics(s)
        assert (m["hits_total"], m["upload_hits_total"]) == (2, 2)

        # the same pixels in other files: found by the decoded pixels, then
        # linked, so that their own repeats skip decoding too
        others = [image_bytes(seed=5, compress_level=1), image_bytes("WEBP", seed=5, lossless=True)]
        assert len({png, *others}) == 3
        for n, img in enumerate(others, 1):
            r = upscale(s, img)
            assert r.headers["X-Cache"] == "HIT" and r.content == first.content
            assert cache_metrics(s)["upload_hits_total"] == 2 + n - 1
            assert upscale(s, img).content == first.content
            assert cache_metrics(s)["upload_hits_total"] == 2 + n
        m = cache_metrics(s)
        assert (m["hits_total"], m["misses_total"], m["entries"], m["links"]) == (6, 1, 1, 3)
    finally:
        s.check_clean_exit()


def test_every_parameter_is_part_of_the_upload_key():
    s = Server()
    try:
        png = image_bytes(seed=6)
        base = upscale(s, png)
        assert base.headers["X-Cache"] == "MISS"
        changes = [{"prompt": "a red car"}, {"negative_prompt": "blur"}, {"seed": "12"},
                   {"noise_level": "0.25"}, {"guidance_scale": "5"}, {"output_format": "jpeg"}]
        for n, change in enumerate(changes, 1):
            data = {**PARAMS, **change}
            r = upscale(s, png, data)
            # a miss even where the output happens to be the same (guidance
            # does nothing when prompt and negative prompt are both empty)
            assert r.status_code == 200 and r.headers["X-Cache"] == "MISS", change
            again = upscale(s, png, data)
            assert again.headers["X-Cache"] == "HIT" and again.content == r.content, change
            assert cache_metrics(s)["upload_hits_total"] == n
        # and the original parameters still find their own result
        assert upscale(s, png).content == base.content
        m = cache_metrics(s)
        assert (m["upload_hits_total"], m["misses_total"], m["links"]) == (len(changes) + 1, len(changes) + 1,
                                                                           len(changes) + 1)
    finally:
        s.check_clean_exit()


def test_refusals_come_before_the_cache():
    s = Server("--max-side", "64")
    try:
        png = image_bytes(seed=7, compress_level=0)  # stored: 12 kB, its pixels mid-file
        assert upscale(s, png).headers["X-Cache"] == "MISS"
        assert upscale(s, png).headers["X-Cache"] == "HIT"
        # bytes that differ from a cached upload are judged on their own,
        # each time: a cut-off copy, a corrupt pixel chunk, a wrong magic
        # (the corrupt byte lies mid-file: a key over the first bytes alone misses it)
        start = png.index(b"IDAT") + 4
        mid = start + int.from_bytes(png[start - 8:start - 4], "big") // 2
        assert mid > len(png) // 2
        corrupt = png[:mid] + bytes([png[mid] ^ 0xFF]) + png[mid + 1:]
        for _ in range(2):
            problem(upscale(s, png[: len(png) // 2]), 422, "invalid-image")
            problem(upscale(s, corrupt), 422, "invalid-image")
            problem(upscale(s, b"GIF89a" + png[6:]), 415, "unsupported-image-format")
            problem(upscale(s, image_bytes(seed=7, size=(64, 65))), 422, "image-size")
        # the other checks still run on a cached upload
        problem(upscale(s, png, {**PARAMS, "num_inference_steps": "0"}), 422, "invalid-field")
        problem(s.post(UPSCALE, files={"image": ("in.png", png, "image/png")}, data=PARAMS,
                       headers={"Accept": "text/html"}), 406, "not-acceptable")
        m = cache_metrics(s)
        assert (m["hits_total"], m["misses_total"], m["links"]) == (1, 1, 1)
    finally:
        s.check_clean_exit()


def test_links_and_results_share_the_byte_budget():
    # a budget too small for any result (over half of it): only links are
    # kept, and they are evicted to stay within it
    s = Server("--cache-size", "1024")
    try:
        for seed in range(12):
            assert upscale(s, image_bytes(seed=8), {**PARAMS, "seed": str(seed)}).status_code == 200
        m = cache_metrics(s)
        assert m["entries"] == 0 and 0 < m["links"] < 12
        assert 0 < m["bytes"] <= 1024
    finally:
        s.check_clean_exit()
    # room for three results of ~190 kB: the oldest go first
    s = Server("--cache-size", "600K")
    try:
        png = image_bytes(seed=9)
        for seed in range(5):
            assert upscale(s, png, {**PARAMS, "seed": str(seed)}).headers["X-Cache"] == "MISS"
        m = cache_metrics(s)
        assert m["entries"] == 3 and m["bytes"] <= 600 * 1024
        assert upscale(s, png, {**PARAMS, "seed": "4"}).headers["X-Cache"] == "HIT"
        assert upscale(s, png, {**PARAMS, "seed": "0"}).headers["X-Cache"] == "MISS"
        m = cache_metrics(s)
        assert m["upload_hits_total"] == 1 and m["entries"] == 3 and m["bytes"] <= 600 * 1024
    finally:
        s.check_clean_exit()
