"""Cluster mode's protocol as the tests drive it: jobs written to Redis the
way cluster.c's cluster_submit writes them, and their state read back the
way API nodes read it, so that workers can be tested without an API node.
src/server/cluster.c is the reference; keep this the only copy in tests."""
import io
import json
import os
import time

import redis
from PIL import Image

STREAM, GROUP = "sdx4:tasks", "sdx4-workers"
FINAL = ("succeeded", "failed", "canceled")


def task_state():
    report = dict.fromkeys(("noise_level", "prompt_tokens", "prompt_truncated", "negative_truncated",
                            "seconds_text", "seconds_unet", "seconds_vae"), 0)
    return {"state": "queued", "step": 0, "total": 0, "started": 0, "finished": 0, "width": 0, "height": 0,
            "bytes": 0, "stored": False, "worker": "", "report": report}


def record(job_id, image, steps=1, seed=1234, prompt="", noise_level=0.1, guidance_scale=5.0, timeout=60):
    now = time.time()
    return {"job": job_id, "index": 0, "kind": "job", "client": "test", "request_id": "req-" + job_id[:8],
            "owner": "", "created": now, "deadline": now + timeout, "width": image.width, "height": image.height,
            "cache_key": "00" * 32, "cacheable": False,
            "options": {"prompt": prompt, "negative_prompt": "", "noise_level": noise_level, "steps": steps,
                        "guidance_scale": guidance_scale, "eta": 0.0, "seed": seed, "format": "png", "quality": 0,
                        "scheduler": None, "scheduler_options": None, "vae_tiling": None,
                        "tile": 0, "tile_overlap": 32, "resize_width": 0, "resize_height": 0, "crop_width": 0,
                        "crop_height": 0, "given": 0}}


def submit(r, png, ghost=None, edit=None, job_id=None, webhook_url=None, group=True, **params):
    """Queues a job of one image (PNG bytes); returns its id. `ghost`
    takes the entry first, in the same transaction, as a consumer of that
    name that will never finish it; `edit` may spoil the record; `group`
    False leaves the consumer group to the workers."""
    job_id = job_id or os.urandom(16).hex()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    rec = record(job_id, image, **params)
    if edit:
        edit(rec)
    meta = {"id": job_id, "kind": "job", "listed": True, "client": "test", "request_id": rec["request_id"],
            "owner": "", "created": rec["created"], "deadline": rec["deadline"], "ntasks": 1, "webhook_url": webhook_url}
    try:
        if group:
            r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as e:
        assert "BUSYGROUP" in str(e)
    job = "sdx4:job:" + job_id
    p = r.pipeline(transaction=True)
    p.hset(job, mapping={"meta": json.dumps(meta), "unfinished": 1, "task:0": json.dumps(task_state())})
    p.set(f"sdx4:input:{job_id}:0", image.tobytes(), ex=600)
    p.xadd(STREAM, {"job": job_id, "task": 0, "record": json.dumps(rec)})
    p.expire(job, 600)
    if ghost:
        p.xreadgroup(GROUP, ghost, {STREAM: ">"}, count=1)
    entry = p.execute()[2]
    r.hset(job, "entry:0", entry)
    return job_id


def entry_of(r, job_id):
    return r.hget("sdx4:job:" + job_id, "entry:0").decode()


def state(r, job_id):
    """The job's task state (dict) and the job's state (None until final)."""
    fields = r.hmget("sdx4:job:" + job_id, "task:0", "state")
    return json.loads(fields[0]), fields[1].decode() if fields[1] else None


def wait(r, job_id, states=FINAL, timeout=120):
    """Waits until the task's state is one of `states`; returns it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        task, _ = state(r, job_id)
        if task["state"] in states:
            return task
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {task['state']} after {timeout} s")


def result(r, job_id):
    return r.get(f"sdx4:result:{job_id}:0")
