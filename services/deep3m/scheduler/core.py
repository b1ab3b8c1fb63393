"""The transport-neutral scheduler: jobs, stages, leases, durability, progress.

``Scheduler`` owns the task queue (``queue``), the planner, the persisted
state (``persistence``), one ``EventBus`` of progress events and the
Prometheus metrics. The gRPC servicer is a thin shell over it.

Job states: PENDING (submitted, nothing leased yet) → RUNNING → SUCCEEDED,
FAILED (a task was quarantined: the error lists the task ids and messages) or
CANCELLED. A completion is acknowledged only once its record is in the store;
a restarted scheduler resumes every unfinished job from there.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from deep3m.core.errors import (
    AlreadyExistsError,
    Deep3mError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from deep3m.core.events import EventBus, ProgressEvent, Subscription
from deep3m.core.locations import StoreRoots
from deep3m.core.store import Store
from deep3m.runtime import metrics as m
from deep3m.runtime.progress_proto import JOB_STATES, TERMINAL_STATES, state_to_proto
from deep3m.runtime.settings import ROLES, Settings
from deep3m.scheduler.persistence import JobRecord, JobStore, spec_to_json
from deep3m.scheduler.planner import JOB_KINDS, Planner, StagePlan, check_job_id, job_kind
from deep3m.scheduler.queue import Lease, StageCounts, TaskQueue
from deep3m.v1 import common_pb2

log = logging.getLogger("deep3m.scheduler")

WORKER_ROLES = tuple(r for r in ROLES if r != "scheduler")
# A job whose tasks keep failing is given up early rather than after every block.
QUARANTINE_LIMIT = 16
MAX_JOB_ERRORS = 100
MIN_LEASE_S = 0.2
MAX_LEASE_S = 3600.0
MAX_TASKS_PER_LEASE = 256
# Labelled children looked up once: these gauges change on every lease and completion.
_QUEUE_GAUGES = {
    role: (m.TASKS_PENDING.labels(role=role), m.TASKS_LEASED.labels(role=role))
    for role in WORKER_ROLES
}


@dataclass
class _Job:
    record: JobRecord
    state: str
    updated: float
    stages: list[StagePlan] = field(default_factory=list)
    counts: dict[str, StageCounts] = field(default_factory=dict)
    errors: list[common_pb2.ErrorDetail] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    # Rate and ETA of the current stage, over this scheduler's lifetime.
    stage_started: float = 0.0
    session_tasks: int = 0
    session_voxels: float = 0.0
    final_message: str = ""

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def current(self) -> StagePlan | None:
        return self.stages[-1] if self.stages else None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


def _error(
    code: str, message: str, *, task_id: str = "", field_name: str = ""
) -> common_pb2.ErrorDetail:
    return common_pb2.ErrorDetail(code=code, message=message, task_id=task_id, field=field_name)


class Scheduler:
    """Thread-safe. ``recover()`` once before serving; ``start()`` runs the lease reaper."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        planner: Planner | None = None,
        bus: EventBus | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        roots = StoreRoots.from_settings(settings)
        self.store = store or roots.store()
        self.jobs_store = JobStore(self.store)
        self.planner = planner or Planner(
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
        self._jobs: dict[str, _Job] = {}
        self._reserved: set[str] = set()
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
                    resumed += self._recover_job(job_id, now, hold_until)
                except Deep3mError as exc:
                    log.error(
                        "cannot resume job %s: %s", job_id, exc.message, extra={"job_id": job_id}
                    )
            self._update_gauges()
            self._update_job_gauge()
        if resumed:
            log.info("resumed %d job(s)", resumed, extra={"jobs": resumed})
        return resumed

    def _recover_job(self, job_id: str, now: float, hold_until: float) -> int:
        record = self.jobs_store.load_job(job_id)
        result = self.jobs_store.load_result(job_id)
        if result is not None:
            self._jobs[job_id] = self._job_from_result(record, result)
            return 0
        job = _Job(record, "PENDING", now, outputs=dict(record.outputs))
        self._jobs[job_id] = job
        if self.jobs_store.is_cancelled(job_id):
            self._finish(job, "CANCELLED", "cancelled")
            return 0
        plans = self.jobs_store.load_stages(job_id)
        if not plans:  # stopped between writing the job and its first stage
            self._start_next_stage(job, 0, now)
            return 1
        job.stages = plans
        for plan in plans[:-1]:
            job.counts[plan.name] = StageCounts(plan.n_tasks, 0, 0, plan.n_tasks, 0)
        current = plans[-1]
        done = self.jobs_store.done_tasks(job_id, current.name)
        quarantined = self.jobs_store.quarantined(job_id, current.name)
        for task, rec in sorted(quarantined.items()):
            self._add_error(
                job,
                _error(
                    str(rec.get("code", "")),
                    str(rec.get("message", "")),
                    task_id=current.task(task).id,
                ),
            )
        job.counts[current.name] = self.queue.add_stage(
            job_id,
            current.name,
            current.role,
            current.n_tasks,
            max_attempts=record.max_attempts,
            done=done,
            quarantined={t: str(r.get("message", "")) for t, r in quarantined.items()},
            hold_until=hold_until,
        )
        if current.n_tasks == 1 and done.size:
            # A finished single-task stage (finalize) carries job-level results.
            rec = self.jobs_store.done_record(job_id, current.name, 0)
            job.outputs.update({str(k): str(v) for k, v in rec.get("outputs", {}).items()})
            job.metrics.update(
                {str(k): float(v) for k, v in rec.get("metrics", {}).items() if k != "voxels"}
            )
        if len(plans) > 1 or done.size or quarantined:
            job.state = "RUNNING"
        self._emit(
            job,
            message=f"resumed: {done.size} of {current.n_tasks} task(s) of stage "
            f"{current.name!r} already done",
        )
        self._check_stage(job, now)
        return 1

    def _job_from_result(self, record: JobRecord, result: Mapping[str, Any]) -> _Job:
        job = _Job(
            record,
            str(result.get("state", "FAILED")),
            float(result.get("finished_unix_s", record.created_unix_s)),
            outputs={str(k): str(v) for k, v in result.get("outputs", {}).items()},
            metrics={str(k): float(v) for k, v in result.get("metrics", {}).items()},
        )
        job.final_message = str(result.get("message", ""))
        for e in result.get("errors", []):
            job.errors.append(json_format.ParseDict(e, common_pb2.ErrorDetail()))
        for name, c in result.get("stages", {}).items():
            job.counts[str(name)] = StageCounts(
                int(c["total"]),
                int(c["pending"]),
                int(c["leased"]),
                int(c["done"]),
                int(c["quarantined"]),
            )
        return job

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
    def submit(self, spec: common_pb2.JobSpec, job_id: str = "") -> common_pb2.Job:
        """Validate, create outputs, persist and queue a job; same id and spec: a no-op."""
        kind = job_kind(spec)
        if job_id:
            check_job_id(job_id)
        with self._lock:
            if job_id and job_id in self._jobs:
                existing = self._jobs[job_id]
                if spec_to_json(existing.record.spec) == spec_to_json(spec):
                    return self._job_proto(existing)
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
            return self._submit(spec, kind, job_id)
        finally:
            with self._lock:
                self._reserved.discard(job_id)

    def _submit(self, spec: common_pb2.JobSpec, kind: str, job_id: str) -> common_pb2.Job:
        if self.jobs_store.has_job(job_id):
            raise AlreadyExistsError(
                f"job {job_id!r} already exists in the store (unreadable "
                "or from another scheduler)",
                field="job_id",
            )
        prepared = self.planner.validate(spec)
        now = self.clock()
        record = JobRecord(
            job_id,
            kind,
            spec,
            prepared.resolved,
            now,
            spec.max_attempts or self.settings.max_attempts,
            dict(prepared.outputs),
        )
        created = self.planner.create_outputs(prepared, job_id)
        try:
            first = self.planner.plan_stage(kind, prepared.resolved, 0)
            if first is None:
                raise InvalidArgumentError(f"job kind {kind!r} has no stages", field="spec")
            self.jobs_store.save_job(record)
            self.jobs_store.save_stage(job_id, first)
        except BaseException:
            # Nothing half-written stays behind.
            self.jobs_store.delete_job(job_id)
            self.planner.remove_outputs(created)
            raise
        with self._lock:
            job = _Job(record, "PENDING", now, outputs=dict(record.outputs))
            self._jobs[job_id] = job
            self._emit(job, message="submitted")
            self._add_stage(job, first, now)
            self._update_gauges()
            self._update_job_gauge()
            log.info(
                "job submitted", extra={"job_id": job_id, "kind": kind, "tasks": first.n_tasks}
            )
            return self._job_proto(job)

    def _get(self, job_id: str) -> _Job:
        job = self._jobs.get(check_job_id(job_id))
        if job is None:
            raise NotFoundError(f"job {job_id!r} not found", field="job_id")
        return job

    def get(self, job_id: str) -> common_pb2.Job:
        with self._lock:
            return self._job_proto(self._get(job_id))

    def list_jobs(self, states: Sequence[str] = (), limit: int = 0) -> list[common_pb2.Job]:
        """Jobs, newest first, optionally only those in ``states``."""
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
            return [self._job_proto(j) for j in (jobs[:limit] if limit else jobs)]

    def cancel(self, job_id: str) -> common_pb2.Job:
        """Cancel a job: pending tasks dropped, running ones told at their next heartbeat."""
        with self._lock:
            job = self._get(job_id)
            if not job.terminal:
                self.jobs_store.mark_cancelled(job_id)
                running = len(self.queue.cancel_job(job_id))
                self._finish(job, "CANCELLED", f"cancelled; {running} running task(s) told to stop")
            return self._job_proto(job)

    def watch(self, job_id: str) -> tuple[ProgressEvent, Subscription | None]:
        """The job's current state and, unless it has ended, a subscription to what follows."""
        with self._lock:
            job = self._get(job_id)
            if job.terminal:
                return self._event(
                    job,
                    message=job.final_message,
                    error=job.final_message if job.state == "FAILED" else "",
                ), None
            first = self._event(job, message="current state")
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
    ) -> list[common_pb2.TaskLease]:
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
                out.append(self._lease_proto(job, lease))
            if leases:
                self._update_gauges(role)
            return out

    def renew(
        self, lease_id: str, worker_id: str, progress: common_pb2.ProgressEvent | None = None
    ) -> tuple[float, bool]:
        """Extend a lease; returns (new deadline, cancelled)."""
        now = self.clock()
        with self._lock:
            lease = self.queue.renew(lease_id, worker_id, now)
            job = self._jobs.get(lease.job_id)
            if (
                job is not None
                and not lease.cancelled
                and progress is not None
                and (progress.metrics or progress.message)
            ):
                task_id = self._task_id(job, lease)
                self._emit(
                    job, message=progress.message, task_id=task_id, metrics=dict(progress.metrics)
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
            task_id = self._task_id(job, lease)
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
            job.updated = now
            job.session_tasks += 1
            job.session_voxels += voxels
            if voxels:
                job.metrics["voxels"] = job.metrics.get("voxels", 0.0) + voxels
            if job.current is not None and job.current.n_tasks == 1:
                # Single-task stages (finalize) report job-level results.
                job.metrics.update({k: float(v) for k, v in metrics.items() if k != "voxels"})
            job.outputs.update(outputs)
            self._refresh_counts(job, lease.stage)
            self._emit(job, task_id=task_id, metrics={"voxels": voxels} if voxels else None)
            stage = job.current
            self._check_stage(job, now)
            # A finished stage may have started the next one, of another role.
            self._update_gauges(lease.role if job.current is stage else None)

    def fail(
        self, lease_id: str, worker_id: str, error: common_pb2.ErrorDetail, retryable: bool
    ) -> bool:
        """Record a failed attempt; returns True when the task will not be retried."""
        now = self.clock()
        with self._lock:
            outcome = self.queue.fail(lease_id, worker_id, retryable, error.message, now)
            if outcome.dropped:
                self._update_gauges()
                return True
            lease = outcome.lease
            job = self._jobs[lease.job_id]
            task_id = self._task_id(job, lease)
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
                task_id = self._task_id(job, e.lease)
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
    def _task_id(self, job: _Job, lease: Lease) -> str:
        for plan in reversed(job.stages):
            if plan.name == lease.stage:
                return plan.task(lease.task).id
        return f"{lease.stage}/{lease.task}"

    def _add_stage(self, job: _Job, plan: StagePlan, now: float) -> None:
        job.stages.append(plan)
        job.counts[plan.name] = self.queue.add_stage(
            job.id, plan.name, plan.role, plan.n_tasks, max_attempts=job.record.max_attempts
        )
        job.stage_started = 0.0
        job.session_tasks = 0
        job.session_voxels = 0.0
        self._emit(
            job,
            message=f"stage {plan.name!r} planned: {plan.n_tasks} task(s) for the {plan.role} role",
        )
        self._check_stage(job, now)

    def _start_next_stage(self, job: _Job, index: int, now: float) -> None:
        try:
            plan = self.planner.plan_stage(job.record.kind, job.record.resolved, index)
            if plan is not None:
                self.jobs_store.save_stage(job.id, plan)
        except Exception as exc:
            message = exc.message if isinstance(exc, Deep3mError) else repr(exc)
            code = exc.grpc_code_name if isinstance(exc, Deep3mError) else "INTERNAL"
            log.exception("cannot plan stage %d of job %s", index, job.id)
            self._add_error(job, _error(code, f"planning stage {index} failed: {message}"))
            self._finish(job, "FAILED", f"planning stage {index} failed: {message}")
            return
        if plan is None:
            self._finish(job, "SUCCEEDED", "all stages done")
            return
        self._add_stage(job, plan, now)

    def _check_stage(self, job: _Job, now: float) -> None:
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
        try:
            self.planner.stage_finished(job.record.kind, job.record.resolved, plan, job.id)
        except Exception as exc:
            message = exc.message if isinstance(exc, Deep3mError) else repr(exc)
            log.exception("finishing stage %s of job %s failed", plan.name, job.id)
            self._add_error(job, _error("INTERNAL", f"finishing stage {plan.name!r}: {message}"))
            self._finish(job, "FAILED", f"finishing stage {plan.name!r} failed: {message}")
            return
        self._start_next_stage(job, plan.index + 1, now)

    def _quarantine(
        self,
        job: _Job,
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
        self._add_error(job, _error(code, message, task_id=task_id))
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

    def _add_error(self, job: _Job, error: common_pb2.ErrorDetail) -> None:
        if len(job.errors) < MAX_JOB_ERRORS:
            job.errors.append(error)

    def _refresh_counts(self, job: _Job, stage: str) -> StageCounts:
        if self.queue.has_stage(job.id, stage):
            job.counts[stage] = self.queue.counts(job.id, stage)
        return job.counts[stage]

    def _set_state(self, job: _Job, state: str, now: float, message: str = "") -> None:
        job.state = state
        job.updated = now
        self._emit(job, message=message or state.lower())
        self._update_job_gauge()

    def _finish(self, job: _Job, state: str, message: str) -> None:
        now = self.clock()
        plan = job.current
        if plan is not None:
            self._refresh_counts(job, plan.name)
        self.queue.cancel_job(job.id)
        self.queue.remove_job(job.id)
        job.state = state
        job.updated = now
        job.final_message = message
        result = {
            "state": state,
            "message": message,
            "finished_unix_s": now,
            "errors": [
                json_format.MessageToDict(e, preserving_proto_field_name=True) for e in job.errors
            ],
            "outputs": job.outputs,
            "metrics": job.metrics,
            "stages": {
                name: {
                    "total": c.total,
                    "pending": c.pending,
                    "leased": c.leased,
                    "done": c.done,
                    "quarantined": c.quarantined,
                }
                for name, c in job.counts.items()
            },
        }
        try:
            self.jobs_store.save_result(job.id, result)
        except Exception:  # still finished here; a restart would resume it
            log.exception("cannot persist the result of job %s", job.id)
        error = message if state == "FAILED" else ""
        self._emit(job, message=message, error=error)
        self._update_job_gauge()
        log.info("job finished", extra={"job_id": job.id, "state": state, "detail": message})

    def _event(
        self,
        job: _Job,
        *,
        message: str = "",
        error: str = "",
        task_id: str = "",
        metrics: Mapping[str, float] | None = None,
    ) -> ProgressEvent:
        plan = job.current
        counts = job.counts.get(plan.name) if plan is not None else None
        now = self.clock()
        rate = eta = 0.0
        if counts is not None and job.stage_started and job.session_tasks and not job.terminal:
            elapsed = max(now - job.stage_started, 1e-6)
            rate = job.session_voxels / elapsed
            remaining = counts.total - counts.done - counts.quarantined
            eta = remaining * elapsed / job.session_tasks
        return ProgressEvent(
            job_id=job.id,
            state=job.state,
            stage=plan.name if plan is not None else "",
            tasks_done=counts.done if counts else 0,
            tasks_total=counts.total if counts else 0,
            voxels_per_second=rate,
            eta_seconds=eta,
            message=message,
            metrics=dict(metrics or {}),
            error=error,
            task_id=task_id,
            time_unix_s=now,
        )

    def _emit(self, job: _Job, **kwargs: Any) -> None:
        # Published under the lock, so every subscriber sees events in order.
        self.bus.publish(self._event(job, **kwargs))

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

    # -- protos ----------------------------------------------------------------------
    def _job_proto(self, job: _Job) -> common_pb2.Job:
        out = common_pb2.Job(
            id=job.id,
            spec=job.record.resolved,
            state=state_to_proto(job.state),
            created_unix_s=job.record.created_unix_s,
            updated_unix_s=job.updated,
            errors=job.errors,
        )
        out.outputs.update(job.outputs)
        out.metrics.update(job.metrics)
        for sdef in JOB_KINDS[job.record.kind]:
            c = job.counts.get(sdef.name)
            status = out.stages.add(name=sdef.name, role=sdef.role)
            if c is not None:
                status.tasks_total = c.total
                status.tasks_done = c.done
                status.tasks_leased = c.leased
                status.tasks_quarantined = c.quarantined
        return out

    def _lease_proto(self, job: _Job, lease: Lease) -> common_pb2.TaskLease:
        plan = job.current
        if plan is None or plan.name != lease.stage:
            raise NotFoundError(
                f"job {job.id!r} has no current stage {lease.stage!r}", field="stage"
            )
        spec = plan.task(lease.task)
        task = common_pb2.Task(
            id=spec.id, job_id=job.id, stage=lease.stage, role=lease.role, attempt=lease.attempt
        )
        task.params.update(spec.params)
        if spec.block is not None:
            task.block.core.start.extend(spec.block.core.start)
            task.block.core.stop.extend(spec.block.core.stop)
            task.block.read.start.extend(spec.block.read.start)
            task.block.read.stop.extend(spec.block.read.stop)
        return common_pb2.TaskLease(
            task=task,
            spec=job.record.resolved,
            lease_id=lease.lease_id,
            deadline_unix_s=lease.deadline,
        )
