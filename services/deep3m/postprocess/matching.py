"""Object-level matching of predicted objects into ground-truth objects.

Objects are labels (connected components, or the ids of a volume declared
``kind: labels``) with their table. A predicted object matches a ground-truth
object when its centroid (rounded to the nearest voxel) lies inside it;
matching is one-to-one, larger predicted objects first, so a second prediction
whose centroid falls into an already matched object counts as a false
positive. For a predicted object whose centroid lies outside the object itself
(C-shaped or hollow), its own voxel nearest the centroid stands in, so a
perfect prediction scores 1.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deep3m.core.geometry import Block, Box
from deep3m.postprocess.blockwise import block_plan, map_blocks
from deep3m.postprocess.objects import ObjectTable


@dataclass(frozen=True)
class ObjectCounts:
    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0

    @property
    def predicted(self) -> int:
        return self.true_positives + self.false_positives

    @property
    def ground_truth(self) -> int:
        return self.true_positives + self.false_negatives

    @property
    def precision(self) -> float:
        return self.true_positives / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.ground_truth if self.ground_truth else 0.0

    @property
    def f1(self) -> float:
        denom = 2 * self.true_positives + self.false_positives + self.false_negatives
        return 2 * self.true_positives / denom if denom else 0.0


def values_at(array: Any, points: np.ndarray, block_shape: Sequence[int]) -> np.ndarray:
    """``array[z, y, x]`` for each row of ``points``, reading each block once."""
    values = np.zeros(len(points), np.int64)
    if not len(points):
        return values
    cell = points // np.asarray(block_shape)
    order = np.lexsort(cell.T[::-1])
    groups = np.unique(cell[order], axis=0, return_index=True)[1]
    for start, stop in zip(groups, [*groups[1:], len(order)], strict=True):
        rows = order[start:stop]
        origin = cell[rows[0]] * np.asarray(block_shape)
        box = Box.from_shape(block_shape, tuple(int(v) for v in origin)).intersect(
            Box.from_shape(array.shape)
        )
        data = np.asarray(array[box.slices()])
        local = points[rows] - origin
        values[rows] = data[local[:, 0], local[:, 1], local[:, 2]]
    return values


def representative_points(
    table: ObjectTable, labels: Any, block_shape: Sequence[int],
    *, max_workers: int = 1, cancelled: threading.Event | None = None,
) -> np.ndarray:  # fmt: skip
    """One voxel per object of ``table``: its centroid, rounded to the nearest voxel,
    or, when that voxel is not part of the object (a C-shaped object, a hollow
    one), the object's own voxel nearest to the centroid. (n, 3) int64."""
    shape = np.asarray(labels.shape)
    points = np.clip(np.floor(table.centroid + 0.5).astype(np.int64), 0, shape - 1)
    outside = values_at(labels, points, block_shape) != table.labels
    if not outside.any():
        return points
    wanted = table.labels[outside]
    centres = table.centroid[outside]
    plan = block_plan(labels.shape, None, block_shape)

    def nearest(block: Block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        data = np.asarray(labels[block.core.slices()])
        hit = np.isin(data, wanted)
        if not hit.any():
            return np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 3), np.int64)
        coords = np.argwhere(hit) + np.asarray(block.core.start)
        which = np.searchsorted(wanted, data[hit])  # `wanted` is sorted: table order
        dist = ((coords - centres[which]) ** 2).sum(axis=1)
        order = np.lexsort((dist, which))
        first = np.ones(len(order), bool)
        first[1:] = which[order][1:] != which[order][:-1]
        keep = order[first]
        return which[keep], dist[keep], coords[keep]

    best = np.full(len(wanted), np.inf)
    found = np.zeros((len(wanted), 3), np.int64)
    for which, dist, coords in map_blocks(
        nearest, plan, max_workers=max_workers, cancelled=cancelled
    ):
        better = dist < best[which]
        best[which[better]] = dist[better]
        found[which[better]] = coords[better]
    points[outside] = found
    return points


def match_objects(
    predicted: ObjectTable, points: np.ndarray, ground_truth_labels: Any,
    ground_truth_count: int, block_shape: Sequence[int],
) -> ObjectCounts:  # fmt: skip
    """One-to-one matching of predicted objects (at ``points``) into ground-truth labels."""
    hit = values_at(ground_truth_labels, points, block_shape)
    # Larger predictions claim their ground-truth object first; ties by label.
    order = np.lexsort((predicted.labels, -predicted.volume_voxels))
    claimed: set[int] = set()
    for i in order:
        g = int(hit[i])
        if g and g not in claimed:
            claimed.add(g)
    tp = len(claimed)
    return ObjectCounts(tp, len(predicted) - tp, ground_truth_count - tp)
