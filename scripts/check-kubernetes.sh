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
    else
        echo "overlay $overlay: FAILED"; sed 's/^/  /' "$work/out"; failed=1
    fi
done
# the gpu overlay's model Job runs this script (README: its ConfigMap)
[ -f "$root/scripts/download-model.sh" ] || { echo "scripts/download-model.sh is missing"; failed=1; }

# Broken copies: file (under deploy/kubernetes) | sed program | overlay |
# what the refusal must say
mutations=(
  "base/worker.yaml|s/^  replicas: 1\$/  replica: 1/|cpu|'replica' was unexpected"
  "base/api.yaml|s/containerPort: 8000/containerPort: \"8000\"/|cpu|is not of type 'integer'"
  "components/keda/scaledobject.yaml|s/minReplicaCount: 0/minReplicaCount: none/|gpu|is not of type 'integer'"
  "components/monitoring/servicemonitor.yaml|s/      interval: 30s/      intervall: 30s/|gpu|'intervall' was unexpected"
  "base/networkpolicy.yaml|\$a ---\\napiVersion: example.com/v1\\nkind: Widget\\nmetadata:\\n  name: w|cpu|no schema"
  "base/api.yaml|s/terminationGracePeriodSeconds: 45/terminationGracePeriodSeconds: 30/|cpu|does not cover preStop"
  "base/kustomization.yaml|s/SDX4_REQUEST_TIMEOUT=60/SDX4_REQUEST_TIMEOUT=300/|gpu|does not cover SDX4_REQUEST_TIMEOUT"
  "overlays/gpu/kustomization.yaml|s/^namespace: sdx4\$/namespace: upscaler/|gpu|is not the rendered Redis Service"
  "components/keda/scaledobject.yaml|s/sdx4-workers/workers/|gpu|not the workers' sdx4:tasks/sdx4-workers"
  "base/api.yaml|s/      targetPort: http/      targetPort: web/|cpu|targetPort web is named by none"
  "base/worker.yaml|0,/readOnlyRootFilesystem: true/s//readOnlyRootFilesystem: false/|cpu|readOnlyRootFilesystem is not set"
  "base/worker.yaml|s/^        - name: tmp\$/        - name: temp/|cpu|mounts tmp, which no volume"
  "base/ingress.yaml|s/^spec:\$/spec: [/|cpu|MalformedYAMLError"
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
