#!/usr/bin/env python3
"""check-kubernetes.py RENDERED.yaml...

Validates manifests rendered by `kubectl kustomize` (scripts/check-kubernetes.sh
renders each overlay of deploy/kubernetes and runs this on it). Exits 1 and
names each problem found, 0 when there is none.

Two layers. First each object against its kind's schema: the built-in kinds
against the Kubernetes API's own JSON schemas (kubernetes-validate's bundled
copies, strict: an unknown field is an error, as `kubectl apply
--validate=strict` makes it), at the oldest and the newest Kubernetes
version we claim; KEDA's ScaledObject and the Prometheus Operator's
ServiceMonitor against schemas made from their CRDs
(deploy/kubernetes/schemas). A kind with no schema is an error, not a
warning: it would otherwise pass unchecked.

Then what no schema can see, because it spans objects or ties them to sdx4:
selectors that select pods, ports named where they are used, the
ConfigMaps and Secrets a pod reads, grace periods that cover the shutdown
drain the ConfigMap sets, SDX4_* variables and sdx4 flags that are
settings of src/server/config.c (a misspelt one would be ignored) and
$(VARIABLES) in arguments that are defined, the KEDA
triggers on the stream and group the
workers use and on the Redis the overlay deploys, and every long-running
container non-root with a read-only root and sized.
"""
import functools
import json
import os
import re
import sys

import jsonschema
import kubernetes_validate.utils as kv
import yaml

KUBERNETES_VERSIONS = ("1.30", "1.37")  # oldest and newest validated against
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCHEMA_DIR = os.path.join(ROOT, "deploy", "kubernetes", "schemas")
CRD_SCHEMAS = {  # (apiVersion, kind) -> file in SCHEMA_DIR
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication-keda.sh-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
}
# Made by hand before an apply, as the overlays' comments say, so absent
# from the rendering: (kind, name)
EXTERNAL = {("Secret", "sdx4-secrets"), ("ConfigMap", "sdx4-download-model")}
# The queue's names in Redis, as the server and the workers use them
TASK_STREAM, WORKER_GROUP = "sdx4:tasks", "sdx4-workers"
# Settings of issue 13's cluster mode that the manifests use before
# src/server/config.c has them: drop each once the table lists it
CLUSTER_SETTINGS = {"redis", "name"}
API_PRESTOP_MARGIN = 5   # seconds beyond the drain, for the process to exit
WORKER_MARGIN = 15       # seconds beyond a job's deadline, to store its result
WORKLOADS = ("Deployment", "StatefulSet", "Job")

# the bundled schemas are megabytes of JSON, read once rather than per object
kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)


def name_of(obj):
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def validate_schema(obj, problems):
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CRD_SCHEMAS:
        with open(os.path.join(SCHEMA_DIR, CRD_SCHEMAS[key])) as f:
            schema = json.load(f)
        for error in jsonschema.Draft7Validator(schema).iter_errors(obj):
            path = ".".join(str(p) for p in error.absolute_path)
            problems.append(f"{name_of(obj)}: {path}: {error.message}")
        return
    for version in KUBERNETES_VERSIONS:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            problems.append(f"{name_of(obj)}: {path}: {error.message} (Kubernetes {version})")
            return
        except kv.SchemaNotFoundError as error:
            problems.append(f"{name_of(obj)}: no schema: {error.message}")
            return


def pod_spec(obj):
    return obj["spec"]["template"]["spec"] if obj["kind"] in WORKLOADS else None


def pod_labels(obj):
    return obj["spec"]["template"].get("metadata", {}).get("labels", {})


def selects(selector, labels):
    """matchLabels/matchExpressions (or a Service's plain map) against labels."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        if e["operator"] == "In" and value not in e["values"]:
            return False
        if e["operator"] == "NotIn" and value in e.get("values", []):
            return False
        if e["operator"] == "Exists" and not present:
            return False
        if e["operator"] == "DoesNotExist" and present:
            return False
    return True


def containers(spec):
    return spec.get("initContainers", []) + spec.get("containers", [])


def port_names(spec):
    return {p["name"] for c in spec.get("containers", []) for p in c.get("ports", []) if "name" in p}


def env_of(container, objects):
    """The container's variables from its ConfigMaps (envFrom) and literals."""
    env = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        cm = ref and objects.get(("ConfigMap", ref["name"]))
        if cm:
            env.update(cm.get("data", {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


def check_references(objects, problems):
    workloads = [o for o in objects.values() if o["kind"] in WORKLOADS]
    for obj in workloads:
        spec = pod_spec(obj)
        names = port_names(spec)
        volumes = {v["name"] for v in spec.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        for v in spec.get("volumes", []):
            for kind, field, key in (("ConfigMap", "configMap", "name"),
                                     ("Secret", "secret", "secretName"),
                                     ("PersistentVolumeClaim", "persistentVolumeClaim", "claimName")):
                if field in v and (kind, v[field][key]) not in set(objects) | EXTERNAL:
                    problems.append(f"{name_of(obj)}: volume {v['name']}: no {kind} {v[field][key]}")
        for c in containers(spec):
            where = f"{name_of(obj)}: container {c['name']}"
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes | claims:
                    problems.append(f"{where}: mounts {m['name']}, which no volume defines")
            for source in c.get("envFrom", []):
                for kind, field in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if field in source and (kind, source[field]["name"]) not in set(objects) | EXTERNAL:
                        problems.append(f"{where}: envFrom: no {kind} {source[field]['name']}")
            for var in c.get("env", []):
                ref = var.get("valueFrom", {})
                for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if field not in ref or ref[field].get("optional"):
                        continue
                    target = objects.get((kind, ref[field]["name"]))
                    if (kind, ref[field]["name"]) in EXTERNAL:
                        continue
                    if not target:
                        problems.append(f"{where}: {var['name']}: no {kind} {ref[field]['name']}")
                    elif ref[field]["key"] not in {**target.get("data", {}), **target.get("stringData", {})}:
                        problems.append(f"{where}: {var['name']}: {kind} {ref[field]['name']} "
                                        f"has no key {ref[field]['key']}")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", c.get(probe, {}).get("tcpSocket", {})).get("port")
                if isinstance(port, str) and port not in {p.get("name") for p in c.get("ports", [])}:
                    problems.append(f"{where}: {probe} uses port {port}, which it does not name")

    for svc in (o for o in objects.values() if o["kind"] == "Service"):
        pods = [o for o in workloads if selects(svc["spec"].get("selector", {}), pod_labels(o))]
        if not pods:
            problems.append(f"{name_of(svc)}: its selector matches no pod")
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort")
            if isinstance(target, str) and not any(target in port_names(pod_spec(p)) for p in pods):
                problems.append(f"{name_of(svc)}: targetPort {target} is named by none of its pods")

    for obj in objects.values():
        kind = obj["kind"]
        if kind == "PodDisruptionBudget" and not any(
                selects(obj["spec"]["selector"], pod_labels(o)) for o in workloads):
            problems.append(f"{name_of(obj)}: its selector matches no pod")
        if kind in ("HorizontalPodAutoscaler", "ScaledObject"):
            ref = obj["spec"]["scaleTargetRef"]
            if (ref.get("kind", "Deployment"), ref["name"]) not in objects:
                problems.append(f"{name_of(obj)}: scales {ref['name']}, which is not rendered")
        for i, trigger in enumerate(obj["spec"].get("triggers", []) if kind == "ScaledObject" else []):
            auth = trigger.get("authenticationRef")
            if auth and (auth.get("kind", "TriggerAuthentication"), auth["name"]) not in objects:
                problems.append(f"{name_of(obj)}: trigger {i}: no {auth.get('kind', 'TriggerAuthentication')} "
                                f"{auth['name']}")
        if kind == "TriggerAuthentication":
            for ref in obj["spec"].get("secretTargetRef", []):
                if ("Secret", ref["name"]) not in set(objects) | EXTERNAL:
                    problems.append(f"{name_of(obj)}: parameter {ref['parameter']}: no Secret {ref['name']}")
        if kind == "Ingress":
            for rule in obj["spec"].get("rules", []):
                for path in rule.get("http", {}).get("paths", []):
                    backend = path["backend"]["service"]
                    svc = objects.get(("Service", backend["name"]))
                    if not svc:
                        problems.append(f"{name_of(obj)}: no Service {backend['name']}")
                    elif backend["port"].get("name") not in (None, *(p.get("name") for p in svc["spec"]["ports"])):
                        problems.append(f"{name_of(obj)}: Service {backend['name']} has no port "
                                        f"{backend['port']['name']}")
        if kind == "ServiceMonitor":
            services = [o for o in objects.values()
                        if o["kind"] == "Service" and selects(obj["spec"]["selector"], o["metadata"].get("labels", {}))]
            if not services:
                problems.append(f"{name_of(obj)}: its selector matches no Service")
            for endpoint in obj["spec"].get("endpoints", []):
                if not any(endpoint.get("port") in {p.get("name") for p in s["spec"]["ports"]} for s in services):
                    problems.append(f"{name_of(obj)}: no selected Service has a port {endpoint.get('port')}")


def settings():
    """The setting names of config.c's table: {"name", OPT_..."""
    with open(os.path.join(ROOT, "src", "server", "config.c")) as f:
        return set(re.findall(r'\{"([a-z0-9-]+)", OPT_', f.read())) | CLUSTER_SETTINGS


def check_settings(objects, problems):
    known = settings()
    for obj in (o for o in objects.values() if o["kind"] in WORKLOADS):
        for c in containers(pod_spec(obj)):
            if c.get("command", [None])[0] != "sdx4":
                continue
            where = f"{name_of(obj)}: container {c['name']}"
            defined = set(env_of(c, objects)) | {v["name"] for v in c.get("env", [])}
            # the kubelet leaves a reference to an undefined variable as it is
            for arg in c.get("command", []) + c.get("args", []):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                    if ref not in defined:
                        problems.append(f"{where}: $({ref}) is not a variable of the container")
            for var in defined:
                if var.startswith("SDX4_") and var[5:].lower().replace("_", "-") not in known:
                    problems.append(f"{where}: {var} is not a setting of sdx4 (src/server/config.c)")
            for arg in c.get("args", []):
                if arg.startswith("--") and arg[2:].split("=")[0] not in known:
                    problems.append(f"{where}: {arg} is not a setting of sdx4 (src/server/config.c)")


def ready_without_workers(container, objects):
    """Whether an sdx4 serve container stays ready with no worker."""
    env = env_of(container, objects)
    return str(env.get("SDX4_READY_WITHOUT_WORKERS", "")).lower() in ("true", "1", "yes") or \
        any(a in ("--ready-without-workers", "--ready-without-workers=true") for a in container.get("args", []))


def seconds(env, name, where, problems):
    try:
        return float(env[name])
    except (KeyError, ValueError):
        problems.append(f"{where}: {name} is not set to a number")
        return None


def check_sdx4(objects, problems):
    """The grace periods, KEDA's view of the queue, and the pods' hardening."""
    for obj in (o for o in objects.values() if o["kind"] in ("Deployment", "StatefulSet")):
        spec = pod_spec(obj)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        for c in spec["containers"]:
            where = f"{name_of(obj)}: container {c['name']}"
            command = c.get("command", []) + c.get("args", [])
            env = env_of(c, objects)
            if command[:2] == ["sdx4", "serve"]:
                drain = seconds(env, "SDX4_SHUTDOWN_TIMEOUT", where, problems)
                hook = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
                sleep = float(hook[1]) if hook[:1] == ["sleep"] and len(hook) == 2 else 0
                if drain is not None and grace < sleep + drain + API_PRESTOP_MARGIN:
                    problems.append(f"{where}: terminationGracePeriodSeconds {grace} does not cover "
                                    f"preStop {sleep:g} s + SDX4_SHUTDOWN_TIMEOUT {drain:g} s + "
                                    f"{API_PRESTOP_MARGIN} s")
            if command[:2] == ["sdx4", "worker"]:
                deadline = seconds(env, "SDX4_REQUEST_TIMEOUT", where, problems)
                if deadline is not None and grace < deadline + WORKER_MARGIN:
                    problems.append(f"{where}: terminationGracePeriodSeconds {grace} does not cover "
                                    f"SDX4_REQUEST_TIMEOUT {deadline:g} s + {WORKER_MARGIN} s")
            resources = c.get("resources", {})
            if not {"cpu", "memory"} <= set(resources.get("requests", {})) or \
                    "memory" not in resources.get("limits", {}):
                problems.append(f"{where}: needs cpu and memory requests and a memory limit")
        pod_security = spec.get("securityContext", {})
        for c in containers(spec):
            security = {**pod_security, **c.get("securityContext", {})}
            where = f"{name_of(obj)}: container {c['name']}"
            if not security.get("runAsNonRoot"):
                problems.append(f"{where}: runAsNonRoot is not set")
            if not security.get("readOnlyRootFilesystem"):
                problems.append(f"{where}: readOnlyRootFilesystem is not set")
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")

    # workers scaled to zero: the API nodes must stay ready without them,
    # or no upscale reaches the queue that would wake one (KEDA's default
    # minReplicaCount is 0)
    api_ready = [ready_without_workers(c, objects)
                 for o in objects.values() if o["kind"] == "Deployment"
                 for c in pod_spec(o)["containers"] if (c.get("command", []) + c.get("args", []))[:2] == ["sdx4", "serve"]]
    for so in (o for o in objects.values() if o["kind"] == "ScaledObject"):
        if so["spec"].get("minReplicaCount", 0) == 0 and not all(api_ready):
            problems.append(f"{name_of(so)}: scales the workers to zero, but an sdx4 serve container lacks "
                            f"SDX4_READY_WITHOUT_WORKERS=true (its health would be 503 with no worker)")

    redis = objects.get(("Service", "sdx4-redis"))
    for so in (o for o in objects.values() if o["kind"] == "ScaledObject"):
        for i, trigger in enumerate(so["spec"]["triggers"]):
            where, meta = f"{name_of(so)}: trigger {i}", trigger.get("metadata", {})
            if trigger.get("type") != "redis-streams":
                continue
            if meta.get("stream") != TASK_STREAM or meta.get("consumerGroup") != WORKER_GROUP:
                problems.append(f"{where}: watches {meta.get('stream')}/{meta.get('consumerGroup')}, "
                                f"not the workers' {TASK_STREAM}/{WORKER_GROUP}")
            address = meta.get("address", "")
            # KEDA's operator resolves it from its own namespace: the name
            # must be the Service's full one, in the namespace deployed to
            if redis and not re.fullmatch(
                    rf"{redis['metadata']['name']}\.{redis['metadata'].get('namespace')}\.svc(\.cluster\.local)?:6379",
                    address):
                problems.append(f"{where}: address {address} is not the rendered Redis Service "
                                f"{redis['metadata']['name']} in namespace {redis['metadata'].get('namespace')}")


def main():
    problems, objects = [], {}
    for path in sys.argv[1:]:
        with open(path) as f:
            try:
                documents = [d for d in yaml.safe_load_all(f) if d is not None]
            except yaml.YAMLError as error:
                print(f"{path}: not YAML: {error}")
                return 1
        for obj in documents:
            if not isinstance(obj, dict) or not {"apiVersion", "kind", "metadata"} <= set(obj):
                problems.append(f"{path}: a document without apiVersion, kind and metadata")
                continue
            objects[(obj["kind"], obj["metadata"].get("name"))] = obj
            validate_schema(obj, problems)
    if not problems:  # the cross-checks read fields the schemas have vouched for
        check_references(objects, problems)
        check_settings(objects, problems)
        check_sdx4(objects, problems)
    for p in problems:
        print(p)
    print(f"{len(objects)} objects, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
