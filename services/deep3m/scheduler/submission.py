"""Submitting a job: validate, claim the output, create outputs and documents, queue.

Validation and every store write (outputs, ``job.json``, the first stage plan)
run without the lock; the lock is taken only to reserve the job id and the
output (one job per output at a time) and, at the end, to put the job in
memory and its first stage in the queue. If anything fails after the outputs
were created, they and the job's documents are removed again.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from deep3m.core.errors import AlreadyExistsError, InvalidArgumentError
from deep3m.scheduler import kinds
from deep3m.scheduler.advance import Advancer
from deep3m.scheduler.jobs import Job, JobView
from deep3m.scheduler.kinds import VolumeFacts
from deep3m.scheduler.kinds.refs import create_outputs, remove_outputs
from deep3m.scheduler.persistence import JobRecord, spec_to_json
from deep3m.scheduler.recovery import Recovery
from deep3m.scheduler.state import SchedulerState
from deep3m.scheduler.stats import Statistics

if TYPE_CHECKING:
    from deep3m.v1 import common_pb2

log = logging.getLogger("deep3m.scheduler")


def _output_of(volumes: Mapping[str, VolumeFacts]) -> tuple[str, str] | None:
    out = volumes.get("output")
    return None if out is None else (out.store_url, out.path)


class Submission:
    """``Scheduler.submit``; see there for what it promises."""

    def __init__(
        self,
        state: SchedulerState,
        stats: Statistics,
        advancer: Advancer,
        recovery: Recovery,
    ) -> None:
        self.state = state
        self.stats = stats
        self.advancer = advancer
        self.recovery = recovery
        # Job ids and outputs of submissions under way (guarded by the state's lock).
        self._reserved: set[str] = set()
        self._writing: set[tuple[str, str] | None] = set()

    def submit(self, spec: common_pb2.JobSpec, job_id: str = "") -> JobView:
        s = self.state
        s.check_ready()
        kind = kinds.job_kind(spec)
        if job_id:
            kinds.check_job_id(job_id)
            self.recovery.load_finished([job_id])
        with s.lock:
            if job_id and job_id in s.jobs:
                existing = s.jobs[job_id]
                if spec_to_json(existing.record.spec) == spec_to_json(spec):
                    return s.view(existing)
                raise AlreadyExistsError(
                    f"job {job_id!r} already exists with a different spec", field="job_id"
                )
            if job_id in self._reserved:
                raise AlreadyExistsError(f"job {job_id!r} is being submitted", field="job_id")
            if not job_id:
                job_id = (
                    f"{kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(s.clock()))}"
                    f"-{secrets.token_hex(3)}"
                )
            self._reserved.add(job_id)
        try:
            return self._submit(spec, job_id)
        finally:
            with s.lock:
                self._reserved.discard(job_id)

    def _submit(self, spec: common_pb2.JobSpec, job_id: str) -> JobView:
        s = self.state
        if s.jobs_store.has_job(job_id):
            raise AlreadyExistsError(
                f"job {job_id!r} already exists in the store (unreadable "
                "or from another scheduler)",
                field="job_id",
            )
        prepared = kinds.validate(spec, s.context)
        target = _output_of(prepared.resolved.volumes)
        with s.lock:
            self._claim_output(target)
        try:
            return self._create(spec, job_id, prepared)
        finally:
            with s.lock:
                self._writing.discard(target)

    def _claim_output(self, target: tuple[str, str] | None) -> None:
        """One job per output at a time: refuse an output a live job writes (lock held)."""
        if target is None:
            return
        where = f"{target[0].rstrip('/')}/{target[1]}"
        for other in self.state.jobs.values():
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
        s = self.state
        kind = kinds.get_kind(prepared.kind)
        now = s.clock()
        record = JobRecord(
            job_id,
            prepared.kind,
            spec,
            prepared.resolved.spec,
            now,
            spec.max_attempts or s.settings.max_attempts,
            dict(prepared.outputs),
            dict(prepared.resolved.volumes),
            tuple(prepared.notes),
        )
        created = create_outputs(prepared.volumes, job_id)
        try:
            first = kind.plan(0, prepared.resolved)
            if first is None:
                raise InvalidArgumentError(f"job kind {kind.name!r} has no stages", field="spec")
            s.jobs_store.save_job(record)
            s.jobs_store.save_stage(job_id, first)
        except BaseException:
            # Nothing half-written stays behind.
            s.jobs_store.delete_job(job_id)
            remove_outputs(created)
            raise
        with s.lock:
            job = Job(record, "PENDING", now, outputs=dict(record.outputs))
            s.jobs[job_id] = job
            s.emit(job, message="submitted")
            for note in prepared.notes:
                s.emit(job, message=note)
            self.advancer.add_stage(job, first, now)
            self.stats.update_queue()
            self.stats.update_jobs()
            log.info(
                "job submitted",
                extra={"job_id": job_id, "kind": kind.name, "tasks": first.n_tasks},
            )
        s.run_deferred()
        with s.lock:
            return s.view(job)
