"""Multiscale pyramids: level shapes, values and OME-Zarr metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from deep3m.core.errors import InvalidArgumentError
from deep3m.core.geometry import plan_blocks
from deep3m.core.store import Store
from deep3m.postprocess.pyramid import (
    build_pyramid,
    downsample,
    plan_levels,
    prepare_pyramid,
    record_pyramid,
    write_level_block,
)
from deep3m.testing.volumes import write_volume


def test_anisotropic_em_keeps_z_until_in_plane_catches_up() -> None:
    levels = plan_levels((20, 1024, 1024), (40.0, 6.0, 6.0), levels=4)
    assert [lv.shape for lv in levels] == [
        (20, 512, 512), (20, 256, 256), (20, 128, 128), (10, 64, 64),
    ]  # fmt: skip
    assert [lv.scale_nm for lv in levels] == [
        (40.0, 12.0, 12.0), (40.0, 24.0, 24.0), (40.0, 48.0, 48.0), (80.0, 96.0, 96.0),
    ]  # fmt: skip
    assert levels[0].translation_nm == (0.0, 3.0, 3.0)


def test_isotropic_data_shrinks_in_every_axis() -> None:
    levels = plan_levels((64, 64, 64), (8.0, 8.0, 8.0), levels=2)
    assert [lv.shape for lv in levels] == [(32, 32, 32), (16, 16, 16)]
    assert levels[1].factor == (2, 2, 2)


def test_automatic_depth_stops_at_one_chunk_in_plane() -> None:
    assert [lv.shape[1] for lv in plan_levels((4, 1000, 600), (1, 1, 1))] == [500, 250]
    assert plan_levels((4, 200, 200), (1, 1, 1)) == []


@pytest.mark.parametrize("levels", [-1, 17])
def test_level_count_is_checked(levels: int) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        plan_levels((4, 64, 64), (1, 1, 1), levels)
    assert caught.value.field == "levels"


def test_too_many_levels_for_a_small_volume() -> None:
    with pytest.raises(InvalidArgumentError, match="at most 3"):
        plan_levels((1, 8, 8), (1, 1, 1), levels=5)


def test_mean_over_windows_with_ragged_edges() -> None:
    data = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    out = downsample(data, (1, 2, 2), "mean")
    assert out.shape == (2, 2, 3) and out.dtype == np.float32
    assert out[0, 0, 0] == np.mean([0, 1, 5, 6])
    assert out[0, 1, 2] == data[0, 2, 4]  # a corner window holds one voxel
    assert out[1, 0, 2] == np.mean(data[1, 0:2, 4])


def test_integer_images_are_rounded_means() -> None:
    data = np.array([[[0, 1], [1, 1]]], np.uint8)
    assert downsample(data, (1, 2, 2), "mean")[0, 0, 0] == 1


def test_label_mode_keeps_ids_and_prefers_the_majority() -> None:
    data = np.array([[[7, 7, 3, 9], [7, 2, 9, 3]]], np.uint32)
    out = downsample(data, (1, 2, 2), "mode")
    assert out.tolist() == [[[7, 3]]]  # 7 wins 3:1; 3 and 9 tie 2:2, the smaller wins


def _window_by_window(data: np.ndarray, factor: tuple[int, int, int], method: str) -> np.ndarray:
    """The reference: each window's voxels (edge windows hold fewer) reduced one by one."""
    out_shape = tuple(-(-s // k) for s, k in zip(data.shape, factor, strict=True))
    out = np.zeros(out_shape, data.dtype)
    for index in np.ndindex(*out_shape):
        window = data[tuple(slice(i * k, (i + 1) * k) for i, k in zip(index, factor, strict=True))]
        values = window.ravel()
        if method == "mode":
            labels, counts = np.unique(values, return_counts=True)
            out[index] = labels[counts == counts.max()].min()  # unique is sorted: ties → smallest
        else:
            mean = values.astype(np.float64).mean()
            out[index] = np.rint(mean) if np.issubdtype(data.dtype, np.integer) else mean
    return out


@pytest.mark.parametrize("method", ["mode", "mean"])
def test_downsampling_equals_reducing_each_window(method: str) -> None:
    # Shapes that the factors do not divide (ragged edge windows in every axis) and
    # ones they do; few labels, so windows mix labels and tie.
    rng = np.random.default_rng(3)
    for _ in range(60):
        shape = tuple(int(v) for v in rng.integers(1, 8, 3))
        factor = (int(rng.integers(1, 3)), int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        dtype = rng.choice([np.uint8, np.uint32, np.uint64]) if method == "mode" else np.uint8
        data = rng.integers(0, 3 if method == "mode" else 256, shape).astype(dtype)
        got = downsample(data, factor, method)  # type: ignore[arg-type]
        assert got.dtype == data.dtype
        np.testing.assert_array_equal(got, _window_by_window(data, factor, method))


def test_mode_of_uniform_windows_is_their_label() -> None:
    data = np.full((2, 6, 6), 5, np.uint64)
    data[:, :2, :2] = 9  # one whole window of another label: still no vote needed
    out = downsample(data, (1, 2, 2), "mode")
    assert out[:, 0, 0].tolist() == [9, 9]
    assert (out[:, 1:, :] == 5).all() and (out[:, :, 1:] == 5).all()


def test_build_pyramid_writes_levels_and_metadata(tmp_path: Path) -> None:
    store = Store(f"file://{tmp_path}")
    data = np.random.default_rng(0).random((6, 70, 90)).astype(np.float32)
    write_volume(store, "volumes/p.zarr", data, (3, 32, 32), voxel_size_nm=(40.0, 6.0, 6.0))
    arrays = build_pyramid(store, "volumes/p.zarr", levels=2)
    assert arrays == ["0", "1", "2"]
    group = zarr.open_group(store.zarr_store("volumes/p.zarr"), mode="r")
    level1, level2 = group["1"], group["2"]
    assert isinstance(level1, zarr.Array) and isinstance(level2, zarr.Array)
    assert level1.shape == (6, 35, 45) and level2.shape == (6, 18, 23)
    assert level1.chunks == (3, 32, 32) and level1.dtype == np.float32
    np.testing.assert_allclose(level1[:], downsample(data, (1, 2, 2), "mean"), rtol=1e-6)
    datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1", "2"]
    assert datasets[2]["coordinateTransformations"] == [
        {"type": "scale", "scale": [40.0, 24.0, 24.0]},
        {"type": "translation", "translation": [0.0, 9.0, 9.0]},
    ]
    assert store.volume_info("volumes/p.zarr", "2").voxel_size_nm == (40.0, 24.0, 24.0)


def test_labels_pyramid_uses_mode_and_reruns_are_identical(tmp_path: Path) -> None:
    store = Store(f"file://{tmp_path}")
    labels = np.random.default_rng(1).integers(0, 4, (4, 32, 32)).astype(np.uint32) * 1000
    write_volume(
        store, "volumes/l.zarr", labels, (4, 16, 16), voxel_size_nm=(8.0, 8.0, 8.0), kind="labels"
    )
    build_pyramid(store, "volumes/l.zarr", levels=2)
    level1 = store.open_volume("volumes/l.zarr", "1")[:]
    assert level1.shape == (2, 16, 16)
    assert set(np.unique(level1)) <= {0, 1000, 2000, 3000}  # no averaged ids
    np.testing.assert_array_equal(level1, downsample(labels, (2, 2, 2), "mode"))
    before = {k: store.read_bytes(k) for k in store.walk_files("volumes/l.zarr")}
    build_pyramid(store, "volumes/l.zarr", levels=2)
    after = {k: store.read_bytes(k) for k in store.walk_files("volumes/l.zarr")}
    assert before == after
    # A shallower rebuild drops the deeper level and its metadata.
    assert build_pyramid(store, "volumes/l.zarr", levels=1) == ["0", "1"]
    group = zarr.open_group(store.zarr_store("volumes/l.zarr"), mode="r")
    assert sorted(group.array_keys()) == ["0", "1"]
    assert len(group.attrs["ome"]["multiscales"][0]["datasets"]) == 2


def test_pyramid_as_per_block_tasks_equals_build_pyramid(tmp_path: Path) -> None:
    """Prepare, every level's blocks in any order (some twice, as retried tasks), record."""
    data = np.random.default_rng(3).random((6, 70, 90)).astype(np.float32)
    whole, tasks = Store(f"file://{tmp_path / 'a'}"), Store(f"file://{tmp_path / 'b'}")
    for store in (whole, tasks):
        write_volume(store, "volumes/p.zarr", data, (3, 32, 32), voxel_size_nm=(40.0, 6.0, 6.0))
    want = build_pyramid(whole, "volumes/p.zarr", 2)
    plan = prepare_pyramid(tasks, "volumes/p.zarr", 2)
    source = tasks.open_volume("volumes/p.zarr")
    rng = np.random.default_rng(0)
    for level in plan.levels:
        target = tasks.open_volume("volumes/p.zarr", level.path, mode="r+", require_complete=False)
        blocks = list(plan_blocks(target.shape, target.chunks))
        order = [blocks[i] for i in rng.permutation(len(blocks))] + blocks[:2]
        for block in order:
            write_level_block(source, target, block.core, level.factor, plan.method)
        source = target
    assert record_pyramid(tasks, plan) == want
    for path in want:
        np.testing.assert_array_equal(
            tasks.open_volume("volumes/p.zarr", path)[...],
            whole.open_volume("volumes/p.zarr", path)[...],
        )
    group = lambda s: zarr.open_group(s.zarr_store("volumes/p.zarr"), mode="r").attrs["ome"]  # noqa: E731
    assert group(tasks) == group(whole)
