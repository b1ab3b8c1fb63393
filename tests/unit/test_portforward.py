"""Port-forward from the laptop: Service → ready pod resolution and the byte path.

No cluster runs here. The Kubernetes side is ``deep3m.testing.kube_api``: a
loopback HTTP server answering the Service and Pod reads and upgrading the
``pods/{name}/portforward`` request to a WebSocket that speaks the
``v4.channel.k8s.io`` protocol, relaying to a real gRPC server that stands in
for the pod. So the real ``kubernetes`` client (kubeconfig contexts, requests,
WebSocket framing) and our forwarding are exercised end to end; what is not:
a real API server's authentication/RBAC, the kubelet's stream handling, and
the SPDY transport kubectl uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from deep3m.client.portforward import (
    find_scheduler_service,
    port_forward,
    resolve_target,
    scheduler_tunnel,
)
from deep3m.core.errors import InvalidArgumentError, NotFoundError, UnavailableError
from deep3m.testing.kube_api import FakeKubeApi, FakePod, fake_kube_api
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

NS = "deep3m"
SERVICE = "rel-deep3m-scheduler"
LABELS = {"app.kubernetes.io/instance": "rel", "app.kubernetes.io/component": "scheduler"}
# What the chart puts on the scheduler's Service.
SERVICE_LABELS = {
    "app.kubernetes.io/name": "deep3m",
    "app.kubernetes.io/part-of": "deep3m",
    **LABELS,
}


@pytest.fixture
def grpc_pod() -> Iterator[int]:
    """A real gRPC server with the health service, standing in for the scheduler pod."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0).wait()


@pytest.fixture
def kube(grpc_pod: int) -> Iterator[FakeKubeApi]:
    with fake_kube_api() as api:
        api.add_service(
            NS,
            SERVICE,
            LABELS,
            [
                {"name": "grpc", "port": 50051, "targetPort": "grpc"},
                {"name": "metrics", "port": 9090, "targetPort": 9090},
            ],
            labels=SERVICE_LABELS,
        )
        # Oldest first: not ready, then terminating, then the one to pick, then a newer one.
        api.add_pod(NS, FakePod("sched-a", LABELS, ready=False, created="2026-11-01T00:00:00Z"))
        api.add_pod(
            NS, FakePod("sched-b", LABELS, terminating=True, created="2026-11-01T00:01:00Z")
        )
        api.add_pod(
            NS,
            FakePod(
                "sched-c", LABELS, container_ports={"grpc": 50051}, created="2026-11-01T00:02:00Z"
            ),
        )
        api.add_pod(
            NS,
            FakePod(
                "sched-d", LABELS, container_ports={"grpc": 50051}, created="2026-11-01T00:03:00Z"
            ),
        )
        api.add_pod(
            NS,
            FakePod(
                "tiling-a",
                {**LABELS, "app.kubernetes.io/component": "tiling"},
                created="2026-10-01T00:00:00Z",
            ),
        )
        api.forward_targets[(NS, "sched-c", 50051)] = ("127.0.0.1", grpc_pod)
        yield api


@pytest.fixture
def kubeconfig(kube: FakeKubeApi, tmp_path: Path) -> Path:
    return kube.write_kubeconfig(tmp_path / "config", context="lab-cluster")


def _client(kubeconfig: Path) -> object:
    from kubernetes import config

    return config.new_client_from_config(config_file=str(kubeconfig), context="lab-cluster")


def test_resolves_the_oldest_ready_pod_and_named_target_port(kubeconfig: Path) -> None:
    target = resolve_target(_client(kubeconfig), NS, SERVICE, 50051)
    assert (target.pod, target.port) == ("sched-c", 50051)


def test_service_port_by_name(kubeconfig: Path) -> None:
    target = resolve_target(_client(kubeconfig), NS, SERVICE, "grpc")
    assert (target.pod, target.port) == ("sched-c", 50051)
    with pytest.raises(InvalidArgumentError, match=r"50051 \(grpc\), 9090 \(metrics\)"):
        resolve_target(_client(kubeconfig), NS, SERVICE, "http")


def test_numeric_target_port(kubeconfig: Path) -> None:
    assert resolve_target(_client(kubeconfig), NS, SERVICE, 9090).port == 9090


def test_unknown_service_port_lists_the_offered_ones(kubeconfig: Path) -> None:
    offered = r"offers 50051 \(grpc\), 9090 \(metrics\)"
    with pytest.raises(InvalidArgumentError, match=offered) as err:
        resolve_target(_client(kubeconfig), NS, SERVICE, 8080)
    assert err.value.field == "remote_port"


def test_missing_service_is_not_found(kubeconfig: Path) -> None:
    with pytest.raises(NotFoundError, match="deep3m/nope") as err:
        resolve_target(_client(kubeconfig), NS, "nope", 50051)
    assert err.value.field == "service"


def test_no_ready_pod_is_unavailable(kube: FakeKubeApi, kubeconfig: Path) -> None:
    kube.add_service(
        NS,
        "rel-deep3m-inference",
        {"app.kubernetes.io/component": "inference"},
        [{"name": "grpc", "port": 50051, "targetPort": "grpc"}],
    )
    with pytest.raises(UnavailableError, match="no ready pod behind service"):
        resolve_target(_client(kubeconfig), NS, "rel-deep3m-inference", 50051)


def test_unknown_context_is_refused(kubeconfig: Path) -> None:
    with (
        pytest.raises(InvalidArgumentError) as err,
        port_forward(NS, SERVICE, 50051, context="other-cluster", config_file=str(kubeconfig)),
    ):
        pass
    assert err.value.field == "context"
    assert "other-cluster" in err.value.message


@pytest.mark.parametrize(
    ("namespace", "service", "port", "field"),
    [
        ("", SERVICE, 50051, "namespace"),
        (NS, "", 50051, "service"),
        (NS, SERVICE, 0, "remote_port"),
        (NS, SERVICE, 70000, "remote_port"),
    ],
)
def test_bad_arguments(namespace: str, service: str, port: int, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err, port_forward(namespace, service, port):
        pass
    assert err.value.field == field


def test_grpc_calls_travel_through_the_forward(kube: FakeKubeApi, kubeconfig: Path) -> None:
    with port_forward(
        NS, SERVICE, 50051, context="lab-cluster", config_file=str(kubeconfig)
    ) as address:
        host, _, port = address.rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0
        # Two channels on separate connections: each gets its own port-forward stream.
        for _ in range(2):
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(address, options=options) as channel:
                grpc.channel_ready_future(channel).result(timeout=10)
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=10
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
    forwards = [r for r in kube.requests if r.path.endswith("/portforward")]
    assert {r.path for r in forwards} == {f"/api/v1/namespaces/{NS}/pods/sched-c/portforward"}
    assert len(forwards) == 2
    # Closed on exit: nothing listens on the local port any more.
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(channel).result(timeout=0.5)


def test_finds_the_scheduler_service_by_the_chart_labels(
    kube: FakeKubeApi, kubeconfig: Path
) -> None:
    api = _client(kubeconfig)
    assert find_scheduler_service(api, NS) == SERVICE
    with pytest.raises(NotFoundError) as err:
        find_scheduler_service(api, "elsewhere")
    assert err.value.field == "namespace"
    other = {**SERVICE_LABELS, "app.kubernetes.io/instance": "other"}
    kube.add_service(NS, "other-deep3m-scheduler", other, [], labels=other)
    with pytest.raises(InvalidArgumentError, match="other-deep3m-scheduler, rel-deep3m-scheduler"):
        find_scheduler_service(api, NS)
    assert find_scheduler_service(api, NS, release="other") == "other-deep3m-scheduler"


def test_scheduler_tunnel_reaches_the_scheduler(kube: FakeKubeApi, kubeconfig: Path) -> None:
    with scheduler_tunnel(NS, context="lab-cluster", config_file=str(kubeconfig)) as address:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tunnel_follows_name_overrides_and_another_grpc_port(grpc_pod: int, tmp_path: Path) -> None:
    # Installed with nameOverride=em and grpcPort=6000: neither the chart's name
    # nor 50051 appears; the tunnel finds the Service by part-of/component and
    # the port by its name.
    labels = {"app.kubernetes.io/instance": "lab", "app.kubernetes.io/component": "scheduler"}
    with fake_kube_api() as api:
        api.add_service(
            NS,
            "lab-em-scheduler",
            labels,
            [{"name": "grpc", "port": 6000, "targetPort": "grpc"}],
            labels={
                **labels,
                "app.kubernetes.io/name": "em",
                "app.kubernetes.io/part-of": "deep3m",
            },
        )
        api.add_pod(NS, FakePod("lab-em-scheduler-0", labels, container_ports={"grpc": 6000}))
        api.forward_targets[(NS, "lab-em-scheduler-0", 6000)] = ("127.0.0.1", grpc_pod)
        config = api.write_kubeconfig(tmp_path / "config", context="lab")
        with scheduler_tunnel(NS, context="lab", config_file=str(config)) as address:
            with grpc.insecure_channel(address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=10
                )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
