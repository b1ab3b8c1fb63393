"""Segmentation accuracy: voxel precision, recall, F1 and Jaccard.

As in the CDeep3M paper, an optional exclusion zone ignores voxels within
``k`` voxels of ground-truth object borders, where labels are least certain.
Counts add up, so volumes are scored blockwise and the counts summed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from deep3m.core.errors import InvalidArgumentError


@dataclass(frozen=True)
class ConfusionCounts:
    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0
    true_negatives: int = 0

    def __add__(self, other: ConfusionCounts) -> ConfusionCounts:
        return ConfusionCounts(
            self.true_positives + other.true_positives,
            self.false_positives + other.false_positives,
            self.false_negatives + other.false_negatives,
            self.true_negatives + other.true_negatives,
        )

    @property
    def precision(self) -> float:
        denom = self.true_positives + self.false_positives
        return self.true_positives / denom if denom else 0.0

    @property
    def recall(self) -> float:
        denom = self.true_positives + self.false_negatives
        return self.true_positives / denom if denom else 0.0

    @property
    def f1(self) -> float:
        denom = 2 * self.true_positives + self.false_positives + self.false_negatives
        return 2 * self.true_positives / denom if denom else 0.0

    @property
    def jaccard(self) -> float:
        denom = self.true_positives + self.false_positives + self.false_negatives
        return self.true_positives / denom if denom else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "jaccard": self.jaccard,
            "true_positives": float(self.true_positives),
            "false_positives": float(self.false_positives),
            "false_negatives": float(self.false_negatives),
            "true_negatives": float(self.true_negatives),
        }


def border_zone(ground_truth: np.ndarray, k: int) -> np.ndarray:
    """Voxels within ``k`` voxels (in-plane) of a ground-truth object border."""
    gt = np.asarray(ground_truth, dtype=bool)
    if k <= 0:
        return np.zeros_like(gt)
    structure = np.zeros((1, 3, 3), bool) if gt.ndim == 3 else np.ones((3, 3), bool)
    if gt.ndim == 3:
        structure[0] = ndimage.generate_binary_structure(2, 1)
    grown = ndimage.binary_dilation(gt, structure, iterations=k)
    shrunk = ndimage.binary_erosion(gt, structure, iterations=k, border_value=1)
    return np.asarray(grown & ~shrunk)


def confusion_counts(
    prediction: np.ndarray, ground_truth: np.ndarray, *, exclusion_zone: int = 0
) -> ConfusionCounts:
    """Counts for boolean ``prediction`` vs ``ground_truth`` of the same shape."""
    pred = np.asarray(prediction, dtype=bool)
    gt = np.asarray(ground_truth, dtype=bool)
    if pred.shape != gt.shape:
        raise InvalidArgumentError(
            f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}",
            field="ground_truth",
        )
    if exclusion_zone < 0:
        raise InvalidArgumentError(
            f"exclusion_zone must be >= 0, got {exclusion_zone}", field="exclusion_zone"
        )
    keep = ~border_zone(gt, exclusion_zone) if exclusion_zone else np.ones(gt.shape, bool)
    tp = int(np.count_nonzero(pred & gt & keep))
    fp = int(np.count_nonzero(pred & ~gt & keep))
    fn = int(np.count_nonzero(~pred & gt & keep))
    tn = int(np.count_nonzero(~pred & ~gt & keep))
    return ConfusionCounts(tp, fp, fn, tn)
