"""The admin API (admin.h): only an admin key opens it (an API key is
refused without counting as a failed attempt); an admin sees every owner's
jobs and cancels any of them, which stays for its owner to see, canceled;
drain turns new upscales away (503 drained, health 503) while the work
already admitted finishes, and undrain takes them again; every action is
in the JSON log with the admin's identity. Usage per client and day is
test_history.py's (it needs a history database)."""
import shutil
import time

import pytest

from conftest import MODEL, RedisServer, Server, Worker, image_bytes, problem, single_process_only, wait_job

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"X-API-Key": "key-bob"}
ROOT = {"Authorization": "Bearer key-root"}
# slow enough on the tiny model to be canceled before it ends
SLOW = {"num_inference_steps": "150", "seed": "3"}


@pytest.fixture(scope="module")
def admin():
    s = Server("--api-keys", "key-alice,key-bob", "--admin-keys", "key-root", "--workers", "1",
               "--auth-failures", "4")
    yield s
    s.check_clean_exit()


def actions(s):
    return [l for l in s.logs() if isinstance(l, dict) and l.get("event") == "admin_action"]


def test_only_an_admin_key_opens_it(admin):
    for path in ("/api/v1/admin/jobs", "/api/v1/admin/usage", "/api/v1/admin/jobs/" + "a" * 32):
        assert "admin key" in problem(admin.get(path), 401, "unauthorized")["detail"]
        assert "no admin scope" in problem(admin.get(path, headers=ALICE), 403, "forbidden")["detail"]
    for _ in range(4):  # 3 failures so far, of 4 allowed: refusals of a valid API key are not guesses: no 429 follows
        problem(admin.post("/api/v1/admin/drain", headers=BOB), 403, "forbidden")
    assert admin.get("/api/v1/admin/jobs", headers=ROOT).status_code == 200
    # the admin key is an API key too
    r = admin.post("/api/v1/upscale", files={"image": image_bytes()}, data={"num_inference_steps": "1"},
                   headers=ROOT)
    assert r.status_code == 200, r.text
    assert not actions(admin), "a refused or read-only call was logged as an action"


def test_an_admin_lists_and_cancels_any_owners_job(admin):
    jobs = [admin.post("/api/v1/jobs", files={"image": image_bytes(size=(96, 96))}, data=SLOW, headers=h).json()
            for h in (ALICE, BOB)]
    listed = admin.get("/api/v1/admin/jobs", headers=ROOT).json()["jobs"]
    by_id = {j["id"]: j for j in listed}
    assert all(j["id"] in by_id for j in jobs), listed
    owners = {by_id[j["id"]]["owner"] for j in jobs}
    assert len(owners) == 2 and all(o.startswith("key:") for o in owners)
    queued = admin.get("/api/v1/admin/jobs?state=queued", headers=ROOT).json()["jobs"]
    assert all(j["status"] == "queued" for j in queued)
    problem(admin.get("/api/v1/admin/jobs?state=lost", headers=ROOT), 422, "invalid-field")
    problem(admin.get("/api/v1/admin/jobs?limit=0", headers=ROOT), 422, "invalid-field")

    for j in jobs:  # bob's is queued behind alice's (one worker); both are stopped
        r = admin.delete(f"/api/v1/admin/jobs/{j['id']}", headers=ROOT)
        assert r.status_code == 200 and r.json()["status"] == "canceled", r.text
    mine = admin.get(jobs[0]["links"]["self"], headers=ALICE).json()
    assert mine["status"] == "canceled" and mine["error"]["type"].endswith(":canceled") \
        and "administrator" in mine["error"]["detail"], mine
    problem(admin.get(jobs[0]["links"]["result"], headers=ALICE), 409, "canceled")
    problem(admin.delete("/api/v1/admin/jobs/" + "f" * 32, headers=ROOT), 404, "not-found")
    logged = [(a["action"], a.get("target")) for a in actions(admin)]
    assert logged == [("cancel_job", jobs[0]["id"]), ("cancel_job", jobs[1]["id"])], logged
    assert all(a["admin"].startswith("key:") and a["admin"] not in owners for a in actions(admin))


def test_a_cluster_lists_every_nodes_jobs():
    """In cluster mode the listing is the shared store's: a job made
    through one API node is listed, filtered and canceled through another."""
    redis = RedisServer()
    flags = ("--redis", redis.url, "--workers", "0", "--api-keys", "key-alice", "--admin-keys", "key-root")
    worker = Worker(redis.url, "--name", "w1")
    a, b = Server(*flags), Server(*flags)
    try:
        done = a.post("/api/v1/jobs", files={"image": image_bytes()}, data={"num_inference_steps": "1"},
                      headers=ALICE).json()
        assert wait_job(a, done["id"], headers=ALICE)["status"] == "succeeded"
        slow = a.post("/api/v1/jobs", files={"image": image_bytes(size=(96, 96))}, data=SLOW, headers=ALICE).json()
        listed = b.get("/api/v1/admin/jobs", headers=ROOT).json()["jobs"]
        assert [j["id"] for j in listed] == [slow["id"], done["id"]], listed  # newest first
        assert listed[1]["status"] == "succeeded" and listed[1]["owner"].startswith("key:")
        assert [j["id"] for j in b.get("/api/v1/admin/jobs?state=succeeded", headers=ROOT).json()["jobs"]] \
            == [done["id"]]
        assert [j["id"] for j in b.get("/api/v1/admin/jobs?limit=1", headers=ROOT).json()["jobs"]] == [slow["id"]]
        assert b.delete(f"/api/v1/admin/jobs/{slow['id']}", headers=ROOT).json()["status"] == "canceled"
        assert wait_job(a, slow["id"], headers=ALICE)["status"] == "canceled"
        # the cancel reaches Redis (b's keeper writes it) and the worker stops at its next step:
        # with Redis gone first, it would drain the task to its end at SIGTERM, 30 s
        deadline = time.time() + 30
        while not redis.client().exists(f"sdx4:cancel:{slow['id']}") or worker.get("/healthz").json()["busy"]:
            assert time.time() < deadline, "the worker never stopped the canceled task"
            time.sleep(0.05)
        redis.stop()  # the shared store away: the listing cannot be made
        problem(b.get("/api/v1/admin/jobs", headers=ROOT), 503, "store-unavailable")
    finally:
        a.check_clean_exit()
        b.check_clean_exit()
        worker.stop()
        redis.remove()


@single_process_only("health and the refusal are the API node's, as here; the queue is the workers'")
def test_drain_refuses_new_work_and_undrain_takes_it_again(admin):
    running = admin.post("/api/v1/jobs", files={"image": image_bytes()},
                         data=dict(SLOW, num_inference_steps="20"), headers=ALICE).json()
    r = admin.post("/api/v1/admin/drain", headers=ROOT)
    assert r.status_code == 200 and r.json()["drained"] and r.json()["changed"], r.text
    assert not admin.post("/api/v1/admin/drain", headers=ROOT).json()["changed"]
    admitted = admin.get(running["links"]["self"], headers=ALICE).json()
    assert admitted["status"] in ("queued", "running"), "make the job slower: it ended before the drain"
    h = admin.get("/api/v1/health")
    assert h.status_code == 503 and h.json()["status"] == "drained" and h.json()["drained"], h.text
    refused = admin.post("/api/v1/upscale", files={"image": image_bytes()}, headers=ALICE)
    assert "drained" in problem(refused, 503, "drained")["detail"] and refused.headers["Retry-After"]
    # what was admitted before finishes; reads go on
    deadline = time.time() + 120
    while admin.get(running["links"]["self"], headers=ALICE).json()["status"] not in ("succeeded", "failed"):
        assert time.time() < deadline
        time.sleep(0.1)
    done = admin.get(running["links"]["self"], headers=ALICE).json()
    assert done["status"] == "succeeded", done

    r = admin.post("/api/v1/admin/undrain", headers=ROOT)
    assert r.status_code == 200 and not r.json()["drained"] and r.json()["changed"], r.text
    assert admin.get("/api/v1/health").status_code == 200
    r = admin.post("/api/v1/upscale", files={"image": image_bytes()}, data={"num_inference_steps": "1"},
                   headers=ALICE)
    assert r.status_code == 200, r.text
    assert [a["action"] for a in actions(admin)][-2:] == ["drain", "undrain"]


def wait_reloaded(s, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        entry = s.get("/api/v1/models", headers=ROOT).json()["models"][0]
        if not entry.get("reloading"):
            return entry
        time.sleep(0.05)
    raise AssertionError("the reload never ended")


@single_process_only("a cluster's workers load the models: the API node refuses a reload (409)")
def test_reload_swaps_versions_while_running_work_finishes_on_the_old(admin, tmp_path):
    from test_api import weights_digest
    old = weights_digest(MODEL)
    # another version: the same folder with one weight changed by a hair
    copy = tmp_path / "model-v2"
    shutil.copytree(MODEL, copy)
    vae = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(vae.read_bytes())
    data[-2] ^= 1  # the low bits of the last float32's mantissa
    vae.write_bytes(bytes(data))
    new = weights_digest(str(copy))

    r = admin.post("/api/v1/admin/models/model/reload", headers=ROOT)  # the same folder again
    assert r.status_code == 202 and r.json()["reloading"], r.text
    assert wait_reloaded(admin)["model_hash"] == old

    running = admin.post("/api/v1/jobs", files={"image": image_bytes()}, data=dict(SLOW, num_inference_steps="20"),
                         headers=ALICE).json()
    r = admin.post("/api/v1/admin/models/model/reload", params={"dir": str(copy)}, headers=ROOT)
    assert r.status_code == 202, r.text
    problem(admin.post("/api/v1/admin/models/model/reload", headers=ROOT), 409, "conflict")
    entry = wait_reloaded(admin)
    assert entry["model_hash"] == new and "reload_error" not in entry, entry
    done = wait_job(admin, running["id"], headers=ALICE)
    assert done["status"] == "succeeded" and done["model_hash"] == old, done  # it ran on the old version
    r = admin.post("/api/v1/upscale", files={"image": image_bytes()}, data={"num_inference_steps": "1"},
                   headers=ALICE)
    assert r.status_code == 200 and r.headers["X-Model-Hash"] == new, r.headers

    # a folder that is no model: the reload fails, the version in service stays
    r = admin.post("/api/v1/admin/models/model/reload", params={"dir": str(tmp_path)}, headers=ROOT)
    assert r.status_code == 202, r.text
    entry = wait_reloaded(admin)
    assert entry["model_hash"] == new and str(tmp_path) in entry["reload_error"], entry
    problem(admin.post("/api/v1/admin/models/nope/reload", headers=ROOT), 404, "not-found")
    logged = [e for e in admin.logs() if isinstance(e, dict) and e.get("event") in ("model_reloaded",
                                                                                   "model_reload_failed")]
    assert [e["event"] for e in logged] == ["model_reloaded", "model_reloaded", "model_reload_failed"], logged
    assert (logged[1]["old_hash"], logged[1]["hash"]) == (old, new)



@single_process_only("a cluster's workers load the models: the API node refuses a reload (409)")
def test_an_image_made_by_a_newer_version_is_not_cached_under_the_older(tmp_path):
    """A request keys the cache with the version it finds; a swap while it
    waits in the queue runs it on the newer one, whose image must not be
    kept under the older's key: swapped back, the same request would be
    answered with the newer version's image under the older's hash."""
    import json
    import struct
    other = tmp_path / "model-b"  # decodes visibly otherwise: post_quant_conv.bias + 1
    shutil.copytree(MODEL, other)
    vae = other / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(vae.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    start, end = json.loads(data[8:8 + n])["post_quant_conv.bias"]["data_offsets"]
    for at in range(8 + n + start, 8 + n + end, 4):
        data[at:at + 4] = struct.pack("<f", struct.unpack("<f", data[at:at + 4])[0] + 1.0)
    vae.write_bytes(bytes(data))
    s = Server("--api-keys", "key-alice,key-bob", "--admin-keys", "key-root", "--workers", "1")
    seeded = {"num_inference_steps": "2", "seed": "7"}
    try:
        old = s.get("/api/v1/models", headers=ROOT).json()["models"][0]["model_hash"]
        on_old = s.post("/api/v1/upscale", files={"image": image_bytes()}, data=seeded, headers=BOB)
        assert on_old.status_code == 200 and on_old.headers["X-Model-Hash"] == old
        busy = s.post("/api/v1/jobs", files={"image": image_bytes(size=(96, 96))}, data=SLOW, headers=BOB).json()
        queued = s.post("/api/v1/jobs", files={"image": image_bytes()}, data=seeded, headers=ALICE).json()
        assert s.post("/api/v1/admin/models/model/reload", params={"dir": str(other)}, headers=ROOT).status_code == 202
        assert wait_reloaded(s)["model_hash"] != old
        assert s.get(queued["links"]["self"], headers=ALICE).json()["status"] == "queued"
        s.delete(f"/api/v1/admin/jobs/{busy['id']}", headers=ROOT)
        done = wait_job(s, queued["id"], headers=ALICE)
        assert done["status"] == "succeeded" and done["model_hash"] != old, done
        assert s.post("/api/v1/admin/models/model/reload", params={"dir": MODEL}, headers=ROOT).status_code == 202
        assert wait_reloaded(s)["model_hash"] == old
        again = s.post("/api/v1/upscale", files={"image": image_bytes()}, data=seeded, headers=ALICE)
        assert again.status_code == 200 and again.headers["X-Model-Hash"] == old
        assert again.content == on_old.content, f"the newer version's image, X-Cache {again.headers['X-Cache']}"
    finally:
        s.check_clean_exit()


@single_process_only("a cluster's workers load the models: the API node refuses a reload (409)")
def test_health_and_model_info_say_demo_of_the_version_in_service(tmp_path):
    """A demo folder (DEMO_MODEL: random weights) swapped for real weights
    under the same name: health, model-info and the load's log line speak
    of the version that answers, not of the folder the server started on."""
    demo = tmp_path / "demo"
    shutil.copytree(MODEL, demo)
    (demo / "DEMO_MODEL").write_text("random weights\n")
    s = Server("--admin-keys", "key-root", "--workers", "1", model=str(demo))
    try:
        assert s.get("/api/v1/health").json()["demo_model"] is True
        assert s.post("/api/v1/admin/models/demo/reload", params={"dir": MODEL}, headers=ROOT).status_code == 202
        assert "reload_error" not in wait_reloaded(s)
        health = s.get("/api/v1/health").json()
        assert health["demo_model"] is False and "note" not in health, health
        assert s.get("/api/v1/model-info", headers=ROOT).json()["demo_model"] is False
        loaded = [e for e in s.logs() if isinstance(e, dict) and e.get("event") == "model_loaded"]
        assert [e["level"] for e in loaded] == ["warn", "info"] and "note" not in loaded[1], loaded
    finally:
        s.check_clean_exit()
