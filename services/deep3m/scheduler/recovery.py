"""Rebuilding a job after a restart, from its documents in the store.

A job with a result document is finished and only shown. Any other job gets
its current stage back in the queue with its done and quarantined tasks, so
completed work is not redone; pending tasks are held back until
``hold_until`` so workers that held leases before the restart can renew and
adopt them first. What to do next (finish, plan, resume) is the scheduler's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from deep3m.scheduler import kinds
from deep3m.scheduler.jobs import Job, JobError
from deep3m.scheduler.persistence import JobRecord, JobStore
from deep3m.scheduler.queue import StageCounts, TaskQueue

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


def recover_job(
    jobs_store: JobStore,
    queue: TaskQueue,
    job_id: str,
    now: float,
    hold_until: float,
    ctx: kinds.KindContext,
) -> Recovered:
    """The job ``job_id`` rebuilt from the store, its current stage queued again."""
    record = jobs_store.load_job(job_id)
    result = jobs_store.load_result(job_id)
    if result is not None:
        return Recovered(Job.from_result(record, result), "finished")
    record = _with_volumes(record, ctx)
    job = Job(record, "PENDING", now, outputs=dict(record.outputs))
    if jobs_store.is_cancelled(job_id):
        return Recovered(job, "cancelled")
    plans = jobs_store.load_stages(job_id)
    if not plans:  # stopped between writing the job and its first stage
        return Recovered(job, "plan_first")
    job.stages = plans
    for plan in plans[:-1]:
        job.counts[plan.name] = StageCounts(plan.n_tasks, 0, 0, plan.n_tasks, 0)
    current = plans[-1]
    done = jobs_store.done_tasks(job_id, current.name)
    quarantined = jobs_store.quarantined(job_id, current.name)
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
    if current.n_tasks == 1 and done.size:
        # A finished single-task stage (finalize) carries job-level results.
        rec = jobs_store.done_record(job_id, current.name, 0)
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
