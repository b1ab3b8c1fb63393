"""Who may call what: bearer tokens checked in one server interceptor.

Two kinds of principal:

- a **client** (CLI, Python client, dashboards) may submit, watch, cancel and
  read jobs, and call the roles' own services (ingest, describe, export, ...);
- a **worker of a role** may lease, renew, complete and fail tasks, and only
  those of its role (``LeaseTasks.role`` must be its role; the scheduler's
  servicer checks the role of the lease for renew, complete and fail).

Tokens come from settings (``DEEP3M_AUTH_CLIENT_TOKENS``,
``DEEP3M_AUTH_WORKER_TOKENS``) and from a folder of token files
(``DEEP3M_AUTH_TOKEN_DIR``, e.g. a mounted Kubernetes Secret). A caller sends
``authorization: Bearer <token>``; no token or an unknown one is
UNAUTHENTICATED, a known one calling outside its rights PERMISSION_DENIED.
Health checks stay open so that probes need no secret. Tokens are compared by
their SHA-256 digest, never logged.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc

from deep3m.core.errors import InvalidArgumentError
from deep3m.runtime.interceptor import rewrap_handler
from deep3m.runtime.settings import WORKER_ROLES, Settings

log = logging.getLogger("deep3m.auth")

HEADER = "authorization"
SCHEME = "bearer "
WORKER_METHODS = frozenset(
    f"/deep3m.v1.Scheduler/{name}"
    for name in ("LeaseTasks", "RenewLease", "CompleteTask", "CompleteTasks", "FailTask")
)
# Read by the autoscaler's dashboards and by workers alike.
SHARED_METHODS = frozenset({"/deep3m.v1.Scheduler/GetQueueStats"})
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
MAX_TOKEN_CHARS = 4096


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a client, or a worker of ``role``."""

    kind: Literal["client", "worker"]
    role: str = ""
    name: str = ""

    def __str__(self) -> str:
        return f"worker of role {self.role!r}" if self.kind == "worker" else "client"


_CURRENT: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "deep3m_principal", default=None
)


def current_principal() -> Principal | None:
    """The caller of the RPC being served; None when authentication is off."""
    return _CURRENT.get()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _check_role(role: str, where: str) -> str:
    if role not in WORKER_ROLES:
        raise InvalidArgumentError(
            f"{where}: unknown worker role {role!r}; use one of {', '.join(WORKER_ROLES)}",
            field=where,
        )
    return role


class TokenTable:
    """Known tokens (by digest) and the principal each stands for."""

    def __init__(self, principals: Mapping[str, Principal]) -> None:
        self._by_digest = {_digest(t): p for t, p in principals.items() if t}

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup(self, token: str) -> Principal | None:
        return self._by_digest.get(_digest(token))

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenTable:
        tokens: dict[str, Principal] = {}
        for token in settings.auth_client_tokens.split(","):
            if token.strip():
                tokens[token.strip()] = Principal("client")
        for item in settings.auth_worker_tokens.split(","):
            if not item.strip():
                continue
            role, sep, token = item.partition("=")
            if not sep or not token.strip():
                raise InvalidArgumentError(
                    "DEEP3M_AUTH_WORKER_TOKENS must be role=token pairs separated by commas",
                    field="DEEP3M_AUTH_WORKER_TOKENS",
                )
            tokens[token.strip()] = Principal(
                "worker", _check_role(role.strip(), "DEEP3M_AUTH_WORKER_TOKENS")
            )
        if settings.auth_token_dir:
            tokens.update(read_token_dir(Path(settings.auth_token_dir)))
        return cls(tokens)


def read_token_dir(folder: Path) -> dict[str, Principal]:
    """Tokens in ``folder``: files ``client``/``client-<name>`` and ``worker-<role>``.

    Kubernetes mounts a Secret's keys as files (and dot-named links, skipped here).
    """
    if not folder.is_dir():
        raise InvalidArgumentError(
            f"auth token folder {folder} does not exist", field="DEEP3M_AUTH_TOKEN_DIR"
        )
    out: dict[str, Principal] = {}
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") or not path.is_file():
            continue
        token = path.read_text().strip()
        if not token:
            continue
        if name == "client" or name.startswith("client-"):
            out[token] = Principal("client", name=name)
        elif name.startswith("worker-"):
            out[token] = Principal("worker", _check_role(name[len("worker-") :], str(path)))
    return out


def read_token(settings: Settings) -> str:
    """The token this process presents when calling: the setting, else the file."""
    if settings.auth_token:
        return settings.auth_token.strip()
    if settings.auth_token_file:
        path = Path(settings.auth_token_file)
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise InvalidArgumentError(
                f"cannot read the auth token file {path}: {exc.strerror}",
                field="DEEP3M_AUTH_TOKEN_FILE",
            ) from None
    return ""


def _presented_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == HEADER and isinstance(value, str) and value[: len(SCHEME)].lower() == SCHEME:
            return value[len(SCHEME) :].strip()[:MAX_TOKEN_CHARS]
    return None


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def reject(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(reject)


def _allowed(principal: Principal, method: str) -> bool:
    if method in SHARED_METHODS:
        return True
    if method in WORKER_METHODS:
        return principal.kind == "worker"
    return principal.kind == "client"


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every RPC but health checks and records the caller for the servicer.

    With a token folder, the table is read again whenever the folder changes: a
    rotated Kubernetes Secret (its ``..data`` link swapped) takes effect without
    a restart. ``settings`` None: ``tokens`` is fixed.
    """

    def __init__(self, tokens: TokenTable, settings: Settings | None = None) -> None:
        self.tokens = tokens
        self._settings = settings
        self._folder = (
            Path(settings.auth_token_dir) if settings and settings.auth_token_dir else None
        )
        self._stamp = self._folder_stamp()
        self._lock = threading.Lock()

    def _folder_stamp(self) -> int:
        try:
            return self._folder.stat().st_mtime_ns if self._folder is not None else 0
        except OSError:
            return 0

    def _current_tokens(self) -> TokenTable:
        if self._folder is None or self._settings is None:
            return self.tokens
        stamp = self._folder_stamp()
        if stamp != self._stamp:
            with self._lock:
                try:
                    self.tokens = TokenTable.from_settings(self._settings)
                    log.info("auth tokens reloaded", extra={"tokens": len(self.tokens)})
                except (OSError, InvalidArgumentError):  # half-written: keep the old table
                    log.exception("cannot reload the auth tokens; keeping the previous ones")
                self._stamp = stamp
        return self.tokens

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return continuation(handler_call_details)
        token = _presented_token(handler_call_details.invocation_metadata)
        if not token:
            return _deny(
                grpc.StatusCode.UNAUTHENTICATED,
                "this server requires a bearer token (DEEP3M_AUTH_TOKEN or --token)",
            )
        principal = self._current_tokens().lookup(token)
        if principal is None:
            log.warning("unknown token", extra={"method": method})
            return _deny(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        if not _allowed(principal, method):
            log.warning("permission denied", extra={"method": method, "principal": str(principal)})
            return _deny(
                grpc.StatusCode.PERMISSION_DENIED,
                f"a {principal} may not call {method.rsplit('/', 1)[-1]}",
            )
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return _with_principal(handler, principal, method)


def _check_lease_role(principal: Principal, method: str, request: Any) -> None:
    if method.endswith("/LeaseTasks") and principal.kind == "worker":
        role = getattr(request, "role", "")
        if role != principal.role:
            raise _RoleMismatch(f"a {principal} may not lease tasks of role {str(role)[:32]!r}")


class _RoleMismatch(Exception):
    pass


def _with_principal(
    handler: grpc.RpcMethodHandler, principal: Principal, method: str
) -> grpc.RpcMethodHandler:
    def unary(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                _check_lease_role(principal, method, request)
            except _RoleMismatch as exc:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            token = _CURRENT.set(principal)
            try:
                return fn(request, context)
            finally:
                _CURRENT.reset(token)

        return call

    def stream(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            # A generator may resume on another thread: set the caller around each step.
            it = iter(fn(request, context))
            while True:
                token = _CURRENT.set(principal)
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    _CURRENT.reset(token)
                yield item

        return call

    return rewrap_handler(handler, unary, stream)


def server_interceptors(settings: Settings) -> list[grpc.ServerInterceptor]:
    """The auth interceptor when ``auth_enabled`` (refusing to start with no tokens)."""
    if not settings.auth_enabled:
        return []
    tokens = TokenTable.from_settings(settings)
    if not len(tokens):
        raise InvalidArgumentError(
            "DEEP3M_AUTH_ENABLED is set but no tokens are configured: set "
            "DEEP3M_AUTH_CLIENT_TOKENS / DEEP3M_AUTH_WORKER_TOKENS or DEEP3M_AUTH_TOKEN_DIR",
            field="DEEP3M_AUTH_ENABLED",
        )
    return [AuthInterceptor(tokens, settings)]


def require_worker_of(role: str) -> None:
    """In a worker RPC: the caller must be a worker of ``role`` (when auth is on)."""
    from deep3m.core.errors import PermissionDeniedError

    principal = current_principal()
    if principal is not None and principal.kind == "worker" and principal.role != role:
        raise PermissionDeniedError(
            f"a {principal} may not report on a task of role {role!r}", field="lease_id"
        )
