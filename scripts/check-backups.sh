#!/usr/bin/env bash
# scripts/check-backups.sh [SDX4_BIN]: the backup and restore procedures of
# docs/production/operations.md, run against real servers. Not a step of
# scripts/test.sh (a minute and a half on two busy cores): run it when the
# procedures, or what sdx4 keeps in Redis or the history, change.
#   redis     Redis with the StatefulSet's persistence options, an API node
#             and a worker; an async job run; BGSAVE and dump.rdb copied;
#             all stopped; the RDB restored into an append-only Redis
#             (loaded with appendonly off, then switched on); a new API node
#             and worker must show the job succeeded and serve its result
#   sqlite    sdx4 serve --history FILE; two upscales; sqlite3 .backup while
#             it runs; a new server on the copy must list both for the key
#   postgres  the same with a PostgreSQL server of its own, pg_dump -Fc while
#             sdx4 runs and pg_restore into a new database; then the jobs
#             table restored without sdx4_secret: its rows are there and no
#             key sees them
# Needs redis-server, sqlite3 and PostgreSQL 15's initdb and pg_ctl (Debian's
# packages, scripts/install-deps.sh), and the tiny model of the reference data.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
sdx4=$(realpath "${1:-$root/build/sdx4}")
model=${SDX4_REFERENCE:-$root/../shared/reference}/tiny/model
pg=/usr/lib/postgresql/15/bin
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -f "$work/pg/data/postmaster.pid" ] && runuser -u nobody -- "$pg/pg_ctl" -D "$work/pg/data" -m fast -w stop >/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
failed=0
fail() { echo "FAILED: $*"; failed=1; }

# start NAME ARGS...: an sdx4 process in the background, logged to $work/NAME.log
start() {
    local name=$1
    shift
    "$sdx4" "$@" >"$work/$name.log" 2>&1 &
    pids+=($!)
}
stop_all_sdx4() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
}
wait_url() { for _ in $(seq 150); do curl -sf "$1" >/dev/null && return 0; sleep 0.2; done; return 1; }

# redis_start DIR APPENDONLY: redis-server with the StatefulSet's options on DIR/sock
redis_start() {
    redis-server --appendonly "$2" --appendfsync everysec --dir "$1" --maxmemory 1536mb \
        --maxmemory-policy noeviction --port 0 --unixsocket "$1/sock" >"$1/log" 2>&1 &
    redis_pid=$!
    for _ in $(seq 50); do redis-cli -s "$1/sock" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
    return 1
}
# redis_stop DIR [nosave]
redis_stop() {
    local dir=$1
    shift
    redis-cli -s "$dir/sock" shutdown "$@" >/dev/null 2>&1 || true
    wait "$redis_pid" 2>/dev/null || true
}
# info_is DIR FIELD VALUE: waits until INFO persistence says FIELD:VALUE
info_is() {
    for _ in $(seq 100); do
        redis-cli -s "$1/sock" info persistence | tr -d '\r' | grep -qx "$2:$3" && return 0
        sleep 0.1
    done
    return 1
}

# a 64x64 PNG, upscaled through the API: `job PORT async|sync` prints the job id
job() {
    python3 - "$@" <<'PY'
import struct, sys, time, zlib, urllib.request, json, uuid
port, mode = sys.argv[1], sys.argv[2]
raw = b"".join(b"\0" + bytes((x * 4 + y) % 256 for x in range(192)) for y in range(64))
chunk = lambda k, d: struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d))
png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0))
       + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
b = uuid.uuid4().hex
body = (f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        .encode() + png + f'\r\n--{b}\r\nContent-Disposition: form-data; name="num_inference_steps"\r\n\r\n1\r\n--{b}--\r\n'.encode())
base = f"http://127.0.0.1:{port}/api/v1"
req = urllib.request.Request(base + ("/jobs" if mode == "async" else "/upscale"), body,
                             {"Content-Type": f"multipart/form-data; boundary={b}", "X-API-Key": "key-a"})
with urllib.request.urlopen(req) as r:
    if mode == "sync":
        print(r.headers["X-Request-Id"])
        sys.exit(0)
    job = json.load(r)["id"]
for _ in range(300):
    with urllib.request.urlopen(urllib.request.Request(f"{base}/jobs/{job}", headers={"X-API-Key": "key-a"})) as r:
        if json.load(r)["status"] == "succeeded":
            print(job)
            sys.exit(0)
    time.sleep(0.1)
sys.exit("the job did not succeed")
PY
}
listed() {
    sleep 1 # the history writes behind
    curl -sf -H "X-API-Key: key-a" "http://127.0.0.1:$1/api/v1/jobs" |
        python3 -c 'import json, sys; print(len(json.load(sys.stdin)["jobs"]))'
}

echo "== redis"
mkdir -p "$work/r1" "$work/r2"
redis_start "$work/r1" yes
start worker1 worker --redis "unix://$work/r1/sock" --model "$model" --port 18931 --warmup false --name w1
start api1 serve --redis "unix://$work/r1/sock" --workers 0 --model "$model" --port 18932 --rate-limit 0 --api-keys key-a
wait_url http://127.0.0.1:18932/api/v1/health || fail "the API node did not become ready"
id=$(job 18932 async)
redis-cli -s "$work/r1/sock" bgsave >/dev/null
info_is "$work/r1" rdb_bgsave_in_progress 0 && cp "$work/r1/dump.rdb" "$work/r2/" || fail "BGSAVE"
stop_all_sdx4
redis_stop "$work/r1" nosave
# an append-only Redis ignores dump.rdb: load it with appendonly off, switch on, restart
redis_start "$work/r2" no
redis-cli -s "$work/r2/sock" config set appendonly yes >/dev/null
info_is "$work/r2" aof_rewrite_in_progress 0 && info_is "$work/r2" aof_rewrite_scheduled 0 || fail "AOF rewrite"
redis_stop "$work/r2"
redis_start "$work/r2" yes
start worker2 worker --redis "unix://$work/r2/sock" --model "$model" --port 18933 --warmup false --name w2
start api2 serve --redis "unix://$work/r2/sock" --workers 0 --model "$model" --port 18934 --rate-limit 0 --api-keys key-a
wait_url http://127.0.0.1:18934/api/v1/health || fail "the restored API node did not become ready"
status=$(curl -s -H "X-API-Key: key-a" "http://127.0.0.1:18934/api/v1/jobs/$id" | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])')
result=$(curl -s -o /dev/null -w '%{http_code} %{content_type}' -H "X-API-Key: key-a" "http://127.0.0.1:18934/api/v1/jobs/$id/result")
echo "restored job $id: $status, its result: $result"
[ "$status" = succeeded ] && [ "$result" = "200 image/png" ] || fail "the job did not survive the backup"
stop_all_sdx4
redis_stop "$work/r2"

echo "== sqlite and postgres"
mkdir -p "$work/pg"
chmod 755 "$work" # PostgreSQL refuses to run as root: it runs as nobody, in $work/pg
chown nobody "$work/pg"
as_nobody=(runuser -u nobody --)
"${as_nobody[@]}" "$pg/initdb" -D "$work/pg/data" -A trust -U sdx4 --locale=C -E UTF8 --no-sync >/dev/null
"${as_nobody[@]}" "$pg/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w -o "-k $work/pg -c listen_addresses=''" start >/dev/null
"${as_nobody[@]}" "$pg/createdb" -h "$work/pg" -U sdx4 history
"${as_nobody[@]}" "$pg/createdb" -h "$work/pg" -U sdx4 restored
for kind in sqlite postgres; do
    if [ "$kind" = sqlite ]; then
        from=$work/history.db to=$work/restored.db
    else
        from="postgresql://sdx4@/history?host=$work/pg" to="postgresql://sdx4@/restored?host=$work/pg"
    fi
    start "$kind-1" serve --model "$model" --port 18935 --warmup false --rate-limit 0 --api-keys key-a --history "$from"
    wait_url http://127.0.0.1:18935/api/v1/health || fail "$kind: not ready"
    job 18935 sync >/dev/null && job 18935 sync >/dev/null
    before=$(listed 18935)
    if [ "$kind" = sqlite ]; then  # both while sdx4 runs
        sqlite3 "$from" ".backup $to"
    else
        pg_dump -Fc "$from" >"$work/history.dump" && pg_restore -d "$to" "$work/history.dump"
    fi
    stop_all_sdx4
    start "$kind-2" serve --model "$model" --port 18936 --warmup false --rate-limit 0 --api-keys key-a --history "$to"
    wait_url http://127.0.0.1:18936/api/v1/health || fail "$kind: the restored server is not ready"
    after=$(listed 18936)
    echo "$kind: $before jobs listed before the backup, $after after the restore"
    [ "$before" = 2 ] && [ "$after" = 2 ] || fail "$kind: the history did not survive the backup"
    stop_all_sdx4
done
# the jobs table without sdx4_secret: a new secret is drawn and no key owns the old rows
"${as_nobody[@]}" "$pg/createdb" -h "$work/pg" -U sdx4 nosecret
pg_restore -t sdx4_jobs -d "postgresql://sdx4@/nosecret?host=$work/pg" "$work/history.dump"
start nosecret serve --model "$model" --port 18937 --warmup false --rate-limit 0 --api-keys key-a \
    --history "postgresql://sdx4@/nosecret?host=$work/pg"
wait_url http://127.0.0.1:18937/api/v1/health || fail "nosecret: not ready"
rows=$(psql -At -h "$work/pg" -U sdx4 -d nosecret -c "SELECT count(*) FROM sdx4_jobs")
echo "postgres without sdx4_secret: $rows rows restored, $(listed 18937) jobs listed"
[ "$(listed 18937)" = 0 ] && [ "$rows" = 2 ] || fail "the history without its secret"
stop_all_sdx4
[ "$failed" = 0 ] && echo "backups: Redis, SQLite and PostgreSQL restored as docs/production/operations.md says"
exit "$failed"
