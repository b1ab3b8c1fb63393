"""What a real ``helm install`` on EKS needs from the chart, rendered by the real Helm engine.

Each check here is one way an install went wrong before: no registry or store
given, mutable tags, installs failing without KEDA, drains blocked, GPU nodes
started by every install, missing ephemeral-storage requests, and the chart
conventions (global registry, pull secrets, overridable security contexts,
per-role annotations, priority, spread, extra volumes, IPv6 binds). Whether a
real API server admits the objects is checked only as far as the Kubernetes
schemas go (``test_chart_render.py``); no cluster runs here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

helm_python = pytest.importorskip("helm_python")

RELEASE = "lab"
NAMESPACE = "deep3m"
CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "deep3m"
GPU_ROLES = ("training", "inference")


def name_of(role: str) -> str:
    return f"{RELEASE}-deep3m-{role}"


def _render_error(chart: Any, values: dict[str, Any]) -> str:
    with pytest.raises(helm_python.HelmError) as err:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return str(err.value)


def _pod(rendered: Any, role: str) -> dict[str, Any]:
    spec: dict[str, Any] = rendered.get("Deployment", name_of(role))["spec"]["template"]
    return spec


# -- 1. images and store must be given ------------------------------------------------


def test_no_registry_is_refused_with_a_clear_message(
    chart: Any, base_values: dict[str, Any]
) -> None:
    del base_values["image"]
    message = _render_error(chart, base_values)
    assert "image.registry (or global.imageRegistry) is required" in message
    assert "make images" in message


def test_no_store_url_is_refused_with_a_clear_message(
    chart: Any, base_values: dict[str, Any]
) -> None:
    del base_values["store"]
    message = _render_error(chart, base_values)
    assert "store.url is required" in message and "s3://bucket/prefix" in message


def test_images_come_from_the_registry_pinned_by_digest(render: Any) -> None:
    digest = "sha256:" + "c" * 64
    rendered = render({"image": {"cuda": {"tag": "0.1.0", "digest": digest}}})
    registry = "111122223333.dkr.ecr.us-east-1.amazonaws.com"
    inference = _pod(rendered, "inference")["spec"]["containers"][0]["image"]
    assert inference == f"{registry}/deep3m-cuda:0.1.0@{digest}"
    # No digest given: the tag alone (the chart's appVersion by default).
    assert _pod(rendered, "scheduler")["spec"]["containers"][0]["image"] == (
        f"{registry}/deep3m:0.1.0"
    )


def test_global_registry_wins_and_pull_secrets_merge(render: Any) -> None:
    rendered = render(
        {
            "global": {"imageRegistry": "mirror.example.org/", "imagePullSecrets": [{"name": "g"}]},
            "imagePullSecrets": [{"name": "own"}, {"name": "g"}],
        }
    )
    for _, spec in rendered.pod_specs():
        assert spec["containers"][0]["image"].startswith("mirror.example.org/deep3m")
        assert spec["imagePullSecrets"] == [{"name": "g"}, {"name": "own"}]


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"image": {"cpu": {"digest": "latest"}}}, "/image/cpu/digest"),
        ({"image": {"cuda": {"digest": "sha256:abc"}}}, "/image/cuda/digest"),
        ({"bindAddress": "localhost"}, "/bindAddress"),
        ({"ipFamilyPolicy": "DualStack"}, "/ipFamilyPolicy"),
        ({"inference": {"shutdownGraceSeconds": -1}}, "/inference/shutdownGraceSeconds"),
        ({"global": {"imageRegistry": 5}}, "/global/imageRegistry"),
        ({"scheduler": {"fence": {"waitSeconds": 300}}}, "/scheduler/fence/waitSeconds"),
        ({"scheduler": {"fence": {"ttlSeconds": 0}}}, "/scheduler/fence/ttlSeconds"),
    ],
)
def test_schema_rejects_bad_new_values(chart: Any, values: dict[str, Any], words: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as err:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    assert words in str(err.value)


# -- 6. KEDA -------------------------------------------------------------------------


def test_keda_mode_without_keda_fails_with_what_to_do(
    chart: Any, base_values: dict[str, Any]
) -> None:
    del base_values["autoscaling"]
    message = _render_error(chart, base_values)
    assert "needs KEDA" in message
    assert "autoscaling.mode=scheduler" in message
    assert "--api-versions keda.sh/v1alpha1/ScaledObject" in message


def test_other_modes_need_no_keda(chart: Any, base_values: dict[str, Any]) -> None:
    for mode in ("scheduler", "fixed"):
        values = {**base_values, "autoscaling": {"mode": mode}}
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        assert "keda.sh" not in files.get("deep3m/templates/keda-scaledobjects.yaml", "")


# -- 3. one scheduler -----------------------------------------------------------------


def _env(rendered: Any, role: str) -> dict[str, str]:
    container = _pod(rendered, role)["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container["env"]}


def test_the_schedulers_fence_settings_come_from_values(render: Any) -> None:
    from deep3m.runtime.settings import Settings

    rendered = render({"scheduler": {"fence": {"ttlSeconds": 45, "renewSeconds": 5}}})
    env = _env(rendered, "scheduler")
    settings = Settings(
        fence_ttl_seconds=env["DEEP3M_FENCE_TTL_SECONDS"],
        fence_renew_seconds=env["DEEP3M_FENCE_RENEW_SECONDS"],
        fence_wait_seconds=env["DEEP3M_FENCE_WAIT_SECONDS"],
    )
    assert (settings.fence_ttl_seconds, settings.fence_renew_seconds) == (45, 5)
    assert settings.fence_wait_seconds == 60  # the chart's default
    # A starting scheduler's wait for the fence fits in its startup probe.
    probe = _pod(rendered, "scheduler")["spec"]["containers"][0]["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] > settings.fence_wait_seconds + 30
    for role in ("tiling", "postprocess", *GPU_ROLES):
        assert not [k for k in _env(rendered, role) if k.startswith("DEEP3M_FENCE_")], role


def test_fence_renewals_that_outlast_the_ttl_are_refused(
    chart: Any, base_values: dict[str, Any]
) -> None:
    values = {**base_values, "scheduler": {"fence": {"ttlSeconds": 10, "renewSeconds": 8}}}
    message = _render_error(chart, values)
    assert "scheduler.fence.renewSeconds (8) must be below three quarters" in message


# -- 7. drains -----------------------------------------------------------------------


def test_scheduler_does_not_block_drains_by_default(render: Any) -> None:
    rendered = render({})
    annotations = _pod(rendered, "scheduler")["metadata"].get("annotations", {})
    assert "karpenter.sh/do-not-disrupt" not in annotations
    assert "cluster-autoscaler.kubernetes.io/safe-to-evict" not in annotations
    (pdb,) = rendered.of_kind("PodDisruptionBudget")
    # With one replica, maxUnavailable 1 admits one eviction; minAvailable 1 admits none.
    assert pdb["spec"]["maxUnavailable"] == 1


def test_blocking_consolidation_is_an_explicit_choice(render: Any) -> None:
    annotations = _pod(render({"scheduler": {"blockConsolidation": True}}), "scheduler")[
        "metadata"
    ]["annotations"]
    assert annotations["karpenter.sh/do-not-disrupt"] == "true"
    assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"


# -- 2. grace periods sized per role ---------------------------------------------------


def test_grace_periods_are_per_role_and_fit_a_spot_notice(render: Any) -> None:
    rendered = render({})
    graces = {
        role: _pod(rendered, role)["spec"]["terminationGracePeriodSeconds"]
        for role in ("scheduler", "tiling", "postprocess", "training", "inference")
    }
    # Training writes a checkpoint on SIGTERM: the longest grace, yet inside the
    # two minutes between a spot interruption notice and the node going away.
    assert max(graces, key=lambda r: graces[r]) == "training"
    assert graces["training"] <= 120
    assert graces["inference"] > graces["tiling"] > graces["scheduler"]


# -- 8. cost and capacity ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["keda", "scheduler"])
def test_gpu_deployments_start_at_zero_when_autoscaled(render: Any, mode: str) -> None:
    rendered = render({"autoscaling": {"mode": mode}})
    for role in GPU_ROLES:
        assert rendered.get("Deployment", name_of(role))["spec"]["replicas"] == 0


def test_every_container_requests_ephemeral_storage(render: Any) -> None:
    for owner, spec in render({}).pod_specs():
        for container in spec["containers"]:
            resources = container["resources"]
            assert "ephemeral-storage" in resources["requests"], owner
            assert "ephemeral-storage" in resources["limits"], owner


def test_pod_capacity_counts_gpus_per_pod(render: Any) -> None:
    rendered = render(
        {"training": {"workerCapacity": 2, "gpu": {"count": 4, "resourceName": "nvidia.com/gpu"}}}
    )
    env = {
        e["name"]: e.get("value")
        for e in _pod(rendered, "training")["spec"]["containers"][0]["env"]
    }
    assert env["DEEP3M_WORKER_CAPACITY"] == "8"
    (scaled,) = [
        s for s in rendered.of_kind("ScaledObject") if s["metadata"]["name"] == name_of("training")
    ]
    leased = next(t for t in scaled["spec"]["triggers"] if t["name"] == "leased")
    assert leased["metadata"]["targetValue"] == "8"


def test_no_gpu_role_means_no_api_rights(render: Any) -> None:
    # An empty resourceNames list would grant the rule on every Deployment.
    rendered = render({"training": {"enabled": False}, "inference": {"enabled": False}})
    assert rendered.of_kind("Role") == [] and rendered.of_kind("RoleBinding") == []
    assert _pod(rendered, "scheduler")["spec"]["automountServiceAccountToken"] is False


# -- 5. who may read metrics ---------------------------------------------------------


def test_metrics_readers_follow_the_configured_namespaces(render: Any) -> None:
    rendered = render(
        {"networkPolicy": {"kedaNamespace": "platform-keda", "prometheusNamespace": ""}}
    )
    policy = rendered.get("NetworkPolicy", name_of("scheduler"))
    metrics = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "metrics")
    assert metrics["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "platform-keda"}}}
    ]


# -- 9. conventions ------------------------------------------------------------------


def test_security_contexts_can_leave_the_uid_to_the_platform(render: Any) -> None:
    rendered = render({"podSecurityContext": {"runAsUser": None, "runAsGroup": None}})
    for owner, spec in rendered.pod_specs():
        context = spec["securityContext"]
        assert "runAsUser" not in context and "runAsGroup" not in context, owner
        assert context["runAsNonRoot"] is True, owner


def test_per_role_annotations_priority_spread_and_volumes(render: Any) -> None:
    spread = {
        "maxSkew": 1,
        "topologyKey": "topology.kubernetes.io/zone",
        "whenUnsatisfiable": "ScheduleAnyway",
    }
    rendered = render(
        {
            "podAnnotations": {"a": "all"},
            "priorityClassName": "batch",
            "inference": {
                "podAnnotations": {"b": "inference"},
                "priorityClassName": "gpu-batch",
                "topologySpreadConstraints": [spread],
                "extraVolumes": [{"name": "cache", "emptyDir": {}}],
                "extraVolumeMounts": [{"name": "cache", "mountPath": "/cache"}],
            },
        }
    )
    inference, tiling = _pod(rendered, "inference"), _pod(rendered, "tiling")
    assert inference["metadata"]["annotations"] == {"a": "all", "b": "inference"}
    assert tiling["metadata"]["annotations"] == {"a": "all"}
    assert inference["spec"]["priorityClassName"] == "gpu-batch"
    assert tiling["spec"]["priorityClassName"] == "batch"
    assert inference["spec"]["topologySpreadConstraints"] == [spread]
    assert "topologySpreadConstraints" not in tiling["spec"]
    assert {"name": "cache", "emptyDir": {}} in inference["spec"]["volumes"]
    mounts = inference["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "cache", "mountPath": "/cache"} in mounts


def test_the_cli_tunnel_finds_the_scheduler_whatever_the_names(render: Any) -> None:
    from deep3m.client.portforward import SCHEDULER_PORT_NAME, SCHEDULER_SELECTOR

    wanted = dict(term.split("=") for term in SCHEDULER_SELECTOR.split(","))
    for values in ({}, {"nameOverride": "em", "grpcPort": 6000}, {"fullnameOverride": "x"}):
        rendered = render(values)
        found = [
            s
            for s in rendered.of_kind("Service")
            if wanted.items() <= s["metadata"]["labels"].items()
        ]
        (service,) = found
        ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
        assert ports[SCHEDULER_PORT_NAME] == values.get("grpcPort", 50051)


def test_ipv6_bind_and_dual_stack_services(render: Any) -> None:
    rendered = render({"bindAddress": "::", "ipFamilyPolicy": "PreferDualStack"})
    for owner, spec in rendered.pod_specs():
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        assert env["DEEP3M_HOST"] == "::", owner
    for service in rendered.of_kind("Service"):
        assert service["spec"]["ipFamilyPolicy"] == "PreferDualStack"


def test_schema_draft_and_documented_helm_version_agree() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    # Helm validates draft 2020-12 schemas from 3.18 on; older Helm rejects the chart.
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["annotations"]["deep3m.io/min-helm-version"] == "3.18.0"
    for readme in (CHART_DIR / "README.md", CHART_DIR.parents[1] / "k8s" / "README.md"):
        text = readme.read_text()
        versions = re.findall(r"[Hh]elm[^.\n]{0,12}?\b(3\.\d+)\+", text)
        assert versions, readme
        assert all(tuple(map(int, v.split("."))) >= (3, 18) for v in versions), readme


# -- 9. the CLI commands the chart prints ---------------------------------------------


def test_the_notes_commands_parse_against_the_real_cli(render: Any) -> None:
    import shlex

    from deep3m.client.cli import app
    from typer.testing import CliRunner

    notes = render({}).files["deep3m/templates/NOTES.txt"]
    lines = [line.strip() for line in notes.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("deep3m --")]
    assert {c[4] for c in commands} == {"jobs", "ingest", "predict", "watch"}, commands
    for argv in commands:
        # --help stops after parsing: unknown options or commands still fail.
        result = CliRunner().invoke(app, [*argv, "--help"])
        assert result.exit_code == 0, (argv, result.output)
        assert argv[:4] == ["--kube-context", argv[1], "--namespace", NAMESPACE]
