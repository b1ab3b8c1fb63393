"""The transport-neutral scheduler: the job and task state machine.

``Scheduler`` owns the task queue (``queue``), the job kinds (``kinds``),
the persisted state (``persistence``), one ``EventBus`` of progress events and
the Prometheus metrics. It speaks plain values (``JobView``, ``Grant``,
``JobError``); the gRPC servicer and the in-process worker client convert.

Job states: PENDING (submitted, nothing leased yet) → RUNNING → SUCCEEDED,
FAILED (a task was quarantined: the error lists the task ids and messages) or
CANCELLED. A completion is acknowledged only once its record is in the store;
a restarted scheduler resumes every unfinished job from there (``recovery``).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from deep3m.core.errors import (
    AlreadyExistsError,
    Deep3mError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from deep3m.core.events import JOB_STATES, EventBus, ProgressEvent, Subscription
from deep3m.core.locations import StoreRoots
from deep3m.core.store import Store
from deep3m.runtime import metrics as m
from deep3m.runtime.settings import ROLES, Settings
from deep3m.scheduler import kinds
from deep3m.scheduler.jobs import Grant, Job, JobError, JobView
from deep3m.scheduler.kinds import VolumeFacts
from deep3m.scheduler.kinds.refs import create_outputs, remove_outputs
from deep3m.scheduler.persistence import JobRecord, JobStore, spec_to_json
from deep3m.scheduler.queue import Lease, StageCounts, TaskQueue, parse_lease_id
from deep3m.scheduler.recovery import recover_job
from deep3m.scheduler.stages import StagePlan

if TYPE_CHECKING:
    from deep3m.v1 import common_pb2

log = logging.getLogger("deep3m.scheduler")

WORKER_ROLES = tuple(r for r in ROLES if r != "scheduler")
# A job whose tasks keep failing is given up early rather than after every block.
QUARANTINE_LIMIT = 16
MIN_LEASE_S = 0.2
MAX_LEASE_S = 3600.0
MAX_TASKS_PER_LEASE = 256
# Labelled children looked up once: these gauges change on every lease and completion.
_QUEUE_GAUGES = {
    role: (m.TASKS_PENDING.labels(role=role), m.TASKS_LEASED.labels(role=role))
    for role in WORKER_ROLES
}


def _output_of(volumes: Mapping[str, VolumeFacts]) -> tuple[str, str] | None:
    out = volumes.get("output")
    return None if out is None else (out.store_url, out.path)


def _describe(exc: Exception) -> tuple[str, str]:
    """(gRPC code name, message) of any exception."""
    if isinstance(exc, Deep3mError):
        return exc.grpc_code_name, exc.message
    return "INTERNAL", repr(exc)


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
        self.settings = settings
        roots = StoreRoots.from_settings(settings)
        self.store = store or roots.store()
        self.jobs_store = JobStore(self.store)
        self.context = context or kinds.KindContext(
            roots,
            max_region_voxels=settings.max_region_voxels,
            restrict_local_inputs=settings.restrict_local_inputs,
        )
        self.queue = TaskQueue(
            backoff_s=settings.retry_backoff_seconds, default_lease_s=settings.lease_seconds
        )
        self.bus = bus or EventBus()
        self.clock = clock
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._reserved: set[str] = set()
        self._writing: set[tuple[str, str] | None] = set()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()

    # -- lifecycle ----------------------------------------------------------------
    def recover(self) -> int:
        """Rebuild every job from the store; returns how many were resumed."""
        now = self.clock()
        # Workers that held leases before a restart get this long to renew and
        # adopt them before their tasks are handed to anyone else.
        hold_until = now + min(self.settings.lease_seconds / 2, 30.0)
        resumed = 0
        with self._lock:
            self.queue.allow_adoption_from(self.jobs_store.register_epoch(self.queue.epoch))
            for job_id in self.jobs_store.job_ids():
                if job_id in self._jobs:
                    continue
                try:
                    got = recover_job(
                        self.jobs_store, self.queue, job_id, now, hold_until, self.context
                    )
                except Deep3mError as exc:
                    log.error(
                        "cannot resume job %s: %s", job_id, exc.message, extra={"job_id": job_id}
                    )
                    continue
                job = got.job
                self._jobs[job_id] = job
                if got.action == "cancelled":
                    self._finish(job, "CANCELLED", "cancelled")
                elif got.action == "plan_first":
                    self._start_next_stage(job, 0, now)
                    resumed += 1
                elif got.action == "resume":
                    self._emit(job, message=got.message)
                    self._check_stage(job, now)
                    resumed += 1
            self._update_gauges()
            self._update_job_gauge()
        if resumed:
            log.info("resumed %d job(s)", resumed, extra={"jobs": resumed})
        return resumed

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
        while not self._stop.is_set():
            try:
                self.expire_leases()
            except Exception:  # keep reaping; the next round retries
                log.exception("lease reaper round failed")
            with self._lock:
                deadline = self.queue.next_deadline()
            wait = 1.0 if deadline is None else min(1.0, max(0.01, deadline - self.clock()))
            self._stop.wait(wait)

    # -- jobs -----------------------------------------------------------------------
    def submit(self, spec: common_pb2.JobSpec, job_id: str = "") -> JobView:
        """Validate, create outputs, persist and queue a job; same id and spec: a no-op."""
        kind = kinds.job_kind(spec)
        if job_id:
            kinds.check_job_id(job_id)
        with self._lock:
            if job_id and job_id in self._jobs:
                existing = self._jobs[job_id]
                if spec_to_json(existing.record.spec) == spec_to_json(spec):
                    return self._view(existing)
                raise AlreadyExistsError(
                    f"job {job_id!r} already exists with a different spec", field="job_id"
                )
            if job_id in self._reserved:
                raise AlreadyExistsError(f"job {job_id!r} is being submitted", field="job_id")
            if not job_id:
                job_id = (
                    f"{kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(self.clock()))}"
                    f"-{secrets.token_hex(3)}"
                )
            self._reserved.add(job_id)
        try:
            return self._submit(spec, job_id)
        finally:
            with self._lock:
                self._reserved.discard(job_id)

    def _submit(self, spec: common_pb2.JobSpec, job_id: str) -> JobView:
        if self.jobs_store.has_job(job_id):
            raise AlreadyExistsError(
                f"job {job_id!r} already exists in the store (unreadable "
                "or from another scheduler)",
                field="job_id",
            )
        prepared = kinds.validate(spec, self.context)
        target = _output_of(prepared.resolved.volumes)
        with self._lock:
            self._claim_output(target)
        try:
            return self._create(spec, job_id, prepared)
        finally:
            with self._lock:
                self._writing.discard(target)

    def _claim_output(self, target: tuple[str, str] | None) -> None:
        """One job per output at a time: refuse an output a live job writes."""
        if target is None:
            return
        where = f"{target[0].rstrip('/')}/{target[1]}"
        for other in self._jobs.values():
            if not other.terminal and _output_of(other.record.volumes) == target:
                raise AlreadyExistsError(
                    f"output {where} is being written by job {other.id!r} "
                    f"({other.state.lower()}); wait for it or cancel it",
                    field="output",
                )
        if target in self._writing:
            raise AlreadyExistsError(
                f"output {where} is named by another job being submitted", field="output"
            )
        self._writing.add(target)

    def _create(
        self, spec: common_pb2.JobSpec, job_id: str, prepared: kinds.PreparedJob
    ) -> JobView:
        kind = kinds.get_kind(prepared.kind)
        now = self.clock()
        record = JobRecord(
            job_id,
            prepared.kind,
            spec,
            prepared.resolved.spec,
            now,
            spec.max_attempts or self.settings.max_attempts,
            dict(prepared.outputs),
            dict(prepared.resolved.volumes),
            tuple(prepared.notes),
        )
        created = create_outputs(prepared.volumes, job_id)
        try:
            first = kind.plan(0, prepared.resolved)
            if first is None:
                raise InvalidArgumentError(f"job kind {kind.name!r} has no stages", field="spec")
            self.jobs_store.save_job(record)
            self.jobs_store.save_stage(job_id, first)
        except BaseException:
            # Nothing half-written stays behind.
            self.jobs_store.delete_job(job_id)
            remove_outputs(created)
            raise
        with self._lock:
            job = Job(record, "PENDING", now, outputs=dict(record.outputs))
            self._jobs[job_id] = job
            self._emit(job, message="submitted")
            for note in prepared.notes:
                self._emit(job, message=note)
            self._add_stage(job, first, now)
            self._update_gauges()
            self._update_job_gauge()
            log.info(
                "job submitted",
                extra={"job_id": job_id, "kind": kind.name, "tasks": first.n_tasks},
            )
            return self._view(job)

    def _get(self, job_id: str) -> Job:
        job = self._jobs.get(kinds.check_job_id(job_id))
        if job is None:
            raise NotFoundError(f"job {job_id!r} not found", field="job_id")
        return job

    def get(self, job_id: str) -> JobView:
        with self._lock:
            return self._view(self._get(job_id))

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
        with self._lock:
            jobs = sorted(
                (j for j in self._jobs.values() if not wanted or j.state in wanted),
                key=lambda j: (j.record.created_unix_s, j.id),
                reverse=True,
            )
            jobs = jobs[max(0, offset) :]
            return [self._view(j) for j in (jobs[:limit] if limit else jobs)]

    def cancel(self, job_id: str) -> JobView:
        """Cancel a job: pending tasks dropped, running ones told at their next heartbeat."""
        with self._lock:
            job = self._get(job_id)
            if not job.terminal:
                self.jobs_store.mark_cancelled(job_id)
                running = len(self.queue.cancel_job(job_id))
                self._finish(job, "CANCELLED", f"cancelled; {running} running task(s) told to stop")
            return self._view(job)

    def watch(self, job_id: str) -> tuple[ProgressEvent, Subscription | None]:
        """The job's current state and, unless it has ended, a subscription to what follows."""
        with self._lock:
            job = self._get(job_id)
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
    def _lease_length(self, requested: float) -> float:
        if requested <= 0:
            return self.settings.lease_seconds
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
        now = self.clock()
        with self._lock:
            leases = self.queue.lease(
                role, worker_id, max_tasks or 1, now, self._lease_length(lease_seconds)
            )
            out = []
            for lease in leases:
                job = self._jobs[lease.job_id]
                if job.state == "PENDING":
                    self._set_state(job, "RUNNING", now)
                if not job.stage_started:
                    job.stage_started = now
                self._refresh_counts(job, lease.stage)
                out.append(self._grant(job, lease))
            if leases:
                self._update_gauges(role)
            return out

    def lease_role(self, lease_id: str) -> str | None:
        """The role whose task ``lease_id`` names; None for a lease of no known job."""
        named = parse_lease_id(lease_id)
        if named is None:
            return None
        with self._lock:
            job = self._jobs.get(named[0])
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
        """Extend a lease, passing on the task's progress; returns (new deadline, cancelled)."""
        now = self.clock()
        with self._lock:
            lease = self.queue.renew(lease_id, worker_id, now)
            job = self._jobs.get(lease.job_id)
            if job is not None and not lease.cancelled and (metrics or message):
                self._emit(
                    job,
                    message=message,
                    task_id=job.task_id(lease.stage, lease.task),
                    metrics=dict(metrics or {}),
                )
            return lease.deadline, lease.cancelled

    def complete(
        self,
        lease_id: str,
        worker_id: str,
        metrics: Mapping[str, float] | None = None,
        outputs: Mapping[str, str] | None = None,
    ) -> None:
        """Record a completion; acknowledged only once persisted. Stale leases are refused."""
        metrics = dict(metrics or {})
        outputs = dict(outputs or {})
        now = self.clock()
        with self._lock:
            lease = self.queue.complete(lease_id, worker_id, now)
            job = self._jobs[lease.job_id]
            task_id = job.task_id(lease.stage, lease.task)
            refused = self._refuse_completion(job, lease, metrics)
            if refused:
                self.queue.revert(lease)
        if refused:
            # Counted as a failed attempt: retried, then quarantined, never done.
            self.fail(lease_id, worker_id, JobError("FAILED_PRECONDITION", refused), True)
            raise FailedPreconditionError(f"task {task_id}: {refused}", field="metrics")
        record = {
            "task_id": task_id,
            "worker_id": worker_id,
            "attempt": lease.attempt,
            "finished_unix_s": now,
            "metrics": metrics,
            "outputs": outputs,
        }
        try:
            self.jobs_store.mark_done(lease.job_id, lease.stage, lease.task, record)
        except Exception as exc:
            with self._lock:
                self.queue.revert(lease)
            log.exception("cannot record completion of %s", task_id)
            raise UnavailableError(
                f"cannot record the completion of task {task_id} in the store: {exc}", field="store"
            ) from exc
        with self._lock:
            self.queue.confirm(lease)
            voxels = float(metrics.get("voxels", 0.0))
            m.TASKS_COMPLETED.labels(role=lease.role).inc()
            m.TASK_SECONDS.labels(role=lease.role).observe(max(0.0, now - lease.leased_at))
            if voxels > 0:
                m.VOXELS_PROCESSED.labels(role=lease.role).inc(voxels)
            if job.terminal:
                return
            job.record_completion(now, voxels, metrics, outputs)
            self._refresh_counts(job, lease.stage)
            self._emit(job, task_id=task_id, metrics={"voxels": voxels} if voxels else None)
            stage = job.current
            self._check_stage(job, now)
            # A finished stage may have started the next one, of another role.
            self._update_gauges(lease.role if job.current is stage else None)

    def fail(self, lease_id: str, worker_id: str, error: JobError, retryable: bool) -> bool:
        """Record a failed attempt; returns True when the task will not be retried."""
        now = self.clock()
        with self._lock:
            outcome = self.queue.fail(lease_id, worker_id, retryable, error.message, now)
            if outcome.dropped:
                self._update_gauges()
                return True
            lease = outcome.lease
            job = self._jobs[lease.job_id]
            task_id = job.task_id(lease.stage, lease.task)
            if outcome.quarantined:
                self._quarantine(
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
                self._refresh_counts(job, lease.stage)
                self._emit(
                    job,
                    task_id=task_id,
                    error=error.message,
                    message=f"task {task_id} failed (attempt {outcome.attempts} of "
                    f"{job.record.max_attempts}); retrying in "
                    f"{outcome.retry_at - now:.1f} s",
                )
            self._update_gauges()
            return outcome.quarantined

    def expire_leases(self) -> int:
        """Re-queue (or quarantine) expired leases; returns how many expired."""
        now = self.clock()
        with self._lock:
            expired = self.queue.expire(now)
            for e in expired:
                if e.dropped:
                    continue
                m.LEASES_EXPIRED.labels(role=e.lease.role).inc()
                job = self._jobs.get(e.lease.job_id)
                if job is None or job.terminal:
                    continue
                task_id = job.task_id(e.lease.stage, e.lease.task)
                message = (
                    f"lease expired: worker {e.lease.worker_id!r} stopped renewing "
                    f"(attempt {e.lease.attempt})"
                )
                if e.quarantined:
                    self._quarantine(
                        job, e.lease, task_id, "UNAVAILABLE", message, now, attempts=e.lease.attempt
                    )
                else:
                    self._refresh_counts(job, e.lease.stage)
                    self._emit(job, task_id=task_id, message=message + "; re-queued")
            if expired:
                self._update_gauges()
            return len(expired)

    # -- statistics -------------------------------------------------------------------
    def queue_stats(self) -> dict[str, tuple[int, int]]:
        """(pending, leased) tasks per worker role; every role is listed."""
        with self._lock:
            counts = self.queue.role_counts()
        return {role: counts.get(role, (0, 0)) for role in WORKER_ROLES}

    def pending_by_role(self) -> dict[str, int]:
        return {role: c[0] for role, c in self.queue_stats().items()}

    def leased_by_role(self) -> dict[str, int]:
        return {role: c[1] for role, c in self.queue_stats().items()}

    # -- internals (caller holds the lock) ---------------------------------------------
    def _unrecorded(self, job: Job, plan: StagePlan) -> str:
        """The final check before a stage's outputs are sealed: every task has its
        (verified) completion record in the store; why not, else ""."""
        try:
            recorded = len(set(self.jobs_store.done_tasks(job.id, plan.name).tolist()))
        except Exception as exc:  # an unreadable store seals nothing
            return f"cannot list the completion records: {_describe(exc)[1]}"
        if recorded < plan.n_tasks:
            return (
                f"only {recorded} of {plan.n_tasks} task(s) have a completion record in the "
                "store; the output is not marked complete"
            )
        return ""

    def _refuse_completion(self, job: Job, lease: Lease, metrics: Mapping[str, float]) -> str:
        plan = job.current
        if plan is None or plan.name != lease.stage:
            return ""
        return kinds.get_kind(job.record.kind).check_completion(
            plan, lease.task, metrics, job.record.resolution
        )

    def _view(self, job: Job) -> JobView:
        return job.view(kinds.get_kind(job.record.kind).stages)

    def _grant(self, job: Job, lease: Lease) -> Grant:
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

    def _add_stage(self, job: Job, plan: StagePlan, now: float) -> None:
        job.start_stage(
            plan,
            self.queue.add_stage(
                job.id, plan.name, plan.role, plan.n_tasks, max_attempts=job.record.max_attempts
            ),
        )
        self._emit(
            job,
            message=f"stage {plan.name!r} planned: {plan.n_tasks} task(s) for the {plan.role} role",
        )
        self._check_stage(job, now)

    def _start_next_stage(self, job: Job, index: int, now: float) -> None:
        try:
            plan = kinds.get_kind(job.record.kind).plan(index, job.record.resolution)
            if plan is not None:
                self.jobs_store.save_stage(job.id, plan)
        except Exception as exc:
            code, message = _describe(exc)
            log.exception("cannot plan stage %d of job %s", index, job.id)
            job.add_error(JobError(code, f"planning stage {index} failed: {message}"))
            self._finish(job, "FAILED", f"planning stage {index} failed: {message}")
            return
        if plan is None:
            self._finish(job, "SUCCEEDED", "all stages done")
            return
        self._add_stage(job, plan, now)

    def _check_stage(self, job: Job, now: float) -> None:
        """Advance, fail or finish the job once its current stage has settled."""
        plan = job.current
        if plan is None or job.terminal:
            return
        counts = self._refresh_counts(job, plan.name)
        if counts.quarantined and (counts.settled or counts.quarantined >= QUARANTINE_LIMIT):
            ids = [e.task_id for e in job.errors if e.task_id][:10]
            more = counts.quarantined - len(ids)
            details = "; ".join(f"{e.task_id}: {e.message}" for e in job.errors[:5])
            self._finish(
                job,
                "FAILED",
                f"{counts.quarantined} task(s) of stage {plan.name!r} failed "
                f"repeatedly and were quarantined: {', '.join(ids)}"
                + (f" and {more} more" if more > 0 else "")
                + f" ({details})",
            )
            return
        if counts.done < counts.total:
            return
        missing = self._unrecorded(job, plan)
        if missing:
            job.add_error(JobError("DATA_LOSS", missing))
            self._finish(job, "FAILED", f"finishing stage {plan.name!r}: {missing}")
            return
        try:
            kinds.get_kind(job.record.kind).on_stage_finished(
                plan, job.record.resolution, self.context, job.id
            )
        except Exception as exc:
            _, message = _describe(exc)
            log.exception("finishing stage %s of job %s failed", plan.name, job.id)
            job.add_error(JobError("INTERNAL", f"finishing stage {plan.name!r}: {message}"))
            self._finish(job, "FAILED", f"finishing stage {plan.name!r} failed: {message}")
            return
        self._start_next_stage(job, plan.index + 1, now)

    def _quarantine(
        self,
        job: Job,
        lease: Lease,
        task_id: str,
        code: str,
        message: str,
        now: float,
        *,
        attempts: int,
    ) -> None:
        m.TASKS_QUARANTINED.labels(role=lease.role).inc()
        record = {
            "task_id": task_id,
            "code": code,
            "message": message,
            "attempts": attempts,
            "worker_id": lease.worker_id,
            "unix_s": now,
        }
        try:
            self.jobs_store.save_quarantine(job.id, lease.stage, lease.task, record)
        except Exception:  # the job still fails now; only a restart would retry the task
            log.exception("cannot persist the quarantine of %s", task_id)
        job.add_error(JobError(code, message, task_id=task_id))
        self._refresh_counts(job, lease.stage)
        self._emit(
            job,
            task_id=task_id,
            error=message,
            message=f"task {task_id} quarantined after {attempts} attempt(s)",
        )
        log.warning(
            "task quarantined", extra={"job_id": job.id, "task_id": task_id, "error": message}
        )
        self._check_stage(job, now)

    def _refresh_counts(self, job: Job, stage: str) -> StageCounts:
        if self.queue.has_stage(job.id, stage):
            job.counts[stage] = self.queue.counts(job.id, stage)
        return job.counts[stage]

    def _set_state(self, job: Job, state: str, now: float, message: str = "") -> None:
        job.state = state
        job.updated = now
        self._emit(job, message=message or state.lower())
        self._update_job_gauge()

    def _finish(self, job: Job, state: str, message: str) -> None:
        now = self.clock()
        plan = job.current
        if plan is not None:
            self._refresh_counts(job, plan.name)
        self.queue.cancel_job(job.id)
        self.queue.remove_job(job.id)
        job.state = state
        job.updated = now
        job.final_message = message
        try:
            self.jobs_store.save_result(job.id, job.result_document(now))
        except Exception:  # still finished here; a restart would resume it
            log.exception("cannot persist the result of job %s", job.id)
        error = message if state == "FAILED" else ""
        self._emit(job, message=message, error=error)
        self._update_job_gauge()
        log.info("job finished", extra={"job_id": job.id, "state": state, "detail": message})

    def _emit(self, job: Job, **kwargs: Any) -> None:
        # Published under the lock, so every subscriber sees events in order.
        self.bus.publish(job.event(self.clock(), **kwargs))

    def _update_gauges(self, role: str | None = None) -> None:
        """Refresh the queue gauges (of one role, on the hot paths)."""
        counts = self.queue.role_counts()
        for name, (pending_gauge, leased_gauge) in _QUEUE_GAUGES.items():
            if role is not None and name != role:
                continue
            pending, leased = counts.get(name, (0, 0))
            pending_gauge.set(pending)
            leased_gauge.set(leased)

    def _update_job_gauge(self) -> None:
        by_state = dict.fromkeys(JOB_STATES, 0)
        for job in self._jobs.values():
            by_state[job.state] += 1
        for state, n in by_state.items():
            m.JOBS.labels(state=state).set(n)
