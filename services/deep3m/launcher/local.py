"""The embedded deployment: every role as its own process on localhost.

``deep3m up`` runs the scheduler and one worker of each role exactly as the
Helm chart runs them on Kubernetes — the same ``deep3m serve <role>`` command,
configured through the same ``DEEP3M_*`` variables — with a ``file://`` store.

``LocalCluster.supervise`` plays the part of the kubelet: a role that exits is
started again on its port after a backoff. Each role runs in its own process
group and dies with the launcher (``lifeline``). Ports are checked before any
role starts, so a busy one is named instead of surfacing as a role that exits.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deep3m.core.errors import Deep3mError, FailedPreconditionError, UnavailableError
from deep3m.core.retry import Backoff
from deep3m.core.store import normalize_url
from deep3m.launcher.lifeline import Watchdog, parent_death_hook
from deep3m.runtime.channel import ChannelSecurity, open_channel
from deep3m.runtime.credentials import Credentials
from deep3m.runtime.settings import DEFAULT_PORTS, ROLES, Settings

DEFAULT_STORE = "./deep3m-data"
SAMPLE_ROOT = "file://" + str(Path(__file__).resolve().parents[1] / "data")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def compute_environment(role: str, given: Settings, cpus: int) -> dict[str, str]:
    """``DEEP3M_TORCH_THREADS`` (and, for compute roles, ``DEEP3M_WORKER_CAPACITY``)
    for ``role`` on a machine of ``cpus`` cores, unless the operator set them.

    Training and inference may compute at once on one machine, and torch's spinning
    thread pools slow down badly when oversubscribed, so each process gets half the
    cores; compute roles take as many tasks at once as those threads fill the cores.
    For inference that is blocks side by side on few threads each rather than one
    block on every core: intra-op threads scale below linearly on these small
    convolutions (``python -m bench pipeline`` on 2 cores: 3 blocks took 15.1 s one
    at a time on 2 threads, 15.8 s end to end two at a time on 1 thread each, i.e.
    ~1.3x the throughput in steady state), at the price of an idle core while the
    last block of a job computes alone.
    """
    threads = given.torch_threads or max(1, cpus // 2)
    env = {"DEEP3M_TORCH_THREADS": str(threads)}
    if role in ("training", "inference"):
        capacity = (
            given.worker_capacity
            if "worker_capacity" in given.model_fields_set
            else max(1, cpus // threads)
        )
        env["DEEP3M_WORKER_CAPACITY"] = str(capacity)
    return env


def wait_serving(
    address: str,
    proc: subprocess.Popen[bytes],
    timeout_s: float,
    role: str,
    *,
    log: str = "",
    on_exit: Callable[[int], None] | None = None,
    security: ChannelSecurity | None = None,
) -> None:
    """Until the server of ``proc`` at ``address`` reports SERVING; UnavailableError
    naming ``role`` when it exits first or ``timeout_s`` passes (``on_exit``, given the
    exit code, may raise a better error first). ``security``: TLS to a TLS port."""

    def exited(code: int) -> None:
        if on_exit is not None:
            on_exit(code)
        raise UnavailableError(
            f"the {role} process exited with code {code} during start-up"
            + (f"; see {log}" if log else ""),
            field=role,
        )

    deadline = time.monotonic() + timeout_s
    with open_channel(address, security, options=()) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                exited(proc.returncode)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UnavailableError(
                    f"the {role} server did not become ready at {address} in {timeout_s:.0f} s",
                    field=role,
                )
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=""),
                    timeout=min(2.0, remaining),
                    wait_for_ready=True,
                )
                # SERVING from our own process only: a listener left by another
                # launcher may answer too, but then ours exits unable to bind.
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    if proc.poll() is not None:
                        exited(proc.returncode)
                    return
            except grpc.RpcError:
                pass
            # Not ready yet: the next Check blocks on the channel, so this loop
            # does not spin; a short pause avoids hammering a starting server.
            time.sleep(0.1)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on ``host:port`` (a socket in TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like gRPC's own listener: SO_REUSEADDR, so only a live listener conflicts.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1)
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


class PortInUseError(FailedPreconditionError):
    """A port a role is to listen on is already taken; ``ports`` names them."""

    def __init__(self, ports: Mapping[str, int]) -> None:
        listed = ", ".join(f"{port} ({role})" for role, port in ports.items())
        super().__init__(
            f"port {listed} already in use on 127.0.0.1 — another `deep3m up`, or roles "
            "left running by one, may hold it; stop them or choose other ports "
            "(--port ROLE=N, 0 for any free port)",
            field="port",
        )
        self.ports = dict(ports)


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
    # Tokens and mutual TLS on every role (runtime.credentials); None: neither.
    credentials: Credentials | None = None


class LocalCluster:
    """Start, health-check, restart and stop the role processes of one local deployment.

    Start and restart roles from one long-lived thread: on Linux a role's
    parent-death signal follows the thread that started it.
    """

    def __init__(self, spec: LocalClusterSpec) -> None:
        self.spec = spec
        self.store_url = normalize_url(spec.store_url)
        self.ports: dict[str, int] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts: dict[str, int] = {}
        self._logs: dict[str, IO[bytes]] = {}
        self._envs: dict[str, dict[str, str]] = {}
        self._preexec = parent_death_hook()
        self._watchdog: Watchdog | None = None

    @property
    def scheduler_address(self) -> str:
        return f"127.0.0.1:{self.ports['scheduler']}"

    def environment(self, role: str) -> Mapping[str, str]:
        """The environment ``role`` was (or will be) started with, once ``start`` ran."""
        return dict(self._envs.get(role, {}))

    def address(self, role: str) -> str:
        return f"127.0.0.1:{self.ports[role]}"

    def _port_for(self, role: str, free: bool) -> int:
        if self.spec.base_ports is not None and role in self.spec.base_ports:
            return self.spec.base_ports[role] or free_port()
        return free_port() if free else DEFAULT_PORTS[role]

    def check_ports(self, roles: Sequence[str]) -> None:
        """PortInUseError naming every busy port of ``roles``."""
        busy = {role: self.ports[role] for role in roles if port_in_use(self.ports[role])}
        if busy:
            raise PortInUseError(busy)

    def start(self, *, free_ports: bool = False, timeout_s: float = 120.0) -> None:
        for role in self.spec.roles:
            self.ports[role] = self._port_for(role, free_ports)
        if "scheduler" not in self.ports:
            self.ports["scheduler"] = DEFAULT_PORTS["scheduler"]
        self.check_ports(self.spec.roles)
        log_dir = self.spec.log_dir
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
        given = Settings()
        for role in self.spec.roles:
            self._envs[role] = {
                **os.environ,
                **compute_environment(role, given, os.cpu_count() or 2),
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
                **self._security_env(role),
            }
            if log_dir is not None:
                self._logs[role] = open(log_dir / f"{role}.log", "ab")  # noqa: SIM115 - closed in stop()
            self.restarts[role] = 0
        if self._preexec is None:
            self._watchdog = Watchdog()
        try:
            # The scheduler first: workers start pulling from it as soon as they are up.
            for role in self.spec.roles:
                self._spawn(role)
            for role in self.spec.roles:
                self.wait_serving(role, timeout_s)
        except BaseException:
            self.stop()
            raise

    def _security_env(self, role: str) -> dict[str, str]:
        creds = self.spec.credentials
        if creds is None:
            return {}
        # The scheduler calls no one; every other role's worker presents its role's token.
        return creds.server_env() if role == "scheduler" else creds.worker_env(role)

    @property
    def security(self) -> ChannelSecurity | None:
        """How a client on this machine reaches the roles (None: plaintext, no token)."""
        creds = self.spec.credentials
        return None if creds is None else creds.client_security()

    def _spawn(self, role: str) -> None:
        self.processes[role] = subprocess.Popen(
            [sys.executable, "-m", "deep3m.client.cli", "serve", role],
            env=self._envs[role],
            stdout=self._logs.get(role, subprocess.DEVNULL),
            stderr=subprocess.STDOUT,
            # Its own process group: Ctrl-C reaches the launcher, which stops roles in order.
            start_new_session=True,
            # Only prctl runs between fork and exec, resolved beforehand.
            preexec_fn=self._preexec,
        )
        if self._watchdog is not None:
            self._watchdog.track(self.processes[role].pid)

    def restart(self, role: str, timeout_s: float = 120.0) -> None:
        """Start ``role`` again on its port (it must have exited) and wait until it serves."""
        if self.processes[role].poll() is None:
            raise FailedPreconditionError(f"the {role} process is still running", field=role)
        self.check_ports([role])
        self._spawn(role)
        self.restarts[role] += 1
        self.wait_serving(role, timeout_s)

    def wait_serving(self, role: str, timeout_s: float) -> None:
        log = f"{self.spec.log_dir}/{role}.log" if self.spec.log_dir else ""
        wait_serving(
            self.address(role),
            self.processes[role],
            timeout_s,
            role,
            log=log,
            on_exit=lambda code: self._exited_during_start(role, code),
            security=self.security,
        )

    def _exited_during_start(self, role: str, code: int) -> None:
        port = self.ports[role]
        if port_in_use(port):
            raise PortInUseError({role: port})
        raise UnavailableError(
            f"the {role} process (port {port}) exited with code {code} during start-up"
            + (f"; see {self.spec.log_dir}/{role}.log" if self.spec.log_dir else ""),
            field=role,
        )

    def running(self) -> dict[str, bool]:
        return {role: proc.poll() is None for role, proc in self.processes.items()}

    def supervise(
        self,
        stop: threading.Event,
        report: Callable[[str], None],
        *,
        poll_s: float = 0.5,
        initial_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        healthy_after_s: float = 60.0,
        max_failed_starts: int = 5,
        start_timeout_s: float = 120.0,
    ) -> None:
        """Restart exited roles with backoff, telling ``report``, until ``stop`` is set.

        A role's backoff resets once it has served for ``healthy_after_s``. Raises
        PortInUseError when a role's port was taken meanwhile, and the start-up
        error once a role failed to start ``max_failed_starts`` times in a row.
        """
        backoff = {
            r: Backoff(initial_s=initial_backoff_s, max_s=max_backoff_s) for r in self.processes
        }
        since = dict.fromkeys(self.processes, time.monotonic())
        failed = dict.fromkeys(self.processes, 0)
        due: dict[str, float] = {}
        while not stop.wait(poll_s):
            now = time.monotonic()
            for role, proc in self.processes.items():
                if role in due:
                    continue
                if proc.poll() is None:
                    if now - since[role] >= healthy_after_s:
                        backoff[role].reset()
                    continue
                delay = backoff[role].next_delay()
                due[role] = now + delay
                report(f"{role} exited with code {proc.returncode}; restarting in {delay:.1f} s")
            for role, at in sorted(due.items(), key=lambda item: item[1]):
                if at > time.monotonic() or stop.is_set():
                    continue
                del due[role]
                try:
                    self.restart(role, start_timeout_s)
                except PortInUseError:
                    raise
                except Deep3mError as exc:
                    failed[role] += 1
                    if failed[role] >= max_failed_starts:
                        raise
                    report(f"{role} failed to start: {exc.message}")
                    continue
                failed[role] = 0
                since[role] = time.monotonic()
                report(
                    f"{role} restarted (pid {self.processes[role].pid}, "
                    f"restart {self.restarts[role]})"
                )

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
        for handle in self._logs.values():
            handle.close()
        self._logs.clear()
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None
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
