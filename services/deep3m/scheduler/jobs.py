"""A job as the scheduler holds it, and what it tells the outside about jobs and leases.

``Job`` is the mutable in-memory state of one job (its record, state, stage
plans and counts, errors, outputs, the rate/ETA of its current stage). The
frozen views — :class:`JobView`, :class:`Grant`, :class:`JobError` — are
transport-neutral: the gRPC servicer (``convert``) and the in-process worker
client turn them into protos.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deep3m.core.events import TERMINAL_STATES, ProgressEvent
from deep3m.scheduler.kinds.base import VolumeFacts
from deep3m.scheduler.persistence import JobRecord
from deep3m.scheduler.queue import StageCounts
from deep3m.scheduler.stages import StageDef, StagePlan, TaskSpec

if TYPE_CHECKING:
    from deep3m.v1 import common_pb2

MAX_JOB_ERRORS = 100


@dataclass(frozen=True)
class JobError:
    """One error of a job: a gRPC status code name, a message, and where it happened."""

    code: str
    message: str
    task_id: str = ""
    field: str = ""

    def to_json(self) -> dict[str, str]:
        # Empty fields left out, as protobuf's JSON form does.
        return {k: v for k, v in vars(self).items() if v}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobError:
        return cls(
            str(data.get("code", "")),
            str(data.get("message", "")),
            str(data.get("task_id", data.get("taskId", ""))),
            str(data.get("field", "")),
        )


@dataclass(frozen=True)
class StageStatus:
    name: str
    role: str
    tasks_total: int = 0
    tasks_done: int = 0
    tasks_leased: int = 0
    tasks_quarantined: int = 0


@dataclass(frozen=True)
class JobView:
    """A snapshot of a job, as ``GetJob`` reports it."""

    id: str
    spec: common_pb2.JobSpec  # the resolved spec
    state: str
    created_unix_s: float
    updated_unix_s: float
    stages: tuple[StageStatus, ...]
    errors: tuple[JobError, ...]
    outputs: Mapping[str, str]
    metrics: Mapping[str, float]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Grant:
    """A leased task with everything its worker needs."""

    lease_id: str
    deadline_unix_s: float
    job_id: str
    stage: str
    role: str
    attempt: int
    task: TaskSpec
    spec: common_pb2.JobSpec
    volumes: Mapping[str, VolumeFacts]


def _counts_json(c: StageCounts) -> dict[str, int]:
    return {
        "total": c.total,
        "pending": c.pending,
        "leased": c.leased,
        "done": c.done,
        "quarantined": c.quarantined,
    }


@dataclass
class Job:
    record: JobRecord
    state: str
    updated: float
    stages: list[StagePlan] = field(default_factory=list)
    counts: dict[str, StageCounts] = field(default_factory=dict)
    errors: list[JobError] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    # Rate and ETA of the current stage, over this scheduler's lifetime.
    stage_started: float = 0.0
    session_tasks: int = 0
    session_voxels: float = 0.0
    final_message: str = ""
    # A stage's end or the job's result is being persisted (outside the scheduler's lock).
    advancing: bool = False
    finishing: bool = False

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def current(self) -> StagePlan | None:
        return self.stages[-1] if self.stages else None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def add_error(self, error: JobError) -> None:
        if len(self.errors) < MAX_JOB_ERRORS:
            self.errors.append(error)

    def start_stage(self, plan: StagePlan, counts: StageCounts) -> None:
        self.stages.append(plan)
        self.counts[plan.name] = counts
        self.stage_started = 0.0
        self.session_tasks = 0
        self.session_voxels = 0.0

    def task_id(self, stage: str, task: int) -> str:
        for plan in reversed(self.stages):
            if plan.name == stage:
                return plan.task_id(task)
        return f"{stage}/{task}"

    def record_completion(
        self, now: float, voxels: float, metrics: Mapping[str, float], outputs: Mapping[str, str]
    ) -> None:
        self.updated = now
        self.session_tasks += 1
        self.session_voxels += voxels
        if voxels:
            self.metrics["voxels"] = self.metrics.get("voxels", 0.0) + voxels
        if self.current is not None and self.current.n_tasks == 1:
            # Single-task stages (finalize) report job-level results.
            self.metrics.update({k: float(v) for k, v in metrics.items() if k != "voxels"})
        self.outputs.update(outputs)

    # -- progress ---------------------------------------------------------------------
    def event(
        self,
        now: float,
        *,
        message: str = "",
        error: str = "",
        task_id: str = "",
        metrics: Mapping[str, float] | None = None,
    ) -> ProgressEvent:
        """A progress event with the current stage's counts, rate and ETA."""
        plan = self.current
        counts = self.counts.get(plan.name) if plan is not None else None
        rate = eta = 0.0
        if counts is not None and self.stage_started and self.session_tasks and not self.terminal:
            elapsed = max(now - self.stage_started, 1e-6)
            rate = self.session_voxels / elapsed
            remaining = counts.total - counts.done - counts.quarantined
            eta = remaining * elapsed / self.session_tasks
        return ProgressEvent(
            job_id=self.id,
            state=self.state,
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

    def view(self, stages: tuple[StageDef, ...]) -> JobView:
        statuses = []
        for sdef in stages:
            c = self.counts.get(sdef.name)
            statuses.append(
                StageStatus(sdef.name, sdef.role)
                if c is None
                else StageStatus(sdef.name, sdef.role, c.total, c.done, c.leased, c.quarantined)
            )
        return JobView(
            self.id,
            self.record.resolved,
            self.state,
            self.record.created_unix_s,
            self.updated,
            tuple(statuses),
            tuple(self.errors),
            dict(self.outputs),
            dict(self.metrics),
            tuple(self.record.notes),
        )

    # -- the result document ------------------------------------------------------------
    def result_document(self, now: float) -> dict[str, Any]:
        """What ``jobs/<job>/result.json`` holds once the job has ended."""
        return {
            "state": self.state,
            "message": self.final_message,
            "finished_unix_s": now,
            "errors": [e.to_json() for e in self.errors],
            "outputs": self.outputs,
            "metrics": self.metrics,
            "stages": {name: _counts_json(c) for name, c in self.counts.items()},
        }

    @classmethod
    def from_result(cls, record: JobRecord, result: Mapping[str, Any]) -> Job:
        """A finished job, from its result document."""
        job = cls(
            record,
            str(result.get("state", "FAILED")),
            float(result.get("finished_unix_s", record.created_unix_s)),
            outputs={str(k): str(v) for k, v in result.get("outputs", {}).items()},
            metrics={str(k): float(v) for k, v in result.get("metrics", {}).items()},
        )
        job.final_message = str(result.get("message", ""))
        job.errors = [JobError.from_json(e) for e in result.get("errors", [])]
        for name, c in result.get("stages", {}).items():
            job.counts[str(name)] = StageCounts(
                int(c["total"]),
                int(c["pending"]),
                int(c["leased"]),
                int(c["done"]),
                int(c["quarantined"]),
            )
        return job


def index_entry(record: JobRecord, result: Mapping[str, Any] | None) -> dict[str, Any]:
    """A finished job's entry in the finished-jobs index: its state and times."""
    result = result or {}
    return {
        "state": str(result.get("state", "FAILED")),
        "created_unix_s": record.created_unix_s,
        "finished_unix_s": float(result.get("finished_unix_s", record.created_unix_s)),
    }
