"""Job commands: submit (ingest, predict, train, label), follow, list, cancel; predict a region."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import typer

from deep3m.client.cli.app import app, client, console, error, fail, out, state
from deep3m.client.cli.options import (
    ConnectivityOption,
    LabelNameOption,
    MinSizeOption,
    OverwriteOption,
    ThresholdOption,
    WaitOption,
    WatershedOption,
)
from deep3m.client.cli.output import follow, job_dict, print_job, render_jobs
from deep3m.client.client import Deep3mClient
from deep3m.client.region import parse_region
from deep3m.client.region import predict_region as call_predict_region
from deep3m.client.volumes import split_ref
from deep3m.core.errors import Deep3mError
from deep3m.core.imageio import export_tiff
from deep3m.runtime.settings import DEFAULT_PORTS
from deep3m.v1 import common_pb2


def volume_ref(path: str, array: str = "") -> common_pb2.VolumeRef:
    """``s3://bucket/prefix//volumes/x.zarr`` or a plain key in the scheduler's store."""
    store_url, key = split_ref(path)
    return common_pb2.VolumeRef(store_url=store_url, path=key, array=array)


def _numbers(text: str | None, name: str, kind: type[float], what: str) -> list[Any]:
    if not text:
        return []
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError as exc:
        raise fail(f"--{name} must be comma-separated {what} z,y,x, got {text!r}", 2) from exc


def shape(text: str | None, name: str) -> list[int]:
    return _numbers(text, name, int, "integers")


def floats(text: str | None, name: str) -> list[float]:
    return _numbers(text, name, float, "numbers")


def names(text: str) -> list[str]:
    return [m for m in text.split(",") if m]


def finish(c: Deep3mClient, submitted: common_pb2.Job | str, wait: bool) -> None:
    """Follow (or show) a job; a submitted job's notes first (e.g. a clipped patch)."""
    if isinstance(submitted, str):
        job_id = submitted
    else:
        job_id = submitted.id
        for note in submitted.notes:
            console.print(f"note: {note}", markup=False, highlight=False)
    job = follow(c, job_id) if wait else c.get(job_id)
    print_job(job, line=wait)
    if wait and job.state != common_pb2.JOB_STATE_SUCCEEDED:
        raise typer.Exit(1)


@app.command()
def ingest(
    source: str = typer.Argument(..., help="TIFF, folder of TIFF/PNG pages, HDF5, MRC or zarr."),
    output: str = typer.Option(
        ..., "--output", help="Volume path in the store, e.g. volumes/stack.zarr"
    ),
    voxel_size_nm: str = typer.Option("", help="z,y,x voxel size in nm, e.g. 40,5.9,5.9"),
    chunk_shape: str = typer.Option("", help="z,y,x chunk shape"),
    shard_shape: str = typer.Option("", help="z,y,x shard shape"),
    overwrite: OverwriteOption = False,
    wait: WaitOption = True,
) -> None:
    """Ingest an image stack into an OME-Zarr volume (a job on the tiling workers)."""
    with client() as c:
        job = c.ingest(
            str(Path(source).resolve()) if "://" not in source else source,
            volume_ref(output),
            voxel_size_nm=floats(voxel_size_nm, "voxel-size-nm"),
            chunk_shape=shape(chunk_shape, "chunk-shape"),
            shard_shape=shape(shard_shape, "shard-shape"),
            overwrite=overwrite,
        )
        finish(c, job, wait)


def _ground_truth_option() -> Any:
    return typer.Option(
        "",
        "--ground-truth",
        help="Volume to evaluate against (voxel and object accuracy, as sharded stages).",
    )


def _exclusion_zone_option() -> Any:
    return typer.Option(
        0, "--exclusion-zone", min=0, help="With --ground-truth: ignore voxels this near borders."
    )


@app.command()
def predict(
    input: str = typer.Argument(..., help="Input volume path in the store."),
    model: str = typer.Option(..., "--model", help="Model id."),
    output: str = typer.Option(..., "--output", help="Output volume path in the store."),
    tta_level: int = typer.Option(10, help="CDeep3M speed level: 1 (best), 2, 4, 10 (fastest)."),
    members: str = typer.Option("", help="Comma-separated members; default all."),
    block_shape: str = typer.Option("", help="z,y,x core block shape."),
    halo: str = typer.Option(
        "", help="z,y,x halo; default the model card's, which covers the receptive field."
    ),
    postprocess: bool = typer.Option(
        False,
        help="Then threshold, label and tabulate objects, sharded over the postprocess workers.",
    ),
    threshold: ThresholdOption = 0.5,
    min_size: int = typer.Option(
        0, "--min-size", min=0, help="With --postprocess: drop objects below this (voxels)."
    ),
    ground_truth: str = _ground_truth_option(),
    exclusion_zone: int = _exclusion_zone_option(),
    overwrite: OverwriteOption = False,
    wait: WaitOption = True,
) -> None:
    """Segment a volume with a trained model (blocks sharded over inference workers)."""
    with client() as c:
        job = c.predict(
            volume_ref(input),
            model,
            volume_ref(output),
            tta_level=tta_level,
            members=names(members),
            block_shape=shape(block_shape, "block-shape"),
            halo=shape(halo, "halo"),
            postprocess=postprocess,
            threshold=threshold,
            overwrite=overwrite,
            min_size_voxels=min_size,
            ground_truth=volume_ref(ground_truth) if ground_truth else None,
            exclusion_zone_voxels=exclusion_zone,
        )
        finish(c, job, wait)


@app.command("submit-label")
def submit_label(
    input: str = typer.Argument(..., help="Probability or mask volume path in the store."),
    output: str = typer.Option(
        "", "--output", help="Labels volume path; default <input>/labels/<name>."
    ),
    threshold: ThresholdOption = 0.5,
    connectivity: ConnectivityOption = 1,
    min_size: MinSizeOption = 0,
    watershed: WatershedOption = False,
    name: LabelNameOption = "segmentation",
    block_shape: str = typer.Option("", help="z,y,x block of one labelling task."),
    ground_truth: str = _ground_truth_option(),
    exclusion_zone: int = _exclusion_zone_option(),
    wait: WaitOption = True,
) -> None:
    """Label a volume on the cluster: its blocks sharded over the postprocess workers
    (summarize, equivalences, merge, relabel, reduce, evaluation with --ground-truth,
    pyramid); `deep3m label` runs locally."""
    with client() as c:
        job = c.label(
            volume_ref(input),
            output=volume_ref(output) if output else None,
            threshold=threshold,
            connectivity=connectivity,
            min_size_voxels=min_size,
            watershed=watershed,
            label_name=name,
            block_shape=shape(block_shape, "block-shape"),
            ground_truth=volume_ref(ground_truth) if ground_truth else None,
            exclusion_zone_voxels=exclusion_zone,
        )
        finish(c, job.id, wait)


@app.command()
def train(
    images: str = typer.Argument(..., help="Training image volume path in the store."),
    labels: str = typer.Argument(..., help="Training label volume path in the store."),
    model: str = typer.Option(..., "--model", help="Id of the model to create."),
    validation_images: str = typer.Option("", help="Validation image volume."),
    validation_labels: str = typer.Option("", help="Validation label volume."),
    recipe: str = typer.Option(
        "",
        help="Training recipe: 'default' (the benchmarked winner, docs/ACCURACY.md) or "
        "'cdeep3m' (CDeep3M's published recipe). Options left unset take the recipe's.",
    ),
    architecture: str = typer.Option(
        "", help="deepem3d, resunet2d, resunet3d or unet2d (recipe's)."
    ),
    width: float = typer.Option(0.0, help="Channel width multiplier (0: the recipe's)."),
    members: str = typer.Option(
        "", help="Comma-separated ensemble members, e.g. 1fm,3fm (the recipe's)."
    ),
    iterations: int = typer.Option(0, help="Iterations per member (0: the recipe's)."),
    minutes: float = typer.Option(
        0.0,
        help="Time budget per member in minutes; training stops at the budget or the "
        "iterations, whichever comes first (0: no time budget).",
    ),
    optimizer: str = typer.Option("", help="sgd or adam (the recipe's)."),
    loss: str = typer.Option("", help="ce or ce_dice (the recipe's)."),
    schedule: str = typer.Option("", help="poly, cosine or onecycle (the recipe's)."),
    learning_rate: float = typer.Option(0.0, help="Base learning rate (0: the recipe's)."),
    input_scale: int = typer.Option(
        0, help="Train and predict at 1/N of the image resolution, 1..4 (0: the recipe's)."
    ),
    foreground_fraction: float = typer.Option(
        0.0, help="Share of patches centred on foreground, 0..1 (0: the recipe's)."
    ),
    base_model: str = typer.Option("", "--base-model", help="Fine-tune from this model."),
    add_iterations: int = typer.Option(
        0, "--add-iterations", help="Fine-tuning iterations on top of the base."
    ),
    batch_size: int = typer.Option(0, help="Batch size (0: default)."),
    patch_shape: str = typer.Option("", help="y,x training patch."),
    adapt_to: str = typer.Option(
        "",
        "--adapt-to",
        help="Unlabelled target volume to adapt the model to (label-free domain adaptation).",
    ),
    adaptation: str = typer.Option(
        "",
        "--adaptation",
        help="none, histogram, histogram-online, translation, ssl or multitask (none).",
    ),
    select_by: str = typer.Option(
        "",
        "--select-by",
        help="Checkpoint kept: validation, solidity, area or last (validation); solidity "
        "and area compare predictions on --adapt-to with the source labels' shapes.",
    ),
    adaptation_iterations: int = typer.Option(
        0,
        "--adaptation-iterations",
        help="Iterations of the unsupervised stages (0: as many as --iterations).",
    ),
    adaptation_checkpoints: int = typer.Option(
        0, "--adaptation-checkpoints", help="Candidate checkpoints scored (0: 5)."
    ),
    match_at_predict: bool = typer.Option(
        False,
        "--match-at-predict",
        help="Prediction matches its input's histogram to the training data's.",
    ),
    snapshot_every_minutes: float = typer.Option(
        0.0,
        help="Snapshot a member at least this often (wall-clock minutes; 0: every 5), "
        "so a preempted worker loses at most that much training.",
    ),
    wait: bool = typer.Option(
        True, help="Follow the job until it ends (iteration, loss, it/s, ETA, validation)."
    ),
) -> None:
    """Train (or fine-tune) an ensemble: one training task per member."""
    with client() as c:
        job = c.train(
            images=volume_ref(images),
            labels=volume_ref(labels),
            model=model,
            validation_images=volume_ref(validation_images) if validation_images else None,
            validation_labels=volume_ref(validation_labels) if validation_labels else None,
            recipe=recipe,
            architecture=architecture,
            width=width,
            members=names(members) if members else (),
            iterations=iterations,
            max_minutes=minutes,
            optimizer=optimizer,
            loss=loss,
            schedule=schedule,
            learning_rate=learning_rate,
            input_scale=input_scale,
            foreground_fraction=foreground_fraction,
            base_model=base_model,
            add_iterations=add_iterations,
            batch_size=batch_size,
            patch_shape=shape(patch_shape, "patch-shape"),
            adapt_to=volume_ref(adapt_to) if adapt_to else None,
            adaptation=adaptation,
            select_by=select_by,
            adaptation_iterations=adaptation_iterations,
            adaptation_checkpoints=adaptation_checkpoints,
            match_histogram_at_predict=match_at_predict,
            snapshot_every_minutes=snapshot_every_minutes,
        )
        finish(c, job, wait)


@app.command()
def watch(job_id: str = typer.Argument(...)) -> None:
    """Follow a job's progress until it ends (JSON lines with --output json)."""
    with client() as c:
        finish(c, job_id, True)


@app.command()
def jobs(limit: int = typer.Option(50, help="At most this many, newest first.")) -> None:
    """List jobs."""
    with client() as c:
        found = c.jobs(limit=limit)
        if state.json:
            out.print_json(json.dumps([job_dict(j) for j in found]))
        else:
            render_jobs(found)


@app.command()
def cancel(job_id: str = typer.Argument(...)) -> None:
    """Cancel a job; running tasks stop at their next heartbeat."""
    with client() as c:
        print_job(c.cancel(job_id))


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
    address: str = typer.Option(
        f"127.0.0.1:{DEFAULT_PORTS['inference']}", help="Inference server host:port."
    ),
) -> None:
    """Predict a small region interactively (the only call that returns voxels)."""
    try:
        start, stop = parse_region(region)
        store_url, path = split_ref(input)
        prob = call_predict_region(
            address,
            path,
            start,
            stop,
            model=model,
            tta_level=tta_level,
            members=names(members),
            store_url=store_url,
            timeout_s=max(state.timeout_s, 300.0),
            security=state.security(address),
        )
    except Deep3mError as exc:
        raise error(exc) from exc
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if out_file.suffix.lower() in (".tif", ".tiff"):
        export_tiff(prob, out_file)
    else:
        np.save(out_file, prob)
    report = {
        "shape": list(prob.shape),
        "file": str(out_file),
        "mean_probability": float(prob.mean()) if prob.size else 0.0,
    }
    if state.json:
        out.print_json(json.dumps(report))
    else:
        out.print(f"wrote {report['shape']} probabilities to {out_file}")
