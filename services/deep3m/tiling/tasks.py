"""Ingest tasks leased from the scheduler: ``ingest`` (one z-range) and ``finalize``.

The scheduler plans an ingest job with :func:`deep3m.core.ingest.plan_ingest`
and creates the (incomplete) volume with
:func:`deep3m.core.ingest.create_ingest_volume`; each ``ingest`` task then
writes its z-range (params ``z_start``, ``z_stop``) and the single ``finalize``
task marks the volume complete once every range is done.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Protocol

import numpy as np

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.ingest import finalize_ingest, ingest_range
from deep3m.runtime.metrics import INGEST_BYTES
from deep3m.runtime.settings import Settings
from deep3m.tiling.operations import TilingOperations
from deep3m.v1 import common_pb2

if TYPE_CHECKING:
    from deep3m.runtime.worker import TaskResult


class IngestContext(Protocol):
    """What an ingest task needs from the worker's task context."""

    @property
    def lease(self) -> common_pb2.TaskLease: ...

    @property
    def cancelled(self) -> threading.Event: ...


def _ingest_spec(lease: common_pb2.TaskLease) -> common_pb2.IngestSpec:
    kind = lease.spec.WhichOneof("kind")
    if kind != "ingest":
        raise InvalidArgumentError(
            f"task {lease.task.id!r} of stage {lease.task.stage!r} carries a "
            f"{kind or 'empty'} job spec, not an ingest spec",
            field="spec",
        )
    return lease.spec.ingest


def _int_param(task: common_pb2.Task, name: str) -> int:
    text = task.params.get(name, "")
    try:
        return int(text)
    except ValueError as exc:
        raise InvalidArgumentError(
            f"task {task.id!r}: parameter {name} must be an integer, got {text!r}",
            field=f"task.params.{name}",
        ) from exc


class IngestTaskHandlers:
    """The tiling worker's task handlers, bound to one process's settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ops = TilingOperations(settings)

    def run_ingest_range(
        self, lease: common_pb2.TaskLease, *, cancelled: threading.Event | None = None
    ) -> dict[str, float]:
        """Write one z-range of the ingest job's volume; returns task metrics."""
        started = time.perf_counter()
        spec = _ingest_spec(lease)
        z_start = _int_param(lease.task, "z_start")
        z_stop = _int_param(lease.task, "z_stop")
        source = self.ops.check_source(spec.source)
        store, key = self.ops.roots.resolve(
            spec.output.store_url, spec.output.path, field="spec.output"
        )
        written = ingest_range(
            source,
            store,
            key,
            z_start,
            z_stop,
            cancelled=cancelled,
            storage_options=self.settings.storage_options(),
        )
        INGEST_BYTES.inc(written)
        info = store.volume_info(key)
        return {
            # "voxels" is what the scheduler sums into the job's voxels/s.
            "voxels": float(written // np.dtype(info.dtype).itemsize),
            "bytes": float(written),
            "slices": float(z_stop - z_start),
            "seconds": time.perf_counter() - started,
        }

    def run_finalize(self, lease: common_pb2.TaskLease) -> dict[str, str]:
        """Mark the volume complete; returns the job outputs."""
        spec = _ingest_spec(lease)
        store, key = self.ops.roots.resolve(
            spec.output.store_url, spec.output.path, field="spec.output"
        )
        finalize_ingest(store, key, source=spec.source)
        return {"volume": store.key_url(key)}

    def ingest_range(self, ctx: IngestContext) -> TaskResult:
        from deep3m.runtime.worker import TaskResult

        return TaskResult(metrics=self.run_ingest_range(ctx.lease, cancelled=ctx.cancelled))

    def finalize(self, ctx: IngestContext) -> TaskResult:
        from deep3m.runtime.worker import TaskResult

        return TaskResult(metrics={}, outputs=self.run_finalize(ctx.lease))
