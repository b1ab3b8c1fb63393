"""The Scheduler gRPC service: a thin shell over ``deep3m.scheduler.core``.

Domain errors raised here become gRPC statuses in the shared interceptor.
``WatchJob`` sends the job's current state first, then every event of that
job, and ends at a terminal state or when the client goes away (the RPC's
termination callback closes the subscription, which wakes the blocked
iterator; nothing polls). At most ``max_watchers`` streams are served at once
(RESOURCE_EXHAUSTED beyond, which clients retry); the server gives them threads
of their own, so they never hold the threads unary calls and health checks use.

``CompleteTasks`` answers each completion of a batch on its own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from deep3m.core.errors import InvalidArgumentError, ResourceExhaustedError
from deep3m.runtime.auth import current_principal, require_worker_of
from deep3m.runtime.progress_proto import event_to_proto, state_from_proto
from deep3m.scheduler.convert import (
    completions_to_proto,
    error_from_proto,
    grant_to_proto,
    job_to_proto,
)
from deep3m.scheduler.core import Scheduler
from deep3m.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

DEFAULT_PAGE = 100
MAX_PAGE = 1000


def _page_offset(token: str) -> int:
    if not token:
        return 0
    if not token.isdigit() or len(token) > 12:
        raise InvalidArgumentError(
            "page_token is not one this server handed out", field="page_token"
        )
    return int(token)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, scheduler: Scheduler, *, max_watchers: int = 128) -> None:
        self.scheduler = scheduler
        self.max_watchers = max_watchers
        self._watch_slots = threading.BoundedSemaphore(max_watchers)

    def _check_lease_role(self, lease_id: str) -> None:
        """With authentication on, a worker reports only on tasks of its own role."""
        if current_principal() is None:
            return
        role = self.scheduler.lease_role(lease_id)
        if role is not None:
            require_worker_of(role)

    def SubmitJob(
        self, request: scheduler_pb2.SubmitJobRequest, context: grpc.ServicerContext
    ) -> common_pb2.Job:
        return job_to_proto(self.scheduler.submit(request.spec, request.job_id))

    def GetJob(
        self, request: scheduler_pb2.GetJobRequest, context: grpc.ServicerContext
    ) -> common_pb2.Job:
        return job_to_proto(self.scheduler.get(request.job_id))

    def ListJobs(
        self, request: scheduler_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> scheduler_pb2.ListJobsResponse:
        states = [state_from_proto(s) for s in request.states]
        if not 0 <= request.limit <= MAX_PAGE:
            raise InvalidArgumentError(
                f"limit must be 0..{MAX_PAGE}, got {request.limit}", field="limit"
            )
        page = request.limit or DEFAULT_PAGE
        offset = _page_offset(request.page_token)
        # One more than the page tells whether another page follows.
        jobs = self.scheduler.list_jobs([s for s in states if s], page + 1, offset)
        reply = scheduler_pb2.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs[:page]])
        if len(jobs) > page:
            reply.next_page_token = f"{offset + page}"
        return reply

    def CancelJob(
        self, request: scheduler_pb2.CancelJobRequest, context: grpc.ServicerContext
    ) -> common_pb2.Job:
        return job_to_proto(self.scheduler.cancel(request.job_id))

    def WatchJob(
        self, request: scheduler_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.ProgressEvent]:
        if not self._watch_slots.acquire(blocking=False):
            raise ResourceExhaustedError(
                f"{self.max_watchers} job watchers are connected already; retry later",
                field="max_watch_streams",
            )
        try:
            yield from self._watch(request, context)
        finally:
            self._watch_slots.release()

    def _watch(
        self, request: scheduler_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.ProgressEvent]:
        first, sub = self.scheduler.watch(request.job_id)
        if sub is None:  # already ended
            yield event_to_proto(first)
            return
        try:
            # Runs when the RPC ends for any reason (client gone, deadline, shutdown).
            if not context.add_callback(sub.close):
                return
            yield event_to_proto(first)
            for event in sub:
                yield event_to_proto(event)
                if event.terminal:
                    return
        finally:
            sub.close()

    def LeaseTasks(
        self, request: scheduler_pb2.LeaseTasksRequest, context: grpc.ServicerContext
    ) -> scheduler_pb2.LeaseTasksResponse:
        leases = self.scheduler.lease(
            request.worker_id, request.role, request.max_tasks, request.lease_seconds
        )
        return scheduler_pb2.LeaseTasksResponse(leases=[grant_to_proto(g) for g in leases])

    def RenewLease(
        self, request: scheduler_pb2.RenewLeaseRequest, context: grpc.ServicerContext
    ) -> scheduler_pb2.RenewLeaseResponse:
        self._check_lease_role(request.lease_id)
        progress = request.progress
        deadline, cancelled = self.scheduler.renew(
            request.lease_id,
            request.worker_id,
            message=progress.message,
            metrics=dict(progress.metrics),
        )
        return scheduler_pb2.RenewLeaseResponse(deadline_unix_s=deadline, cancelled=cancelled)

    def CompleteTask(
        self, request: scheduler_pb2.CompleteTaskRequest, context: grpc.ServicerContext
    ) -> scheduler_pb2.CompleteTaskResponse:
        self._check_lease_role(request.lease_id)
        self.scheduler.complete(
            request.lease_id, request.worker_id, dict(request.metrics), dict(request.outputs)
        )
        return scheduler_pb2.CompleteTaskResponse()

    def CompleteTasks(
        self, request: scheduler_pb2.CompleteTasksRequest, context: grpc.ServicerContext
    ) -> scheduler_pb2.CompleteTasksResponse:
        for completion in request.completions:
            self._check_lease_role(completion.lease_id)
        errors = self.scheduler.complete_many(
            request.worker_id,
            [(c.lease_id, dict(c.metrics), dict(c.outputs)) for c in request.completions],
        )
        return completions_to_proto(request.completions, errors)

    def FailTask(
        self, request: scheduler_pb2.FailTaskRequest, context: grpc.ServicerContext
    ) -> scheduler_pb2.FailTaskResponse:
        self._check_lease_role(request.lease_id)
        if request.release:
            self.scheduler.release(request.lease_id, request.worker_id)
            return scheduler_pb2.FailTaskResponse(quarantined=False)
        quarantined = self.scheduler.fail(
            request.lease_id, request.worker_id, error_from_proto(request.error), request.retryable
        )
        return scheduler_pb2.FailTaskResponse(quarantined=quarantined)

    def GetQueueStats(
        self, request: scheduler_pb2.GetQueueStatsRequest, context: grpc.ServicerContext
    ) -> scheduler_pb2.QueueStats:
        stats = scheduler_pb2.QueueStats()
        for role, (pending, leased) in self.scheduler.queue_stats().items():
            stats.roles.add(role=role, pending=pending, leased=leased)
        return stats
