"""Evaluation as sharded stages: per-block counts, then one small reduction.

The same figures as :func:`deep3m.postprocess.evaluate.evaluate_arrays`, from
documents instead of whole-volume passes:

- voxel level: each block's confusion counts
  (:func:`~deep3m.postprocess.evaluate.block_voxel_counts`, the exclusion zone
  read with its in-plane context), summed;
- object level: the predicted objects are the labelling's own (its object
  table, after the ``min_size_voxels`` filter); the ground-truth objects are
  the connected components of the ground truth's foreground, found by the same
  per-block stages (faces and piece sizes, merged into a global id map) — or the
  ids of a volume declared ``kind: labels``. Each predicted object is matched
  at its centroid voxel when that voxel is its own, else at its own voxel
  nearest the centroid: every block reports, for the objects whose centroid
  voxel it holds, whether that voxel is the object's and the ground-truth
  object there, and for every object it holds, its nearest voxel and the
  ground-truth object there. The reduction picks per object and matches
  one-to-one, larger predictions first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deep3m.core.geometry import Box
from deep3m.core.metrics import ConfusionCounts
from deep3m.postprocess.evaluate import Evaluation, ObjectCounts, Operand, block_voxel_counts
from deep3m.postprocess.sharded.block import (
    BlockFaces,
    Labelling,
    from_document_bytes,
    to_document_bytes,
)
from deep3m.postprocess.sharded.merge import IdMap

_COUNTS = ("true_positives", "false_positives", "false_negatives", "true_negatives")


@dataclass(frozen=True)
class ObjectPoints:
    """The predicted objects as the evaluation needs them (from the object table)."""

    labels: np.ndarray  # (n,) int64, ascending
    volume_voxels: np.ndarray  # (n,) int64
    points: np.ndarray  # (n, 3) int64: each centroid rounded to the nearest voxel
    centroid: np.ndarray  # (n, 3) float64 voxels

    @classmethod
    def of(cls, labels: np.ndarray, volume_voxels: np.ndarray, centroid: np.ndarray,
           shape: Sequence[int]) -> ObjectPoints:  # fmt: skip
        points = np.clip(np.floor(centroid + 0.5).astype(np.int64), 0, np.asarray(shape) - 1)
        return cls(labels.astype(np.int64), volume_voxels.astype(np.int64), points, centroid)


def ground_truth_pieces(
    ground_truth: Any, index: Sequence[int], core: Box, labelling: Labelling
) -> tuple[BlockFaces, np.ndarray]:
    """The faces and piece sizes of one block of the ground truth (what its merge needs)."""
    local, _ = labelling.label_core(ground_truth, core)
    n = int(local.max(initial=0))
    faces = BlockFaces(
        tuple(int(v) for v in index),
        core,
        low=tuple(np.ascontiguousarray(local.take(0, axis=a)) for a in range(3)),  # type: ignore[arg-type]
        high=tuple(np.ascontiguousarray(local.take(-1, axis=a)) for a in range(3)),  # type: ignore[arg-type]
    )
    return faces, np.bincount(local.ravel(), minlength=n + 1)[1:].astype(np.int64)


@dataclass(frozen=True)
class BlockEvaluation:
    """What one block contributes to the evaluation."""

    counts: ConfusionCounts
    # Objects whose centroid voxel lies in the block: is it theirs, and the
    # ground-truth object there (0: background).
    point_labels: np.ndarray
    point_inside: np.ndarray
    point_truth: np.ndarray
    # Every object present in the block: its voxel nearest its centroid (squared
    # distance) and the ground-truth object there.
    near_labels: np.ndarray
    near_distance: np.ndarray
    near_truth: np.ndarray
    # Ids of a declared ground-truth label volume present in the block.
    truth_ids: np.ndarray

    def to_bytes(self) -> bytes:
        return to_document_bytes(
            {
                "counts": np.asarray([getattr(self.counts, c) for c in _COUNTS], np.int64),
                "point_labels": self.point_labels,
                "point_inside": self.point_inside,
                "point_truth": self.point_truth,
                "near_labels": self.near_labels,
                "near_distance": self.near_distance,
                "near_truth": self.near_truth,
                "truth_ids": self.truth_ids,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> BlockEvaluation:
        d = from_document_bytes(data, "block evaluation")
        counts = ConfusionCounts(*(int(v) for v in d["counts"]))
        return cls(
            counts, d["point_labels"], d["point_inside"], d["point_truth"],
            d["near_labels"], d["near_distance"], d["near_truth"], d["truth_ids"],
        )  # fmt: skip


def evaluate_block(
    prediction: Operand,
    ground_truth: Operand,
    labels: Any,
    core: Box,
    objects: ObjectPoints,
    truth_ids: Any,
    *,
    threshold: float,
    exclusion_zone: int = 0,
) -> BlockEvaluation:
    """One block's part. ``truth_ids(core)`` gives the ground-truth object id of every
    voxel of ``core`` (global ids)."""
    counts = block_voxel_counts(
        prediction, ground_truth, core, threshold=threshold, exclusion_zone=exclusion_zone
    )
    own = np.asarray(labels[core.slices()]).astype(np.int64)
    truth = np.asarray(truth_ids(core)).astype(np.int64)
    origin = np.asarray(core.start, np.int64)
    stop = np.asarray(core.stop, np.int64)
    here = np.all((objects.points >= origin) & (objects.points < stop), axis=1)
    local = objects.points[here] - origin
    at = tuple(local.T)
    point_inside = own[at] == objects.labels[here]
    # Nearest own voxel of every object present: squared distance to its centroid,
    # first in raster order among equals.
    fg = np.flatnonzero(own)
    ids = own.ravel()[fg]
    which = np.searchsorted(objects.labels, ids)
    coords = np.stack(np.unravel_index(fg, own.shape), axis=1) + origin
    distance = ((coords - objects.centroid[which]) ** 2).sum(axis=1)
    order = np.lexsort((distance, which))
    first = np.ones(len(order), bool)
    first[1:] = which[order][1:] != which[order][:-1]
    keep = order[first]
    return BlockEvaluation(
        counts,
        objects.labels[here],
        point_inside,
        truth[at],
        objects.labels[which[keep]],
        distance[keep],
        truth.ravel()[fg[keep]],
        np.unique(truth[truth > 0]) if ground_truth.declared_labels else np.zeros(0, np.int64),
    )


def global_truth_ids(
    ground_truth: Operand, labelling: Labelling, index: Sequence[int], id_map: IdMap | None
) -> Any:
    """``core → ground-truth object ids``: the declared ids, or the block's components
    mapped through the ground truth's global id map."""

    def ids(core: Box) -> np.ndarray:
        if ground_truth.declared_labels or id_map is None:
            return np.asarray(ground_truth.array[core.slices()])
        local, _ = labelling.label_core(ground_truth.array, core)
        return id_map.for_block(index)[local]

    return ids


def reduce_evaluation(
    parts: Iterable[BlockEvaluation], objects: ObjectPoints, truth_count: int | None
) -> Evaluation:
    """The whole evaluation from every block's part (in block order); ``truth_count``
    None counts the declared ground-truth ids the blocks saw."""
    n = len(objects.labels)
    inside = np.zeros(n, bool)
    at_point = np.zeros(n, np.int64)
    best = np.full(n, np.inf)
    at_nearest = np.zeros(n, np.int64)
    counts = ConfusionCounts()
    seen: set[int] = set()
    for part in parts:
        counts = counts + part.counts
        rows = np.searchsorted(objects.labels, part.point_labels)
        inside[rows] = part.point_inside
        at_point[rows] = part.point_truth
        rows = np.searchsorted(objects.labels, part.near_labels)
        better = part.near_distance < best[rows]  # ties: the earlier block
        best[rows[better]] = part.near_distance[better]
        at_nearest[rows[better]] = part.near_truth[better]
        seen.update(int(v) for v in part.truth_ids)
    hit = np.where(inside, at_point, at_nearest)
    claimed = {int(g) for g in hit if g}
    tp = len(claimed)
    truth = len(seen) if truth_count is None else truth_count
    return Evaluation(counts, ObjectCounts(tp, n - tp, truth - tp))
