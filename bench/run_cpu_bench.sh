#!/usr/bin/env bash
# run_cpu_bench.sh - sdx4 and diffusers+PyTorch on the CPU, side by side.
#
# For each (size, steps) below it runs `sdx4 bench` and then
# bench/torch_cpu_bench.py with the same threads, sizes and model folder,
# each in its own process (so each peak RSS is one side's alone), under
# /usr/bin/time (CPU seconds against wall seconds show whether other work
# shared the cores). The JSON lines and the machine's state go to
# bench-out/<date>/, and a markdown table is printed at the end.
#
#   size 64,  20 steps: text encoder, UNet step 64x64, VAE 64->256,
#                       whole upscale 64->256
#   size 128,  1 step:  UNet step 128x128, VAE 128->512 (the one-step
#                       upscale 128->512 comes with it)
#
# Environment: THREADS (2), REPEATS (3; the median is kept), SDX4
# (build-bench/sdx4), MODEL (models/x4-random-fp32, made with
# `sdx4 make-model --config $CONFIG` when missing; CONFIG defaults to the
# published configuration with its tokenizer in /work/shared, else
# assets/x4-upscaler), PYTHON (.venv-bench/bin/python), RUNS
# ("64:20 128:1"), SIDES ("sdx4 torch"), NICE (0; a negative value, as
# root, lets the benchmark win the cores from other work on a shared
# machine, for both sides alike: with the kernel's autogroups, processes
# of other sessions only yield to the nice value of this session's group,
# so it is written to /proc/self/autogroup as well).
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS=${THREADS:-2}
REPEATS=${REPEATS:-3}
SDX4=${SDX4:-build-bench/sdx4}
MODEL=${MODEL:-models/x4-random-fp32}
PYTHON=${PYTHON:-.venv-bench/bin/python}
RUNS=${RUNS:-"64:20 128:1"}
SIDES=${SIDES:-"sdx4 torch"}
NICE=${NICE:-0}
if [ "$NICE" != 0 ] && [ -w /proc/self/autogroup ]; then
    echo "$NICE" >/proc/self/autogroup
fi
OUT=bench-out/$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"

if [ -z "${CONFIG:-}" ]; then
    CONFIG=assets/x4-upscaler
    [ -d /work/shared/models/x4-upscaler/tokenizer ] && CONFIG=/work/shared/models/x4-upscaler
fi
if [ ! -f "$MODEL/model_index.json" ]; then
    "$SDX4" make-model --config "$CONFIG" --dtype fp32 "$MODEL"
fi

{
    echo "date: $(date -Is)"
    echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
    echo "memory: $(free -g | awk '/^Mem:/ {print $2}') GiB"
    echo "openblas: $(dpkg-query -W -f '${Version}' libopenblas0-openmp 2>/dev/null || echo unknown)"
    echo "threads: $THREADS, repeats: $REPEATS, runs: $RUNS, nice: $NICE"
    echo "sdx4: $SDX4, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    git status --short src/engine 2>/dev/null | sed 's/^/  changed: /'
    echo "load: $(uptime)"
    [ -r /proc/self/autogroup ] && echo "autogroup: $(cat /proc/self/autogroup)"
} | tee "$OUT/machine.txt"

# run NAME CMD...: CMD's stdout (one JSON line) to $OUT/NAME.json, its
# stderr to NAME.log, wall/CPU/RSS to NAME.time.json, load to NAME.load
run() {
    local name=$1
    shift
    echo "== $name: $*" >&2
    uptime >"$OUT/$name.load"
    nice -n "$NICE" /usr/bin/time -f '{"wall_s":%e,"user_s":%U,"sys_s":%S,"maxrss_kib":%M}' \
        -o "$OUT/$name.time.json" "$@" >"$OUT/$name.json" 2>"$OUT/$name.log"
    uptime >>"$OUT/$name.load"
    cat "$OUT/$name.json" >&2
}

for r in $RUNS; do
    size=${r%%:*} steps=${r##*:}
    for side in $SIDES; do
        case $side in
        sdx4) run "sdx4-$size" "$SDX4" bench --model "$MODEL" --device cpu --size "$size" \
                  --steps "$steps" --repeats "$REPEATS" --threads "$THREADS" ;;
        torch) run "torch-$size" "$PYTHON" bench/torch_cpu_bench.py --model "$MODEL" \
                   --size "$size" --steps "$steps" --repeats "$REPEATS" --threads "$THREADS" ;;
        esac
    done
done

python3 - "$OUT" <<'EOF'
import json, os, sys

out = sys.argv[1]
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) and os.path.getsize(p) else {}
rows = []
for size in sorted({int(f.split("-")[1].split(".")[0]) for f in os.listdir(out)
                    if f.endswith(".json") and not f.endswith(".time.json")}):
    s, t = load(f"sdx4-{size}.json"), load(f"torch-{size}.json")
    st, tt = load(f"sdx4-{size}.time.json"), load(f"torch-{size}.time.json")
    steps = s.get("steps", t.get("steps"))
    figs = [("text encoder, batch 2", "text_encoder_ms", "ms"),
            (f"UNet step, batch 2, {size}x{size}", "unet_step_ms", "ms"),
            (f"VAE decode {size}x{size} -> {4 * size}x{4 * size}", "vae_decode_ms", "ms"),
            (f"pipeline {size} -> {4 * size}, {steps} step{'s' if steps != 1 else ''}", "pipeline_ms", "ms"),
            (f"peak RSS (size {size} run)", "peak_rss_mib", "MiB")]
    for label, key, unit in figs:
        a, b = s.get(key), t.get(key)
        ratio = f"{a / b:.2f}" if a and b else "-"
        fa = f"{a:,.1f} {unit}" if a is not None else "-"
        fb = f"{b:,.1f} {unit}" if b is not None else "-"
        rows.append((label, fa, fb, ratio))
    def cpu(tm):
        return (f"{tm['user_s'] + tm['sys_s']:.0f} s CPU / {tm['wall_s']:.0f} s wall"
                if tm else "-")
    rows.append((f"process (size {size} run)", cpu(st), cpu(tt), ""))
print()
print("| figure | sdx4 | PyTorch | sdx4 / PyTorch |")
print("| --- | ---: | ---: | ---: |")
for r in rows:
    print("| " + " | ".join(r) + " |")
print(f"\n(JSON in {out}/)")
EOF
