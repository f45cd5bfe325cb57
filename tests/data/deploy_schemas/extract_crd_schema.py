"""Turns a CustomResourceDefinition into the JSON schema of one of its versions, without the
descriptions (they are most of a CRD's bytes and nothing validates against them).

    python extract_crd_schema.py CRD.yaml VERSION > KIND-VERSION.json
"""

from __future__ import annotations

import json
import sys

import yaml


def strip_descriptions(node):
    if isinstance(node, dict):
        # A property *named* "description" maps to a schema (a dict), so only string values go.
        return {
            k: strip_descriptions(v)
            for k, v in node.items()
            if not (k == "description" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main(path: str, version: str) -> None:
    with open(path, encoding="utf-8") as f:
        crd = yaml.safe_load(f)
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strip_descriptions(entry["schema"]["openAPIV3Schema"])
    schema["x-source-crd"] = crd["metadata"]["name"]
    json.dump(schema, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
