"""Rebuilding a job after a restart, from its documents in the store.

A job with a result document is finished and only shown. Any other job gets
its current stage back in the queue with its done and quarantined tasks, so
completed work is not redone; pending tasks are held back until
``hold_until`` so workers that held leases before the restart can renew and
adopt them first. What to do next (finish, plan, resume) is the scheduler's.

Reading (``load_job``, store I/O, run for many jobs in parallel) is apart from
rebuilding (``rebuild_job``, in memory, under the scheduler's lock).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from deep3m.scheduler import kinds
from deep3m.scheduler.jobs import Job, JobError
from deep3m.scheduler.persistence import JobRecord, JobStore
from deep3m.scheduler.queue import StageCounts, TaskQueue
from deep3m.scheduler.stages import StagePlan

Action = Literal["finished", "cancelled", "plan_first", "resume"]


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


def recover_job(
    jobs_store: JobStore,
    queue: TaskQueue,
    job_id: str,
    now: float,
    hold_until: float,
    ctx: kinds.KindContext,
) -> Recovered:
    """The job ``job_id`` rebuilt from the store, its current stage queued again."""
    return rebuild_job(load_job(jobs_store, job_id, ctx), queue, now, hold_until)
