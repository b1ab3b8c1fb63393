"""Follow a job's watch stream and show it: a live Rich display, text lines, or JSON lines.

``JobProgress`` folds the stream into what a person follows: per stage, tasks
done of total with the scheduler's rate and ETA; per training task (one per
ensemble member), the iteration, loss, iterations per second, an ETA from that
rate and the latest validation figures. Workers send only what changed since
their last heartbeat, so validation figures are remembered until replaced.

``follow_job`` picks the display: ``live`` (a terminal: bars redrawn several
times a second), ``lines`` (not a terminal: one line per stage change,
validation, error, and per task at most every ``line_interval_s``), ``json``
(one compact JSON object per event on ``stream``, ``"event": "progress"``,
with the derived training figures) or ``none``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from deep3m.core.events import ProgressEvent
from deep3m.v1 import common_pb2

Display = Literal["live", "lines", "json", "none"]
# Metrics a training task reports after each validation (the trainer's VALIDATION_KEYS).
VALIDATION_KEYS = ("val_loss", "accuracy", "precision", "recall", "f1", "jaccard")
_SHORT = {"val_loss": "val loss", "precision": "P", "recall": "R", "f1": "F1", "jaccard": "J"}
# Weight of the newest measurement in the smoothed iteration rate.
_RATE_SMOOTHING = 0.5
RESUMED = "scheduler restarted; resuming"


class _Client(Protocol):
    def watch(
        self, job_id: str, *, on_resume: Callable[[], None] | None = None
    ) -> Iterable[ProgressEvent]: ...

    def get(self, job_id: str) -> common_pb2.Job: ...


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


@dataclass
class TaskProgress:
    """The latest training figures of one task (one ensemble member)."""

    task_id: str
    iteration: int = 0
    iterations: int = 0
    loss: float | None = None
    iterations_per_second: float = 0.0
    validation: dict[str, float] = field(default_factory=dict)
    # The trainer's own ETA, when it reports one: it knows the time budget.
    reported_eta_seconds: float | None = None
    _seen: tuple[float, int] | None = field(default=None, repr=False)
    _seen_at: float = field(default=0.0, repr=False)

    @property
    def eta_seconds(self) -> float | None:
        if self.reported_eta_seconds is not None:
            return self.reported_eta_seconds
        if self.iterations_per_second <= 0 or not self.iterations:
            return None
        return max(self.iterations - self.iteration, 0) / self.iterations_per_second

    def update(self, metrics: Mapping[str, float], time_s: float) -> bool:
        """Fold one report in; True when it carried new validation figures."""
        if "iterations" in metrics:
            self.iterations = int(metrics["iterations"])
        if "eta_seconds" in metrics and math.isfinite(metrics["eta_seconds"]):
            self.reported_eta_seconds = max(0.0, float(metrics["eta_seconds"]))
        if "loss" in metrics and math.isfinite(metrics["loss"]):
            self.loss = float(metrics["loss"])
        if "iteration" in metrics:
            iteration = int(metrics["iteration"])
            if self._seen is not None and iteration > self._seen[1] and time_s > self._seen[0]:
                rate = (iteration - self._seen[1]) / (time_s - self._seen[0])
                self.iterations_per_second = (
                    rate
                    if not self.iterations_per_second
                    else _RATE_SMOOTHING * rate + (1 - _RATE_SMOOTHING) * self.iterations_per_second
                )
            if self._seen is None or iteration != self._seen[1]:
                self._seen = (time_s, iteration)
            self.iteration = iteration
        found = {k: float(metrics[k]) for k in VALIDATION_KEYS if k in metrics}
        self.validation.update(found)
        return bool(found)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "iteration": self.iteration,
            "iterations": self.iterations,
            "loss": self.loss,
            "iterations_per_second": self.iterations_per_second,
            "eta_seconds": self.eta_seconds,
            "validation": dict(self.validation),
        }

    def describe(self) -> str:
        parts = [f"it {self.iteration}" + (f"/{self.iterations}" if self.iterations else "")]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.iterations_per_second:
            parts.append(f"{self.iterations_per_second:.2f} it/s")
        eta = self.eta_seconds
        if eta is not None:
            parts.append(f"ETA {_duration(eta)}")
        if self.validation:
            shown = [
                f"{_SHORT.get(k, k)} {self.validation[k]:.3f}"
                for k in VALIDATION_KEYS
                if k in self.validation and k != "accuracy"
            ]
            parts.append("val " + " ".join(shown))
        return " · ".join(parts)


@dataclass
class StageProgress:
    name: str
    tasks_done: int = 0
    tasks_total: int = 0
    voxels_per_second: float = 0.0
    eta_seconds: float = 0.0

    def describe(self, *, counts: bool = True) -> str:
        parts = [f"{self.tasks_done}/{self.tasks_total} tasks"] if counts else []
        if self.voxels_per_second:
            parts.append(f"{self.voxels_per_second / 1e6:.2f} Mvox/s")
        if self.eta_seconds:
            parts.append(f"ETA {_duration(self.eta_seconds)}")
        return " · ".join(parts)


@dataclass
class JobProgress:
    """What the watch stream of one job has said so far."""

    job_id: str
    state: str = ""
    stages: dict[str, StageProgress] = field(default_factory=dict)
    tasks: dict[str, TaskProgress] = field(default_factory=dict)

    def update(self, event: ProgressEvent) -> Change:
        """Fold one event in; returns what it touched."""
        if event.state:
            self.state = event.state
        stage = None
        if event.stage:
            stage = self.stages.setdefault(event.stage, StageProgress(event.stage))
            if event.tasks_total:
                stage.tasks_done = event.tasks_done
                stage.tasks_total = event.tasks_total
                stage.voxels_per_second = event.voxels_per_second
                stage.eta_seconds = event.eta_seconds
        task, validated = None, False
        if event.task_id and ("iteration" in event.metrics or "loss" in event.metrics):
            task = self.tasks.setdefault(event.task_id, TaskProgress(event.task_id))
            validated = task.update(event.metrics, event.time_unix_s)
        return Change(stage, task, validated)


@dataclass(frozen=True)
class Change:
    """The parts of a job's progress one event touched."""

    stage: StageProgress | None
    task: TaskProgress | None
    validated: bool = False


def event_record(event: ProgressEvent, task: TaskProgress | None) -> dict[str, Any]:
    """One JSON line: the event as sent, plus the derived training figures of its task."""
    record: dict[str, Any] = {
        "event": "progress",
        "job_id": event.job_id,
        "time_unix_s": event.time_unix_s,
        "state": event.state,
        "stage": event.stage,
        "tasks_done": event.tasks_done,
        "tasks_total": event.tasks_total,
        "voxels_per_second": event.voxels_per_second,
        "eta_seconds": event.eta_seconds,
    }
    for key in ("task_id", "message", "error"):
        if getattr(event, key):
            record[key] = getattr(event, key)
    if event.metrics:
        record["metrics"] = {k: v for k, v in event.metrics.items() if math.isfinite(v)}
    if task is not None:
        record["training"] = task.to_dict()
    return record


def _task_label(stage: str, task_id: str) -> str:
    """``train/1fm`` under stage ``train`` shows as ``1fm``."""
    return task_id.removeprefix(f"{stage}/") if stage else task_id


class _Live:
    """A Rich display: one bar per stage and one per training task."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.fields[label]:<14}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=False,
        )
        self.rows: dict[str, TaskID] = {}

    def _row(self, key: str, label: str) -> TaskID:
        if key not in self.rows:
            self.rows[key] = self.progress.add_task(label, total=None, label=label, info="")
        return self.rows[key]

    def show(self, event: ProgressEvent, change: Change) -> None:
        stage, task = change.stage, change.task
        if stage is not None and stage.tasks_total:
            self.progress.update(
                self._row("stage:" + stage.name, stage.name),
                completed=stage.tasks_done,
                total=max(stage.tasks_total, 1),
                info=stage.describe(counts=False),
            )
        if task is not None:
            row = self._row("task:" + task.task_id, "  " + _task_label(event.stage, task.task_id))
            self.progress.update(
                row,
                completed=task.iteration,
                total=task.iterations or None,
                info=task.describe(),
            )
        if event.error:
            self.progress.console.print(f"[red]{escape(event.error)}[/red]")


class _Lines:
    """Plain lines for logs and pipes, throttled per task."""

    def __init__(self, console: Console, interval_s: float) -> None:
        self.console = console
        self.interval_s = interval_s
        self.last_line: dict[str, float] = {}
        self.last_stage: dict[str, tuple[int, int]] = {}

    def say(self, text: str) -> None:
        self.console.print(text, soft_wrap=True, markup=False, highlight=False)

    def show(self, event: ProgressEvent, change: Change) -> None:
        stage, task = change.stage, change.task
        if stage is not None and stage.tasks_total:
            counts = (stage.tasks_done, stage.tasks_total)
            if self.last_stage.get(stage.name) != counts:
                self.last_stage[stage.name] = counts
                self.say(f"{stage.name:<12} {stage.describe()}")
        if task is not None:
            last = self.last_line.get(task.task_id)
            if change.validated or last is None or event.time_unix_s - last >= self.interval_s:
                self.last_line[task.task_id] = event.time_unix_s
                label = _task_label(event.stage, task.task_id)
                self.say(f"{event.stage or 'task':<12} {label}: {task.describe()}")
        if event.error:
            self.say(f"error: {event.error}")
        if event.terminal:
            self.say(f"job {event.job_id} {event.state}")


def follow_job(
    client: _Client,
    job_id: str,
    *,
    console: Console,
    display: Display = "live",
    stream: TextIO | None = None,
    line_interval_s: float = 5.0,
) -> common_pb2.Job:
    """Consume ``client.watch(job_id)`` until the job ends, showing it; returns the final job.

    ``live`` falls back to ``lines`` when ``console`` is not a terminal. A watch
    that outlives a scheduler restart says so on ``console`` (and, for ``json``,
    as an ``"event": "resumed"`` line) and carries on.
    """
    if display == "live" and not console.is_terminal:
        display = "lines"
    job = JobProgress(job_id)

    def resumed() -> None:
        console.print(RESUMED, markup=False, highlight=False)
        if display == "json" and stream is not None:
            stream.write(json.dumps({"event": "resumed", "job_id": job_id}) + "\n")
            stream.flush()

    if display == "live":
        live = _Live(console)
        with live.progress:
            for event in client.watch(job_id, on_resume=resumed):
                live.show(event, job.update(event))
    elif display == "lines":
        lines = _Lines(console, line_interval_s)
        for event in client.watch(job_id, on_resume=resumed):
            lines.show(event, job.update(event))
    elif display == "json":
        if stream is None:
            raise ValueError("display 'json' needs a stream")
        for event in client.watch(job_id, on_resume=resumed):
            record = event_record(event, job.update(event).task)
            stream.write(json.dumps(record, allow_nan=False) + "\n")
            stream.flush()
    else:
        for event in client.watch(job_id, on_resume=resumed):
            job.update(event)
    return client.get(job_id)
