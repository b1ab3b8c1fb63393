"""Tokens and TLS in the chart: Secrets mounted as files, passed as DEEP3M_AUTH_* /
DEEP3M_TLS_*, an optional cert-manager Certificate, and probes that work with TLS on.

The last test starts a real scheduler with the environment and files a rendered
pod gets (the Secrets' keys written where they are mounted) and runs the
rendered probe command against it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from deep3m.runtime.credentials import generate_credentials
from deep3m.runtime.server import create_server
from deep3m.runtime.settings import Settings
from deep3m.testing.crd import crd_schema

helm_python = pytest.importorskip("helm_python")

RELEASE, NAMESPACE = "lab", "deep3m"
AUTH_DIR, TLS_DIR = "/etc/deep3m/auth", "/etc/deep3m/tls"
WORKER_ROLES = ("tiling", "postprocess", "training", "inference")
CERT_MANAGER_CRD = "cert-manager.io_certificates.yaml"
SECURED = {
    "auth": {"enabled": True, "existingSecret": "lab-deep3m-tokens"},
    "tls": {
        "enabled": True,
        "certManager": {"enabled": True, "issuerRef": {"name": "lab-ca", "kind": "ClusterIssuer"}},
    },
}


def _role(owner: str) -> str:
    return owner.removeprefix(f"{RELEASE}-deep3m-")


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def _expected_secrets(scenario: Any) -> tuple[str, str]:
    auth, tls = scenario.merged["auth"], scenario.merged["tls"]
    tokens = auth["existingSecret"] if auth["enabled"] else ""
    if not tls["enabled"]:
        return tokens, ""
    cert = f"{RELEASE}-deep3m-tls" if tls["certManager"]["enabled"] else tls["existingSecret"]
    return tokens, cert


def test_tokens_and_certificates_are_mounted_secrets_named_in_the_environment(
    scenario: Any,
) -> None:
    tokens, cert = _expected_secrets(scenario)
    client_auth = scenario.merged["tls"]["clientAuth"]
    for owner, spec in scenario.pod_specs():
        (container,) = spec["containers"]
        role = _role(owner)
        env = _env(container)
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        # Pods that serve check tokens; the helm test pod only asks for health.
        wants_tokens = bool(tokens) and role != "test"
        if wants_tokens:
            assert volumes["auth-tokens"]["secret"]["secretName"] == tokens, owner
            # The whole Secret, no items or subPath: a rotated Secret reaches the pod.
            assert "items" not in volumes["auth-tokens"]["secret"]
            assert mounts["auth-tokens"] == {
                "name": "auth-tokens",
                "mountPath": AUTH_DIR,
                "readOnly": True,
            }
            assert env["DEEP3M_AUTH_ENABLED"] == "true"
            assert env["DEEP3M_AUTH_TOKEN_DIR"] == AUTH_DIR
            if role in WORKER_ROLES:
                assert env["DEEP3M_AUTH_TOKEN_FILE"] == f"{AUTH_DIR}/worker-{role}"
            else:
                assert "DEEP3M_AUTH_TOKEN_FILE" not in env, owner
        else:
            assert "auth-tokens" not in volumes and "auth-tokens" not in mounts, owner
            assert not [k for k in env if k.startswith("DEEP3M_AUTH_")], owner
        if cert:
            assert volumes["tls"]["secret"]["secretName"] == cert, owner
            assert mounts["tls"]["mountPath"] == TLS_DIR and mounts["tls"]["readOnly"]
            settings = Settings(
                **{k.removeprefix("DEEP3M_").lower(): v for k, v in env.items() if "_TLS_" in k}
            )
            assert settings.tls_enabled and settings.tls_client_auth == client_auth
            assert (settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file) == (
                f"{TLS_DIR}/tls.crt",
                f"{TLS_DIR}/tls.key",
                f"{TLS_DIR}/ca.crt",
            )
        else:
            assert "tls" not in volumes and not [k for k in env if "_TLS_" in k], owner


def test_services_announce_tls(scenario: Any) -> None:
    tls = scenario.merged["tls"]["enabled"]
    for service in scenario.of_kind("Service"):
        (grpc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc_port["appProtocol"] == ("https" if tls else "kubernetes.io/h2c")


def _certificate(render: Any) -> tuple[Any, dict[str, Any]]:
    rendered = render(SECURED)
    (certificate,) = rendered.of_kind("Certificate")
    return rendered, certificate


def test_the_certificate_names_every_service_the_pods_dial(render: Any) -> None:
    rendered, certificate = _certificate(render)
    spec = certificate["spec"]
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert spec["secretName"] == f"{RELEASE}-deep3m-tls"
    assert spec["issuerRef"] == {
        "name": "lab-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }
    assert {"server auth", "client auth"} <= set(spec["usages"])
    assert "127.0.0.1" in spec["ipAddresses"] and "localhost" in spec["dnsNames"]
    names = set(spec["dnsNames"])
    for service in rendered.of_kind("Service"):
        name = service["metadata"]["name"]
        assert {name, f"{name}.{NAMESPACE}.svc", f"{name}.{NAMESPACE}.svc.cluster.local"} <= names
    for owner, spec_ in rendered.pod_specs():
        (container,) = spec_["containers"]
        # The host the workers dial, and the name each probe expects, are in it.
        host = _env(container)["DEEP3M_SCHEDULER_ADDRESS"].rsplit(":", 1)[0]
        assert host in names
        if "startupProbe" in container:
            assert container["startupProbe"]["exec"]["command"][-1] in names, owner
    # No certificate without cert-manager.
    assert (
        render({"tls": {"enabled": True, "existingSecret": "em-tls"}}).of_kind("Certificate") == []
    )


def test_the_certificate_matches_the_cert_manager_crd(render: Any, schemas_dir: Path) -> None:
    crd = schemas_dir / CERT_MANAGER_CRD
    if not crd.is_file():
        pytest.skip(f"cert-manager's Certificate CRD is not among the schemas ({crd.name})")
    _, certificate = _certificate(render)
    jsonschema.validate(certificate, crd_schema(crd, "v1"))


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"auth": {"enabled": True}}, "auth.existingSecret is required"),
        ({"tls": {"enabled": True}}, "tls.existingSecret is required"),
        (
            {"tls": {"enabled": True, "certManager": {"enabled": True}}},
            "tls.certManager.issuerRef.name is required",
        ),
    ],
)
def test_missing_secrets_are_named(render: Any, values: dict[str, Any], says: str) -> None:
    with pytest.raises(helm_python.HelmRenderError) as err:
        render(values)
    assert says in str(err.value)


def test_the_rendered_probe_passes_against_a_real_tls_server(
    render: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = render(SECURED)
    deployment = rendered.get("Deployment", f"{RELEASE}-deep3m-scheduler")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    probe = container["readinessProbe"]["exec"]["command"]
    server_name = probe[-1]
    # What the Secrets hold, where the pod has them: cert-manager's key names for the
    # certificate (valid for the Service name), one file per token.
    creds = generate_credentials(tmp_path / "generated", hosts=[server_name])
    tls_dir, auth_dir = tmp_path / "tls", tmp_path / "auth"
    tls_dir.mkdir()
    for source, key in (
        (creds.cert_file, "tls.crt"),
        (creds.key_file, "tls.key"),
        (creds.ca_file, "ca.crt"),
    ):
        shutil.copy(source, tls_dir / key)
    shutil.copytree(creds.token_dir, auth_dir)
    env = {
        k: v.replace(TLS_DIR, str(tls_dir)).replace(AUTH_DIR, str(auth_dir))
        for k, v in _env(container).items()
        if k.startswith("DEEP3M_") and not k.startswith("DEEP3M_AUTOSCALE_")
    }
    env.update(
        DEEP3M_STORE_URL=f"file://{tmp_path}/store",
        DEEP3M_HOST="127.0.0.1",
        DEEP3M_METRICS_PORT="0",
    )
    for name in [n for n in os.environ if n.upper().startswith("DEEP3M_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.auth_enabled and settings.tls_enabled and settings.tls_client_auth
    server = create_server("scheduler", settings, port=0, host="127.0.0.1")
    try:
        port = server.address.rsplit(":", 1)[1]
        child = {**os.environ, "DEEP3M_GRPC_PORT": port}
        assert probe[:3] == ["python", "-m", "deep3m.runtime.healthcheck"]
        ok = subprocess.run(
            [sys.executable, *probe[1:]], env=child, capture_output=True, text=True, timeout=60
        )
        assert ok.returncode == 0, ok.stderr
        assert "SERVING" in ok.stdout
        # The kubelet's plaintext gRPC probe would fail against this port.
        plain = {k: v for k, v in child.items() if not k.startswith("DEEP3M_TLS_")}
        refused = subprocess.run(
            [sys.executable, *probe[1:]], env=plain, capture_output=True, text=True, timeout=60
        )
        assert refused.returncode != 0
    finally:
        server.stop(grace=1.0)
