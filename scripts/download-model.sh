#!/usr/bin/env bash
# Downloads the real stabilityai/stable-diffusion-x4-upscaler weights (the
# fp16 variant, ~1.7 GB) and configs into models/x4-upscaler (or $1).
# Resumable: rerun after an interruption and partial files continue. Each
# weight file is checked against the SHA-256 the hub publishes for it (its
# Git LFS object id) before it is moved into place.
# Needs: curl, sha256sum, python3 (to read the hub's JSON listing).
set -euo pipefail
repo=stabilityai/stable-diffusion-x4-upscaler
hub=${SDX4_HUB:-https://huggingface.co}
dest=${1:-$(dirname "$0")/../models/x4-upscaler}
mkdir -p "$dest"
auth=()
[ -n "${HF_TOKEN:-}" ] && auth=(-H "Authorization: Bearer $HF_TOKEN")

small_files=(model_index.json
  scheduler/scheduler_config.json low_res_scheduler/scheduler_config.json
  text_encoder/config.json unet/config.json vae/config.json
  tokenizer/vocab.json tokenizer/merges.txt tokenizer/tokenizer_config.json
  tokenizer/special_tokens_map.json)
weights=(unet/diffusion_pytorch_model.fp16.safetensors
  vae/diffusion_pytorch_model.fp16.safetensors
  text_encoder/model.fp16.safetensors)

fetch() { # url out: resumable download into out.part, then out
  mkdir -p "$(dirname "$2")"
  curl -fL --retry 5 --retry-delay 2 -C - "${auth[@]}" -o "$2.part" "$1"
}

for f in "${small_files[@]}"; do
  [ -s "$dest/$f" ] && continue
  echo "config  $f"
  fetch "$hub/$repo/resolve/main/$f" "$dest/$f"
  mv "$dest/$f.part" "$dest/$f"
done

# expected SHA-256 of one file from the hub's tree listing of its folder
expected_sha256() {
  curl -fsSL "${auth[@]}" "$hub/api/models/$repo/tree/main/$(dirname "$1")" |
    python3 -c 'import json,sys
want = sys.argv[1]
for e in json.load(sys.stdin):
    if e.get("path") == want and e.get("lfs"):
        print(e["lfs"].get("oid") or e["lfs"].get("sha256")); break' "$1"
}

for f in "${weights[@]}"; do
  if [ -s "$dest/$f" ]; then echo "present $f"; continue; fi
  sha=$(expected_sha256 "$f")
  if [ -z "$sha" ]; then echo "no checksum published for $f: refusing to use it" >&2; exit 1; fi
  echo "weights $f"
  fetch "$hub/$repo/resolve/main/$f" "$dest/$f"
  got=$(sha256sum "$dest/$f.part" | cut -d' ' -f1)
  if [ "$got" != "$sha" ]; then
    echo "checksum mismatch for $f (got $got, expected $sha): deleted, rerun to fetch again" >&2
    rm -f "$dest/$f.part"
    exit 1
  fi
  mv "$dest/$f.part" "$dest/$f"
done
echo "model ready in $dest (use --variant fp16, or the engine picks the fp16 files itself)"
