#!/usr/bin/env bash
# Installs what sdx4 builds and runs with, from Debian's packages. Safe to
# rerun: packages already present are not fetched again.
set -euo pipefail
packages=(build-essential cmake pkg-config clang
          libjansson-dev libutf8proc-dev libopenblas-openmp-dev
          libvips-dev libmicrohttpd-dev nettle-dev libcurl4-openssl-dev
          zlib1g-dev # imageio: CRCs of the PNG text chunks (output metadata)
          openssl # test_tls.py makes its certificates
          libhiredis-dev redis-server
          libgnutls28-dev # HTTPS (src/server/tls.c); bearer tokens' RS256, ES256 and EdDSA signatures (jwt.c)
          python3 python3-venv curl
          python3-yaml # scripts/check-monitoring.py (promtool itself: check-monitoring.sh)
          systemd # systemd-analyze: scripts/check-systemd.sh
          libsqlite3-dev libpq-dev postgresql # --history; postgresql: its server for the tests
          libdnnl-dev # oneDNN 2.x: the CPU's bfloat16 path (--cpu-dtype bf16; optional, SDX4_ONEDNN)
          chromium chromium-driver # tests/server/test_page.py: the web page in a headless browser
          podman debootstrap) # scripts/container-check.sh
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
