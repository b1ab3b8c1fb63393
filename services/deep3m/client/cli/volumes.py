"""Volume commands, run in this process on the store: describe, label, evaluate, pyramid,
export, view, report, models."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from enum import StrEnum

import typer

from deep3m.client import volumes as ops
from deep3m.client.cli.app import app, console, errors_exit, settings, state
from deep3m.client.cli.options import (
    VOLUME_HELP,
    ArrayOption,
    ConnectivityOption,
    LabelNameOption,
    MinSizeOption,
    ModelThresholdOption,
    StoreOption,
    ThresholdOption,
    WatershedOption,
    WorkersOption,
)
from deep3m.client.cli.output import (
    emit,
    progress_bar,
    render_describe,
    render_evaluate,
    render_export,
    render_label,
    render_models,
    render_pyramid,
    render_report,
    render_view,
    status,
)
from deep3m.core.errors import InvalidArgumentError, NotFoundError
from deep3m.core.locations import RESERVED_PREFIXES
from deep3m.core.store import Store


class ExportFormat(StrEnum):
    tiff = "tiff"
    png = "png"
    overlay = "overlay"


class S3Mode(StrEnum):
    proxy = "proxy"
    presign = "presign"
    public = "public"


class PyramidMethod(StrEnum):
    auto = "auto"
    mean = "mean"
    mode = "mode"


def resolve(volume: str, store_url: str | None, *, field: str = "volume") -> tuple[Store, str]:
    s = settings()
    return ops.resolve(volume, store_url or s.store_url, s.storage_options(), field=field)


@app.command()
def describe(
    volume: str = typer.Argument(..., help=VOLUME_HELP),
    bins: int = typer.Option(16, "--bins", min=1, max=65536, help="Histogram bins."),
    array: ArrayOption = "",
    stats: bool = typer.Option(True, "--stats/--no-stats", help="Read every voxel for statistics."),
    store: StoreOption = None,
) -> None:
    """Shape, dtype, voxel size, chunks/shards, intensity statistics and histogram."""
    with errors_exit():
        source, key = resolve(volume, store)
        with status("computing statistics") if stats else contextlib.nullcontext():
            report = ops.describe_volume(source, key, array=array, bins=bins, statistics=stats)
    emit(report, render_describe)


@app.command()
def label(
    volume: str = typer.Argument(..., help="Probability or mask volume. " + VOLUME_HELP),
    threshold: ModelThresholdOption = None,
    watershed: WatershedOption = False,
    min_size: MinSizeOption = 0,
    connectivity: ConnectivityOption = 1,
    name: LabelNameOption = "segmentation",
    output: str = typer.Option(
        "", "--output", help="Write the labels to this volume path instead of <volume>/labels/."
    ),
    workers: WorkersOption = 0,
    store: StoreOption = None,
) -> None:
    """Threshold and label objects; writes a label volume and an object table (CSV, JSON)."""
    with errors_exit():
        source, key = resolve(volume, store)
        target = resolve(output, store, field="output") if output else None
        if threshold is None:
            threshold = ops.default_threshold(source, key)
        with progress_bar("labelling") as bar:
            report = ops.label(
                source, key,
                threshold=threshold, watershed=watershed, min_size_voxels=min_size,
                connectivity=connectivity, name=name, output=target, workers=workers or None,
                progress=bar,
            )  # fmt: skip
    emit(report, render_label)


@app.command()
def evaluate(
    prediction: str = typer.Argument(..., help="Predicted probabilities or labels. " + VOLUME_HELP),
    ground_truth: str = typer.Argument(..., help="Ground-truth labels or mask. " + VOLUME_HELP),
    threshold: ModelThresholdOption = None,
    exclusion_zone: int = typer.Option(
        0, "--exclusion-zone", min=0, help="Ignore k voxels around ground-truth borders."
    ),
    objects: bool = typer.Option(
        True, "--objects/--no-objects", help="Also count objects matched by centroid."
    ),
    min_size: MinSizeOption = 0,
    overlays: str = typer.Option(
        "", "--overlays", help="Write error-overlay PNGs (TP green, FP red, FN blue) here."
    ),
    image: str = typer.Option("", "--image", help="For --overlays: the image volume under them."),
    slices: str = typer.Option("", "--slices", help="For --overlays: z slices, e.g. 0,5,10-12."),
    workers: WorkersOption = 0,
    store: StoreOption = None,
) -> None:
    """Precision, recall, F1 and Jaccard of a prediction against ground truth."""
    with errors_exit():
        chosen = ops.parse_slices(slices)
        pred = resolve(prediction, store, field="prediction")
        truth = resolve(ground_truth, store, field="ground_truth")
        under = resolve(image, store, field="image") if image else None
        if threshold is None:
            threshold = ops.default_threshold(*pred)
        with progress_bar("evaluating") as bar:
            report = ops.evaluate(
                pred, truth,
                threshold=threshold, exclusion_zone_voxels=exclusion_zone, objects=objects,
                min_size_voxels=min_size, overlays=overlays or None, image=under,
                overlay_slices=chosen, workers=workers or None, progress=bar,
            )  # fmt: skip
    emit(report, render_evaluate)


@app.command()
def pyramid(
    volume: str = typer.Argument(..., help=VOLUME_HELP),
    levels: int = typer.Option(
        0, "--levels", min=0, max=16, help="Levels beyond full resolution (0: automatic)."
    ),
    method: PyramidMethod = typer.Option(
        PyramidMethod.auto, "--method", help="mean (images), mode (labels) or auto."
    ),
    workers: WorkersOption = 0,
    store: StoreOption = None,
) -> None:
    """Write multiscale levels (OME-Zarr) for viewers; reruns replace them."""
    with errors_exit():
        source, key = resolve(volume, store)
        with progress_bar("level 1") as bar:
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

            report = ops.pyramid(
                source, key,
                levels=levels, method=None if method is PyramidMethod.auto else method.value,
                workers=workers or None, progress=progress,
            )  # fmt: skip
    emit(report, render_pyramid)


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
    array: ArrayOption = "",
    store: StoreOption = None,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing file or non-empty folder at DESTINATION."
    ),
) -> None:
    """Export a volume as TIFF or PNG pages, or overlay PNGs of it over an image."""
    with errors_exit():
        chosen = ops.parse_slices(slices)
        source, key = resolve(volume, store)
        under = resolve(image, store, field="image") if image else None
        with status("exporting"):
            report = ops.export(
                source, key, destination, fmt.value,
                array=array, image=under, slices=chosen, alpha=alpha,
                storage_options=settings().storage_options(), overwrite=overwrite,
            )  # fmt: skip
    emit(report, render_export)


@app.command("rm")
def remove(
    volume: str = typer.Argument(..., help=VOLUME_HELP),
    store: StoreOption = None,
    force: bool = typer.Option(
        False, "--force", help="Also remove a folder that is not a zarr volume."
    ),
) -> None:
    """Remove a volume (with its labels and pyramid levels) from the store."""
    with errors_exit():
        source, key = resolve(volume, store)
        if key.split("/", 1)[0] in RESERVED_PREFIXES:
            raise InvalidArgumentError(
                f"{key} lies in the store's reserved {key.split('/', 1)[0]}/ folder; "
                "remove jobs and models through their own commands",
                field="volume",
            )
        is_volume = source.exists(f"{key}/zarr.json")
        if not is_volume and not (force and source.list(key)):
            raise NotFoundError(f"no volume at {source.key_url(key)}", field="volume")
        source.delete(key)
    emit({"removed": source.key_url(key)}, lambda r: console.print(f"removed {r['removed']}"))


@app.command()
def models(store: StoreOption = None) -> None:
    """List the trained models in the store (model cards)."""
    with errors_exit():
        s = settings()
        report = ops.list_models(ops.open_existing_store(store or s.store_url, s.storage_options()))
    emit(report, render_models)


@app.command()
def view(
    volume: str = typer.Argument(..., help="Image volume. " + VOLUME_HELP),
    probabilities: str = typer.Option("", "--probabilities", "-p", help="Probability volume."),
    segmentation: list[str] = typer.Option(
        [],
        "--segmentation",
        "-s",
        help="Label volume (repeatable); default: the label images inside the volumes.",
    ),
    port: int = typer.Option(0, "--port", min=0, max=65535, help="Loopback port (0: any free)."),
    meshes: bool = typer.Option(
        False, "--meshes/--no-meshes", help="Mesh the segmentation's objects (zmesh) for 3-D."
    ),
    s3: S3Mode = typer.Option(
        S3Mode.proxy,
        "--s3",
        help="S3 stores: proxy (read here, with your credentials), presign (redirect to "
        "pre-signed URLs; the bucket must allow CORS) or public (link the bucket directly).",
    ),
    store: StoreOption = None,
) -> None:
    """Serve volumes to Neuroglancer on loopback and print the link that opens them."""
    import json
    import sys
    import threading

    from deep3m.client.cli.output import say
    from deep3m.client.viewer import Viewer, default_layers

    with errors_exit():
        source, key = resolve(volume, store)

        def same_store(text: str, field: str) -> str:
            other, path = resolve(text, store, field=field)
            if other.url != source.url:
                raise InvalidArgumentError(
                    f"--{field} {text!r} is in {other.url}, not in {source.url}: one viewer "
                    "serves one store",
                    field=field,
                )
            return path

        layers = default_layers(
            source, key,
            probabilities=same_store(probabilities, "probabilities") if probabilities else "",
            segmentation=[same_store(s, "segmentation") for s in segmentation],
        )  # fmt: skip
        with status("meshing the objects") if meshes else contextlib.nullcontext():
            viewer = Viewer(
                source, layers, port=port, s3=s3.value, meshes=meshes,
                storage_options=settings().storage_options(),
            )  # fmt: skip
    with viewer:
        report = {
            "store": source.url,
            "url": viewer.url,
            "link": viewer.link,
            "layers": [{"name": x.name, "path": x.path, "kind": x.kind} for x in layers],
        }
        if state.json:
            say(json.dumps(report))  # one line, so a program reads it while this serves
        else:
            render_view(report)
        sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


@app.command()
def report(
    job: str = typer.Argument(..., help="Job id (its documents are in the store)."),
    destination: str = typer.Option(
        "", "--to", help="Folder for index.html and its figures (default: report-JOB)."
    ),
    ground_truth: str = typer.Option(
        "", "--ground-truth", help="Labels to score the prediction against. " + VOLUME_HELP
    ),
    threshold: ThresholdOption = 0.5,
    min_size: MinSizeOption = 0,
    window_um: float = typer.Option(2.0, "--window-um", help="Density profile window (µm)."),
    slices: str = typer.Option("", "--slices", help="Error-overlay slices (default: 3 spread)."),
    viewer_link: str = typer.Option("", "--viewer-link", help="A link from deep3m view."),
    store: StoreOption = None,
) -> None:
    """One self-contained HTML page on a job: inputs, model, accuracy, objects, density."""
    from pathlib import Path

    from deep3m.client.report import ReportSpec, build_report

    with errors_exit():
        s = settings()
        source = ops.open_existing_store(store or s.store_url, s.storage_options())
        truth = resolve(ground_truth, store, field="ground_truth")[1] if ground_truth else ""
        spec = ReportSpec(
            ground_truth=truth, threshold=threshold, min_size_voxels=min_size,
            window_um=window_um, overlay_slices=tuple(ops.parse_slices(slices)),
            viewer_link=viewer_link,
        )  # fmt: skip
        with status("writing the report"):
            summary = build_report(source, job, Path(destination or f"report-{job}"), spec)
    emit(ops.jsonable(summary), render_report)
