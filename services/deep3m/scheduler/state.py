"""What the parts of the scheduler share, and the rule for touching it.

One ``SchedulerState`` holds the in-memory jobs, the task queue, the event bus
and the store, behind one re-entrant lock. The rule every part follows:

- Memory (jobs, queue, gauges, events) changes only under ``lock``; events
  are published under it, so every subscriber sees a job's events in order.
- No store I/O runs under the lock, so a slow store never holds up leases and
  renewals. A part that decides under the lock that something must be
  written (a cancel marker, a stage's seal and the next plan, a quarantine
  record, a result) queues it with ``defer``; the same thread runs it with
  ``run_deferred`` once it has released the lock, before its call answers.
  A deferred step takes the lock again itself to apply what it wrote.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from deep3m.core.errors import Deep3mError, NotFoundError, UnavailableError
from deep3m.core.events import EventBus
from deep3m.core.store import Store
from deep3m.runtime.settings import Settings
from deep3m.scheduler import kinds
from deep3m.scheduler.jobs import Job, JobView
from deep3m.scheduler.persistence import JobStore
from deep3m.scheduler.queue import StageCounts, TaskQueue

log = logging.getLogger("deep3m.scheduler")


def describe(exc: Exception) -> tuple[str, str]:
    """(gRPC code name, message) of any exception."""
    if isinstance(exc, Deep3mError):
        return exc.grpc_code_name, exc.message
    return "INTERNAL", repr(exc)


class SchedulerState:
    """The scheduler's shared state; see the module docstring for the locking rule."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        context: kinds.KindContext,
        bus: EventBus,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.store = store
        self.jobs_store = JobStore(store, retry_s=settings.store_retry_seconds)
        self.context = context
        self.bus = bus
        self.clock = clock
        self.queue = TaskQueue(
            backoff_s=settings.retry_backoff_seconds, default_lease_s=settings.lease_seconds
        )
        self.lock = threading.RLock()
        self.jobs: dict[str, Job] = {}
        # Finished jobs known from the index, loaded on first use: id → index entry.
        self.unloaded: dict[str, dict[str, Any]] = {}
        self.recovering = False
        # Store writes decided under the lock, run by the same thread after it.
        self._local = threading.local()

    def check_ready(self) -> None:
        """UNAVAILABLE (retry) while recovery runs."""
        if self.recovering:
            raise UnavailableError(
                "the scheduler is still recovering jobs from the store; retry shortly",
                field="scheduler",
            )

    # -- store writes outside the lock --------------------------------------------------
    def defer(self, step: Callable[[], None]) -> None:
        """Run ``step`` (store I/O) once this thread has released the lock."""
        pending: list[Callable[[], None]] | None = getattr(self._local, "steps", None)
        if pending is None:
            pending = self._local.steps = []
        pending.append(step)

    def run_deferred(self) -> None:
        """Run this thread's deferred steps, in order (they may defer more); lock not held."""
        pending: list[Callable[[], None]] | None = getattr(self._local, "steps", None)
        while pending:
            step = pending.pop(0)
            try:
                step()
            except Exception:  # each step handles its own failures; never lose the rest
                log.exception("a deferred scheduler step failed")

    # -- jobs in memory (caller holds the lock) -----------------------------------------
    def job(self, job_id: str) -> Job:
        job = self.jobs.get(kinds.check_job_id(job_id))
        if job is None:
            raise NotFoundError(f"job {job_id!r} not found", field="job_id")
        return job

    def view(self, job: Job) -> JobView:
        return job.view(kinds.get_kind(job.record.kind).stages_for(job.record.resolution))

    def emit(self, job: Job, **kwargs: Any) -> None:
        # Published under the lock, so every subscriber sees events in order.
        self.bus.publish(job.event(self.clock(), **kwargs))

    def refresh_counts(self, job: Job, stage: str) -> StageCounts:
        if self.queue.has_stage(job.id, stage):
            job.counts[stage] = self.queue.counts(job.id, stage)
        return job.counts[stage]
