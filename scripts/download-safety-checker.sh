#!/usr/bin/env bash
# Downloads CompVis/stable-diffusion-safety-checker (the content check of
# `--safety-checker`: docs/production/content-check.md) into
# models/safety-checker (or $1): config.json, preprocessor_config.json and
# model.safetensors (F32, ~1.2 GB). Resumable: rerun after an interruption
# and a partial file continues. The weights are checked against a SHA-256
# before they are moved into place: the one pinned below, and the hub's
# own (its Git LFS object id) when its listing answers; both must agree.
# Needs: curl, sha256sum, python3 (to read the hub's JSON listing).
#
# The repository's main branch holds pytorch_model.bin (a pickle, which the
# engine does not read); its safetensors conversion is the hub's pull
# request 41 (refs/pr/41), which is what other tools fetch too. The pinned
# hash is that file's as published in third-party pins (Nix's fetchurl of
# krita-ai-diffusion's tooling nodes); it was not verified by a download
# from here.
set -euo pipefail
repo=CompVis/stable-diffusion-safety-checker
hub=${SDX4_HUB:-https://huggingface.co}
dest=${1:-$(dirname "$0")/../models/safety-checker}
weights_rev=refs%2Fpr%2F41
weights_sha256=08902f19b1cfebd7c989f152fc0507bef6898c706a91d666509383122324b511
mkdir -p "$dest"
auth=()
[ -n "${HF_TOKEN:-}" ] && auth=(-H "Authorization: Bearer $HF_TOKEN")

fetch() { # url out: resumable download into out.part
  curl -fL --retry 5 --retry-delay 2 -C - "${auth[@]}" -o "$2.part" "$1"
}

for f in config.json preprocessor_config.json; do
  [ -s "$dest/$f" ] && continue
  echo "config  $f"
  fetch "$hub/$repo/resolve/main/$f" "$dest/$f"
  mv "$dest/$f.part" "$dest/$f"
done

f=model.safetensors
if [ -s "$dest/$f" ]; then
  echo "present $f"
else
  listed=$(curl -fsSL "${auth[@]}" "$hub/api/models/$repo/tree/$weights_rev" 2>/dev/null |
    python3 -c 'import json,sys
for e in json.load(sys.stdin):
    if e.get("path") == "model.safetensors" and e.get("lfs"):
        print(e["lfs"].get("oid") or e["lfs"].get("sha256")); break' 2>/dev/null || true)
  if [ -n "$listed" ] && [ "$listed" != "$weights_sha256" ]; then
    echo "the hub lists $f with SHA-256 $listed, this script pins $weights_sha256: refusing" >&2
    exit 1
  fi
  echo "weights $f"
  fetch "$hub/$repo/resolve/$weights_rev/$f" "$dest/$f"
  got=$(sha256sum "$dest/$f.part" | cut -d' ' -f1)
  if [ "$got" != "$weights_sha256" ]; then
    echo "checksum mismatch for $f (got $got, expected $weights_sha256): deleted, rerun to fetch again" >&2
    rm -f "$dest/$f.part"
    exit 1
  fi
  mv "$dest/$f.part" "$dest/$f"
fi
echo "content checker ready in $dest (sdx4 serve --safety-checker $dest)"
