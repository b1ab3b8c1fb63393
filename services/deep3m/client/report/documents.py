"""A job's documents in the store (``job.json``, ``result.json``) and the volumes
they name, by role."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deep3m.core.errors import InvalidArgumentError, NotFoundError
from deep3m.core.store import Store


@dataclass(frozen=True)
class JobVolumes:
    """What a job read and wrote, by role."""

    image: str = ""
    probabilities: str = ""
    model: str = ""
    ground_truth: str = ""  # a train job's validation labels


def _path(ref: Any) -> str:
    return str(ref.get("path", "")) if isinstance(ref, Mapping) else ""


def job_volumes(record: Mapping[str, Any]) -> JobVolumes:
    spec = record.get("resolved_spec") or record.get("spec") or {}
    if "predict" in spec:
        p = spec["predict"]
        return JobVolumes(_path(p.get("input")), _path(p.get("output")), str(p.get("model", "")))
    if "train" in spec:
        t = spec["train"]
        return JobVolumes(
            _path(t.get("validation_images")) or _path(t.get("images")),
            model=str(t.get("model", "")),
            ground_truth=_path(t.get("validation_labels")),
        )
    if "ingest" in spec:
        return JobVolumes(_path(spec["ingest"].get("output")))
    return JobVolumes()


def load_job(store: Store, job_id: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The job's record and its result (None while it runs)."""
    if not job_id or "/" in job_id or job_id in (".", ".."):
        raise InvalidArgumentError(f"job id {job_id!r} is not one path segment", field="job")
    key = f"jobs/{job_id}/job.json"
    if not store.exists(key):
        raise NotFoundError(f"job {job_id} has no record ({store.key_url(key)})", field="job")
    record = store.read_json(key)
    result_key = f"jobs/{job_id}/result.json"
    result = store.read_json(result_key) if store.exists(result_key) else None
    if not isinstance(record, dict) or (result is not None and not isinstance(result, dict)):
        raise InvalidArgumentError(f"job {job_id}'s documents are not JSON objects", field="job")
    return record, result
