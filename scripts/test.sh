#!/usr/bin/env bash
# Sets up and runs every test of sdx4 on a new machine (this is what CI runs):
#   1. the ctest suite (golden tests against diffusers and PyTorch, unit,
#      CLI, bad input) on a release build, with the default GAN models
#      fetched and converted (scripts/get-default-models.sh);
#   2. the same suite built with AddressSanitizer + UndefinedBehaviorSanitizer;
#   3. each libFuzzer target for a fixed time (SDX4_FUZZ_SECONDS, default 10),
#      as many at once as there are cores,
#      from the seeds in fuzz/corpus/<target>/;
#   4. the HTTP service's integration tests against the real server (the
#      modules side by side, one pytest-xdist process per core, then those
#      marked serial alone), then the tests of the API's contract again in
#      cluster mode (each server an API node with its own Redis and worker:
#      tests/server/conftest.py);
#   5. the CUDA backend compiled when nvcc is present (its tests skip
#      without a GPU);
#   6. the Kubernetes manifests rendered and validated, offline once its
#      tools are installed (scripts/check-kubernetes.sh);
#   6b. deploy/monitoring's alerts, their promtool unit tests, the
#      dashboard's queries and sdx4 serve's /metrics linted by promtool
#      (scripts/check-monitoring.sh; that every metric they use is
#      exported is tests/server/test_monitoring.py's, in step 4)
#      and deploy/systemd's unit (scripts/check-systemd.sh); 6 and 6b run
#      in the background beside the end of step 4, their output after it;
#   7. the Dockerfile's CPU image built with podman and checked to serve
#      (scripts/container-check.sh, as root; SDX4_CONTAINER_CHECK=0 skips it
#      and says so).
# Golden data: $SDX4_REFERENCE, default ../shared/reference beside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
jobs=$(nproc)
reference=${SDX4_REFERENCE:-$PWD/../shared/reference}
# background NAME COMMAND...: runs COMMAND beside the steps that follow, its
# output and exit status into $bg/NAME.{log,rc} (files, not `wait`: the
# fuzzing step's bare `wait` reaps every child); collect NAME waits for it,
# prints its output there and stops the run, naming it, if it failed
bg=$(mktemp -d)
background() {
  local name=$1
  shift
  echo "$*" >"$bg/$name.cmd"
  (set +e; "$@" >"$bg/$name.log" 2>&1; echo $? >"$bg/$name.rc") &
}
collect() {
  while [ ! -s "$bg/$1.rc" ]; do sleep 1; done
  cat "$bg/$1.log"
  [ "$(cat "$bg/$1.rc")" = 0 ] || { echo "$(cat "$bg/$1.cmd") failed (exit $(cat "$bg/$1.rc"))"; exit 1; }
}
# the server tests' Python packages, fetched while the builds run (step 4
# waits for them; run.sh would make them itself)
background venv tests/server/venv.sh
fuzz_seconds=${SDX4_FUZZ_SECONDS:-10}

echo "== release build and tests (the CUDA backend too when nvcc exists)"
# for this machine's GPU; without one only compiled, for one architecture
# (four would take a minute more on two cores and check nothing more)
cuda_arch=90
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then cuda_arch=native; fi
scripts/build.sh build -DCMAKE_CUDA_ARCHITECTURES="$cuda_arch"
# the real Real-ESRGAN models, converted from ncnn: test_gan checks them
# against PyTorch's output (tests/data/gan/real)
SDX4=build/sdx4 scripts/get-default-models.sh
(cd build && ctest -j"$jobs" --output-on-failure)

echo "== sanitizer build and tests (ASan + UBSan)"
scripts/build.sh build-asan -DSDX4_SANITIZE=ON -DSDX4_CUDA=OFF
(cd build-asan &&
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest -j"$jobs" --output-on-failure)

echo "== fuzzing, ${fuzz_seconds}s per target, $jobs at a time"
scripts/build.sh build-fuzz -DSDX4_FUZZ=ON -DCMAKE_C_COMPILER=clang
# one target from its seeds (fuzz/corpus/<target>/) in a scratch corpus;
# its summary lines and exit status go to $fuzz_out/<target>.{log,rc}
fuzz_out=$(mktemp -d)
fuzz_one() {
  local target=$1 name corpus
  name=$(basename "$target")
  corpus=$(mktemp -d)
  [ -d "fuzz/corpus/$name" ] && cp -r "fuzz/corpus/$name/." "$corpus/"
  # the component configs the repository ships are fuzz_config's seeds
  if [ "$name" = fuzz_config ]; then
    for f in assets/*/*/*.json; do cp "$f" "$corpus/$(tr / _ <<<"$f")"; done
  fi
  local rc=0
  "$target" -max_total_time="$fuzz_seconds" -rss_limit_mb=2048 -timeout=10 "$corpus" \
    >"$fuzz_out/$name.full" 2>&1 || rc=$?
  echo "$rc" >"$fuzz_out/$name.rc"
  grep -E "^(Done|#[0-9]+ *DONE|==[0-9]+==ERROR|SUMMARY)" "$fuzz_out/$name.full" >"$fuzz_out/$name.log" || true
  rm -rf "$corpus"
}
for target in build-fuzz/fuzz_*; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
  fuzz_one "$target" &
done
wait
for target in build-fuzz/fuzz_*; do
  name=$(basename "$target")
  echo "-- $name"
  cat "$fuzz_out/$name.log"
  [ "$(cat "$fuzz_out/$name.rc")" = 0 ] || { tail -40 "$fuzz_out/$name.full"; echo "fuzz target $name failed"; exit 1; }
done
rm -rf "$fuzz_out"

echo "== HTTP service integration tests (pytest drives the real server)"
collect venv
# the modules side by side, one process per core (pytest-xdist; each
# module's servers are its own, on ports the kernel picks), then the few
# marked serial alone: their timing does not hold beside other servers
tests/server/run.sh "$PWD/build/sdx4" "$reference" -n "$jobs" --dist loadfile -m "not serial"
# the offline checks of the deployment kits run beside what follows, which
# keeps about one core busy; their output comes after it, in this order
background kubernetes scripts/check-kubernetes.sh
background monitoring scripts/check-monitoring.sh build/sdx4
background systemd scripts/check-systemd.sh build/sdx4
echo "-- the tests marked serial"
tests/server/run.sh "$PWD/build/sdx4" "$reference" -m serial
# (the CLI comparison is test_worker.py's there; the rest of the suite passes in
# cluster mode too, SDX4_TEST_CLUSTER=1, but would double the suite's time)
echo "== the API's contract in cluster mode (API-only node, Redis, one worker)"
SDX4_TEST_CLUSTER=1 tests/server/run.sh "$PWD/build/sdx4" "$reference" \
  -k "(test_api.py or test_tenancy.py or test_deadline_504 or test_client_disconnect_cancels) and not equals_cli"

echo "== kubernetes manifests (scripts/check-kubernetes.sh)"
collect kubernetes

echo "== monitoring kit (Prometheus rules and their unit tests, Grafana dashboard)"
collect monitoring

echo "== systemd unit (scripts/check-systemd.sh)"
collect systemd
rm -rf "$bg"

echo "== the container image (scripts/container-check.sh)"
if [ "${SDX4_CONTAINER_CHECK:-1}" = 0 ]; then
    echo "container check SKIPPED (SDX4_CONTAINER_CHECK=0): the Dockerfile was not built"
else
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd scripts/container-check.sh || {
        echo "container check failed (see above); on a machine where podman cannot work," \
             "SDX4_CONTAINER_CHECK=0 skips it"
        exit 1
    }
fi
