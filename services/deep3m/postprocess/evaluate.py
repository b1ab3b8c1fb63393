"""Accuracy of a prediction against ground truth, computed block by block.

Voxel level: precision, recall, F1 and Jaccard from
``deep3m.core.metrics.confusion_counts``, summed over blocks. With an
exclusion zone of k voxels, each block's ground truth is read with k voxels of
in-plane context (clipped at the volume border, as a whole-volume computation
sees it), so the zone around objects that cross block faces is exactly the
whole-volume zone.

Object level: the connected components of both sides (or the ids of a volume
declared ``kind: labels``), matched one-to-one as :mod:`.matching` describes;
predicted objects smaller than ``min_size_voxels`` are dropped before matching,
exactly as ``label`` drops them; the ground truth is never filtered.
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from deep3m.core.errors import Deep3mError, InvalidArgumentError
from deep3m.core.geometry import Block, Box
from deep3m.core.metrics import ConfusionCounts, border_zone, confusion_counts
from deep3m.core.store import Store
from deep3m.postprocess.blockwise import Progress, block_plan, map_blocks, write_grid
from deep3m.postprocess.foreground import Kind, check_threshold, foreground, volume_kind
from deep3m.postprocess.labels import LabelSpec, label_array
from deep3m.postprocess.matching import (
    ObjectCounts,
    match_objects,
    representative_points,
    values_at,
)
from deep3m.postprocess.objects import ObjectTable, object_table
from deep3m.postprocess.overlays import write_error_overlays

# The matching's names, for callers that import them from here.
__all__ = [
    "EvaluateSpec",
    "Evaluation",
    "ObjectCounts",
    "Operand",
    "OverlayRequest",
    "block_voxel_counts",
    "evaluate_arrays",
    "evaluate_volumes",
    "evaluate_with_overlays",
    "match_objects",
    "representative_points",
    "values_at",
    "voxel_counts",
]


@dataclass(frozen=True)
class EvaluateSpec:
    threshold: float = 0.5
    exclusion_zone_voxels: int = 0
    objects: bool = True
    connectivity: int = 1
    # Predicted objects below this size are not objects (as ``label --min-size``).
    min_size_voxels: int = 0

    def __post_init__(self) -> None:
        check_threshold(self.threshold)
        if self.min_size_voxels < 0:
            raise InvalidArgumentError(
                f"min_size_voxels must be >= 0, got {self.min_size_voxels}",
                field="min_size_voxels",
            )
        if self.exclusion_zone_voxels < 0:
            raise InvalidArgumentError(
                f"exclusion_zone_voxels must be >= 0, got {self.exclusion_zone_voxels}",
                field="exclusion_zone_voxels",
            )
        if self.connectivity not in (1, 2, 3):
            raise InvalidArgumentError(
                f"connectivity must be 1, 2 or 3, got {self.connectivity}", field="connectivity"
            )


@dataclass(frozen=True)
class Evaluation:
    voxels: ConfusionCounts
    objects: ObjectCounts | None = None
    overlays: tuple[str, ...] = ()  # error-overlay PNGs written, when asked for

    def as_dict(self) -> dict[str, float]:
        out = dict(self.voxels.as_dict())
        if self.objects is not None:
            o = self.objects
            out.update(
                object_true_positives=float(o.true_positives),
                object_false_positives=float(o.false_positives),
                object_false_negatives=float(o.false_negatives),
                object_precision=o.precision,
                object_recall=o.recall,
                object_f1=o.f1,
            )
        return out


@dataclass(frozen=True)
class Operand:
    """One side of an evaluation: an array and how to read its foreground."""

    array: Any
    kind: Kind
    declared_labels: bool = False

    @classmethod
    def of(cls, array: Any, attributes: dict[str, Any] | None = None) -> Operand:
        attrs = attributes or {}
        return cls(array, volume_kind(array.dtype, attrs), attrs.get("kind") == "labels")


def block_voxel_counts(
    prediction: Operand,
    ground_truth: Operand,
    core: Box,
    *,
    threshold: float,
    exclusion_zone: int = 0,
) -> ConfusionCounts:
    """Confusion counts of one block's core: what a sharded evaluation task computes.

    The ground truth is read with the zone's in-plane context (clipped at the
    volume border), so the zone near block faces equals the whole-volume zone.
    """
    volume = Box.from_shape(tuple(ground_truth.array.shape))
    halo = (0, exclusion_zone, exclusion_zone)  # the zone is in-plane
    pred = foreground(np.asarray(prediction.array[core.slices()]), prediction.kind, threshold)
    read = core.grow(halo).intersect(volume)
    gt_read = foreground(
        np.asarray(ground_truth.array[read.slices()]), ground_truth.kind, threshold
    )
    gt = gt_read[core.relative_to(read)]
    if not exclusion_zone:
        return confusion_counts(pred, gt)
    keep = ~border_zone(gt_read, exclusion_zone)[core.relative_to(read)]
    return confusion_counts(pred[keep], gt[keep])


def voxel_counts(
    prediction: Operand,
    ground_truth: Operand,
    *,
    threshold: float,
    exclusion_zone: int = 0,
    block_shape: Sequence[int] | None = None,
    max_workers: int = 1,
    cancelled: threading.Event | None = None,
    progress: Progress | None = None,
) -> ConfusionCounts:
    """Confusion counts over the whole volume, summed block by block."""
    shape = tuple(ground_truth.array.shape)
    plan = block_plan(shape, write_grid(ground_truth.array), block_shape)

    def one(block: Block) -> ConfusionCounts:
        return block_voxel_counts(
            prediction, ground_truth, block.core, threshold=threshold, exclusion_zone=exclusion_zone
        )

    parts = map_blocks(one, plan, max_workers=max_workers, cancelled=cancelled, progress=progress)
    return sum(parts, ConfusionCounts())


def _object_labels(
    side: Operand, threshold: float, connectivity: int, min_size: int, scratch: zarr.Group,
    name: str, block_shape: Sequence[int] | None, max_workers: int,
    cancelled: threading.Event | None,
) -> tuple[Any, ObjectTable]:  # fmt: skip
    if side.declared_labels:
        table = object_table(
            side.array,
            (1.0, 1.0, 1.0),
            block_shape=block_shape,
            max_workers=max_workers,
            cancelled=cancelled,
        )
        # Labels that stay in the array but are too small simply go unmatched.
        return side.array, table.select(table.volume_voxels >= min_size)
    grid = write_grid(side.array) or tuple(side.array.shape)
    target = scratch.create_array(
        name, shape=side.array.shape, chunks=grid, dtype="uint64", fill_value=0
    )
    result = label_array(
        side.array, target, LabelSpec(threshold=threshold, connectivity=connectivity,
                                      min_size_voxels=min_size, dtype="uint64"),
        kind=side.kind, block_shape=block_shape, max_workers=max_workers, cancelled=cancelled,
    )  # fmt: skip
    return target, result.objects


def evaluate_arrays(
    prediction: Operand,
    ground_truth: Operand,
    spec: EvaluateSpec,
    *,
    block_shape: Sequence[int] | None = None,
    max_workers: int = 1,
    cancelled: threading.Event | None = None,
    progress: Progress | None = None,
) -> Evaluation:
    """Voxel (and, with ``spec.objects``, object) accuracy of ``prediction``."""
    if tuple(prediction.array.shape) != tuple(ground_truth.array.shape):
        raise InvalidArgumentError(
            f"prediction shape {tuple(prediction.array.shape)} differs from ground truth shape "
            f"{tuple(ground_truth.array.shape)}",
            field="ground_truth",
        )
    threshold = check_threshold(spec.threshold)
    counts = voxel_counts(
        prediction, ground_truth, threshold=threshold, exclusion_zone=spec.exclusion_zone_voxels,
        block_shape=block_shape, max_workers=max_workers, cancelled=cancelled, progress=progress,
    )  # fmt: skip
    if not spec.objects:
        return Evaluation(counts)
    with tempfile.TemporaryDirectory(prefix="deep3m-eval-") as tmp:
        # Component labels of large volumes go to local scratch, not memory.
        scratch = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w")
        run = (block_shape, max_workers, cancelled)
        pred_labels, pred_table = _object_labels(
            prediction, threshold, spec.connectivity, spec.min_size_voxels, scratch,
            "prediction", *run,
        )  # fmt: skip
        gt_labels, gt_table = _object_labels(
            ground_truth, threshold, spec.connectivity, 0, scratch, "ground_truth", *run
        )
        grid = block_shape or write_grid(gt_labels) or tuple(gt_labels.shape)
        points = representative_points(
            pred_table, pred_labels, block_shape or write_grid(pred_labels) or grid,
            max_workers=max_workers, cancelled=cancelled,
        )  # fmt: skip
        objects = match_objects(pred_table, points, gt_labels, len(gt_table), grid)
    return Evaluation(counts, objects)


@dataclass(frozen=True)
class OverlayRequest:
    """Error overlays to write with an evaluation (see :mod:`.overlays`)."""

    destination: str  # a local folder or a remote URL
    image: Any | None = None  # the image under the colours (a 3-D array), else black
    slices: Sequence[int] | None = None  # all slices when None
    storage_options: Any | None = None


def evaluate_with_overlays(
    prediction: Operand,
    ground_truth: Operand,
    spec: EvaluateSpec,
    overlays: OverlayRequest | None,
    *,
    max_workers: int = 1,
    cancelled: threading.Event | None = None,
    progress: Progress | None = None,
) -> Evaluation:
    """``evaluate_arrays``, then error overlays of the same foregrounds when asked for."""
    result = evaluate_arrays(
        prediction, ground_truth, spec,
        max_workers=max_workers, cancelled=cancelled, progress=progress,
    )  # fmt: skip
    if overlays is None:
        return result
    files = write_error_overlays(
        prediction.array, ground_truth.array, overlays.destination,
        prediction_kind=prediction.kind, ground_truth_kind=ground_truth.kind,
        threshold=check_threshold(spec.threshold), image=overlays.image,
        slices=overlays.slices, storage_options=overlays.storage_options,
    )  # fmt: skip
    return dataclasses.replace(result, overlays=tuple(files))


def _open_side(store: Store, path: str, array: str, what: str) -> tuple[Any, dict[str, Any]]:
    try:
        info = store.volume_info(path, array)
        return store.open_volume(path, array), dict(info.attributes)
    except Deep3mError as exc:
        # Name the side the user got wrong, not the store's generic "volume".
        raise type(exc)(exc.message, field=what) from exc


def evaluate_volumes(
    prediction: tuple[Store, str],
    ground_truth: tuple[Store, str],
    spec: EvaluateSpec,
    *,
    prediction_array: str = "",
    ground_truth_array: str = "",
    overlays: str | None = None,
    image: tuple[Store, str] | None = None,
    overlay_slices: Sequence[int] | None = None,
    max_workers: int = 1,
    cancelled: threading.Event | None = None,
    progress: Progress | None = None,
) -> Evaluation:
    """``evaluate_arrays`` on two stored volumes (both must be complete); with
    ``overlays`` (a folder or URL), error-overlay PNGs there too, over ``image``."""
    sides = [
        Operand.of(*_open_side(*prediction, prediction_array, "prediction")),
        Operand.of(*_open_side(*ground_truth, ground_truth_array, "ground_truth")),
    ]
    request = None
    if overlays is not None:
        background = _open_side(*image, "", "image")[0] if image is not None else None
        request = OverlayRequest(overlays, background, overlay_slices)
    return evaluate_with_overlays(
        sides[0], sides[1], spec, request,
        max_workers=max_workers, cancelled=cancelled, progress=progress,
    )  # fmt: skip
