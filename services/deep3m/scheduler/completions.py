"""Completions, one or a batch: acknowledged only once their records are in the store.

A batch goes in three steps. Under the lock, each lease turns *completing*
(no one else can lease its task) and the kind may refuse it (a predict block
that did not write every chunk it owns: counted as a failed attempt). Without
the lock, the records of each (job, stage) are written as one document; a
write that fails reverts its leases, so their workers still hold them and get
UNAVAILABLE to retry. Under the lock again, the persisted ones become done and
the stage is checked, which may defer its advance.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from deep3m.core.errors import (
    Deep3mError,
    FailedPreconditionError,
    InvalidArgumentError,
    UnavailableError,
)
from deep3m.runtime import metrics as m
from deep3m.scheduler import kinds
from deep3m.scheduler.advance import Advancer
from deep3m.scheduler.jobs import Job, JobError
from deep3m.scheduler.leasing import Leasing
from deep3m.scheduler.queue import Lease
from deep3m.scheduler.state import SchedulerState
from deep3m.scheduler.stats import Statistics

log = logging.getLogger("deep3m.scheduler")

MAX_COMPLETIONS_PER_CALL = 1024

# One completion of a batch: (lease id, metrics, outputs).
Completion = tuple[str, Mapping[str, float] | None, Mapping[str, str] | None]
# A completion accepted under the lock: (index in the batch, lease, task id, record).
_Accepted = tuple[int, Lease, str, dict[str, Any]]


class Completions:
    """``Scheduler.complete_many``; see there for what it promises."""

    def __init__(
        self, state: SchedulerState, stats: Statistics, advancer: Advancer, leasing: Leasing
    ) -> None:
        self.state = state
        self.stats = stats
        self.advancer = advancer
        self.leasing = leasing

    def complete_many(
        self, worker_id: str, completions: Sequence[Completion]
    ) -> list[Deep3mError | None]:
        if not worker_id:
            raise InvalidArgumentError("worker_id is empty", field="worker_id")
        if len(completions) > MAX_COMPLETIONS_PER_CALL:
            raise InvalidArgumentError(
                f"at most {MAX_COMPLETIONS_PER_CALL} completions per call, got {len(completions)}",
                field="completions",
            )
        s = self.state
        s.check_ready()
        now = s.clock()
        results: list[Deep3mError | None] = [None] * len(completions)
        refusals: list[tuple[int, str, str, str]] = []
        groups: dict[tuple[str, str], list[_Accepted]] = defaultdict(list)
        with s.lock:
            for i, (lease_id, metrics, outputs) in enumerate(completions):
                try:
                    lease = s.queue.complete(lease_id, worker_id, now)
                except Deep3mError as exc:
                    results[i] = exc
                    continue
                job = s.jobs[lease.job_id]
                task_id = job.task_id(lease.stage, lease.task)
                refused = self._refusal(job, lease, dict(metrics or {}))
                if refused:
                    s.queue.revert(lease)
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
            self.leasing.fail(lease_id, worker_id, JobError("FAILED_PRECONDITION", refused), True)
            results[i] = FailedPreconditionError(f"task {task_id}: {refused}", field="metrics")
        persisted = []
        for (job_id, stage), items in groups.items():
            try:
                s.jobs_store.mark_done_batch(
                    job_id, stage, {lease.task: record for _, lease, _, record in items}
                )
            except Exception as exc:
                with s.lock:
                    for _, lease, _, _ in items:
                        s.queue.revert(lease)
                log.exception("cannot record %d completion(s) of job %s", len(items), job_id)
                for i, _, task_id, _ in items:
                    results[i] = UnavailableError(
                        f"cannot record the completion of task {task_id} in the store: {exc}",
                        field="store",
                    )
                continue
            persisted.append((job_id, items))
        if persisted:
            with s.lock:
                for job_id, items in persisted:
                    self._confirm(s.jobs[job_id], items, now)
            s.run_deferred()
        return results

    def _refusal(self, job: Job, lease: Lease, metrics: Mapping[str, float]) -> str:
        """Why the kind refuses this completion, else "" (caller holds the lock)."""
        plan = job.current
        if plan is None or plan.name != lease.stage:
            return ""
        return kinds.get_kind(job.record.kind).check_completion(
            plan, lease.task, metrics, job.record.resolution
        )

    def _confirm(self, job: Job, items: Sequence[_Accepted], now: float) -> None:
        """Persisted completions of one stage of ``job`` become done (caller holds the lock)."""
        s = self.state
        role = items[0][1].role
        stage = items[0][1].stage
        total_voxels = 0.0
        for _, lease, task_id, record in items:
            s.queue.confirm(lease)
            metrics = record["metrics"]
            voxels = float(metrics.get("voxels", 0.0))
            total_voxels += voxels
            m.TASK_SECONDS.labels(role=role).observe(max(0.0, now - lease.leased_at))
            if job.terminal or job.finishing:
                continue
            job.record_completion(now, voxels, metrics, record["outputs"])
            s.refresh_counts(job, stage)
            s.emit(job, task_id=task_id, metrics={"voxels": voxels} if voxels else None)
        m.TASKS_COMPLETED.labels(role=role).inc(len(items))
        if total_voxels > 0:
            m.VOXELS_PROCESSED.labels(role=role).inc(total_voxels)
        if job.terminal or job.finishing:
            return
        current = job.current
        self.advancer.check_stage(job, now)
        # A finished stage may have started the next one, of another role.
        self.stats.update_queue(role if job.current is current else None)
