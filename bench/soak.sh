#!/usr/bin/env bash
# soak.sh - ten minutes of mixed load on the real server with its RSS
# sampled (bench/soak.py says what load and what verdict). Not part of CI:
# it takes the whole duration and both cores of a small machine.
#
#   bench/soak.sh [seconds] [-- more sdx4 serve flags]
#
# Environment: SDX4 (build/sdx4), MODEL (the reference data's tiny model,
# ../shared/reference/tiny/model), SDX4_SERVER_VENV (tests/server's virtual
# environment, made from its requirements.txt when missing, as
# tests/server/run.sh makes it), BOUND (32: MiB of RSS growth after the
# warm-up that fails), CSV (a file for every RSS sample). Exit status 0 when
# the verdict is PASS.
set -euo pipefail
cd "$(dirname "$0")/.."
SDX4=${SDX4:-build/sdx4}
MODEL=${MODEL:-${SDX4_REFERENCE:-../shared/reference}/tiny/model}
venv=${SDX4_SERVER_VENV:-${TMPDIR:-/tmp}/sdx4-server-venv}
seconds=600
if [ $# -gt 0 ] && [ "$1" != "--" ]; then seconds=$1; shift; fi
[ "${1:-}" = "--" ] && shift
[ -x "$SDX4" ] || { echo "soak: no sdx4 binary at $SDX4 (build first)" >&2; exit 1; }
tests/server/venv.sh
exec "$venv/bin/python" bench/soak.py --sdx4 "$SDX4" --model "$MODEL" --seconds "$seconds" \
    --bound "${BOUND:-32}" ${CSV:+--csv "$CSV"} -- "$@"
