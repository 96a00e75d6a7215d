#!/bin/sh
# bench/cluster_control_plane.sh [BUILD_DIR] [tool args...]
# Runs build/cluster_control_plane against a redis-server of its own (unix
# socket, no persistence: the figure is the protocol's, not the disk's;
# SDX4_BENCH_AOF=1 turns append-only on, fsync every second, as deployed).
set -eu
build=${1:-build}
[ $# -gt 0 ] && shift
dir=$(mktemp -d)
aof=no
[ "${SDX4_BENCH_AOF:-0}" = 1 ] && aof=yes
redis-server --port 0 --unixsocket "$dir/redis.sock" --dir "$dir" --save "" --appendonly "$aof" \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
trap 'kill $(cat "$dir/redis.pid") 2>/dev/null; sleep 0.2; rm -rf "$dir"' EXIT
for _ in $(seq 50); do [ -S "$dir/redis.sock" ] && break; sleep 0.1; done
"$build/cluster_control_plane" --redis "unix://$dir/redis.sock" "$@"
