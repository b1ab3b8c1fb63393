"""A Rich progress display fed by a job's watch stream."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from deep3m.core.events import ProgressEvent


def describe(event: ProgressEvent) -> str:
    parts = []
    if event.voxels_per_second:
        parts.append(f"{event.voxels_per_second / 1e6:.2f} Mvox/s")
    if event.eta_seconds:
        parts.append(f"ETA {event.eta_seconds:.0f}s")
    metrics = event.metrics
    if "iteration" in metrics:
        parts.append(f"it {int(metrics['iteration'])}")
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    if "f1" in metrics:
        parts.append(f"val F1 {metrics['f1']:.3f}")
    if event.message and not parts:
        parts.append(event.message)
    return " · ".join(parts)


def follow_job(client: Any, job_id: str, *, console: Console, show: bool = True) -> Any:
    """Consume ``client.watch(job_id)`` until the job ends; returns the final job."""
    if not show:
        for _ in client.watch(job_id):
            pass
        return client.get(job_id)
    with Progress(
        TextColumn("[bold]{task.fields[stage]:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    ) as progress:
        bars: dict[str, TaskID] = {}
        for event in client.watch(job_id):
            if event.stage:
                if event.stage not in bars:
                    bars[event.stage] = progress.add_task(
                        event.stage, total=max(event.tasks_total, 1), stage=event.stage, info=""
                    )
                bar = bars[event.stage]
                progress.update(
                    bar,
                    completed=event.tasks_done,
                    total=max(event.tasks_total, 1),
                    info=describe(event),
                )
            if event.error:
                progress.console.print(f"[red]{event.error}[/red]")
    return client.get(job_id)
