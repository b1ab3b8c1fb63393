"""The transport-neutral scheduler: the job and task state machine.

``Scheduler`` owns the task queue (``queue``), the job kinds (``kinds``),
the persisted state (``persistence``), one ``EventBus`` of progress events and
the Prometheus metrics. It speaks plain values (``JobView``, ``Grant``,
``JobError``); the gRPC servicer and the in-process worker client convert.

Job states: PENDING (submitted, nothing leased yet) → RUNNING → SUCCEEDED,
FAILED (a task was quarantined: the error lists the task ids and messages) or
CANCELLED. A completion is acknowledged only once its record is in the store;
a restarted scheduler resumes every unfinished job from there (``recovery``).

No store I/O happens under the scheduler's lock, so a slow store never holds up
leases and renewals: a method decides under the lock, queues the writes it
implies (a cancel marker, a stage's end and the next plan, a quarantine
record, a result) and runs them after releasing it, on the calling thread,
before it returns. Finished jobs are indexed (``persistence.FINISHED_KEY``);
after a restart they are loaded only when asked for, and pruned once older
than ``finished_job_retention_days``.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from deep3m.core.executor import bounded_map
from deep3m.core.locations import StoreRoots
from deep3m.core.store import Store
from deep3m.runtime import metrics as m
from deep3m.runtime.settings import ROLES, Settings
from deep3m.scheduler import kinds
from deep3m.scheduler.jobs import Grant, Job, JobError, JobView
from deep3m.scheduler.kinds import VolumeFacts
from deep3m.scheduler.kinds.refs import create_outputs, remove_outputs
from deep3m.scheduler.persistence import READ_THREADS, JobRecord, JobStore, spec_to_json
from deep3m.scheduler.queue import Lease, StageCounts, TaskQueue, parse_lease_id
from deep3m.scheduler.recovery import JobDocuments, load_job, rebuild_job
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
MAX_COMPLETIONS_PER_CALL = 1024
# Finished jobs past their retention are looked for this often.
PRUNE_INTERVAL_S = 3600.0
# Labelled children looked up once: these gauges change on every lease and completion.
_QUEUE_GAUGES = {
    role: (m.TASKS_PENDING.labels(role=role), m.TASKS_LEASED.labels(role=role))
    for role in WORKER_ROLES
}


# One completion of a batch: (lease id, metrics, outputs).
Completion = tuple[str, Mapping[str, float] | None, Mapping[str, str] | None]


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
        self.jobs_store = JobStore(self.store, retry_s=settings.store_retry_seconds)
        self.context = context or kinds.KindContext(
            roots,
            max_region_voxels=settings.max_region_voxels,
            restrict_local_inputs=settings.restrict_local_inputs,
            store_retry_s=settings.store_retry_seconds,
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
        # Store writes decided under the lock, run by the same thread after it.
        self._local = threading.local()
        # Finished jobs known from the index, loaded on first use: id → index entry.
        self._unloaded: dict[str, dict[str, Any]] = {}
        self._recovering = False
        self._recovered = False
        self._next_prune = 0.0

    # -- lifecycle ----------------------------------------------------------------
    def begin_recovery(self) -> None:
        """Answer UNAVAILABLE (retry) to every request until ``recover`` has finished."""
        self._recovering = True

    def _check_ready(self) -> None:
        if self._recovering:
            raise UnavailableError(
                "the scheduler is still recovering jobs from the store; retry shortly",
                field="scheduler",
            )

    def recover(self) -> int:
        """Rebuild every job from the store; returns how many were resumed.

        Finished jobs in the index are not read (they load when asked for);
        every other job is read in parallel, then rebuilt under the lock.
        """
        if self._recovered:  # once per instance: a second pass would find nothing new
            self._recovering = False
            return 0
        self._recovering = True
        try:
            resumed = self._recover()
            self._recovered = True
            return resumed
        finally:
            self._recovering = False

    def _recover(self) -> int:
        now = self.clock()
        # Workers that held leases before a restart get this long to renew and
        # adopt them before their tasks are handed to anyone else.
        hold_until = now + min(self.settings.lease_seconds / 2, 30.0)
        earlier = self.jobs_store.register_epoch(self.queue.epoch)
        index = self.jobs_store.finished_index()
        listed = self.jobs_store.listed_job_ids()
        with self._lock:
            self.queue.allow_adoption_from(earlier)
            known = set(self._jobs)
            for job_id in listed:
                if job_id in index and job_id not in known:
                    self._unloaded[job_id] = index[job_id]
        todo = [j for j in listed if j not in index and j not in known]
        loaded = self._load_all(todo)
        finished = {
            job_id: self._index_entry(docs.record, docs.result)
            for job_id, docs in loaded.items()
            if docs.result is not None
        }
        if finished:  # jobs finished before the index existed
            self.jobs_store.index_finished(finished)
        resumed = 0
        with self._lock:
            for job_id in todo:
                docs = loaded.get(job_id)
                if docs is not None and job_id not in self._jobs:
                    resumed += self._resume(docs, now, hold_until)
            self._update_gauges()
            self._update_job_gauge()
        self._run_deferred()
        if resumed:
            log.info("resumed %d job(s)", resumed, extra={"jobs": resumed})
        return resumed

    def _resume(self, docs: JobDocuments, now: float, hold_until: float) -> bool:
        """Put a job read from the store back in memory and queue (caller holds the lock);
        True when it is resumed (not finished)."""
        got = rebuild_job(docs, self.queue, now, hold_until)
        job = got.job
        self._jobs[job.id] = job
        if got.action == "cancelled":
            self._finish(job, "CANCELLED", "cancelled")
        elif got.action == "plan_first":
            job.advancing = True
            self._defer(functools.partial(self._advance, job, None, 0, now))
        elif got.action == "resume":
            self._emit(job, message=got.message)
            self._check_stage(job, now)
        return got.action in ("plan_first", "resume")

    def _load_all(self, job_ids: Sequence[str]) -> dict[str, JobDocuments]:
        """The documents of ``job_ids``, read in parallel; unreadable jobs are logged, skipped."""

        def one(job_id: str) -> JobDocuments | None:
            try:
                return load_job(self.jobs_store, job_id, self.context)
            except Deep3mError as exc:
                if isinstance(exc, NotFoundError) and exc.field == "job_id":
                    return None  # a folder without job.json: not a job (yet)
                log.error("cannot resume job %s: %s", job_id, exc.message, extra={"job_id": job_id})
                return None

        out: dict[str, JobDocuments] = {}
        for i, docs in bounded_map(one, job_ids, min(READ_THREADS, len(job_ids))):
            if docs is not None:
                out[job_ids[i]] = docs
        return out

    @staticmethod
    def _index_entry(record: JobRecord, result: Mapping[str, Any] | None) -> dict[str, Any]:
        result = result or {}
        return {
            "state": str(result.get("state", "FAILED")),
            "created_unix_s": record.created_unix_s,
            "finished_unix_s": float(result.get("finished_unix_s", record.created_unix_s)),
        }

    def _load_finished(self, job_ids: Iterable[str]) -> None:
        """Load indexed finished jobs that are not in memory yet (outside the lock)."""
        with self._lock:
            wanted = [j for j in job_ids if j in self._unloaded]
        if not wanted:
            return

        def one(job_id: str) -> JobDocuments | None:
            try:
                record = self.jobs_store.load_job(job_id)
                result = self.jobs_store.load_result(job_id)
                if result is None:  # indexed, yet its result is gone: resume it after all
                    return load_job(self.jobs_store, job_id, self.context)
            except Deep3mError as exc:
                log.error("cannot load finished job %s: %s", job_id, exc.message)
                return None
            return JobDocuments(record, result)

        got: dict[str, JobDocuments] = {}
        for i, docs in bounded_map(one, wanted, min(READ_THREADS, len(wanted))):
            if docs is not None:
                got[wanted[i]] = docs
        now = self.clock()
        with self._lock:
            for job_id, docs in got.items():
                if self._unloaded.pop(job_id, None) is not None and job_id not in self._jobs:
                    self._resume(docs, now, now)
            self._update_gauges()
            self._update_job_gauge()
        self._run_deferred()

    def prune_finished(self) -> int:
        """Delete the jobs that finished more than the retention period ago; returns how many."""
        days = self.settings.finished_job_retention_days
        if days <= 0:
            return 0
        cutoff = self.clock() - days * 86400.0
        old = [
            job_id
            for job_id, entry in self.jobs_store.finished_index().items()
            if float(entry.get("finished_unix_s", 0.0)) < cutoff
        ]
        if not old:
            return 0
        with self._lock:
            for job_id in old:
                self._unloaded.pop(job_id, None)
                job = self._jobs.get(job_id)
                if job is not None and job.terminal:
                    del self._jobs[job_id]
            self._update_job_gauge()
        for job_id in old:
            self.jobs_store.delete_job(job_id)
        self.jobs_store.index_finished({}, removed=old)
        log.info("pruned %d finished job(s)", len(old), extra={"jobs": len(old)})
        return len(old)

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
            if time.monotonic() >= self._next_prune and not self._recovering:
                self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
                try:
                    self.prune_finished()
                except Exception:  # the next round retries
                    log.exception("pruning finished jobs failed")
            with self._lock:
                deadline = self.queue.next_deadline()
            wait = 1.0 if deadline is None else min(1.0, max(0.01, deadline - self.clock()))
            self._stop.wait(wait)

    # -- jobs -----------------------------------------------------------------------
    def submit(self, spec: common_pb2.JobSpec, job_id: str = "") -> JobView:
        """Validate, create outputs, persist and queue a job; same id and spec: a no-op."""
        self._check_ready()
        kind = kinds.job_kind(spec)
        if job_id:
            kinds.check_job_id(job_id)
            self._load_finished([job_id])
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
        self._run_deferred()
        with self._lock:
            return self._view(job)

    def _get(self, job_id: str) -> Job:
        job = self._jobs.get(kinds.check_job_id(job_id))
        if job is None:
            raise NotFoundError(f"job {job_id!r} not found", field="job_id")
        return job

    def get(self, job_id: str) -> JobView:
        self._check_ready()
        self._load_finished([job_id])
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
        self._check_ready()
        with self._lock:
            # Finished jobs not loaded yet are chosen by their index entry first.
            keys = [
                (float(e.get("created_unix_s", 0.0)), job_id)
                for job_id, e in self._unloaded.items()
                if not wanted or e.get("state") in wanted
            ]
            keys += [
                (j.record.created_unix_s, j.id)
                for j in self._jobs.values()
                if not wanted or j.state in wanted
            ]
            keys.sort(reverse=True)
            chosen = [job_id for _, job_id in (keys[:limit] if limit else keys)]
        self._load_finished(chosen)
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
        self._check_ready()
        self._load_finished([job_id])
        with self._lock:
            job = self._get(job_id)
            if job.terminal or job.finishing:
                return self._view(job)
        # The marker is durable before anyone is told (a restart keeps it cancelled).
        self.jobs_store.mark_cancelled(job_id)
        with self._lock:
            if not job.terminal and not job.finishing:
                running = len(self.queue.cancel_job(job_id))
                self._finish(job, "CANCELLED", f"cancelled; {running} running task(s) told to stop")
        self._run_deferred()
        with self._lock:
            return self._view(job)

    def watch(self, job_id: str) -> tuple[ProgressEvent, Subscription | None]:
        """The job's current state and, unless it has ended, a subscription to what follows."""
        self._check_ready()
        self._load_finished([job_id])
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
        self._check_ready()
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
        self._check_ready()
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
        if not worker_id:
            raise InvalidArgumentError("worker_id is empty", field="worker_id")
        if len(completions) > MAX_COMPLETIONS_PER_CALL:
            raise InvalidArgumentError(
                f"at most {MAX_COMPLETIONS_PER_CALL} completions per call, got {len(completions)}",
                field="completions",
            )
        self._check_ready()
        now = self.clock()
        results: list[Deep3mError | None] = [None] * len(completions)
        refusals: list[tuple[int, str, str, str]] = []
        groups: dict[tuple[str, str], list[tuple[int, Lease, str, dict[str, Any]]]] = defaultdict(
            list
        )
        with self._lock:
            for i, (lease_id, metrics, outputs) in enumerate(completions):
                try:
                    lease = self.queue.complete(lease_id, worker_id, now)
                except Deep3mError as exc:
                    results[i] = exc
                    continue
                job = self._jobs[lease.job_id]
                task_id = job.task_id(lease.stage, lease.task)
                refused = self._refuse_completion(job, lease, dict(metrics or {}))
                if refused:
                    self.queue.revert(lease)
                    refusals.append((i, lease_id, task_id, refused))
                    continue
                record = {
                    "task_id": task_id,
                    "worker_id": worker_id,
                    "attempt": lease.attempt,
                    "finished_unix_s": now,
                    "metrics": dict(metrics or {}),
                    "outputs": dict(outputs or {}),
                }
                groups[(lease.job_id, lease.stage)].append((i, lease, task_id, record))
        for i, lease_id, task_id, refused in refusals:
            # Counted as a failed attempt: retried, then quarantined, never done.
            self.fail(lease_id, worker_id, JobError("FAILED_PRECONDITION", refused), True)
            results[i] = FailedPreconditionError(f"task {task_id}: {refused}", field="metrics")
        persisted = []
        for (job_id, stage), items in groups.items():
            try:
                self.jobs_store.mark_done_batch(
                    job_id, stage, {lease.task: record for _, lease, _, record in items}
                )
            except Exception as exc:
                with self._lock:
                    for _, lease, _, _ in items:
                        self.queue.revert(lease)
                log.exception("cannot record %d completion(s) of job %s", len(items), job_id)
                for i, _, task_id, _ in items:
                    results[i] = UnavailableError(
                        f"cannot record the completion of task {task_id} in the store: {exc}",
                        field="store",
                    )
                continue
            persisted.append((job_id, items))
        if persisted:
            with self._lock:
                for job_id, items in persisted:
                    self._confirm(self._jobs[job_id], items, now)
            self._run_deferred()
        return results

    def _confirm(
        self, job: Job, items: Sequence[tuple[int, Lease, str, dict[str, Any]]], now: float
    ) -> None:
        """Persisted completions of one stage of ``job`` become done (caller holds the lock)."""
        role = items[0][1].role
        stage = items[0][1].stage
        total_voxels = 0.0
        for _, lease, task_id, record in items:
            self.queue.confirm(lease)
            metrics = record["metrics"]
            voxels = float(metrics.get("voxels", 0.0))
            total_voxels += voxels
            m.TASK_SECONDS.labels(role=role).observe(max(0.0, now - lease.leased_at))
            if job.terminal or job.finishing:
                continue
            job.record_completion(now, voxels, metrics, record["outputs"])
            self._refresh_counts(job, stage)
            self._emit(job, task_id=task_id, metrics={"voxels": voxels} if voxels else None)
        m.TASKS_COMPLETED.labels(role=role).inc(len(items))
        if total_voxels > 0:
            m.VOXELS_PROCESSED.labels(role=role).inc(total_voxels)
        if job.terminal or job.finishing:
            return
        current = job.current
        self._check_stage(job, now)
        # A finished stage may have started the next one, of another role.
        self._update_gauges(role if job.current is current else None)

    def release(self, lease_id: str, worker_id: str) -> None:
        """The worker gives the task back unfinished: re-queued at once, no attempt counted."""
        self._check_ready()
        now = self.clock()
        with self._lock:
            lease = self.queue.release(lease_id, worker_id, now)
            job = self._jobs.get(lease.job_id)
            if job is not None and not job.terminal:
                self._refresh_counts(job, lease.stage)
                self._emit(
                    job,
                    task_id=job.task_id(lease.stage, lease.task),
                    message=f"worker {worker_id!r} gave task "
                    f"{job.task_id(lease.stage, lease.task)} back; re-queued",
                )
            self._update_gauges(lease.role)

    def fail(self, lease_id: str, worker_id: str, error: JobError, retryable: bool) -> bool:
        """Record a failed attempt; returns True when the task will not be retried."""
        self._check_ready()
        now = self.clock()
        try:
            return self._fail(lease_id, worker_id, error, retryable, now)
        finally:
            self._run_deferred()

    def _fail(
        self, lease_id: str, worker_id: str, error: JobError, retryable: bool, now: float
    ) -> bool:
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
        self._run_deferred()
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

    def held_by_role(self) -> dict[str, int]:
        """Pending tasks per role held back (retry backoff, post-restart hold)."""
        with self._lock:
            return self.queue.held_by_role(self.clock())

    def busy_by_pod(self, role: str) -> dict[str, int]:
        """Live leases of ``role`` per worker (pod) id, for pod-deletion costs."""
        with self._lock:
            return self.queue.leases_by_worker(role)

    # -- internals (caller holds the lock, but for _unrecorded: store I/O) --------------
    def _unrecorded(self, job: Job, plan: StagePlan) -> str:
        """The final check before a stage's outputs are sealed (no lock held): every task
        has its (verified) completion record in the store; why not, else ""."""
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
        return job.view(kinds.get_kind(job.record.kind).stages_for(job.record.resolution))

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

    # -- store writes outside the lock --------------------------------------------------
    def _defer(self, step: Callable[[], None]) -> None:
        """Run ``step`` (store I/O) once this thread has released the lock."""
        pending: list[Callable[[], None]] | None = getattr(self._local, "steps", None)
        if pending is None:
            pending = self._local.steps = []
        pending.append(step)

    def _run_deferred(self) -> None:
        """Run this thread's deferred steps, in order (they may defer more); lock not held."""
        pending: list[Callable[[], None]] | None = getattr(self._local, "steps", None)
        while pending:
            step = pending.pop(0)
            try:
                step()
            except Exception:  # each step handles its own failures; never lose the rest
                log.exception("a deferred scheduler step failed")

    def _advance(self, job: Job, finished: StagePlan | None, index: int, now: float) -> None:
        """Seal the finished stage, plan and persist stage ``index`` (no lock held)."""
        kind = kinds.get_kind(job.record.kind)
        if finished is not None:
            missing = self._unrecorded(job, finished)
            if missing:
                with self._lock:
                    job.advancing = False
                    job.add_error(JobError("DATA_LOSS", missing))
                    self._finish(job, "FAILED", f"finishing stage {finished.name!r}: {missing}")
                return
            try:
                kind.on_stage_finished(finished, job.record.resolution, self.context, job.id)
            except Exception as exc:
                _, message = _describe(exc)
                log.exception("finishing stage %s of job %s failed", finished.name, job.id)
                with self._lock:
                    job.advancing = False
                    job.add_error(
                        JobError("INTERNAL", f"finishing stage {finished.name!r}: {message}")
                    )
                    self._finish(
                        job, "FAILED", f"finishing stage {finished.name!r} failed: {message}"
                    )
                return
        try:
            plan = kind.plan(index, job.record.resolution)
            if plan is not None:
                self.jobs_store.save_stage(job.id, plan)
        except Exception as exc:
            code, message = _describe(exc)
            log.exception("cannot plan stage %d of job %s", index, job.id)
            with self._lock:
                job.advancing = False
                job.add_error(JobError(code, f"planning stage {index} failed: {message}"))
                self._finish(job, "FAILED", f"planning stage {index} failed: {message}")
            return
        with self._lock:
            job.advancing = False
            if job.terminal or job.finishing:
                return
            if plan is None:
                self._finish(job, "SUCCEEDED", "all stages done")
            else:
                self._add_stage(job, plan, now)
            self._update_gauges()

    def _check_stage(self, job: Job, now: float) -> None:
        """Advance, fail or finish the job once its current stage has settled."""
        plan = job.current
        if plan is None or job.terminal or job.finishing or job.advancing:
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
        job.advancing = True
        self._defer(lambda: self._advance(job, plan, plan.index + 1, now))

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

        def persist() -> None:
            try:
                self.jobs_store.save_quarantine(job.id, lease.stage, lease.task, record)
            except Exception:  # the job still fails now; only a restart would retry the task
                log.exception("cannot persist the quarantine of %s", task_id)

        # Before the job's result, which a failing stage writes next.
        self._defer(persist)
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
        """End the job: its tasks leave the queue now; it turns ``state`` once the result is
        persisted (outside the lock), so no one sees an end that a restart would undo."""
        if job.finishing or job.terminal:
            return
        job.finishing = True
        now = self.clock()
        plan = job.current
        if plan is not None:
            self._refresh_counts(job, plan.name)
        self.queue.cancel_job(job.id)
        self.queue.remove_job(job.id)
        job.final_message = message
        document = job.result_document(now)
        document["state"] = state
        self._defer(lambda: self._finished(job, state, message, document))

    def _finished(self, job: Job, state: str, message: str, document: dict[str, Any]) -> None:
        try:
            self.jobs_store.save_result(job.id, document)
            self.jobs_store.index_finished({job.id: self._index_entry(job.record, document)})
        except Exception:  # still finished here; a restart would resume it
            log.exception("cannot persist the result of job %s", job.id)
        with self._lock:
            job.finishing = False
            job.state = state
            job.updated = float(document["finished_unix_s"])
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
        for entry in self._unloaded.values():
            state = str(entry.get("state", ""))
            if state in by_state:
                by_state[state] += 1
        for state, n in by_state.items():
            m.JOBS.labels(state=state).set(n)
