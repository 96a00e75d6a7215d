#!/bin/sh
# HTTP benchmark: `sdx4 serve` vs a minimal FastAPI + uvicorn app with the
# same three routes (health, a request refused for its magic number, an
# upscale answered from the cache), measured with wrk on loopback.
#   bench/http/run_http_bench.sh [SDX4_BIN [MODEL_DIR]]
# Needs wrk (apt-get install wrk); FastAPI, uvicorn and Pillow go into a
# throwaway venv (.venv-http-bench, comparison only). D=seconds, C=connections.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
BIN=${1:-$root/build/sdx4}
MODEL=${2:-$root/../shared/reference/tiny/model}
D=${D:-10}
C=${C:-32}
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN") # absolute: we cd below
MODEL=$(cd "$MODEL" && pwd)
venv=$root/.venv-http-bench
[ -x "$venv/bin/uvicorn" ] || { python3 -m venv "$venv" &&
  "$venv/bin/pip" install -q fastapi uvicorn pillow python-multipart; }
cd "$here"
post() { curl -s -o /dev/null -D - -H 'Content-Type: multipart/form-data; boundary=sdx4benchboundary' \
  --data-binary @cached.body "$1/api/v1/upscale" | grep -i x-cache; }
load() { # name url
  for t in health bad cached; do
    case $t in
    health) wrk -t2 -c$C -d${D}s --latency "$2/api/v1/health" ;;
    bad) wrk -t2 -c$C -d${D}s --latency -s post.lua "$2/api/v1/upscale" -- bad.body ;;
    cached) wrk -t2 -c$C -d${D}s --latency -s post.lua "$2/api/v1/upscale" -- cached.body ;;
    esac | grep -E 'Requests/sec|99%|Non-2xx|Socket errors' | sed "s/^/$1 $t: /"
  done
}
echo "load: $(uptime)"
"$BIN" serve --model "$MODEL" --port 18500 --warmup false --rate-limit 0 2>/dev/null &
SPID=$!
until curl -s -o /dev/null 127.0.0.1:18500/api/v1/health; do sleep 0.5; done
post http://127.0.0.1:18500; post http://127.0.0.1:18500 # miss, then hit
echo "sdx4 idle RSS kB: $(ps -o rss= -p $SPID)"
load sdx4 http://127.0.0.1:18500
kill $SPID; wait $SPID
"$venv/bin/uvicorn" fastapi_app:app --port 18501 --workers 2 --log-level warning &
UPID=$!
until curl -s -o /dev/null 127.0.0.1:18501/api/v1/health; do sleep 0.5; done
post http://127.0.0.1:18501; post http://127.0.0.1:18501
echo "uvicorn RSS kB (workers + master): $(ps -o rss= --ppid $UPID | awk '{s+=$1} END {print s}') + $(ps -o rss= -p $UPID)"
load fastapi http://127.0.0.1:18501
kill $UPID; wait $UPID 2>/dev/null
