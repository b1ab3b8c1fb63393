"""The ``deep3m`` command line: run roles, submit and follow jobs, work on volumes.

Every command that talks to a scheduler takes ``--scheduler HOST:PORT`` (or
``DEEP3M_SCHEDULER_ADDRESS``), or ``--namespace``/``--kube-context`` to reach an
in-cluster scheduler through a Kubernetes port-forward. Volume commands
(``describe``, ``label``, ``evaluate``, ``pyramid``, ``export``, ``models``) run
in this process on the store given by ``--store`` (default ``DEEP3M_STORE_URL``);
a volume argument is a path in that store or ``STORE_URL//PATH``. ``--output
json`` prints one machine-readable result. Failures exit non-zero.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deep3m.core.errors import Deep3mError
from deep3m.runtime.settings import ROLES

app = typer.Typer(
    help="deep3m: deep-learning segmentation of large microscopy volumes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out = Console()


class OutputFormat(StrEnum):
    text = "text"
    json = "json"


DEFAULT_SCHEDULER = "127.0.0.1:50051"


class State:
    scheduler: str = DEFAULT_SCHEDULER
    namespace: str | None = None
    kube_context: str | None = None
    release: str | None = None
    output: OutputFormat = OutputFormat.text
    timeout_s: float = 30.0


state = State()


@app.callback()
def _global(
    scheduler: str = typer.Option(
        DEFAULT_SCHEDULER,
        "--scheduler",
        "-s",
        envvar="DEEP3M_SCHEDULER_ADDRESS",
        help="Scheduler address host:port.",
    ),
    namespace: str | None = typer.Option(
        None,
        "--namespace",
        "-n",
        help="Reach an in-cluster scheduler in this namespace through a Kubernetes port-forward.",
    ),
    kube_context: str | None = typer.Option(
        None, "--kube-context", help="kubeconfig context for --namespace."
    ),
    release: str | None = typer.Option(
        None, "--release", help="Helm release name, when several share a namespace."
    ),
    output: OutputFormat = typer.Option(OutputFormat.text, "--output", "-o", help="text or json."),
    timeout_s: float = typer.Option(30.0, "--timeout", help="Deadline of each call, seconds."),
) -> None:
    state.scheduler = scheduler
    state.namespace = namespace
    state.kube_context = kube_context
    state.release = release
    state.output = output
    state.timeout_s = timeout_s


def _fail(message: str, code: int = 1, *, field: str = "") -> typer.Exit:
    if state.output is OutputFormat.json:
        body = {"error": message, **({"field": field} if field else {})}
        out.print_json(json.dumps(body))
    else:
        # Messages hold paths and values verbatim: no markup, no wrapping inside them.
        console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def _error(exc: Deep3mError) -> typer.Exit:
    """Exit non-zero with a domain error's message and the field it names."""
    return _fail(exc.message + (f" (field: {exc.field})" if exc.field else ""), field=exc.field)


@contextlib.contextmanager
def _client() -> Iterator[Any]:
    from deep3m.client.client import Deep3mClient

    # Errors while connecting (port-forward, channel) exit as cleanly as errors of calls.
    try:
        with contextlib.ExitStack() as stack:
            address = state.scheduler
            if state.namespace or state.kube_context:
                from deep3m.client.portforward import scheduler_tunnel

                address = stack.enter_context(
                    scheduler_tunnel(
                        state.namespace or "deep3m",
                        context=state.kube_context,
                        release=state.release,
                    )
                )
            client = stack.enter_context(Deep3mClient(address, timeout_s=state.timeout_s))
            yield client
    except Deep3mError as exc:
        raise _error(exc) from exc


def _job_dict(job: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(job, preserving_proto_field_name=True)


def _print_job(job: Any) -> None:
    from deep3m.v1 import common_pb2

    if state.output is OutputFormat.json:
        out.print_json(json.dumps(_job_dict(job)))
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
    out.print(
        f"state: [bold]{common_pb2.JobState.Name(job.state).removeprefix('JOB_STATE_')}[/bold]"
    )
    for key, value in job.outputs.items():
        out.print(f"  {key}: {value}")
    for err in job.errors:
        out.print(f"  [red]{err.code}[/red] {err.task_id} {err.message}")


def _volume_ref(path: str, array: str = "") -> Any:
    from deep3m.v1 import common_pb2

    store_url, key = _split_url(path)
    return common_pb2.VolumeRef(store_url=store_url, path=key, array=array)


def _split_url(path: str) -> tuple[str, str]:
    """``s3://bucket/prefix//volumes/x.zarr`` → (store, key); plain keys use the default store."""
    from deep3m.client.volumes import split_ref

    return split_ref(path)


def _shape(text: str | None, name: str) -> list[int]:
    if not text:
        return []
    try:
        return [int(v) for v in text.split(",")]
    except ValueError as exc:
        raise _fail(f"--{name} must be comma-separated integers z,y,x, got {text!r}", 2) from exc


def _floats(text: str | None, name: str) -> list[float]:
    if not text:
        return []
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as exc:
        raise _fail(f"--{name} must be comma-separated numbers z,y,x, got {text!r}", 2) from exc


def _follow(client: Any, job_id: str, *, quiet: bool = False) -> Any:
    """Show a progress bar from the job's watch stream; returns the final job."""
    from deep3m.client.progress import follow_job

    return follow_job(
        client, job_id, console=console, show=not quiet and state.output is OutputFormat.text
    )


def _finish(client: Any, job_id: str, wait: bool) -> None:
    from deep3m.v1 import common_pb2

    job = _follow(client, job_id) if wait else client.get(job_id)
    _print_job(job)
    if wait and job.state != common_pb2.JOB_STATE_SUCCEEDED:
        raise typer.Exit(1)


@app.command()
def serve(role: str = typer.Argument(..., help=f"One of: {', '.join(ROLES)}")) -> None:
    """Start one role's gRPC server (and its worker loop) until SIGTERM."""
    from deep3m.runtime.server import serve as run
    from deep3m.runtime.settings import Settings

    if role not in ROLES:
        raise _fail(f"unknown role {role!r}; choose one of {', '.join(ROLES)}", 2)
    try:
        settings = Settings()
    except ValueError as exc:
        raise _fail(f"invalid DEEP3M_* settings: {exc}", 2) from exc
    run(role, settings)


@app.command()
def up(
    store: str = typer.Option("./deep3m-data", help="Store URL or folder."),
    log_dir: Path = typer.Option(Path("./deep3m-data/logs"), help="Role logs go here."),
    metrics: bool = typer.Option(False, help="Expose Prometheus endpoints on free ports."),
) -> None:
    """Run the scheduler and one worker per role on localhost until Ctrl-C."""
    from deep3m.launcher.local import LocalCluster, LocalClusterSpec

    cluster = LocalCluster(LocalClusterSpec(store_url=store, log_dir=log_dir, metrics=metrics))
    try:
        cluster.start()
    except Deep3mError as exc:
        raise _error(exc) from exc
    table = Table(title="deep3m is up", show_header=True)
    table.add_column("role")
    table.add_column("address")
    for role in cluster.processes:
        table.add_row(role, cluster.address(role))
    out.print(table)
    out.print(f"store: {cluster.store_url}\nlogs: {log_dir}\nCtrl-C stops every role.")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            dead = [r for r, alive in cluster.running().items() if not alive]
            if dead:
                console.print(f"[red]role(s) exited:[/red] {', '.join(dead)}; stopping")
                break
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


@app.command()
def ingest(
    source: str = typer.Argument(..., help="TIFF, folder of TIFF/PNG pages, HDF5, MRC or zarr."),
    output: str = typer.Option(
        ..., "--output", help="Volume path in the store, e.g. volumes/stack.zarr"
    ),
    voxel_size_nm: str = typer.Option("", help="z,y,x voxel size in nm, e.g. 40,5.9,5.9"),
    chunk_shape: str = typer.Option("", help="z,y,x chunk shape"),
    shard_shape: str = typer.Option("", help="z,y,x shard shape"),
    wait: bool = typer.Option(True, help="Follow the job until it ends."),
) -> None:
    """Ingest an image stack into an OME-Zarr volume (a job on the tiling workers)."""
    with _client() as client:
        job = client.ingest(
            str(Path(source).resolve()) if "://" not in source else source,
            _volume_ref(output),
            voxel_size_nm=_floats(voxel_size_nm, "voxel-size-nm"),
            chunk_shape=_shape(chunk_shape, "chunk-shape"),
            shard_shape=_shape(shard_shape, "shard-shape"),
        )
        _finish(client, job.id, wait)


@app.command()
def predict(
    input: str = typer.Argument(..., help="Input volume path in the store."),
    model: str = typer.Option(..., "--model", help="Model id."),
    output: str = typer.Option(..., "--output", help="Output volume path in the store."),
    tta_level: int = typer.Option(10, help="CDeep3M speed level: 1 (best), 2, 4, 10 (fastest)."),
    members: str = typer.Option("", help="Comma-separated members; default all."),
    block_shape: str = typer.Option("", help="z,y,x core block shape."),
    halo: str = typer.Option("", help="z,y,x halo."),
    postprocess: bool = typer.Option(False, help="Threshold, label and tabulate objects."),
    threshold: float = typer.Option(0.5, help="Foreground threshold for --postprocess."),
    wait: bool = typer.Option(True, help="Follow the job until it ends."),
) -> None:
    """Segment a volume with a trained model (blocks sharded over inference workers)."""
    with _client() as client:
        job = client.predict(
            _volume_ref(input),
            model,
            _volume_ref(output),
            tta_level=tta_level,
            members=[m for m in members.split(",") if m],
            block_shape=_shape(block_shape, "block-shape"),
            halo=_shape(halo, "halo"),
            postprocess=postprocess,
            threshold=threshold,
        )
        _finish(client, job.id, wait)


@app.command()
def train(
    images: str = typer.Argument(..., help="Training image volume path in the store."),
    labels: str = typer.Argument(..., help="Training label volume path in the store."),
    model: str = typer.Option(..., "--model", help="Id of the model to create."),
    validation_images: str = typer.Option("", help="Validation image volume."),
    validation_labels: str = typer.Option("", help="Validation label volume."),
    architecture: str = typer.Option("deepem3d", help="deepem3d, resunet2d or resunet3d."),
    width: float = typer.Option(1.0, help="Channel width multiplier."),
    members: str = typer.Option("1fm,3fm,5fm", help="Comma-separated ensemble members."),
    iterations: int = typer.Option(0, help="Iterations per member (0: default)."),
    base_model: str = typer.Option("", "--base-model", help="Fine-tune from this model."),
    add_iterations: int = typer.Option(
        0, "--add-iterations", help="Fine-tuning iterations on top of the base."
    ),
    batch_size: int = typer.Option(0, help="Batch size (0: default)."),
    patch_shape: str = typer.Option("", help="y,x training patch."),
    wait: bool = typer.Option(True, help="Follow the job until it ends."),
) -> None:
    """Train (or fine-tune) an ensemble: one training task per member."""
    with _client() as client:
        job = client.train(
            images=_volume_ref(images),
            labels=_volume_ref(labels),
            model=model,
            validation_images=_volume_ref(validation_images) if validation_images else None,
            validation_labels=_volume_ref(validation_labels) if validation_labels else None,
            architecture=architecture,
            width=width,
            members=[m for m in members.split(",") if m],
            iterations=iterations,
            base_model=base_model,
            add_iterations=add_iterations,
            batch_size=batch_size,
            patch_shape=_shape(patch_shape, "patch-shape"),
        )
        _finish(client, job.id, wait)


@app.command()
def watch(job_id: str = typer.Argument(...)) -> None:
    """Follow a job's progress until it ends."""
    with _client() as client:
        _finish(client, job_id, True)


@app.command()
def jobs(limit: int = typer.Option(50, help="At most this many, newest first.")) -> None:
    """List jobs."""
    from deep3m.v1 import common_pb2

    with _client() as client:
        found = client.jobs(limit=limit)
        if state.output is OutputFormat.json:
            out.print_json(json.dumps([_job_dict(j) for j in found]))
            return
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
                common_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_"),
                f"{done}/{total}",
            )
        out.print(table)


@app.command()
def cancel(job_id: str = typer.Argument(...)) -> None:
    """Cancel a job; running tasks stop at their next heartbeat."""
    with _client() as client:
        _print_job(client.cancel(job_id))


@app.command()
def demo(
    store: str = typer.Option("./deep3m-data/demo", help="Where the demo writes its results."),
    minutes: float = typer.Option(0.0, help="Training budget override (0: the recipe's)."),
) -> None:
    """Train a small ensemble on the CDeep3M mitochondria sample, predict, and score it."""
    from deep3m.launcher.demo import run_demo

    try:
        report = run_demo(store, console=console, budget_minutes=minutes or None)
    except Deep3mError as exc:
        raise _error(exc) from exc
    if state.output is OutputFormat.json:
        out.print_json(json.dumps(report))


@app.command("predict-region")
def predict_region(
    input: str = typer.Argument(..., help="Input volume path in the store."),
    model: str = typer.Option(..., "--model", help="Model id."),
    region: str = typer.Option(..., "--region", help="z0:z1,y0:y1,x0:x1"),
    out_file: Path = typer.Option(
        ..., "--out", help="Write the probabilities here (.npy or .tif)."
    ),
    tta_level: int = typer.Option(10, help="CDeep3M speed level: 1, 2, 4 or 10."),
    members: str = typer.Option("", help="Comma-separated members; default all."),
    address: str = typer.Option("127.0.0.1:50054", help="Inference server host:port."),
) -> None:
    """Predict a small region interactively (the only call that returns voxels)."""
    from deep3m.client.region import parse_region
    from deep3m.client.region import predict_region as call

    try:
        start, stop = parse_region(region)
        store_url, path = _split_url(input)
        prob = call(
            address,
            path,
            start,
            stop,
            model=model,
            tta_level=tta_level,
            members=[m for m in members.split(",") if m],
            store_url=store_url,
            timeout_s=max(state.timeout_s, 300.0),
        )
    except Deep3mError as exc:
        raise _error(exc) from exc
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if out_file.suffix.lower() in (".tif", ".tiff"):
        from deep3m.core.imageio import export_tiff

        export_tiff(prob, out_file)
    else:
        import numpy as np

        np.save(out_file, prob)
    report = {
        "shape": list(prob.shape),
        "file": str(out_file),
        "mean_probability": float(prob.mean()) if prob.size else 0.0,
    }
    if state.output is OutputFormat.json:
        out.print_json(json.dumps(report))
    else:
        out.print(f"wrote {report['shape']} probabilities to {out_file}")


# -- volume commands (run in this process on the store) ------------------------------
STORE_HELP = "Store URL or folder (default: DEEP3M_STORE_URL, else ./deep3m-data)."
VOLUME_HELP = "Volume path in the store (e.g. volumes/stack.zarr) or STORE_URL//PATH."
WORKERS_HELP = "Threads for blockwise work (0: the machine's cores, at most 4)."


class ExportFormat(StrEnum):
    tiff = "tiff"
    png = "png"
    overlay = "overlay"


class PyramidMethod(StrEnum):
    auto = "auto"
    mean = "mean"
    mode = "mode"


@contextlib.contextmanager
def _volume_errors() -> Iterator[None]:
    """Domain and file-system errors exit non-zero with their message."""
    try:
        yield
    except Deep3mError as exc:
        raise _error(exc) from exc
    except OSError as exc:
        raise _fail(str(exc), field=str(exc.filename or "")) from exc


def _settings() -> Any:
    from deep3m.runtime.settings import Settings

    return Settings()


def _resolve(volume: str, store_url: str | None, *, field: str = "volume") -> tuple[Any, str]:
    from deep3m.client.volumes import resolve

    settings = _settings()
    return resolve(volume, store_url or settings.store_url, settings.storage_options(), field=field)


class _Bar:
    """A Rich progress bar fed by ``progress(done, total)`` callbacks (text output only)."""

    def __init__(self, progress: Any, task: Any) -> None:
        self._progress = progress
        self._task = task

    def __call__(self, done: int, total: int) -> None:
        self._progress.update(self._task, completed=done, total=total)

    def describe(self, text: str) -> None:
        self._progress.update(self._task, description=text)


@contextlib.contextmanager
def _bar(what: str) -> Iterator[_Bar | None]:
    if state.output is not OutputFormat.text:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        yield _Bar(progress, progress.add_task(what, total=None))


def _emit(report: dict[str, Any], render: Callable[[dict[str, Any]], None]) -> None:
    if state.output is OutputFormat.json:
        out.print_json(json.dumps(report, allow_nan=False))
    else:
        render(report)


def _say(text: str) -> None:
    """One line of plain text: user paths are printed verbatim, never wrapped or styled."""
    out.print(text, soft_wrap=True, markup=False, highlight=False)


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def _dims(values: Any) -> str:
    return " × ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def _render_describe(r: dict[str, Any]) -> None:
    _say(f"volume       {r['volume']}  ({r['url']}, array {r['array']})")
    _say(f"shape        {_dims(r['shape'])} (z × y × x), {r['voxels']:,} voxels, "
         f"{_bytes(r['size_bytes'])}")  # fmt: skip
    _say(f"dtype        {r['dtype']}")
    _say(f"voxel size   {_dims(r['voxel_size_nm'])} nm")
    shards = _dims(r["shard_shape"]) if r["shard_shape"] else "none"
    _say(f"chunks       {_dims(r['chunk_shape'])}; shards {shards}")
    _say(f"complete     {'yes' if r['complete'] else 'no'}")
    attrs = {k: v for k, v in r["attributes"].items() if k != "complete"}
    if attrs:
        _say("attributes   " + ", ".join(f"{k}={v}" for k, v in sorted(attrs.items())))
    if r["levels"]:
        _say(f"levels       {', '.join(r['levels'])}")
    if r["labels"]:
        _say(f"labels       {', '.join(r['labels'])}")
    stats = r["statistics"]
    if stats is None:
        why = "incomplete volume" if not r["complete"] else "not asked for"
        _say(f"statistics   skipped ({why})")
        return
    _say(
        f"intensity    min {_num(stats['min'])}  max {_num(stats['max'])}  "
        f"mean {_num(stats['mean'])}  std {_num(stats['std'])}"
    )
    _say(
        f"percentiles  1% {_num(stats['p01'])}  50% {_num(stats['p50'])}  "
        f"99% {_num(stats['p99'])}  ({stats['count']:,} finite voxels)"
    )
    hist = r["histogram"]
    counts = hist["counts"]
    if not counts:
        return
    _say(f"histogram    {hist['bins']} bins")
    top = max(counts) or 1
    edges = hist["edges"]
    for i, count in enumerate(counts):
        close = "]" if i == len(counts) - 1 else ")"
        bar = "█" * round(40 * count / top)
        _say(f"  [{edges[i]:>10.4g}, {edges[i + 1]:>10.4g}{close} {count:>12,} {bar}")


@app.command()
def describe(
    volume: str = typer.Argument(..., help=VOLUME_HELP),
    bins: int = typer.Option(16, "--bins", min=1, max=65536, help="Histogram bins."),
    array: str = typer.Option("", "--array", help="Array in the group (pyramid level); default 0."),
    stats: bool = typer.Option(True, "--stats/--no-stats", help="Read every voxel for statistics."),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """Shape, dtype, voxel size, chunks/shards, intensity statistics and histogram."""
    from deep3m.client.volumes import describe_volume

    with _volume_errors():
        source, key = _resolve(volume, store)
        status = (
            console.status("computing statistics")
            if stats and state.output is OutputFormat.text
            else contextlib.nullcontext()
        )
        with status:
            report = describe_volume(source, key, array=array, bins=bins, statistics=stats)
    _emit(report, _render_describe)


def _render_label(r: dict[str, Any]) -> None:
    sizes = r["object_voxels"]
    _say(f"objects      {r['object_count']:,}")
    if r["object_count"]:
        _say(f"sizes        {sizes['min']:,} .. {sizes['max']:,} voxels "
             f"(median {sizes['median']:g}), {r['foreground_voxels']:,} in all")  # fmt: skip
    _say(f"labels       {r['labels_url']}")
    for table in r["tables"]:
        _say(f"table        {table}")


@app.command()
def label(
    volume: str = typer.Argument(..., help="Probability or mask volume. " + VOLUME_HELP),
    threshold: float = typer.Option(0.5, "--threshold", help="Foreground probability, (0, 1]."),
    watershed: bool = typer.Option(
        False, "--watershed/--no-watershed", help="Split touching objects (distance watershed)."
    ),
    min_size: int = typer.Option(0, "--min-size", min=0, help="Drop objects below this (voxels)."),
    connectivity: int = typer.Option(1, "--connectivity", help="1: faces, 2: +edges, 3: +corners."),
    name: str = typer.Option(
        "segmentation", "--name", help="Label image name under <volume>/labels/."
    ),
    output: str = typer.Option(
        "", "--output", help="Write the labels to this volume path instead of <volume>/labels/."
    ),
    workers: int = typer.Option(0, "--workers", min=0, help=WORKERS_HELP),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """Threshold and label objects; writes a label volume and an object table (CSV, JSON)."""
    from deep3m.client.volumes import label as run_label

    with _volume_errors():
        source, key = _resolve(volume, store)
        target = _resolve(output, store, field="output") if output else None
        with _bar("labelling") as bar:
            report = run_label(
                source, key,
                threshold=threshold, watershed=watershed, min_size_voxels=min_size,
                connectivity=connectivity, name=name, output=target, workers=workers or None,
                progress=bar,
            )  # fmt: skip
    _emit(report, _render_label)


def _render_evaluate(r: dict[str, Any]) -> None:
    table = Table(title="voxels", show_header=True)
    for col in ("precision", "recall", "F1", "Jaccard"):
        table.add_column(col, justify="right")
    table.add_row(*(f"{r[k]:.4f}" for k in ("precision", "recall", "f1", "jaccard")))
    out.print(table)
    c = r["counts"]
    _say(f"TP {c['true_positives']:,}  FP {c['false_positives']:,}  "
         f"FN {c['false_negatives']:,}  TN {c['true_negatives']:,}")  # fmt: skip
    if r["exclusion_zone_voxels"]:
        _say(f"exclusion zone {r['exclusion_zone_voxels']} voxels around ground-truth borders")
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


@app.command()
def evaluate(
    prediction: str = typer.Argument(..., help="Predicted probabilities or labels. " + VOLUME_HELP),
    ground_truth: str = typer.Argument(..., help="Ground-truth labels or mask. " + VOLUME_HELP),
    threshold: float = typer.Option(0.5, "--threshold", help="Foreground probability, [0, 1]."),
    exclusion_zone: int = typer.Option(
        0, "--exclusion-zone", min=0, help="Ignore k voxels around ground-truth borders."
    ),
    objects: bool = typer.Option(
        True, "--objects/--no-objects", help="Also count objects matched by centroid."
    ),
    workers: int = typer.Option(0, "--workers", min=0, help=WORKERS_HELP),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """Precision, recall, F1 and Jaccard of a prediction against ground truth."""
    from deep3m.client.volumes import evaluate as run_evaluate

    with _volume_errors():
        pred = _resolve(prediction, store, field="prediction")
        truth = _resolve(ground_truth, store, field="ground_truth")
        with _bar("evaluating") as bar:
            report = run_evaluate(
                pred, truth,
                threshold=threshold, exclusion_zone_voxels=exclusion_zone, objects=objects,
                workers=workers or None, progress=bar,
            )  # fmt: skip
    _emit(report, _render_evaluate)


def _render_pyramid(r: dict[str, Any]) -> None:
    table = Table(title=f"pyramid of {r['volume']}", show_header=True)
    for col in ("level", "shape (z × y × x)", "voxel size nm", "chunks"):
        table.add_column(col)
    for level in r["levels"]:
        table.add_row(
            level["path"], _dims(level["shape"]), _dims(level["voxel_size_nm"]),
            _dims(level["chunk_shape"]),
        )  # fmt: skip
    out.print(table)


@app.command()
def pyramid(
    volume: str = typer.Argument(..., help=VOLUME_HELP),
    levels: int = typer.Option(
        0, "--levels", min=0, max=16, help="Levels beyond full resolution (0: automatic)."
    ),
    method: PyramidMethod = typer.Option(
        PyramidMethod.auto, "--method", help="mean (images), mode (labels) or auto."
    ),
    workers: int = typer.Option(0, "--workers", min=0, help=WORKERS_HELP),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """Write multiscale levels (OME-Zarr) for viewers; reruns replace them."""
    from deep3m.client.volumes import pyramid as run_pyramid

    with _volume_errors():
        source, key = _resolve(volume, store)
        with _bar("level 1") as bar:
            progress: Callable[[int, int], None] | None = None
            if bar is not None:
                level, last = [1], [0]

                def progress(done: int, total: int) -> None:
                    # Each level restarts its block count.
                    if done < last[0]:
                        level[0] += 1
                        bar.describe(f"level {level[0]}")
                    last[0] = done
                    bar(done, total)

            report = run_pyramid(
                source, key,
                levels=levels, method=None if method is PyramidMethod.auto else method.value,
                workers=workers or None, progress=progress,
            )  # fmt: skip
    _emit(report, _render_pyramid)


def _render_export(r: dict[str, Any]) -> None:
    files = r["files"]
    _say(f"wrote {len(files)} file{'s' if len(files) != 1 else ''} ({r['format']}) "
         f"to {r['destination']}")  # fmt: skip
    shown = files if len(files) <= 6 else [*files[:3], "…", *files[-2:]]
    for f in shown:
        _say(f"  {f}")


@app.command()
def export(
    volume: str = typer.Argument(..., help=VOLUME_HELP),
    destination: str = typer.Argument(..., help="Folder, .tif file, or s3:// URL."),
    fmt: ExportFormat = typer.Option(
        ExportFormat.tiff, "--format", "-f", help="tiff (one stack), png (pages) or overlay."
    ),
    image: str = typer.Option(
        "", "--image", help="For --format overlay: the image volume to draw over."
    ),
    slices: str = typer.Option("", "--slices", help="z slices, e.g. 0,5,10-12 (default all)."),
    alpha: float = typer.Option(0.5, "--alpha", help="Overlay opacity, (0, 1]."),
    array: str = typer.Option("", "--array", help="Array in the group (pyramid level)."),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """Export a volume as TIFF or PNG pages, or overlay PNGs of it over an image."""
    from deep3m.client.volumes import export as run_export
    from deep3m.client.volumes import parse_slices

    with _volume_errors():
        chosen = parse_slices(slices)
        source, key = _resolve(volume, store)
        under = _resolve(image, store, field="image") if image else None
        with (
            console.status("exporting")
            if state.output is OutputFormat.text
            else contextlib.nullcontext()
        ):
            report = run_export(
                source, key, destination, fmt.value,
                array=array, image=under, slices=chosen, alpha=alpha,
                storage_options=_settings().storage_options(),
            )  # fmt: skip
    _emit(report, _render_export)


def _metrics_text(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in sorted(metrics.items())) or "—"


def _render_models(r: dict[str, Any]) -> None:
    if not r["models"] and not r["invalid"]:
        _say(f"no models in {r['store']}")
        return
    table = Table(title=f"models in {r['store']}", show_header=True)
    for col in ("id", "architecture", "members", "iterations", "validation"):
        table.add_column(col)
    for m in r["models"]:
        members = ", ".join(
            f"{x['name']}" + ("" if x["trained"] else " (untrained)") for x in m["members"]
        )
        iterations = m["iterations"] or sum(x["iterations"] for x in m["members"])
        table.add_row(
            m["id"], m["architecture"], members, f"{iterations:,}", _metrics_text(m["metrics"])
        )
    out.print(table)
    for bad in r["invalid"]:
        console.print(
            f"[yellow]unreadable model {escape(bad['id'])}:[/yellow] {escape(bad['error'])}",
            soft_wrap=True,
        )


@app.command()
def models(store: str | None = typer.Option(None, "--store", help=STORE_HELP)) -> None:
    """List the trained models in the store (model cards)."""
    from deep3m.client.volumes import list_models, open_existing_store

    with _volume_errors():
        settings = _settings()
        report = list_models(
            open_existing_store(store or settings.store_url, settings.storage_options())
        )
    _emit(report, _render_models)


@app.command()
def doctor(
    address: list[str] | None = typer.Option(
        None, "--address", help="host:port of a deep3m server (repeatable; default --scheduler)."
    ),
    store: bool = typer.Option(
        False, "--store", help="Also write, read back and delete a probe in DEEP3M_STORE_URL."
    ),
    service: str = typer.Option("", "--service", help="gRPC service name to ask about."),
) -> None:
    """Check that servers answer gRPC health checks and that the store works."""
    from deep3m.runtime.healthcheck import check_health, store_round_trip

    targets = list(address or []) or ([] if store else [state.scheduler])
    checks: list[dict[str, Any]] = []
    for target in targets:
        try:
            status = check_health(target, service=service, timeout_s=state.timeout_s)
            checks.append(
                {"check": "health", "target": target, "ok": status == "SERVING", "status": status}
            )
        except Deep3mError as exc:
            checks.append({"check": "health", "target": target, "ok": False, "error": exc.message})
    if store:
        with _volume_errors():
            settings = _settings()
        try:
            seconds = store_round_trip(settings)
            checks.append(
                {"check": "store", "target": settings.store_url, "ok": True, "seconds": seconds}
            )
        except (Deep3mError, OSError) as exc:
            checks.append(
                {"check": "store", "target": settings.store_url, "ok": False, "error": str(exc)}
            )
    ok = all(c["ok"] for c in checks)
    if state.output is OutputFormat.json:
        out.print_json(json.dumps({"ok": ok, "checks": checks}))
    else:
        for c in checks:
            mark = "ok  " if c["ok"] else "FAIL"
            if c["check"] == "store" and c["ok"]:
                detail = f"round trip in {c['seconds']:.3f} s"
            else:
                detail = c.get("status") or c.get("error", "")
            _say(f"{mark} {c['check']:<6} {c['target']} {detail}")
    if not ok:
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
