"""The Kubernetes manifests and the compose file under deploy/, checked offline: yamllint,
schemas (Kubernetes' own for built-in kinds, the vendored CRD schemas for custom resources, the
compose spec), and what the schemas cannot know: the pod runs hardened, probes hit routes the app
has and that need no key, metric and env names are the server's, and the spec's own commands
("Operate on AKS", its compose example, its cache path) work against these files as written."""

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
    INGRESS,
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

# The spec's "Operate on AKS (quick commands)", which the README runbook keeps as written.
SPEC_AKS_COMMANDS = (
    "kubectl create secret generic omega-llm-secret --from-literal=apiKey=",
    "kubectl apply -f deploy/aks-omega-vlm.yaml",
    "kubectl rollout status deployment/omega-llm",
    "kubectl get svc omega-llm -w",
    "kubectl set env deployment/omega-llm PROGRESS_LOGS=1 DEBUG=1",
    "kubectl get pods -l app=omega-llm",
    "kubectl port-forward deploy/omega-llm 8000:8000",
)


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
    assert MAIN_MANIFEST in checked and INGRESS in checked and len(manifest_files()) == 6


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
    assert checked >= 7


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
    # The namespace that enforces it is the runbook's optional step, not an object in a manifest.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "kubectl label namespace omega-llm pod-security.kubernetes.io/enforce=restricted" in readme
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
    # Without API_KEY in the shell, compose passes "": no key, not a refusal to start.
    assert Settings.from_env(values).api_key is None


def test_compose_follows_the_specs_example():
    """API_KEY optional, the model named "model" by flag, built from the repository root."""
    from app.settings import Settings
    from entrypoint import apply_cli_to_env, build_parser

    (doc,) = load_docs(COMPOSE)
    service = doc["services"]["llm"]
    assert service["environment"]["API_KEY"] == "${API_KEY:-}"
    env = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in service["environment"].items()}
    apply_cli_to_env(build_parser().parse_args(service["command"]), env)
    settings = Settings.from_env(env)
    assert (settings.model_name, settings.gpu_count, settings.api_key) == ("model", 1, None)
    build = service["build"] if isinstance(service["build"], str) else service["build"]["context"]
    context = (COMPOSE.parent / build).resolve()
    assert context == ROOT and (context / "Dockerfile").is_file()


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


def test_image_is_a_concrete_reference_a_plain_apply_can_pull():
    """`kubectl apply -f deploy/aks-omega-vlm.yaml` sends the file as is: a ${...} placeholder
    there would be an InvalidImageName, not a substitution."""
    text = MAIN_MANIFEST.read_text(encoding="utf-8")
    assert "${" not in text and "$(" not in text
    (container,) = pod_spec(one("Deployment"))["containers"]
    image = container["image"]
    # This repository's build (never someone else's image under our probes and uid), by a pinned
    # tag: IfNotPresent would keep a stale :latest forever.
    assert re.fullmatch(r"docoserve:[\w.-]+", image), image
    assert not image.endswith(":latest") and container["imagePullPolicy"] == "IfNotPresent"
    # The runbook's way to run your own build names this container.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f'kubectl set image deployment/omega-llm {container["name"]}="$IMAGE"' in readme
    assert image in readme and image in (DEPLOY / "README.md").read_text(encoding="utf-8")


def test_no_manifest_names_a_namespace():
    """Everything lands in the current namespace, where the spec's commands (secret, apply,
    rollout, svc, set env, pods, port-forward) look for it, all without -n."""
    for path, doc in manifests():
        where = f"{path.relative_to(ROOT)} {doc['kind']}/{doc['metadata']['name']}"
        assert doc["kind"] != "Namespace", f"{where}: a Namespace object"
        assert "namespace" not in doc["metadata"], f"{where}: metadata.namespace"
        assert "namespaceSelector" not in doc.get("spec", {}), f"{where}: selects another namespace"
        for ref in doc.get("spec", {}).get("parentRefs", []):
            assert "namespace" not in ref, f"{where}: a parentRef in another namespace"
    texts = {p: p.read_text(encoding="utf-8") for p in sorted(DEPLOY.rglob("*")) if p.is_file()}
    texts[ROOT / "README.md"] = (ROOT / "README.md").read_text(encoding="utf-8")
    for path, text in texts.items():
        for pattern in (
            r"-n omega-llm\b",
            r"namespace: omega-llm",
            r'namespace="omega-llm"',
            r"namespaces/omega-llm",
        ):
            hits = [line for line in text.splitlines() if re.search(pattern, line)]
            assert not hits, f"{path.relative_to(ROOT)} pins the namespace: {hits}"


def test_the_specs_aks_commands_find_what_they_name():
    """The spec's "Operate on AKS (quick commands)", checked against the objects they act on."""
    deployment, service = one("Deployment", MAIN_MANIFEST), one("Service", MAIN_MANIFEST)
    # kubectl rollout status / set env / port-forward deployment/omega-llm
    assert deployment["metadata"]["name"] == service["metadata"]["name"] == "omega-llm"
    # kubectl get svc omega-llm -w: an EXTERNAL-IP to wait for
    assert service["spec"]["type"] == "LoadBalancer"
    # kubectl get pods -l app=omega-llm
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["app"] == "omega-llm"
    assert deployment["spec"]["selector"]["matchLabels"] == {"app": "omega-llm"}
    assert service["spec"]["selector"] == {"app": "omega-llm"}
    # kubectl create secret generic omega-llm-secret --from-literal=apiKey=...
    (container,) = pod_spec(deployment)["containers"]
    api_key = next(e for e in container["env"] if e["name"] == "API_KEY")["valueFrom"]["secretKeyRef"]
    assert (api_key["name"], api_key["key"]) == ("omega-llm-secret", "apiKey") and not api_key.get("optional")
    # kubectl port-forward deploy/omega-llm 8000:8000
    assert container["ports"][0]["containerPort"] == 8000
    # kubectl set env deployment/omega-llm PROGRESS_LOGS=1 DEBUG=1
    assert {"PROGRESS_LOGS", "DEBUG"} <= setting_env_names()
    # Server flags (set args / the runbook's patch): appended to the image's ENTRYPOINT, so the
    # container must not replace it or carry flags of its own that the patch would drop silently.
    assert "command" not in container and "args" not in container
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r'^ENTRYPOINT \["python", "entrypoint.py"\]$', dockerfile, re.M)
    # A first rollout may take the startup probe's whole window: rollout status must not give up first.
    startup = container["startupProbe"]
    window = startup["periodSeconds"] * startup["failureThreshold"]
    assert deployment["spec"]["progressDeadlineSeconds"] > window


def test_the_specs_server_flags_parse():
    from entrypoint import build_parser

    flags = (
        "--model-name omega --gpu-count 8 --model-path /models/model_path --dtype bf16 "
        "--attn-impl flash_attention_2 --max-batch-size 8 --batch-timeout-ms 6 --host 0.0.0.0 "
        "--port 8000 --default-temperature 0.8 --default-top-p 0.95 --default-seed 42"
    )
    args = build_parser().parse_args(flags.split())
    assert (args.model_name, args.gpu_count, args.port) == ("omega", "8", "8000")


def test_the_service_publishes_everything_and_the_optional_ingress_only_v1():
    assert one("Service", MAIN_MANIFEST)["spec"]["type"] == "LoadBalancer"
    assert [d["kind"] for d in load_docs(INGRESS)] == ["Ingress"]
    ingress = one("Ingress", INGRESS)
    ingress_paths = [p["path"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    route_paths = [m["path"]["value"] for r in one("HTTPRoute")["spec"]["rules"] for m in r["matches"]]
    assert ingress_paths == route_paths == ["/v1"]
    assert all(path.startswith("/v1/") for path in app_routes() if path.startswith("/v1"))
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service = one("Service", MAIN_MANIFEST)
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    # The runbook says what the LoadBalancer publishes and how to take it back to /v1 only.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "kubectl apply -f deploy/ingress.yaml" in readme
    assert """kubectl patch svc omega-llm -p '{"spec":{"type":"ClusterIP"}}'""" in readme
    routes = app_routes()
    public = sorted(p for p, h in routes.items() if not h.guards)
    assert public == ["/health", "/health/live", "/health/ready", "/version"]
    what_is_public = readme.split("**What is public.**", 1)[1].split("```", 1)[0]
    for path in public + ["/docs", "/metrics", "/generate", "/v1/*"]:
        assert f"`{path}`" in what_is_public, f"the runbook does not say whether {path} is public"


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
    for command in SPEC_AKS_COMMANDS:
        assert command in readme, f"the runbook lacks the spec's `{command}`"
    secret = one("Deployment")["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"][
        "secretKeyRef"
    ]
    assert (
        f"create secret generic {secret['name']}" in readme and f"--from-literal={secret['key']}=" in readme
    )
