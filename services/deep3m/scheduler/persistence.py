"""The scheduler's durable state, as small documents in the store.

```
jobs/<job>/job.json                  immutable: spec as submitted, resolved spec and
                                     volumes, outputs
jobs/<job>/stages/<index>.json       immutable stage plan (a formula, not a task list)
jobs/<job>/done/<stage>/<task>       the record of a task completed alone
jobs/<job>/done/<stage>/batch-<id>   the records of tasks completed together
jobs/<job>/quarantine/<stage>/<task> the error of a task given up on
jobs/<job>/cancelled                 cancel marker
jobs/<job>/result.json               final state, errors, outputs, metrics
scheduler/epochs.json                the latest scheduler instances (lease adoption)
scheduler/finished.json              index of finished jobs (id, state, times)
scheduler/fence.json, fence.lock     who may write all of the above (``fencing``)
```

Each document is written whole (rename on ``file://``, one PUT on S3), so a
reader never sees half of one. Completion records are idempotent: a retried
task writes the same key, and a task named in several batches is done once.
A batch of completions is one object, so a worker completing many tasks per
call costs one write, not one per task. A job with ``result.json`` is finished; any other
job is rebuilt on start from these documents, so completed tasks are not
redone and nothing is lost. Submitting writes two documents whatever the job
size: the plan is a formula.

Only one scheduler writes: once ``fence_with`` gave the store a fence, every
write and delete first checks that this scheduler still holds it (no I/O) and
raises ``FencedError`` otherwise, and the two documents that are read, changed
and written back (the epochs and the finished index) are written conditionally
on the version this scheduler last read, where the fence has a conditional
store (S3): a late write of a fenced-off scheduler fails there too.
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np
from google.protobuf import json_format

from deep3m.core.errors import InvalidArgumentError, NotFoundError, store_unreachable
from deep3m.core.executor import bounded_map
from deep3m.core.retry import retry_while
from deep3m.core.store import Store
from deep3m.scheduler.fencing import FencedDocuments, WriteFence
from deep3m.scheduler.kinds.base import Resolved, VolumeFacts, check_job_id, job_kind
from deep3m.scheduler.stages import StagePlan
from deep3m.v1 import common_pb2

FORMAT_VERSION = 1
JOBS_PREFIX = "jobs"
EPOCHS_KEY = "scheduler/epochs.json"
FINISHED_KEY = "scheduler/finished.json"
BATCH_PREFIX = "batch-"
# Reading many small documents from an object store is latency-bound: in parallel.
READ_THREADS = 16
# Leases older than the last few restarts have long expired; no need to adopt them.
KEEP_EPOCHS = 16
# How long an unreachable store is waited out by default (Settings.store_retry_seconds).
STORE_RETRY_S = 120.0

log = logging.getLogger("deep3m.scheduler")
P = ParamSpec("P")
R = TypeVar("R")


def _waits_out_outages(
    method: Callable[Concatenate[JobStore, P], R],
) -> Callable[Concatenate[JobStore, P], R]:
    """Retry ``method`` with backoff while the store is unreachable, up to ``retry_s``.

    Not on the completion path (``mark_done*``): a worker waits for that answer
    within its call's deadline and retries the call itself.
    """

    @functools.wraps(method)
    def wrapper(self: JobStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        def note(exc: BaseException, delay: float) -> None:
            log.warning(
                "store unreachable (%s: %s); %s retried in %.1f s",
                type(exc).__name__,
                str(exc)[:200],
                method.__name__,
                delay,
            )

        return retry_while(
            lambda: method(self, *args, **kwargs),
            store_unreachable,
            budget_s=self.retry_s,
            on_retry=note,
        )

    return wrapper


def spec_to_json(spec: common_pb2.JobSpec) -> dict[str, Any]:
    return dict(json_format.MessageToDict(spec, preserving_proto_field_name=True))


def spec_from_json(data: Mapping[str, Any], *, where: str) -> common_pb2.JobSpec:
    try:
        return json_format.ParseDict(dict(data), common_pb2.JobSpec())
    except json_format.ParseError as exc:
        raise InvalidArgumentError(f"invalid job spec in {where}: {exc}", field="spec") from exc


@dataclass(frozen=True)
class JobRecord:
    """What ``job.json`` holds; never changes after submit."""

    id: str
    kind: str
    spec: common_pb2.JobSpec  # as submitted
    resolved: common_pb2.JobSpec  # defaults filled in; what workers receive
    created_unix_s: float
    max_attempts: int
    outputs: Mapping[str, str] = field(default_factory=dict)
    # The volumes as checked at submit (shape, dtype, grid, voxel size).
    volumes: Mapping[str, VolumeFacts] = field(default_factory=dict)
    # Adjustments made to the spec at submit, for the user.
    notes: tuple[str, ...] = ()

    @property
    def resolution(self) -> Resolved:
        return Resolved(self.resolved, self.volumes)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "id": self.id,
            "kind": self.kind,
            "spec": spec_to_json(self.spec),
            "resolved_spec": spec_to_json(self.resolved),
            "created_unix_s": self.created_unix_s,
            "max_attempts": self.max_attempts,
            "outputs": dict(self.outputs),
            "volumes": {name: v.to_json() for name, v in self.volumes.items()},
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, where: str) -> JobRecord:
        try:
            spec = spec_from_json(data["spec"], where=where)
            resolved = spec_from_json(data["resolved_spec"], where=where)
            kind = str(data["kind"])
            if kind != job_kind(resolved):
                raise InvalidArgumentError(
                    f"{where}: kind {kind!r} does not match its spec", field="kind"
                )
            return cls(
                str(data["id"]),
                kind,
                spec,
                resolved,
                float(data["created_unix_s"]),
                int(data["max_attempts"]),
                dict(data.get("outputs", {})),
                {
                    str(name): VolumeFacts.from_json(v)
                    for name, v in data.get("volumes", {}).items()
                },
                tuple(str(n) for n in data.get("notes", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(
                f"{where} is not a valid job record: {exc}", field="job"
            ) from exc


class JobStore:
    """Reads and writes the scheduler's documents; thread-safe for distinct keys.

    Everything but submitting and recording completions (whose callers retry)
    waits out an unreachable store for ``retry_s`` seconds.
    """

    def __init__(
        self, store: Store, fence: WriteFence | None = None, *, retry_s: float = STORE_RETRY_S
    ) -> None:
        self.store = store
        self.retry_s = retry_s
        self._index_lock = threading.Lock()
        self._finished: dict[str, dict[str, Any]] | None = None
        self._fence: WriteFence | None = None
        self._docs: FencedDocuments | None = None
        if fence is not None:
            self.fence_with(fence)

    # -- the fence ----------------------------------------------------------------
    def fence_with(self, fence: WriteFence) -> None:
        """From now on write only while ``fence`` (claimed) is held; adopts the documents
        that are rewritten in place, so a fenced-off holder's late writes of them fail."""
        fence.check()
        docs = None if fence.documents is None else FencedDocuments(fence.documents, fence)
        if docs is not None:
            docs.adopt([EPOCHS_KEY, FINISHED_KEY])
        with self._index_lock:
            self._fence, self._docs, self._finished = fence, docs, None

    def _check(self) -> None:
        if self._fence is not None:
            self._fence.check()

    def _write_json(self, key: str, obj: Any) -> None:
        self._check()
        self.store.write_json(key, obj)

    def _write_bytes(self, key: str, data: bytes) -> None:
        self._check()
        self.store.write_bytes(key, data)

    def _read_index(self, key: str) -> Any:
        """A read-modify-write document (remembering its version), or {}."""
        if self._docs is not None:
            return self._docs.read(key) or {}
        return self.store.read_json(key) if self.store.exists(key) else {}

    def _write_index(self, key: str, doc: dict[str, Any]) -> None:
        if self._docs is not None:
            self._docs.write(key, doc)
        else:
            self._write_json(key, doc)

    @staticmethod
    def _job(job_id: str) -> str:
        return f"{JOBS_PREFIX}/{check_job_id(job_id)}"

    # -- jobs -----------------------------------------------------------------
    @_waits_out_outages
    def listed_job_ids(self) -> list[str]:
        """Every folder under ``jobs/``, without checking each (one listing)."""
        return self.store.list(JOBS_PREFIX)

    def has_job(self, job_id: str) -> bool:
        return self.store.exists(f"{self._job(job_id)}/job.json")

    def save_job(self, record: JobRecord) -> None:
        self._write_json(f"{self._job(record.id)}/job.json", record.to_json())

    @_waits_out_outages
    def load_job(self, job_id: str) -> JobRecord:
        key = f"{self._job(job_id)}/job.json"
        if not self.store.exists(key):
            raise NotFoundError(f"job {job_id!r} not found", field="job_id")
        return JobRecord.from_json(self.store.read_json(key), where=self.store.key_url(key))

    @_waits_out_outages
    def delete_job(self, job_id: str) -> None:
        self._check()
        self.store.delete(self._job(job_id))

    # -- stages ---------------------------------------------------------------
    @_waits_out_outages
    def save_stage(self, job_id: str, plan: StagePlan) -> None:
        self._write_json(f"{self._job(job_id)}/stages/{plan.index}.json", plan.to_json())

    @_waits_out_outages
    def load_stages(self, job_id: str) -> list[StagePlan]:
        prefix = f"{self._job(job_id)}/stages"
        names = [n for n in self.store.list(prefix) if n.endswith(".json")]
        plans = [StagePlan.from_json(self.store.read_json(f"{prefix}/{n}")) for n in names]
        plans.sort(key=lambda p: p.index)
        if [p.index for p in plans] != list(range(len(plans))):
            raise InvalidArgumentError(
                f"stage plans of job {job_id!r} are not consecutive: {[p.index for p in plans]}",
                field="stages",
            )
        return plans

    # -- task records -------------------------------------------------------------
    def mark_done(self, job_id: str, stage: str, task: int, record: Mapping[str, Any]) -> None:
        self._write_bytes(
            f"{self._job(job_id)}/done/{stage}/{task}",
            json.dumps(dict(record), sort_keys=True).encode(),
        )

    def mark_done_batch(
        self, job_id: str, stage: str, records: Mapping[int, Mapping[str, Any]]
    ) -> None:
        """The records of several tasks of one stage, as one object."""
        if len(records) == 1:
            ((task, record),) = records.items()
            self.mark_done(job_id, stage, task, record)
            return
        name = f"{BATCH_PREFIX}{time.time_ns():x}-{secrets.token_hex(4)}"
        body = {str(task): dict(rec) for task, rec in records.items()}
        self._write_bytes(
            f"{self._job(job_id)}/done/{stage}/{name}",
            json.dumps({"records": body}, sort_keys=True).encode(),
        )

    def _batches(self, job_id: str, stage: str, names: Iterable[str]) -> list[dict[str, Any]]:
        prefix = f"{self._job(job_id)}/done/{stage}"
        keys = [f"{prefix}/{n}" for n in names if n.startswith(BATCH_PREFIX)]
        out: list[dict[str, Any]] = [{}] * len(keys)
        for i, raw in bounded_map(self.store.read_bytes, keys, min(READ_THREADS, len(keys))):
            out[i] = dict(json.loads(raw)["records"])
        return out

    @_waits_out_outages
    def done_tasks(self, job_id: str, stage: str) -> np.ndarray:
        names = self.store.list(f"{self._job(job_id)}/done/{stage}")
        tasks = {int(n) for n in names if n.isdigit()}
        for batch in self._batches(job_id, stage, names):
            tasks.update(int(t) for t in batch)
        return np.fromiter(sorted(tasks), dtype=np.int64, count=len(tasks))

    @_waits_out_outages
    def done_records(self, job_id: str, stage: str) -> dict[int, dict[str, Any]]:
        """Every completion record of a stage, by task number."""
        prefix = f"{self._job(job_id)}/done/{stage}"
        names = self.store.list(prefix)
        singles = [int(n) for n in names if n.isdigit()]
        keys = [f"{prefix}/{t}" for t in singles]
        records: dict[int, dict[str, Any]] = {}
        for batch in self._batches(job_id, stage, names):
            records.update((int(t), dict(r)) for t, r in batch.items())
        for i, raw in bounded_map(self.store.read_bytes, keys, min(READ_THREADS, len(keys))):
            records[singles[i]] = dict(json.loads(raw))
        return records

    @_waits_out_outages
    def done_record(self, job_id: str, stage: str, task: int) -> dict[str, Any]:
        prefix = f"{self._job(job_id)}/done/{stage}"
        names = self.store.list(prefix)
        if str(task) in names:
            return dict(json.loads(self.store.read_bytes(f"{prefix}/{task}")))
        for batch in self._batches(job_id, stage, names):
            if str(task) in batch:
                return dict(batch[str(task)])
        raise NotFoundError(f"no completion record of task {task} of {prefix}", field="task")

    @_waits_out_outages
    def save_quarantine(
        self, job_id: str, stage: str, task: int, record: Mapping[str, Any]
    ) -> None:
        self._write_bytes(
            f"{self._job(job_id)}/quarantine/{stage}/{task}",
            json.dumps(dict(record), sort_keys=True).encode(),
        )

    @_waits_out_outages
    def quarantined(self, job_id: str, stage: str) -> dict[int, dict[str, Any]]:
        prefix = f"{self._job(job_id)}/quarantine/{stage}"
        return {
            int(n): dict(json.loads(self.store.read_bytes(f"{prefix}/{n}")))
            for n in self.store.list(prefix)
            if n.isdigit()
        }

    # -- scheduler instances ------------------------------------------------------
    @_waits_out_outages
    def register_epoch(self, epoch: str) -> list[str]:
        """Record this instance; returns the earlier ones (newest last)."""
        data = self._read_index(EPOCHS_KEY)
        earlier = [str(e) for e in data.get("epochs", [])] if isinstance(data, dict) else []
        self._write_index(EPOCHS_KEY, {"epochs": [*earlier, epoch][-KEEP_EPOCHS:]})
        return earlier

    # -- ends ---------------------------------------------------------------------
    @_waits_out_outages
    def mark_cancelled(self, job_id: str) -> None:
        self._write_json(f"{self._job(job_id)}/cancelled", {"unix_s": time.time()})

    @_waits_out_outages
    def is_cancelled(self, job_id: str) -> bool:
        return self.store.exists(f"{self._job(job_id)}/cancelled")

    @_waits_out_outages
    def save_result(self, job_id: str, result: Mapping[str, Any]) -> None:
        self._write_json(f"{self._job(job_id)}/result.json", dict(result))

    # -- the index of finished jobs ------------------------------------------------
    @_waits_out_outages
    def finished_index(self) -> dict[str, dict[str, Any]]:
        """job id → {state, created_unix_s, finished_unix_s} of every indexed finished job."""
        with self._index_lock:
            if self._finished is None:
                data = self._read_index(FINISHED_KEY)
                jobs = data.get("jobs", {}) if isinstance(data, dict) else {}
                self._finished = {str(k): dict(v) for k, v in jobs.items()}
            return dict(self._finished)

    @_waits_out_outages
    def index_finished(
        self, entries: Mapping[str, Mapping[str, Any]], removed: Iterable[str] = ()
    ) -> None:
        """Add (or drop) finished jobs in the index; one write of the whole index."""
        self.finished_index()
        with self._index_lock:
            assert self._finished is not None  # loaded just above
            self._finished.update({k: dict(v) for k, v in entries.items()})
            for job_id in removed:
                self._finished.pop(job_id, None)
            self._write_index(FINISHED_KEY, {"jobs": self._finished})

    @_waits_out_outages
    def load_result(self, job_id: str) -> dict[str, Any] | None:
        key = f"{self._job(job_id)}/result.json"
        if not self.store.exists(key):
            return None
        return dict(self.store.read_json(key))
