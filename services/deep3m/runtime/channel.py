"""Client channels with deadlines, TLS and bearer tokens.

Every call a deep3m client makes carries a deadline (``call_options``), and a
channel is handed out only once it is connected (``connect``), so an
unreachable service fails fast with ``UnavailableError`` naming the address
instead of hanging.

``open_channel`` is the one place a channel is made: TLS (with a client
certificate for mutual TLS) when ``ChannelSecurity.tls`` is set, and the bearer
token attached to every call when there is one. ``ChannelSecurity.from_settings``
reads the ``DEEP3M_TLS_*`` / ``DEEP3M_AUTH_TOKEN*`` settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

import grpc

from deep3m.core.errors import InvalidArgumentError, UnavailableError

# Match the server's limits (deep3m.runtime.server) so small regions fit.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


class CallOptions(TypedDict):
    timeout: float


@dataclass(frozen=True)
class ChannelSecurity:
    """How a channel authenticates: TLS files (PEM paths) and the bearer token."""

    token: str = ""
    tls: bool = False
    ca_file: str = ""  # verifies the server; empty: the system's roots
    cert_file: str = ""  # presented for mutual TLS
    key_file: str = ""
    server_name: str = ""  # expected name in the server certificate

    @classmethod
    def from_settings(cls, settings: Any) -> ChannelSecurity:
        from deep3m.runtime.auth import read_token

        return cls(
            token=read_token(settings),
            tls=bool(settings.tls_enabled),
            ca_file=settings.tls_ca_file,
            cert_file=settings.tls_cert_file if settings.tls_key_file else "",
            key_file=settings.tls_key_file if settings.tls_cert_file else "",
            server_name=settings.tls_server_name,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca_file, "tls_ca_file"),
            private_key=_read_pem(self.key_file, "tls_key_file"),
            certificate_chain=_read_pem(self.cert_file, "tls_cert_file"),
        )


def _read_pem(path: str, field: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(
            f"cannot read {field} {path}: {exc.strerror}", field=field
        ) from None


class _ClientCallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _ClientCallDetails(  # type: ignore[return-value]
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def open_channel(
    address: str,
    security: ChannelSecurity | None = None,
    *,
    options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS,
) -> grpc.Channel:
    """A channel to ``address``: TLS when ``security.tls``, the token on every call."""
    security = security or ChannelSecurity()
    opts = list(options)
    if security.tls:
        if security.server_name:
            opts.append(("grpc.ssl_target_name_override", security.server_name))
        channel = grpc.secure_channel(address, security.credentials(), options=opts)
    else:
        channel = grpc.insecure_channel(address, options=opts)
    if security.token:
        channel = grpc.intercept_channel(channel, _TokenInterceptor(security.token))
    return channel


def connect(
    address: str, *, timeout_s: float, security: ChannelSecurity | None = None
) -> grpc.Channel:
    """A channel to ``address`` that is ready, or ``UnavailableError``.

    Waits at most ``timeout_s`` seconds for the connection; the channel is
    closed again when it does not come up.
    """
    if not address or ":" not in address:
        raise InvalidArgumentError(f"address {address!r} must be host:port", field="address")
    if timeout_s <= 0:
        raise InvalidArgumentError(f"timeout_s must be > 0, got {timeout_s}", field="timeout_s")
    channel = open_channel(address, security)
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
