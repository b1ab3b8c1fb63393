"""`deep3m up` as a user runs it: a real supervising process and real role processes.

Covers: a role killed with SIGKILL is restarted on its port and a job completes;
`up` killed with SIGKILL takes every role with it; a busy port (even one whose
holder answers health checks) stops `up` with a non-zero exit naming the port;
`deep3m watch` outlives a scheduler restart and follows the job to its end; a
restart onto a port taken meanwhile is refused by number.
Every port is chosen free; every wait is on a condition with a deadline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
import pytest
import tifffile
from deep3m.client.client import Deep3mClient
from deep3m.client.progress import RESUMED
from deep3m.core.errors import PermissionDeniedError, UnauthenticatedError, UnavailableError
from deep3m.core.store import Store
from deep3m.launcher.local import LocalCluster, LocalClusterSpec, PortInUseError, free_port
from deep3m.launcher.state import local_security
from deep3m.runtime.scheduler_client import GrpcSchedulerClient
from deep3m.runtime.settings import Settings
from deep3m.testing.processes import alive, wait_gone
from deep3m.v1 import common_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "deep3m.client.cli"]


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DEEP3M_")}
    # Short leases and polls so a restarted role picks work up quickly; the
    # credentials and running record of `up` stay in the test's folder.
    env.update(
        DEEP3M_LEASE_SECONDS="4",
        DEEP3M_POLL_INTERVAL_SECONDS="0.2",
        DEEP3M_RETRY_BACKOFF_SECONDS="0.2",
        DEEP3M_STATE_DIR=str(root / "state"),
    )
    return env


class Lines:
    """A pipe read line by line on a thread, so tests can wait for a line with a deadline."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[bytes]) -> None:
        for raw in pipe:
            self._new.put(raw.decode(errors="replace").rstrip("\n"))
        pipe.close()
        self._new.put(None)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match[str]:
        """The first line (seen or to come) matching ``pattern``."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        while True:
            for line in self.lines[seen:]:
                found = re.search(pattern, line)
                if found:
                    return found
            seen = len(self.lines)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r} in {timeout_s} s: {self.lines}")
            try:
                got = self._new.get(timeout=remaining)
            except queue.Empty:
                continue
            if got is None:
                self._new.put(None)
                raise AssertionError(f"stream ended without {pattern!r}: {self.lines}")
            self.lines.append(got)

    def rest(self, timeout_s: float = 10.0) -> str:
        """Everything, once the stream has ended."""
        self._thread.join(timeout_s)
        while not self._new.empty():
            line = self._new.get()
            if line is not None:
                self.lines.append(line)
        return "\n".join(self.lines)


class Up:
    """``deep3m --output json up`` on free ports, with its summary and both output streams."""

    def __init__(
        self, root: Path, roles: str = "scheduler,tiling", extra: tuple[str, ...] = ()
    ) -> None:
        self.store = root / "store"
        self.env = _env(root)
        ports = [a for r in roles.split(",") for a in ("--port", f"{r}=0")]
        self.proc = subprocess.Popen(
            [
                *CLI,
                "--output",
                "json",
                "up",
                "--store",
                str(self.store),
                "--log-dir",
                str(root / "logs"),
                "--roles",
                roles,
                *ports,
                *extra,
            ],
            env=self.env,
            # Started in the folder holding the test's data: `up` reads inputs from there.
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.out = Lines(self.proc.stdout)
        self.err = Lines(self.proc.stderr)
        summary = json.loads(self.out.wait_for(r"^\{.*\}$", 180).group(0))
        self.roles: dict[str, Any] = summary["roles"]
        self.security_summary: dict[str, Any] | None = summary["security"]
        # What the CLI on this machine finds for the scheduler's address.
        self.security = local_security(
            self.scheduler, Settings(state_dir=self.env["DEEP3M_STATE_DIR"])
        )

    def client(self, **kwargs: Any) -> Deep3mClient:
        return Deep3mClient(self.scheduler, security=self.security, **kwargs)

    def pid(self, role: str) -> int:
        return int(self.roles[role]["pid"])

    @property
    def scheduler(self) -> str:
        return str(self.roles["scheduler"]["address"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.rest()
        self.err.rest()


@pytest.fixture()
def up(tmp_path: Path) -> Iterator[Up]:
    running = Up(tmp_path)
    try:
        yield running
    finally:
        running.close()


def _stack(tmp_path: Path) -> tuple[Path, np.ndarray]:
    data = np.random.default_rng(0).integers(0, 255, size=(4, 64, 64), dtype=np.uint8)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    return path, data


def test_killed_role_is_restarted_and_a_job_completes(up: Up, tmp_path: Path) -> None:
    victim = up.pid("tiling")
    os.kill(victim, signal.SIGKILL)
    up.err.wait_for(r"tiling exited with code -9; restarting in [0-9.]+ s", 30)
    restarted = int(up.err.wait_for(r"tiling restarted \(pid (\d+), restart 1\)", 120).group(1))
    assert restarted != victim and alive(restarted)
    assert up.proc.poll() is None

    source, data = _stack(tmp_path)
    with up.client() as client:
        job = client.ingest(str(source), "volumes/after-restart.zarr", voxel_size_nm=[40, 6, 6])
        final = client.wait(job.id, 120)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, list(final.errors)
    got = np.asarray(Store(f"file://{up.store}").open_volume("volumes/after-restart.zarr")[:])
    np.testing.assert_array_equal(got, data)


def test_watch_survives_a_scheduler_restart(up: Up, tmp_path: Path) -> None:
    source, data = _stack(tmp_path)
    # Hold the worker so the job is still running when the scheduler dies.
    tiling = up.pid("tiling")
    os.kill(tiling, signal.SIGSTOP)
    try:
        with up.client() as client:
            job = client.ingest(str(source), "volumes/watched.zarr", voxel_size_nm=[40, 6, 6])
        watch = subprocess.Popen(
            [*CLI, "--output", "json", "--scheduler", up.scheduler, "watch", job.id],
            env=up.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert watch.stdout is not None and watch.stderr is not None
        watch_out, watch_err = Lines(watch.stdout), Lines(watch.stderr)
        watch_out.wait_for(r'"event": "progress"', 60)
        os.kill(up.pid("scheduler"), signal.SIGKILL)
        up.err.wait_for(r"scheduler exited with code -9", 30)
        up.err.wait_for(r"scheduler restarted", 120)
    finally:
        os.kill(tiling, signal.SIGCONT)
    try:
        assert watch.wait(timeout=180) == 0, watch_err.rest()
    finally:
        if watch.poll() is None:
            watch.kill()
    assert RESUMED in watch_err.rest()
    records = [json.loads(line) for line in watch_out.rest().splitlines()]
    assert {"event": "resumed", "job_id": job.id} in records
    assert records[-1]["state"] == "JOB_STATE_SUCCEEDED"
    assert "Stream removed" not in "\n".join(watch_err.lines)
    got = np.asarray(Store(f"file://{up.store}").open_volume("volumes/watched.zarr")[:])
    np.testing.assert_array_equal(got, data)


def test_up_turns_tokens_and_mutual_tls_on_and_the_cli_picks_them_up(
    up: Up, tmp_path: Path
) -> None:
    assert up.security_summary is not None and up.security_summary["tls"] == "mutual"
    creds = Path(up.security_summary["credentials"])
    assert creds == tmp_path / "state" / "credentials"
    for private in (tmp_path / "state", creds, creds / "tokens"):
        assert private.stat().st_mode & 0o777 == 0o700, private
    for secret in (creds / "key.pem", *sorted((creds / "tokens").iterdir())):
        assert secret.stat().st_mode & 0o077 == 0, secret
    assert up.security is not None and up.security.token and up.security.tls

    # Plaintext, and TLS without a token, get nowhere.
    with Deep3mClient(up.scheduler, timeout_s=10) as plain, pytest.raises(UnavailableError):
        plain.jobs()
    anonymous = dataclasses.replace(up.security, token="")
    with (
        Deep3mClient(up.scheduler, timeout_s=10, security=anonymous) as nobody,
        pytest.raises(UnauthenticatedError),
    ):
        nobody.jobs()
    # The client token submits, but cannot pose as a worker.
    source, data = _stack(tmp_path)
    with up.client(timeout_s=10) as client:
        job = client.ingest(str(source), "volumes/secured.zarr", voxel_size_nm=[40, 6, 6])
    sneaky = GrpcSchedulerClient(up.scheduler, security=up.security)
    try:
        with pytest.raises(PermissionDeniedError, match="may not call LeaseTasks"):
            sneaky.lease("sneaky", "tiling", 1, 5.0, timeout=10)
    finally:
        sneaky.close()

    # The CLI, given only the address, uses the credentials of the `up` serving it;
    # the tiling worker runs the jobs over mutual TLS with its own token.
    cli = [*CLI, "--output", "json", "--scheduler", up.scheduler, "--timeout", "30"]
    ingested = subprocess.run(
        [*cli, "ingest", str(source), "--output", "volumes/by-cli.zarr", "--voxel-size-nm",
         "40,6,6"],
        env=up.env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert ingested.returncode == 0, ingested.stdout + ingested.stderr
    with up.client(timeout_s=10) as client:
        assert client.wait(job.id, 120).state == common_pb2.JOB_STATE_SUCCEEDED
    for name in ("secured", "by-cli"):
        got = np.asarray(Store(f"file://{up.store}").open_volume(f"volumes/{name}.zarr")[:])
        np.testing.assert_array_equal(got, data)
    doctor = subprocess.run(
        [*cli, "doctor", "--address", up.roles["tiling"]["address"]],
        env=up.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    # Explicit options win: a wrong token is refused, not replaced by the local one.
    forged = subprocess.run(
        [*cli, "--token", "forged", "jobs"], env=up.env, capture_output=True, text=True, timeout=60
    )
    assert forged.returncode != 0 and "token" in forged.stdout + forged.stderr

    up.close()
    assert list((tmp_path / "state" / "running").iterdir()) == []
    assert local_security(up.scheduler, Settings(state_dir=str(tmp_path / "state"))) is None


def test_roles_die_with_up(tmp_path: Path) -> None:
    running = Up(tmp_path, extra=("--insecure",))
    try:
        assert running.security_summary is None and running.security is None
        with Deep3mClient(running.scheduler, timeout_s=10) as plain:
            assert plain.jobs() == []  # --insecure: plaintext, no token
        pids = [running.pid(r) for r in running.roles]
        assert all(alive(p) for p in pids)
        running.proc.send_signal(signal.SIGKILL)
        assert running.proc.wait(timeout=30) == -signal.SIGKILL
        assert wait_gone(pids, 60) == []
    finally:
        running.close()


@pytest.fixture()
def health_server() -> Iterator[int]:
    """What a role left running looks like from outside: a port that answers health."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0).wait()


def test_busy_port_is_named_and_up_fails(tmp_path: Path, health_server: int) -> None:
    free = free_port()
    result = subprocess.run(
        [
            *CLI,
            "up",
            "--store",
            str(tmp_path / "store"),
            "--log-dir",
            str(tmp_path / "logs"),
            "--roles",
            "scheduler,tiling",
            "--port",
            f"scheduler={health_server}",
            "--port",
            f"tiling={free}",
        ],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert str(health_server) in result.stderr and "in use" in result.stderr
    assert "deep3m is up" not in result.stdout


def test_restart_onto_a_port_taken_meanwhile_is_refused_by_number(tmp_path: Path) -> None:
    spec = LocalClusterSpec(
        store_url=str(tmp_path / "store"), roles=("scheduler",), log_dir=tmp_path / "logs"
    )
    reports: list[str] = []
    with LocalCluster(spec) as cluster:
        cluster.start(free_ports=True, timeout_s=120)
        port = cluster.ports["scheduler"]
        cluster.processes["scheduler"].kill()
        cluster.processes["scheduler"].wait(timeout=30)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
            squatter.bind(("127.0.0.1", port))
            squatter.listen(1)
            with pytest.raises(PortInUseError) as caught:
                cluster.supervise(threading.Event(), reports.append, poll_s=0.05)
    assert caught.value.ports == {"scheduler": port} and str(port) in caught.value.message
    assert reports and reports[0].startswith("scheduler exited with code -9; restarting in")
