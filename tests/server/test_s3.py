"""Async jobs' results in S3-compatible storage (--s3-bucket), against a
real local S3 server: moto's (`moto_server`, from PyPI's moto), started
on a loopback port here and stopped after; in cluster mode too, with a
real redis-server (conftest's RedisServer) and `sdx4 worker`.

moto checks request signatures only while its IAM is on, and then answers
every presigned URL 500; so the uploads are made with IAM on (a wrong
signature is refused 403), IAM is switched off to fetch presigned URLs,
and each presigned URL's signature is checked against botocore's
(the AWS SDK's own signer) for the same instant. moto does not check
presigned signatures nor their expiry at all: that a forged or expired
URL is refused is not tested against a server here.
"""
import base64
import datetime
import json
import os
import re
import shutil
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from unittest import mock

import pytest
import requests

from conftest import SDX4, RedisServer, Server, Worker, image_bytes, pki, problem, wait_job  # noqa: F401 (pki: a fixture)
from test_hooks_logs import Receiver

BUCKET = "sdx4-results"
REGION = "eu-west-3"
MOTO = os.path.join(os.path.dirname(sys.executable), "moto_server")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """A moto S3 server with one bucket and one IAM user allowed everything."""

    def __init__(self, pki=None):
        """With `pki` (conftest's), over HTTPS with a certificate of its test CA."""
        if not os.path.exists(MOTO):
            pytest.skip(f"S3 tests SKIPPED: no moto_server beside {sys.executable} "
                        "(tests/server/requirements.txt installs moto)")
        import boto3
        self.verify = pki["ca.pem"] if pki else True
        tls = ["-c", pki["a.pem"], "-k", pki["a.key"]] if pki else []
        # free_port() closes the port before moto binds it: another process
        # may take it meanwhile (moto then exits), so a few ports are tried
        if not any(self.start(pki, tls) for _ in range(3)):
            raise RuntimeError("moto_server did not start on three free ports")
        anon = dict(endpoint_url=self.url, region_name=REGION, aws_access_key_id="setup",
                    aws_secret_access_key="setup", verify=self.verify)
        iam = boto3.client("iam", **anon)
        iam.create_user(UserName="sdx4")
        policy = iam.create_policy(PolicyName="all", PolicyDocument='{"Version": "2012-10-17", "Statement": '
                                   '[{"Effect": "Allow", "Action": "*", "Resource": "*"}]}')
        iam.attach_user_policy(UserName="sdx4", PolicyArn=policy["Policy"]["Arn"])
        key = iam.create_access_key(UserName="sdx4")["AccessKey"]
        self.key, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        # temporary credentials, as an IAM role's (Kubernetes' IRSA, an instance profile)
        role = iam.create_role(RoleName="sdx4", AssumeRolePolicyDocument='{"Version": "2012-10-17", '
                               '"Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, '
                               '"Action": "sts:AssumeRole"}]}')
        iam.attach_role_policy(RoleName="sdx4", PolicyArn=policy["Policy"]["Arn"])
        sts = boto3.client("sts", endpoint_url=self.url, region_name=REGION, aws_access_key_id=self.key,
                           aws_secret_access_key=self.secret, verify=self.verify)
        self.role = sts.assume_role(RoleArn=role["Role"]["Arn"], RoleSessionName="sdx4-test")["Credentials"]
        self.s3 = boto3.client("s3", endpoint_url=self.url, region_name=REGION, aws_access_key_id=self.key,
                               aws_secret_access_key=self.secret, verify=self.verify)
        self.s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})

    def start(self, pki, tls):
        """Whether moto_server started and answers on a free port."""
        self.port = free_port()
        self.url = f"{'https' if pki else 'http'}://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(self.port), *tls],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while self.proc.poll() is None:
            try:
                if requests.get(self.url + "/moto-api/", timeout=2, verify=self.verify).status_code == 200:
                    return True
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("moto_server did not answer within 30 s")
            time.sleep(0.1)
        return False

    def iam(self, on):
        """Signature checks on (every request must be signed by a known key) or off."""
        r = requests.post(self.url + "/moto-api/reset-auth", data=b"0" if on else b"1e12", timeout=10,
                          verify=self.verify)
        assert r.status_code == 200, r.text

    def env(self, **extra):
        e = {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_SESSION_TOKEN": "",
             "AWS_REGION": REGION}
        e.update(extra)
        return e

    def role_env(self):
        return self.env(AWS_ACCESS_KEY_ID=self.role["AccessKeyId"],
                        AWS_SECRET_ACCESS_KEY=self.role["SecretAccessKey"],
                        AWS_SESSION_TOKEN=self.role["SessionToken"])

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def moto():
    m = Moto()
    yield m
    m.stop()


def s3_flags(endpoint):
    return ["--s3-bucket", BUCKET, "--s3-endpoint", endpoint, "--s3-path-style", "true"]


def s3_server(moto, *flags, env=None):
    return Server(*s3_flags(moto.url), *flags, env=env or moto.env())


def s3_worker(moto, redis, name, endpoint, *flags):
    """An `sdx4 worker` with the bucket's settings and moto's credentials."""
    with mock.patch.dict(os.environ, moto.env()):
        return Worker(redis.url, "--name", name, *s3_flags(endpoint), *flags)


def object_exists(moto, key):
    try:
        moto.s3.head_object(Bucket=BUCKET, Key=key)
        return True
    except moto.s3.exceptions.ClientError:
        return False


def check_schema(server, doc):
    """The job document is what openapi.json (as served) says a Job is."""
    import jsonschema
    spec = server.get("/openapi.json").json()
    jsonschema.validate(doc, {"$ref": "#/components/schemas/Job", "components": spec["components"]},
                        format_checker=jsonschema.FormatChecker())


def botocore_signature(moto, url):
    """The signature botocore gives the presigned URL's request at its X-Amz-Date
    (with the role's credentials, as test_async_results_in_s3's server has)."""
    import botocore.auth
    import botocore.awsrequest
    import botocore.credentials
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    when = datetime.datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
    credentials = botocore.credentials.Credentials(moto.role["AccessKeyId"], moto.role["SecretAccessKey"],
                                                   moto.role["SessionToken"])
    signer = botocore.auth.S3SigV4QueryAuth(credentials, "s3", REGION, expires=int(query["X-Amz-Expires"]))
    request = botocore.awsrequest.AWSRequest(method="GET", url=f"{parts.scheme}://{parts.netloc}{parts.path}")
    with mock.patch("botocore.auth.get_current_datetime", return_value=when):
        signer.add_auth(request)
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(request.url).query))["X-Amz-Signature"]


def test_objstore_program(moto):
    """The C client's own tests (tests/test_server_objstore.c) against this server."""
    program = os.path.join(os.path.dirname(SDX4), "test_server_objstore")
    if not os.path.exists(program):
        pytest.skip(f"no {program} (built with the ctest programs)")
    env = dict(os.environ, **moto.env(), SDX4_TEST_S3_ENDPOINT=moto.url, SDX4_TEST_S3_BUCKET=BUCKET)
    moto.iam(False)  # presigned URLs fetched
    out = subprocess.run([program], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "SKIPPED" not in out.stdout, out.stdout + out.stderr
    moto.iam(True)  # wrong secrets refused; then the same with a session token
    try:
        out = subprocess.run([program], env=dict(env, SDX4_TEST_S3_CHECKS_SIGNATURES="1"),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        out = subprocess.run([program], env=dict(env, **moto.role_env(), SDX4_TEST_S3_CHECKS_SIGNATURES="1"),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        moto.iam(False)


def test_async_results_in_s3(moto):
    """With a role's temporary credentials (a session token), as in Kubernetes."""
    server = s3_server(moto, "--s3-prefix", "/runs/one/", "--s3-url-ttl", "900", env=moto.role_env())
    try:
        moto.iam(True)  # every upload below must carry a valid signature
        try:
            r = server.post("/api/v1/jobs", files={"image": image_bytes()},
                            data={"num_inference_steps": "2", "seed": "7"})
            assert r.status_code == 202, r.text
            assert "results" not in r.json()
            job = wait_job(server, r.json()["id"])
            img = base64.b64encode(image_bytes(seed=3)).decode()
            r = server.post("/api/v1/batch-upscale?async=true",
                            json={"images": [img, base64.b64encode(b"junk data").decode()], "num_inference_steps": 1, "output_format": "jpeg"})
            batch = wait_job(server, r.json()["id"])
        finally:
            moto.iam(False)
        assert job["status"] == "succeeded", job
        check_schema(server, job)
        [entry] = job["results"]
        url = entry["result_url"]
        assert entry["index"] == 0 and url.startswith(f"{moto.url}/{BUCKET}/runs/one/{job['id']}/0.png?")
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        assert query["X-Amz-Expires"] == "900" and query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
        assert query["X-Amz-Security-Token"] == moto.role["SessionToken"]
        signed = datetime.datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
        expires = datetime.datetime.strptime(entry["expires_at"], "%Y-%m-%dT%H:%M:%SZ")
        assert expires - signed == datetime.timedelta(seconds=900)
        assert query["X-Amz-Signature"] == botocore_signature(moto, url)

        # the presigned URL works with no credentials at all, and holds the image
        stored = requests.get(url, timeout=30)
        assert stored.status_code == 200 and stored.headers["Content-Type"] == "image/png"
        assert stored.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert moto.s3.get_object(Bucket=BUCKET, Key=f"runs/one/{job['id']}/0.png")["Body"].read() == stored.content
        # /result redirects there; a synchronous request (never stored) gives the same bytes
        redirect = server.get(f"/api/v1/jobs/{job['id']}/result", allow_redirects=False)
        assert redirect.status_code == 307 and redirect.headers["Cache-Control"] == "no-store"
        assert redirect.headers["Location"].startswith(f"{moto.url}/{BUCKET}/runs/one/{job['id']}/0.png?")
        assert server.get(f"/api/v1/jobs/{job['id']}/result").content == stored.content
        sync = server.post("/api/v1/upscale", files={"image": image_bytes()},
                           data={"num_inference_steps": "2", "seed": "7"})
        assert sync.status_code == 200 and sync.content == stored.content
        assert sync.headers["X-Cache"] == "MISS"  # the async job bypassed the cache

        # a batch: one URL per image that succeeded
        assert batch["status"] == "succeeded", batch
        check_schema(server, batch)
        [entry] = batch["results"]
        assert entry["index"] == 0 and f"/runs/one/{batch['id']}/0.jpg?" in entry["result_url"]
        stored = requests.get(entry["result_url"], timeout=30)
        assert stored.status_code == 200 and stored.content[:3] == b"\xff\xd8\xff"
        listing = server.get(f"/api/v1/jobs/{batch['id']}/result").json()["results"]
        assert base64.b64decode(listing[0]["image"]) == stored.content and listing[1]["status"] == 415
    finally:
        server.check_clean_exit()


def test_store_down_fails_the_job(moto):
    """Nothing listens at the endpoint: the job fails at once, saying why;
    synchronous requests, which are not stored, still work."""
    dead = f"http://127.0.0.1:{free_port()}"
    server = Server("--s3-bucket", BUCKET, "--s3-endpoint", dead, "--s3-path-style", "true",
                    "--s3-timeout", "5", env=moto.env())
    try:
        start = time.time()
        r = server.post("/api/v1/jobs", files={"image": image_bytes()}, data={"num_inference_steps": "1"})
        job = wait_job(server, r.json()["id"], timeout=30)
        assert time.time() - start < 20
        assert job["status"] == "failed" and job["results"] == [], job
        check_schema(server, job)
        error = job["error"]
        assert error["type"] == "urn:sdx4:problem:storage-failed" and error["status"] == 502
        assert "could not be stored" in error["detail"] and dead[7:] in error["detail"], error
        p = problem(server.get(f"/api/v1/jobs/{job['id']}/result"), 409, "job-not-finished")
        assert "could not be stored" in p["detail"]
        sync = server.post("/api/v1/upscale", files={"image": image_bytes()}, data={"num_inference_steps": "1"})
        assert sync.status_code == 200
    finally:
        server.check_clean_exit()


def test_refused_signature_fails_the_job(moto):
    """A store that refuses the upload (a wrong secret): the job fails with its answer."""
    server = s3_server(moto, env=moto.env(AWS_SECRET_ACCESS_KEY="not-the-secret"))
    moto.iam(True)
    try:
        r = server.post("/api/v1/jobs", files={"image": image_bytes()}, data={"num_inference_steps": "1"})
        job = wait_job(server, r.json()["id"])
    finally:
        moto.iam(False)
        server.check_clean_exit()
    assert job["status"] == "failed", job
    assert job["error"]["type"] == "urn:sdx4:problem:storage-failed"
    assert "403" in job["error"]["detail"] and "SignatureDoesNotMatch" in job["error"]["detail"], job["error"]


def test_https_endpoint_behind_a_private_ca(pki):
    """An endpoint whose certificate a private CA signed (a MinIO inside a
    company): without --outbound-ca-file the upload fails its job on the
    certificate; with it the result is stored."""
    store = Moto(pki)
    try:
        for trust in ([], ["--outbound-ca-file", pki["ca.pem"]]):
            server = s3_server(store, *trust)
            try:
                r = server.post("/api/v1/jobs", files={"image": image_bytes()}, data={"num_inference_steps": "1"})
                job = wait_job(server, r.json()["id"])
            finally:
                server.check_clean_exit()
            if trust:
                assert job["status"] == "succeeded", job
                stored = store.s3.get_object(Bucket=BUCKET, Key=f"{job['id']}/0.png")["Body"].read()
                assert stored[:8] == b"\x89PNG\r\n\x1a\n"
            else:
                assert job["status"] == "failed" and "certificate" in job["error"]["detail"], job
    finally:
        store.stop()


@pytest.mark.parametrize("flags, env, message", [
    (["--s3-bucket", BUCKET], {"AWS_ACCESS_KEY_ID": ""}, "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    (["--s3-bucket", "No_Such/Bucket"], {}, "is not a bucket name"),
    (["--s3-bucket", BUCKET, "--s3-endpoint", "ftp://x"], {}, "must be http://"),
    (["--s3-bucket", BUCKET, "--s3-url-ttl", "604801"], {}, "s3-url-ttl must be"),
])
def test_bad_settings_refused(moto, flags, env, message):
    model = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    out = subprocess.run([SDX4, "serve", "--model", model, "--port", "0", *flags], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, **moto.env(**env)))
    assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed (scripts/install-deps.sh)")
def test_cluster_results_in_s3(moto):
    """An API-only node and a worker sharing a bucket: the worker uploads,
    Redis keeps no pixels, the node gives presigned URLs (the same bytes as
    a single-process run), so does the worker's webhook, and the node
    streams synchronous answers back from the store; DELETE removes the
    objects. A worker whose store is unreachable fails its tasks with
    storage-failed, and so does a worker without the bucket's settings."""
    form = {"num_inference_steps": "2", "seed": "7"}
    single = Server()
    try:
        want = single.post("/api/v1/upscale", files={"image": image_bytes()}, data=form)
        assert want.status_code == 200, want.text
    finally:
        single.check_clean_exit()
    redis, hooks = RedisServer(), Receiver()
    worker = node = None
    try:
        hook_flags = ["--webhook-secret", "hook-secret", "--webhook-private", "true"]
        worker = s3_worker(moto, redis, "s3-worker", moto.url, *hook_flags)
        node = Server("--redis", redis.url, "--workers", "0", "--request-timeout", "300", *s3_flags(moto.url),
                      *hook_flags, env=moto.env())
        moto.iam(True)  # the worker's uploads and the node's reads must carry valid signatures
        try:
            r = node.post("/api/v1/jobs", files={"image": image_bytes()}, data={**form, "webhook_url": hooks.url})
            assert r.status_code == 202, r.text
            job = wait_job(node, r.json()["id"])
            sync = node.post("/api/v1/upscale", files={"image": image_bytes()}, data=form)
            img = base64.b64encode(image_bytes(seed=3)).decode()
            r = node.post("/api/v1/batch-upscale?async=true",
                          json={"images": [img], "num_inference_steps": 1, "output_format": "jpeg"})
            batch = wait_job(node, r.json()["id"])
            # a batch's listing has the images inline: the node reads them back from the store
            listing = node.get(f"/api/v1/jobs/{batch['id']}/result").json()["results"]
        finally:
            moto.iam(False)
        assert job["status"] == "succeeded", job
        check_schema(node, job)
        [entry] = job["results"]
        key = f"{job['id']}/0.png"
        assert entry["result_url"].startswith(f"{moto.url}/{BUCKET}/{key}?")
        stored = requests.get(entry["result_url"], timeout=30)
        assert stored.status_code == 200 and stored.content == want.content
        redirect = node.get(f"/api/v1/jobs/{job['id']}/result", allow_redirects=False)
        assert redirect.status_code == 307 and redirect.headers["Location"].startswith(f"{moto.url}/{BUCKET}/{key}?")
        deadline = time.time() + 10
        while not hooks.calls:
            assert time.time() < deadline, "no webhook"
            time.sleep(0.05)
        [hooked] = json.loads(hooks.calls[0][3])["results"]
        assert hooked["index"] == 0 and requests.get(hooked["result_url"], timeout=30).content == want.content
        assert sync.status_code == 200 and sync.content == want.content, sync.text[:400]
        # the synchronous answer's object was removed once read back; the job's stays
        listed = moto.s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])
        assert [o["Key"] for o in listed if re.fullmatch(r"[0-9a-f]{32}/\d+\.png", o["Key"])] == [key]
        [entry] = batch["results"]
        assert batch["status"] == "succeeded" and f"/{batch['id']}/0.jpg?" in entry["result_url"], batch
        assert base64.b64decode(listing[0]["image"]) == requests.get(entry["result_url"], timeout=30).content
        assert redis.client().keys("sdx4:result:*") == []  # the images went to the store only
        state = json.loads(redis.client().hget(f"sdx4:job:{job['id']}", "task:0"))
        assert state["stored"] is True and state["bytes"] == len(want.content)

        # DELETE on the node removes the job's object too
        assert node.delete(f"/api/v1/jobs/{job['id']}").status_code == 200
        deadline = time.time() + 10
        while object_exists(moto, key):
            assert time.time() < deadline, "the deleted job's object is still in the store"
            time.sleep(0.1)

        # a worker whose store does not answer: its tasks fail, saying why
        worker.check_clean_exit()
        dead = f"http://127.0.0.1:{free_port()}"
        worker = s3_worker(moto, redis, "s3-dead", dead, "--s3-timeout", "5")
        r = node.post("/api/v1/jobs", files={"image": image_bytes()}, data={"num_inference_steps": "1"})
        job = wait_job(node, r.json()["id"], timeout=30)
        assert job["status"] == "failed" and job["results"] == [], job
        error = job["error"]
        assert error["type"] == "urn:sdx4:problem:storage-failed" and error["status"] == 502, error
        assert "could not be stored" in error["detail"] and dead[7:] in error["detail"], error
        sync = node.post("/api/v1/upscale", files={"image": image_bytes()}, data={"num_inference_steps": "1"})
        assert "could not be stored" in problem(sync, 502, "storage-failed")["detail"]

        # a worker without the bucket's settings: the node, which promises URLs, says so by name
        worker.check_clean_exit()
        worker = Worker(redis.url, "--name", "no-bucket")
        r = node.post("/api/v1/jobs", files={"image": image_bytes()}, data={"num_inference_steps": "1"})
        job = wait_job(node, r.json()["id"], timeout=30)
        assert job["status"] == "failed" and job["error"]["type"] == "urn:sdx4:problem:storage-failed", job
        assert "worker no-bucket kept the image in Redis" in job["error"]["detail"], job
    finally:
        if node:
            node.check_clean_exit()
        if worker:
            worker.check_clean_exit()
        redis.remove()
        hooks.close()


def test_worker_bad_settings_refused(moto):
    """`sdx4 worker` reads the --s3-* settings as serve does, and refuses the same way."""
    model = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    out = subprocess.run([SDX4, "worker", "--redis", "redis://127.0.0.1:1", "--model", model, "--port", "0",
                          *s3_flags(moto.url)], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, **moto.env(AWS_ACCESS_KEY_ID="")))
    assert out.returncode != 0 and "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in out.stderr, out.stderr[-2000:]
