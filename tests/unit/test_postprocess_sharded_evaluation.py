"""Sharded evaluation (per-block parts, one reduction) against ``evaluate_arrays``."""

from __future__ import annotations

import numpy as np
import pytest
from deep3m.core.geometry import plan_blocks
from deep3m.postprocess.evaluate import EvaluateSpec, Operand, evaluate_arrays
from deep3m.postprocess.sharded.evaluation import (
    BlockEvaluation,
    ObjectPoints,
    evaluate_block,
    reduce_evaluation,
)
from deep3m.testing.volumes import smooth_field
from scipy import ndimage


def sharded(
    prob: np.ndarray, truth: np.ndarray, spec: EvaluateSpec, block: tuple[int, int, int],
    *, declared: bool,
) -> dict[str, float]:  # fmt: skip
    """Every block's part through its document bytes, then the reduction."""
    labels, _ = ndimage.label(prob >= spec.threshold)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    kept = np.flatnonzero(sizes >= max(spec.min_size_voxels, 1))
    labels = np.where(np.isin(labels, kept), np.searchsorted(kept, labels) + 1, 0)
    ids = np.arange(1, len(kept) + 1)
    centroid = np.asarray(ndimage.center_of_mass(np.ones_like(labels), labels, ids)).reshape(-1, 3)
    objects = ObjectPoints.of(ids, sizes[kept], centroid, prob.shape)
    truth_ids = truth if declared else ndimage.label(truth > 0)[0]
    gt = Operand(truth, "labels", declared_labels=declared)
    parts = [
        BlockEvaluation.from_bytes(
            evaluate_block(
                Operand(prob, "probability"), gt, labels, b.core, objects,
                lambda core: truth_ids[core.slices()],
                threshold=spec.threshold, exclusion_zone=spec.exclusion_zone_voxels,
            ).to_bytes()
        )
        for b in plan_blocks(prob.shape, block, (0, 0, 0))
    ]  # fmt: skip
    count = None if declared else int(truth_ids.max())
    return reduce_evaluation(parts, objects, count).as_dict()


@pytest.mark.parametrize(
    ("zone", "min_size", "declared"), [(0, 0, False), (1, 30, False), (2, 0, True)]
)
def test_sharded_evaluation_equals_the_whole_volume_reference(
    zone: int, min_size: int, declared: bool
) -> None:
    prob = smooth_field((6, 48, 64), seed=11)
    # Ground truth: the stronger predicted objects, and a few the prediction misses.
    other = smooth_field((6, 48, 64), seed=12)
    truth = ndimage.label((prob > 0.62) | (other > 0.8))[0].astype(np.uint32)
    if declared:
        truth = truth * 7  # ids that are not 1..n
    spec = EvaluateSpec(threshold=0.5, exclusion_zone_voxels=zone, min_size_voxels=min_size)
    attrs = {"kind": "labels"} if declared else {}
    want = evaluate_arrays(Operand(prob, "probability"), Operand.of(truth, attrs), spec).as_dict()
    got = sharded(prob, truth, spec, (3, 16, 16), declared=declared)
    assert got == pytest.approx(want, abs=1e-12)
    assert want["object_true_positives"] > 0 and want["object_false_negatives"] > 0


def test_a_c_shaped_object_across_blocks_matches_at_its_own_voxel() -> None:
    # A ring whose centroid (the hole) is background: its own voxel nearest the
    # centroid stands in, found in whichever block holds it.
    yy, xx = np.mgrid[:32, :32]
    r = np.hypot(yy - 15.5, xx - 15.5)
    ring = np.repeat(((r > 8) & (r < 12))[None], 2, axis=0)
    prob = np.where(ring, 0.9, 0.1).astype(np.float32)
    truth = ring.astype(np.uint8)
    spec = EvaluateSpec()
    want = evaluate_arrays(Operand(prob, "probability"), Operand(truth, "labels"), spec)
    assert want.objects is not None and want.objects.true_positives == 1
    got = sharded(prob, truth, spec, (2, 16, 16), declared=False)
    assert got == pytest.approx(want.as_dict(), abs=1e-12)
