"""Cluster material in k8s/: eksctl config, Karpenter GPU pool, IAM policy, README.

Validated against the upstream schemas in ``<repo>/../shared/schemas`` (eksctl's
JSON schema, Karpenter's CRDs) and checked for agreement with the chart (the
ServiceAccount that EKS Pod Identity binds, the store prefix the IAM policy
grants). Nothing here was applied to a real AWS account from this machine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from deep3m.testing.crd import crd_schema, unknown_fields

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"


def _eksctl() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((K8S / "eksctl-cluster.yaml").read_text())
    return config


def _karpenter() -> dict[str, dict[str, Any]]:
    docs = list(yaml.safe_load_all((K8S / "karpenter-gpu-nodepool.yaml").read_text()))
    return {d["kind"]: d for d in docs if d}


def test_eksctl_config_matches_the_eksctl_schema(schemas_dir: Path) -> None:
    schema = json.loads((schemas_dir / "eksctl.io_v1alpha5_clusterconfig.schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(_eksctl()), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    # And the check has teeth: an unknown field is refused.
    bad = _eksctl()
    bad["managedNodeGroups"][1]["gpuCount"] = 1
    assert list(validator.iter_errors(bad))


def test_eksctl_node_groups() -> None:
    groups = {g["name"]: g for g in _eksctl()["managedNodeGroups"]}
    cpu, gpu = groups["cpu"], groups["gpu"]
    assert not cpu.get("spot", False) and cpu["minSize"] >= 1
    assert gpu["minSize"] == 0 and gpu["desiredCapacity"] == 0 and gpu["maxSize"] >= 1
    assert gpu["instanceTypes"] and all(re.match(r"^g[56]\.", t) for t in gpu["instanceTypes"])
    assert {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"} in gpu["taints"]
    # Scale-from-zero discovery for the cluster autoscaler.
    for group in (cpu, gpu):
        assert group["tags"]["k8s.io/cluster-autoscaler/enabled"] == "true"
    assert gpu["propagateASGTags"] is True


def test_chart_gpu_tolerations_fit_the_node_taints(render: Any) -> None:
    taint = _eksctl()["managedNodeGroups"][1]["taints"][0]
    pool_taint = _karpenter()["NodePool"]["spec"]["template"]["spec"]["taints"][0]
    assert taint == pool_taint
    manifests = render({})
    for role in ("training", "inference"):
        deployment = manifests.get("Deployment", f"lab-deep3m-{role}")
        tolerations = deployment["spec"]["template"]["spec"]["tolerations"]
        assert any(
            t["key"] == taint["key"]
            and t["effect"] == taint["effect"]
            and t["operator"] == "Exists"
            for t in tolerations
        )


def test_pod_identity_binds_the_charts_service_account(chart: Any) -> None:
    association = _eksctl()["iam"]["podIdentityAssociations"][0]
    # The walk-through installs release "deep3m" into namespace "deep3m".
    files = chart.render({}, name="deep3m", namespace=association["namespace"], is_install=True)
    account = yaml.safe_load(files["deep3m/templates/serviceaccount.yaml"])
    assert account["metadata"]["name"] == association["serviceAccountName"]
    assert association["permissionPolicyARNs"] == ["arn:aws:iam::111122223333:policy/deep3m-store"]


def test_karpenter_resources_match_their_crds(schemas_dir: Path) -> None:
    docs = _karpenter()
    for kind, (file, version) in {
        "NodePool": ("karpenter.sh_nodepools.yaml", "v1"),
        "EC2NodeClass": ("karpenter.k8s.aws_ec2nodeclasses.yaml", "v1"),
    }.items():
        schema = crd_schema(schemas_dir / file, version)
        jsonschema.validate(docs[kind], schema)
        assert unknown_fields(docs[kind], schema) == [], kind
    pool = docs["NodePool"]["spec"]
    assert (
        pool["template"]["spec"]["nodeClassRef"]["name"] == docs["EC2NodeClass"]["metadata"]["name"]
    )
    requirements = {r["key"]: r["values"] for r in pool["template"]["spec"]["requirements"]}
    assert set(requirements["karpenter.k8s.aws/instance-family"]) <= {"g5", "g6", "g6e"}
    assert "nvidia.com/gpu" in pool["limits"]


def test_iam_policy_grants_only_the_store_prefix(render: Any) -> None:
    policy = json.loads((K8S / "iam-policy.json").read_text())
    assert policy["Version"] == "2012-10-17"
    store_url = render({}).merged["store"]["url"]
    bucket, _, prefix = store_url.removeprefix("s3://").partition("/")
    resources: set[str] = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert all(a.startswith("s3:") and "*" not in a for a in statement["Action"])
        resource = statement["Resource"]
        resources.update(resource if isinstance(resource, list) else [resource])
    assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/{prefix}/*"}


def test_readme_walks_from_an_empty_account_to_a_prediction() -> None:
    readme = (K8S / "README.md").read_text()
    steps = [
        "aws s3api create-bucket",
        "aws iam create-policy",
        "eksctl create cluster -f",
        "cluster-autoscaler",
        "nvidia-device-plugin",
        "kedacore/keda",
        "docker build -f docker/Dockerfile.cpu",
        "docker build -f docker/Dockerfile.cuda",
        "helm install deep3m helm/deep3m",
        "helm test deep3m",
        "--kube-context",
        "deep3m ingest",
        "deep3m predict",
        "deep3m watch",
        "eksctl delete cluster",
    ]
    positions = [readme.find(step) for step in steps]
    missing = [s for s, p in zip(steps, positions, strict=True) if p < 0]
    assert not missing, missing
    assert positions == sorted(positions), "steps out of order"
    assert "not run end to end" in readme.lower()


@pytest.mark.parametrize("path", ["k8s/eksctl-cluster.yaml", "k8s/karpenter-gpu-nodepool.yaml"])
def test_cluster_files_name_the_same_cluster(path: str) -> None:
    text = (REPO / path).read_text()
    assert "deep3m" in text
    if "karpenter" in path:
        assert "karpenter.sh/discovery: deep3m" in text
        assert _eksctl()["metadata"]["name"] == "deep3m"
