"""The admission estimator against the real time (issue 12, D1).

    SDX4_BIN=build/sdx4 SDX4_REFERENCE=../shared/reference \
        /tmp/sdx4-server-venv/bin/python bench/admission_accuracy.py [512]

Starts `sdx4 serve` on the tiny reference model with warm-up on (the
estimator's calibration), one worker, then sends one upscale at each size
and step count of `plan` (and 512 px with an argument: many minutes on a
CPU), printing health's estimate for the running request beside the
inference time the answer reports.
"""
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "server"))

from conftest import Server, image_bytes  # noqa: E402

plan = [(64, 1), (64, 20), (128, 1), (128, 10), (256, 1)]
if len(sys.argv) > 1:
    plan.append((512, 1))
s = Server("--warmup", "true", "--workers", "1", "--request-timeout", "3600", "--max-side", "512")
try:
    cal = [l for l in s.logs() if isinstance(l, dict) and l.get("event") == "calibrated"][0]
    print("calibration", json.dumps(cal), flush=True)
    for side, steps in plan:
        img = image_bytes(size=(side, side))
        answer = {}

        def upscale():
            answer["r"] = s.post("/api/v1/upscale", files={"image": img},
                                 data={"num_inference_steps": str(steps)}, timeout=3600)

        thread = threading.Thread(target=upscale)
        thread.start()
        estimate = None
        while estimate is None and thread.is_alive():
            busy = s.get("/api/v1/health").json()["busy_workers"]
            if busy:
                estimate = busy[0]["estimated_s"]
            time.sleep(0.05)
        thread.join()
        r = answer["r"]
        print(f"{side} px, {steps} steps: estimate {estimate:.2f} s, actual "
              f"{int(r.headers['X-Inference-Time-Ms']) / 1000:.2f} s (status {r.status_code}), "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    print("final", json.dumps(s.get("/api/v1/model-info").json()["cost"]), flush=True)
finally:
    s.check_clean_exit()
