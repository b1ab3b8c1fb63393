"""Probe deep3m from inside a container: gRPC health of services, and a store round trip.

``python -m deep3m.runtime.healthcheck`` checks the local server (the image's
HEALTHCHECK); ``--address HOST:PORT`` (repeatable) checks others and
``--store`` writes, reads back and deletes a small object in the configured
store (the chart's ``helm test``). Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deep3m.core.errors import Deep3mError, UnavailableError
from deep3m.runtime.channel import ChannelSecurity, open_channel
from deep3m.runtime.settings import Settings

# Probe objects live here; each run deletes its own.
PROBE_PREFIX = "healthcheck"


def check_health(
    address: str,
    *,
    service: str = "",
    timeout_s: float = 5.0,
    security: ChannelSecurity | None = None,
) -> str:
    """The health status name (``"SERVING"``, ...) that ``address`` reports for ``service``.

    Raises ``UnavailableError`` naming the address when it cannot be asked.
    """
    # Over TLS when the server has it on (the probe itself needs no token).
    with open_channel(address, security, options=()) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            name = code.name if code is not None else "UNKNOWN"
            raise UnavailableError(
                f"health check of {address} (service {service!r}) failed: {name}",
                field="address",
            ) from None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def store_round_trip(settings: Settings) -> float:
    """Write, read back and delete a probe object in the store; returns the seconds taken."""
    from deep3m.core.store import open_store

    store = open_store(settings.store_url, settings)
    key = f"{PROBE_PREFIX}/{uuid.uuid4().hex}"
    payload = uuid.uuid4().bytes
    started = time.perf_counter()
    try:
        store.write_bytes(key, payload)
        back = store.read_bytes(key)
    finally:
        store.delete(key)
    if back != payload:
        raise UnavailableError(
            f"store {store.url} returned other bytes than written for {key}", field="store_url"
        )
    if store.exists(key):
        raise UnavailableError(f"store {store.url} kept {key} after delete", field="store_url")
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deep3m.runtime.healthcheck",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument(
        "--address",
        action="append",
        default=[],
        help="host:port of a deep3m server (repeatable; default: this one)",
    )
    parser.add_argument("--service", default="", help="gRPC service name to ask about")
    parser.add_argument("--store", action="store_true", help="also round-trip the store")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per check")
    parser.add_argument(
        "--server-name",
        default="",
        help="name to expect in the server's TLS certificate (default: DEEP3M_TLS_SERVER_NAME, "
        "else the host dialled); a pod probing itself names its Service",
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except Deep3mError as exc:
        print(f"FAIL settings: {exc}", file=sys.stderr)
        return 1
    addresses = args.address or ([] if args.store else [f"127.0.0.1:{settings.grpc_port or 50051}"])
    ok = True
    try:
        security = ChannelSecurity.from_settings(settings)
    except Deep3mError as exc:
        print(f"FAIL {exc}", file=sys.stderr)
        return 1
    if args.server_name:
        security = replace(security, server_name=args.server_name)
    for address in addresses:
        try:
            status = check_health(
                address, service=args.service, timeout_s=args.timeout, security=security
            )
        except Deep3mError as exc:
            print(f"FAIL {exc}", file=sys.stderr)
            ok = False
            continue
        serving = status == "SERVING"
        ok = ok and serving
        print(
            f"{'ok  ' if serving else 'FAIL'} {address} {status}",
            file=sys.stdout if serving else sys.stderr,
        )
    if args.store:
        try:
            seconds = store_round_trip(settings)
            print(f"ok   store {settings.store_url} round trip in {seconds:.3f} s")
        except (Deep3mError, OSError) as exc:
            print(f"FAIL store {settings.store_url}: {exc}", file=sys.stderr)
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
