"""Cluster material in k8s/: eksctl config, Karpenter GPU pool, IAM policy, README.

Validated against the upstream schemas in ``<repo>/../shared/schemas`` (eksctl's
JSON schema, Karpenter's CRDs) and checked for agreement with the chart (the
ServiceAccount that EKS Pod Identity binds, the store prefix the IAM policy
grants). Nothing here was applied to a real AWS account from this machine.
"""

from __future__ import annotations

import json
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
    cpu = groups.pop("cpu")
    assert not cpu.get("spot", False) and cpu["minSize"] >= 1
    assert cpu["tags"]["k8s.io/cluster-autoscaler/enabled"] == "true"
    accelerators = {"g6": "nvidia-l4", "g5": "nvidia-a10g"}
    assert sorted(groups) == ["gpu", "gpu-a10g"]
    for gpu in groups.values():
        assert gpu["minSize"] == 0 and gpu["desiredCapacity"] == 0 and gpu["maxSize"] >= 1
        families = {t.split(".")[0] for t in gpu["instanceTypes"]}
        assert len(families) == 1 and families <= set(accelerators)
        # One GPU model per group, named by the label the cluster autoscaler
        # uses to wait for the device plugin instead of launching more nodes.
        assert gpu["labels"]["k8s.amazonaws.com/accelerator"] == accelerators[families.pop()]
        assert {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"} in gpu["taints"]
        # Scale-from-zero discovery for the cluster autoscaler.
        assert gpu["tags"]["k8s.io/cluster-autoscaler/enabled"] == "true"
        assert gpu["propagateASGTags"] is True


def test_vpc_cni_enforces_network_policies() -> None:
    addons = {a["name"]: a for a in _eksctl()["addons"]}
    config = json.loads(addons["vpc-cni"]["configurationValues"])
    assert config["enableNetworkPolicy"] == "true"


def test_s3_gateway_endpoint_keeps_store_traffic_off_the_nat() -> None:
    template = yaml.safe_load((K8S / "s3-gateway-endpoint.yaml").read_text())
    assert template["AWSTemplateFormatVersion"] == "2010-09-09"
    (endpoint,) = template["Resources"].values()
    assert endpoint["Type"] == "AWS::EC2::VPCEndpoint"
    props = endpoint["Properties"]
    assert props["VpcEndpointType"] == "Gateway"
    assert props["ServiceName"] == {"Fn::Sub": "com.amazonaws.${AWS::Region}.s3"}
    # Every reference names a declared parameter.
    refs = {props["VpcId"]["Ref"], props["RouteTableIds"]["Ref"]}
    assert refs <= set(template["Parameters"])


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


def test_pod_identity_binds_every_service_account_of_the_chart(
    chart: Any, base_values: dict[str, Any]
) -> None:
    associations = [
        a for a in _eksctl()["iam"]["podIdentityAssociations"] if a["namespace"] == "deep3m"
    ]
    # The walk-through installs release "deep3m" into namespace "deep3m".
    files = chart.render(base_values, name="deep3m", namespace="deep3m", is_install=True)
    accounts = {
        doc["metadata"]["name"]
        for doc in yaml.safe_load_all(files["deep3m/templates/serviceaccount.yaml"])
        if doc
    }
    assert accounts == {a["serviceAccountName"] for a in associations}
    assert len(accounts) == 5  # one per role
    for association in associations:
        assert association["permissionPolicyARNs"] == [
            "arn:aws:iam::111122223333:policy/deep3m-store"
        ]


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
        "--template-file k8s/s3-gateway-endpoint.yaml",
        "helm install cluster-autoscaler",
        "nvidia-device-plugin",
        "kedacore/keda",
        "make images REGISTRY=",
        "build/images.json",
        "helm install deep3m helm/deep3m",
        "-f build/images-values.yaml",
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


def _readme_commands(program: str) -> list[list[str]]:
    """The ``program ...`` command lines of k8s/README.md's shell blocks, as argv lists."""
    import re
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (K8S / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == [program]:
                commands.append(words[1:])
    return commands


def _parses(argv: list[str]) -> tuple[int, str]:
    """Exit code and output of the real CLI parsing ``argv`` (``--help`` stops it there)."""
    from deep3m.client.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [*argv, "--help"])
    return result.exit_code, result.output


def test_readme_cli_commands_parse_against_the_real_cli() -> None:
    """Global options before the command, existing commands and options only."""
    commands = _readme_commands("deep3m")
    assert {c[4] for c in commands} >= {"ingest", "train", "predict", "watch"}, commands
    for argv in commands:
        code, output = _parses(argv)
        assert code == 0, (argv, output)


def test_the_cli_check_catches_options_after_the_command() -> None:
    code, output = _parses(["ingest", "s3://b/x", "--output", "v.zarr", "--namespace", "deep3m"])
    assert code == 2 and "No such option" in output
