"""Schemathesis (property-based API testing from openapi.json) against the
running server, with every check enabled; see schemathesis.toml for the one
expectation the schema cannot state. API keys are on, so that the checks on
authentication have something to check; their failed attempts are not
throttled (--auth-failures 0), or every later check would meet a 429
(test_tenancy.py tests the throttling)."""
import os
import subprocess
import sys

from conftest import Server

HERE = os.path.dirname(os.path.abspath(__file__))


def test_schemathesis_all_checks(tmp_path):
    s = Server("--api-keys", "st-key", "--webhook-secret", "st-secret", "--request-timeout", "20",
               "--auth-failures", "0")
    try:
        st = os.path.join(os.path.dirname(sys.executable), "schemathesis")
        examples = os.environ.get("SDX4_SCHEMATHESIS_EXAMPLES", "25")
        # run in a scratch folder: schemathesis and hypothesis keep their caches in it
        r = subprocess.run([st, "--config-file", os.path.join(HERE, "schemathesis.toml"), "run",
                            s.url + "/openapi.json", "--checks", "all",
                            "-H", "Authorization: Bearer st-key", "--max-examples", examples,
                            "--seed", "1", "--request-timeout", "30"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-2000:]
    finally:
        s.check_clean_exit()
