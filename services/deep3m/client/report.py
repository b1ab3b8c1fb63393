"""The report of a job: one self-contained HTML page, with its figures as PNGs beside it.

From the job's documents in the store (``jobs/<job>/job.json``, ``result.json``)
it finds the inputs, the model and the outputs, and shows: the job and its input
volumes; the model card; with ground truth, the accuracy (voxels and objects) and
error overlays; the objects of the probability map (counts, a table of the
largest, sizes and density profiles); and a link to view the volumes. Every
image is embedded in the page (``data:`` URIs), so the page alone can be mailed
or archived; the PNGs and CSVs beside it are for other tools.
"""

from __future__ import annotations

import base64
import datetime
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deep3m.core.errors import Deep3mError, InvalidArgumentError, NotFoundError
from deep3m.core.geometry import Box
from deep3m.core.store import Store, check_key

REPORT_NAME = "index.html"
# Rows of the object table shown in the page (the CSV beside it has them all).
TABLE_ROWS = 25
# Error overlays shown when no slices are chosen: evenly spread through the stack.
DEFAULT_OVERLAYS = 3


@dataclass(frozen=True)
class ReportSpec:
    ground_truth: str = ""  # a label/mask volume in the store to score against
    threshold: float = 0.5
    min_size_voxels: int = 0
    window_um: float = 2.0  # density profile window
    overlay_slices: tuple[int, ...] = ()
    viewer_link: str = ""

    def __post_init__(self) -> None:
        from deep3m.postprocess.labels import LabelSpec

        if self.ground_truth:
            check_key(self.ground_truth)
        # The objects are labelled as `label` labels them: the same checks.
        LabelSpec(threshold=self.threshold, min_size_voxels=self.min_size_voxels)
        if not self.window_um > 0:
            raise InvalidArgumentError(
                f"window_um must be > 0, got {self.window_um}", field="window_um"
            )


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


# -- HTML pieces ---------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    if isinstance(value, list | tuple):
        return " × ".join(_fmt(v) for v in value)
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(folder: Path, name: str, png: bytes, caption: str) -> str:
    (folder / name).write_bytes(png)
    data = base64.b64encode(png).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(caption)}" '
        f'data-file="{_e(name)}"><figcaption>{_e(caption)}</figcaption></figure>'
    )


STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1200px; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ccc; }
.note { color: #666; font-size: 0.9em; }
"""


# -- sections --------------------------------------------------------------------------
def _job_section(job_id: str, record: Mapping[str, Any], result: Mapping[str, Any] | None) -> str:
    created = datetime.datetime.fromtimestamp(
        float(record.get("created_unix_s", 0)), tz=datetime.UTC
    ).strftime("%Y-%m-%d %H:%M:%S UTC")
    state = str(result.get("state", "?")) if result else "RUNNING (no result yet)"
    rows: list[list[Any]] = [["job", job_id], ["kind", record.get("kind", "?")],
                             ["state", state], ["created", created]]  # fmt: skip
    if result and result.get("message"):
        rows.append(["message", result["message"]])
    parts = ["<h2>Job</h2>", _table(("", "value"), rows, cls="job")]
    stages = (result or {}).get("stages") or {}
    if stages:
        parts.append(
            _table(
                ("stage", "tasks", "done", "quarantined"),
                [
                    [n, c.get("total"), c.get("done"), c.get("quarantined")]
                    for n, c in stages.items()
                ],
            )
        )
    errors = (result or {}).get("errors") or []
    if errors:
        parts.append(
            _table(
                ("task", "error"), [[e.get("task_id", ""), e.get("message", "")] for e in errors]
            )
        )
    volumes = record.get("volumes") or {}
    if volumes:
        parts.append("<h3>Volumes</h3>")
        parts.append(
            _table(
                ("role", "path", "shape", "dtype", "voxel size (nm)"),
                [
                    [
                        name,
                        v.get("path", ""),
                        v.get("shape", []),
                        v.get("dtype", ""),
                        v.get("voxel_size_nm", []),
                    ]
                    for name, v in volumes.items()
                ],
                cls="volumes",
            )
        )
    return "\n".join(parts)


def _model_section(store: Store, model_id: str) -> tuple[str, dict[str, Any] | None]:
    from deep3m.models.card import load_card

    if not model_id:
        return "", None
    try:
        card = load_card(store, model_id)
    except Deep3mError as exc:
        return f"<h2>Model</h2><p class='note'>model {_e(model_id)}: {_e(exc.message)}</p>", None
    rows: list[list[Any]] = [
        ["id", card.id], ["architecture", card.architecture], ["width", card.width],
        ["iterations", card.iterations], ["voxel size (nm)", list(card.voxel_size_nm)],
        ["halo (z, y, x)", list(card.halo)],
        ["normalisation", f"mean {card.normalization_mean:.4g}, std {card.normalization_std:.4g}"],
        ["base model", card.base_model or "none"],
    ]  # fmt: skip
    rows += [[f"metric {k}", v] for k, v in sorted(card.metrics.items())]
    members = [
        [m.name, m.frames, m.iterations, ", ".join(f"{k} {v:.4g}" for k, v in m.metrics.items())]
        for m in card.members
    ]
    html_ = (
        "<h2>Model</h2>"
        + _table(("", "value"), rows, cls="model")
        + _table(("member", "frames", "iterations", "metrics"), members, cls="members")
    )
    return html_, {"id": card.id, "architecture": card.architecture, "metrics": card.metrics}


def _overlay_slices(depth: int, chosen: Sequence[int]) -> list[int]:
    if chosen:
        return list(chosen)
    count = min(DEFAULT_OVERLAYS, depth)
    return sorted({round(z) for z in np.linspace(0, depth - 1, count)})


def _accuracy_section(
    store: Store, prediction: str, image: str, spec: ReportSpec, ground_truth: str, folder: Path
) -> tuple[str, dict[str, Any]]:
    from deep3m.postprocess.evaluate import EvaluateSpec, evaluate_volumes

    depth = int(store.volume_info(prediction).shape[0])
    overlays = folder / "errors"
    result = evaluate_volumes(
        (store, prediction), (store, ground_truth),
        EvaluateSpec(threshold=spec.threshold, min_size_voxels=spec.min_size_voxels),
        overlays=str(overlays), image=(store, image) if image else None,
        overlay_slices=_overlay_slices(depth, spec.overlay_slices),
    )  # fmt: skip
    v = result.voxels
    rows: list[list[Any]] = [["voxels", v.precision, v.recall, v.f1, v.jaccard]]
    figures: dict[str, Any] = {
        "precision": v.precision, "recall": v.recall, "f1": v.f1, "jaccard": v.jaccard,
    }  # fmt: skip
    if result.objects is not None:
        o = result.objects
        rows.append(["objects", o.precision, o.recall, o.f1, float("nan")])
        figures["objects"] = {
            "predicted": o.predicted, "ground_truth": o.ground_truth,
            "matched": o.true_positives, "f1": o.f1,
        }  # fmt: skip
    parts = [
        "<h2>Accuracy</h2>",
        f"<p>Against <code>{_e(ground_truth)}</code>, threshold {spec.threshold:g}.</p>",
        _table(("level", "precision", "recall", "F1", "Jaccard"), rows, cls="accuracy"),
        f"<p class='note'>TP {v.true_positives:,} · FP {v.false_positives:,} · "
        f"FN {v.false_negatives:,} · TN {v.true_negatives:,} voxels</p>",
        "<h3>Error overlays</h3><p class='note'>green: true positive, red: false positive, "
        "blue: false negative</p>",
    ]
    files = []
    for path in result.overlays:
        name = Path(path).name
        png = Path(path).read_bytes()
        data = base64.b64encode(png).decode()
        parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="errors {_e(name)}" '
            f'data-file="errors/{_e(name)}"><figcaption>{_e(name)}</figcaption></figure>'
        )
        files.append(f"errors/{name}")
    figures["overlays"] = files
    return "\n".join(parts), figures


def _objects_section(
    store: Store, volume: str, spec: ReportSpec, folder: Path
) -> tuple[str, dict[str, Any]]:
    from deep3m.postprocess.labels import LabelSpec
    from deep3m.postprocess.sharded.density import (
        density_profile,
        density_profile_png,
        size_histogram,
        size_histogram_png,
    )
    from deep3m.postprocess.sharded.pipeline import label_sharded

    info = store.volume_info(volume)
    source = store.open_volume(volume)
    # The objects as `label` finds them, into memory: the report writes nothing to the store.
    target = np.zeros(info.shape, np.uint32)
    labelled = label_sharded(
        source, target,
        LabelSpec(threshold=spec.threshold, min_size_voxels=spec.min_size_voxels),
        voxel_size_nm=info.voxel_size_nm,
    )  # fmt: skip
    table = labelled.objects
    (folder / "objects.csv").write_text(table.to_csv())
    parts = [
        "<h2>Objects</h2>",
        f"<p>{len(table):,} objects in <code>{_e(volume)}</code> (threshold "
        f"{spec.threshold:g}, at least {spec.min_size_voxels} voxels); all of them in "
        "<a href='objects.csv'>objects.csv</a>.</p>",
    ]
    figures: dict[str, Any] = {"count": len(table)}
    if len(table):
        um3 = table.volume_nm3 / 1e9
        figures["volume_um3"] = {
            "min": float(um3.min()), "median": float(np.median(um3)), "max": float(um3.max()),
        }  # fmt: skip
        order = np.argsort(-table.volume_voxels, kind="stable")[:TABLE_ROWS]
        cen = table.centroid_nm / 1e3
        rows = [
            [int(table.labels[i]), int(table.volume_voxels[i]), float(um3[i]),
             float(cen[i, 0]), float(cen[i, 1]), float(cen[i, 2]),
             float(table.mean_probability[i]), float(table.solidity[i]),
             float(table.sphericity[i])]
            for i in order
        ]  # fmt: skip
        parts.append(
            _table(
                (
                    "label",
                    "voxels",
                    "volume (µm³)",
                    "z (µm)",
                    "y (µm)",
                    "x (µm)",
                    "mean probability",
                    "solidity",
                    "sphericity",
                ),
                rows,
                cls="objects",
            )
        )
        parts.append(
            f"<p class='note'>the {len(rows)} largest of {len(table):,}; "
            "sphericity uses the surface estimate (voxel-face area × 2/3)</p>"
        )
    profile = density_profile(table, Box((0, 0, 0), info.shape), window_um=spec.window_um)
    histogram = size_histogram(table)
    (folder / "density.csv").write_text(profile.to_csv())
    (folder / "sizes.csv").write_text(histogram.to_csv())
    parts.append("<h3>Density and sizes</h3>")
    parts.append(
        _figure(
            folder,
            "density.png",
            density_profile_png(profile),
            f"objects per mm³ along z, y and x ({spec.window_um:g} µm window)",
        )
    )
    parts.append(_figure(folder, "sizes.png", size_histogram_png(histogram), "object volumes"))
    return "\n".join(parts), figures


def build_report(store: Store, job_id: str, destination: Path, spec: ReportSpec) -> dict[str, Any]:
    """Write ``destination/index.html`` (and its PNGs and CSVs); returns what it holds."""
    record, result = load_job(store, job_id)
    volumes = job_volumes(record)
    ground_truth = spec.ground_truth or volumes.ground_truth
    for what, key in (("ground_truth", spec.ground_truth),):
        if key and not store.exists(f"{key}/zarr.json"):
            raise NotFoundError(f"{store.key_url(key)} is not a volume", field=what)
    destination.mkdir(parents=True, exist_ok=True)
    sections = [_job_section(job_id, record, result)]
    summary: dict[str, Any] = {
        "job": job_id, "kind": record.get("kind"), "state": (result or {}).get("state"),
        "image": volumes.image or None, "probabilities": volumes.probabilities or None,
        "model": None, "accuracy": None, "objects": None,
    }  # fmt: skip
    model_html, summary["model"] = _model_section(store, volumes.model)
    sections.append(model_html)
    prediction = volumes.probabilities
    ready = bool(prediction) and store.exists(f"{prediction}/zarr.json")
    if ready and store.volume_info(prediction).complete:
        if ground_truth:
            html_, summary["accuracy"] = _accuracy_section(
                store, prediction, volumes.image, spec, ground_truth, destination
            )
            sections.append(html_)
        html_, summary["objects"] = _objects_section(store, prediction, spec, destination)
        sections.append(html_)
    elif prediction:
        sections.append(
            f"<h2>Outputs</h2><p class='note'>{_e(prediction)} is not complete yet.</p>"
        )
    if spec.viewer_link or volumes.image:
        command = f"deep3m view {volumes.image}" + (
            f" --probabilities {prediction}" if prediction else ""
        )
        link = (
            f"<p><a href='{_e(spec.viewer_link)}'>open in Neuroglancer</a> "
            "(while <code>deep3m view</code> serves it)</p>"
            if spec.viewer_link
            else ""
        )
        sections.append(
            f"<h2>Viewer</h2>{link}<p>Serve the volumes with <code>{_e(command)}</code> "
            f"(store {_e(store.url)}).</p>"
        )
    title = f"deep3m report: job {job_id}"
    page = (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{_e(title)}</h1>\n" + "\n".join(s for s in sections if s) + "\n</body></html>\n"
    )
    out = destination / REPORT_NAME
    out.write_text(page, encoding="utf-8")
    summary["html"] = str(out)
    summary["files"] = sorted(str(p.relative_to(destination)) for p in destination.rglob("*.png"))
    return summary
