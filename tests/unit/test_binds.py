"""IPv6-friendly gRPC bind addresses, checked by binding real servers."""

from __future__ import annotations

import socket
from concurrent import futures

import grpc
import pytest
from deep3m.core.errors import InvalidArgumentError
from deep3m.runtime.binds import grpc_bind_address


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("0.0.0.0", "0.0.0.0:50051"),
        ("::", "[::]:50051"),
        ("[::]", "[::]:50051"),
        ("fd00::1", "[fd00::1]:50051"),
        ("localhost", "localhost:50051"),
    ],
)
def test_addresses(host: str, expected: str) -> None:
    assert grpc_bind_address(host, 50051) == expected


def test_bad_input_names_the_field() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        grpc_bind_address("", 1)
    assert err.value.field == "host"
    with pytest.raises(InvalidArgumentError) as err:
        grpc_bind_address("::", 70000)
    assert err.value.field == "grpc_port"


def _binds(address: str) -> int:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        return server.add_insecure_port(address)
    except RuntimeError:
        return 0
    finally:
        server.stop(0)


def test_the_unbracketed_form_fails_and_ours_binds() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support in this kernel")
    assert _binds(":::0") == 0  # what f"{host}:{port}" gives for host "::"
    assert _binds(grpc_bind_address("::", 0)) > 0
