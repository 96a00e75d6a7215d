#!/usr/bin/env bash
# scripts/check-systemd.sh [SDX4_BIN]: checks deploy/systemd offline.
#   - systemd-analyze verify, silent: the unit's directives and values are
#     ones this systemd (Debian 12's 252) knows, its ExecStart pointed at the
#     built binary (default build/sdx4), as verify wants it executable;
#   - every variable of sdx4.env is a setting of src/server/config.c's
#     table (sdx4 ignores a misspelt SDX4_* variable);
#   - TimeoutStopSec covers SDX4_SHUTDOWN_TIMEOUT plus 10 s (webhooks, the
#     history and the log flush get up to 2 s each after the drain).
# Then each broken copy below must be refused with the message given. The
# unit is not started: that needs systemd as PID 1, which CI lacks.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/refuse-mutations.sh"
bin=$(realpath "${1:-$root/build/sdx4}")
[ -x "$bin" ] || { echo "check-systemd: no sdx4 binary at $bin"; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# check DIR: the checks above on DIR/sdx4.service and DIR/sdx4.env, output in $work/out
check() {
    local dir=$1
    {
        sed "s#^ExecStart=/usr/local/bin/sdx4 #ExecStart=$bin #" "$dir/sdx4.service" > "$work/sdx4.service" &&
        # verify exits 0 on unknown keys and unparsable values (it warns and
        # ignores them, as systemd would): any line it prints is a failure
        systemd-analyze verify "$work/sdx4.service" >"$work/verify" 2>&1
        cat "$work/verify"
        [ ! -s "$work/verify" ] &&
        python3 - "$root/src/server/config.c" "$dir/sdx4.service" "$dir/sdx4.env" <<'PY'
import re, sys
config, unit, env = (open(p).read() for p in sys.argv[1:])
settings = {"SDX4_" + n.upper().replace("-", "_") for n in re.findall(r'^\s*\{"([a-z0-9-]+)", OPT_', config, re.M)}
variables = dict(re.findall(r"^(SDX4_\w+)=(.*)$", env, re.M))
variables.update(re.findall(r"^Environment=(SDX4_\w+)=(.*)$", unit, re.M))
bad = sorted(set(variables) - settings)
for name in bad:
    print(f"{name} is not a setting of sdx4 serve (src/server/config.c)")
timeout = float(variables.get("SDX4_SHUTDOWN_TIMEOUT", 30))
stop = re.search(r"^TimeoutStopSec=(\d+)s?$", unit, re.M)
if not stop or int(stop.group(1)) < timeout + 10:
    print(f"TimeoutStopSec does not cover SDX4_SHUTDOWN_TIMEOUT={timeout:g} plus 10 s")
    bad.append("timeout")
sys.exit(1 if bad else 0)
PY
    } >"$work/out" 2>&1
}

failed=0
if check "$root/deploy/systemd"; then
    echo "systemd: sdx4.service verified, sdx4.env's settings known, TimeoutStopSec covers the drain"
else
    echo "systemd: FAILED"; sed 's/^/  /' "$work/out"; failed=1
fi

# Broken copies: file | sed program | what the refusal must say
mutations=(
  "sdx4.service|s/^ProtectSystem=strict/ProtectSystm=strict/|Unknown key 'ProtectSystm'"
  "sdx4.service|s/^RestrictNamespaces=yes/RestrictNamespaces=maybe/|Failed to parse"
  "sdx4.service|s/^TimeoutStopSec=45/TimeoutStopSec=30/|TimeoutStopSec does not cover"
  "sdx4.env|s/^SDX4_SHUTDOWN_TIMEOUT=30/SDX4_SHUTDOWN_TIMEOUT=60/|TimeoutStopSec does not cover"
  "sdx4.env|s/^SDX4_MODELS_DIR=/SDX4_MODEL_DIR=/|SDX4_MODEL_DIR is not a setting"
)
refuse_mutations "$root/deploy/systemd" systemd "${mutations[@]}"
exit "$failed"
