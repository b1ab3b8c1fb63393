"""A worker's scheduler client that calls a :class:`Scheduler` in the same process.

The same worker loop drives either a remote scheduler (``GrpcSchedulerClient``)
or this one, so worker behaviour — capacity, cancellation, stale leases,
graceful stop — is tested without sockets. Leases are built with the same
converter as the servicer's, so handlers see identical ``TaskLease`` protos.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from deep3m.core.errors import Deep3mError
from deep3m.scheduler.convert import error_from_proto, grant_to_proto
from deep3m.scheduler.core import Scheduler
from deep3m.v1 import common_pb2


class InProcessSchedulerClient:
    """Implements ``deep3m.runtime.scheduler_client.SchedulerClient``; timeouts are unused."""

    address = "in-process"

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def lease(
        self, worker_id: str, role: str, max_tasks: int, lease_seconds: float, *, timeout: float
    ) -> list[common_pb2.TaskLease]:
        grants = self.scheduler.lease(worker_id, role, max_tasks, lease_seconds)
        return [grant_to_proto(g) for g in grants]

    def renew(
        self,
        lease_id: str,
        worker_id: str,
        progress: common_pb2.ProgressEvent | None,
        *,
        timeout: float,
    ) -> tuple[float, bool]:
        return self.scheduler.renew(
            lease_id,
            worker_id,
            message=progress.message if progress is not None else "",
            metrics=dict(progress.metrics) if progress is not None else None,
        )

    def complete(
        self,
        lease_id: str,
        worker_id: str,
        metrics: Mapping[str, float],
        outputs: Mapping[str, str],
        *,
        timeout: float,
    ) -> None:
        self.scheduler.complete(lease_id, worker_id, metrics, outputs)

    def complete_many(
        self,
        worker_id: str,
        completions: Sequence[tuple[str, Mapping[str, float], Mapping[str, str]]],
        *,
        timeout: float,
    ) -> list[Deep3mError | None]:
        return self.scheduler.complete_many(worker_id, completions)

    def fail(
        self,
        lease_id: str,
        worker_id: str,
        error: common_pb2.ErrorDetail,
        retryable: bool,
        *,
        timeout: float,
    ) -> bool:
        return self.scheduler.fail(lease_id, worker_id, error_from_proto(error), retryable)

    def release(self, lease_id: str, worker_id: str, *, timeout: float) -> None:
        self.scheduler.release(lease_id, worker_id)

    def close(self) -> None:
        """Nothing to release: the scheduler outlives its workers."""
