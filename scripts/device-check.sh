#!/usr/bin/env bash
# device-check.sh - the checks of the CUDA backend that need a GPU, in one
# run on the device machine (issue 4).
#
# 1. Here, on a machine without a GPU, once (again when the golden data
#    change):
#        scripts/device-check.sh prepare
#    packs into build-carry/ (ignored by git, as every build*/ folder) what
#    the GPU machine lacks: the golden data and the full-size model
#    configuration (reference.tar.xz, about 54 MB: ../shared does not
#    travel) and the engine's libraries jansson, utf8proc and OpenBLAS with
#    pkg-config, as a relocatable prefix (deps.tar.xz, about 5 MB: that
#    machine has none of the Debian -dev packages). The checkout plus
#    build-carry/ must stay under the device tool's 64 MiB.
# 2. Through the device tool:
#        run(command="scripts/device-check.sh", carry=["build-carry"],
#            timeout_s=420)
#    (about 5 minutes when all goes well, which leaves a session's 15
#    minutes of device time room for a second, partial run)
#    or name steps to redo part of it on a warm machine:
#        scripts/device-check.sh bench
#
# Steps, each under its own time limit so that a hang costs one step:
#   build   build-device/ with -DSDX4_CUDA=ON for this GPU's architecture
#   test    test_backend_cuda: every operation against the CPU backend
#   golden  test_models, test_pipeline and test_safety on CUDA (SDX4_TEST_DEVICE=cuda),
#           in fp32 mode (the CPU tolerances) and in fp16 mode
#   gpu-metrics  /metrics's GPU series through NVML (issue 18):
#           test_server_gpu_metrics built alone (gpu_metrics.c, log.c and
#           jansson: no libvips needed) with SDX4_EXPECT_GPU=1, then, when
#           build-device/sdx4 exists, `sdx4 serve --device cuda` on the tiny
#           model, its /metrics saved to metrics.txt and grepped for each
#           GPU series of GPU 0
#   model   sdx4 make-model: the full-size random fp16 model, models/x4-fp16
#   bench   sdx4 bench --device cuda at 128 px (75 steps) and 256 px (20
#           steps), GPU memory sampled meanwhile; then 128 px with the VAE
#           in fp32 and 128 px without the graph API (SDX4_CUDA_CONV=
#           cudnn-legacy), then 128 px with DPM-Solver++ (20 steps, the
#           README's fast choice) and Euler ancestral (noise drawn ahead;
#           their scheduler_step_ms against the GPU's step, issue 14),
#           and 128 px with 8 upscales sharing their UNet calls (--batch
#           8, issue 16): bench.jsonl's seven lines, in that order; then,
#           where bench/batch_parts built (it needs the server's
#           libraries), the text encoder and VAE decode of eight upscales
#           apart and batched, in batch-parts.jsonl
#   profile one UNet step and VAE decode at 128 and 256 px with
#           SDX4_CUDA_PROFILE=1: GPU time per operation and shape, in
#           profile-128.txt and profile-256.txt
#   tiles   a 1024 px input (4096 px out) through the tiled UNet (--tile
#           128) and the tiled VAE, 2 steps, with nvidia-smi's memory.used
#           sampled: issue 15's bound of 4 GiB, in tiles.txt
# and, only when named:
#   anchor  diffusers' own timings on this GPU (../shared/tools/gen_reference.py
#           --perf, carried in build-carry/ by prepare), from a diffusers
#           wheel in .whl/ (see the device tool's README; carry=[..., ".whl"])
# and, only when named: load  bench/batch_load.py against sdx4 serve on the
#           fp16 model: images/s, p50 and p99 with 1, 4, 8 and 16 clients
#           (128 px, 75 steps, 20 s each), batching on and off (issue 16),
#           in load.jsonl (name `model` too on a fresh machine)
# and, only when named: gan  sdx4 bench --device cuda at 256 px (1024 px
#           out) on each GAN model folder in build-carry/gan/ (prepare-gan
#           copies models/realesrgan-x4plus and realesr-animevideov3-x4
#           there, 35 MB: carry it without reference.tar.xz, as for
#           anchor), in fp16 and fp32 mode, in gan.jsonl (issue 17)
# and, only when named: coldstart  test_backend_cuda (its plan cache test
#           among the rest), then process start to the first 128 px result
#           on the full-size model (name `model` too on a fresh machine),
#           with the plan cache empty and filled, three runs each
#           interleaved, and whether `sdx4 serve --warmup-sizes 128` has
#           saved it once ready: coldstart.txt (issue 16)
# and, only when named: sanitize  test_backend_cuda under compute-sanitizer
# and, only when named: faults-cuda  test_faults_cuda (issue 18): whole
#           upscales through the public API with the Nth call of the CUDA
#           backend to the CUDA runtime, cuBLAS(Lt) or cuDNN failing (the
#           tiny diffusion model, 3 guided steps at 16 px, and two small
#           GANs), after test_cuda_wraps (every entry point the backend
#           calls is wrapped). Each of the three sweeps gets
#           SDX4_FAULTS_SECONDS=50, the runs that fit in 50 s at its clean
#           run's pace, so about 3 minutes in all with the clean runs,
#           whatever a run costs here: each opens the engine (the cuBLAS and
#           cuDNN handles alone about 0.5 s) and times every convolution's
#           algorithms afresh (no plan cache), so some 15 runs of the
#           diffusion case at about 3 s a run and 50 of a GAN at 1 s, every
#           kth of thousands of calls, from a first N that changes with the
#           time. Its output in faults-cuda.txt (name `build` too on a fresh
#           machine)
# and, only when named: variants  other versions of the engine side by side
#           with this checkout, in the same lease: each source tree packed
#           here by
#               scripts/device-check.sh prepare-variants REV...
#           (git revisions, into build-carry/variants/, about 0.3 MB each)
#           is built for this GPU, checked by test_backend_cuda and the
#           goldens in fp16 mode, and benchmarked at 128 px (75 steps) and
#           256 px (20 steps) on this run's model (so name `model` too),
#           with the peak of nvidia-smi's memory.used during each and what
#           SDX4_CUDA_PROFILE prints of memory (arenas, the driver's peak):
#           variants.txt, one block per revision, in the order given
# and, only when named: ncu  each kernel of the memory-bound operations of
#           one 128 px bench timed alone by Nsight Compute (caches kept,
#           clocks free): ncu.csv. The text encoder runs first, and has
#           layer norms and additions of its own, so the filter names the
#           UNet's and the VAE's kernels only.
# and, only when named: cpu-bf16  the CPU's bfloat16 path (issue 16, cpu.dtype
#           bf16) on this machine's CPU, which is not the GPU's business but
#           the only CPU here likely to have AMX or AVX512-BF16: prints the
#           CPU's model and flags and skips without avx512_bf16/amx_bf16;
#           else builds build-cpu-bf16/ (-DSDX4_CUDA=OFF, oneDNN 2.x from
#           build-carry/dnnl.tar.xz, which `prepare-dnnl` packs here: 7 MB),
#           runs test_backend_onednn, test_backend_bf16 and test_models with
#           SDX4_TEST_CPU_DENSE=bf16, then sdx4 bench --device cpu at 64 px
#           in fp32 and with --dtype bf16 (the full-size random model,
#           models/x4-random-fp32, made when missing), and PyTorch's fp32
#           and bf16-autocast UNet step in the same process
#           (bench/torch_cpu_bench.py --bf16; diffusers from .whl/ as for
#           anchor, torch from the machine): cpu-bf16.jsonl
# Results go to $OUT (what the device tool brings back; build-device-out/
# when run by hand):
#   summary.txt     one line per step: PASS, FAIL or SKIP, seconds
#   log.txt         everything the steps printed
#   bench.jsonl     sdx4 bench's JSON lines
#   gpu.txt         nvidia-smi, nvcc, cmake, what the build found
#   gpu-memory.csv  nvidia-smi's memory.used every 200 ms during the bench
#   profile-*.txt   the profile steps' tables (with cuDNN's algorithm timings)
#   results.tar     all but summary.txt and log.txt, when there are more
#                   than the 8 files the device tool brings back
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
carry=$root/build-carry

# ------------------------------------------------------------- prepare

# Copies a shared library and names it by its soname.
copy_library() {
  local path soname
  path=$(readlink -f "$1")
  soname=$(objdump -p "$path" | awk '/SONAME/ {print $2}')
  cp "$path" "$2/lib/$soname"
  echo "$soname"
}

# A pkg-config file for a library of the prefix, relocatable by pcfiledir.
write_pc() {
  cat > "$1/lib/pkgconfig/$2.pc" <<EOF
prefix=\${pcfiledir}/../..
includedir=\${prefix}/include
libdir=\${prefix}/lib
Name: $2
Description: $2, carried for sdx4's device check
Version: $3
Libs: -L\${libdir} -l$4
Cflags: -I\${includedir}
EOF
}

prepare() {
  set -e
  local shared=${SDX4_SHARED:-$root/../shared} tmp prefix inc so
  mkdir -p "$carry"
  echo "packing $shared/reference and $shared/models/x4-upscaler (about a minute)"
  # the golden PNGs also as binary PPM, for test_pipeline built without
  # libvips (that machine has none): "P6 w h 255\n" then the RGB bytes
  tmp=$(mktemp -d)
  local png ppm w h
  for png in "$shared"/reference/*/golden/*.png; do
    ppm=$tmp/${png#"$shared"/}
    ppm=${ppm%.png}.ppm
    mkdir -p "$(dirname "$ppm")"
    w=$(vipsheader -f width "$png") h=$(vipsheader -f height "$png")
    vips copy "$png" "$tmp/t.ppm"
    { printf 'P6 %d %d 255\n' "$w" "$h"; tail -c $((w * h * 3)) "$tmp/t.ppm"; } > "$ppm"
  done
  rm -f "$tmp/t.ppm"
  tar -cf - -C "$shared" reference models/x4-upscaler -C "$tmp" reference |
    xz -9 -T1 > "$carry/reference.tar.xz"
  rm -rf "$tmp"

  tmp=$(mktemp -d)
  prefix=$tmp/sdx4-deps
  mkdir -p "$prefix/include" "$prefix/lib/pkgconfig" "$prefix/bin"
  inc=$(pkg-config --variable=includedir jansson)
  cp "$inc/jansson.h" "$inc/jansson_config.h" "$prefix/include/"
  cp "$(pkg-config --variable=includedir libutf8proc)/utf8proc.h" "$prefix/include/"
  inc=$(pkg-config --variable=includedir openblas)
  cp "$inc/cblas.h" "$inc/openblas_config.h" "$prefix/include/"
  so=$(copy_library "$(pkg-config --variable=libdir jansson)/libjansson.so" "$prefix")
  ln -s "$so" "$prefix/lib/libjansson.so"
  so=$(copy_library "$(pkg-config --variable=libdir libutf8proc)/libutf8proc.so" "$prefix")
  ln -s "$so" "$prefix/lib/libutf8proc.so"
  so=$(copy_library "$(pkg-config --variable=libdir openblas)/libopenblas.so" "$prefix")
  ln -s "$so" "$prefix/lib/libopenblas.so"
  # OpenBLAS's Fortran runtime, and pkg-config itself
  for lib in $(ldd "$prefix/lib/$so" | awk '/libgfortran|libquadmath/ {print $3}'); do
    copy_library "$lib" "$prefix" >/dev/null
  done
  cp "$(readlink -f "$(command -v pkg-config)")" "$prefix/bin/pkg-config"
  for lib in $(ldd "$prefix/bin/pkg-config" | awk '/libpkgconf/ {print $3}'); do
    copy_library "$lib" "$prefix" >/dev/null
  done
  write_pc "$prefix" jansson "$(pkg-config --modversion jansson)" jansson
  write_pc "$prefix" libutf8proc "$(pkg-config --modversion libutf8proc)" utf8proc
  write_pc "$prefix" openblas "$(pkg-config --modversion openblas)" openblas
  tar -C "$tmp" -cJf "$carry/deps.tar.xz" sdx4-deps
  rm -rf "$tmp"
  cp "$shared/tools/gen_reference.py" "$carry/"
  ls -l "$carry"
  echo "travels: $(( ( $(du -cb "$carry"/* | tail -1 | cut -f1) + \
$(git ls-files -co --exclude-standard -z | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1) ) >> 20 )) MiB of 64"
}

# Packs the engine's sources at each revision, numbered in the order given.
prepare_variants() {
  set -e
  rm -rf "$carry/variants"
  mkdir -p "$carry/variants"
  local i=0 rev name
  for rev in "$@"; do
    git rev-parse --verify --quiet "$rev^{commit}" >/dev/null || { echo "no revision $rev"; exit 1; }
    i=$((i + 1))
    name=$(printf '%02d-%s' "$i" "$(git rev-parse --short "$rev")")
    git archive "$rev" src include tests CMakeLists.txt openapi.json |
      xz -9 > "$carry/variants/$name.tar.xz"
    echo "$name: $(git log -1 --format=%s "$rev" | cut -c1-90)" | tee -a "$carry/variants/README"
  done
}

if [ "${1:-}" = prepare ]; then
  prepare
  exit
fi
if [ "${1:-}" = prepare-gan ]; then
  mkdir -p "$carry/gan"
  for m in realesrgan-x4plus realesr-animevideov3-x4; do
    [ -f "$root/models/$m/model.safetensors" ] && cp -r "$root/models/$m" "$carry/gan/"
  done
  du -sh "$carry/gan"
  exit 0
fi
if [ "${1:-}" = prepare-dnnl ]; then
  # oneDNN 2.x's headers and library (and the OpenCL loader it links) for
  # the cpu-bf16 step: the GPU machine has no libdnnl-dev
  set -e
  tmp=$(mktemp -d)
  mkdir -p "$tmp/sdx4-dnnl/include" "$tmp/sdx4-dnnl/lib" "$carry"
  cp -r /usr/include/oneapi "$tmp/sdx4-dnnl/include/"
  so=$(copy_library /usr/lib/x86_64-linux-gnu/libdnnl.so "$tmp/sdx4-dnnl")
  ln -s "$so" "$tmp/sdx4-dnnl/lib/libdnnl.so"
  for lib in $(ldd "$tmp/sdx4-dnnl/lib/$so" | awk '/libOpenCL/ {print $3}'); do
    copy_library "$lib" "$tmp/sdx4-dnnl" >/dev/null
  done
  tar -C "$tmp" -cJf "$carry/dnnl.tar.xz" sdx4-dnnl
  rm -rf "$tmp"
  ls -l "$carry/dnnl.tar.xz"
  exit 0
fi
if [ "${1:-}" = prepare-variants ]; then
  shift
  prepare_variants "$@"
  exit
fi

# ------------------------------------------------------ on the GPU machine

out=${OUT:-$root/build-device-out}
mkdir -p "$out"
summary=$out/summary.txt
exec > >(tee -a "$out/log.txt") 2>&1
steps=${*:-build test golden gpu-metrics model bench profile tiles}
wants() { [[ " $steps " == *" $1 "* ]]; }

# step NAME SECONDS COMMAND...: runs COMMAND under a time limit and records
# the verdict (exit 77 is a skip, as in ctest).
step() {
  local name=$1 limit=$2 t0=$SECONDS rc verdict
  shift 2
  echo "=== $name (at most ${limit}s)"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  case $rc in
    0) verdict=PASS ;;
    77) verdict=SKIP ;;
    124|137) verdict="FAIL (over ${limit}s)" ;;
    *) verdict="FAIL (exit $rc)" ;;
  esac
  printf '%-22s %-22s %5ds\n' "$name" "$verdict" $((SECONDS - t0)) | tee -a "$summary"
  return $rc
}

skip() {
  printf '%-22s %-22s %5ds  %s\n' "$1" SKIP 0 "$2" | tee -a "$summary"
}

{
  echo "== $(date -u +%FT%TZ)"
  nvidia-smi || true
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv || true
  nvcc --version | tail -2 || true
  cmake --version | head -1 || true
  command -v nsys ncu compute-sanitizer || true
} >> "$out/gpu.txt" 2>&1

# unpack ARCHIVE DIR: tar's xz, else Python's (xz-utils may be missing)
unpack() {
  mkdir -p "$2"
  if command -v xz >/dev/null; then
    tar -C "$2" -xJf "$1"
  else
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"
  fi
}

# the golden data and the model configuration; a later call on the same
# warm machine finds them unpacked, so it may leave reference.tar.xz
# behind to carry something else (the diffusers wheel for `anchor`: both
# together pass the device tool's 64 MiB)
reference=$root/../shared/reference
config=$root/../shared/models/x4-upscaler
if [ -f "$carry/reference.tar.xz" ] || [ -d /tmp/sdx4-ref ]; then
  if [ ! -d /tmp/sdx4-ref ]; then
    unpack "$carry/reference.tar.xz" /tmp/sdx4-ref
  fi
  reference=/tmp/sdx4-ref/reference
  config=/tmp/sdx4-ref/models/x4-upscaler
fi
export SDX4_REFERENCE=$reference

# the engine's libraries, where the machine lacks them
cmake_extra=()
if ! pkg-config --exists jansson libutf8proc openblas 2>/dev/null; then
  if [ -f "$carry/deps.tar.xz" ]; then
    [ -d /tmp/sdx4-deps ] || unpack "$carry/deps.tar.xz" /tmp
    export LD_LIBRARY_PATH=/tmp/sdx4-deps/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export PKG_CONFIG_PATH=/tmp/sdx4-deps/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
    command -v pkg-config >/dev/null || cmake_extra+=(-DPKG_CONFIG_EXECUTABLE=/tmp/sdx4-deps/bin/pkg-config)
  else
    echo "no jansson/utf8proc/openblas here and no build-carry/deps.tar.xz: run 'prepare' first"
  fi
fi

# cuDNN: the toolkit's, the system's, or PyTorch's pip package
cudnn_root=
cuda_home=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
if ! ls "$cuda_home/include/cudnn.h" /usr/include/cudnn.h /usr/include/x86_64-linux-gnu/cudnn.h >/dev/null 2>&1; then
  cudnn_root=$(python3 -c 'import nvidia.cudnn as m; print(list(m.__path__)[0])' 2>/dev/null || true)
fi
if [ -n "$cudnn_root" ]; then
  cmake_extra+=(-DCUDNN_ROOT="$cudnn_root")
  export LD_LIBRARY_PATH=$cudnn_root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
arch=${arch:-90}

if wants build; then
  step configure 120 cmake -S . -B build-device -DCMAKE_BUILD_TYPE=Release -DSDX4_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$arch" -DSDX4_REFERENCE="$reference" "${cmake_extra[@]}"
  grep -E "^SDX4_CUDNN|^CMAKE_CUDA_ARCHITECTURES" build-device/CMakeCache.txt >> "$out/gpu.txt" 2>&1
  targets=(test_backend_cuda test_models test_pipeline)
  # the CLI needs libvips; without it, model and bench are skipped
  help=$(cmake --build build-device --target help 2>/dev/null)
  grep -qx '\.\.\. sdx4' <<<"$help" && targets+=(sdx4)
  grep -qx '\.\.\. batch_parts' <<<"$help" && targets+=(batch_parts)
  step build 300 cmake --build build-device -j"$(nproc)" --target "${targets[@]}"
fi

if wants test; then
  step test_backend_cuda 90 build-device/test_backend_cuda
fi

# not in the default list: memcheck slows the kernels tenfold or more.
# API errors are not reported: test_memory asks for more memory than the
# GPU has, on purpose (8 "out of memory" reports on the first run), and
# the backend checks every API call's status itself.
if wants sanitize; then
  step memcheck 300 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 1 \
    build-device/test_backend_cuda
fi

# not in the default list either: 3 minutes (see the top)
if wants faults-cuda; then
  if [ ! -f build-device/CMakeCache.txt ]; then
    skip faults-cuda "needs build-device/ (name build too on a fresh machine)"
  elif step faults-cuda-build 300 cmake --build build-device -j"$(nproc)" --target test_faults_cuda; then
    step faults-cuda-wraps 30 ctest --test-dir build-device --output-on-failure -R '^test_cuda_wraps$'
    step faults-cuda 240 bash -o pipefail -c "SDX4_FAULTS_SECONDS=50 build-device/test_faults_cuda 2>&1 |
      tee $out/faults-cuda.txt"
  fi
fi

if wants golden; then
  for mode in fp32 fp16; do
    step "golden-$mode" 90 env SDX4_TEST_DEVICE=cuda SDX4_CUDA_DTYPE=$mode \
      ctest --test-dir build-device -V -R '^(test_models|test_pipeline|test_safety)$'
  done
fi

sdx4=build-device/sdx4
model=models/x4-fp16

# serve_gpu_metrics: sdx4 serve on CUDA with the tiny model; its /metrics,
# once NVML has answered, must have every GPU series of GPU 0
serve_gpu_metrics() {
  local port=18902 server i
  "$sdx4" serve --model "$reference/tiny/model" --device cuda --port $port --warmup false \
    > /tmp/gpu-metrics-serve.log 2>&1 &
  server=$!
  for i in $(seq 100); do
    curl -sf http://127.0.0.1:$port/metrics > "$out/metrics.txt" && grep -qx 'sdx4_gpu_nvml_up 1' "$out/metrics.txt" && break
    sleep 0.2
  done
  kill "$server"; wait "$server"
  grep gpu_metrics /tmp/gpu-metrics-serve.log
  local missing=0 series
  for series in 'sdx4_gpu_nvml_up 1' 'sdx4_gpu_info{gpu="0",' 'sdx4_gpu_utilization_percent{gpu="0"}' \
      'sdx4_gpu_memory_used_bytes{gpu="0"}' 'sdx4_gpu_memory_total_bytes{gpu="0"}' \
      'sdx4_gpu_temperature_celsius{gpu="0"}' 'sdx4_gpu_power_watts{gpu="0"}' 'process_cpu_seconds_total '; do
    grep -qF "$series" "$out/metrics.txt" || { echo "missing from /metrics: $series"; missing=1; }
  done
  grep -E '^(sdx4_gpu|process_)' "$out/metrics.txt"
  return $missing
}

if wants gpu-metrics; then
  # alone, as the CLI may lack libvips here
  if cc -std=c11 -Wall -Wextra -D_GNU_SOURCE -Isrc/server -Iinclude -Itests -DSDX4_REFERENCE_DIR='""' \
      -o /tmp/test_server_gpu_metrics tests/test_server_gpu_metrics.c src/server/gpu_metrics.c \
      src/server/log.c $(pkg-config --cflags --libs jansson) -ldl -lpthread -lm; then
    step gpu-metrics 60 env SDX4_EXPECT_GPU=1 /tmp/test_server_gpu_metrics
  else
    skip gpu-metrics "test_server_gpu_metrics did not build (jansson: run 'prepare' first)"
  fi
  if [ -x "$sdx4" ]; then
    export -f serve_gpu_metrics
    export sdx4 out reference
    step gpu-metrics-serve 60 bash -c serve_gpu_metrics
  else
    skip gpu-metrics-serve "no build-device/sdx4 (the CLI needs libvips)"
  fi
fi
if wants model; then
  if [ ! -x "$sdx4" ]; then
    skip make-model "no build-device/sdx4 (the CLI needs libvips)"
  elif [ -f "$model/unet/diffusion_pytorch_model.fp16.safetensors" ]; then
    skip make-model "$model is there"
  else
    mkdir -p "$(dirname "$model")"
    step make-model 120 "$sdx4" make-model --config "$config" "$model" --dtype fp16
  fi
fi

if wants bench; then
  if [ ! -x "$sdx4" ] || [ ! -d "$model" ]; then
    skip bench "needs build-device/sdx4 and $model"
  else
    nvidia-smi --query-gpu=timestamp,memory.used --format=csv -lms 200 > "$out/gpu-memory.csv" 2>/dev/null &
    sampler=$!
    step bench-128 120 bash -o pipefail -c "$sdx4 bench --model $model --variant fp16 --device cuda \
      --size 128 --steps 75 --repeats 3 | tee -a $out/bench.jsonl"
    step bench-256 100 bash -o pipefail -c "$sdx4 bench --model $model --variant fp16 --device cuda \
      --size 256 --steps 20 --repeats 1 | tee -a $out/bench.jsonl"
    step bench-128-vae-fp32 60 bash -o pipefail -c "SDX4_CUDA_VAE=fp32 $sdx4 bench --model $model \
      --variant fp16 --device cuda --size 128 --steps 2 --repeats 3 | tee -a $out/bench.jsonl"
    # without the graph API's plans: what they cost a new size once
    # (*_first_ms) and give every step after
    step bench-128-legacy 60 bash -o pipefail -c "SDX4_CUDA_CONV=cudnn-legacy $sdx4 bench \
      --model $model --variant fp16 --device cuda --size 128 --steps 75 --repeats 1 |
      tee -a $out/bench.jsonl"
    for scheduler in dpm++2m euler-a; do
      step "bench-128-$scheduler" 60 bash -o pipefail -c "$sdx4 bench --model $model --variant fp16 \
        --device cuda --size 128 --steps 20 --repeats 3 --scheduler $scheduler | tee -a $out/bench.jsonl"
    done
    # eight default jobs sharing their UNet calls (issue 16's batching):
    # pipeline_batch_ms against 8 x pipeline_ms
    step bench-128-batch8 120 bash -o pipefail -c "$sdx4 bench --model $model --variant fp16 --device cuda \
      --size 128 --steps 75 --repeats 1 --batch 8 | tee -a $out/bench.jsonl"
    # and whether the text encoder and the VAE decode of those eight pay to
    # batch too (issue 16): eight calls against one, in batch-parts.jsonl
    if [ -x build-device/batch_parts ]; then
      step batch-parts 60 bash -o pipefail -c "build-device/batch_parts $model 128 8 2 cuda 0 fp16 |
        tee -a $out/batch-parts.jsonl"
    fi
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
    echo "peak memory.used during the bench: $(awk -F', ' 'NR > 1 {v = $2 + 0; if (v > m) m = v} END {print m}' "$out/gpu-memory.csv") MiB" |
      tee -a "$summary"
  fi
fi

if wants profile && [ -x "$sdx4" ] && [ -d "$model" ]; then
  step profile-128 60 bash -c "SDX4_CUDA_PROFILE=1 $sdx4 bench --model $model --variant fp16 \
    --device cuda --size 128 --steps 1 --repeats 1 2> $out/profile-128.txt"
  # op by op, without CUDA graphs: the table then covers the steps too
  step profile-128-eager 60 bash -c "SDX4_CUDA_GRAPH=0 SDX4_CUDA_PROFILE=1 $sdx4 bench \
    --model $model --variant fp16 --device cuda --size 128 --steps 8 --repeats 1 \
    2> $out/profile-128-eager.txt"
  step profile-256 60 bash -c "SDX4_CUDA_PROFILE=1 $sdx4 bench --model $model --variant fp16 \
    --device cuda --size 256 --steps 1 --repeats 1 2> $out/profile-256.txt"
fi

if wants tiles && [ -x "$sdx4" ] && [ -d "$model" ]; then
  # a 1024 px PNG with some structure, from Python's standard library
  python3 - /tmp/tiles-in.png <<'PY'
import struct, sys, zlib
w = h = 1024
rows = b"".join(b"\0" + bytes((x * 7 + y * 13) % 256 for x in range(3 * w)) for y in range(h))
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
open(sys.argv[1], "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                              + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
PY
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > /tmp/tiles-memory.csv 2>/dev/null &
  sampler=$!
  step tiles-1024 240 bash -c "/usr/bin/time -v $sdx4 upscale --model $model --variant fp16 --device cuda \
    --tile 128 --tile-overlap 32 --vae-tiling on --steps 2 --seed 1 /tmp/tiles-in.png /tmp/tiles-out.png \
    2>&1 | grep -E 'Maximum resident|Elapsed' > $out/tiles.txt"
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  echo "peak memory.used during the 1024 px tiled upscale: $(sort -n /tmp/tiles-memory.csv | tail -1) MiB" |
    tee -a "$out/tiles.txt" "$summary"
fi

if wants gan && [ -x "$sdx4" ]; then
  for dir in "$carry"/gan/*/; do
    [ -f "$dir/config.json" ] || continue
    for mode in fp16 fp32; do
      step "gan-$(basename "$dir")-$mode" 120 bash -c "SDX4_CUDA_DTYPE=$mode $sdx4 bench --model $dir \
        --device cuda --size 256 --repeats 3 >> $out/gan.jsonl"
    done
  done
fi

if wants load && [ -x "$sdx4" ] && [ -d "$model" ]; then
  # issue 16: images/s and p50/p99 through the HTTP API with 1-16 clients,
  # 128 px, 75 steps, batching on (the default) and off; load.jsonl
  for batch in 8 1; do
    $sdx4 serve --model "$model" --variant fp16 --device cuda --port 18900 --rate-limit 0 --queue-size 64 \
      --request-timeout 600 --max-batch-size $batch > /tmp/load-serve.log 2>&1 &
    server=$!
    for _ in $(seq 240); do curl -sf http://127.0.0.1:18900/api/v1/health >/dev/null && break; sleep 0.5; done
    step "load-batch$batch" 300 bash -o pipefail -c "python3 bench/batch_load.py http://127.0.0.1:18900 \
      --clients 1,4,8,16 --size 128 --steps 75 --seconds 20 --warm 5 | sed 's/^{/{\"max_batch_size\": $batch, /' |
      tee -a $out/load.jsonl"
    kill "$server" 2>/dev/null
    wait "$server" 2>/dev/null
  done
fi

if wants variants && [ -d "$model" ] && ls "$carry"/variants/*.tar.xz >/dev/null 2>&1; then
  cat "$carry/variants/README" >> "$out/variants.txt"
  for archive in "$carry"/variants/*.tar.xz; do
    name=$(basename "$archive" .tar.xz)
    dir=/tmp/variants/$name
    rm -rf "$dir"
    unpack "$archive" "$dir"
    echo "== $name" >> "$out/variants.txt"
    if step "$name-build" 300 bash -c "cmake -S $dir -B $dir/build -DCMAKE_BUILD_TYPE=Release \
        -DSDX4_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$arch -DSDX4_REFERENCE=$reference \
        ${cmake_extra[*]} > $dir/configure.log && cmake --build $dir/build -j$(nproc) \
        --target sdx4 test_backend_cuda test_models test_pipeline > $dir/build.log"; then
      step "$name-test" 90 bash -o pipefail -c "$dir/build/test_backend_cuda | tail -1 >> $out/variants.txt"
      step "$name-golden" 90 bash -o pipefail -c "cd $dir/build && SDX4_TEST_DEVICE=cuda SDX4_CUDA_DTYPE=fp16 \
        ./test_models | tail -1 >> $out/variants.txt && SDX4_TEST_DEVICE=cuda \
        SDX4_CUDA_DTYPE=fp16 ./test_pipeline | tail -1 >> $out/variants.txt"
      for size in 128:75:3 256:20:1; do
        IFS=: read -r px n r <<< "$size"
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 \
          > /tmp/variants/memory.csv 2>/dev/null &
        sampler=$!
        step "$name-bench-$px" 90 bash -c "$dir/build/sdx4 bench --model $model --variant fp16 \
          --device cuda --size $px --steps $n --repeats $r >> $out/variants.txt"
        kill "$sampler" 2>/dev/null
        wait "$sampler" 2>/dev/null
        echo "peak memory.used during the $px px bench: $(sort -n /tmp/variants/memory.csv | tail -1) MiB" \
          >> "$out/variants.txt"
      done
      # what the profile says of memory: a planned arena, the driver's peak
      step "$name-memory" 60 bash -c "SDX4_CUDA_PROFILE=1 $dir/build/sdx4 bench --model $model \
        --variant fp16 --device cuda --size 128 --steps 3 --repeats 1 2>&1 >/dev/null |
        grep -E 'arena|driver|^peak memory' >> $out/variants.txt || true"
    else
      tail -20 "$dir/build.log" >> "$out/variants.txt" 2>/dev/null
    fi
  done
fi

# coldstart: process start to the first 128 px result with the full-size
# model in the page cache, the plan cache empty (cold: every convolution
# shape timed) and filled by the run before (warm), interleaved, three of
# each; `sdx4 upscale` (one step) where the CLI has libvips, else `sdx4
# bench --steps 1 --repeats 1`, whose time to exit is the first result
# plus one more timed run of each part (tens of ms at 128 px). A warm run
# that finds every choice on file does not rewrite it ("rewritten": the
# file has another inode after, as a save renames a new file over it).
coldstart() {
  local plans=/tmp/coldstart-plans run kind t0 t1 before after cmd
  cat "$model"/*/*.safetensors > /dev/null
  if "$sdx4" upscale --help > /dev/null 2>&1; then
    python3 - /tmp/coldstart-in.png <<'PY'
import struct, sys, zlib
w = h = 128
rows = b"".join(b"\0" + bytes((x * 7 + y * 13) % 256 for x in range(3 * w)) for y in range(h))
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
open(sys.argv[1], "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                              + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
PY
    cmd="$sdx4 upscale --model $model --variant fp16 --device cuda --steps 1 --seed 1 \
      /tmp/coldstart-in.png /tmp/coldstart-out.png"
  else
    cmd="$sdx4 bench --model $model --variant fp16 --device cuda --size 128 --steps 1 --repeats 1"
  fi
  echo "command: $cmd" | tee "$out/coldstart.txt"
  printf '%-4s %-5s %9s %-9s %s\n' run cache seconds rewritten plan-cache-bytes | tee -a "$out/coldstart.txt"
  for run in 1 2 3; do
    for kind in cold warm; do
      [ "$kind" = cold ] && rm -f "$plans"
      before=$(stat -c %i "$plans" 2>/dev/null || echo none)
      t0=$EPOCHREALTIME
      SDX4_PLAN_CACHE=$plans $cmd > /tmp/coldstart-run.log 2>&1 || { cat /tmp/coldstart-run.log; return 1; }
      t1=$EPOCHREALTIME
      after=$(stat -c %i "$plans" 2>/dev/null || echo none)
      grep -i "plan cache" /tmp/coldstart-run.log
      printf '%-4s %-5s %9.2f %-9s %s\n' $run $kind "$(awk "BEGIN {print $t1 - $t0}")" \
        "$([ "$before" = "$after" ] && echo no || echo yes)" "$(stat -c %s "$plans" 2>/dev/null || echo 0)" |
        tee -a "$out/coldstart.txt"
    done
  done
}

# and `sdx4 serve --warmup-sizes 128` (where the CLI has the server): the
# plan cache must be on disk once the server is ready, before it exits
coldstart_serve() {
  local plans=/tmp/coldstart-serve-plans server saved=no
  rm -f "$plans"
  SDX4_PLAN_CACHE=$plans $sdx4 serve --model "$model" --variant fp16 --device cuda --port 18903 \
    --warmup-sizes 128 > /tmp/coldstart-serve.log 2>&1 &
  server=$!
  for _ in $(seq 240); do
    curl -sf http://127.0.0.1:18903/api/v1/health | grep -q '"ready": *true' && break
    sleep 0.5
  done
  [ -s "$plans" ] && saved=yes
  kill "$server"
  wait "$server"
  echo "serve --warmup-sizes 128: plan cache on disk when ready: $saved ($(stat -c %s "$plans" 2>/dev/null || echo 0) bytes)" |
    tee -a "$out/coldstart.txt"
  [ $saved = yes ]
}

if wants coldstart; then
  step coldstart-test_backend_cuda 120 build-device/test_backend_cuda
  if [ ! -x "$sdx4" ] || [ ! -d "$model" ]; then
    skip coldstart "needs build-device/sdx4 and $model (name model too on a fresh machine)"
  else
    export -f coldstart coldstart_serve
    export sdx4 model out
    step coldstart 300 bash -c coldstart
    if "$sdx4" serve --help > /dev/null 2>&1; then
      step coldstart-serve 150 bash -c coldstart_serve
    else
      skip coldstart-serve "no sdx4 serve here (the server needs libvips)"
    fi
  fi
fi

if wants ncu && [ -x "$sdx4" ] && [ -d "$model" ]; then
  step ncu 240 bash -c "ncu --csv --print-units base --cache-control none --clock-control none \
    --metrics gpu__time_duration.sum,launch__grid_size,launch__block_size \
    --kernel-name regex:'group_|geglu|channel_bias|upsample|copy_channels|fill_bias' \
    --launch-count 400 $sdx4 bench --model $model --variant fp16 --device cuda --size 128 \
    --steps 1 --repeats 1 > $out/ncu.csv 2> $out/ncu.err"
fi

if wants anchor; then
  if ls .whl/diffusers-*.whl >/dev/null 2>&1 && [ -f "$carry/gen_reference.py" ]; then
    step anchor 300 bash -c "python3 -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 \
      python3 $carry/gen_reference.py /tmp/anchor $reference/tiny/model/tokenizer --perf --no-ref \
      && cp /tmp/anchor/anchor_gpu.json $out/"
  else
    skip anchor "needs .whl/diffusers-*.whl and build-carry/gen_reference.py"
  fi
fi

if wants cpu-bf16; then
  {
    echo "== cpu-bf16: $(grep -m1 'model name' /proc/cpuinfo)"
    grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx512|amx)' | tr '\n' ' '
    echo
  } | tee -a "$out/cpu-bf16.jsonl"
  cpu_model=$root/models/x4-random-fp32
  if ! grep -m1 '^flags' /proc/cpuinfo | grep -qwE 'avx512_bf16|amx_bf16'; then
    skip cpu-bf16 "this CPU has no AVX512-BF16/AMX"
  elif [ ! -f "$carry/dnnl.tar.xz" ] && [ ! -d /tmp/sdx4-dnnl ]; then
    skip cpu-bf16 "no build-carry/dnnl.tar.xz: run 'prepare-dnnl' first"
  else
    [ -d /tmp/sdx4-dnnl ] || unpack "$carry/dnnl.tar.xz" /tmp
    export LD_LIBRARY_PATH=/tmp/sdx4-dnnl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    step cpu-bf16-build 300 bash -c "cmake -S . -B build-cpu-bf16 -DCMAKE_BUILD_TYPE=Release \
      -DSDX4_CUDA=OFF -DDNNL_ROOT=/tmp/sdx4-dnnl -DSDX4_REFERENCE=$reference ${cmake_extra[*]} \
      | grep -i onednn && cmake --build build-cpu-bf16 -j$(nproc) --target sdx4 \
      test_backend_onednn test_backend_bf16 test_models"
    cpu_sdx4=$root/build-cpu-bf16/sdx4
    step cpu-bf16-onednn 120 build-cpu-bf16/test_backend_onednn
    step cpu-bf16-test 120 build-cpu-bf16/test_backend_bf16
    step cpu-bf16-golden 180 env SDX4_TEST_CPU_DENSE=bf16 build-cpu-bf16/test_models
    if [ ! -f "$cpu_model/model_index.json" ] && [ -x "$cpu_sdx4" ]; then
      step cpu-bf16-model 180 "$cpu_sdx4" make-model --config "$config" "$cpu_model" --dtype fp32
    fi
    for dtype in fp32 bf16; do
      step "cpu-bench-$dtype" 240 bash -o pipefail -c "$cpu_sdx4 bench --model $cpu_model \
        --device cpu --dtype $dtype --size 64 --steps 1 --repeats 3 | tee -a $out/cpu-bf16.jsonl"
    done
    if ls .whl/diffusers-*.whl >/dev/null 2>&1; then
      [ -d /tmp/site/diffusers ] || python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --target /tmp/site .whl/*.whl
      step cpu-bench-torch 300 bash -o pipefail -c "PYTHONPATH=/tmp/site python3 \
        bench/torch_cpu_bench.py --model $cpu_model --size 64 --repeats 3 --skip-pipeline --bf16 \
        | tee -a $out/cpu-bf16.jsonl"
    else
      skip cpu-bench-torch "needs .whl/diffusers-*.whl (as anchor)"
    fi
  fi
fi

nvidia-smi --query-gpu=memory.used,temperature.gpu,clocks.sm --format=csv >> "$out/gpu.txt" 2>&1
echo "=== summary"
cat "$summary"

# The device tool brings back at most 8 files (variants.txt was the ninth
# once, and lost): past that, all but the summary and the log travel in
# one archive.
if [ "$(find "$out" -maxdepth 1 -type f | wc -l)" -gt 8 ]; then
  (cd "$out" && find . -maxdepth 1 -type f ! -name summary.txt ! -name log.txt \
    ! -name results.tar -printf '%P\n' | tar -cf results.tar -T - --remove-files) &&
    echo "more than 8 files: all but summary.txt and log.txt are in results.tar"
fi
