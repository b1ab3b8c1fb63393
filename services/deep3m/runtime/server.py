"""Start a role's gRPC server: health, reflection, metrics, errors, shutdown.

``create_server`` builds and starts a server without blocking (tests use it on
loopback); ``serve`` runs one role until SIGTERM/SIGINT, then drains: health
turns NOT_SERVING, background workers stop taking tasks, in-flight RPCs get
``shutdown_grace_seconds`` to finish.

A role that pulls tasks declares its handlers (``task_handlers``, by stage
name, see :class:`WorkerRoleApp`); the server starts the role's worker after
the app and stops it on shutdown, when ``worker_enabled`` is set.
"""

from __future__ import annotations

import importlib
import logging
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from deep3m.core.errors import Deep3mError
from deep3m.runtime.auth import server_interceptors
from deep3m.runtime.interceptor import ErrorMappingInterceptor
from deep3m.runtime.settings import ROLES, Settings, warn_unknown_env_vars
from deep3m.runtime.task import TaskHandler
from deep3m.runtime.worker import Worker

log = logging.getLogger("deep3m.server")


class RoleApp(Protocol):
    """What a role contributes to a server: servicers and optional background work."""

    # Read-only, so an app may declare it as a tuple class attribute.
    @property
    def service_names(self) -> Sequence[str]: ...

    def register(self, server: grpc.Server) -> None: ...

    def start(self) -> None: ...

    def stop(self, grace: float) -> None: ...


@runtime_checkable
class TaskRole(Protocol):
    """A role app that runs tasks: its settings and its handlers by stage name."""

    @property
    def settings(self) -> Settings: ...

    @property
    def task_handlers(self) -> Mapping[str, TaskHandler]: ...


class WorkerRoleApp:
    """Base of the roles that pull tasks: they register servicers and declare handlers.

    The server starts and stops the worker; ``start``/``stop`` are for anything else.
    """

    service_names: Sequence[str] = ()

    def __init__(self, settings: Settings, task_handlers: Mapping[str, TaskHandler]) -> None:
        self.settings = settings
        self.task_handlers = dict(task_handlers)

    def register(self, server: grpc.Server) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Nothing to start besides the worker."""

    def stop(self, grace: float) -> None:
        """Nothing to stop besides the worker."""


def start_worker(role: str, app: RoleApp) -> Worker | None:
    """The role's task worker, started; None when it runs no tasks or workers are off."""
    if not isinstance(app, TaskRole) or not app.task_handlers:
        return None
    if not app.settings.worker_enabled:
        return None
    worker = Worker(app.settings, role, app.task_handlers)
    worker.start()
    return worker


@runtime_checkable
class AbortingRole(Protocol):
    """A role app that may have to end its server (e.g. it lost the right to write)."""

    def set_abort(self, abort: Callable[[Deep3mError], None]) -> None: ...


@dataclass
class RunningServer:
    role: str
    server: grpc.Server
    port: int
    health: health.HealthServicer
    app: RoleApp
    worker: Worker | None = None
    # Set by a signal or by ``abort``: ``serve`` then stops the server.
    ended: threading.Event = field(default_factory=threading.Event)
    # Why the app ended the server; ``serve`` raises it after stopping.
    aborted: Deep3mError | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.health.set("", status)
        for name in self.app.service_names:
            self.health.set(name, status)

    def abort(self, error: Deep3mError) -> None:
        """The app cannot go on: NOT_SERVING at once; ``serve`` stops and raises ``error``."""
        log.error("aborting: %s", error.message, extra={"role": self.role})
        self.aborted = error
        self.set_serving(False)
        self.ended.set()

    def stop(self, grace: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.set_serving(False)
        # Refuse new RPCs at once; in-flight ones and the app's background work
        # drain side by side within the same grace period.
        drained = self.server.stop(grace)
        if self.worker is not None:
            self.worker.stop(grace)
            self.worker = None
        self.app.stop(grace)
        drained.wait()
        log.info("server stopped", extra={"role": self.role})

    def wait(self) -> None:
        self.server.wait_for_termination()


def load_app(role: str, settings: Settings) -> RoleApp:
    if role not in ROLES:
        from deep3m.core.errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"unknown role {role!r}; choose one of {', '.join(ROLES)}", field="role"
        )
    module = importlib.import_module(f"deep3m.{role}.app")
    app: RoleApp = module.build(settings)
    return app


def server_credentials(settings: Settings) -> grpc.ServerCredentials:
    """TLS with the role's certificate; mutual TLS when ``tls_client_auth`` is set."""
    from pathlib import Path

    from deep3m.core.errors import InvalidArgumentError

    def read(path: str, name: str) -> bytes:
        if not path:
            raise InvalidArgumentError(
                f"DEEP3M_TLS_ENABLED needs DEEP3M_{name.upper()}", field=f"DEEP3M_{name.upper()}"
            )
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise InvalidArgumentError(
                f"cannot read DEEP3M_{name.upper()} {path}: {exc.strerror}",
                field=f"DEEP3M_{name.upper()}",
            ) from None

    pair = (
        read(settings.tls_key_file, "tls_key_file"),
        read(settings.tls_cert_file, "tls_cert_file"),
    )
    ca = read(settings.tls_ca_file, "tls_ca_file") if settings.tls_client_auth else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=settings.tls_client_auth
    )


def create_server(
    role: str,
    settings: Settings,
    *,
    app: RoleApp | None = None,
    port: int | None = None,
    host: str | None = None,
    max_workers: int = 16,
) -> RunningServer:
    """Build, bind and start a server for ``role``; health is SERVING once ready.

    ``port=0`` binds a free port (tests). The role's background workers start
    after the server answers, and health reports SERVING only then.
    """
    app = app or load_app(role, settings)
    # Long-lived streams (an app's ``stream_threads``, capped by the app) get threads
    # beyond ``max_workers``, so unary calls and health checks always find one free.
    threads = max_workers + int(getattr(app, "stream_threads", 0))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"{role}-rpc"),
        # Authentication first: an unknown caller reaches no servicer.
        interceptors=[*server_interceptors(settings), ErrorMappingInterceptor()],
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 256 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    app.register(server)
    names = (*app.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bind_host = host if host is not None else settings.host
    chosen = settings.port_for(role) if port is None else port
    try:
        if settings.tls_enabled:
            bound = server.add_secure_port(f"{bind_host}:{chosen}", server_credentials(settings))
        else:
            bound = server.add_insecure_port(f"{bind_host}:{chosen}")
    except RuntimeError:  # newer grpc raises instead of returning 0
        bound = 0
    if bound == 0:
        from deep3m.core.errors import UnavailableError

        raise UnavailableError(
            f"cannot bind {bind_host}:{chosen} for the {role} server", field="grpc_port"
        )
    running = RunningServer(role, server, bound, health_servicer, app)
    running.set_serving(False)
    if isinstance(app, AbortingRole):
        app.set_abort(running.abort)
    server.start()
    try:
        app.start()
        running.worker = start_worker(role, app)
    except BaseException:
        # Do not leave a half-started server listening behind a failed app.
        server.stop(0).wait()
        raise
    if running.aborted is None:  # an abort during start keeps it NOT_SERVING
        running.set_serving(True)
    log.info("server started", extra={"role": role, "port": bound})
    return running


def serve(role: str, settings: Settings) -> None:
    """Run ``role`` until SIGTERM or SIGINT, then shut down gracefully.

    An app that aborts (``RunningServer.abort``) ends it the same way, and its
    error is raised afterwards, so the process exits non-zero.
    """
    from deep3m.runtime.logs import configure_logging
    from deep3m.runtime.metrics import start_metrics_server

    configure_logging(role, settings.log_level, settings.log_format)
    warn_unknown_env_vars(log)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    if settings.metrics_port:
        start_metrics_server(settings.metrics_port, settings.host)
    running = create_server(role, settings)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("shutting down", extra={"signal": signal.Signals(signum).name})
        running.ended.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    running.ended.wait()
    running.stop(settings.shutdown_grace_seconds)
    if running.aborted is not None:
        raise running.aborted
