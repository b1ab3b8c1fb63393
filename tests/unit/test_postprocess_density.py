"""Counts per region, density profiles and size histograms of an object table."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from deep3m.core.errors import InvalidArgumentError
from deep3m.core.geometry import Box
from deep3m.core.store import Store
from deep3m.postprocess.labels import LabelSpec
from deep3m.postprocess.sharded.density import (
    counts_in_boxes,
    counts_in_mask,
    density_profile,
    region_counts_csv,
    size_histogram,
    write_density_outputs,
)
from deep3m.postprocess.sharded.pipeline import label_sharded
from deep3m.postprocess.sharded.table import ObjectStats
from deep3m.testing.volumes import memory_array
from PIL import Image

VOXEL = (50.0, 10.0, 10.0)  # nm: a voxel is 5000 nm³


def cubes(
    shape: tuple[int, int, int], corners: list[tuple[int, int, int]], size: int = 2
) -> np.ndarray:
    volume = np.zeros(shape, np.uint8)
    for z, y, x in corners:
        volume[z : z + size, y : y + size, x : x + size] = 1
    return volume


def table_of(volume: np.ndarray) -> ObjectStats:
    target = memory_array(volume, (4, 16, 16), dtype="uint32")
    return label_sharded(volume, target, LabelSpec(), voxel_size_nm=VOXEL).objects


def test_counts_in_boxes_and_in_a_region_volume() -> None:
    # Centroids at (z+0.5, y+0.5, x+0.5): two in the left half, three in the right.
    corners = [(0, 2, 2), (4, 10, 10), (0, 2, 40), (4, 20, 50), (6, 28, 60)]
    table = table_of(cubes((8, 32, 64), corners))
    assert len(table) == 5
    left, right = Box((0, 0, 0), (8, 32, 32)), Box((0, 0, 32), (8, 32, 64))
    counts = counts_in_boxes(table, {"left": left, "right": right})
    assert [(c.region, c.objects) for c in counts] == [("left", 2), ("right", 3)]
    voxel_mm3 = 50 * 10 * 10 / 1e18
    assert counts[0].volume_mm3 == pytest.approx(8 * 32 * 32 * voxel_mm3)
    assert counts[1].density_per_mm3 == pytest.approx(3 / (8 * 32 * 32 * voxel_mm3))
    regions = np.zeros((8, 32, 64), np.uint16)
    regions[:, :, :32] = 1
    regions[:, :16, 32:] = 2  # holds one centroid, (0.5, 2.5, 40.5)
    by_mask = counts_in_mask(table, memory_array(regions, (4, 8, 8)))
    assert [(c.region, c.objects) for c in by_mask] == [("1", 2), ("2", 1)]
    assert by_mask[1].volume_mm3 == pytest.approx(8 * 16 * 32 * voxel_mm3)
    lines = region_counts_csv(by_mask).splitlines()
    assert lines[0] == "region,objects,volume_mm3,density_per_mm3" and len(lines) == 3
    with pytest.raises(InvalidArgumentError) as caught:
        counts_in_mask(table, regions.astype(np.float32))
    assert caught.value.field == "regions"


def test_density_profile_counts_centroids_per_window() -> None:
    # Along x: objects at x = 2.5, 10.5, 40.5, 50.5, 60.5 voxels (25 ... 605 nm).
    corners = [(0, 2, 2), (4, 10, 10), (0, 2, 40), (4, 20, 50), (6, 28, 60)]
    table = table_of(cubes((8, 32, 64), corners))
    box = Box.from_shape((8, 32, 64))
    profile = density_profile(table, box, window_um=0.32, step_um=0.16)
    pos, density = profile.along("x")
    np.testing.assert_allclose(pos, [0.16, 0.32, 0.48])  # windows [0,320), [160,480), [320,640)
    window_mm3 = 320 * (8 * 50) * (32 * 10) / 1e18
    np.testing.assert_allclose(density * window_mm3, [2, 1, 3])
    assert profile.objects[profile.axis == "x"].tolist() == [2, 1, 3]
    zpos, _ = profile.along("z")
    assert len(zpos) == 1 + int((400 - 320) / 160)  # 400 nm deep: one full window only
    rows = profile.to_csv().splitlines()
    assert rows[0] == "axis,position_um,objects,window_volume_mm3,density_per_mm3"
    assert len(rows) == len(profile.axis) + 1
    wide = density_profile(table, box, window_um=5.0)  # wider than the box: one window
    assert wide.objects.tolist() == [5, 5, 5]
    np.testing.assert_allclose(wide.volume_mm3, box.size * 5000 / 1e18)
    with pytest.raises(InvalidArgumentError) as caught:
        density_profile(table, box, window_um=0.0)
    assert caught.value.field == "window_um"


def test_size_histogram_bins_every_object() -> None:
    volume = cubes((8, 32, 64), [(0, 2, 2), (0, 2, 20)], size=2)
    volume[2:6, 10:14, 30:34] = 1  # 64 voxels
    hist = size_histogram(table_of(volume), bins=4)
    assert hist.counts.sum() == 3 and hist.counts[0] == 2 and hist.counts[-1] == 1
    assert hist.edges_um3[0] == pytest.approx(8 * 5000 / 1e9)
    assert hist.edges_um3[-1] == pytest.approx(64 * 5000 / 1e9)


def test_density_outputs_are_tables_and_pngs(tmp_path: Path) -> None:
    store = Store(f"file://{tmp_path}")
    table = table_of(cubes((8, 32, 64), [(0, 2, 2), (4, 10, 10), (0, 2, 40)]))
    keys = write_density_outputs(
        store, "volumes/p.zarr/labels/seg", table, Box.from_shape((8, 32, 64)), window_um=0.3
    )
    assert keys["density_png"] == "volumes/p.seg.density.png"
    for key in ("density_png", "sizes_png"):
        image = Image.open(io.BytesIO(store.read_bytes(keys[key])))
        assert image.format == "PNG" and image.size[0] >= 400
    assert store.read_bytes(keys["sizes_csv"]).decode().startswith("volume_from_um3,")
    assert store.read_bytes(keys["density_csv"]).decode().count("\nx,") >= 1
