"""What a worker needs of the scheduler, and its gRPC implementation.

A worker leases, renews, completes and fails tasks through a
:class:`SchedulerClient`. ``GrpcSchedulerClient`` talks to a scheduler over
the network; ``deep3m.scheduler.inprocess.InProcessSchedulerClient`` calls a
scheduler in the same process (tests, and drivers without sockets). Both
raise ``Deep3mError`` subclasses: ``retryable`` ones (unreachable, busy) are
worth retrying, ``CancelledError`` means the job was cancelled, anything
else (stale lease, unknown task) means the outcome is no longer ours to report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import grpc

from deep3m.core.errors import Deep3mError
from deep3m.runtime.channel import CHANNEL_OPTIONS, ChannelSecurity, open_channel
from deep3m.runtime.rpc_errors import from_error_detail, from_rpc_error, status_code
from deep3m.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

# Reconnect quickly after a scheduler restart (gRPC's default backoff grows to 120 s).
WORKER_CHANNEL_OPTIONS: tuple[tuple[str, object], ...] = (
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

T = TypeVar("T")
# One completion of a batch: (lease id, metrics, outputs).
Completion = tuple[str, Mapping[str, float], Mapping[str, str]]


class SchedulerClient(Protocol):
    """The worker's view of the scheduler; ``timeout`` (s) bounds one call."""

    address: str

    def lease(
        self, worker_id: str, role: str, max_tasks: int, lease_seconds: float, *, timeout: float
    ) -> list[common_pb2.TaskLease]: ...

    def renew(
        self,
        lease_id: str,
        worker_id: str,
        progress: common_pb2.ProgressEvent | None,
        *,
        timeout: float,
    ) -> tuple[float, bool]:
        """(new deadline, cancelled)."""
        ...

    def complete(
        self,
        lease_id: str,
        worker_id: str,
        metrics: Mapping[str, float],
        outputs: Mapping[str, str],
        *,
        timeout: float,
    ) -> None: ...

    def complete_many(
        self, worker_id: str, completions: Sequence[Completion], *, timeout: float
    ) -> list[Deep3mError | None]:
        """One outcome per completion, in order: None when recorded, else its error.

        Raises (for all of them) when the call itself fails, e.g. unreachable.
        """
        ...

    def fail(
        self,
        lease_id: str,
        worker_id: str,
        error: common_pb2.ErrorDetail,
        retryable: bool,
        *,
        timeout: float,
    ) -> bool:
        """True when the task will not be retried."""
        ...

    def release(self, lease_id: str, worker_id: str, *, timeout: float) -> None:
        """Give an unfinished task back (shutting down): no attempt is counted."""
        ...

    def close(self) -> None: ...


def _fill(message: Any, metrics: Mapping[str, float], outputs: Mapping[str, str]) -> None:
    """A completion's metrics and outputs into its request message (one or a batch's)."""
    message.metrics.update({k: float(v) for k, v in metrics.items()})
    message.outputs.update({k: str(v) for k, v in outputs.items()})


class GrpcSchedulerClient:
    """A :class:`SchedulerClient` over a gRPC channel (its own, or one given)."""

    def __init__(
        self,
        address: str,
        *,
        channel: grpc.Channel | None = None,
        security: ChannelSecurity | None = None,
    ) -> None:
        self.address = address
        self._own_channel = channel is None
        self._channel = channel or open_channel(address, security, options=WORKER_CHANNEL_OPTIONS)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except grpc.RpcError as err:
            raise from_rpc_error(err, address=self.address) from err

    def lease(
        self, worker_id: str, role: str, max_tasks: int, lease_seconds: float, *, timeout: float
    ) -> list[common_pb2.TaskLease]:
        request = scheduler_pb2.LeaseTasksRequest(
            worker_id=worker_id, role=role, max_tasks=max_tasks, lease_seconds=lease_seconds
        )
        return list(self._call(lambda: self._stub.LeaseTasks(request, timeout=timeout)).leases)

    def renew(
        self,
        lease_id: str,
        worker_id: str,
        progress: common_pb2.ProgressEvent | None,
        *,
        timeout: float,
    ) -> tuple[float, bool]:
        request = scheduler_pb2.RenewLeaseRequest(lease_id=lease_id, worker_id=worker_id)
        if progress is not None:
            request.progress.CopyFrom(progress)
        reply = self._call(lambda: self._stub.RenewLease(request, timeout=timeout))
        return reply.deadline_unix_s, reply.cancelled

    def complete(
        self,
        lease_id: str,
        worker_id: str,
        metrics: Mapping[str, float],
        outputs: Mapping[str, str],
        *,
        timeout: float,
    ) -> None:
        request = scheduler_pb2.CompleteTaskRequest(lease_id=lease_id, worker_id=worker_id)
        _fill(request, metrics, outputs)
        self._call(lambda: self._stub.CompleteTask(request, timeout=timeout))

    def complete_many(
        self, worker_id: str, completions: Sequence[Completion], *, timeout: float
    ) -> list[Deep3mError | None]:
        request = scheduler_pb2.CompleteTasksRequest(worker_id=worker_id)
        for lease_id, metrics, outputs in completions:
            _fill(request.completions.add(lease_id=lease_id), metrics, outputs)
        try:
            reply = self._stub.CompleteTasks(request, timeout=timeout)
        except grpc.RpcError as err:
            if status_code(err) != grpc.StatusCode.UNIMPLEMENTED:
                raise from_rpc_error(err, address=self.address) from err
            return self._complete_each(worker_id, completions, timeout=timeout)
        return [from_error_detail(r.error) if r.error.code else None for r in reply.results]

    def _complete_each(
        self, worker_id: str, completions: Sequence[Completion], *, timeout: float
    ) -> list[Deep3mError | None]:
        """A scheduler without ``CompleteTasks`` (an older version): one call each."""
        out: list[Deep3mError | None] = []
        for lease_id, metrics, outputs in completions:
            try:
                self.complete(lease_id, worker_id, metrics, outputs, timeout=timeout)
                out.append(None)
            except Deep3mError as exc:
                out.append(exc)
        return out

    def fail(
        self,
        lease_id: str,
        worker_id: str,
        error: common_pb2.ErrorDetail,
        retryable: bool,
        *,
        timeout: float,
    ) -> bool:
        request = scheduler_pb2.FailTaskRequest(
            lease_id=lease_id, worker_id=worker_id, error=error, retryable=retryable
        )
        return bool(self._call(lambda: self._stub.FailTask(request, timeout=timeout)).quarantined)

    def release(self, lease_id: str, worker_id: str, *, timeout: float) -> None:
        request = scheduler_pb2.FailTaskRequest(
            lease_id=lease_id, worker_id=worker_id, release=True, retryable=True
        )
        self._call(lambda: self._stub.FailTask(request, timeout=timeout))

    def close(self) -> None:
        if self._own_channel:
            self._channel.close()
