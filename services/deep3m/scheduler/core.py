"""The transport-neutral scheduler: the job and task state machine.

``Scheduler`` is the one object the servicer, the in-process worker client and
the role app call. It speaks plain values (``JobView``, ``Grant``,
``JobError``); the gRPC servicer and the in-process worker client convert.
Its parts share one ``SchedulerState`` (jobs, queue, event bus, store, one
lock) and live apart, one concept each:

| part | module |
|---|---|
| submitting a job | ``submission.Submission`` |
| leases: lease, renew, give back, fail, expiry | ``leasing.Leasing`` |
| completions, one or a batch | ``completions.Completions`` |
| stage advancing, quarantine, a job's end | ``advance.Advancer`` |
| recovery, finished jobs on demand, pruning | ``recovery.Recovery`` |
| counts for the autoscaler, Prometheus gauges | ``stats.Statistics`` |

Job states: PENDING (submitted, nothing leased yet) → RUNNING → SUCCEEDED,
FAILED (a task was quarantined: the error lists the task ids and messages) or
CANCELLED. A completion is acknowledged only once its record is in the store;
a restarted scheduler resumes every unfinished job from there (``recovery``).

No store I/O happens under the scheduler's lock, so a slow store never holds up
leases and renewals: a method decides under the lock, queues the writes it
implies (a cancel marker, a stage's end and the next plan, a quarantine
record, a result) and runs them after releasing it, on the calling thread,
before it returns (``state``). Finished jobs are indexed
(``persistence.FINISHED_KEY``); after a restart they are loaded only when asked
for, and pruned once older than ``finished_job_retention_days``.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from deep3m.core.errors import Deep3mError, InvalidArgumentError
from deep3m.core.events import JOB_STATES, EventBus, ProgressEvent, Subscription
from deep3m.core.locations import StoreRoots
from deep3m.core.store import Store
from deep3m.scheduler import kinds
from deep3m.scheduler.advance import Advancer
from deep3m.scheduler.completions import Completion, Completions
from deep3m.scheduler.jobs import Grant, JobError, JobView
from deep3m.scheduler.leasing import Leasing
from deep3m.scheduler.recovery import Recovery
from deep3m.scheduler.state import SchedulerState
from deep3m.scheduler.stats import Statistics
from deep3m.scheduler.submission import Submission

if TYPE_CHECKING:
    from deep3m.runtime.settings import Settings
    from deep3m.v1 import common_pb2

log = logging.getLogger("deep3m.scheduler")

# Finished jobs past their retention are looked for this often.
PRUNE_INTERVAL_S = 3600.0


class Scheduler:
    """Thread-safe. ``recover()`` once before serving; ``start()`` runs the lease reaper."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        context: kinds.KindContext | None = None,
        bus: EventBus | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        roots = StoreRoots.from_settings(settings)
        context = context or kinds.KindContext(
            roots,
            max_region_voxels=settings.max_region_voxels,
            restrict_local_inputs=settings.restrict_local_inputs,
            store_retry_s=settings.store_retry_seconds,
        )
        state = SchedulerState(settings, store or roots.store(), context, bus or EventBus(), clock)
        self._state = state
        self.settings = settings
        self.store = state.store
        self.jobs_store = state.jobs_store
        self.context = state.context
        self.queue = state.queue
        self.bus = state.bus
        self.clock = clock
        self._stats = Statistics(state)
        self._advancer = Advancer(state, self._stats)
        self._recovery = Recovery(state, self._stats, self._advancer)
        self._submission = Submission(state, self._stats, self._advancer, self._recovery)
        self._leasing = Leasing(state, self._stats, self._advancer)
        self._completions = Completions(state, self._stats, self._advancer, self._leasing)
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._recovered = False
        self._next_prune = 0.0

    # -- lifecycle ----------------------------------------------------------------
    def begin_recovery(self) -> None:
        """Answer UNAVAILABLE (retry) to every request until ``recover`` has finished."""
        self._state.recovering = True

    def recover(self) -> int:
        """Rebuild every job from the store; returns how many were resumed.

        Finished jobs in the index are not read (they load when asked for);
        every other job is read in parallel, then rebuilt under the lock.
        """
        if self._recovered:  # once per instance: a second pass would find nothing new
            self._state.recovering = False
            return 0
        self._state.recovering = True
        try:
            resumed = self._recovery.recover()
            self._recovered = True
            return resumed
        finally:
            self._state.recovering = False

    def prune_finished(self) -> int:
        """Delete the jobs that finished more than the retention period ago; returns how many."""
        return self._recovery.prune_finished()

    def start(self) -> None:
        """Start the background reaper that re-queues expired leases."""
        if self._reaper is not None:
            return
        self._stop.clear()
        self._reaper = threading.Thread(
            target=self._reap_loop, name="scheduler-reaper", daemon=True
        )
        self._reaper.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout)
            self._reaper = None
        for sub in list(self._subscriptions):
            sub.close()

    def _reap_loop(self) -> None:
        # Each round also refreshes the queue gauges: held tasks turn leasable with time.
        while not self._stop.is_set():
            try:
                self.expire_leases()
            except Exception:  # keep reaping; the next round retries
                log.exception("lease reaper round failed")
            if time.monotonic() >= self._next_prune and not self._state.recovering:
                self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
                try:
                    self.prune_finished()
                except Exception:  # the next round retries
                    log.exception("pruning finished jobs failed")
            with self._state.lock:
                deadline = self.queue.next_deadline()
            wait = 1.0 if deadline is None else min(1.0, max(0.01, deadline - self.clock()))
            self._stop.wait(wait)

    # -- jobs -----------------------------------------------------------------------
    def submit(self, spec: common_pb2.JobSpec, job_id: str = "") -> JobView:
        """Validate, create outputs, persist and queue a job; same id and spec: a no-op."""
        return self._submission.submit(spec, job_id)

    def get(self, job_id: str) -> JobView:
        s = self._state
        s.check_ready()
        self._recovery.load_finished([job_id])
        with s.lock:
            return s.view(s.job(job_id))

    def list_jobs(
        self, states: Sequence[str] = (), limit: int = 0, offset: int = 0
    ) -> list[JobView]:
        """Jobs, newest first, optionally only those in ``states``; ``offset`` skips some."""
        wanted = {s.upper() for s in states}
        unknown = wanted - set(JOB_STATES)
        if unknown:
            raise InvalidArgumentError(f"unknown job state(s) {sorted(unknown)}", field="states")
        if limit < 0:
            raise InvalidArgumentError(f"limit must be >= 0, got {limit}", field="limit")
        s = self._state
        s.check_ready()
        with s.lock:
            # Finished jobs not loaded yet are chosen by their index entry first.
            keys = [
                (float(e.get("created_unix_s", 0.0)), job_id)
                for job_id, e in s.unloaded.items()
                if not wanted or e.get("state") in wanted
            ]
            keys += [
                (j.record.created_unix_s, j.id)
                for j in s.jobs.values()
                if not wanted or j.state in wanted
            ]
            keys.sort(reverse=True)
            chosen = [job_id for _, job_id in (keys[:limit] if limit else keys)]
        self._recovery.load_finished(chosen)
        with s.lock:
            jobs = sorted(
                (j for j in s.jobs.values() if not wanted or j.state in wanted),
                key=lambda j: (j.record.created_unix_s, j.id),
                reverse=True,
            )
            jobs = jobs[max(0, offset) :]
            return [s.view(j) for j in (jobs[:limit] if limit else jobs)]

    def cancel(self, job_id: str) -> JobView:
        """Cancel a job: pending tasks dropped, running ones told at their next heartbeat."""
        s = self._state
        s.check_ready()
        self._recovery.load_finished([job_id])
        with s.lock:
            job = s.job(job_id)
            if job.terminal or job.finishing:
                return s.view(job)
        # The marker is durable before anyone is told (a restart keeps it cancelled).
        s.jobs_store.mark_cancelled(job_id)
        with s.lock:
            if not job.terminal and not job.finishing:
                running = len(s.queue.cancel_job(job_id))
                self._advancer.finish(
                    job, "CANCELLED", f"cancelled; {running} running task(s) told to stop"
                )
        s.run_deferred()
        with s.lock:
            return s.view(job)

    def watch(self, job_id: str) -> tuple[ProgressEvent, Subscription | None]:
        """The job's current state and, unless it has ended, a subscription to what follows."""
        s = self._state
        s.check_ready()
        self._recovery.load_finished([job_id])
        with s.lock:
            job = s.job(job_id)
            if job.terminal:
                return job.event(
                    self.clock(),
                    message=job.final_message,
                    error=job.final_message if job.state == "FAILED" else "",
                ), None
            first = job.event(self.clock(), message="current state")
            sub = self.bus.subscribe(job_id)
            self._subscriptions.add(sub)
            return first, sub

    # -- tasks --------------------------------------------------------------------
    def lease(
        self, worker_id: str, role: str, max_tasks: int, lease_seconds: float = 0.0
    ) -> list[Grant]:
        """Up to ``max_tasks`` tasks of ``role``, oldest job first, retried tasks first."""
        return self._leasing.lease(worker_id, role, max_tasks, lease_seconds)

    def lease_role(self, lease_id: str) -> str | None:
        """The role whose task ``lease_id`` names; None for a lease of no known job."""
        return self._leasing.lease_role(lease_id)

    def renew(
        self,
        lease_id: str,
        worker_id: str,
        *,
        message: str = "",
        metrics: Mapping[str, float] | None = None,
    ) -> tuple[float, bool]:
        """Extend a lease, passing on the task's progress; returns (new deadline, cancelled)."""
        return self._leasing.renew(lease_id, worker_id, message=message, metrics=metrics)

    def complete(
        self,
        lease_id: str,
        worker_id: str,
        metrics: Mapping[str, float] | None = None,
        outputs: Mapping[str, str] | None = None,
    ) -> None:
        """Record a completion; acknowledged only once persisted. Stale leases are refused."""
        (error,) = self.complete_many(worker_id, [(lease_id, metrics, outputs)])
        if error is not None:
            raise error

    def complete_many(
        self, worker_id: str, completions: Sequence[Completion]
    ) -> list[Deep3mError | None]:
        """Record many completions of one worker; one outcome per completion, in order.

        ``None`` means recorded (persisted); otherwise the error that one
        completion alone would have raised (stale lease, cancelled job,
        UNAVAILABLE when the store refused the write). The records of one
        stage are written as one document.
        """
        return self._completions.complete_many(worker_id, completions)

    def release(self, lease_id: str, worker_id: str) -> None:
        """The worker gives the task back unfinished: re-queued at once, no attempt counted."""
        self._leasing.release(lease_id, worker_id)

    def fail(self, lease_id: str, worker_id: str, error: JobError, retryable: bool) -> bool:
        """Record a failed attempt; returns True when the task will not be retried."""
        return self._leasing.fail(lease_id, worker_id, error, retryable)

    def expire_leases(self) -> int:
        """Re-queue (or quarantine) expired leases and refresh the queue gauges; returns
        how many expired."""
        return self._leasing.expire()

    # -- statistics -------------------------------------------------------------------
    def queue_stats(self) -> dict[str, tuple[int, int]]:
        """(pending, leased) tasks per worker role; every role is listed."""
        return self._stats.queue_stats()

    def pending_by_role(self) -> dict[str, int]:
        """Pending tasks per role, held ones included (see ``held_by_role``)."""
        return {role: c[0] for role, c in self.queue_stats().items()}

    def leased_by_role(self) -> dict[str, int]:
        return {role: c[1] for role, c in self.queue_stats().items()}

    def held_by_role(self) -> dict[str, int]:
        """Pending tasks per role held back (retry backoff, post-restart hold)."""
        return self._stats.held_by_role()

    def busy_by_pod(self, role: str) -> dict[str, int]:
        """Live leases of ``role`` per worker (pod) id, for pod-deletion costs."""
        return self._stats.busy_by_pod(role)
