#!/usr/bin/env bash
# scripts/check-monitoring.sh [SDX4_BIN]: checks deploy/monitoring (issue 18)
# offline, and with SDX4_BIN the exposition text of a real sdx4 serve.
#   - promtool check rules alerts.yml: every rule parses and is well formed;
#   - promtool test rules on alerts_test.yml: the alerts tested fire, and
#     stay quiet, on the series given (its descriptions filled in by
#     scripts/check-monitoring.py, as promtool compares annotations whole);
#   - dashboard.json is JSON, uses the Prometheus datasource variable in
#     every panel, and every query of it parses: check-monitoring.py turns
#     each into a recording rule that promtool check rules parses;
#   - check-monitoring.py check: each alert has `for:`, a severity and a
#     summary and description.
# That the metrics all exist is tests/server/test_monitoring.py's part: it
# scrapes real servers. Then the check is shown to fail: each broken copy
# of the folder below must be refused with the message given beside it.
#
# promtool: $SDX4_PROMTOOL, else promtool on PATH, else the one of Debian's
# `prometheus` package, unpacked (not installed) into
# ${TMPDIR:-/tmp}/sdx4-promtool on the first run: installing the package
# would bring about 320 MB (mostly libjs-moment-timezone, for its web UI)
# and start a Prometheus server wherever systemd runs; only promtool is used.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/refuse-mutations.sh"
promtool=${SDX4_PROMTOOL:-$(command -v promtool || true)}
if [ -z "$promtool" ]; then
    cache=${TMPDIR:-/tmp}/sdx4-promtool
    promtool=$cache/usr/bin/promtool
    if [ ! -x "$promtool" ]; then
        mkdir -p "$cache"
        sudo_cmd=""
        [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
        # apt writes as the _apt user where it can; the folder is ours
        ( cd "$cache" && { apt-get download prometheus >/dev/null 2>&1 ||
              { $sudo_cmd apt-get update -qq && apt-get download prometheus >/dev/null 2>&1; }; } &&
          dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool && rm -f prometheus_*.deb ) ||
            { echo "cannot get promtool from Debian's prometheus package"; exit 1; }
    fi
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# check DIR: every check above on the folder DIR; their output goes to $work/out
check() {
    local dir=$1
    {
        SDX4_MONITORING_DIR=$dir python3 "$root/scripts/check-monitoring.py" prepare "$work" &&
        "$promtool" check rules "$dir/alerts.yml" "$work/dashboard-rules.yml" &&
        "$promtool" test rules "$work/tests.yml"
    } >"$work/out" 2>&1
}

failed=0
if check "$root/deploy/monitoring"; then
    echo "monitoring: $(grep -c 'alert:' "$root/deploy/monitoring/alerts.yml") alerts and their unit tests pass," \
         "$(grep -A1 dashboard-rules "$work/out" | grep -o '[0-9]* rules' | cut -d' ' -f1) dashboard queries parse"
else
    echo "monitoring: FAILED"; sed 's/^/  /' "$work/out"; failed=1
fi

# With SDX4_BIN given: a real sdx4 serve's /metrics (the tiny model of the
# reference data), linted by promtool check metrics (the text format, and
# Prometheus's naming rules: counters end in _total, units spelled out)
if [ $# -gt 0 ]; then
    model=${SDX4_REFERENCE:-$root/../shared/reference}/tiny/model
    "$1" serve --model "$model" --port 0 --warmup false >"$work/serve.log" 2>&1 &
    serve_pid=$!
    port=
    for _ in $(seq 100); do
        port=$(grep -o '"event":"listening".*"port":[0-9]*' "$work/serve.log" | grep -o '[0-9]*$' || true)
        [ -n "$port" ] && curl -sf "http://127.0.0.1:$port/api/v1/health" >/dev/null && break
        sleep 0.1
    done
    curl -sf "http://127.0.0.1:$port/metrics" >"$work/metrics.txt" || true
    kill "$serve_pid"; wait "$serve_pid" || true
    if [ -s "$work/metrics.txt" ] && "$promtool" check metrics <"$work/metrics.txt" >"$work/out" 2>&1; then
        echo "monitoring: sdx4 serve's /metrics passes promtool check metrics ($(grep -c '^# TYPE' "$work/metrics.txt") families)"
    else
        echo "monitoring: sdx4 serve's /metrics FAILED promtool check metrics (or was not scraped)"
        sed 's/^/  /' "$work/out" "$work/serve.log" | tail -40; failed=1
    fi
fi

# Broken copies: file | sed program | what the refusal must say
mutations=(
  "alerts.yml|s/ratio_rate5m > 0.05/ratio_rate5m > 0.5/|SDX4HighErrorRate, time: 20m"
  "alerts.yml|0,/        for: 10m/{/        for: 10m/d}|SDX4HighErrorRate: no \`for:\`"
  "alerts.yml|0,/severity: critical/s//severity: page/|severity is not one of"
  "alerts.yml|s/max by (job) (sdx4_queue_depth) > 0)/max by (job) (sdx4_queue_depth) > 0/|unclosed left parenthesis"
  "alerts.yml|s/sdx4_gpu_memory_used_bytes \/ sdx4_gpu_memory_total_bytes > 0.9/sdx4_gpu_memory_used_bytes > 0.9/|SDX4GPUMemoryNearFull, time: 12m"
  "dashboard.json|0,/sum by (route) (rate(/s//sum by (route) (rate((/|unclosed left parenthesis"
  "dashboard.json|0,/\"uid\": \"\${datasource}\"/s//\"uid\": \"prometheus\"/|does not use"
  "dashboard.json|1s/{/[/|Expecting"
)
refuse_mutations "$root/deploy/monitoring" monitoring "${mutations[@]}"
exit "$failed"
