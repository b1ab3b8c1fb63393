"""What a job kind is: its stages, validation, planning and stage-finished hook.

A kind validates a submitted spec once (``validate``): every ``VolumeRef`` is
resolved against the store roots and checked (existence, completeness, axes,
dtype, shape, chunk alignment), defaults are filled in, and the facts found —
shape, dtype, write grid, voxel size — are recorded as :class:`VolumeFacts`.
Those facts travel in the job record and in every task lease, so planning is
pure (no store reads) and workers do not re-derive or re-check them.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from deep3m.core.errors import InvalidArgumentError, clip
from deep3m.core.locations import StoreRoots
from deep3m.core.store import Store
from deep3m.scheduler.stages import StageDef, StagePlan
from deep3m.v1 import common_pb2

JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_job_id(job_id: str) -> str:
    if not JOB_ID.match(job_id):
        raise InvalidArgumentError(
            f"job id {clip(job_id)} must be 1–64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit",
            field="job_id",
        )
    return job_id


def job_kind(spec: common_pb2.JobSpec) -> str:
    kind = spec.WhichOneof("kind")
    if kind is None:
        raise InvalidArgumentError(
            "the job spec names no kind: set predict, train, ingest or label", field="spec"
        )
    return str(kind)


@dataclass(frozen=True)
class VolumeFacts:
    """A volume as resolved and checked at submission."""

    store_url: str  # normalised store root
    path: str
    array: str
    shape: tuple[int, ...]
    dtype: str
    grid: tuple[int, ...]  # write grid: shards when sharded, else chunks
    voxel_size_nm: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "store_url": self.store_url,
            "path": self.path,
            "array": self.array,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "grid": list(self.grid),
            "voxel_size_nm": list(self.voxel_size_nm),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VolumeFacts:
        return cls(
            str(data["store_url"]),
            str(data["path"]),
            str(data.get("array", "")),
            tuple(int(v) for v in data["shape"]),
            str(data["dtype"]),
            tuple(int(v) for v in data["grid"]),
            tuple(float(v) for v in data["voxel_size_nm"]),
        )


@dataclass(frozen=True)
class Resolved:
    """A validated spec: defaults filled in, plus the facts about its volumes."""

    spec: common_pb2.JobSpec
    volumes: Mapping[str, VolumeFacts] = field(default_factory=dict)

    def volume(self, name: str) -> VolumeFacts:
        try:
            return self.volumes[name]
        except KeyError:
            raise InvalidArgumentError(
                f"the job record holds no resolved {name!r} volume (recorded by an older "
                "scheduler?); resubmit the job",
                field=name,
            ) from None


@dataclass(frozen=True)
class NewVolume:
    """An output volume the job creates at submit."""

    store: Store
    key: str
    shape: tuple[int, ...]
    dtype: str
    voxel_size_nm: tuple[float, ...]
    chunk_shape: tuple[int, ...]
    shard_shape: tuple[int, ...] | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    # An old volume at the key is deleted first (overwrite, or a failed job's debris).
    replace: bool = False


@dataclass(frozen=True)
class PreparedJob:
    """What ``validate`` returns: the resolved job, its outputs, what to create, and notes."""

    kind: str
    resolved: Resolved
    outputs: Mapping[str, str]
    volumes: tuple[NewVolume, ...] = ()
    # Adjustments made to the spec that a user should hear about (`Job.notes`).
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class KindContext:
    """What validation may consult: the store roots and the scheduler's limits."""

    roots: StoreRoots
    max_region_voxels: int = 64 * 1024 * 1024
    restrict_local_inputs: bool = True
    # How long the scheduler's own volume writes (sealing an output) wait out an
    # unreachable store.
    store_retry_s: float = 120.0
    # Re-validating a job already submitted (recovery): its own output is expected.
    resume: bool = False


class JobKind(ABC):
    """One kind of job. Subclasses set ``name`` and ``stages`` and implement the hooks."""

    name: ClassVar[str]
    stages: ClassVar[tuple[StageDef, ...]]

    @abstractmethod
    def validate(self, spec: common_pb2.JobSpec, ctx: KindContext) -> PreparedJob:
        """Check ``spec`` before anything exists; every error names the offending field."""

    def stages_for(self, resolved: Resolved) -> tuple[StageDef, ...]:
        """The stages of one job (a kind whose stages depend on its spec overrides this)."""
        del resolved
        return self.stages

    def plan(self, index: int, resolved: Resolved) -> StagePlan | None:
        """Stage ``index`` as a formula, from the resolved job alone; None past the end.

        The default plans one task; kinds override for their parallel stages.
        """
        stages = self.stages_for(resolved)
        if index >= len(stages):
            return None
        sdef = stages[index]
        return StagePlan(index, sdef.name, sdef.role, "single")

    def on_stage_finished(
        self, plan: StagePlan, resolved: Resolved, ctx: KindContext, job_id: str
    ) -> None:
        """Runs once every task of ``plan`` is done, before the next stage is planned."""
        del plan, resolved, ctx, job_id

    def check_completion(
        self, plan: StagePlan, task: int, metrics: Mapping[str, float], resolved: Resolved
    ) -> str:
        """Why a reported completion of ``task`` cannot count ("" when it can).

        A kind whose tasks each own part of an output checks here that the worker
        says it wrote all of it, so that a buggy or forged worker cannot finish a
        job that wrote nothing.
        """
        del plan, task, metrics, resolved
        return ""

    def check_records(
        self, plan: StagePlan, records: Mapping[int, Mapping[str, Any]], resolved: Resolved
    ) -> str:
        """The final check before ``plan``'s outputs are sealed: why the stored
        completion records (task number → record with its ``metrics``) do not
        account for every part of the output ("" when they do). Every task has a
        record by the time this runs."""
        del plan, records, resolved
        return ""

    @staticmethod
    def resolved_spec(spec: common_pb2.JobSpec) -> common_pb2.JobSpec:
        """A copy of ``spec`` to fill defaults into."""
        out = common_pb2.JobSpec()
        out.CopyFrom(spec)
        return out


def replace_repeated(field_value: Any, values: Sequence[Any]) -> None:
    """Set a repeated proto field to ``values``."""
    del field_value[:]
    field_value.extend(values)
