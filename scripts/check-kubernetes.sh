#!/usr/bin/env bash
# scripts/check-kubernetes.sh: renders every overlay of deploy/kubernetes
# with kustomize and validates what comes out (scripts/check-kubernetes.py:
# the Kubernetes schemas, the CRDs' schemas, and the references between
# objects). Then proves that the check can fail: each broken copy of the
# manifests below must be refused, with the message given beside it.
#
# Tools come from PyPI into a virtual environment ($SDX4_KUBE_VENV, default
# $TMPDIR/sdx4-kube-venv), rebuilt when deploy/kubernetes/requirements.txt
# changes; after that the check runs offline. No cluster is needed or used.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${SDX4_KUBE_VENV:-${TMPDIR:-/tmp}/sdx4-kube-venv}
requirements=$root/deploy/kubernetes/requirements.txt
if ! cmp -s "$requirements" "$venv/requirements.txt"; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/requirements.txt"
fi
kubectl=$venv/bin/kubectl
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# check TREE OVERLAY: renders TREE/overlays/OVERLAY and validates it; the
# output of both goes to $work/out
check() {
    "$kubectl" kustomize "$1/overlays/$2" >"$work/rendered.yaml" 2>"$work/out" &&
        "$venv/bin/python" "$root/scripts/check-kubernetes.py" "$work/rendered.yaml" >"$work/out" 2>&1
}

failed=0
for dir in "$root"/deploy/kubernetes/overlays/*/; do
    overlay=$(basename "$dir")
    if check "$root/deploy/kubernetes" "$overlay"; then
        echo "overlay $overlay: $(tail -n 1 "$work/out")"
        cp "$work/rendered.yaml" "$work/$overlay.yaml"
    else
        echo "overlay $overlay: FAILED"; sed 's/^/  /' "$work/out"; failed=1
    fi
done
# the gpu overlay's model Job runs this script (README: its ConfigMap)
[ -f "$root/scripts/download-model.sh" ] || { echo "scripts/download-model.sh is missing"; failed=1; }

# The Redis StatefulSet's command line, run by Debian's redis-server (7.0;
# the image's is 7.2) on a unix socket: Redis must accept every option and
# come up append-only and never evicting (its data folder is moved to a
# temporary one: Redis enters it while it reads the options). Then what the KEDA triggers read,
# on a job queued while no worker exists: the group's lag counts it, its
# pending entries do not, which is why lagCount is the trigger that wakes
# workers from zero.
mkdir "$work/redis"
mapfile -t redis_args < <("$venv/bin/python" - "$work/cpu.yaml" "$work/redis" <<'PY'
import sys, yaml
for obj in yaml.safe_load_all(open(sys.argv[1])):
    if obj and obj["kind"] == "StatefulSet" and obj["metadata"]["name"] == "sdx4-redis":
        args = obj["spec"]["template"]["spec"]["containers"][0]["args"][1:]
        args[args.index("--dir") + 1] = sys.argv[2]
        print("\n".join(args))
PY
)
redis-server "${redis_args[@]}" --port 0 --unixsocket "$work/redis/sock" >"$work/redis/log" 2>&1 &
redis_pid=$!
rcli() { redis-cli -s "$work/redis/sock" "$@"; }
for _ in $(seq 50); do
    rcli ping >/dev/null 2>&1 || ! kill -0 "$redis_pid" 2>/dev/null && break
    sleep 0.1
done
redis_facts=$(rcli config get appendonly | tr '\n' ' '; rcli config get maxmemory-policy | tr '\n' ' '
              rcli xadd sdx4:tasks '*' job 1 >/dev/null
              rcli xgroup create sdx4:tasks sdx4-workers 0 >/dev/null
              rcli xinfo groups sdx4:tasks | tr '\n' ' ') 2>/dev/null || true
kill "$redis_pid" 2>/dev/null || true
wait "$redis_pid" || true
if [[ "$redis_facts" == *"appendonly yes maxmemory-policy noeviction "* &&
      "$redis_facts" == *" pending 0 "* && "$redis_facts" == *" lag 1 "* ]]; then
    echo "redis: the StatefulSet's options accepted; a job with no worker: lag 1, pending 0"
else
    echo "redis: the StatefulSet's command line did not come up as expected: $redis_facts"
    sed 's/^/  /' "$work/redis/log"; failed=1
fi

# Broken copies: file (under deploy/kubernetes) | sed program | overlay |
# what the refusal must say
mutations=(
  "base/redis.yaml|s/^  replicas: 1\$/  replica: 1/|cpu|'replica' was unexpected"
  "base/api.yaml|s/containerPort: 8000/containerPort: \"8000\"/|cpu|is not of type 'integer'"
  "components/keda/scaledobject.yaml|s/minReplicaCount: 0/minReplicaCount: none/|gpu|is not of type 'integer'"
  "components/monitoring/servicemonitor.yaml|s/      interval: 30s/      intervall: 30s/|gpu|'intervall' was unexpected"
  "base/networkpolicy.yaml|\$a ---\\napiVersion: example.com/v1\\nkind: Widget\\nmetadata:\\n  name: w|cpu|no schema"
  "base/api.yaml|s/terminationGracePeriodSeconds: 45/terminationGracePeriodSeconds: 30/|cpu|does not cover preStop"
  "base/kustomization.yaml|s/SDX4_REQUEST_TIMEOUT=60/SDX4_REQUEST_TIMEOUT=300/|gpu|does not cover SDX4_REQUEST_TIMEOUT"
  "overlays/gpu/kustomization.yaml|s/^namespace: sdx4\$/namespace: upscaler/|gpu|is not the rendered Redis Service"
  "components/keda/scaledobject.yaml|s/sdx4-workers/workers/|gpu|not the workers' sdx4:tasks/sdx4-workers"
  "base/kustomization.yaml|s/SDX4_LOG_LEVEL=/SDX4_LOGLEVEL=/|cpu|SDX4_LOGLEVEL is not a setting"
  "base/api.yaml|s/--workers/--worker/|cpu|--worker is not a setting"
  "base/worker.yaml|s/name: SDX4_WEBHOOK_SECRET/name: SDX4_WEBHOOKSECRET/|gpu|SDX4_WEBHOOKSECRET is not a setting"
  "components/keda/api-ready-without-workers.yaml|s/SDX4_READY_WITHOUT_WORKERS/SDX4_READY_WITHOUT_WORKER/|gpu|SDX4_READY_WITHOUT_WORKER is not a setting"
  "components/keda/api-ready-without-workers.yaml|s/value: \"true\"/value: \"false\"/|gpu|scales the workers to zero, but"
  "base/worker.yaml|s/\$(POD_NAME)/\$(POD_NAM)/|gpu|\$(POD_NAM) is not a variable"
  "base/api.yaml|s/      targetPort: http/      targetPort: web/|cpu|targetPort web is named by none"
  "base/worker.yaml|0,/readOnlyRootFilesystem: true/s//readOnlyRootFilesystem: false/|cpu|readOnlyRootFilesystem is not set"
  "base/worker.yaml|s/^        - name: tmp\$/        - name: temp/|cpu|mounts tmp, which no volume"
  "base/ingress.yaml|s/^spec:\$/spec: [/|cpu|MalformedYAMLError"
  "overlays/gpu-external-redis/kustomization.yaml|s/value: {name: sdx4-redis}/value: {name: redis-auth}/|gpu-external-redis|no TriggerAuthentication redis-auth"
  "overlays/gpu-external-redis/triggerauthentication.yaml|s/- parameter: password/- parameter: password\n      secret: x/|gpu-external-redis|'secret' was unexpected"
)
for m in "${mutations[@]}"; do
    IFS='|' read -r file program overlay expected <<<"$m"
    rm -rf "$work/tree"
    cp -r "$root/deploy/kubernetes" "$work/tree"
    sed -i "$program" "$work/tree/$file"
    if cmp -s "$root/deploy/kubernetes/$file" "$work/tree/$file"; then
        echo "negative test on $file: the sed program changed nothing"; failed=1
    elif check "$work/tree" "$overlay"; then
        echo "negative test on $file ($program): NOT refused"; failed=1
    elif ! grep -qF -- "$expected" "$work/out"; then
        echo "negative test on $file ($program): refused, but without \"$expected\":"
        sed 's/^/  /' "$work/out"; failed=1
    fi
done
[ "$failed" = 0 ] && echo "kubernetes manifests: every overlay valid, ${#mutations[@]} broken copies refused"
exit "$failed"
