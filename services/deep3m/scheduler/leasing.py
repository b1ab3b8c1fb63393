"""Leases from the workers' side: lease, renew, give back, fail, and their expiry.

Each call decides under the lock; what it implies in the store (a quarantine
record, a failing job's result) is deferred and run by the same thread after
the lock is released, before the call returns (``SchedulerState``).
"""

from __future__ import annotations

from collections.abc import Mapping

from deep3m.core.errors import InvalidArgumentError, NotFoundError
from deep3m.runtime import metrics as m
from deep3m.runtime.settings import WORKER_ROLES
from deep3m.scheduler import kinds
from deep3m.scheduler.advance import Advancer
from deep3m.scheduler.jobs import Grant, Job, JobError
from deep3m.scheduler.queue import Lease, parse_lease_id
from deep3m.scheduler.state import SchedulerState
from deep3m.scheduler.stats import Statistics

MIN_LEASE_S = 0.2
MAX_LEASE_S = 3600.0
MAX_TASKS_PER_LEASE = 256


class Leasing:
    """The lease calls of ``Scheduler``; see there for what each promises."""

    def __init__(self, state: SchedulerState, stats: Statistics, advancer: Advancer) -> None:
        self.state = state
        self.stats = stats
        self.advancer = advancer

    def _lease_length(self, requested: float) -> float:
        if requested <= 0:
            return self.state.settings.lease_seconds
        return min(max(requested, MIN_LEASE_S), MAX_LEASE_S)

    def lease(
        self, worker_id: str, role: str, max_tasks: int, lease_seconds: float = 0.0
    ) -> list[Grant]:
        if not worker_id:
            raise InvalidArgumentError("worker_id is empty", field="worker_id")
        if role not in WORKER_ROLES:
            raise InvalidArgumentError(
                f"unknown worker role {role!r}; use one of {', '.join(WORKER_ROLES)}", field="role"
            )
        if not 0 <= max_tasks <= MAX_TASKS_PER_LEASE:
            raise InvalidArgumentError(
                f"max_tasks must be 0..{MAX_TASKS_PER_LEASE}, got {max_tasks}", field="max_tasks"
            )
        s = self.state
        s.check_ready()
        now = s.clock()
        with s.lock:
            leases = s.queue.lease(
                role, worker_id, max_tasks or 1, now, self._lease_length(lease_seconds)
            )
            out = []
            for lease in leases:
                job = s.jobs[lease.job_id]
                if job.state == "PENDING":
                    self.advancer.set_state(job, "RUNNING", now)
                if not job.stage_started:
                    job.stage_started = now
                s.refresh_counts(job, lease.stage)
                out.append(self._grant(job, lease))
            if leases:
                self.stats.update_queue(role)
            return out

    @staticmethod
    def _grant(job: Job, lease: Lease) -> Grant:
        plan = job.current
        if plan is None or plan.name != lease.stage:
            raise NotFoundError(
                f"job {job.id!r} has no current stage {lease.stage!r}", field="stage"
            )
        return Grant(
            lease.lease_id,
            lease.deadline,
            job.id,
            lease.stage,
            lease.role,
            lease.attempt,
            plan.task(lease.task),
            job.record.resolved,
            job.record.volumes,
        )

    def lease_role(self, lease_id: str) -> str | None:
        """The role whose task ``lease_id`` names; None for a lease of no known job."""
        named = parse_lease_id(lease_id)
        if named is None:
            return None
        with self.state.lock:
            job = self.state.jobs.get(named[0])
        if job is None:
            return None
        return next(
            (s.role for s in kinds.get_kind(job.record.kind).stages if s.name == named[1]), None
        )

    def renew(
        self,
        lease_id: str,
        worker_id: str,
        *,
        message: str = "",
        metrics: Mapping[str, float] | None = None,
    ) -> tuple[float, bool]:
        s = self.state
        s.check_ready()
        now = s.clock()
        with s.lock:
            lease = s.queue.renew(lease_id, worker_id, now)
            job = s.jobs.get(lease.job_id)
            if job is not None and not lease.cancelled and (metrics or message):
                s.emit(
                    job,
                    message=message,
                    task_id=job.task_id(lease.stage, lease.task),
                    metrics=dict(metrics or {}),
                )
            return lease.deadline, lease.cancelled

    def release(self, lease_id: str, worker_id: str) -> None:
        s = self.state
        s.check_ready()
        now = s.clock()
        with s.lock:
            lease = s.queue.release(lease_id, worker_id, now)
            job = s.jobs.get(lease.job_id)
            if job is not None and not job.terminal:
                s.refresh_counts(job, lease.stage)
                s.emit(
                    job,
                    task_id=job.task_id(lease.stage, lease.task),
                    message=f"worker {worker_id!r} gave task "
                    f"{job.task_id(lease.stage, lease.task)} back; re-queued",
                )
            self.stats.update_queue(lease.role)

    def fail(self, lease_id: str, worker_id: str, error: JobError, retryable: bool) -> bool:
        s = self.state
        s.check_ready()
        now = s.clock()
        try:
            return self._fail(lease_id, worker_id, error, retryable, now)
        finally:
            s.run_deferred()

    def _fail(
        self, lease_id: str, worker_id: str, error: JobError, retryable: bool, now: float
    ) -> bool:
        s = self.state
        with s.lock:
            outcome = s.queue.fail(lease_id, worker_id, retryable, error.message, now)
            if outcome.dropped:
                self.stats.update_queue()
                return True
            lease = outcome.lease
            job = s.jobs[lease.job_id]
            task_id = job.task_id(lease.stage, lease.task)
            if outcome.quarantined:
                self.advancer.quarantine(
                    job,
                    lease,
                    task_id,
                    error.code or "UNKNOWN",
                    error.message,
                    now,
                    attempts=outcome.attempts,
                )
            else:
                m.TASK_RETRIES.labels(role=lease.role).inc()
                s.refresh_counts(job, lease.stage)
                s.emit(
                    job,
                    task_id=task_id,
                    error=error.message,
                    message=f"task {task_id} failed (attempt {outcome.attempts} of "
                    f"{job.record.max_attempts}); retrying in "
                    f"{outcome.retry_at - now:.1f} s",
                )
            self.stats.update_queue()
            return outcome.quarantined

    def expire(self) -> int:
        """Re-queue (or quarantine) expired leases and refresh the queue gauges, which
        change with time alone as held tasks turn leasable; returns how many expired."""
        s = self.state
        now = s.clock()
        with s.lock:
            expired = s.queue.expire(now)
            for e in expired:
                if e.dropped:
                    continue
                m.LEASES_EXPIRED.labels(role=e.lease.role).inc()
                job = s.jobs.get(e.lease.job_id)
                if job is None or job.terminal:
                    continue
                task_id = job.task_id(e.lease.stage, e.lease.task)
                message = (
                    f"lease expired: worker {e.lease.worker_id!r} stopped renewing "
                    f"(attempt {e.lease.attempt})"
                )
                if e.quarantined:
                    self.advancer.quarantine(
                        job, e.lease, task_id, "UNAVAILABLE", message, now, attempts=e.lease.attempt
                    )
                else:
                    s.refresh_counts(job, e.lease.stage)
                    s.emit(job, task_id=task_id, message=message + "; re-queued")
            self.stats.update_queue()
        s.run_deferred()
        return len(expired)
