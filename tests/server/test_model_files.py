"""Model files changed on disk under a running server (D7).

The weights are read into the server's own memory when the model loads,
and the files are closed: a file truncated while serving must not crash
the server (mapped weights raised SIGBUS), and one rewritten in place must
not change its answers (mapped weights changed them silently while health
said ready). Each test serves a copy of the tiny model, upscales with a
seed, breaks the copy, and asks again: the same bytes must come back. The
result cache is off (--cache-size 0): a seeded request is cached, and a
hit would hide what the model computes.
"""
import os
import shutil

from conftest import MODEL, Server, image_bytes

UPSCALE = "/api/v1/upscale"
PARAMS = {"num_inference_steps": "1", "seed": "7", "prompt": "a test card"}
UNET = "unet/diffusion_pytorch_model.safetensors"
VAE = "vae/diffusion_pytorch_model.safetensors"
TEXT_ENCODER = "text_encoder/model.safetensors"


def serve_copy(tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(MODEL, copy)
    return copy, Server("--cache-size", "0", "--workers", "1", model=str(copy))


def upscale(s):
    r = s.post(UPSCALE, files={"image": ("in.png", image_bytes(seed=3), "image/png")},
               data=PARAMS, timeout=300)
    assert r.status_code == 200, (r.status_code, r.text[:400])
    return r.content


def assert_ready(s):
    h = s.get("/api/v1/health")
    assert h.status_code == 200 and h.json()["status"] == "ready", h.text


def test_truncated_files_do_not_crash_the_server(tmp_path):
    copy, s = serve_copy(tmp_path)
    try:
        before = upscale(s)
        for rel in (UNET, VAE):
            os.truncate(copy / rel, 100000)
        assert upscale(s) == before
        assert_ready(s)
    finally:
        s.check_clean_exit()


def test_files_rewritten_in_place_do_not_change_answers(tmp_path):
    copy, s = serve_copy(tmp_path)
    try:
        before = upscale(s)
        for rel in (UNET, VAE, TEXT_ENCODER):
            path = copy / rel
            size = path.stat().st_size
            with open(path, "r+b") as f:  # the same inode and size, other bytes
                f.write(os.urandom(size))
        assert upscale(s) == before
        assert_ready(s)
    finally:
        s.check_clean_exit()
