"""Request history (--history): every finished job, synchronous or not,
recorded in SQLite or in a real PostgreSQL that this module starts itself
(initdb and pg_ctl from Debian's postgresql package, on a unix socket in a
temporary folder, as the unprivileged user `nobody` when run as root,
which PostgreSQL refuses to be). GET /api/v1/jobs lists the caller's own
jobs, newest first, by cursor, filtered by status and time; the history
outlives the server; and with PostgreSQL stopped under it the server goes
on serving, queues what it can, drops and counts the rest, and writes the
queue once PostgreSQL is back.

Upscales are expensive here (seconds each on the tiny model): each key
pays for one, and the rest of its jobs are answered from the result cache,
which finishes (and records) a job as any other."""
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
import requests

import jsonschema_rs  # schemathesis's own validator, installed with it

from conftest import ROOT, SDX4, Server, image_bytes, problem

PG_BIN = "/usr/lib/postgresql/15/bin"
ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"X-API-Key": "key-bob"}
KEYS = ("--api-keys", "key-alice,key-bob")
ADMIN = {"Authorization": "Bearer key-root"}  # an admin key
SEEDED = {"num_inference_steps": "1", "seed": "5"}


class Postgres:
    """A PostgreSQL server of its own, reachable on a unix socket only."""

    def __init__(self):
        for tool in ("initdb", "pg_ctl"):
            if not os.access(os.path.join(PG_BIN, tool), os.X_OK):
                pytest.skip(f"no {PG_BIN}/{tool}: install Debian's postgresql package "
                            "(scripts/install-deps.sh does) to test the PostgreSQL history")
        self.dir = tempfile.mkdtemp(prefix="sdx4-pg-")
        self.data = os.path.join(self.dir, "data")
        self.as_user = []
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
            self.as_user = ["runuser", "-u", "nobody", "--"]
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "sdx4", "--locale=C", "-E", "UTF8",
                  "--no-sync")
        self.databases = 0
        self.start()

    def _run(self, tool, *args):
        r = subprocess.run(self.as_user + [os.path.join(PG_BIN, tool), *args], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, f"{tool} failed: {r.stdout}{r.stderr}"

    def start(self):
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "log"), "-w", "-o",
                  f"-k {self.dir} -c listen_addresses='' -c fsync=off", "start")

    def new_database(self):
        """The URL of a database of its own, so that tests do not see each other's jobs."""
        self.databases += 1
        name = f"history{self.databases}"
        self._run("createdb", "-h", self.dir, "-U", "sdx4", name)
        return f"postgresql://sdx4@/{name}?host={self.dir}"

    def stop(self):
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def close(self):
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    pg = Postgres()
    yield pg
    pg.close()


@pytest.fixture(params=["sqlite", "postgres"])
def where(request, tmp_path):
    """What --history names: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "history.db")
    return request.getfixturevalue("postgres").new_database()


def page_schema():
    """A validator of JobHistoryPage, its references resolved in openapi.json."""
    with open(os.path.join(ROOT, "openapi.json"), encoding="utf-8") as f:
        doc = json.load(f)
    return jsonschema_rs.Draft202012Validator(dict(doc, **{"$ref": "#/components/schemas/JobHistoryPage"}))


PAGE = page_schema()


def test_openapi_example_is_a_page():
    with open(os.path.join(ROOT, "openapi.json"), encoding="utf-8") as f:
        op = json.load(f)["paths"]["/api/v1/jobs"]["get"]
    example = op["responses"]["200"]["content"]["application/json"]["example"]
    PAGE.validate(example)
    assert example["jobs"] and example["next_cursor"]
    assert not PAGE.is_valid(dict(example, next_cursor="not-a-cursor"))  # the schema does check


def listed(s, headers, want, query="", timeout=30):
    """The first page of `query` once it holds `want` jobs (the history is
    written behind the requests, by a thread of its own)."""
    deadline = time.time() + timeout
    while True:
        r = s.get("/api/v1/jobs" + query, headers=headers)
        assert r.status_code == 200, r.text
        page = r.json()
        PAGE.validate(page)
        if len(page["jobs"]) >= want or time.time() > deadline:
            assert len(page["jobs"]) == want, page
            return page


def walk(s, headers, query):
    """Every page of `query`, following next_cursor; the ids and the pages."""
    ids, pages, cursor = [], 0, None
    while True:
        q = query + (f"&cursor={cursor}" if cursor else "")
        page = s.get("/api/v1/jobs?" + q, headers=headers).json()
        ids += [j["id"] for j in page["jobs"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            return ids, pages


def metric(s, name):
    text = s.get("/metrics", headers=ALICE).text
    m = re.search("^" + re.escape(name) + r" (\S+)$", text, re.M)
    assert m, f"no {name} in /metrics"
    return float(m.group(1))


def upscale(s, headers):
    r = s.post("/api/v1/upscale", files={"image": image_bytes()}, data=SEEDED, headers=headers)
    assert r.status_code == 200, r.text
    return r.headers["X-Request-Id"]


def test_history_off():
    s = Server(*KEYS, "--admin-keys", "key-root")
    try:
        p = problem(s.get("/api/v1/jobs", headers=ALICE), 404, "not-found")
        assert "--history" in p["detail"]
        assert "--history" in problem(s.get("/api/v1/admin/usage", headers=ADMIN), 404, "not-found")["detail"]
        r = s.post("/api/v1/jobs", files={"image": b"x"}, headers=ALICE)  # POST is still job creation
        assert r.status_code == 415, r.text
        for r in (requests.options(s.url + "/api/v1/jobs", timeout=10),
                  requests.put(s.url + "/api/v1/jobs", headers=ALICE, timeout=10)):
            assert r.headers["Allow"] == "GET, HEAD, POST, OPTIONS", r.headers
    finally:
        s.check_clean_exit()


def test_unreachable_history_refuses_to_start(tmp_path):
    for where, says in ((str(tmp_path / "no" / "such" / "h.db"), "unable to open"),
                        ("postgresql://sdx4@/postgres?host=" + str(tmp_path), "cannot connect to PostgreSQL")):
        r = subprocess.run([SDX4, "serve", "--model", "x", "--history", where],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "sdx4 serve: history:" in r.stderr and says in r.stderr, r.stderr


def test_history_lists_own_jobs_and_survives_restart(where):
    s = Server(*KEYS, "--admin-keys", "key-root", "--history", where)
    try:
        alice = [upscale(s, ALICE) for _ in range(4)]  # one upscale, three cache hits
        r = s.post("/api/v1/jobs", files={"image": image_bytes()}, data=SEEDED, headers=ALICE)
        assert r.status_code == 202, r.text
        job = r.json()
        bob = upscale(s, BOB)
        # a job canceled while it runs: 150 steps take far longer than the DELETE
        r = s.post("/api/v1/jobs", files={"image": image_bytes(seed=1)},
                   data={"num_inference_steps": "150"}, headers=BOB)
        assert r.status_code == 202, r.text
        canceled = r.json()["id"]
        assert s.delete(f"/api/v1/jobs/{canceled}", headers=BOB).status_code == 200

        page = listed(s, ALICE, 5, "?limit=100")
        mine = page["jobs"]
        assert [j["request_id"] for j in mine[1:]] == alice[::-1], mine  # newest first
        assert mine[0]["id"] == job["id"] and mine[0]["kind"] == "job"
        first = mine[-1]
        assert first["kind"] == "upscale" and first["status"] == "succeeded" and first["images"] == 1
        assert first["input_pixels"] == 64 * 64 and first["output_bytes"] > 0 and first["worker"]
        assert first["created_at"] <= first["started_at"] <= first["finished_at"]
        params = first["parameters"][0]
        assert (params["steps"], params["seed"], params["input_size"], params["output_size"]) == \
            (1, 5, "64x64", "256x256")
        assert not params["cache_hit"] and mine[-2]["parameters"][0]["cache_hit"]
        assert re.fullmatch("[0-9a-f]{64}", params["model_hash"])  # the version that made it

        bobs = listed(s, BOB, 2, "?limit=100")["jobs"]
        assert [j["id"] for j in bobs][0] == canceled and bobs[1]["request_id"] == bob
        assert [j["status"] for j in bobs] == ["canceled", "succeeded"], bobs
        assert bobs[0]["error"]["kind"] == "canceled" and bobs[0]["parameters"][0]["steps"] == 150
        assert bobs[0]["parameters"][0]["output_size"] is None
        only = s.get("/api/v1/jobs?status=canceled", headers=BOB).json()["jobs"]
        assert [j["id"] for j in only] == [canceled]
        assert s.get("/api/v1/jobs?status=canceled", headers=ALICE).json()["jobs"] == []

        # paging: two at a time, every job once, in the same order
        ids, pages = walk(s, ALICE, "limit=2")
        assert ids == [j["id"] for j in mine] and pages == 3
        # time: [since, until) on the creation time
        t = mine[2]["created_at"]
        since = [j["id"] for j in s.get("/api/v1/jobs", params={"since": t}, headers=ALICE).json()["jobs"]]
        until = [j["id"] for j in s.get("/api/v1/jobs", params={"until": t}, headers=ALICE).json()["jobs"]]
        assert since == [j["id"] for j in mine[:3]] and until == [j["id"] for j in mine[3:]]

        # the admin API's usage: per client and UTC day; a canceled job is no error
        usage = s.get("/api/v1/admin/usage", headers=ADMIN).json()["usage"]
        today = time.strftime("%Y-%m-%d", time.gmtime())
        rows = {u["client"]: u for u in usage}
        assert len(usage) == 2 and all(u["date"] == today for u in usage), usage
        a, b = rows[mine[0]["client"]], rows[bobs[0]["client"]]
        assert (a["requests"], a["images"], a["errors"]) == (5, 5, 0) and a["compute_seconds"] > 0, a
        assert (b["requests"], b["images"], b["errors"]) == (2, 2, 0), b
        one = s.get("/api/v1/admin/usage", params={"client": mine[0]["client"]}, headers=ADMIN).json()
        assert one["usage"] == [a]
        later = s.get("/api/v1/admin/usage", params={"since": "2100-01-01T00:00:00Z"}, headers=ADMIN).json()
        assert later["usage"] == []
        problem(s.get("/api/v1/admin/usage?until=yesterday", headers=ADMIN), 422, "invalid-field")
        problem(s.get("/api/v1/admin/usage", headers=ALICE), 403, "forbidden")

        assert metric(s, 'sdx4_history_entries_total{outcome="written"}') >= 7
        assert metric(s, "sdx4_history_up") == 1
    finally:
        s.check_clean_exit()

    s = Server(*KEYS, "--history", where)
    try:
        assert listed(s, ALICE, len(page["jobs"]), "?limit=100") == page
    finally:
        s.check_clean_exit()


BAD_QUERIES = [
    ("limit=0", "limit"), ("limit=101", "limit"), ("limit=x", "limit"), ("limit=1&limit=2", "limit"),
    ("status=queued", "status"), ("status=running", "status"), ("status=done", "status"),
    ("since=yesterday", "since"), ("since=2026-12-06", "since"), ("until=2026-12-06T25:00:00Z", "until"),
    ("cursor=", "cursor"), ("cursor=abc", "cursor"), ("cursor=1-" + "g" * 32, "cursor"),
    ("cursor=1-" + "0" * 32 + "%00", "cursor"), ("order=asc", "order"),
]


def test_bad_queries(where):
    s = Server(*KEYS, "--history", where)
    try:
        for query, field in BAD_QUERIES:
            p = problem(s.get("/api/v1/jobs?" + query, headers=ALICE), 422, "invalid-field")
            assert p["field"] == field, (query, p)
        # a well-formed cursor of no row is simply the end
        r = s.get("/api/v1/jobs?cursor=1-" + "0" * 32, headers=ALICE)
        assert r.status_code == 200 and r.json() == {"jobs": [], "next_cursor": None}
    finally:
        s.check_clean_exit()


def test_anonymous_and_keyless(tmp_path):
    s = Server("--history", str(tmp_path / "h.db"))
    try:
        p = problem(s.get("/api/v1/jobs"), 403, "forbidden")  # no keys: a job is found by id only
        assert "id" in p["detail"]
    finally:
        s.check_clean_exit()
    s = Server(*KEYS, "--history", str(tmp_path / "h.db"))
    try:
        problem(s.get("/api/v1/jobs"), 401, "unauthorized")
    finally:
        s.check_clean_exit()


def test_postgres_outage(postgres):
    s = Server(*KEYS, "--history", postgres.new_database(), "--history-backlog", "2")
    try:
        upscale(s, BOB)  # the upscale the cache hits below reuse
        before = listed(s, BOB, 1, "?limit=100&status=succeeded").get("jobs")
        written = metric(s, 'sdx4_history_entries_total{outcome="written"}')
        postgres.stop()
        try:
            t0 = time.time()
            ids = [upscale(s, BOB) for _ in range(4)]  # serving goes on
            assert time.time() - t0 < 10
            problem(s.get("/api/v1/jobs", headers=BOB), 503, "history-unavailable")
            deadline = time.time() + 15
            while metric(s, "sdx4_history_up") != 0 and time.time() < deadline:
                time.sleep(0.1)
            assert metric(s, "sdx4_history_up") == 0
            assert metric(s, 'sdx4_history_entries_total{outcome="dropped"}') == 2  # 4 jobs, 2 slots
            assert metric(s, "sdx4_history_queued") == 2
        finally:
            postgres.start()
        page = listed(s, BOB, len(before) + 2, "?limit=100&status=succeeded")
        assert [j["request_id"] for j in page["jobs"][:2]] == ids[1::-1]  # the two queued ones
        assert metric(s, 'sdx4_history_entries_total{outcome="written"}') == written + 2
        assert metric(s, "sdx4_history_up") == 1
        events = [l.get("event") for l in s.logs() if isinstance(l, dict)]
        assert "history_unavailable" in events and "history_recovered" in events
        # restarted while nobody listed: the first listing after it finds
        # its connection closed, and reconnects rather than answering 503
        postgres.stop()
        postgres.start()
        assert s.get("/api/v1/jobs", headers=BOB).status_code == 200
    finally:
        s.check_clean_exit()


def test_a_frozen_postgres_costs_a_listing_its_timeout_not_the_server(postgres):
    """A database host that stops answering on open connections (SIGSTOP
    here: a frozen VM, a path that drops packets) enforces no
    statement_timeout: a listing waits --history-timeout, then gets 503,
    while the server answers everything else; SIGTERM is not held by the
    writer; once the host is back, a listing works on a new connection."""
    s = Server(*KEYS, "--history", postgres.new_database(), "--history-timeout", "2", "--shutdown-timeout", "3")
    pids = []
    try:
        upscale(s, BOB)
        listed(s, BOB, 1)
        master = int(open(os.path.join(postgres.data, "postmaster.pid")).readline())
        children = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
        pids = [master, *map(int, children)]
        try:
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            upscale(s, BOB)  # a finished job for the writer, which waits on the frozen host too
            t0 = time.time()
            r = s.get("/api/v1/jobs", headers=BOB, timeout=30)
            waited = time.time() - t0
            problem(r, 503, "history-unavailable")
            assert 2 <= waited < 8, waited
            assert any("did not answer within 2 s" in l.get("error", "") for l in s.logs()
                       if isinstance(l, dict) and l.get("event") == "history_read_failed")
            assert s.get("/api/v1/health").status_code == 200
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        listed(s, BOB, 2)
    finally:
        s.check_clean_exit()


def test_servers_share_postgres(postgres):
    """Two servers on one database, as a cluster's nodes are: a key's job
    made through one is listed through the other (the identity secret is
    the database's, not each process's), and another key's is not."""
    url = postgres.new_database()
    a = Server(*KEYS, "--history", url)
    b = Server(*KEYS, "--history", url)
    try:
        made = upscale(a, ALICE)
        assert [j["request_id"] for j in listed(b, ALICE, 1)["jobs"]] == [made]
        assert b.get("/api/v1/jobs", headers=BOB).json()["jobs"] == []
    finally:
        a.check_clean_exit()
        b.check_clean_exit()
