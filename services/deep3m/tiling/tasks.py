"""Ingest tasks leased from the scheduler: ``ingest`` (one z-range) and ``finalize``.

The scheduler checks the source's header, creates the (incomplete) volume at
submit and records it in the lease (``lease.volumes["output"]``: store, path,
dtype); each ``ingest`` task then writes its z-range (params ``z_start``,
``z_stop``) and the single ``finalize`` task marks the volume complete once
every range is done, recording the grey levels the ranges counted (their
documents, in the default store, are deleted then).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.ingest import finalize_ingest, gather_levels, ingest_range
from deep3m.core.store import Store
from deep3m.core.store.keys import ingest_documents
from deep3m.runtime.metrics import INGEST_BYTES
from deep3m.runtime.settings import Settings
from deep3m.runtime.task import TaskContext, TaskResult
from deep3m.tiling.operations import TilingOperations
from deep3m.v1 import common_pb2


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

    def _output(self, lease: common_pb2.TaskLease) -> tuple[Store, str, str]:
        """The output volume's store, key and dtype (as resolved at submission when known)."""
        if "output" in lease.volumes:
            out = lease.volumes["output"]
            return (
                self.ops.roots.store(out.store_url, field="spec.output.store_url"),
                out.path,
                out.dtype,
            )
        spec = _ingest_spec(lease)
        store, key = self.ops.roots.resolve(
            spec.output.store_url, spec.output.path, field="spec.output"
        )
        return store, key, ""

    def run_ingest_range(
        self, lease: common_pb2.TaskLease, *, cancelled: threading.Event | None = None
    ) -> dict[str, float]:
        """Write one z-range of the ingest job's volume; returns task metrics."""
        started = time.perf_counter()
        spec = _ingest_spec(lease)
        z_start = _int_param(lease.task, "z_start")
        z_stop = _int_param(lease.task, "z_stop")
        source = self.ops.check_source(spec.source)
        store, key, dtype = self._output(lease)
        written = ingest_range(
            source,
            store,
            key,
            z_start,
            z_stop,
            cancelled=cancelled,
            storage_options=self.settings.storage_options(),
            documents=self._documents(lease),
        )
        INGEST_BYTES.inc(written)
        itemsize = np.dtype(dtype or store.volume_info(key).dtype).itemsize
        return {
            # "voxels" is what the scheduler sums into the job's voxels/s.
            "voxels": float(written // itemsize),
            "bytes": float(written),
            "slices": float(z_stop - z_start),
            "seconds": time.perf_counter() - started,
        }

    def _documents(self, lease: common_pb2.TaskLease) -> tuple[Store, str]:
        return self.ops.roots.store(), ingest_documents(lease.task.job_id)

    def run_finalize(self, lease: common_pb2.TaskLease) -> dict[str, str]:
        """Mark the volume complete, with its grey levels; returns the job outputs."""
        spec = _ingest_spec(lease)
        store, key, _ = self._output(lease)
        info = store.volume_info(key)
        documents = self._documents(lease)
        levels = gather_levels(
            documents,
            info.shape[0],
            (info.shard_shape or info.chunk_shape)[0],
            int(spec.slices_per_task),
        )
        finalize_ingest(store, key, levels=levels, source=spec.source)
        documents[0].delete(documents[1])
        return {"volume": store.key_url(key)}

    def ingest_range(self, ctx: TaskContext) -> TaskResult:
        return TaskResult(metrics=self.run_ingest_range(ctx.lease, cancelled=ctx.cancelled))

    def finalize(self, ctx: TaskContext) -> TaskResult:
        return TaskResult(metrics={}, outputs=self.run_finalize(ctx.lease))
