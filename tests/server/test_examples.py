"""The clients in examples/ run against a real server (with an API key)."""
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT, Server, image_bytes

EXAMPLES = os.path.join(ROOT, "examples")


@pytest.fixture(scope="module")
def keyed_server():
    s = Server("--api-keys", "example-key")
    yield s
    s.check_clean_exit()


def run_example(cmd, server, tmp_path):
    src = tmp_path / "in.png"
    src.write_bytes(image_bytes())
    out = tmp_path / "out.png"
    env = dict(os.environ, SDX4_URL=server.url, SDX4_API_KEY="example-key", STEPS="2")
    r = subprocess.run(cmd + [str(src), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert Image.open(out).size == (256, 256)
    return r


def test_python_example(keyed_server, tmp_path):
    run_example([sys.executable, os.path.join(EXAMPLES, "upscale.py"), "--steps", "2", "--seed", "3"],
                keyed_server, tmp_path)
    r = run_example([sys.executable, os.path.join(EXAMPLES, "upscale.py"), "--steps", "2", "--job"],
                    keyed_server, tmp_path)
    assert "succeeded: step 2 of 2" in r.stderr


def test_curl_example(keyed_server, tmp_path):
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    r = run_example(["sh", os.path.join(EXAMPLES, "upscale.sh")], keyed_server, tmp_path)
    assert "x-seed: 42" in r.stdout.lower() and "job result = upscale result" in r.stdout


def test_javascript_example(keyed_server, tmp_path):
    node = shutil.which("node")
    if not node:
        pytest.skip("node is not installed")
    major = int(subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip("v\n").split(".")[0])
    if major < 18:
        pytest.skip("the example needs Node 18 or later (fetch)")
    r = run_example([node, os.path.join(EXAMPLES, "upscale.mjs")], keyed_server, tmp_path)
    assert "succeeded: step 2 of 2" in r.stderr


def test_example_reports_problems(keyed_server, tmp_path):
    src = tmp_path / "in.png"
    src.write_bytes(b"not an image")
    env = dict(os.environ, SDX4_URL=keyed_server.url, SDX4_API_KEY="example-key")
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, "upscale.py"), str(src), str(tmp_path / "o.png")],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "error 415 Unsupported image format" in r.stderr
