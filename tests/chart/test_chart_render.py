"""The Helm chart, rendered by the real Helm engine for the defaults and realistic overrides.

Checks: strict lint; every manifest against the Kubernetes schemas of the
oldest and newest Kubernetes versions we support (kubernetes-validate, strict);
KEDA ScaledObjects and the ServiceMonitor against their CRD schemas; the
values schema rejecting unknown keys; security context, resources, GPU
requests, probes; and the rendered environment against what ``deep3m serve``
reads (``deep3m.runtime.settings.Settings``). No cluster runs here: whether the
API server admits the objects is not tested beyond these schemas.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deep3m.runtime.metrics import TASKS_LEASED, TASKS_PENDING
from deep3m.runtime.settings import Settings, env_var
from deep3m.scheduler.autoscaler import policies_from_settings
from deep3m.testing.crd import crd_schema, unknown_fields
from prometheus_client import generate_latest

helm_python = pytest.importorskip("helm_python")

# EKS versions the chart supports (see helm/deep3m/Chart.yaml kubeVersion and k8s/README.md).
OLDEST, NEWEST = "1.30", "1.37"
SUPPORTED = [f"1.{minor}" for minor in range(30, 38)]
CUSTOM_KINDS = {"ScaledObject", "ServiceMonitor", "Certificate"}
GPU_ROLES = ("training", "inference")
WORKER_ROLES = ("tiling", "postprocess", *GPU_ROLES)
RELEASE = "lab"
NAMESPACE = "deep3m"
CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "deep3m"

Render = Callable[[dict[str, Any]], Any]


def name_of(role: str) -> str:
    return f"{RELEASE}-deep3m-{role}"


def containers(scenario: Any) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for owner, spec in scenario.pod_specs():
        for container in spec["containers"]:
            yield owner, spec, container


def merged(scenario: Any, key: str) -> Any:
    """Effective values of one top-level key (chart defaults + the scenario's overrides)."""
    return scenario.merged[key]


# -- lint and schemas ------------------------------------------------------------------


def test_lint_strict_passes(scenario: Any) -> None:
    for version in (OLDEST, NEWEST):
        report = helm_python.lint(
            CHART_DIR,
            scenario.values,
            strict=True,
            kube_version=f"v{version}.0",
            namespace=NAMESPACE,
        )
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems, problems
        assert not report["errors"]


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_manifests_validate_strictly(scenario: Any, version: str) -> None:
    checked = set()
    for manifest in scenario.manifests:
        if manifest["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(manifest, f"{version}.0", strict=True)
        checked.add(manifest["kind"])
    assert {"Deployment", "Service", "ServiceAccount", "Pod"} <= checked


def test_defaults_validate_on_every_supported_version(render: Render) -> None:
    manifests = [m for m in render({}).manifests if m["kind"] not in CUSTOM_KINDS]
    for version in SUPPORTED:
        for manifest in manifests:
            kubernetes_validate.validate(manifest, f"{version}.0", strict=True)


def test_kubernetes_validation_would_catch_a_bad_manifest(render: Render) -> None:
    deployment = dict(render({}).get("Deployment", name_of("scheduler")))
    deployment["spec"] = {**deployment["spec"], "replica": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, f"{NEWEST}.0", strict=True)


def test_scaled_objects_match_the_keda_crd(scenario: Any, schemas_dir: Path) -> None:
    schema = crd_schema(schemas_dir / "keda.sh_scaledobjects.yaml", "v1alpha1")
    for scaled in scenario.of_kind("ScaledObject"):
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        jsonschema.validate(scaled, schema)
        assert unknown_fields(scaled, schema) == []


def test_service_monitor_matches_its_crd(scenario: Any, schemas_dir: Path) -> None:
    schema = crd_schema(schemas_dir / "monitoring.coreos.com_servicemonitors.yaml", "v1")
    for monitor in scenario.of_kind("ServiceMonitor"):
        jsonschema.validate(monitor, schema)
        assert unknown_fields(monitor, schema) == []


def test_crd_check_would_catch_an_unknown_field(render: Render, schemas_dir: Path) -> None:
    schema = crd_schema(schemas_dir / "keda.sh_scaledobjects.yaml", "v1alpha1")
    scaled = render({}).of_kind("ScaledObject")[0]
    bad = {**scaled, "spec": {**scaled["spec"], "maxReplicas": 3}}
    assert unknown_fields(bad, schema) == ["spec.maxReplicas"]


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"replicas": 2}, "'replicas' not allowed"),
        ({"inference": {"gpus": 1}}, "'gpus' not allowed"),
        ({"inference": {"gpu": {"type": "a10g"}}}, "'type' not allowed"),
        ({"store": {"bucket": "x"}}, "'bucket' not allowed"),
        ({"autoscaling": {"mode": "hpa"}}, "/autoscaling/mode"),
        ({"autoscaling": {"keda": {"source": "sqs"}}}, "/autoscaling/keda/source"),
        ({"store": {"url": "file:///data"}}, "/store/url"),
        ({"serviceAccount": {"irsaRoleArn": "deep3m-role"}}, "/serviceAccount/irsaRoleArn"),
        (
            {"training": {"tolerations": [{"key": "a", "operator": "Maybe"}]}},
            "/training/tolerations/0/operator",
        ),
        (
            {"scheduler": {"resources": {"limits": {"memory": "lots"}}}},
            "/scheduler/resources/limits/memory",
        ),
    ],
)
def test_values_schema_rejects_bad_values(chart: Any, values: dict[str, Any], words: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as err:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    assert words in str(err.value)


def test_every_schema_object_forbids_unknown_keys(chart: Any) -> None:
    open_maps = {"resourceList", "nodeSelector"}  # keyed by resource/label names
    # Helm's globals are shared with a parent chart's, whose keys we cannot know.
    shared = {"/properties/global"}

    def walk(node: Any, path: str) -> Iterator[str]:
        if isinstance(node, dict):
            is_object = node.get("type") == "object" and "properties" in node
            if is_object and node.get("additionalProperties") is not False:
                yield path
            for key, child in node.items():
                if key not in open_maps:
                    yield from walk(child, f"{path}/{key}")

    assert [p for p in walk(chart.schema, "") if p not in shared] == []


# -- workloads -------------------------------------------------------------------------


def test_one_deployment_and_service_per_enabled_role(scenario: Any) -> None:
    enabled = ["scheduler"] + [r for r in WORKER_ROLES if merged(scenario, r)["enabled"]]
    deployments = {d["metadata"]["name"]: d for d in scenario.of_kind("Deployment")}
    services = {s["metadata"]["name"]: s for s in scenario.of_kind("Service")}
    assert sorted(deployments) == sorted(name_of(r) for r in enabled)
    assert sorted(services) == sorted(deployments)
    for name, deployment in deployments.items():
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = services[name]["spec"]["selector"]
        assert selector.items() <= pod_labels.items()
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        role = name.removeprefix(f"{RELEASE}-deep3m-")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == ["serve", role]
        image = container["image"]
        assert ("deep3m-cuda:" in image) == (role in GPU_ROLES)


def test_security_context_is_restricted(scenario: Any) -> None:
    for owner, spec, container in containers(scenario):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, owner
        # A fixed UID unless the platform assigns one (OpenShift restricted-v2).
        assert pod.get("runAsUser", 1) != 0 and pod.get("runAsGroup", 1) != 0, owner
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, owner
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False, owner
        assert ctx["readOnlyRootFilesystem"] is True, owner
        assert ctx["privileged"] is False, owner
        assert ctx["capabilities"] == {"drop": ["ALL"]}, owner
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, owner
        # A read-only root needs a writable /tmp (caches, scratch).
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], owner
        assert spec.get("hostNetwork") is None and spec.get("hostPID") is None


def scheduler_uses_api(scenario: Any) -> bool:
    autoscaling = merged(scenario, "autoscaling")
    mode = autoscaling["mode"]
    gpu = any(merged(scenario, r)["enabled"] for r in GPU_ROLES)
    return gpu and (mode == "scheduler" or (mode == "keda" and autoscaling["podDeletionCost"]))


def test_only_the_scheduler_mounts_an_api_token_when_it_uses_the_api(scenario: Any) -> None:
    for owner, spec in scenario.pod_specs():
        wanted = owner == name_of("scheduler") and scheduler_uses_api(scenario)
        assert spec["automountServiceAccountToken"] is wanted, owner
    for account in scenario.of_kind("ServiceAccount"):
        assert account["automountServiceAccountToken"] is False


def test_every_container_requests_resources(scenario: Any) -> None:
    for owner, _, container in containers(scenario):
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), owner
        assert "memory" in resources["limits"], owner


def test_gpu_roles_request_gpus_in_limits(scenario: Any) -> None:
    for role in WORKER_ROLES:
        values = merged(scenario, role)
        if not values["enabled"]:
            continue
        deployment = scenario.get("Deployment", name_of(role))
        spec = deployment["spec"]["template"]["spec"]
        container = spec["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        gpu_names = {k for k in container["resources"].get("limits", {}) if "gpu" in k}
        if role in GPU_ROLES and values["gpu"]["count"] > 0:
            resource = values["gpu"]["resourceName"]
            assert container["resources"]["limits"][resource] == values["gpu"]["count"]
            assert resource not in container["resources"]["requests"]
            assert env["DEEP3M_DEVICE"] == "cuda"
            assert spec["tolerations"] == values["tolerations"]
            assert spec.get("nodeSelector", {}) == values["nodeSelector"]
            assert spec.get("affinity", {}) == values["affinity"]
            assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
        else:
            assert gpu_names == set(), role
            assert env["DEEP3M_DEVICE"] == "cpu"


def test_grpc_probes_on_the_health_service(scenario: Any) -> None:
    for deployment in scenario.of_kind("Deployment"):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": 50051, "metrics": 9090}
        tls = merged(scenario, "tls")["enabled"]
        # The kubelet's gRPC probe speaks no TLS: with TLS on, the image's own check
        # runs in the container, over TLS with the pod's certificate.
        own_check = ["python", "-m", "deep3m.runtime.healthcheck", "--server-name"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if tls:
                command = container[probe]["exec"]["command"]
                assert command == [*own_check, deployment["metadata"]["name"]], probe
                assert "grpc" not in container[probe]
                assert container[probe]["timeoutSeconds"] >= 5  # a Python start, not 1 s
            else:
                assert container[probe]["grpc"] == {"port": ports["grpc"]}, probe
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        # Kubernetes must wait longer than the server's own drain, sized per role.
        role = deployment["metadata"]["name"].removeprefix(f"{RELEASE}-deep3m-")
        drain = merged(scenario, role)["shutdownGraceSeconds"]
        assert float(env["DEEP3M_SHUTDOWN_GRACE_SECONDS"]) == drain
        assert grace == drain + 10


def test_scheduler_is_single_recreated_and_protected(scenario: Any) -> None:
    deployment = scenario.get("Deployment", name_of("scheduler"))
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    spec = deployment["spec"]["template"]["spec"]
    scheduler = merged(scenario, "scheduler")
    terms = (
        spec.get("affinity", {})
        .get("nodeAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution", {})
        .get("nodeSelectorTerms")
    )
    if scheduler["requireOnDemand"]:
        keys = {
            (t["matchExpressions"][0]["key"], t["matchExpressions"][0]["values"][0]) for t in terms
        }
        assert keys == {
            ("eks.amazonaws.com/capacityType", "ON_DEMAND"),
            ("karpenter.sh/capacity-type", "on-demand"),
        }
    else:
        assert terms is None
    pdbs = scenario.of_kind("PodDisruptionBudget")
    if scheduler["pdb"]["enabled"]:
        (pdb,) = pdbs
        # One replica: minAvailable 1 would block every voluntary drain.
        assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
        assert (
            pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        )
    else:
        assert pdbs == []


def test_autoscaled_workers_leave_replicas_to_the_autoscaler(scenario: Any) -> None:
    mode = merged(scenario, "autoscaling")["mode"]
    for role in WORKER_ROLES:
        values = merged(scenario, role)
        if not values["enabled"]:
            continue
        spec = scenario.get("Deployment", name_of(role))["spec"]
        if role in GPU_ROLES and mode != "fixed":
            # A fresh install starts no GPU node (upgrades keep the live count).
            assert spec["replicas"] == 0, role
        else:
            assert spec["replicas"] == values["replicas"], role


# -- environment -----------------------------------------------------------------------


def _resolve_env(container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container["env"]:
        assert item["name"] not in env, f"{item['name']} set twice"
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "fieldRef" in item["valueFrom"]:
            field = item["valueFrom"]["fieldRef"]["fieldPath"]
            env[item["name"]] = {
                "metadata.name": "lab-deep3m-x-5d8f",
                "metadata.namespace": NAMESPACE,
            }[field]
        else:
            env[item["name"]] = "from-secret"
    return env


def test_rendered_environment_is_what_deep3m_serve_reads(
    scenario: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    known = {env_var(name) for name in Settings.model_fields}
    scheduler_service = scenario.get("Service", name_of("scheduler"))
    grpc_port = next(p["port"] for p in scheduler_service["spec"]["ports"] if p["name"] == "grpc")
    store = merged(scenario, "store")
    for owner, _, container in containers(scenario):
        env = _resolve_env(container)
        ours = {k: v for k, v in env.items() if k.startswith("DEEP3M_")}
        assert set(ours) <= known, f"{owner}: not settings: {sorted(set(ours) - known)}"
        for name in list(os.environ):
            if name.upper().startswith("DEEP3M_"):
                monkeypatch.delenv(name)
        for name, value in ours.items():
            monkeypatch.setenv(name, value)
        settings = Settings()
        assert settings.scheduler_address == f"{name_of('scheduler')}:{grpc_port}"
        assert settings.grpc_port == grpc_port
        assert settings.store_url == store["url"]
        assert settings.s3_endpoint_url == store["endpointUrl"]
        assert settings.restrict_local_inputs is True
        has_keys = bool(
            store["credentials"]["existingSecret"] or store["credentials"]["accessKeyId"]
        )
        assert bool(settings.s3_access_key_id) == has_keys, owner
        assert settings.log_format == "json"
        if owner == name_of("scheduler") and settings.autoscale_enabled:
            targets = policies_from_settings(settings)
            for role, (deployment, policy) in targets.items():
                worker = scenario.get("Deployment", deployment)
                assert worker["spec"]["replicas"] == 0
                values = merged(scenario, role)
                assert policy.max_replicas == values["autoscaling"]["maxReplicas"]
                assert policy.tasks_per_replica == values["autoscaling"]["tasksPerReplica"]
                assert policy.gpus_per_pod == values["gpu"]["count"]
                # The autoscaler's idea of a pod's capacity is what the pod leases
                # (an inference pod holds pipeline-depth blocks per block computed).
                pod_env = _resolve_env(worker["spec"]["template"]["spec"]["containers"][0])
                depth = int(pod_env.get("DEEP3M_INFERENCE_PIPELINE_DEPTH", "1"))
                assert policy.pod_capacity == int(pod_env["DEEP3M_WORKER_CAPACITY"]) * depth


def test_credentials_come_from_a_secret(scenario: Any) -> None:
    credentials = merged(scenario, "store")["credentials"]
    secrets = scenario.of_kind("Secret")
    expected = credentials["existingSecret"] or (
        f"{RELEASE}-deep3m-store" if credentials["accessKeyId"] else ""
    )
    if credentials["accessKeyId"] and not credentials["existingSecret"]:
        (secret,) = secrets
        assert secret["metadata"]["name"] == expected
        assert set(secret["stringData"]) == {
            credentials["accessKeyIdKey"],
            credentials["secretAccessKeyKey"],
        }
    else:
        assert secrets == []
    for owner, _, container in containers(scenario):
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in container["env"]
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        if not expected:
            assert refs == {}, owner
            continue
        assert refs == {
            "DEEP3M_S3_ACCESS_KEY_ID": {"name": expected, "key": credentials["accessKeyIdKey"]},
            "DEEP3M_S3_SECRET_ACCESS_KEY": {
                "name": expected,
                "key": credentials["secretAccessKeyKey"],
            },
        }, owner


def test_one_service_account_per_role_with_the_irsa_role(scenario: Any) -> None:
    accounts = {a["metadata"]["name"]: a for a in scenario.of_kind("ServiceAccount")}
    enabled = ["scheduler"] + [r for r in WORKER_ROLES if merged(scenario, r)["enabled"]]
    assert sorted(accounts) == sorted(name_of(r) for r in enabled)
    arn = merged(scenario, "serviceAccount")["irsaRoleArn"]
    for account in accounts.values():
        annotations = account["metadata"].get("annotations", {})
        assert annotations.get("eks.amazonaws.com/role-arn", "") == arn
    for owner, spec in scenario.pod_specs():
        # Each Deployment runs as its own role's account; helm test as the scheduler's.
        expected = name_of("scheduler") if owner == name_of("test") else owner
        assert spec["serviceAccountName"] == expected, owner


# -- autoscaling -----------------------------------------------------------------------


def test_scaled_objects_follow_the_scheduler_queue(scenario: Any) -> None:
    autoscaling = merged(scenario, "autoscaling")
    scaled = {s["metadata"]["name"]: s for s in scenario.of_kind("ScaledObject")}
    if autoscaling["mode"] != "keda":
        assert scaled == {}
        return
    enabled = [r for r in GPU_ROLES if merged(scenario, r)["enabled"]]
    assert sorted(scaled) == sorted(name_of(r) for r in enabled)
    service = scenario.get("Service", name_of("scheduler"))
    metrics_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "metrics")
    for role in enabled:
        spec = scaled[name_of(role)]["spec"]
        values = merged(scenario, role)
        assert spec["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name_of(role),
        }
        assert spec["minReplicaCount"] == 0
        assert spec["maxReplicaCount"] == values["autoscaling"]["maxReplicas"]
        assert spec["cooldownPeriod"] == autoscaling["cooldownSeconds"]
        scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert scale_down["stabilizationWindowSeconds"] == autoscaling["cooldownSeconds"]
        assert scale_down["policies"] == [
            {"type": "Pods", "value": 1, "periodSeconds": 2 * autoscaling["pollingIntervalSeconds"]}
        ]
        triggers = {t["name"]: t for t in spec["triggers"]}
        assert set(triggers) == {"pending", "leased"}
        pending, leased = triggers["pending"]["metadata"], triggers["leased"]["metadata"]
        if autoscaling["keda"]["source"] == "metrics-api":
            url = f"http://{name_of('scheduler')}.{NAMESPACE}.svc:{metrics_port}/metrics"
            assert pending["url"] == leased["url"] == url
            assert pending["format"] == "prometheus"
            assert pending["valueLocation"] == f'deep3m_tasks_pending{{role="{role}"}}'
            assert leased["valueLocation"] == f'deep3m_tasks_leased{{role="{role}"}}'
            assert pending["targetValue"] == str(values["autoscaling"]["tasksPerReplica"])
        else:
            assert pending["serverAddress"] == autoscaling["keda"]["prometheus"]["serverAddress"]
            assert f'role="{role}"' in pending["query"]
            assert pending["query"].startswith("sum(deep3m_tasks_pending{")
            assert pending["threshold"] == str(values["autoscaling"]["tasksPerReplica"])


def test_metrics_api_series_exist_before_any_task() -> None:
    # KEDA's metrics-api trigger reads these exact series from /metrics; they
    # must be there (at 0) before the first task, or the trigger errors.
    exposition = generate_latest().decode()
    for gauge in (TASKS_PENDING, TASKS_LEASED):
        for role in GPU_ROLES:
            pattern = rf'^{gauge._name}\{{role="{role}"\}} [0-9.e+-]+$'
            assert re.search(pattern, exposition, re.MULTILINE), (gauge._name, role)


def test_rbac_rights_sit_on_the_schedulers_account_only(scenario: Any) -> None:
    mode = merged(scenario, "autoscaling")["mode"]
    roles, bindings = scenario.of_kind("Role"), scenario.of_kind("RoleBinding")
    assert scenario.of_kind("ClusterRole") == []
    if not scheduler_uses_api(scenario):
        assert roles == [] and bindings == []
        return
    (role,) = roles
    (binding,) = bindings
    gpu = [name_of(r) for r in ("inference", "training") if merged(scenario, r)["enabled"]]
    scale = {"apiGroups": ["apps"], "resources": ["deployments/scale"], "resourceNames": gpu}
    rules = role["rules"]
    if mode == "scheduler":
        assert {**scale, "verbs": ["get", "patch", "update"]} in rules
    else:
        assert {**scale, "verbs": ["get"]} in rules
    pods = {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "patch"]}
    assert (pods in rules) == merged(scenario, "autoscaling")["podDeletionCost"]
    assert len(rules) == 1 + (pods in rules)
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "namespace": NAMESPACE, "name": name_of("scheduler")}
    ]


# -- network, monitoring, helm test ----------------------------------------------------


def test_network_policy_admits_only_clients_and_workers(scenario: Any) -> None:
    policies = {p["metadata"]["name"]: p for p in scenario.of_kind("NetworkPolicy")}
    network = merged(scenario, "networkPolicy")
    if not network["enabled"]:
        assert policies == {}
        return
    scheduler = policies[name_of("scheduler")]["spec"]
    assert scheduler["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "scheduler"
    assert scheduler["policyTypes"] == ["Ingress"]
    grpc_rule, metrics_rule = scheduler["ingress"]
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert grpc_rule["from"] == [
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "deep3m",
                    "app.kubernetes.io/instance": RELEASE,
                }
            }
        },
        {"podSelector": {"matchLabels": {"deep3m.io/client": "true"}}},
        *network["extraClients"],
    ]
    readers = [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}
        for ns in (network["kedaNamespace"], network["prometheusNamespace"])
        if ns
    ]
    assert metrics_rule == {
        "from": readers + network["extraMetricsFrom"],
        "ports": [{"port": "metrics", "protocol": "TCP"}],
    }
    # Every deep3m pod (workers, helm test) matches the first peer.
    for owner, _ in scenario.pod_specs():
        kind = "Pod" if owner.endswith("-test") else "Deployment"
        manifest = scenario.get(kind, owner)
        labels = (
            manifest["metadata"]["labels"]
            if kind == "Pod"
            else manifest["spec"]["template"]["metadata"]["labels"]
        )
        assert grpc_rule["from"][0]["podSelector"]["matchLabels"].items() <= labels.items()


def test_service_monitor_scrapes_every_service(scenario: Any) -> None:
    monitors = scenario.of_kind("ServiceMonitor")
    if not merged(scenario, "metrics")["serviceMonitor"]["enabled"]:
        assert monitors == []
        return
    (monitor,) = monitors
    selector = monitor["spec"]["selector"]["matchLabels"]
    for service in scenario.of_kind("Service"):
        assert selector.items() <= service["metadata"]["labels"].items()
        assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_helm_test_checks_running_services_and_the_store(scenario: Any) -> None:
    pods = scenario.of_kind("Pod")
    (pod,) = pods
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "deep3m.runtime.healthcheck", "--store"]
    args = container["args"]
    addresses = [args[i + 1] for i, a in enumerate(args) if a == "--address"]
    services = {s["metadata"]["name"] for s in scenario.of_kind("Service")}
    for address in addresses:
        host, port = address.rsplit(":", 1)
        assert host in services and port == "50051"
    mode = merged(scenario, "autoscaling")["mode"]
    always_running = ["scheduler"] + [
        r
        for r in WORKER_ROLES
        if merged(scenario, r)["enabled"]
        and merged(scenario, r)["replicas"] > 0
        and (r not in GPU_ROLES or mode == "fixed")
    ]
    assert sorted(addresses) == sorted(f"{name_of(r)}:50051" for r in always_running)
    assert pod["spec"]["restartPolicy"] == "Never"


def test_notes_tell_how_to_port_forward_and_submit(render: Render) -> None:
    notes = render({}).files["deep3m/templates/NOTES.txt"]
    assert f"port-forward service/{name_of('scheduler')} 50051:50051" in notes
    assert f"--namespace {NAMESPACE}" in notes
    assert "--kube-context" in notes
    assert "deep3m predict" in notes and "deep3m watch" in notes
    assert f"helm test {RELEASE}" in notes


def test_manifests_are_plain_yaml_documents(render: Render) -> None:
    # Every rendered template parses on its own (no stray tabs or half documents).
    for path, text in render({}).files.items():
        if path.endswith(".yaml"):
            list(yaml.safe_load_all(text))


def _pod_leases(values: dict[str, Any], role: str) -> int:
    """Leases one worker pod holds at once: what its worker asks for."""
    gpus = int(values["gpu"]["count"])
    capacity = int(values["workerCapacity"]) * (gpus if gpus > 1 else 1)
    return capacity * (int(values["pipelineDepth"]) if role == "inference" else 1)


def test_autoscalers_count_a_pods_leases_as_its_worker_holds_them(scenario: Any) -> None:
    # An inference worker reads ahead and writes behind: it holds pipelineDepth
    # blocks per block it computes. Counted as one, every busy pod would look
    # like several and keep pods (GPUs) up that no task needs.
    autoscaling = merged(scenario, "autoscaling")
    enabled = [r for r in GPU_ROLES if merged(scenario, r)["enabled"]]
    for role in enabled:
        values = merged(scenario, role)
        worker = scenario.get("Deployment", name_of(role))
        container = worker["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        if role == "inference":
            assert env["DEEP3M_INFERENCE_PIPELINE_DEPTH"] == str(values["pipelineDepth"])
        else:
            assert "DEEP3M_INFERENCE_PIPELINE_DEPTH" not in env
        if autoscaling["mode"] == "keda":
            spec = scenario.get("ScaledObject", name_of(role))["spec"]
            leased = next(t for t in spec["triggers"] if t["name"] == "leased")["metadata"]
            target = leased.get("targetValue", leased.get("threshold"))
            assert target == str(_pod_leases(values, role))
    if autoscaling["mode"] != "scheduler" or not enabled:
        return
    scheduler = scenario.get("Deployment", name_of("scheduler"))
    container = scheduler["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    capacity = dict(
        item.split("=") for item in env["DEEP3M_AUTOSCALE_WORKER_CAPACITY_BY_ROLE"].split(",")
    )
    for role in enabled:
        values = merged(scenario, role)
        depth = int(values["pipelineDepth"]) if role == "inference" else 1
        # The scheduler multiplies by GPUs per pod itself.
        assert int(capacity[role]) == int(values["workerCapacity"]) * depth
