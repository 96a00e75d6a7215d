#!/usr/bin/env bash
# Builds the CPU image from the Dockerfile with podman and checks that what
# it built serves: the binary runs, the image's own command answers
# /api/v1/health 200 on the demo model made at build time, upscales a
# 64x64 PNG to a 256x256 PNG, and serves /docs with its Swagger UI files.
#
#   sudo scripts/container-check.sh      (scripts/test.sh runs it last)
#
# The base images the Dockerfile names, debian:bookworm and
# debian:bookworm-slim, are both one debootstrap minbase root of Debian 12,
# imported into a podman store of this script's own: no registry is asked,
# and the host's own images (a real debian:bookworm among them) are left
# alone. The root's tarball and the store, with the build's cached layers,
# are kept in $SDX4_CONTAINER_CACHE (default
# ${XDG_CACHE_HOME:-/var/cache}/sdx4-container), so a rerun downloads only
# what the Dockerfile's apt-get asks for; remove that folder to start over.
#
# The image is checked as a file system (`podman image mount` + chroot),
# not with `podman run`: crun must set RLIMIT_NOFILE and cgroups, which
# sandboxed machines (this project's among them) refuse. What `podman run`
# would give the command is given by hand: the image's user, environment
# and command, /dev, /proc, /sys and a fresh /tmp, in a mount namespace of
# its own that disappears with the server. The differences: the address,
# SDX4_HOST=127.0.0.1 and a free port instead of 0.0.0.0:8000, since the
# chroot shares the host's network; and a request timeout of 300 s instead
# of 60, since a shared CI machine can be many times slower than a server.
#
# Needs root (debootstrap, mounts, chroot) and Debian's podman and
# debootstrap, which scripts/install-deps.sh installs. Every failure ends
# the script non-zero with a line saying what failed.
set -euo pipefail
cd "$(dirname "$0")/.."
source=$PWD
cache=${SDX4_CONTAINER_CACHE:-${XDG_CACHE_HOME:-/var/cache}/sdx4-container}
image=localhost/sdx4:check
mirror=http://deb.debian.org/debian

fail() {
    echo "container-check: FAILED: $*" >&2
    exit 1
}
step() { echo "-- $* (${SECONDS}s)"; }

[ "$(id -u)" -eq 0 ] || fail "needs root (debootstrap, podman image mount, chroot); run it with sudo"
for tool in podman debootstrap unshare chroot flock curl python3; do
    command -v "$tool" >/dev/null || fail "$tool is missing (scripts/install-deps.sh installs it)"
done

# A store of the script's own. runroot and tmpdir are on /run, a tmpfs, so
# that podman sees a reboot and forgets mounts that no longer exist.
podman=(podman --root "$cache/storage" --runroot /run/sdx4-container/storage
        --tmpdir /run/sdx4-container/libpod --storage-driver overlay
        --cgroup-manager cgroupfs --events-backend file)
mkdir -p "$cache"
exec 9>"$cache/lock"
flock -n 9 || { echo "-- waiting for another container-check on $cache"; flock 9; }
work=$(mktemp -d)
server_pid=
mounted=
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    if [ -n "$mounted" ]; then "${podman[@]}" image unmount "$image" >/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
"${podman[@]}" info >"$work/podman-info" 2>&1 ||
    fail "podman cannot start here: $(tail -n 3 "$work/podman-info")"

# ---- the base: one minbase root, both of the Dockerfile's base names -------
base_tar=$cache/bookworm-minbase.tar
if [ ! -s "$base_tar" ]; then
    step "debootstrap --variant=minbase bookworm from $mirror (first run only)"
    rm -rf "$cache/root.tmp"
    debootstrap --variant=minbase bookworm "$cache/root.tmp" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
        fail "debootstrap: $(tail -n 3 "$cache/debootstrap.log")"
    tar -C "$cache/root.tmp" -cf "$base_tar.tmp" . || fail "packing the root into $base_tar"
    mv "$base_tar.tmp" "$base_tar"
    rm -rf "$cache/root.tmp"
fi
if ! "${podman[@]}" image exists localhost/debian:bookworm; then
    step "importing the root as debian:bookworm and debian:bookworm-slim"
    "${podman[@]}" import --quiet "$base_tar" localhost/debian:bookworm >/dev/null ||
        fail "podman import $base_tar"
fi
"${podman[@]}" tag localhost/debian:bookworm localhost/debian:bookworm-slim

# ---- the build -----------------------------------------------------------
# The build stage is tagged too, so that pruning what earlier builds left
# keeps its cached layers (the toolchain's apt-get) for the next run.
step "podman build --isolation chroot --network host (compiles sdx4 with -j$(nproc); log: $cache/build.log)"
: >"$cache/build.log"
for target in build ""; do
    if ! "${podman[@]}" build --isolation chroot --network host --pull=never --layers --format docker \
            ${target:+--target "$target"} -t "$image${target:+-$target}" \
            -f "$source/Dockerfile" "$source" >>"$cache/build.log" 2>&1; then
        tail -n 30 "$cache/build.log" >&2
        fail "podman build ${target:+--target $target }(the last lines of $cache/build.log are above)"
    fi
done
"${podman[@]}" image prune --force >/dev/null ||
    echo "-- warning: podman image prune failed: layers of earlier builds stay in $cache/storage"
size=$("${podman[@]}" image inspect --format '{{.Size}}' "$image")
echo "image $image: $((size / 1000000)) MB"

# ---- the image's file system -------------------------------------------------
mnt=$("${podman[@]}" image mount "$image") || fail "podman image mount $image"
mounted=1
for dir in dev proc sys tmp; do
    [ -d "$mnt/$dir" ] || fail "the image has no /$dir to mount on"
done
# the image's configuration, as `podman run` would apply it
config=$("${podman[@]}" image inspect --format '{{json .Config}}' "$image")
python3 - "$config" "$work" <<'EOF' || fail "reading the image's configuration"
import json, sys
config, work = json.loads(sys.argv[1]), sys.argv[2]
env = config.get("Env") or []
if not any(e.startswith("PATH=") for e in env):
    env.insert(0, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
for name, items in (("env", env), ("cmd", (config.get("Entrypoint") or []) + (config.get("Cmd") or []))):
    with open(f"{work}/{name}", "wb") as f:
        f.write(b"".join(s.encode() + b"\0" for s in items))
open(f"{work}/user", "w").write(config.get("User") or "root")
EOF
mapfile -d '' image_env <"$work/env"
mapfile -d '' image_cmd <"$work/cmd"
user=$(cat "$work/user")
uid=$(awk -F: -v u="$user" '$1 == u {print $3 ":" $4}' "$mnt/etc/passwd")
[ -n "$uid" ] || fail "user $user of the image is not in its /etc/passwd"

# Runs a command in the image as `podman run` would, in a mount namespace of
# its own (its mounts go when it ends). It execs, so that a background
# call's $! is the command itself: call it in a subshell, $(...) or &.
in_image() {
    # shellcheck disable=SC2016 # expanded by the inner shell
    exec unshare --mount --propagation private -- sh -c '
        mnt=$1; shift
        mount --rbind /dev "$mnt/dev" && mount -t proc proc "$mnt/proc" &&
        mount -t sysfs -o ro sysfs "$mnt/sys" && mount -t tmpfs tmpfs "$mnt/tmp" &&
        exec chroot --userspec="$0" "$mnt" "$@"' "$uid" "$mnt" \
        /usr/bin/env -i "${image_env[@]}" "$@"
}

step "the binary runs"
version=$(in_image sdx4 --version) || fail "sdx4 --version in the image"
echo "$version"

step "the image's command serves (${image_cmd[*]})"
in_image SDX4_HOST=127.0.0.1 SDX4_PORT=0 SDX4_REQUEST_TIMEOUT=300 "${image_cmd[@]}" >"$work/server.log" 2>&1 &
server_pid=$!
port=
for _ in $(seq 600); do # up to 60 s for it to listen
    port=$(sed -n 's/.*"event":"listening".*"port":\([0-9]*\).*/\1/p' "$work/server.log")
    [ -n "$port" ] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; fail "the server exited before listening"; }
    sleep 0.1
done
[ -n "$port" ] || { cat "$work/server.log" >&2; fail "the server did not listen within 60 s"; }
grep '"event":"listening"' "$work/server.log"
url=http://127.0.0.1:$port
status=
for _ in $(seq 300); do # up to 150 s for the model to load and warm up
    status=$(curl -s --max-time 10 -o "$work/health" -w '%{http_code}' "$url/api/v1/health") || true
    [ "$status" = 200 ] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; fail "the server exited before it was ready"; }
    sleep 0.5
done
[ "$status" = 200 ] || { cat "$work/server.log" >&2; fail "/api/v1/health answered ${status:-nothing}, not 200, within 150 s"; }
grep -q '"demo_model":true' "$work/health" ||
    fail "health does not report the demo model (the command chose another): $(cat "$work/health")"
echo "health 200: $(cat "$work/health")"

step "one upscale of a 64x64 PNG"
python3 - "$work/in.png" <<'EOF' || fail "writing the test PNG"
import struct, sys, zlib
w = h = 64
rows = b"".join(b"\0" + bytes(v for x in range(w) for v in (x * 4 % 256, y * 4 % 256, (x + y) * 2 % 256))
                for y in range(h))
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
open(sys.argv[1], "wb").write(png + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
EOF
status=$(curl -s --max-time 330 -o "$work/out.png" -w '%{http_code} %{content_type}' \
         -F "image=@$work/in.png" -F num_inference_steps=1 -F seed=42 -F "prompt=a test" "$url/api/v1/upscale") || true
[ "${status%% *}" = 200 ] || fail "upscale answered '$status': $(head -c 500 "$work/out.png")"
python3 - "$work/out.png" <<'EOF' || fail "the upscale's answer is not a 256x256 PNG ($status)"
import struct, sys
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
w, h = struct.unpack(">II", data[16:24])
assert (w, h) == (256, 256), f"{w}x{h}"
print(f"upscale 200: {w}x{h} PNG, {len(data)} bytes")
EOF

step "/docs and its Swagger UI files"
for path in /docs /docs/swagger-ui-bundle.js /docs/swagger-ui.css /openapi.json; do
    status=$(curl -s --max-time 30 -o "$work/page" -w '%{http_code}' "$url$path") || true
    if [ "$status" != 200 ] || [ ! -s "$work/page" ]; then
        fail "$path answered ${status:-nothing}, not 200 with a body"
    fi
    echo "$path 200, $(wc -c <"$work/page") bytes"
done

step "stopping the server (SIGTERM)"
kill -TERM "$server_pid"
for _ in $(seq 300); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$server_pid" 2>/dev/null && fail "the server did not stop within 30 s of SIGTERM"
wait "$server_pid" || fail "the server exited with status $? after SIGTERM"
server_pid=
echo "container-check: passed in ${SECONDS}s (image $((size / 1000000)) MB)"
