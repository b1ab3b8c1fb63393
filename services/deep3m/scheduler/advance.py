"""A job moving through its stages, and its end.

When the current stage settles, ``check_stage`` decides (under the lock): the
job fails (a task was quarantined, or too many were), or the stage is done
and ``advance`` is deferred. ``advance`` runs without the lock: it checks that
every task's completion record is in the store, lets the kind seal the stage
(``on_stage_finished``), plans and persists the next stage, and only then
takes the lock to queue it — or to finish the job. ``finish`` takes a job's
tasks out of the queue at once; the job turns SUCCEEDED/FAILED/CANCELLED only
when its result document is written (``_finished``, deferred), so no one sees
an end that a restart would undo.
"""

from __future__ import annotations

import logging
from typing import Any

from deep3m.runtime import metrics as m
from deep3m.scheduler import kinds
from deep3m.scheduler.jobs import Job, JobError, index_entry
from deep3m.scheduler.queue import Lease
from deep3m.scheduler.stages import StagePlan
from deep3m.scheduler.state import SchedulerState, describe
from deep3m.scheduler.stats import Statistics

log = logging.getLogger("deep3m.scheduler")

# A job whose tasks keep failing is given up early rather than after every block.
QUARANTINE_LIMIT = 16


class Advancer:
    """Stage changes and job ends; methods say whether the caller holds the lock."""

    def __init__(self, state: SchedulerState, stats: Statistics) -> None:
        self.state = state
        self.stats = stats

    def add_stage(self, job: Job, plan: StagePlan, now: float) -> None:
        """Queue ``plan``'s tasks as the job's current stage (caller holds the lock)."""
        s = self.state
        job.start_stage(
            plan,
            s.queue.add_stage(
                job.id, plan.name, plan.role, plan.n_tasks, max_attempts=job.record.max_attempts
            ),
        )
        s.emit(
            job,
            message=f"stage {plan.name!r} planned: {plan.n_tasks} task(s) for the {plan.role} role",
        )
        self.check_stage(job, now)

    def check_stage(self, job: Job, now: float) -> None:
        """Advance, fail or finish the job once its current stage has settled (lock held)."""
        plan = job.current
        if plan is None or job.terminal or job.finishing or job.advancing:
            return
        counts = self.state.refresh_counts(job, plan.name)
        if counts.quarantined and (counts.settled or counts.quarantined >= QUARANTINE_LIMIT):
            ids = [e.task_id for e in job.errors if e.task_id][:10]
            more = counts.quarantined - len(ids)
            details = "; ".join(f"{e.task_id}: {e.message}" for e in job.errors[:5])
            self.finish(
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
        self.state.defer(lambda: self.advance(job, plan, plan.index + 1, now))

    def advance(self, job: Job, finished: StagePlan | None, index: int, now: float) -> None:
        """Seal the finished stage, plan and persist stage ``index`` (no lock held)."""
        s = self.state
        kind = kinds.get_kind(job.record.kind)
        if finished is not None:
            missing = self._unrecorded(job, finished)
            if missing:
                self._fail_advancing(
                    job, "DATA_LOSS", missing, f"finishing stage {finished.name!r}: {missing}"
                )
                return
            try:
                kind.on_stage_finished(finished, job.record.resolution, s.context, job.id)
            except Exception as exc:
                _, message = describe(exc)
                log.exception("finishing stage %s of job %s failed", finished.name, job.id)
                self._fail_advancing(
                    job,
                    "INTERNAL",
                    f"finishing stage {finished.name!r}: {message}",
                    f"finishing stage {finished.name!r} failed: {message}",
                )
                return
        try:
            plan = kind.plan(index, job.record.resolution)
            if plan is not None:
                s.jobs_store.save_stage(job.id, plan)
        except Exception as exc:
            code, message = describe(exc)
            log.exception("cannot plan stage %d of job %s", index, job.id)
            text = f"planning stage {index} failed: {message}"
            self._fail_advancing(job, code, text, text)
            return
        with s.lock:
            job.advancing = False
            if job.terminal or job.finishing:
                return
            if plan is None:
                self.finish(job, "SUCCEEDED", "all stages done")
            else:
                self.add_stage(job, plan, now)
            self.stats.update_queue()

    def _fail_advancing(self, job: Job, code: str, error: str, message: str) -> None:
        with self.state.lock:
            job.advancing = False
            job.add_error(JobError(code, error))
            self.finish(job, "FAILED", message)

    def _unrecorded(self, job: Job, plan: StagePlan) -> str:
        """The final check before a stage's outputs are sealed (no lock held): every task
        has its (verified) completion record in the store; why not, else ""."""
        try:
            records = self.state.jobs_store.done_records(job.id, plan.name)
        except Exception as exc:  # an unreadable store seals nothing
            return f"cannot read the completion records: {describe(exc)[1]}"
        if len(records) < plan.n_tasks:
            return (
                f"only {len(records)} of {plan.n_tasks} task(s) have a completion record in the "
                "store; the output is not marked complete"
            )
        return kinds.get_kind(job.record.kind).check_records(plan, records, job.record.resolution)

    def quarantine(
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
        """Give up on a task: its record is persisted (deferred), the job told (lock held)."""
        s = self.state
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
                s.jobs_store.save_quarantine(job.id, lease.stage, lease.task, record)
            except Exception:  # the job still fails now; only a restart would retry the task
                log.exception("cannot persist the quarantine of %s", task_id)

        # Before the job's result, which a failing stage writes next.
        s.defer(persist)
        job.add_error(JobError(code, message, task_id=task_id))
        s.refresh_counts(job, lease.stage)
        s.emit(
            job,
            task_id=task_id,
            error=message,
            message=f"task {task_id} quarantined after {attempts} attempt(s)",
        )
        log.warning(
            "task quarantined", extra={"job_id": job.id, "task_id": task_id, "error": message}
        )
        self.check_stage(job, now)

    def set_state(self, job: Job, state: str, now: float, message: str = "") -> None:
        """A state change that needs no document (PENDING → RUNNING; lock held)."""
        job.state = state
        job.updated = now
        self.state.emit(job, message=message or state.lower())
        self.stats.update_jobs()

    def finish(self, job: Job, state: str, message: str) -> None:
        """End the job: its tasks leave the queue now; it turns ``state`` once the result is
        persisted (deferred, outside the lock). Caller holds the lock."""
        s = self.state
        if job.finishing or job.terminal:
            return
        job.finishing = True
        now = s.clock()
        plan = job.current
        if plan is not None:
            s.refresh_counts(job, plan.name)
        s.queue.cancel_job(job.id)
        s.queue.remove_job(job.id)
        job.final_message = message
        document = job.result_document(now)
        document["state"] = state
        s.defer(lambda: self._finished(job, state, message, document))

    def _finished(self, job: Job, state: str, message: str, document: dict[str, Any]) -> None:
        s = self.state
        try:
            s.jobs_store.save_result(job.id, document)
            s.jobs_store.index_finished({job.id: index_entry(job.record, document)})
        except Exception:  # still finished here; a restart would resume it
            log.exception("cannot persist the result of job %s", job.id)
        with s.lock:
            job.finishing = False
            job.state = state
            job.updated = float(document["finished_unix_s"])
            error = message if state == "FAILED" else ""
            s.emit(job, message=message, error=error)
            self.stats.update_jobs()
        log.info("job finished", extra={"job_id": job.id, "state": state, "detail": message})
