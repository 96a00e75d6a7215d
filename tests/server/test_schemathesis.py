"""Schemathesis (property-based API testing from openapi.json) against the
running server, with every check enabled; see schemathesis.toml for the one
expectation the schema cannot state and schemathesis_hooks.py for the check
that keeps it to that. API keys are on (schemathesis.toml gives it the key),
so that the checks on authentication have something to check; their failed
attempts are not throttled (--auth-failures 0), or every later check would
meet a 429 (test_tenancy.py tests the throttling)."""
import os
import subprocess
import sys

from conftest import Server

HERE = os.path.dirname(os.path.abspath(__file__))


def test_schemathesis_all_checks(tmp_path):
    # --max-side 64: images taken from answers are real ones (see schemathesis_hooks.py);
    # the valid examples are real one-step upscales (about 30: the coverage phase sends
    # the upscale operations invalid data only, schemathesis.toml), and the deadlines
    # (server 60 s, client 90 s, max_response_time 80 s in the toml) leave room for a
    # loaded machine, where 40 s once met a 503 queue-too-long (41 s estimated)
    # a small GAN beside the tiny model: AUTOMATIC1111's routes upscale with it (schemathesis_hooks.py)
    s = Server("--api-keys", "st-key", "--webhook-secret", "st-secret", "--request-timeout", "60",
               "--max-side", "64", "--auth-failures", "0", "--history", str(tmp_path / "history.db"),
               "--model", os.path.join(HERE, "..", "data", "gan", "srvgg_x2_relu"))
    try:
        st = os.path.join(os.path.dirname(sys.executable), "schemathesis")
        examples = os.environ.get("SDX4_SCHEMATHESIS_EXAMPLES", "25")
        # run in a scratch folder: schemathesis and hypothesis keep their caches in it
        r = subprocess.run([st, "--config-file", os.path.join(HERE, "schemathesis.toml"), "run",
                            s.url + "/openapi.json", "--checks", "all", "--max-examples", examples,
                            "--seed", "1", "--request-timeout", "90"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=900,
                           env=dict(os.environ, SCHEMATHESIS_HOOKS=os.path.join(HERE, "schemathesis_hooks.py")))
        assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-2000:]
    finally:
        s.check_clean_exit()
