#!/bin/sh
# tests/server/venv.sh - the virtual environment of the server's tests
# ($SDX4_SERVER_VENV, default $TMPDIR/sdx4-server-venv), rebuilt when
# requirements.txt changes, and Swagger UI's files for /docs beside it as
# Debian ships them (r-cran-swagger's dist folder, unpacked without
# installing R). run.sh calls it; scripts/test.sh also starts it early, in
# the background, so that the downloads overlap the builds.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
venv=${SDX4_SERVER_VENV:-${TMPDIR:-/tmp}/sdx4-server-venv}
if ! cmp -s "$here/requirements.txt" "$venv/requirements.txt"; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
    cp "$here/requirements.txt" "$venv/requirements.txt"
fi
if [ ! -f "$venv/swagger-ui/swagger-ui-bundle.js" ] && command -v apt-get >/dev/null; then
    ( cd "$venv" && apt-get download r-cran-swagger >/dev/null 2>&1 \
      && dpkg-deb -x r-cran-swagger_*.deb unpacked \
      && mkdir -p swagger-ui && cp unpacked/usr/lib/R/site-library/swagger/dist3/swagger-ui* swagger-ui/ \
      && rm -rf unpacked r-cran-swagger_*.deb ) || echo "tests/server: Swagger UI not available; /docs is tested without it" >&2
fi
