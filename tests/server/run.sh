#!/bin/sh
# tests/server/run.sh [SDX4_BIN [REFERENCE_DIR]] [pytest args...]
#
# The HTTP server's integration tests: pytest drives the real `sdx4 serve`
# on loopback ports with the reference data's tiny model, schemathesis
# included. Test-only Python packages go into a virtual environment
# (venv.sh: $SDX4_SERVER_VENV, default $TMPDIR/sdx4-server-venv), rebuilt
# when requirements.txt changes. The binary and the reference folder come from
# the arguments, else $SDX4_BIN and $SDX4_REFERENCE, else build/sdx4 and
# ../shared/reference beside the checkout. Other arguments go to pytest:
# scripts/test.sh adds `-n 2 --dist loadfile -m "not serial"` (each module
# on one of two processes, pytest-xdist), then runs `-m serial` alone.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${SDX4_BIN:-$root/build/sdx4}
ref=${SDX4_REFERENCE:-$root/../shared/reference}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then bin=$1; shift; fi
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then ref=$1; shift; fi

[ -x "$bin" ] || { echo "tests/server: no sdx4 binary at $bin" >&2; exit 1; }
[ -f "$ref/tiny/model/model_index.json" ] || { echo "tests/server: no tiny model in $ref" >&2; exit 1; }

venv=${SDX4_SERVER_VENV:-${TMPDIR:-/tmp}/sdx4-server-venv}
"$here/venv.sh"
[ -f "$venv/swagger-ui/swagger-ui-bundle.js" ] && export SDX4_TEST_DOCS_ASSETS="$venv/swagger-ui"

SDX4_BIN=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
SDX4_REFERENCE=$(cd "$ref" && pwd)
export SDX4_BIN SDX4_REFERENCE
export PYTHONDONTWRITEBYTECODE=1
cd "$here"
# the slowest tests in every log: where the suite's minutes go
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider --durations=25 "$@" .
