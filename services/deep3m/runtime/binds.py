"""Listen addresses that work on IPv4, IPv6 and dual-stack clusters.

gRPC takes ``host:port`` and needs IPv6 literals in brackets (``[::]:50051``;
``:::50051`` fails to parse), while Prometheus' HTTP server takes the bare
host (``::``, which listens on both families where the kernel allows it).
"""

from __future__ import annotations

import ipaddress

from deep3m.core.errors import InvalidArgumentError


def grpc_bind_address(host: str, port: int) -> str:
    """``host:port`` for ``grpc.Server.add_insecure_port``; IPv6 literals bracketed."""
    if not 0 <= port <= 65535:
        raise InvalidArgumentError(f"port must be in 0..65535, got {port}", field="grpc_port")
    bare = host.strip()
    if bare.startswith("[") and bare.endswith("]"):
        bare = bare[1:-1]
    if not bare:
        raise InvalidArgumentError("the bind host must not be empty", field="host")
    try:
        is_v6 = isinstance(ipaddress.ip_address(bare), ipaddress.IPv6Address)
    except ValueError:
        is_v6 = False  # a host name
    return f"[{bare}]:{port}" if is_v6 else f"{bare}:{port}"
