"""Output metadata, opt-in (metadata=true): the parameters as AUTOMATIC1111
writes them (a PNG text chunk `parameters`, a GAN's `postprocessing` and
`extras`; EXIF UserComment in a JPEG or WebP) and the input's ICC profile,
read back with Pillow as A1111 reads them. Without it (the default, or
metadata=false) the bytes are those of a plain upscale, whatever the
input's profile; with it, the cache keeps the two apart, and so the same
pixels with another profile. The last test runs it through a cluster:
the worker encodes, so the flag and the profile travel with the task."""
import base64
import io
import os
import shutil
import subprocess

import pytest
from PIL import Image, ImageCms

from conftest import MODEL, ROOT, SDX4, RedisServer, Server, Worker, image_bytes, problem, wait_job

RRDB = os.path.join(ROOT, "tests", "data", "gan", "rrdb_x4")
UPSCALE = "/api/v1/upscale"
VERSION_PREFIX = "Version: sdx4 "
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.fixture(scope="module")
def server():
    s = Server("--model", RRDB, "--request-timeout", "120", "--max-prompt-chars", "40000")
    yield s
    s.check_clean_exit()


def with_profile(png, profile=SRGB):
    """The same picture, its profile embedded (Pillow writes iCCP)."""
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).save(out, "PNG", icc_profile=profile)
    return out.getvalue()


def upscale(s, img, **fields):
    fields = {"num_inference_steps": "1", "seed": "3", **fields}
    return s.post(UPSCALE, files={"image": ("in.png", img, "image/png")}, data=fields, timeout=300)


def opened(content):
    return Image.open(io.BytesIO(content))


def untagged(im):
    """No text chunk, UserComment or profile (libvips' resolution tags are
    not metadata of ours)."""
    texts = im.text if im.format == "PNG" else {}
    return texts == {} and 0x9286 not in im.getexif().get_ifd(0x8769) and "icc_profile" not in im.info


def infotext_pairs(text):
    """A1111's reading of the last line: "Key: value" pairs."""
    last = text.split("\n")[-1]
    return dict(item.split(": ", 1) for item in last.split(", "))


def user_comment(im):
    """EXIF UserComment as A1111 reads it (piexif's UserComment.load)."""
    raw = im.getexif().get_ifd(0x8769)[0x9286]
    assert raw[:8] == b"UNICODE\0", raw[:8]
    return raw[8:].decode("utf-16-be")


def test_png_parameters(server):
    png = image_bytes(seed=1)
    r = upscale(server, png, prompt="un chat \u00e9t\u00e9", negative_prompt="blurry", metadata="true",
                tile="32", tile_overlap="8", scheduler="euler-a")
    assert r.status_code == 200, r.text[:300]
    info = opened(r.content).info
    text = info["parameters"]
    assert "icc_profile" not in info  # the input had none
    lines = text.split("\n")
    assert lines[:2] == ["un chat \u00e9t\u00e9", "Negative prompt: blurry"], text
    pairs = infotext_pairs(text)
    assert pairs["Steps"] == "1" and pairs["Seed"] == "3" and pairs["Sampler"] == "euler-a", text
    assert pairs["Size"] == "256x256" and pairs["Input size"] == "64x64", text
    assert pairs["Model"] == "model" and pairs["CFG scale"] == "9" and pairs["Noise level"] == "0.2", text
    assert pairs["Model hash"] == r.headers["X-Model-Hash"][:10], text  # A1111's length of it
    assert pairs["Tile"] == "32" and pairs["Tile overlap"] == "8", text
    assert pairs["Version"].startswith("sdx4 ") and list(pairs)[-1] == "Version", text


def test_the_cli_writes_the_same_text(server, tmp_path):
    """`sdx4 upscale --metadata` says what the server says of the same
    upscale, the model's hash included."""
    fields = dict(prompt="a cat", negative_prompt="blurry", tile="32", tile_overlap="8", scheduler="euler-a")
    png = image_bytes(seed=1)
    r = upscale(server, png, metadata="true", **fields)
    assert r.status_code == 200, r.text[:300]
    (tmp_path / "in.png").write_bytes(png)
    cli = subprocess.run([SDX4, "upscale", "--metadata", "--model", MODEL, "--device", "cpu", "--steps", "1",
                          "--seed", "3"] + [a for k, v in fields.items() for a in ("--" + k.replace("_", "-"), v)]
                         + [str(tmp_path / "in.png"), str(tmp_path / "out.png")],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert Image.open(tmp_path / "out.png").info["parameters"] == opened(r.content).info["parameters"]


# The GAN upscales in a fraction of the diffusion model's time: the tests
# of what does not depend on the model's kind use it.

def gan(s, img, **fields):
    return upscale(s, img, model="rrdb_x4", **fields)


def test_a_gan_writes_what_a1111s_extras_tab_writes(server):
    r = gan(server, image_bytes(seed=3), metadata="true", prompt="ignored")
    assert r.status_code == 200, r.text[:300]
    info = opened(r.content).info
    assert "parameters" not in info
    assert info["postprocessing"] == info["extras"]
    assert info["postprocessing"].startswith(
        "Postprocess upscale by: 4, Postprocess upscaler: rrdb_x4, Model hash: " + r.headers["X-Model-Hash"][:10]
        + ", Size: 256x256, Input size: 64x64, " + VERSION_PREFIX), info


def test_off_by_default_and_the_profile_kept_only_when_asked(server):
    png = image_bytes(seed=2)
    tagged = with_profile(png)
    plain = gan(server, png)
    assert gan(server, png, metadata="false").content == plain.content  # the default, byte for byte
    assert untagged(opened(plain.content))
    plain_tagged = gan(server, tagged)
    assert plain_tagged.content == plain.content  # without metadata the profile changes nothing
    on = gan(server, tagged, metadata="true")
    im = opened(on.content)
    assert im.info["icc_profile"] == SRGB and "postprocessing" in im.info
    assert im.tobytes() == opened(plain.content).tobytes()  # the same pixels
    # JPEG and WebP: the profile, and the text as EXIF UserComment
    for fmt in ("jpeg", "webp"):
        r = gan(server, tagged, metadata="true", output_format=fmt)
        assert r.status_code == 200, r.text[:300]
        im = opened(r.content)
        assert im.info["icc_profile"] == SRGB, fmt
        comment = user_comment(im)
        assert comment.startswith("Postprocess upscale by: 4, Postprocess upscaler: rrdb_x4"), (fmt, comment)
        assert untagged(opened(gan(server, tagged, output_format=fmt).content)), fmt


def test_jobs_and_batches_carry_it(server):
    png = image_bytes(seed=4)
    r = server.post("/api/v1/jobs", files={"image": ("in.png", png, "image/png")},
                    data={"model": "rrdb_x4", "metadata": "true"})
    assert r.status_code == 202, r.text[:300]
    job_id = r.json()["id"]
    assert wait_job(server, job_id)["status"] == "succeeded"
    result = server.get(f"/api/v1/jobs/{job_id}/result")
    assert "Postprocess upscaler: rrdb_x4" in opened(result.content).info["postprocessing"]
    # a batch: shared, and overridden per image
    b64 = base64.b64encode(png).decode()
    body = {"images": [b64, {"image": b64, "metadata": False}], "metadata": True, "model": "rrdb_x4"}
    r = server.post("/api/v1/batch-upscale", json=body, timeout=300)
    assert r.status_code == 200, r.text[:300]
    images = [opened(base64.b64decode(e["image"])) for e in r.json()["results"]]
    assert "postprocessing" in images[0].info and untagged(images[1])


def test_bad_values_are_refused_by_name(server):
    p = problem(upscale(server, image_bytes(), metadata="yes"), 422, "invalid-field")
    assert p["field"] == "metadata" and p["allowed"] == "true or false"
    body = {"image": base64.b64encode(image_bytes()).decode(), "metadata": "true"}
    p = problem(server.post(UPSCALE, json=body), 422, "invalid-field")
    assert p["field"] == "metadata"
    # a text a JPEG's EXIF (64 KB) cannot hold: refused before the upscale
    p = problem(upscale(server, image_bytes(), metadata="true", output_format="jpeg", prompt="a" * 33000), 422,
                "invalid-field")
    assert p["field"] == "metadata" and "png" in p["detail"], p


def test_the_cache_keeps_metadata_and_profiles_apart():
    s = Server(model=RRDB)
    try:
        png = image_bytes(seed=7)
        tagged = with_profile(png)
        with_meta = upscale(s, png, metadata="true")
        without = upscale(s, png)
        assert (with_meta.headers["X-Cache"], without.headers["X-Cache"]) == ("MISS", "MISS")
        assert "postprocessing" in opened(with_meta.content).info and untagged(opened(without.content))
        again = upscale(s, png, metadata="true")
        assert again.headers["X-Cache"] == "HIT" and again.content == with_meta.content
        # the same pixels with a profile: another file when metadata keeps it...
        r = upscale(s, tagged, metadata="true")
        assert r.headers["X-Cache"] == "MISS" and opened(r.content).info["icc_profile"] == SRGB
        # ...and the same one when it does not (found by the pixels)
        r = upscale(s, tagged)
        assert r.headers["X-Cache"] == "HIT" and r.content == without.content
    finally:
        s.check_clean_exit()


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed")
def test_a_cluster_worker_writes_it():
    redis = RedisServer()
    try:
        worker = Worker(redis.url, model=RRDB)
        node = Server("--redis", redis.url, "--workers", "0", "--request-timeout", "300", model=RRDB,
                      wait_ready=False)
        try:
            node.wait_ready()
            tagged = with_profile(image_bytes(seed=8))
            r = upscale(node, tagged, metadata="true")
            assert r.status_code == 200, r.text[:300]
            info = opened(r.content).info
            assert info["icc_profile"] == SRGB and "Postprocess upscaler: rrdb_x4" in info["postprocessing"], info
            r = upscale(node, tagged)
            assert untagged(opened(r.content))
        finally:
            node.check_clean_exit()
            worker.check_clean_exit()
    finally:
        redis.remove()
