"""The worker-side contract every role shares: handler, context, result.

A role's task handler is any callable ``handler(ctx) -> TaskResult`` keyed by
stage name. ``ctx.lease`` is the scheduler's lease: the task (id, block,
params), the *resolved* job spec, and the job's volumes as checked at
submission (``lease.volumes``: shape, dtype, write grid, voxel size), so a
handler does not re-derive them. ``ctx.cancelled`` is set when the job is
cancelled or the lease is lost; handlers check it between steps.
``ctx.stopping`` is set when the worker is going away (SIGTERM: scale-down,
spot interruption, rollout): a handler that can save its progress (training
snapshots) does so and raises ``CancelledError``, and the task is given back
without counting an attempt; others may simply finish within the grace.
``ctx.interrupted`` is set when either is.
``ctx.report`` sends progress with the next heartbeat.

Failures: raise a ``Deep3mError`` with ``retryable=False`` for bad input (the
task fails for good); any other exception is retried by the scheduler.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from deep3m.v1 import common_pb2

# A task that writes part of an output reports how many cells of the output's
# write grid (shards when sharded, else chunks) it wrote; the scheduler counts a
# predict task's completion only when this equals the cells its block owns.
CHUNKS_WRITTEN = "chunks_written"

if TYPE_CHECKING:
    from deep3m.runtime.settings import Settings


@dataclass(frozen=True)
class TaskResult:
    """What a handler returns: numbers (``voxels`` counts towards voxels/s) and outputs."""

    metrics: Mapping[str, float] = field(default_factory=dict)
    outputs: Mapping[str, str] = field(default_factory=dict)


class StopFlag(Protocol):
    """A flag polled by long work (``threading.Event``, ``AnySet``): set when it must stop."""

    def is_set(self) -> bool: ...


class AnySet:
    """A read-only flag set when any of its events is (for code that polls ``is_set``)."""

    def __init__(self, *events: threading.Event) -> None:
        self._events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)


class TaskContext:
    """A running task: its lease, a cancellation flag, and a progress channel."""

    def __init__(
        self, lease: common_pb2.TaskLease, *, worker_id: str, settings: Settings | None = None
    ) -> None:
        self.lease = lease
        self.worker_id = worker_id
        self.settings = settings
        self.cancelled = threading.Event()
        self.stopping = threading.Event()
        self.interrupted = AnySet(self.cancelled, self.stopping)
        self._lock = threading.Lock()
        self._metrics: dict[str, float] = {}
        self._message = ""
        self._dirty = False

    @property
    def task(self) -> common_pb2.Task:
        return self.lease.task

    def report(self, metrics: Mapping[str, float], message: str = "") -> None:
        """Progress inside a long task; sent with the next heartbeat (latest values win)."""
        with self._lock:
            self._metrics.update({k: float(v) for k, v in metrics.items()})
            if message:
                self._message = message
            self._dirty = True

    def take_progress(self) -> common_pb2.ProgressEvent | None:
        """The progress reported since the last call (None when nothing new)."""
        with self._lock:
            if not self._dirty:
                return None
            event = common_pb2.ProgressEvent(
                job_id=self.lease.task.job_id,
                task_id=self.lease.task.id,
                stage=self.lease.task.stage,
                time_unix_s=time.time(),
                message=self._message,
            )
            event.metrics.update(self._metrics)
            self._metrics.clear()
            self._message = ""
            self._dirty = False
            return event


class TaskHandler(Protocol):
    """Runs one task of a stage."""

    def __call__(self, ctx: TaskContext, /) -> TaskResult: ...
