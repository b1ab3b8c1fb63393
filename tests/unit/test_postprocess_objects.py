"""Object tables computed blockwise equal a direct whole-volume computation."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import zarr
from deep3m.core.store import Store
from deep3m.postprocess.objects import (
    block_stats,
    object_table,
    reduce_stats,
    table_keys,
    write_object_table,
)
from scipy import ndimage


def random_labels(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    field = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 1.5)
    labels, _ = ndimage.label(field > np.quantile(field, 0.7))
    # Non-consecutive ids, as a label volume may carry.
    return np.where(labels > 0, labels * 7 + 3, 0).astype(np.uint32)


def test_table_matches_direct_computation() -> None:
    labels = random_labels((14, 30, 26), seed=1)
    arr = zarr.create_array(
        zarr.storage.MemoryStore(), shape=labels.shape, chunks=(4, 8, 8), dtype="uint32"
    )
    arr[:] = labels
    voxel = (40.0, 6.0, 5.0)
    table = object_table(arr, voxel)
    ids = np.unique(labels[labels > 0])
    assert len(ids) > 5
    np.testing.assert_array_equal(table.labels, ids)
    np.testing.assert_array_equal(table.volume_voxels, ndimage.sum_labels(labels > 0, labels, ids))
    np.testing.assert_allclose(table.centroid, ndimage.center_of_mass(labels > 0, labels, ids))
    boxes = ndimage.find_objects(labels)
    for i, label in enumerate(ids):
        box = boxes[label - 1]
        assert box is not None
        assert list(table.bbox_start[i]) == [s.start for s in box]
        assert list(table.bbox_stop[i]) == [s.stop for s in box]
    np.testing.assert_allclose(table.volume_nm3, table.volume_voxels * 40 * 6 * 5)
    np.testing.assert_allclose(table.centroid_nm, table.centroid * np.array(voxel))


def test_blocks_sum_to_the_whole() -> None:
    labels = random_labels((8, 20, 20), seed=2)
    whole = block_stats(labels, (0, 0, 0))
    halves = [block_stats(labels[:, :, :10], (0, 0, 0)), block_stats(labels[:, :, 10:], (0, 0, 10))]
    a, b = reduce_stats([whole], (1, 1, 1)), reduce_stats(halves, (1, 1, 1))
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.volume_voxels, b.volume_voxels)
    np.testing.assert_allclose(a.centroid, b.centroid)
    np.testing.assert_array_equal(a.bbox_start, b.bbox_start)
    np.testing.assert_array_equal(a.bbox_stop, b.bbox_stop)


def test_empty_volume_gives_an_empty_table() -> None:
    table = object_table(np.zeros((4, 8, 8), np.uint32), (1, 1, 1), block_shape=(2, 4, 4))
    assert len(table) == 0 and table.to_json()["objects"] == []
    assert table.to_csv().count("\n") == 1  # the header only


def test_tables_sit_next_to_the_volume_outside_the_zarr_tree() -> None:
    assert table_keys("volumes/p.zarr/labels/mito") == (
        "volumes/p.mito.objects.csv", "volumes/p.mito.objects.json",
    )  # fmt: skip
    assert table_keys("volumes/l.zarr") == ("volumes/l.objects.csv", "volumes/l.objects.json")


def test_csv_and_json_written_to_the_store(tmp_path: Path) -> None:
    labels = np.zeros((4, 10, 10), np.uint32)
    labels[1:3, 2:5, 2:4] = 5
    labels[0, 9, 9] = 9
    store = Store(f"file://{tmp_path}")
    table = object_table(labels, (10.0, 2.0, 2.0), block_shape=(2, 5, 5))
    keys = write_object_table(store, "volumes/v.zarr/labels/seg", table)
    assert keys == ["volumes/v.seg.objects.csv", "volumes/v.seg.objects.json"]
    rows = list(csv.DictReader(io.StringIO(store.read_bytes(keys[0]).decode())))
    assert [int(r["label"]) for r in rows] == [5, 9]
    first = rows[0]
    assert int(first["volume_voxels"]) == 12
    assert float(first["volume_nm3"]) == 12 * 40.0
    assert float(first["centroid_y"]) == 3.0 and float(first["centroid_x"]) == 2.5
    assert float(first["centroid_z_nm"]) == 15.0
    bbox = [
        int(first[k]) for k in ("bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1")
    ]
    assert bbox == [1, 2, 2, 3, 5, 4]
    doc = json.loads(store.read_bytes(keys[1]))
    assert doc["object_count"] == 2 and doc["voxel_size_nm"] == [10.0, 2.0, 2.0]
    assert doc["objects"][1] == {**doc["objects"][1], "label": 9, "volume_voxels": 1}
