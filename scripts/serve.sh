#!/usr/bin/env bash
# Sets up and runs the sdx4 service on a new machine:
#   installs the Debian packages, builds, picks the model, serves it.
# Model: $SDX4_MODEL, else models/x4-upscaler (scripts/download-model.sh
# puts the real weights there), else a small demo model with random weights
# generated once into models/demo (its output is noise; the server says so).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh build
model=${SDX4_MODEL:-}
if [ -z "$model" ] && [ -f models/x4-upscaler/model_index.json ]; then
  model=models/x4-upscaler
fi
if [ -z "$model" ]; then
  model=models/demo
  if [ ! -f "$model/DEMO_MODEL" ]; then
    echo "no real weights found: generating the demo model (random weights, output is noise) in $model"
    mkdir -p models
    build/sdx4 make-model --config assets/demo-model "$model" --dtype fp32 --seed 0
  fi
  echo "serving the DEMO model: random weights, its images are noise."
  echo "for real upscaling: scripts/download-model.sh, or set SDX4_MODEL."
fi
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
exec build/sdx4 serve --model "$model" --docs-assets "$docs" "$@"
