"""Cluster mode seen from the API nodes (`sdx4 serve --redis URL`): real
redis-server, real `sdx4 worker` processes, the tiny reference model.

The tests start their Redis (conftest's RedisServer: a unix socket in a
temp dir, append-only on, so that a restart keeps what it had), workers
and nodes, and stop them. Results are compared byte for byte with a
single-process server given the same images and seeds.
"""
import json
import re
import shutil
import subprocess
import time

import pytest
import requests

from conftest import MODEL, SDX4, RedisServer, Server, Worker, image_bytes, problem, wait_job
from test_hooks_logs import Receiver

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"),
                                reason="redis-server is not installed (scripts/install-deps.sh)")

STEPS = "1"  # the fewest: these tests are about where work goes, not the work


def api_node(redis, *flags):
    """An API-only node (--workers 0) on `redis`; ready once a worker serves its model."""
    return Server("--redis", redis.url, "--workers", "0", "--request-timeout", "300", *flags, wait_ready=False)


def wait_serving(node, workers=1, timeout=120):
    """Waits until `node`'s health is 200 with `workers` live workers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = node.get("/api/v1/health", timeout=10)
        if r.status_code == 200 and len(r.json()["cluster"]["workers"]) >= workers:
            return r.json()
        time.sleep(0.1)
    raise AssertionError(f"no {workers} live workers: {r.text}")


def wait_final(node, job_id, timeout=120, **kw):
    deadline = time.time() + timeout
    while time.time() < deadline:
        doc = node.get(f"/api/v1/jobs/{job_id}", **kw).json()
        if doc["status"] in ("succeeded", "failed", "canceled"):
            return doc
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never finished: {doc}")


@pytest.fixture
def own_redis():
    """A Redis for one test (conftest's redis_server is the module's): no
    worker registered by another test is still alive in it."""
    r = RedisServer()
    yield r
    r.remove()


@pytest.fixture(scope="module")
def baseline():
    """Single-process results of the images and seeds the tests send."""
    s = Server("--workers", "2")
    cache = {}

    def result(seed):
        if seed not in cache:
            r = s.post("/api/v1/upscale", files={"image": image_bytes(seed=seed % 7)},
                       data={"seed": str(seed), "num_inference_steps": STEPS})
            assert r.status_code == 200, r.text
            cache[seed] = r.content
        return cache[seed]
    yield result
    s.check_clean_exit()


class Cluster:
    """Redis, one API-only node (`node`, replaceable) and two workers."""

    def __init__(self, redis):
        self.redis = redis
        self.workers = [Worker(redis.url, "--name", "w1"), Worker(redis.url, "--name", "w2")]
        self.node = None
        try:
            self.node = api_node(redis)
            wait_serving(self.node, 2)
        except BaseException:  # the fixture never gets to stop them
            for p in [self.node] * (self.node is not None) + self.workers:
                p.stop()
            raise


@pytest.fixture(scope="module")
def cluster():
    """Shared by the tests of this module that leave it as they found it
    (a node replaced, Redis restarted): starting one costs seconds."""
    redis = RedisServer()
    c = Cluster(redis)
    yield c
    c.node.check_clean_exit()
    for w in c.workers:
        w.check_clean_exit()
    redis.remove()


def submit(node, seed, **kw):
    r = node.post("/api/v1/jobs", files={"image": image_bytes(seed=seed % 7)},
                  data={"seed": str(seed), "num_inference_steps": STEPS}, **kw)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_sixteen_jobs_each_once_and_identical_to_single_process(cluster, baseline):
    redis, node = cluster.redis, cluster.node
    # sixteen: eight a worker, enough for the two to race for tasks many
    # times (forty took 36 s of CI for no case that sixteen misses)
    ids = {submit(node, seed): seed for seed in range(16)}
    for job_id, seed in ids.items():
        doc = wait_final(node, job_id)
        assert doc["status"] == "succeeded", json.dumps(doc)
        r = node.get(f"/api/v1/jobs/{job_id}/result")
        assert r.status_code == 200 and r.headers["X-Seed"] == str(seed)
        assert r.content == baseline(seed), f"job {job_id} (seed {seed}) differs from single-process mode"
    # both workers took part, and every task was taken exactly once
    health = node.get("/api/v1/health").json()
    assert health["queue"]["depth"] == 0
    # the node's model-info comes from the workers' registrations
    info = node.get("/api/v1/model-info").json()
    assert {w["name"] for w in info["workers"]} == {"w1", "w2"}
    assert info["limits"]["request_timeout_s"] == 300


def test_sync_upscale_through_api_node(cluster, baseline):
    redis, node = cluster.redis, cluster.node
    kept = redis.client().zcard("sdx4:results")
    r = node.post("/api/v1/upscale", files={"image": image_bytes(seed=3)},
                  data={"seed": "3", "num_inference_steps": STEPS})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "image/png" and r.headers["X-Seed"] == "3"
    assert r.content == baseline(3)
    # read once by the node that answered: Redis's results budget does not keep it
    assert redis.client().zcard("sdx4:results") == kept
    # the node keeps what a worker made for it in its result cache
    again = node.post("/api/v1/upscale", files={"image": image_bytes(seed=3)},
                      data={"seed": "3", "num_inference_steps": STEPS})
    assert again.headers["X-Cache"] == "HIT" and again.content == r.content


def test_api_node_killed_and_restarted_keeps_jobs(cluster, baseline):
    ids = {submit(cluster.node, seed): seed for seed in range(100, 106)}
    cluster.node.proc.kill()  # SIGKILL: nothing of it survives but what Redis has
    cluster.node.proc.wait()
    cluster.node = api_node(cluster.redis)
    wait_serving(cluster.node, 2)
    for job_id, seed in ids.items():
        doc = wait_final(cluster.node, job_id)
        assert doc["status"] == "succeeded", doc
        assert cluster.node.get(f"/api/v1/jobs/{job_id}/result").content == baseline(seed)


# serial: node A once answered its result with a problem right after B's
# events said succeeded, with another module's servers on the same two
# cores (a load average near 10); not seen alone, which is how CI runs it
@pytest.mark.serial
def test_two_api_nodes_share_jobs_and_keep_owners_apart(own_redis, baseline):
    keys = ("--api-keys", "key-a,key-b")
    worker = Worker(own_redis.url, "--name", "w1")
    a, b = api_node(own_redis, *keys), api_node(own_redis, *keys)
    try:
        wait_serving(a), wait_serving(b)
        mine = {"Authorization": "Bearer key-a"}
        theirs = {"Authorization": "Bearer key-b"}
        r = a.post("/api/v1/jobs", files={"image": image_bytes(seed=200 % 7)},
                   data={"seed": "200", "num_inference_steps": "30"}, headers=mine)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        # SSE from B of the job made on A: progress, then the final event
        events = []
        with requests.get(f"{b.url}/api/v1/jobs/{job_id}/events", headers=mine, stream=True, timeout=60) as sse:
            assert sse.status_code == 200
            for line in sse.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    events.append(line[7:])
                    if line[7:] in ("succeeded", "failed", "canceled"):
                        break
        assert events[-1] == "succeeded", events
        assert "running" in events, events
        doc = b.get(f"/api/v1/jobs/{job_id}", headers=mine).json()
        assert doc["status"] == "succeeded" and doc["id"] == job_id
        assert b.get(f"/api/v1/jobs/{job_id}/result", headers=mine).content == \
            a.get(f"/api/v1/jobs/{job_id}/result", headers=mine).content
        # another key finds nothing, on either node, as for an unknown id
        for node in (a, b):
            problem(node.get(f"/api/v1/jobs/{job_id}", headers=theirs), 404, "not-found")
        # DELETE on B: the job is gone on A too
        assert b.delete(f"/api/v1/jobs/{job_id}", headers=mine).status_code == 200
        deadline = time.time() + 10
        while a.get(f"/api/v1/jobs/{job_id}", headers=mine).status_code != 404:
            assert time.time() < deadline, "the job deleted on B is still found on A"
            time.sleep(0.1)
    finally:
        a.check_clean_exit()
        b.check_clean_exit()
        worker.check_clean_exit()


def test_cancel_on_api_node_stops_the_worker(cluster):
    redis, node = cluster.redis, cluster.node
    r = node.post("/api/v1/jobs", files={"image": image_bytes()}, data={"num_inference_steps": "150"})
    job_id = r.json()["id"]
    deadline = time.time() + 60
    while node.get(f"/api/v1/jobs/{job_id}").json()["progress"]["step"] < 1:
        assert time.time() < deadline
        time.sleep(0.05)
    r = node.delete(f"/api/v1/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    problem(node.get(f"/api/v1/jobs/{job_id}"), 404, "not-found")
    # the worker stopped at its next step: both are free again soon
    deadline = time.time() + 30
    while node.get("/api/v1/health").json()["queue"]["running"]:
        assert time.time() < deadline, "the worker never stopped"
        time.sleep(0.1)


def test_deadline_on_api_node_answers_504_and_frees_the_worker(own_redis):
    worker = Worker(own_redis.url, "--name", "w1")
    node = api_node(own_redis, "--request-timeout", "1.5")
    try:
        wait_serving(node)
        t0 = time.time()
        r = node.post("/api/v1/upscale", files={"image": image_bytes()}, data={"num_inference_steps": "150"})
        problem(r, 504, "timeout")
        assert time.time() - t0 < 10
        deadline = time.time() + 30
        while node.get("/api/v1/health").json()["queue"]["running"]:
            assert time.time() < deadline, "the worker never stopped"
            time.sleep(0.1)
    finally:
        node.check_clean_exit()
        worker.check_clean_exit()


def test_redis_down_answers_503_at_once_and_recovers(cluster, baseline):
    redis, node = cluster.redis, cluster.node
    job_id = submit(node, 300)
    assert wait_final(node, job_id)["status"] == "succeeded"
    redis.stop()
    t0 = time.time()
    deadline = time.time() + 15
    while node.get("/api/v1/health").status_code != 503:
        assert time.time() < deadline, "health never noticed Redis was down"
        time.sleep(0.1)
    h = node.get("/api/v1/health").json()
    assert h["cluster"]["redis_up"] is False and h["ready"] is False
    t0 = time.time()
    r = node.post("/api/v1/jobs", files={"image": image_bytes()}, data={"num_inference_steps": STEPS})
    p = problem(r, 503, "store-unavailable")
    assert r.headers["Retry-After"] == "1" and "Redis" in p["detail"]
    problem(node.get("/api/v1/jobs/" + "0" * 32), 503, "store-unavailable")
    assert time.time() - t0 < 10, "a request waited on a Redis that is down"
    # a job this node already holds is still answered
    assert node.get(f"/api/v1/jobs/{job_id}").json()["status"] == "succeeded"
    redis.start()
    wait_serving(node, 2, timeout=60)
    job_id = submit(node, 301)
    assert wait_final(node, job_id)["status"] == "succeeded"
    assert node.get(f"/api/v1/jobs/{job_id}/result").content == baseline(301)


def test_workers_zero_needs_redis():
    r = subprocess.run([SDX4, "serve", "--model", MODEL, "--workers", "0"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "needs --redis" in r.stderr


def test_api_node_without_workers_is_not_ready(own_redis):
    node = api_node(own_redis)
    try:
        r = node.get("/api/v1/health")
        assert r.status_code == 503 and r.json()["error"] == "no live worker serves this model"
        problem(node.get("/api/v1/model-info"), 503, "not-ready")
    finally:
        node.check_clean_exit()


def test_ready_without_workers_scales_from_zero(own_redis, baseline):
    """--ready-without-workers: the node stays ready with no worker, so that
    the tasks it queues can wake workers that scale from zero; a worker
    that starts later runs them."""
    node = api_node(own_redis, "--ready-without-workers", "true")
    worker = None
    try:
        node.wait_ready()
        health = node.get("/api/v1/health").json()
        assert health["ready"] and health["cluster"]["waiting_for_workers"] and health["cluster"]["workers"] == []
        r = node.post("/api/v1/jobs", files={"image": image_bytes(seed=5)},
                      data={"seed": "5", "num_inference_steps": STEPS})
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        time.sleep(1)
        assert node.get(f"/api/v1/jobs/{job}").json()["status"] == "queued"
        worker = Worker(own_redis.url, "--name", "woken")
        assert wait_job(node, job)["status"] == "succeeded"
        assert node.get(f"/api/v1/jobs/{job}/result").content == baseline(5)
        assert "waiting_for_workers" not in wait_serving(node)["cluster"]
    finally:
        node.check_clean_exit()
        if worker:
            worker.stop()


def test_a_read_shows_what_redis_has_not_what_the_events_brought(own_redis):
    """A node's copy of an unfinished job is brought to Redis's state when
    it is read: a client that saw a job end through one node then asks
    another (a load balancer's choice) must not find it still running
    there, whether or not that node has had the event yet. Here the task is
    ended in Redis without an event, as a lost publish would leave it."""
    node = api_node(own_redis, "--ready-without-workers", "true")
    try:
        node.wait_ready()
        job = node.post("/api/v1/jobs", files={"image": image_bytes(seed=1)},
                        data={"seed": "1", "num_inference_steps": STEPS}).json()["id"]
        assert node.get(f"/api/v1/jobs/{job}").json()["status"] == "queued"
        r = own_redis.client()
        key = f"sdx4:job:{job}"
        state = json.loads(r.hget(key, "task:0"))
        state.update(state="failed", finished=time.time(), worker="elsewhere",
                     error={"kind": "upscale-failed", "detail": "ended elsewhere", "field": "", "allowed": "",
                            "estimated_seconds": 0, "limit_seconds": 0, "retry_after": 0})
        r.hset(key, mapping={"task:0": json.dumps(state), "unfinished": 0, "state": "failed",
                             "finished": time.time()})
        # at once: the keeper's sweep (once a second) is not what brings it
        doc = node.get(f"/api/v1/jobs/{job}").json()
        assert doc["status"] == "failed" and doc["error"]["detail"] == "ended elsewhere", doc
    finally:
        node.check_clean_exit()


def test_a_job_whose_state_does_not_parse_fails_alone(own_redis):
    """A task state in Redis that does not parse (a node of another
    version, a hand edit) fails that job on the node watching it, at once
    rather than at its deadline (the keeper's look does it: a read of the
    job leaves the node's copy as it is); Redis is not taken for down, so
    the node stays ready; another node asked for the job answers 500, not
    503 store-unavailable."""
    node = api_node(own_redis, "--ready-without-workers", "true")
    other = None
    try:
        node.wait_ready()
        bad = submit(node, 1)
        r = own_redis.client()
        state = json.loads(r.hget(f"sdx4:job:{bad}", "task:0"))
        state["report"]["prompt_truncated"] = 100  # out of its range: refused by the parser
        r.hset(f"sdx4:job:{bad}", "task:0", json.dumps(state))
        doc = wait_final(node, bad, timeout=10)
        assert doc["status"] == "failed" and "does not parse" in doc["error"]["detail"], doc
        health = node.get("/api/v1/health")
        assert health.status_code == 200 and health.json()["cluster"]["redis_up"], health.text
        other = api_node(own_redis, "--ready-without-workers", "true")
        other.wait_ready()
        assert "does not parse" in problem(other.get(f"/api/v1/jobs/{bad}"), 500, "internal-error")["detail"]
    finally:
        node.check_clean_exit()
        if other:
            other.check_clean_exit()


def test_a_sync_batch_of_refused_images_is_in_the_history(own_redis, tmp_path):
    """A synchronous batch whose every image is refused never reaches
    Redis: the node that answered it writes its history row."""
    from test_history import metric
    node = api_node(own_redis, "--ready-without-workers", "true", "--history", str(tmp_path / "history.db"))
    try:
        node.wait_ready()
        r = node.post("/api/v1/batch-upscale", files=[("image", ("a.png", b"not an image", "image/png")),
                                                       ("image", ("b.png", b"nor this", "image/png"))])
        assert r.status_code == 200 and [i["status"] for i in r.json()["results"]] == [415, 415], r.text
        deadline = time.time() + 10
        while metric(node, 'sdx4_history_entries_total{outcome="written"}') != 1:
            assert time.time() < deadline, "no history row for the batch"
            time.sleep(0.1)
    finally:
        node.check_clean_exit()


def test_a_delete_missed_by_a_nodes_events_is_found_when_it_subscribes_again(own_redis):
    """Pub/sub is at most once: a node whose subscription Redis drops may
    miss the message that a job was deleted through another node. Once
    subscribed again it checks the finished jobs it keeps against Redis
    and forgets the deleted ones (it served them, image included, for the
    whole retention)."""
    import threading
    worker = Worker(own_redis.url, "--name", "w1")
    a = api_node(own_redis)
    b = api_node(own_redis)
    stop = threading.Event()

    def drop_subscriptions():
        r = own_redis.client()
        while not stop.is_set():
            r.execute_command("CLIENT", "KILL", "TYPE", "pubsub")

    killer = threading.Thread(target=drop_subscriptions)
    try:
        wait_serving(a), wait_serving(b)
        job = submit(a, 1)
        assert wait_final(a, job)["status"] == "succeeded"
        assert a.get(f"/api/v1/jobs/{job}/result").status_code == 200
        killer.start()
        time.sleep(0.2)
        assert b.delete(f"/api/v1/jobs/{job}").status_code == 200
        time.sleep(0.5)
        stop.set()
        killer.join()
        deadline = time.time() + 10
        while a.get(f"/api/v1/jobs/{job}").status_code != 404:
            assert time.time() < deadline, "the node still serves a job deleted elsewhere"
            time.sleep(0.1)
        assert a.get(f"/api/v1/jobs/{job}/result").status_code == 404
    finally:
        stop.set()
        if killer.is_alive():
            killer.join()
        a.check_clean_exit()
        b.check_clean_exit()
        worker.check_clean_exit()


def test_ready_without_workers_is_for_api_only_nodes():
    r = subprocess.run([SDX4, "serve", "--model", MODEL, "--ready-without-workers", "true"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and "ready-without-workers is for an API-only node" in r.stderr


def test_node_with_its_own_workers(own_redis, baseline):
    """--redis with --workers N: the node runs N consumers of the cluster's
    tasks itself, and registers like any worker."""
    node = Server("--redis", own_redis.url, "--workers", "1", "--name", "self", "--request-timeout", "300",
                  wait_ready=False)
    try:
        health = wait_serving(node)
        assert [w["name"] for w in health["cluster"]["workers"]] == ["self"]
        r = node.post("/api/v1/upscale", files={"image": image_bytes(seed=5)},
                      data={"seed": "5", "num_inference_steps": STEPS})
        assert r.status_code == 200, r.text
        assert r.content == baseline(5)
        assert node.get("/api/v1/model-info").json()["model_id"] == "model"
    finally:
        node.check_clean_exit()


def test_webhook_outcome_shown_by_every_node(own_redis):
    """The worker that ends a job sends its webhook and writes the delivery
    into the job's hash: the node that made the job (its copy updated
    through the job's channel) and a node that never saw it (rebuilt from
    the hash) show the same webhook field as single-process mode."""
    hooks = ("--webhook-secret", "hook-secret", "--webhook-private", "true", "--webhook-attempts", "1")
    worker = Worker(own_redis.url, "--name", "w1", *hooks)
    nodes = [api_node(own_redis, *hooks), api_node(own_redis, *hooks)]
    receiver, gone = Receiver(), Receiver()
    gone.close()  # nothing listens there: its delivery fails at once
    r = own_redis.client()
    try:
        for node in nodes:
            wait_serving(node)
        jobs = {}
        for name, url in (("delivered", receiver.url + "/hook"), ("failed", gone.url + "/hook")):
            answer = nodes[0].post("/api/v1/jobs", files={"image": image_bytes()},
                                   data={"num_inference_steps": STEPS, "webhook_url": url})
            assert answer.status_code == 202, answer.text
            jobs[name] = answer.json()["id"]
        for status, job_id in jobs.items():
            deadline = time.time() + 30
            while json.loads(r.hget(f"sdx4:job:{job_id}", "webhook") or "{}").get("status") != status:
                assert time.time() < deadline, r.hgetall(f"sdx4:job:{job_id}")
                time.sleep(0.05)
            for node in nodes:
                deadline = time.time() + 10
                while (hook := wait_final(node, job_id)["webhook"])["status"] != status:
                    assert time.time() < deadline, (node.url, hook)
                    time.sleep(0.05)
                assert hook["attempts"] == 1, hook
                assert ("error" in hook) == (status == "failed"), hook
        assert len(receiver.calls) == 1  # sent once, by the worker
    finally:
        receiver.close()
        for node in nodes:
            node.check_clean_exit()
        worker.check_clean_exit()


def test_history_written_by_whoever_ends_the_job(own_redis):
    """With --history on PostgreSQL, the party that ends a job writes its
    row, once: the worker for what it ran (so a job whose node died is
    still recorded), the node for what it ended itself (a DELETE)."""
    from test_history import ALICE, KEYS, Postgres, listed, metric
    pg = Postgres()
    url = pg.new_database()
    worker = Worker(own_redis.url, "--name", "w1", "--history", url)
    nodes = []
    try:
        nodes.append(api_node(own_redis, *KEYS, "--history", url))
        wait_serving(nodes[0])
        orphan = submit(nodes[0], 500, headers=ALICE)
        nodes[0].proc.kill()  # SIGKILL: it never sees its job end
        nodes[0].proc.wait()
        nodes.append(api_node(own_redis, *KEYS, "--history", url))
        node = nodes[1]
        wait_serving(node)
        assert wait_final(node, orphan, headers=ALICE)["status"] == "succeeded"
        ran = submit(node, 501, headers=ALICE)
        assert wait_final(node, ran, headers=ALICE)["status"] == "succeeded"
        answer = node.post("/api/v1/jobs", files={"image": image_bytes()}, data={"num_inference_steps": "150"},
                           headers=ALICE)
        assert answer.status_code == 202, answer.text
        deleted = answer.json()["id"]
        deadline = time.time() + 60
        while node.get(f"/api/v1/jobs/{deleted}", headers=ALICE).json()["status"] != "running":
            assert time.time() < deadline, "the long job never started"
            time.sleep(0.05)
        assert node.delete(f"/api/v1/jobs/{deleted}", headers=ALICE).status_code == 200
        rows = {j["id"]: j for j in listed(node, ALICE, 3)["jobs"]}
        assert {i: rows[i]["status"] for i in rows} == {orphan: "succeeded", ran: "succeeded", deleted: "canceled"}
        assert rows[orphan]["worker"] == rows[ran]["worker"] == "w1", rows
        time.sleep(0.5)
        # each row written once, by whoever ended its job: the worker the two
        # it ran; the canceled one the node, unless the worker saw the cancel
        # key and ended the task first (its finish reads the job as it ends,
        # so the DELETE's removal right after cannot lose the row)
        by_node = metric(node, 'sdx4_history_entries_total{outcome="written"}')
        by_worker = re.search(r'sdx4_history_entries_total\{outcome="written"\} (\d+)', worker.get("/metrics").text)
        assert by_node in (0, 1) and by_worker and by_node + int(by_worker.group(1)) == 3, (by_node, by_worker)
    finally:
        for node in nodes[1:]:
            node.check_clean_exit()
        worker.check_clean_exit()
        pg.close()
