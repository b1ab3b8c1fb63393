"""What the report shows: its options, and each section of the page (the job, the
model, the accuracy against ground truth, the objects)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deep3m.client.report.page import embedded_png, escape, figure, table
from deep3m.core.errors import Deep3mError, InvalidArgumentError
from deep3m.core.geometry import Box
from deep3m.core.store import Store, check_key

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


def job_section(job_id: str, record: Mapping[str, Any], result: Mapping[str, Any] | None) -> str:
    created = datetime.datetime.fromtimestamp(
        float(record.get("created_unix_s", 0)), tz=datetime.UTC
    ).strftime("%Y-%m-%d %H:%M:%S UTC")
    state = str(result.get("state", "?")) if result else "RUNNING (no result yet)"
    rows: list[list[Any]] = [["job", job_id], ["kind", record.get("kind", "?")],
                             ["state", state], ["created", created]]  # fmt: skip
    if result and result.get("message"):
        rows.append(["message", result["message"]])
    parts = ["<h2>Job</h2>", table(("", "value"), rows, cls="job")]
    stages = (result or {}).get("stages") or {}
    if stages:
        parts.append(
            table(
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
            table(("task", "error"), [[e.get("task_id", ""), e.get("message", "")] for e in errors])
        )
    volumes = record.get("volumes") or {}
    if volumes:
        parts.append("<h3>Volumes</h3>")
        parts.append(
            table(
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


def model_section(store: Store, model_id: str) -> tuple[str, dict[str, Any] | None]:
    from deep3m.models.card import load_card

    if not model_id:
        return "", None
    try:
        card = load_card(store, model_id)
    except Deep3mError as exc:
        return (
            f"<h2>Model</h2><p class='note'>model {escape(model_id)}: {escape(exc.message)}</p>",
            None,
        )
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
        + table(("", "value"), rows, cls="model")
        + table(("member", "frames", "iterations", "metrics"), members, cls="members")
    )
    return html_, {"id": card.id, "architecture": card.architecture, "metrics": card.metrics}


def _overlay_slices(depth: int, chosen: Sequence[int]) -> list[int]:
    if chosen:
        return list(chosen)
    count = min(DEFAULT_OVERLAYS, depth)
    return sorted({round(z) for z in np.linspace(0, depth - 1, count)})


def accuracy_section(
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
        f"<p>Against <code>{escape(ground_truth)}</code>, threshold {spec.threshold:g}.</p>",
        table(("level", "precision", "recall", "F1", "Jaccard"), rows, cls="accuracy"),
        f"<p class='note'>TP {v.true_positives:,} · FP {v.false_positives:,} · "
        f"FN {v.false_negatives:,} · TN {v.true_negatives:,} voxels</p>",
        "<h3>Error overlays</h3><p class='note'>green: true positive, red: false positive, "
        "blue: false negative</p>",
    ]
    files = []
    for path in result.overlays:
        name = Path(path).name
        png = Path(path).read_bytes()
        parts.append(embedded_png(png, f"errors/{name}", name, alt=f"errors {name}"))
        files.append(f"errors/{name}")
    figures["overlays"] = files
    return "\n".join(parts), figures


def objects_section(
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
    objects = labelled.objects
    (folder / "objects.csv").write_text(objects.to_csv())
    parts = [
        "<h2>Objects</h2>",
        f"<p>{len(objects):,} objects in <code>{escape(volume)}</code> (threshold "
        f"{spec.threshold:g}, at least {spec.min_size_voxels} voxels); all of them in "
        "<a href='objects.csv'>objects.csv</a>.</p>",
    ]
    figures: dict[str, Any] = {"count": len(objects)}
    if len(objects):
        um3 = objects.volume_nm3 / 1e9
        figures["volume_um3"] = {
            "min": float(um3.min()), "median": float(np.median(um3)), "max": float(um3.max()),
        }  # fmt: skip
        order = np.argsort(-objects.volume_voxels, kind="stable")[:TABLE_ROWS]
        cen = objects.centroid_nm / 1e3
        rows = [
            [int(objects.labels[i]), int(objects.volume_voxels[i]), float(um3[i]),
             float(cen[i, 0]), float(cen[i, 1]), float(cen[i, 2]),
             float(objects.mean_probability[i]), float(objects.solidity[i]),
             float(objects.sphericity[i])]
            for i in order
        ]  # fmt: skip
        parts.append(
            table(
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
            f"<p class='note'>the {len(rows)} largest of {len(objects):,}; "
            "sphericity uses the surface estimate (voxel-face area × 2/3)</p>"
        )
    profile = density_profile(objects, Box((0, 0, 0), info.shape), window_um=spec.window_um)
    histogram = size_histogram(objects)
    (folder / "density.csv").write_text(profile.to_csv())
    (folder / "sizes.csv").write_text(histogram.to_csv())
    parts.append("<h3>Density and sizes</h3>")
    parts.append(
        figure(
            folder,
            "density.png",
            density_profile_png(profile),
            f"objects per mm³ along z, y and x ({spec.window_um:g} µm window)",
        )
    )
    parts.append(figure(folder, "sizes.png", size_histogram_png(histogram), "object volumes"))
    return "\n".join(parts), figures
