"""The Kubernetes manifests and the compose file under deploy/, checked offline: yamllint,
schemas (Kubernetes' own for built-in kinds, the vendored CRD schemas for custom resources, the
compose spec), and what the schemas cannot know: the pod runs hardened, probes hit routes the app
has and that need no key, metric and env names are the server's, the image comes from $REGISTRY."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
from yamllint import linter
from yamllint.config import YamlLintConfig

from tests.unit.deploy_files import (
    COMPOSE,
    CRD_SCHEMAS,
    DEPLOY,
    EPP_VLLM_METRICS,
    HELM_VALUES,
    KUBERNETES_VERSIONS,
    MAIN_MANIFEST,
    ROOT,
    app_routes,
    compose_validator,
    crd_validator,
    load_docs,
    manifest_files,
    manifests,
    one,
    pod_spec,
    setting_env_names,
    vllm_metric_names,
    yaml_files,
)

SCALE_OUT = DEPLOY / "scale-out"


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


@pytest.mark.parametrize("path", yaml_files(), ids=_ids(yaml_files()))
def test_yamllint_clean(path):
    config = YamlLintConfig(file=str(ROOT / ".yamllint"))
    problems = list(linter.run(path.read_text(encoding="utf-8"), config, str(path)))
    assert not problems, "\n".join(f"{path}:{p.line}:{p.column} {p.desc} ({p.rule})" for p in problems)


def test_every_deploy_yaml_is_checked_by_some_schema_or_values_test():
    checked = set(manifest_files()) | set(HELM_VALUES.values()) | {COMPOSE}
    assert set(DEPLOY.rglob("*.yaml")) == checked
    assert MAIN_MANIFEST in checked and len(manifest_files()) == 5


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_built_in_kinds_match_the_kubernetes_schema(version):
    checked = 0
    for path, doc in manifests():
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{path.name} {doc['kind']}/{doc['metadata']['name']} on {version}: {e.message} at {list(e.path)}"
            )
        checked += 1
    assert checked >= 8


def test_custom_resources_match_their_vendored_crd_schema():
    seen = set()
    for path, doc in manifests():
        key = (doc["apiVersion"], doc["kind"])
        if key not in CRD_SCHEMAS:
            continue
        errors = sorted(crd_validator(CRD_SCHEMAS[key]).iter_errors(doc), key=str)
        assert not errors, f"{path.name} {doc['kind']}: " + "; ".join(
            f"{e.message} at {list(e.path)}" for e in errors
        )
        seen.add(key)
    assert seen == set(CRD_SCHEMAS), "a vendored schema no manifest uses, or a custom resource left unchecked"


def test_schemas_reject_a_misspelt_field():
    """Strict mode is what makes the schema tests worth having: the API server prunes unknown
    fields silently, so a typo would otherwise deploy as if the field were not there."""
    deployment = copy.deepcopy(one("Deployment"))
    pod_spec(deployment)["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    monitor = copy.deepcopy(one("ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["bearerTokenSecrets"] = {}
    assert list(
        crd_validator(CRD_SCHEMAS[("monitoring.coreos.com/v1", "ServiceMonitor")]).iter_errors(monitor)
    )


def test_compose_file_matches_the_compose_spec():
    (doc,) = load_docs(COMPOSE)
    errors = list(compose_validator().iter_errors(doc))
    assert not errors, "; ".join(f"{e.message} at {list(e.path)}" for e in errors)
    doc["services"]["llm"]["stop_grace"] = "45s"
    assert list(compose_validator().iter_errors(doc)), "the compose schema no longer rejects unknown keys"


def test_pod_runs_as_non_root_under_the_restricted_profile():
    namespace = one("Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    spec = pod_spec(one("Deployment"))
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0 and pod["runAsGroup"] != 0
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    ctx = container["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"]
    # Read-only root: the cache, /tmp and /dev/shm are the only writable paths.
    assert ctx["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    config = one("ConfigMap")["data"]
    assert {config["CACHE_DIR"], "/tmp", "/dev/shm"} <= mounts


def test_what_the_image_writes_outside_the_cache_lands_on_a_writable_mount():
    """readOnlyRootFilesystem holds only if every cache path the image sets is mounted writable."""
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    paths = re.findall(r"(?:TRITON_CACHE_DIR|CUDA_CACHE_PATH|XDG_CACHE_HOME)=(\S+)", dockerfile)
    assert len(paths) == 3
    (container,) = pod_spec(one("Deployment"))["containers"]
    mounts = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
    for path in paths:
        assert any(path == m or path.startswith(m + "/") for m in mounts), f"{path} is on the read-only root"
    (compose,) = load_docs(COMPOSE)
    assert all(p.startswith("/tmp/") for p in paths)
    # Kernels compiled there are loaded from there: Docker's tmpfs default (noexec) would refuse.
    tmpfs = {
        entry.partition(":")[0]: entry.partition(":")[2].split(",")
        for entry in compose["services"]["llm"]["tmpfs"]
    }
    assert "exec" in tmpfs["/tmp"]


def test_manifest_settings_are_values_the_server_accepts():
    """Names are not enough: a value the server rejects would crash-loop every replica."""
    from app.settings import Settings

    env = dict(one("ConfigMap")["data"], API_KEY="from-the-secret")
    settings = Settings.from_env(env)
    assert settings.model_path == env["MODEL_PATH"] and settings.gpu_count == 1
    assert settings.cache_dir == env["CACHE_DIR"] and settings.api_key
    (compose,) = load_docs(COMPOSE)
    values = {
        k: re.sub(r"\$\{\w+:[-?]([^}]*)\}", r"\1", str(v))
        for k, v in compose["services"]["llm"]["environment"].items()
    }
    Settings.from_env(values | {"API_KEY": "set-by-the-operator"})


def test_compose_service_runs_hardened_too():
    (doc,) = load_docs(COMPOSE)
    service = doc["services"]["llm"]
    assert service["user"].split(":")[0] not in ("0", "root")
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]


def test_probes_use_routes_the_app_serves_without_the_key():
    routes = app_routes()
    (container,) = pod_spec(one("Deployment"))["containers"]
    paths = {
        kind: container[kind]["httpGet"]["path"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    for kind, path in paths.items():
        assert path in routes, f"{kind} asks for {path}, which the app does not serve"
        assert not routes[path].guards, f"{kind} path {path} is behind the API key"
    # Readiness must be the route that answers 503 until the model serves; liveness must not be.
    assert paths["readinessProbe"] == paths["startupProbe"] == "/health/ready"
    assert paths["livenessProbe"] == "/health/live"
    assert container["ports"][0]["containerPort"] == 8000
    assert all(container[k]["httpGet"]["port"] == container["ports"][0]["name"] for k in paths)


def test_resources_request_and_limit_one_gpu():
    (container,) = pod_spec(one("Deployment"))["containers"]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]
    assert one("ConfigMap")["data"]["GPU_COUNT"] == "1"


def test_env_names_are_the_servers_settings():
    known = setting_env_names()
    deployment_env = {e["name"] for e in pod_spec(one("Deployment"))["containers"][0]["env"]}
    config_keys = set(one("ConfigMap")["data"])
    (compose,) = load_docs(COMPOSE)
    compose_env = set(compose["services"]["llm"]["environment"])
    for where, names in (
        ("Deployment env", deployment_env),
        ("ConfigMap", config_keys),
        ("compose", compose_env),
    ):
        assert names <= known, f"{where} sets {sorted(names - known)}, which the server does not read"
    assert "API_KEY" in deployment_env and "MODEL_PATH" in config_keys
    assert not one("ConfigMap")["data"]["MODEL_PATH"].startswith("builtin:"), (
        "the random demo model in production"
    )


def test_secret_refs_name_the_one_secret_of_the_runbook():
    (container,) = pod_spec(one("Deployment"))["containers"]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    monitor = one("ServiceMonitor")["spec"]["endpoints"][0]["authorization"]["credentials"]
    api_key = next(e for e in container["env"] if e["name"] == "API_KEY")["valueFrom"]["secretKeyRef"]
    assert refs == {"omega-llm-secret"}
    assert (monitor["name"], monitor["key"]) == (api_key["name"], api_key["key"])


def test_image_comes_from_the_registry_variable():
    text = MAIN_MANIFEST.read_text(encoding="utf-8")
    (container,) = pod_spec(one("Deployment"))["containers"]
    assert container["image"] == "${REGISTRY}/docoserve:${IMAGE_TAG}"
    # The runbook runs envsubst on exactly these two names; any other $ would be left as is.
    assert set(re.findall(r"\$\{?(\w+)", text)) == {"REGISTRY", "IMAGE_TAG"}
    (compose,) = load_docs(COMPOSE)
    assert compose["services"]["llm"]["image"].startswith("${REGISTRY")


def test_only_the_openai_api_is_published():
    assert one("Service")["spec"]["type"] == "ClusterIP"
    ingress_paths = [p["path"] for r in one("Ingress")["spec"]["rules"] for p in r["http"]["paths"]]
    route_paths = [m["path"]["value"] for r in one("HTTPRoute")["spec"]["rules"] for m in r["matches"]]
    assert ingress_paths == route_paths == ["/v1"]
    assert all(path.startswith("/v1/") for path in app_routes() if path.startswith("/v1"))


def test_cache_volume_does_not_tie_replicas_to_one_node():
    claim = one("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in pod_spec(one("Deployment"))["volumes"]}
    assert any(
        v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]
        for v in volumes.values()
    )


def test_disruption_budget_and_grace_period_cover_the_pods():
    deployment = one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    budget = one("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    grace = int(one("ConfigMap")["data"]["SHUTDOWN_GRACE_S"])
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > grace + 5


def test_autoscalers_read_the_servers_queue_metric():
    names = vllm_metric_names()
    assert "vllm:num_requests_waiting" in names
    adapter = load_docs(HELM_VALUES["prometheus-adapter"])[0]["rules"]["custom"]
    exported = {}
    for rule in adapter:
        series = re.match(r"(vllm:[a-z_]+)", rule["seriesQuery"]).group(1)
        assert series in names and re.fullmatch(rule["name"]["matches"], series)
        exported[rule["name"]["as"]] = series
    hpa = one("HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert exported[metric["pods"]["metric"]["name"]] == "vllm:num_requests_waiting"
    (trigger,) = one("ScaledObject")["spec"]["triggers"]
    assert set(re.findall(r"vllm:[a-z_]+", trigger["metadata"]["query"])) == {"vllm:num_requests_waiting"}
    for scaler in (hpa, one("ScaledObject")):
        assert scaler["spec"]["scaleTargetRef"]["name"] == one("Deployment")["metadata"]["name"]


def test_inference_pool_targets_the_pods_and_its_picker_reads_exported_metrics():
    pool = one("InferencePool")
    deployment = one("Deployment")
    assert (
        pool["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [8000]
    values = load_docs(HELM_VALUES["llm-d-router"])[0]["router"]
    assert values["modelServers"]["type"] == "vllm" and values["inferencePool"]["create"] is False
    assert values["modelServers"]["matchLabels"] == pool["spec"]["selector"]["matchLabels"]
    # The chart names its picker Service "<release>-epp" and watches the pool named like the release.
    assert pool["spec"]["endpointPickerRef"]["name"] == pool["metadata"]["name"] + "-epp"
    assert set(EPP_VLLM_METRICS) <= vllm_metric_names()
    comments = (SCALE_OUT / "inference-gateway" / "inferencepool.yaml").read_text(encoding="utf-8")
    assert set(re.findall(r"vllm:[a-z_]+", comments)) <= vllm_metric_names()
    backend = one("HTTPRoute")["spec"]["rules"][0]["backendRefs"][0]
    assert (backend["kind"], backend["name"]) == ("InferencePool", pool["metadata"]["name"])


def test_service_monitor_scrapes_the_services_port_and_metrics_path():
    monitor = one("ServiceMonitor")
    service = one("Service")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] in app_routes() and endpoint["authorization"]["type"] == "Bearer"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_runbooks_name_files_that_exist_and_substitute_what_the_manifest_uses():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    deploy_readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"deploy/[\w./-]+\.ya?ml", readme))
    named |= {"deploy/" + p for p in re.findall(r"`((?:scale-out/)?[\w./-]+\.ya?ml)`", deploy_readme)}
    assert {str(p.relative_to(ROOT)) for p in manifest_files()} <= named | {
        "deploy/scale-out/inference-gateway"
    }
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"the runbooks name files that do not exist: {missing}"
    assert "envsubst '${REGISTRY} ${IMAGE_TAG}' < deploy/aks-omega-vlm.yaml | kubectl apply -f -" in readme
    secret = one("Deployment")["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"][
        "secretKeyRef"
    ]
    assert (
        f"create secret generic {secret['name']}" in readme and f"--from-literal={secret['key']}=" in readme
    )
