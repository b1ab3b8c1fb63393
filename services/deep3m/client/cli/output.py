"""How results look: text tables and lines for people, JSON for programs.

Every command builds a plain report (a dict, or a ``Job`` message) and hands it
to ``emit``/``print_job``; the ``render_*`` functions are the text forms. Progress
of long local work goes through ``progress_bar``; progress of jobs through ``follow``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from google.protobuf.json_format import MessageToDict
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from deep3m.client.cli.app import console, out, state
from deep3m.client.client import Deep3mClient
from deep3m.client.progress import follow_job
from deep3m.v1 import common_pb2


def job_dict(job: common_pb2.Job) -> dict[str, Any]:
    return MessageToDict(job, preserving_proto_field_name=True)


def state_name(value: int) -> str:
    return str(common_pb2.JobState.Name(value)).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


def print_job(job: common_pb2.Job, *, line: bool = False) -> None:
    """The job as a table (text) or JSON; ``line``: one JSON line, after progress lines."""
    if state.json:
        if line:
            say(json.dumps(job_dict(job)))
        else:
            out.print_json(json.dumps(job_dict(job)))
        return
    table = Table(title=f"job {job.id}", show_header=True)
    table.add_column("stage")
    table.add_column("role")
    table.add_column("done", justify="right")
    table.add_column("total", justify="right")
    table.add_column("quarantined", justify="right")
    for stage in job.stages:
        table.add_row(
            stage.name,
            stage.role,
            str(stage.tasks_done),
            str(stage.tasks_total),
            str(stage.tasks_quarantined),
        )
    out.print(table)
    out.print(f"state: [bold]{state_name(job.state)}[/bold]")
    for key, value in job.outputs.items():
        out.print(f"  {key}: {value}")
    for err in job.errors:
        out.print(f"  [red]{err.code}[/red] {err.task_id} {err.message}")


def render_jobs(found: list[common_pb2.Job]) -> None:
    table = Table(show_header=True)
    for col in ("id", "name", "kind", "state", "progress"):
        table.add_column(col)
    for job in found:
        done = sum(s.tasks_done for s in job.stages)
        total = sum(s.tasks_total for s in job.stages)
        table.add_row(
            job.id,
            job.spec.name,
            job.spec.WhichOneof("kind") or "",
            state_name(job.state),
            f"{done}/{total}",
        )
    out.print(table)


def follow(client: Deep3mClient, job_id: str) -> common_pb2.Job:
    """Show the job's progress until it ends (live, as lines, or as JSON lines)."""
    if state.json:
        return follow_job(client, job_id, console=console, display="json", stream=sys.stdout)
    return follow_job(client, job_id, console=console, display="live")


class Bar:
    """A Rich progress bar fed by ``progress(done, total)`` callbacks (text output only)."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress = progress
        self._task = task

    def __call__(self, done: int, total: int) -> None:
        self._progress.update(self._task, completed=done, total=total)

    def describe(self, text: str) -> None:
        self._progress.update(self._task, description=text)


@contextlib.contextmanager
def progress_bar(what: str) -> Iterator[Bar | None]:
    if state.json:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        yield Bar(progress, progress.add_task(what, total=None))


def status(what: str) -> contextlib.AbstractContextManager[Any]:
    """A spinner while local work runs (text output only)."""
    return contextlib.nullcontext() if state.json else console.status(what)


def emit(report: dict[str, Any], render: Callable[[dict[str, Any]], None]) -> None:
    if state.json:
        out.print_json(json.dumps(report, allow_nan=False))
    else:
        render(report)


def say(text: str) -> None:
    """One line of plain text: user paths are printed verbatim, never wrapped or styled."""
    out.print(text, soft_wrap=True, markup=False, highlight=False)


def num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def dims(values: Any) -> str:
    return " × ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def render_describe(r: dict[str, Any]) -> None:
    say(f"volume       {r['volume']}  ({r['url']}, array {r['array']})")
    say(f"shape        {dims(r['shape'])} (z × y × x), {r['voxels']:,} voxels, "
         f"{human_bytes(r['size_bytes'])}")  # fmt: skip
    say(f"dtype        {r['dtype']}")
    say(f"voxel size   {dims(r['voxel_size_nm'])} nm")
    shards = dims(r["shard_shape"]) if r["shard_shape"] else "none"
    say(f"chunks       {dims(r['chunk_shape'])}; shards {shards}")
    say(f"complete     {'yes' if r['complete'] else 'no'}")
    attrs = {k: v for k, v in r["attributes"].items() if k != "complete"}
    if attrs:
        say("attributes   " + ", ".join(f"{k}={v}" for k, v in sorted(attrs.items())))
    if r["levels"]:
        say(f"levels       {', '.join(r['levels'])}")
    if r["labels"]:
        say(f"labels       {', '.join(r['labels'])}")
    stats = r["statistics"]
    if stats is None:
        why = "incomplete volume" if not r["complete"] else "not asked for"
        say(f"statistics   skipped ({why})")
        return
    say(
        f"intensity    min {num(stats['min'])}  max {num(stats['max'])}  "
        f"mean {num(stats['mean'])}  std {num(stats['std'])}"
    )
    say(
        f"percentiles  1% {num(stats['p01'])}  50% {num(stats['p50'])}  "
        f"99% {num(stats['p99'])}  ({stats['count']:,} finite voxels)"
    )
    hist = r["histogram"]
    counts = hist["counts"]
    if not counts:
        return
    say(f"histogram    {hist['bins']} bins")
    top = max(counts) or 1
    edges = hist["edges"]
    for i, count in enumerate(counts):
        close = "]" if i == len(counts) - 1 else ")"
        bar = "█" * round(40 * count / top)
        say(f"  [{edges[i]:>10.4g}, {edges[i + 1]:>10.4g}{close} {count:>12,} {bar}")


def render_label(r: dict[str, Any]) -> None:
    sizes = r["object_voxels"]
    say(f"objects      {r['object_count']:,}")
    if r["object_count"]:
        say(f"sizes        {sizes['min']:,} .. {sizes['max']:,} voxels "
             f"(median {sizes['median']:g}), {r['foreground_voxels']:,} in all")  # fmt: skip
    say(f"labels       {r['labels_url']}")
    for table in r["tables"]:
        say(f"table        {table}")


def render_evaluate(r: dict[str, Any]) -> None:
    table = Table(title="voxels", show_header=True)
    for col in ("precision", "recall", "F1", "Jaccard"):
        table.add_column(col, justify="right")
    table.add_row(*(f"{r[k]:.4f}" for k in ("precision", "recall", "f1", "jaccard")))
    out.print(table)
    c = r["counts"]
    say(f"TP {c['true_positives']:,}  FP {c['false_positives']:,}  "
         f"FN {c['false_negatives']:,}  TN {c['true_negatives']:,}")  # fmt: skip
    if r["exclusion_zone_voxels"]:
        say(f"exclusion zone {r['exclusion_zone_voxels']} voxels around ground-truth borders")
    o = r["objects"]
    if o is not None:
        table = Table(title="objects (centroid matching)", show_header=True)
        for col in ("predicted", "ground truth", "matched", "precision", "recall", "F1"):
            table.add_column(col, justify="right")
        table.add_row(
            str(o["predicted"]), str(o["ground_truth"]), str(o["true_positives"]),
            *(f"{o[k]:.4f}" for k in ("precision", "recall", "f1")),
        )  # fmt: skip
        out.print(table)
    files = r.get("overlays") or []
    if files:
        say(f"error overlays ({len(files)}):")
        for f in files:
            say(f"  {f}")


def render_report(r: dict[str, Any]) -> None:
    say(f"report of job {r['job']} ({r['kind']}, {r['state'] or 'running'}): {r['html']}")
    accuracy = r.get("accuracy")
    if accuracy:
        say(f"  F1 {accuracy['f1']:.4f}  precision {accuracy['precision']:.4f}  "
             f"recall {accuracy['recall']:.4f}")  # fmt: skip
    objects = r.get("objects")
    if objects:
        say(f"  {objects['count']:,} objects")
    say(f"  {len(r['files'])} figures beside it")


def render_view(r: dict[str, Any]) -> None:
    say(f"serving {r['store']} on {r['url']} (Ctrl-C stops)")
    for layer in r["layers"]:
        say(f"  {layer['kind']:<13} {layer['path']}")
    say("open in a browser:")
    say(r["link"])


def render_pyramid(r: dict[str, Any]) -> None:
    table = Table(title=f"pyramid of {r['volume']}", show_header=True)
    for col in ("level", "shape (z × y × x)", "voxel size nm", "chunks"):
        table.add_column(col)
    for level in r["levels"]:
        table.add_row(
            level["path"], dims(level["shape"]), dims(level["voxel_size_nm"]),
            dims(level["chunk_shape"]),
        )  # fmt: skip
    out.print(table)


def render_export(r: dict[str, Any]) -> None:
    files = r["files"]
    say(f"wrote {len(files)} file{'s' if len(files) != 1 else ''} ({r['format']}) "
         f"to {r['destination']}")  # fmt: skip
    shown = files if len(files) <= 6 else [*files[:3], "…", *files[-2:]]
    for f in shown:
        say(f"  {f}")


def metrics_text(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in sorted(metrics.items())) or "—"


def adaptation_text(a: Mapping[str, Any] | None) -> str:
    """``multitask -> volumes/t.zarr, by solidity (1fm: segmentation-000400)``; "" if none."""
    if not a:
        return ""
    chosen = ", ".join(f"{m}: {c}" for m, c in (a.get("chosen") or {}).items() if c)
    text = f"{a.get('method')} -> {a.get('target')}, by {a.get('select_by')}"
    text += f" ({chosen})" if chosen else ""
    if a.get("match_histogram_at_predict"):
        text += ", matched at predict"
    return text + (f"; fallback: {a['fallback']}" if a.get("fallback") else "")


def render_models(r: dict[str, Any]) -> None:
    if not r["models"] and not r["invalid"]:
        say(f"no models in {r['store']}")
        return
    table = Table(title=f"models in {r['store']}", show_header=True)
    adapted = any(m.get("adaptation") for m in r["models"])
    columns = ("id", "architecture", "members", "iterations", "validation")
    for col in (*columns, "adaptation") if adapted else columns:
        table.add_column(col)
    for m in r["models"]:
        members = ", ".join(
            f"{x['name']}" + ("" if x["trained"] else " (untrained)") for x in m["members"]
        )
        iterations = m["iterations"] or sum(x["iterations"] for x in m["members"])
        row = [m["id"], m["architecture"], members, f"{iterations:,}", metrics_text(m["metrics"])]
        if adapted:
            row.append(adaptation_text(m.get("adaptation")))
        table.add_row(*row)
    out.print(table)
    for bad in r["invalid"]:
        console.print(
            f"[yellow]unreadable model {escape(bad['id'])}:[/yellow] {escape(bad['error'])}",
            soft_wrap=True,
        )
