"""Several models in one server: the tiny diffusion model (the default,
named "model" after its folder) and two GAN upscalers of tests/data/gan
(rrdb_x4, 4x; srvgg_x2_relu, 2x), all loaded at start. Requests pick one
by their `model` field; the list, model-info, X-Model, the cache, job
documents and the history name it. One server for the module, 64 px
inputs: the GANs answer in a fraction of a second."""
import base64
import io
import os
import shutil
import subprocess
import time

import pytest
from PIL import Image

from conftest import CLUSTER, ROOT, SDX4, RedisServer, Server, Worker, image_bytes, problem

GAN = os.path.join(ROOT, "tests", "data", "gan")
RRDB = os.path.join(GAN, "rrdb_x4")
SRVGG = os.path.join(GAN, "srvgg_x2_relu")
KEY = {"Authorization": "Bearer models-key"}
UPSCALE = "/api/v1/upscale"


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    history = tmp_path_factory.mktemp("models") / "history.db"
    s = Server("--model", RRDB, "--model", SRVGG, "--api-keys", "models-key", "--history", str(history))
    yield s
    s.check_clean_exit()


def upscale(s, img, **fields):
    return s.post(UPSCALE, files={"image": ("in.png", img, "image/png")}, data=fields, headers=KEY)


def size(content):
    return Image.open(io.BytesIO(content)).size


def polled(get, ready, timeout=60):
    """get() until ready(value), polled every 50 ms."""
    deadline = time.time() + timeout
    while True:
        value = get()
        if ready(value) or time.time() > deadline:
            return value
        time.sleep(0.05)


def test_the_list_and_model_info(multi):
    models = multi.get("/api/v1/models", headers=KEY).json()["models"]
    assert [m["name"] for m in models] == ["model", "rrdb_x4", "srvgg_x2_relu"]
    assert [m["default"] for m in models] == [True, False, False]
    assert [(m["kind"], m["scale"]) for m in models] == [("diffusion", 4), ("gan", 4), ("gan", 2)]
    assert [m["architecture"] for m in models[1:]] == ["RRDBNet", "SRVGGNetCompact"]
    assert all(m["ready"] and m["parameters"] > 0 and m["dtype"]["compute"] == "float32" for m in models)
    assert models[1]["applicable_parameters"] == ["tile"]  # a GAN ignores the diffusion parameters
    assert {"prompt", "num_inference_steps", "tile"} <= set(models[0]["applicable_parameters"])
    health = multi.get("/api/v1/health").json()
    assert health["model"] == "model"
    if not CLUSTER:
        assert [(m["name"], m["status"], m["kind"]) for m in health["models"]] == [
            ("model", "ready", "diffusion"), ("rrdb_x4", "ready", "gan"), ("srvgg_x2_relu", "ready", "gan")]

    default = multi.get("/api/v1/model-info", headers=KEY).json()
    assert default["model_id"] == "model" and default["default"] is True and default["kind"] == "diffusion"
    assert default["components"]["unet"]["parameters"] > 0
    gan = multi.get("/api/v1/model-info?model=rrdb_x4", headers=KEY).json()
    assert (gan["model_id"], gan["kind"], gan["architecture"], gan["scale_factor"]) == ("rrdb_x4", "gan", "RRDBNet", 4)
    assert gan["parameters_total"] == models[1]["parameters"] > 0
    assert "components" not in gan and "max_noise_level" not in gan  # no diffusion parts, no zeros
    assert gan["default"] is False and gan["limits"] == default["limits"]  # the server's limits, the same for all
    by_path = multi.get("/api/v1/models/srvgg_x2_relu", headers=KEY).json()
    assert by_path["model_id"] == "srvgg_x2_relu" and by_path["scale_factor"] == 2
    for path in ("/api/v1/models/nope", "/api/v1/model-info?model=nope"):
        p = problem(multi.get(path, headers=KEY), 404, "not-found")
        assert "rrdb_x4" in p["detail"]


def test_gan_upscales_as_the_cli_does(multi, tmp_path):
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    src.write_bytes(image_bytes(seed=5))
    subprocess.run([SDX4, "upscale", "--model", RRDB, str(src), str(out)], check=True, capture_output=True,
                   timeout=120)
    r = upscale(multi, src.read_bytes(), model="rrdb_x4")
    assert r.status_code == 200, r.text[:300]
    assert r.headers["X-Model"] == "rrdb_x4" and r.headers["X-Output-Size"] == "256x256"
    assert r.content == out.read_bytes()
    # the diffusion parameters are accepted and ignored
    r2 = upscale(multi, src.read_bytes(), model="rrdb_x4", prompt="a cat", num_inference_steps="3")
    assert r2.status_code == 200 and r2.content == r.content
    # JSON bodies and the query string name it too
    body = {"image": base64.b64encode(src.read_bytes()).decode(), "model": "srvgg_x2_relu"}
    r = multi.post(UPSCALE, json=body, headers=KEY)
    assert r.status_code == 200 and r.headers["X-Model"] == "srvgg_x2_relu" and size(r.content) == (128, 128)
    r = multi.post(UPSCALE + "?model=srvgg_x2_relu", files={"image": ("in.png", src.read_bytes(), "image/png")},
                   headers=KEY)
    assert r.status_code == 200 and r.headers["X-Model"] == "srvgg_x2_relu"


def test_unknown_model_and_the_default(multi):
    img = image_bytes(seed=6)
    p = problem(upscale(multi, img, model="rrdb"), 422, "invalid-field")
    assert p["field"] == "model" and "rrdb_x4" in p["allowed"] and "srvgg_x2_relu" in p["detail"]
    r = upscale(multi, img, num_inference_steps="1", seed="3")
    assert r.status_code == 200 and r.headers["X-Model"] == "model" and size(r.content) == (256, 256)


def test_cache_keeps_models_apart(multi):
    img = image_bytes(seed=7)
    a = upscale(multi, img, model="rrdb_x4", seed="11")
    b = upscale(multi, img, model="srvgg_x2_relu", seed="11")
    assert (a.headers["X-Cache"], b.headers["X-Cache"]) == ("MISS", "MISS")
    assert a.content != b.content and size(b.content) == (128, 128)
    again = upscale(multi, img, model="srvgg_x2_relu", seed="11")
    assert again.headers["X-Cache"] == "HIT" and again.content == b.content


def test_jobs_and_history_name_the_model(multi):
    r = multi.post("/api/v1/jobs", files={"image": ("in.png", image_bytes(seed=8), "image/png")},
                   data={"model": "srvgg_x2_relu"}, headers=KEY)
    assert r.status_code == 202, r.text[:300]
    assert r.json()["model"] == "srvgg_x2_relu"
    job = r.json()["id"]
    done = polled(lambda: multi.get(f"/api/v1/jobs/{job}", headers=KEY).json(),
                  lambda d: d["status"] in ("succeeded", "failed", "canceled"))
    assert done["status"] == "succeeded" and done["model"] == "srvgg_x2_relu"
    assert size(multi.get(f"/api/v1/jobs/{job}/result", headers=KEY).content) == (128, 128)
    # the history's writer is a thread of its own
    rows = polled(lambda: {j["id"]: j for j in multi.get("/api/v1/jobs", headers=KEY).json()["jobs"]},
                  lambda rows: job in rows, timeout=30)
    assert rows[job]["model"] == "srvgg_x2_relu"


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed (scripts/install-deps.sh)")
def test_cluster_carries_the_model():
    """An API-only node of three models and a worker of two: tasks carry
    their model's name to the worker, which runs them on that model and
    refuses one of a model it lacks, saying so."""
    redis = RedisServer()
    worker = node = None
    try:
        worker = Worker(redis.url, "--model", RRDB, "--name", "two-models")
        node = Server("--model", RRDB, "--model", SRVGG, "--redis", redis.url, "--workers", "0", wait_ready=False)
        node.wait_ready()  # a live worker serves the default model
        health = node.get("/api/v1/health").json()
        assert [(m["name"], m["status"]) for m in health["models"]] == [
            ("model", "ready"), ("rrdb_x4", "ready"), ("srvgg_x2_relu", "unavailable")]
        models = node.get("/api/v1/models").json()["models"]
        assert [(m["name"], m["ready"], m.get("kind")) for m in models] == [
            ("model", True, "diffusion"), ("rrdb_x4", True, "gan"), ("srvgg_x2_relu", False, None)]
        info = node.get("/api/v1/model-info?model=rrdb_x4").json()
        assert info["kind"] == "gan" and info["scale_factor"] == 4 and info["workers"][0]["name"] == "two-models"

        img = image_bytes(seed=9)
        r = node.post(UPSCALE, files={"image": ("in.png", img, "image/png")}, data={"model": "rrdb_x4"})
        assert r.status_code == 200 and r.headers["X-Model"] == "rrdb_x4" and size(r.content) == (256, 256)
        r = node.post(UPSCALE, files={"image": ("in.png", img, "image/png")}, data={"model": "srvgg_x2_relu"})
        p = problem(r, 500, "upscale-failed")
        assert "two-models does not serve the model \"srvgg_x2_relu\"" in p["detail"] and "rrdb_x4" in p["detail"]
        assert "sdx4_worker_tasks_unknown_model_total 1" in worker.get("/metrics").text
    finally:
        for proc in (node, worker):
            if proc:
                proc.check_clean_exit()
        redis.remove()


def test_model_folders_at_start(tmp_path):
    """--models-dir serves every model folder in it, after --model's; a
    name twice, or a model that does not load, stops the start, naming
    the folders."""
    s = Server("--models-dir", GAN)  # its "real" folder holds pictures, not a model
    try:
        names = [m["name"] for m in s.get("/api/v1/models").json()["models"]]
        assert names == ["model", "rrdb_x2", "rrdb_x4", "rrdb_x4_fp16", "srvgg_x2_relu", "srvgg_x3_leakyrelu",
                         "srvgg_x4_prelu"]
    finally:
        s.check_clean_exit()
    (tmp_path / "rrdb_x4").mkdir()
    r = subprocess.run([SDX4, "serve", "--model", RRDB, "--model", str(tmp_path / "rrdb_x4"), "--port", "0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and 'two models are named "rrdb_x4"' in r.stderr and str(tmp_path) in r.stderr
    r = subprocess.run([SDX4, "serve", "--model", RRDB, "--model", str(tmp_path / "missing"), "--port", "0",
                        "--warmup", "false", "--host", "127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f'"error":"cannot open the model {tmp_path}/missing: no such folder"' in r.stderr
