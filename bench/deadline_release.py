"""How soon a worker is free after its request's 504 (issue 12, D1).

    python bench/deadline_release.py SDX4_BIN MODEL_DIR SIZE [TIMEOUT_S]

Starts `sdx4 serve` on loopback (one worker, no warm-up, so no request is
refused on its estimate), sends one seeded one-step upscale of a SIZE x SIZE
noise image with --request-timeout TIMEOUT_S (default 8), and prints when the
504 came and how long after it health showed the worker idle. Needs requests
and Pillow (tests/server/run.sh's virtualenv has both).
"""
import io
import json
import subprocess
import sys
import tempfile
import time

import requests
from PIL import Image

sdx4, model, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
timeout = sys.argv[4] if len(sys.argv) > 4 else "8"
log = tempfile.NamedTemporaryFile(prefix="sdx4-deadline-", suffix=".log", delete=False)
proc = subprocess.Popen([sdx4, "serve", "--model", model, "--host", "127.0.0.1", "--port", "0",
                         "--warmup", "false", "--rate-limit", "0", "--workers", "1",
                         "--request-timeout", timeout], stderr=log, env={"OMP_WAIT_POLICY": "passive"})
try:
    port = None
    while port is None:
        time.sleep(0.2)
        for line in open(log.name):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "listening":
                port = event["port"]
    url = f"http://127.0.0.1:{port}"
    while requests.get(url + "/api/v1/health", timeout=5).status_code != 200:
        time.sleep(0.2)
    png = io.BytesIO()
    Image.effect_noise((size, size), 40).convert("RGB").save(png, "PNG")
    start = time.time()
    r = requests.post(url + "/api/v1/upscale", files={"image": ("in.png", png.getvalue())},
                      data={"num_inference_steps": "1", "seed": "1"}, timeout=3600)
    answered = time.time()
    print(f"{size} px: {r.status_code} after {answered - start:.1f} s")
    while True:
        health = requests.get(url + "/api/v1/health", timeout=5).json()
        if not health.get("busy_workers") and health["queue"]["running"] == 0:
            break
        time.sleep(0.02)
    print(f"{size} px: worker free {time.time() - answered:.2f} s after the answer")
finally:
    proc.terminate()
    proc.wait()
