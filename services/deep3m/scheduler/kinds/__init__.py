"""Job kinds: one module per kind, and the registry the scheduler dispatches on.

Adding a kind: a module here with a :class:`JobKind` subclass (its stages,
``validate``, ``plan``, ``on_stage_finished``), an entry in ``KINDS``, the
field in ``JobSpec``'s ``kind`` oneof, and a task handler in the role that
runs each stage.
"""

from __future__ import annotations

from collections.abc import Mapping

from deep3m.core.errors import InvalidArgumentError
from deep3m.runtime.limits import check_message
from deep3m.scheduler.kinds.base import (
    JobKind,
    KindContext,
    NewVolume,
    PreparedJob,
    Resolved,
    VolumeFacts,
    check_job_id,
    job_kind,
)
from deep3m.scheduler.kinds.ingest import IngestKind
from deep3m.scheduler.kinds.label import LabelKind
from deep3m.scheduler.kinds.predict import PredictKind
from deep3m.scheduler.kinds.train import TrainKind
from deep3m.v1 import common_pb2

KINDS: Mapping[str, JobKind] = {
    k.name: k for k in (PredictKind(), TrainKind(), IngestKind(), LabelKind())
}


def get_kind(name: str) -> JobKind:
    kind = KINDS.get(name)
    if kind is None:
        raise InvalidArgumentError(
            f"unknown job kind {name!r}; the scheduler knows {', '.join(KINDS)}", field="kind"
        )
    return kind


def kind_of(spec: common_pb2.JobSpec) -> JobKind:
    return get_kind(job_kind(spec))


def validate(spec: common_pb2.JobSpec, ctx: KindContext) -> PreparedJob:
    """The checks every kind shares, then the kind's own."""
    kind = kind_of(spec)
    check_message(spec, "spec")  # also for callers that bypass the gRPC interceptor
    if not 0 <= spec.max_attempts <= 100:
        raise InvalidArgumentError(
            f"max_attempts must be 0..100, got {spec.max_attempts}", field="max_attempts"
        )
    return kind.validate(spec, ctx)


__all__ = [
    "KINDS",
    "JobKind",
    "KindContext",
    "NewVolume",
    "PreparedJob",
    "Resolved",
    "VolumeFacts",
    "check_job_id",
    "get_kind",
    "job_kind",
    "kind_of",
    "validate",
]
