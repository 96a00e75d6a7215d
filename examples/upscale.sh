#!/bin/sh
# Upscale an image with a running `sdx4 serve` using curl.
#
#   sh upscale.sh IN OUT        (SDX4_URL, SDX4_API_KEY and STEPS from the environment)
#
# Shows the service endpoints, a synchronous upscale, and the same work as a
# job: create it, poll it, fetch its result.
set -eu
in=$1
out=$2
url=${SDX4_URL:-http://127.0.0.1:8000}
steps=${STEPS:-20}
set -- # from here "$@" holds the authentication header, if any
if [ -n "${SDX4_API_KEY:-}" ]; then set -- -H "Authorization: Bearer $SDX4_API_KEY"; fi

curl -fsS "$url/api/v1/health"; echo
curl -fsS "$@" "$url/api/v1/model-info"; echo

# one request, answered with the image; -D - prints the X-* headers
curl -fsS "$@" -F "image=@$in" -F "num_inference_steps=$steps" -F seed=42 -F "prompt=a photo" \
     -D - -o "$out" "$url/api/v1/upscale" | grep -i '^x-'

# the same as a job
job=$(curl -fsS "$@" -F "image=@$in" -F "num_inference_steps=$steps" -F seed=42 -F "prompt=a photo" \
      "$url/api/v1/jobs")
id=$(printf '%s' "$job" | sed 's/.*"id":"\([0-9a-f]*\)".*/\1/')
while :; do
    status=$(curl -fsS "$@" "$url/api/v1/jobs/$id")
    case $status in
    *'"status":"succeeded"'*) break ;;
    *'"status":"failed"'* | *'"status":"canceled"'*) echo "$status" >&2; exit 1 ;;
    esac
    sleep 0.2
done
curl -fsS "$@" -o "$out.job" "$url/api/v1/jobs/$id/result"
cmp "$out" "$out.job" && echo "job result = upscale result (same seed and parameters)"
