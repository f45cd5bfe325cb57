"""What the deploy tests read: the manifests under deploy/, the schemas vendored in
tests/data/deploy_schemas (sources in its SOURCES.md), and the app facts manifests must agree
with (routes, setting env names, vLLM metric names)."""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = ROOT / "tests" / "data" / "deploy_schemas"
MAIN_MANIFEST = DEPLOY / "aks-omega-vlm.yaml"
COMPOSE = DEPLOY / "compose.yaml"
# Optional: the /v1-only Ingress, for those who make the main manifest's Service ClusterIP.
INGRESS = DEPLOY / "ingress.yaml"

# Every manifest must pass each of these, strictly (unknown fields rejected): the newest six minors
# kubernetes-validate bundles, a range that holds AKS's supported minors (three GA ones plus LTS)
# through late 2026. AKS's own calendar is not reachable offline; widen this when it moves on.
KUBERNETES_VERSIONS = ("1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0")

# Custom resources: (apiVersion, kind) -> the vendored schema of that CRD version.
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-v1alpha1.json",
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool-v1.json",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateway-v1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-v1.json",
}

# Helm values files: not Kubernetes objects, checked for the fields the tests name.
HELM_VALUES = {
    "prometheus-adapter": DEPLOY / "scale-out" / "prometheus-adapter" / "values.yaml",
    "llm-d-router": DEPLOY / "scale-out" / "inference-gateway" / "epp-values.yaml",
}

# What llm-d-router's endpoint picker reads for `modelServers.type: vllm` (defaultEngineConfigs
# in pkg/epp/framework/plugins/datalayer/extractor/metrics/factories.go at v0.9.0). It also asks
# for vllm:lora_requests_info and vllm:cache_config_info, which this server does not export
# (no LoRA; the picker then assumes no adapters and its default block size).
EPP_VLLM_METRICS = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")


@functools.cache
def yaml_files() -> list[Path]:
    # Pruned walk: rglob would descend into a real .venv (tens of thousands of files) on CI, and
    # the benchmarks' downloads (bench/.llamacpp holds llama.cpp's own YAML) are not ours.
    skip = {".venv", ".git", ".pytest_cache", ".ruff_cache", "node_modules", "__pycache__"}
    skip_paths = {ROOT / "bench" / name for name in ("models", ".llamacpp", ".venv-peer", "results")}
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and Path(folder) / d not in skip_paths]
        found += [Path(folder) / f for f in files if f.endswith((".yaml", ".yml"))]
    return sorted(found)


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def manifest_files() -> list[Path]:
    """Every YAML under deploy/ whose documents are Kubernetes objects."""
    return [
        p
        for p in sorted(DEPLOY.rglob("*.yaml"))
        if p != COMPOSE and p not in HELM_VALUES.values() and all("kind" in d for d in load_docs(p))
    ]


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in load_docs(path)]


def one(kind: str, path: Path | None = None) -> dict[str, Any]:
    found = [doc for p, doc in manifests() if doc["kind"] == kind and (path is None or p == path)]
    # Not an assert: helpers outside test modules run under -O, which strips asserts.
    if len(found) != 1:
        raise LookupError(f"expected one {kind}, found {len(found)}")
    return found[0]


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected, as kubernetes-validate's strict mode does for
    built-in kinds: the API server would silently prune a misspelt field instead."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: (strict(v) if k != "properties" else {n: strict(s) for n, s in v.items()})
        for k, v in schema.items()
    }
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(file: str) -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / file).read_text(encoding="utf-8"))
    schema.pop("x-source-crd", None)
    return jsonschema.Draft7Validator(strict(schema))


@functools.cache
def compose_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads((SCHEMAS / "compose-spec.json").read_text(encoding="utf-8")))


def app_routes() -> dict[str, Any]:
    """Path -> route handler, as the app registers them."""
    from app.main import ROUTES

    return {path: handler for handler in ROUTES for path in handler.paths}


def vllm_metric_names() -> set[str]:
    """The vLLM names the server exports: request metrics in app/vllm_metrics.py, the scheduler
    gauges (running, waiting, KV cache) in app/metrics.py."""
    source = "".join(
        (ROOT / "app" / name).read_text(encoding="utf-8") for name in ("vllm_metrics.py", "metrics.py")
    )
    return set(re.findall(r'"(vllm:[a-z_]+)"', source))


def setting_env_names() -> set[str]:
    from app.settings import ENV_NAMES

    return {name for names in ENV_NAMES.values() for name in names}


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]
