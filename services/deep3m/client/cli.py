"""The ``deep3m`` command line: run roles, submit and follow jobs.

Every command that talks to a scheduler takes ``--scheduler HOST:PORT`` (or
``DEEP3M_SCHEDULER_ADDRESS``), or ``--namespace``/``--kube-context`` to reach an
in-cluster scheduler through a Kubernetes port-forward. ``--output json``
prints machine-readable results. Failures exit non-zero.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
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


class State:
    scheduler: str = os.environ.get("DEEP3M_SCHEDULER_ADDRESS", "127.0.0.1:50051")
    namespace: str | None = None
    kube_context: str | None = None
    release: str | None = None
    output: OutputFormat = OutputFormat.text
    timeout_s: float = 30.0


state = State()


@app.callback()
def _global(
    scheduler: str = typer.Option(
        state.scheduler, "--scheduler", "-s", help="Scheduler address host:port."
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


def _fail(message: str, code: int = 1) -> typer.Exit:
    if state.output is OutputFormat.json:
        out.print_json(json.dumps({"error": message}))
    else:
        console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


@contextlib.contextmanager
def _client() -> Iterator[Any]:
    from deep3m.client.client import Deep3mClient

    with contextlib.ExitStack() as stack:
        address = state.scheduler
        if state.namespace or state.kube_context:
            from deep3m.client.portforward import scheduler_tunnel

            address = stack.enter_context(
                scheduler_tunnel(
                    state.namespace or "deep3m", context=state.kube_context, release=state.release
                )
            )
        client = stack.enter_context(Deep3mClient(address, timeout_s=state.timeout_s))
        try:
            yield client
        except Deep3mError as exc:
            raise _fail(f"{exc.message}" + (f" (field: {exc.field})" if exc.field else "")) from exc


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
    if "//" in path.split("://", 1)[-1]:
        store, key = path.rsplit("//", 1)
        return store, key
    return "", path


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
        raise _fail(exc.message) from exc
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
        raise _fail(exc.message) from exc
    if state.output is OutputFormat.json:
        out.print_json(json.dumps(report))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
