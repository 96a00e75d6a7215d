#!/usr/bin/env python3
"""Upscale an image with a running `sdx4 serve` (Python, requests).

    python3 upscale.py IN OUT [--url URL] [--api-key KEY] [--prompt TEXT]
                       [--steps N] [--seed S] [--job]

Without --job: one POST /api/v1/upscale that answers with the image.
With --job: POST /api/v1/jobs, follow its progress as Server-Sent Events,
then GET its result. The API key can also come from $SDX4_API_KEY.
"""
import argparse
import json
import os
import sys

import requests


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--url", default=os.environ.get("SDX4_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--api-key", default=os.environ.get("SDX4_API_KEY"))
    ap.add_argument("--prompt", default="")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--job", action="store_true", help="run as a job and show its progress")
    args = ap.parse_args()

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    fields = {"prompt": args.prompt, "num_inference_steps": str(args.steps)}
    if args.seed is not None:
        fields["seed"] = str(args.seed)
    with open(args.input, "rb") as f:
        files = {"image": (os.path.basename(args.input), f.read())}

    if not args.job:
        r = requests.post(f"{args.url}/api/v1/upscale", headers=headers, files=files, data=fields, timeout=600)
    else:
        r = requests.post(f"{args.url}/api/v1/jobs", headers=headers, files=files, data=fields, timeout=60)
        if r.status_code != 202:
            return fail(r)
        job = r.json()
        with requests.get(args.url + job["links"]["events"], headers=headers, stream=True, timeout=600) as events:
            for line in events.iter_lines(decode_unicode=True):
                if line.startswith("data: "):
                    status = json.loads(line[6:])
                    p = status["progress"]
                    print(f"{status['status']}: step {p['step']} of {p['total']}", file=sys.stderr)
        r = requests.get(args.url + job["links"]["result"], headers=headers, timeout=60)

    if r.status_code != 200:
        return fail(r)
    with open(args.output, "wb") as f:
        f.write(r.content)
    print(f"{args.output}: {r.headers['X-Output-Size']}, seed {r.headers['X-Seed']}, "
          f"{r.headers['X-Inference-Time-Ms']} ms", file=sys.stderr)
    return 0


def fail(r):
    """Errors are RFC 9457 problem documents."""
    try:
        p = r.json()
        print(f"error {p['status']} {p['title']}: {p.get('detail', '')} (request {p.get('request_id')})",
              file=sys.stderr)
    except ValueError:
        print(f"error {r.status_code}: {r.text[:200]}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
