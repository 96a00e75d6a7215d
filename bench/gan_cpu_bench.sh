#!/usr/bin/env bash
# gan_cpu_bench.sh - sdx4 and PyTorch (spandrel) on the CPU, side by side,
# on the GAN upscalers: each model folder given, at each input size, one
# after the other in the same run, each side in its own process under
# /usr/bin/time (CPU seconds against wall seconds show whether other work
# shared the cores).
#
#   bench/gan_cpu_bench.sh models/realesrgan-x4plus models/realesr-animevideov3-x4
#
# Environment: THREADS (2), REPEATS (3; the median of that many runs after
# an untimed one), SIZES ("256": 256 -> 1024 px), SDX4 (build/sdx4),
# PYTHON (/tmp/gan-venv/bin/python: tools/gan_goldens.py's venv, torch
# 2.15.0 and spandrel 0.4.2). Prints one line per side: model, size, ms,
# CPU seconds, peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
REPEATS=${REPEATS:-3}
SIZES=${SIZES:-256}
SDX4=${SDX4:-build/sdx4}
PYTHON=${PYTHON:-/tmp/gan-venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '%-26s %5s %-6s %10s %8s %9s\n' model size side ms cpu_s rss_mib
for model in "$@"; do
  for size in $SIZES; do
    for side in sdx4 torch; do
      if [ $side = sdx4 ]; then
        cmd=("$SDX4" bench --model "$model" --device cpu --threads "$THREADS" --size "$size" --repeats "$REPEATS")
      else
        cmd=("$PYTHON" bench/gan_torch_bench.py --model "$model" --threads "$THREADS" --size "$size"
             --repeats "$REPEATS")
      fi
      /usr/bin/time -f '%U %S %M' -o "$tmp/time" "${cmd[@]}" > "$tmp/out" 2> "$tmp/err" ||
        { cat "$tmp/err" >&2; exit 1; }
      ms=$(python3 -c 'import json, sys
d = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(d.get("pipeline_ms", d.get("ms")))' "$tmp/out")
      read -r user sys rss < "$tmp/time"
      printf '%-26s %5s %-6s %10.1f %8.1f %9.0f\n' "$(basename "$model")" "$size" $side "$ms" \
        "$(echo "$user + $sys" | bc)" "$((rss / 1024))"
    done
  done
done
