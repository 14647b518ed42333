"""Every overlay renders with kubectl's kustomize, every object validates offline against the Kubernetes 1.37
schemas (strict: unknown fields are errors), the Prometheus Operator objects against the operator's models,
and the manifests keep the promises ops rely on (security context, probes, secrets by reference, volumes)."""

from __future__ import annotations

import copy
import tomllib
from typing import Any

import pytest
from k8s_helpers import OVERLAYS, ROOT, config_map, container_env, expand, find, pod_spec

K8S_VERSION = "1.37.0"
NAMESPACES = {"cpu": "wbc", "gpu": "wbc", "site": "wbc-site"}
CLUSTER_SCOPED = {"Namespace"}
WORKLOADS = {"Deployment", "CronJob"}
# Custom resources: no schema in kubernetes-validate; checked against the Prometheus Operator's models.
OPERATOR_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def all_objects(rendered: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(overlay, obj) for overlay in OVERLAYS for obj in rendered[overlay]]


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(obj)
    return spec.get("initContainers", []) + spec["containers"]


# ---- rendering ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_into_its_namespace(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    assert objects
    for obj in objects:
        if obj["kind"] in CLUSTER_SCOPED:
            assert obj["metadata"]["name"] == NAMESPACES[overlay]
        else:
            assert obj["metadata"].get("namespace") == NAMESPACES[overlay], obj["metadata"]["name"]
    images = {c["image"] for obj in objects if obj["kind"] in WORKLOADS for c in containers(obj)}
    assert images and all("/" in image and ":" in image for image in images), f"unresolved image in {images}"


def test_site_overlay_is_only_the_supernode(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered["site"] if o["kind"] in WORKLOADS}
    assert kinds == {("Deployment", "wbc-supernode")}


# ---- schemas ----------------------------------------------------------------------------------------------
def test_objects_validate_against_kubernetes_schemas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    problems, checked = [], 0
    for overlay, obj in all_objects(rendered):
        if (obj["apiVersion"], obj["kind"]) in OPERATOR_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            checked += 1
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
        except SchemaNotFoundError as exc:  # the CLI only warns; here an unknown kind is a failure
            problems.append(f"{overlay}: {exc.message}")
    assert not problems, "\n".join(problems)
    assert checked >= 25


def operator_model(obj: dict[str, Any]) -> Any:
    pytest.importorskip("cloudcoil.models.prometheus_operator",
                        reason="Prometheus Operator models: pip install the dev extra (cloudcoil-models-prometheus-operator)")
    from cloudcoil.models.prometheus_operator import v1

    return {"ServiceMonitor": v1.ServiceMonitor, "PrometheusRule": v1.PrometheusRule}[obj["kind"]]


def validate_operator_object(obj: dict[str, Any]) -> None:
    """Strict like `kubectl apply --validate=strict`: unknown fields, wrong types and bad enums fail."""
    operator_model(obj).model_validate(obj, extra="forbid", by_alias=True, by_name=False)


def test_operator_objects_validate_against_the_operator_models(rendered: dict[str, list[dict[str, Any]]]) -> None:
    seen = set()
    for _, obj in all_objects(rendered):
        if (obj["apiVersion"], obj["kind"]) in OPERATOR_KINDS:
            validate_operator_object(obj)
            seen.add(obj["kind"])
    assert seen == {"ServiceMonitor", "PrometheusRule"}


def test_validators_reject_bad_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The checks above can fail: a misspelt field and a wrong type are caught by both validators."""
    import kubernetes_validate
    from pydantic import ValidationError

    deployment = copy.deepcopy(find(rendered["cpu"], "Deployment", "wbc-inference"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    monitor = copy.deepcopy(find(rendered["cpu"], "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(ValidationError):
        validate_operator_object(monitor)
    rule = copy.deepcopy(find(rendered["cpu"], "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["expr"] = ["not", "a", "string"]
    with pytest.raises(ValidationError):
        validate_operator_object(rule)


# ---- security and resources ---------------------------------------------------------------------------------
def test_every_pod_is_restricted_and_bounded(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, obj in all_objects(rendered):
        if obj["kind"] not in WORKLOADS:
            continue
        where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        spec = pod_spec(obj)
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0, where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), where
        for container in containers(obj):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"]), where
            for volume in spec.get("volumes", []):
                assert "hostPath" not in volume, where


def test_secrets_are_referenced_never_written(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, obj in all_objects(rendered):
        assert obj["kind"] != "Secret", f"{overlay}: a Secret object (with values) must not be in the manifests"
        if obj["kind"] == "ConfigMap":
            for key in obj.get("data", {}):
                assert not any(word in key.upper() for word in ("TOKEN", "PASSWORD", "SECRET", "DATABASE_URL",
                                                                "AUDIT_KEY")), f"{overlay}: {key} in a ConfigMap"
        if obj["kind"] in WORKLOADS:
            for container in containers(obj):
                for var in container.get("env", []):
                    if any(word in var["name"] for word in ("TOKEN", "PASSWORD", "DATABASE_URL", "AUDIT_KEY")):
                        assert "secretKeyRef" in var.get("valueFrom", {}), f"{overlay}: {var['name']} not from a Secret"


def test_every_namespace_denies_by_default(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay in OVERLAYS:
        deny = find(rendered[overlay], "NetworkPolicy", "default-deny")
        assert deny["spec"]["podSelector"] == {} and set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        policies = [o for o in rendered[overlay] if o["kind"] == "NetworkPolicy"]
        for workload in (o for o in rendered[overlay] if o["kind"] in WORKLOADS):
            template = (workload["spec"]["jobTemplate"]["spec"]["template"] if workload["kind"] == "CronJob"
                        else workload["spec"]["template"])
            labels = template["metadata"]["labels"]
            own = [p for p in policies if p["spec"]["podSelector"].get("matchLabels")
                   and p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
            assert own, f"{overlay}: no NetworkPolicy of its own for {workload['metadata']['name']}"


# ---- inference ----------------------------------------------------------------------------------------------
def test_inference_probes_ports_and_registry_volume(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay in ("cpu", "gpu"):
        objects = rendered[overlay]
        deployment = find(objects, "Deployment", "wbc-inference")
        spec = pod_spec(deployment)
        container = spec["containers"][0]
        env = container_env(objects, container, {("wbc-inference", "database-url"): "x",
                                                 ("wbc-inference", "audit-key"): "x"})
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["http"] == int(env["WBC_PORT"])
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        startup = container["startupProbe"]
        assert startup["httpGet"]["path"] == "/v2/health/live"
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "too little time for a model load"
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert container[probe]["httpGet"]["port"] in ("http", ports["http"])
        service = find(objects, "Service", "wbc-inference")
        assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        assert service["spec"]["ports"][0]["targetPort"] in ("http", ports["http"])
        mount = next(m for m in container["volumeMounts"] if m["name"] == "registry")
        volume = next(v for v in spec["volumes"] if v["name"] == "registry")
        assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
        assert env["WBC_REGISTRY"] == mount["mountPath"]
        assert env["WBC_VERSION"] == "production"
        hpa = find(objects, "HorizontalPodAutoscaler", "wbc-inference")
        pdb = find(objects, "PodDisruptionBudget", "wbc-inference")
        assert hpa["spec"]["scaleTargetRef"]["name"] == "wbc-inference"
        assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"], "a drain must be possible"
        # Every path the service writes is a mounted volume (the root filesystem is read-only).
        writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
        for key in ("WBC_IMAGE_STORE", "WBC_TRT_CACHE"):
            if key in env:
                assert any(env[key] == w or env[key].startswith(w + "/") for w in writable), key


def test_gpu_overlay_asks_for_a_gpu_and_the_cpu_one_does_not(rendered: dict[str, list[dict[str, Any]]]) -> None:
    gpu = pod_spec(find(rendered["gpu"], "Deployment", "wbc-inference"))["containers"][0]
    cpu = pod_spec(find(rendered["cpu"], "Deployment", "wbc-inference"))["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert "serve-gpu" in gpu["image"] and "serve-cpu" in cpu["image"]
    assert config_map(rendered["gpu"], "wbc-inference")["WBC_DEVICE"] == "cuda"
    assert config_map(rendered["cpu"], "wbc-inference")["WBC_DEVICE"] == "cpu"


# ---- federation ------------------------------------------------------------------------------------------------
def flag_values(args: list[str]) -> dict[str, str]:
    out = {}
    for arg in args:
        key, _, value = arg.partition("=")
        out[key] = value
    return out


def test_superlink_runs_with_the_must_set_options(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["cpu"]
    deployment = find(objects, "Deployment", "wbc-superlink")
    spec = pod_spec(deployment)
    container = spec["containers"][0]
    flags = flag_values(container["args"])
    assert container["command"] == ["flower-superlink"]
    for flag in ("--disable-runtime-dependency-installation", "--enable-supernode-auth", "--database",
                 "--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert flag in flags, flag
    assert "--insecure" not in flags
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    tls = mounts["/etc/flwr/tls"]
    assert tls["readOnly"] and any(v["name"] == tls["name"] and "secret" in v for v in spec["volumes"])
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert flags[flag].startswith("/etc/flwr/tls/")
    database = flags["--database"]
    state = next(p for p, m in mounts.items() if database.startswith(p + "/"))
    state_volume = next(v for v in spec["volumes"] if v["name"] == mounts[state]["name"])
    assert "persistentVolumeClaim" in state_volume, "the state database must outlive the pod"
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "flower")
    assert flags["--port"] == str(port)
    health = next(p["containerPort"] for p in container["ports"] if p["name"] == "health")
    assert flags["--health-server-address"].endswith(f":{health}")
    assert container["livenessProbe"]["grpc"]["port"] == health


def test_training_run_config_is_valid_for_the_serverapp(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from federation.server_app import RunSettings

    objects = rendered["cpu"]
    files = config_map(objects, "wbc-training")
    config = tomllib.loads(files["run-config.toml"])
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(config) <= set(defaults), f"unknown run-config keys {set(config) - set(defaults)}"
    superlink = pod_spec(find(objects, "Deployment", "wbc-superlink"))["containers"][0]
    mounts = {m["mountPath"]: m for m in superlink["volumeMounts"]}
    cron = find(objects, "CronJob", "wbc-training")
    job = pod_spec(cron)["containers"][0]
    job_env = {v["name"]: v.get("value") for v in job["env"]}
    run_dir = f"{job_env['WBC_RUNS_DIR']}/20260101T000000Z"
    RunSettings.from_run_config({**defaults, **config, "run-dir": run_dir})  # raises on a bad value
    # The ServerApp runs in the SuperLink pod: its paths must be mounted there, the registry writable.
    assert not mounts[config["registry"]].get("readOnly")
    assert mounts[config["registry"]]["name"] == "registry"
    assert config["parity-images"] in mounts
    assert not mounts[job_env["WBC_RUNS_DIR"]].get("readOnly")
    # The job reads the run folder the ServerApp writes: same volume, same sub-path, same mount path.
    job_mounts = {m["mountPath"]: m for m in job["volumeMounts"]}
    assert job_mounts[job_env["WBC_RUNS_DIR"]]["subPath"] == mounts[job_env["WBC_RUNS_DIR"]]["subPath"]
    # The script it runs is the ConfigMap's, mounted where the command points.
    script = job["command"][-1]
    folder, name = script.rsplit("/", 1)
    assert name in files and job_mounts[folder]["name"] == "training-config"
    assert job_env["WBC_SUPERLINK"].endswith(":9092") and cron["spec"]["concurrencyPolicy"] == "Forbid"


def test_supernode_node_config_reaches_the_clientapp(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["site"]
    spec = pod_spec(find(objects, "Deployment", "wbc-supernode"))
    container = spec["containers"][0]
    env = container_env(objects, container, {})
    args = [expand(a, env) for a in container["args"]]
    flags = flag_values(args)
    assert "--insecure" not in flags and flags["--root-certificates"].startswith("/etc/flwr/tls/")
    assert flags["--auth-supernode-private-key"].startswith("/etc/flwr/auth/")
    assert "$(" not in " ".join(args), "a $(VAR) in args is not defined in the container's env"
    # The node config is TOML pairs, as the ClientApp reads them (federation/client_app.py: site_of).
    node_config = tomllib.loads("\n".join(flags["--node-config"].split(" ")))
    assert node_config["site"] == config_map(objects, "wbc-site")["WBC_SITE"]
    data_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == node_config["data-root"])
    assert data_mount["readOnly"] is True
    assert int(node_config["threads"]) >= 1
    # The site cache is a writable volume of its own (the root filesystem is read-only).
    cache_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == node_config["cache-dir"])
    assert not cache_mount.get("readOnly") and container["securityContext"]["readOnlyRootFilesystem"] is True
    # Its budget leaves room under the volume's size limit (a pod over an emptyDir's limit is evicted).
    from federation.site_cache import SiteCache

    volume = next(v for v in spec["volumes"] if v["name"] == cache_mount["name"])
    limit = volume["emptyDir"]["sizeLimit"]
    assert limit.endswith("Gi"), limit
    assert SiteCache.of(node_config).budget_bytes <= 0.8 * int(limit.removesuffix("Gi")) * 2**30
    assert {v["name"]: v.get("value") for v in container["env"]}["FLWR_TELEMETRY_ENABLED"] == "0"
