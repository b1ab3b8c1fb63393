"""Rebuilding a job after a restart, from its documents in the store.

A job with a result document is finished and only shown. Any other job gets
its current stage back in the queue with its done and quarantined tasks, so
completed work is not redone; pending tasks are held back until
``hold_until`` so workers that held leases before the restart can renew and
adopt them first. What to do next (finish, plan, resume) is the scheduler's.

Reading (``load_job``, store I/O, run for many jobs in parallel) is apart from
rebuilding (``rebuild_job``, in memory, under the scheduler's lock).
``Recovery`` is the scheduler's side: every job at a restart, finished jobs
from the index when first asked for, and the pruning of old finished jobs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from deep3m.core.errors import Deep3mError, NotFoundError
from deep3m.core.executor import bounded_map
from deep3m.scheduler import kinds
from deep3m.scheduler.advance import Advancer
from deep3m.scheduler.jobs import Job, JobError, index_entry
from deep3m.scheduler.persistence import READ_THREADS, JobRecord, JobStore
from deep3m.scheduler.queue import StageCounts, TaskQueue
from deep3m.scheduler.stages import StagePlan
from deep3m.scheduler.state import SchedulerState, describe
from deep3m.scheduler.stats import Statistics

log = logging.getLogger("deep3m.scheduler")

Action = Literal["finished", "cancelled", "plan_first", "resume", "stale"]


@dataclass(frozen=True)
class Recovered:
    job: Job
    action: Action
    message: str = ""


def _with_volumes(record: JobRecord, ctx: kinds.KindContext) -> JobRecord:
    """A record written before volumes were recorded at submit gets them resolved now."""
    if record.volumes:
        return record
    resumed = replace(ctx, resume=True)
    return replace(record, volumes=kinds.validate(record.spec, resumed).resolved.volumes)


@dataclass(frozen=True)
class JobDocuments:
    """What recovery reads of one job: everything, before any of it is applied."""

    record: JobRecord
    result: dict[str, Any] | None = None
    cancelled: bool = False
    plans: tuple[StagePlan, ...] = ()
    done: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    quarantined: dict[int, dict[str, Any]] = field(default_factory=dict)
    single_record: dict[str, Any] | None = None


def load_job(jobs_store: JobStore, job_id: str, ctx: kinds.KindContext) -> JobDocuments:
    """Read the documents of ``job_id`` (store I/O only; nothing is changed)."""
    record = jobs_store.load_job(job_id)
    result = jobs_store.load_result(job_id)
    if result is not None:
        return JobDocuments(record, result)
    record = _with_volumes(record, ctx)
    if jobs_store.is_cancelled(job_id):
        return JobDocuments(record, cancelled=True)
    plans = tuple(jobs_store.load_stages(job_id))
    if not plans:
        return JobDocuments(record)
    current = plans[-1]
    done = jobs_store.done_tasks(job_id, current.name)
    quarantined = jobs_store.quarantined(job_id, current.name)
    single = None
    if current.n_tasks == 1 and done.size:
        single = jobs_store.done_record(job_id, current.name, 0)
    return JobDocuments(record, None, False, plans, done, quarantined, single)


def stale_plan(record: JobRecord, plans: Sequence[StagePlan]) -> str:
    """Why stages stored by another version of the job's kind cannot be resumed, else "".

    A stage is planned from its index alone, so a job whose stored stages are not the
    first stages this version plans would run the wrong stage on earlier outputs."""
    try:
        expected = [d.name for d in kinds.get_kind(record.kind).stages_for(record.resolution)]
    except Exception as exc:  # an unplannable record cannot be resumed either
        return f"its stages cannot be planned again: {describe(exc)[1]}"
    stored = [p.name for p in plans]
    if stored == expected[: len(stored)]:
        return ""
    return (
        f"its stages {stored} were planned by another version of deep3m "
        f"(this one plans {expected}); submit the job again"
    )


def rebuild_job(docs: JobDocuments, queue: TaskQueue, now: float, hold_until: float) -> Recovered:
    """The job rebuilt from its documents, its current stage queued again (no I/O)."""
    record = docs.record
    job_id = record.id
    if docs.result is not None:
        return Recovered(Job.from_result(record, docs.result), "finished")
    job = Job(record, "PENDING", now, outputs=dict(record.outputs))
    if docs.cancelled:
        return Recovered(job, "cancelled")
    plans = list(docs.plans)
    if not plans:  # stopped between writing the job and its first stage
        return Recovered(job, "plan_first")
    job.stages = plans
    for plan in plans[:-1]:
        job.counts[plan.name] = StageCounts(plan.n_tasks, 0, 0, plan.n_tasks, 0)
    current = plans[-1]
    done = docs.done
    quarantined = docs.quarantined
    stale = stale_plan(record, plans)
    if stale:  # shown as it was left, nothing queued
        job.counts[current.name] = StageCounts(
            current.n_tasks, 0, 0, int(done.size), len(quarantined)
        )
        return Recovered(job, "stale", stale)
    for task, rec in sorted(quarantined.items()):
        job.add_error(
            JobError(
                str(rec.get("code", "")),
                str(rec.get("message", "")),
                task_id=current.task(task).id,
            )
        )
    job.counts[current.name] = queue.add_stage(
        job_id,
        current.name,
        current.role,
        current.n_tasks,
        max_attempts=record.max_attempts,
        done=done,
        quarantined={t: str(r.get("message", "")) for t, r in quarantined.items()},
        hold_until=hold_until,
    )
    if docs.single_record is not None:
        # A finished single-task stage (finalize) carries job-level results.
        rec = docs.single_record
        job.outputs.update({str(k): str(v) for k, v in rec.get("outputs", {}).items()})
        job.metrics.update(
            {str(k): float(v) for k, v in rec.get("metrics", {}).items() if k != "voxels"}
        )
    if len(plans) > 1 or done.size or quarantined:
        job.state = "RUNNING"
    return Recovered(
        job,
        "resume",
        f"resumed: {done.size} of {current.n_tasks} task(s) of stage {current.name!r} already done",
    )


class Recovery:
    """Jobs from the store into memory: at a restart, on demand, and their pruning."""

    def __init__(self, state: SchedulerState, stats: Statistics, advancer: Advancer) -> None:
        self.state = state
        self.stats = stats
        self.advancer = advancer

    def recover(self) -> int:
        """Rebuild every job from the store; returns how many were resumed.

        Finished jobs in the index are not read (they load when asked for);
        every other job is read in parallel, then rebuilt under the lock.
        """
        s = self.state
        now = s.clock()
        # Workers that held leases before a restart get this long to renew and
        # adopt them before their tasks are handed to anyone else.
        hold_until = now + min(s.settings.lease_seconds / 2, 30.0)
        earlier = s.jobs_store.register_epoch(s.queue.epoch)
        index = s.jobs_store.finished_index()
        listed = s.jobs_store.listed_job_ids()
        with s.lock:
            s.queue.allow_adoption_from(earlier)
            known = set(s.jobs)
            for job_id in listed:
                if job_id in index and job_id not in known:
                    s.unloaded[job_id] = index[job_id]
        todo = [j for j in listed if j not in index and j not in known]
        loaded = self._load_all(todo)
        finished = {
            job_id: index_entry(docs.record, docs.result)
            for job_id, docs in loaded.items()
            if docs.result is not None
        }
        if finished:  # jobs finished before the index existed
            s.jobs_store.index_finished(finished)
        resumed = 0
        with s.lock:
            for job_id in todo:
                docs = loaded.get(job_id)
                if docs is not None and job_id not in s.jobs:
                    resumed += self._resume(docs, now, hold_until)
            self.stats.update_queue()
            self.stats.update_jobs()
        s.run_deferred()
        if resumed:
            log.info("resumed %d job(s)", resumed, extra={"jobs": resumed})
        return resumed

    def _resume(self, docs: JobDocuments, now: float, hold_until: float) -> bool:
        """Put a job read from the store back in memory and queue (caller holds the lock);
        True when it is resumed (not finished)."""
        got = rebuild_job(docs, self.state.queue, now, hold_until)
        job = got.job
        self.state.jobs[job.id] = job
        if got.action == "cancelled":
            self.advancer.finish(job, "CANCELLED", "cancelled")
        elif got.action == "plan_first":
            job.advancing = True
            self.state.defer(functools.partial(self.advancer.advance, job, None, 0, now))
        elif got.action == "resume":
            self.state.emit(job, message=got.message)
            self.advancer.check_stage(job, now)
        elif got.action == "stale":
            log.error("cannot resume job %s: %s", job.id, got.message, extra={"job_id": job.id})
            job.add_error(JobError("FAILED_PRECONDITION", got.message))
            self.advancer.finish(job, "FAILED", f"cannot resume: {got.message}")
        return got.action in ("plan_first", "resume")

    def _load_all(self, job_ids: Sequence[str]) -> dict[str, JobDocuments]:
        """The documents of ``job_ids``, read in parallel; unreadable jobs are logged, skipped."""
        s = self.state

        def one(job_id: str) -> JobDocuments | None:
            try:
                return load_job(s.jobs_store, job_id, s.context)
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

    def load_finished(self, job_ids: Iterable[str]) -> None:
        """Load indexed finished jobs that are not in memory yet (takes the lock itself;
        reads outside it)."""
        s = self.state
        with s.lock:
            wanted = [j for j in job_ids if j in s.unloaded]
        if not wanted:
            return

        def one(job_id: str) -> JobDocuments | None:
            try:
                record = s.jobs_store.load_job(job_id)
                result = s.jobs_store.load_result(job_id)
                if result is None:  # indexed, yet its result is gone: resume it after all
                    return load_job(s.jobs_store, job_id, s.context)
            except Deep3mError as exc:
                log.error("cannot load finished job %s: %s", job_id, exc.message)
                return None
            return JobDocuments(record, result)

        got: dict[str, JobDocuments] = {}
        for i, docs in bounded_map(one, wanted, min(READ_THREADS, len(wanted))):
            if docs is not None:
                got[wanted[i]] = docs
        now = s.clock()
        with s.lock:
            for job_id, docs in got.items():
                if s.unloaded.pop(job_id, None) is not None and job_id not in s.jobs:
                    self._resume(docs, now, now)
            self.stats.update_queue()
            self.stats.update_jobs()
        s.run_deferred()

    def prune_finished(self) -> int:
        """Delete the jobs that finished more than the retention period ago; returns how many."""
        s = self.state
        days = s.settings.finished_job_retention_days
        if days <= 0:
            return 0
        cutoff = s.clock() - days * 86400.0
        old = [
            job_id
            for job_id, entry in s.jobs_store.finished_index().items()
            if float(entry.get("finished_unix_s", 0.0)) < cutoff
        ]
        if not old:
            return 0
        with s.lock:
            for job_id in old:
                s.unloaded.pop(job_id, None)
                job = s.jobs.get(job_id)
                if job is not None and job.terminal:
                    del s.jobs[job_id]
            self.stats.update_jobs()
        for job_id in old:
            s.jobs_store.delete_job(job_id)
        s.jobs_store.index_finished({}, removed=old)
        log.info("pruned %d finished job(s)", len(old), extra={"jobs": len(old)})
        return len(old)
