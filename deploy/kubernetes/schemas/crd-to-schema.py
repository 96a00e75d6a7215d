#!/usr/bin/env python3
"""crd-to-schema.py CRD.yaml VERSION OUT.json

Turns one version of a CustomResourceDefinition into the JSON schema that
scripts/check-kubernetes.py validates that kind's objects with. The CRD's
OpenAPI v3 schema becomes JSON schema: descriptions are dropped (they are
most of the bytes), nullable and x-kubernetes-int-or-string become the
types they stand for, and an object that lists its properties refuses any
other, as the API server's pruning would silently drop them (unless the CRD
keeps unknown fields there).
"""
import json
import sys

import yaml


def convert(node):
    if isinstance(node, list):
        return [convert(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("description", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
                   "x-kubernetes-map-type", "x-kubernetes-validations"):
            continue
        if key == "properties":
            out[key] = {name: convert(child) for name, child in value.items()}
        else:
            out[key] = convert(value)
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    keeps_unknown = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not keeps_unknown:
        out["additionalProperties"] = False
    return out


def main():
    crd_path, version, out_path = sys.argv[1:]
    with open(crd_path) as f:
        crd = yaml.safe_load(f)
    spec = crd["spec"]
    found = [v for v in spec["versions"] if v["name"] == version]
    if not found:
        sys.exit(f"{crd_path}: no version {version}")
    schema = convert(found[0]["schema"]["openAPIV3Schema"])
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    schema["x-source"] = {"crd": crd["metadata"]["name"], "version": version}
    with open(out_path, "w") as f:
        json.dump(schema, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
