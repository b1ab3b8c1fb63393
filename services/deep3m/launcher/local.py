"""The embedded deployment: every role as its own process on localhost.

``deep3m up`` runs the scheduler and one worker of each role exactly as the
Helm chart runs them on Kubernetes — the same ``deep3m serve <role>`` command,
configured through the same ``DEEP3M_*`` variables — with a ``file://`` store.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deep3m.core.errors import UnavailableError
from deep3m.core.store import normalize_url
from deep3m.runtime.settings import DEFAULT_PORTS, ROLES, Settings

DEFAULT_STORE = "./deep3m-data"
SAMPLE_ROOT = "file://" + str(Path(__file__).resolve().parents[1] / "data")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_serving(
    address: str, proc: subprocess.Popen[bytes], timeout_s: float, role: str, *, log: str = ""
) -> None:
    """Until the server of ``proc`` at ``address`` reports SERVING; UnavailableError
    naming ``role`` when it exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise UnavailableError(
                    f"the {role} process exited with code {proc.returncode} during start-up"
                    + (f"; see {log}" if log else ""),
                    field=role,
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UnavailableError(
                    f"the {role} server did not become ready in {timeout_s:.0f} s", field=role
                )
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=""),
                    timeout=min(2.0, remaining),
                    wait_for_ready=True,
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            # Not ready yet: the next Check blocks on the channel, so this loop
            # does not spin; a short pause avoids hammering a starting server.
            time.sleep(0.1)


@dataclass(frozen=True)
class LocalClusterSpec:
    store_url: str = DEFAULT_STORE
    roles: tuple[str, ...] = ROLES
    # 0 picks a free port per role; None uses the fixed defaults (50051…).
    base_ports: Mapping[str, int] | None = None
    metrics: bool = False
    log_dir: Path | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    # Folders inputs may be read from, besides DEEP3M_INPUT_ROOTS, the packaged
    # sample and the folder `deep3m up` was started in (a laptop user's own data).
    input_roots: tuple[str, ...] = ()


class LocalCluster:
    """Start, health-check and stop the role processes of one local deployment."""

    def __init__(self, spec: LocalClusterSpec) -> None:
        self.spec = spec
        self.store_url = normalize_url(spec.store_url)
        self.ports: dict[str, int] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    @property
    def scheduler_address(self) -> str:
        return f"127.0.0.1:{self.ports['scheduler']}"

    def address(self, role: str) -> str:
        return f"127.0.0.1:{self.ports[role]}"

    def _port_for(self, role: str, free: bool) -> int:
        if self.spec.base_ports is not None and role in self.spec.base_ports:
            return self.spec.base_ports[role] or free_port()
        return free_port() if free else DEFAULT_PORTS[role]

    def start(self, *, free_ports: bool = False, timeout_s: float = 120.0) -> None:
        for role in self.spec.roles:
            self.ports[role] = self._port_for(role, free_ports)
        if "scheduler" not in self.ports:
            self.ports["scheduler"] = DEFAULT_PORTS["scheduler"]
        log_dir = self.spec.log_dir
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
        # The scheduler first: workers start pulling from it as soon as they are up.
        # Training and inference may compute at once on one machine; torch's
        # spinning thread pools slow down badly when oversubscribed, so each
        # process gets half the cores unless told otherwise.
        given = Settings()
        torch_threads = given.torch_threads or max(1, (os.cpu_count() or 2) // 2)
        # ...and compute roles take as many tasks at once as those threads fill
        # the cores, so one member or block does not leave cores idle.
        compute_capacity = (
            given.worker_capacity
            if "worker_capacity" in given.model_fields_set
            else max(1, (os.cpu_count() or 2) // torch_threads)
        )
        for role in self.spec.roles:
            env = {
                **os.environ,
                "DEEP3M_TORCH_THREADS": str(torch_threads),
                **(
                    {"DEEP3M_WORKER_CAPACITY": str(compute_capacity)}
                    if role in ("training", "inference")
                    else {}
                ),
                # Inputs are confined to the roots: the operator's, the spec's, the
                # packaged sample and the working folder.
                "DEEP3M_INPUT_ROOTS": ",".join(
                    dict.fromkeys(
                        (*given.input_roots, *self.spec.input_roots, SAMPLE_ROOT, os.getcwd())
                    )
                ),
                **self.spec.extra_env,
                "DEEP3M_STORE_URL": self.store_url,
                "DEEP3M_GRPC_PORT": str(self.ports[role]),
                "DEEP3M_HOST": "127.0.0.1",
                "DEEP3M_METRICS_PORT": str(free_port() if self.spec.metrics else 0),
                "DEEP3M_SCHEDULER_ADDRESS": self.scheduler_address,
                "DEEP3M_WORKER_ID": f"local-{role}",
                "DEEP3M_LOG_FORMAT": "json",
            }
            out: IO[bytes] | int = subprocess.DEVNULL
            if log_dir is not None:
                handle = open(log_dir / f"{role}.log", "ab")  # noqa: SIM115 - closed in stop()
                self._logs.append(handle)
                out = handle
            self.processes[role] = subprocess.Popen(
                [sys.executable, "-m", "deep3m.client.cli", "serve", role],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            for role in self.spec.roles:
                self.wait_serving(role, timeout_s)
        except BaseException:
            self.stop()
            raise

    def wait_serving(self, role: str, timeout_s: float) -> None:
        log = f"{self.spec.log_dir}/{role}.log" if self.spec.log_dir else ""
        wait_serving(self.address(role), self.processes[role], timeout_s, role, log=log)

    def running(self) -> dict[str, bool]:
        return {role: proc.poll() is None for role, proc in self.processes.items()}

    def stop(self, grace_s: float = 20.0) -> dict[str, int | None]:
        """SIGTERM every role (workers first, scheduler last) and wait for them."""
        order: Sequence[str] = [r for r in self.processes if r != "scheduler"] + (
            ["scheduler"] if "scheduler" in self.processes else []
        )
        for role in order:
            proc = self.processes[role]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for role in order:
            proc = self.processes[role]
            try:
                codes[role] = proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[role] = proc.wait()
        for handle in self._logs:
            handle.close()
        self._logs.clear()
        return codes

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
