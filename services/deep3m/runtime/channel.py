"""Client channels with deadlines.

Every call a deep3m client makes carries a deadline (``call_options``), and a
channel is handed out only once it is connected (``connect``), so an
unreachable service fails fast with ``UnavailableError`` naming the address
instead of hanging.
"""

from __future__ import annotations

from typing import Any, TypedDict

import grpc

from deep3m.core.errors import InvalidArgumentError, UnavailableError

# Match the server's limits (deep3m.runtime.server) so small regions fit.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


class CallOptions(TypedDict):
    timeout: float


def connect(address: str, *, timeout_s: float) -> grpc.Channel:
    """An insecure channel to ``address`` that is ready, or ``UnavailableError``.

    Waits at most ``timeout_s`` seconds for the connection; the channel is
    closed again when it does not come up.
    """
    if not address or ":" not in address:
        raise InvalidArgumentError(f"address {address!r} must be host:port", field="address")
    if timeout_s <= 0:
        raise InvalidArgumentError(f"timeout_s must be > 0, got {timeout_s}", field="timeout_s")
    channel = grpc.insecure_channel(address, options=list(CHANNEL_OPTIONS))
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        channel.close()
        raise UnavailableError(
            f"cannot reach {address} within {timeout_s:g} s", field="address"
        ) from None
    return channel


def call_options(settings: Any, *, timeout_s: float | None = None) -> CallOptions:
    """Keyword arguments for a stub call: the deadline (``settings.rpc_timeout_seconds``).

    ``stub.Method(request, **call_options(settings))``; ``timeout_s`` overrides it
    for a call known to take longer.
    """
    timeout = float(settings.rpc_timeout_seconds if timeout_s is None else timeout_s)
    if timeout <= 0:
        raise InvalidArgumentError(f"timeout must be > 0, got {timeout}", field="timeout_s")
    return {"timeout": timeout}
