"""The container probe (image HEALTHCHECK, ``helm test``): gRPC health and a store round trip.

Real gRPC health servers on loopback and a real local store; the S3 round
trip is in tests/integration/test_healthcheck_s3.py.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from deep3m.core.errors import UnavailableError
from deep3m.core.store import Store
from deep3m.runtime.healthcheck import PROBE_PREFIX, check_health, main
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("DEEP3M_"):
            monkeypatch.delenv(name)


def _serve(status: int) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def serving() -> Iterator[str]:
    server, address = _serve(health_pb2.HealthCheckResponse.SERVING)
    yield address
    server.stop(0).wait()


@pytest.fixture
def draining() -> Iterator[str]:
    server, address = _serve(health_pb2.HealthCheckResponse.NOT_SERVING)
    yield address
    server.stop(0).wait()


@pytest.fixture
def closed_address() -> str:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_reports_serving(serving: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_health(serving) == "SERVING"
    assert main(["--address", serving]) == 0
    assert f"ok   {serving} SERVING" in capsys.readouterr().out


def test_not_serving_fails(serving: str, draining: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--address", serving, "--address", draining]) == 1
    assert f"FAIL {draining} NOT_SERVING" in capsys.readouterr().err


def test_unreachable_server_names_the_address(
    closed_address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UnavailableError) as err:
        check_health(closed_address, timeout_s=1.0)
    assert err.value.field == "address" and closed_address in err.value.message
    assert main(["--address", closed_address, "--timeout", "1"]) == 1
    assert closed_address in capsys.readouterr().err


def test_default_address_follows_the_grpc_port(
    serving: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEEP3M_GRPC_PORT", serving.rsplit(":", 1)[1])
    assert main([]) == 0


def test_store_round_trip_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"file://{tmp_path}/store"
    monkeypatch.setenv("DEEP3M_STORE_URL", url)
    assert main(["--store"]) == 0
    assert "round trip" in capsys.readouterr().out
    assert Store(url).list(PROBE_PREFIX) == []


def test_unwritable_store_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("DEEP3M_STORE_URL", f"file://{blocker}")
    assert main(["--store"]) == 1
    assert "FAIL store" in capsys.readouterr().err


def test_bad_settings_fail_cleanly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEEP3M_GRPC_PORT", "not-a-port")
    assert main([]) == 1
    assert "DEEP3M_GRPC_PORT" in capsys.readouterr().err
