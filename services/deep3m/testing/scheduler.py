"""Scheduler test support: small volumes, models and jobs, and a scheduler process.

``SchedulerProcess`` runs ``deep3m serve scheduler`` as a real subprocess on a
fixed loopback port, so tests can kill it (SIGKILL) and start it again on the
same address. ``roles_in_process`` runs a scheduler and some worker roles as
real gRPC servers inside the test process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deep3m.core.errors import UnavailableError
from deep3m.core.events import ProgressEvent
from deep3m.core.geometry import Box, grid_cells
from deep3m.core.store import Store
from deep3m.launcher.local import free_port, wait_serving
from deep3m.runtime.server import RunningServer, create_server
from deep3m.runtime.settings import Settings
from deep3m.runtime.task import CHUNKS_WRITTEN
from deep3m.v1 import common_pb2

if TYPE_CHECKING:
    from deep3m.scheduler.core import Scheduler


def write_volume(
    store: Store,
    path: str,
    data: np.ndarray,
    *,
    chunk_shape: tuple[int, int, int] = (4, 32, 32),
    complete: bool = True,
) -> None:
    """A complete OME-Zarr volume holding ``data``."""
    arr = store.create_volume(
        path, data.shape, data.dtype, chunk_shape=chunk_shape, voxel_size_nm=(40.0, 6.0, 6.0)
    )
    arr[...] = data
    if complete:
        store.mark_complete(path)


def save_test_model(
    store: Store,
    model_id: str = "test-model",
    members: Mapping[str, int] | None = None,
    halo: tuple[int, int, int] = (2, 8, 8),
) -> None:
    """A model card (no weights): enough for the scheduler to validate a predict job."""
    from deep3m.models.card import MemberCard, ModelCard, save_card

    frames = dict(members or {"1fm": 1})
    card = ModelCard(
        id=model_id,
        halo=halo,
        members=tuple(MemberCard(name=n, frames=f) for n, f in frames.items()),
    )
    save_card(store, card)


def save_random_model(
    store: Store,
    model_id: str,
    *,
    frames: int = 3,
    halo: tuple[int, int, int] = (1, 32, 32),
    width: float = 0.0625,
) -> None:
    """A tiny untrained DeepEM3D model with one ``<frames>fm`` member, weights included."""
    from deep3m.models.card import MemberCard, ModelCard, save_model
    from deep3m.models.registry import build_network

    net = build_network("deepem3d", frames=frames, width=width)
    member = f"{frames}fm"
    card = ModelCard(
        id=model_id, width=width, halo=halo, members=(MemberCard(name=member, frames=frames),)
    )
    save_model(store, card, {member: net.state_dict()})


def predict_spec(
    output: str,
    *,
    block_shape: Sequence[int],
    model: str = "m1",
    input_path: str = "volumes/in.zarr",
    halo: Sequence[int] = (0, 4, 4),
    max_attempts: int = 0,
) -> common_pb2.JobSpec:
    """A predict job over ``input_path`` into ``output`` (all in the default store)."""
    return common_pb2.JobSpec(
        predict=common_pb2.PredictSpec(
            input=common_pb2.VolumeRef(path=input_path),
            model=model,
            output=common_pb2.VolumeRef(path=output),
            block_shape=list(block_shape),
            halo=list(halo),
        ),
        max_attempts=max_attempts,
    )


def wait_terminal(scheduler: Scheduler, job_id: str) -> ProgressEvent:
    """The terminal event of a job of an in-process scheduler (waits on its event stream)."""
    first, sub = scheduler.watch(job_id)
    if sub is None:
        return first
    try:
        for event in sub:
            if event.terminal:
                return event
    finally:
        sub.close()
    raise AssertionError(f"the event stream of {job_id} ended early")


def double_block(store: Store, lease: common_pb2.TaskLease) -> float:
    """What the scheduler tests' predict handlers do: output core = 2 × input core.

    Returns the voxels written.
    """
    core = lease.task.block.core
    box = Box(tuple(core.start), tuple(core.stop))
    spec = lease.spec.predict
    source = store.open_volume(spec.input.path)
    target = store.open_volume(spec.output.path, mode="r+", require_complete=False)
    target[box.slices()] = np.asarray(source[box.slices()], np.float32) * 2
    return float(box.size)


def lease_cells(lease: common_pb2.TaskLease) -> float:
    """Output chunks (write-grid cells) the leased predict block owns."""
    core = lease.task.block.core
    return float(grid_cells(Box(tuple(core.start), tuple(core.stop)), lease.volumes["output"].grid))


def double_block_metrics(store: Store, lease: common_pb2.TaskLease) -> dict[str, float]:
    """``double_block``, reported as a predict task's completion metrics."""
    return {"voxels": double_block(store, lease), CHUNKS_WRITTEN: lease_cells(lease)}


def completion_records(store: Store, job_id: str, stage: str) -> dict[str, dict[str, Any]]:
    """Task id → the completion record of each done task of ``stage``, whether it was
    stored alone or in a batch document."""
    prefix = f"jobs/{job_id}/done/{stage}"
    out: dict[str, dict[str, Any]] = {}
    for name in store.list(prefix):
        doc = json.loads(store.read_bytes(f"{prefix}/{name}"))
        for record in doc["records"].values() if "records" in doc else [doc]:
            out[str(record["task_id"])] = dict(record)
    return out


def serve_scheduler(settings: Settings, data: np.ndarray) -> RunningServer:
    """A scheduler server on a loopback port over a store holding ``volumes/in.zarr``
    (``data``) and the model ``m1``; the caller stops it."""
    from deep3m.scheduler.app import SchedulerApp
    from deep3m.scheduler.core import Scheduler

    store = Store(settings.store_url)
    write_volume(store, "volumes/in.zarr", data)
    save_test_model(store, "m1")
    scheduler = Scheduler(settings)  # recovered by the app, once it holds the store's fence
    return create_server(
        "scheduler", settings, app=SchedulerApp(settings, scheduler), port=0, host="127.0.0.1"
    )


@dataclass
class SchedulerProcess:
    """``deep3m serve scheduler`` on 127.0.0.1:``port`` over ``store_url`` (``env`` adds
    settings, e.g. S3 credentials)."""

    store_url: str
    port: int
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        self.spawn()
        self.wait_serving(timeout_s)

    def spawn(self) -> None:
        """Start the process without waiting for it to serve."""
        env = {
            **os.environ,
            "DEEP3M_STORE_URL": self.store_url,
            "DEEP3M_GRPC_PORT": str(self.port),
            "DEEP3M_HOST": "127.0.0.1",
            "DEEP3M_METRICS_PORT": "0",
            "DEEP3M_LOG_FORMAT": "json",
            **self.env,
        }
        deep3m = Path(sys.executable).with_name("deep3m")
        command = [str(deep3m)] if deep3m.exists() else [sys.executable, "-m", "deep3m.client.cli"]
        log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                [*command, "serve", "scheduler"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    def wait_exit(self, timeout_s: float) -> int:
        """The exit status, once the process has ended by itself."""
        if self.process is None:
            raise UnavailableError("the scheduler was never started")
        return self.process.wait(timeout=timeout_s)

    def health(self, timeout_s: float = 30.0) -> int:
        """The server's health status now (waiting for its port to answer)."""
        with grpc.insecure_channel(self.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s, wait_for_ready=True
            )
        return int(reply.status)

    def wait_serving(self, timeout_s: float) -> None:
        """Until health says SERVING; the process is killed if it does not get there."""
        if self.process is None:
            raise UnavailableError("the scheduler was never started")
        try:
            wait_serving(self.address, self.process, timeout_s, "scheduler", log=str(self.log_path))
        except UnavailableError:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when a node dies."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def terminate(self, timeout_s: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextlib.contextmanager
def roles_in_process(store_url: str, *roles: str, **settings: object) -> Iterator[str]:
    """A scheduler and ``roles``' servers (with their workers) on loopback; yields its address.

    Workers poll fast (50 ms); ``settings`` override any field, e.g. a short
    ``lease_seconds`` so that progress, which rides on lease renewals, comes often.
    """
    port = free_port()
    values: dict[str, object] = {
        "store_url": store_url,
        "device": "cpu",
        "metrics_port": 0,
        "scheduler_address": f"127.0.0.1:{port}",
        "poll_interval_seconds": 0.05,
        **settings,
    }
    config = Settings(**values)  # type: ignore[arg-type]
    scheduler = create_server("scheduler", config, port=port, host="127.0.0.1")
    servers = []
    try:
        for role in roles:
            servers.append(create_server(role, config, port=0, host="127.0.0.1"))
        yield scheduler.address
    finally:
        for server in servers:
            server.stop(grace=5.0)
        scheduler.stop(grace=1.0)
