"""Blockwise evaluation equals a whole-volume computation; object matching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from deep3m.core.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from deep3m.core.metrics import border_zone, confusion_counts
from deep3m.core.store import Store
from deep3m.postprocess.evaluate import (
    EvaluateSpec,
    Operand,
    evaluate_arrays,
    evaluate_volumes,
    voxel_counts,
)
from deep3m.postprocess.labels import LabelSpec, label_array
from deep3m.testing.volumes import memory_array, smooth_field
from PIL import Image
from scipy import ndimage


def blobs(shape: tuple[int, int, int], seed: int, keep: float = 0.75) -> np.ndarray:
    field = smooth_field(shape, seed)
    return np.asarray(field > np.quantile(field, keep))


@pytest.mark.parametrize("zone", [0, 1, 3])
def test_blockwise_counts_equal_whole_volume(zone: int) -> None:
    gt = blobs((8, 40, 44), seed=1)
    # Shifted further than the zone is wide, so errors remain inside objects too.
    prob = np.roll(gt, 5, axis=2).astype(np.float32) * 0.8 + 0.1
    got = voxel_counts(
        Operand(memory_array(prob, (4, 8, 8)), "probability"),
        Operand(memory_array(gt.astype(np.uint8), (4, 8, 8)), "labels"),
        threshold=0.5,
        exclusion_zone=zone,
    )
    want = confusion_counts(prob >= 0.5, gt, exclusion_zone=zone)
    assert got == want
    assert want.true_positives > 0 and want.false_positives > 0 and want.false_negatives > 0


def test_exclusion_zone_removes_border_voxels() -> None:
    gt = np.zeros((2, 20, 20), bool)
    gt[:, 5:15, 5:15] = True
    pred = ndimage.binary_dilation(gt, np.ones((1, 3, 3), bool))  # wrong only at the border
    gt_arr, pred_arr = (
        memory_array(gt.astype(np.uint8), (1, 8, 8)),
        memory_array(pred.astype(np.uint8), (1, 8, 8)),
    )
    plain = voxel_counts(Operand(pred_arr, "labels"), Operand(gt_arr, "labels"), threshold=0.5)
    zoned = voxel_counts(
        Operand(pred_arr, "labels"), Operand(gt_arr, "labels"), threshold=0.5, exclusion_zone=2
    )
    assert plain.false_positives == int((pred & ~gt).sum()) > 0
    assert zoned.false_positives == 0 and zoned.precision == 1.0
    excluded = int(border_zone(gt, 2).sum())
    total = lambda c: c.true_positives + c.false_positives + c.false_negatives + c.true_negatives  # noqa: E731
    assert total(plain) == gt.size and total(zoned) == gt.size - excluded


def cube(labels: np.ndarray, label: int, z: int, y: int, x: int, size: int = 4) -> None:
    labels[z : z + size, y : y + size, x : x + size] = label


def test_object_matching_is_one_to_one_by_centroid() -> None:
    gt = np.zeros((8, 40, 40), np.uint8)
    cube(gt, 1, 0, 2, 2)
    cube(gt, 1, 0, 20, 2)
    gt[0:4, 20:24, 10:30] = 1  # a long bar
    cube(gt, 1, 4, 30, 30)  # missed entirely
    pred = np.zeros_like(gt)
    cube(pred, 1, 0, 3, 3, size=3)  # matches the first cube
    cube(pred, 1, 0, 20, 2)  # matches the second cube
    pred[0:4, 20:24, 12:18] = 1  # two pieces of the bar: the first matches,
    pred[0:4, 20:24, 21:24] = 1  # the second (smaller) falls into a matched object
    cube(pred, 1, 4, 2, 30)  # in the background
    result = evaluate_arrays(
        Operand(memory_array(pred, (4, 16, 16)), "labels"),
        Operand(memory_array(gt, (4, 16, 16)), "labels"),
        EvaluateSpec(),
    )
    objects = result.objects
    assert objects is not None
    assert (objects.true_positives, objects.false_positives, objects.false_negatives) == (3, 2, 1)
    assert objects.predicted == 5 and objects.ground_truth == 4
    assert objects.f1 == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert result.voxels == confusion_counts(pred > 0, gt > 0)


@pytest.mark.parametrize("declared", [False, True])
def test_min_size_drops_small_predicted_objects_as_label_does(declared: bool) -> None:
    gt = np.zeros((8, 40, 40), np.uint8)
    cube(gt, 1, 0, 2, 2, size=6)
    cube(gt, 1, 0, 20, 20, size=6)
    pred = np.zeros((8, 40, 40), np.uint16)
    cube(pred, 1, 0, 2, 2, size=6)  # 216 voxels, matches
    cube(pred, 2, 0, 20, 20, size=5)  # 125 voxels, matches
    for n, (y, x) in enumerate([(2, 30), (30, 2), (30, 30), (12, 12)], start=3):
        cube(pred, n, 5, y, x, size=2)  # 8-voxel specks in the background
    side = Operand(memory_array(pred, (4, 16, 16)), "labels", declared_labels=declared)
    truth = Operand(memory_array(gt, (4, 16, 16)), "labels")

    def counts(min_size: int) -> tuple[int, int, int]:
        o = evaluate_arrays(side, truth, EvaluateSpec(min_size_voxels=min_size)).objects
        assert o is not None
        return o.true_positives, o.false_positives, o.false_negatives

    assert counts(0) == (2, 4, 0)
    assert counts(9) == (2, 0, 0)
    assert counts(126) == (1, 0, 1)  # the 125-voxel object is dropped too
    # label with the same filter keeps exactly the objects evaluation counts.
    out = np.zeros(pred.shape, np.uint32)
    kept = label_array(pred, out, LabelSpec(min_size_voxels=9)).object_count
    assert kept == sum(counts(9)[:2])


def test_declared_label_volumes_keep_their_ids() -> None:
    # Two touching ground-truth objects are one component but two declared labels.
    gt = np.zeros((2, 10, 20), np.uint16)
    gt[:, 2:8, 2:10] = 5
    gt[:, 2:8, 10:18] = 6
    pred = (gt > 0).astype(np.uint8)
    declared = evaluate_arrays(
        Operand(pred, "labels"), Operand(gt, "labels", declared_labels=True), EvaluateSpec()
    )
    merged = evaluate_arrays(Operand(pred, "labels"), Operand(gt, "labels"), EvaluateSpec())
    assert declared.objects is not None and merged.objects is not None
    assert (declared.objects.true_positives, declared.objects.false_negatives) == (1, 1)
    assert (merged.objects.true_positives, merged.objects.false_negatives) == (1, 0)


def test_shape_mismatch_names_the_ground_truth() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        evaluate_arrays(
            Operand(np.zeros((2, 4, 4)), "probability"),
            Operand(np.zeros((2, 4, 5), np.uint8), "labels"),
            EvaluateSpec(),
        )
    assert caught.value.field == "ground_truth"
    assert "(2, 4, 4)" in caught.value.message and "(2, 4, 5)" in caught.value.message


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"threshold": 1.2}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"exclusion_zone_voxels": -1}, "exclusion_zone_voxels"),
        ({"min_size_voxels": -1}, "min_size_voxels"),
    ],
)
def test_spec_validation(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        EvaluateSpec(**kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_stored_volumes_and_their_errors(tmp_path: Path) -> None:
    store = Store(f"file://{tmp_path}")
    gt = blobs((4, 16, 16), seed=3).astype(np.uint8)
    for path, data in (("volumes/gt.zarr", gt), ("volumes/p.zarr", gt.astype(np.float32))):
        store.create_volume(path, data.shape, data.dtype, chunk_shape=(2, 8, 8))[:] = data
        store.mark_complete(path)
    result = evaluate_volumes(
        (store, "volumes/p.zarr"), (store, "volumes/gt.zarr"), EvaluateSpec(exclusion_zone_voxels=1)
    )
    assert result.voxels.f1 == 1.0 and result.objects is not None and result.objects.f1 == 1.0
    with pytest.raises(NotFoundError) as missing:
        evaluate_volumes((store, "volumes/p.zarr"), (store, "volumes/none.zarr"), EvaluateSpec())
    assert missing.value.field == "ground_truth"
    store.create_volume("volumes/half.zarr", (4, 16, 16), "float32")
    with pytest.raises(FailedPreconditionError) as incomplete:
        evaluate_volumes((store, "volumes/half.zarr"), (store, "volumes/gt.zarr"), EvaluateSpec())
    assert incomplete.value.field == "prediction"


@pytest.mark.data
def test_real_validation_labels_against_a_degraded_copy(data_dir: Path) -> None:
    folder = data_dir / "cdeep3m-mito" / "validation" / "labels"
    gt = np.stack([np.asarray(Image.open(p))[:256, :256] for p in sorted(folder.glob("*.png"))])
    assert gt.shape == (10, 256, 256)
    # A plausible prediction: eroded objects, plus a little noise.
    pred = ndimage.binary_erosion(gt > 0, np.ones((1, 3, 3), bool)).astype(np.float32)
    pred += 0.6 * (np.random.default_rng(0).random(gt.shape) > 0.999)
    got = evaluate_arrays(
        Operand(memory_array(pred, (5, 64, 64)), "probability"),
        Operand(memory_array(gt, (5, 64, 64)), "labels"),
        EvaluateSpec(exclusion_zone_voxels=2),
    )
    assert got.voxels == confusion_counts(pred >= 0.5, gt > 0, exclusion_zone=2)
    assert 0.5 < got.voxels.recall < 1.0 and got.voxels.precision > 0.95
    assert got.objects is not None and got.objects.true_positives > 0


def test_a_c_shaped_object_matches_itself() -> None:
    c_shape = np.zeros((2, 20, 20), np.uint8)
    c_shape[:, 2:18, 2:6] = 1
    c_shape[:, 2:6, 2:18] = 1
    c_shape[:, 14:18, 2:18] = 1
    centre = np.round(ndimage.center_of_mass(c_shape)).astype(int)
    assert c_shape[tuple(centre)] == 0  # the centroid lies outside the object
    got = evaluate_arrays(
        Operand(memory_array(c_shape, (2, 8, 8)), "labels"),
        Operand(memory_array(c_shape, (2, 8, 8)), "labels"),
        EvaluateSpec(),
    )
    assert got.objects is not None
    assert (got.objects.true_positives, got.objects.false_positives) == (1, 0)
