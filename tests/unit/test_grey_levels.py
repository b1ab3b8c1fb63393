"""Grey levels recorded by the writers of image volumes (deep3m.core.grey_levels): the
counts each writer keeps as it writes, and what readers make of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from deep3m.adaptation.histogram import pooled_reference, reference_histogram
from deep3m.core.errors import InvalidArgumentError
from deep3m.core.grey_levels import ATTRIBUTE, GreyLevels, recorded_levels, uint8_counts
from deep3m.core.ingest import (
    create_ingest_volume,
    finalize_ingest,
    gather_levels,
    ingest,
    ingest_range,
    plan_ingest,
)
from deep3m.core.store import Store
from deep3m.training.demo_data import write_volume
from PIL import Image

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
VOXEL = (40.0, 6.0, 6.0)


def file_store(tmp_path: Path) -> Store:
    return Store(f"file://{tmp_path / 'store'}")


def pages(folder: Path, data: np.ndarray) -> str:
    folder.mkdir(parents=True)
    for i, page in enumerate(data):
        Image.fromarray(page).save(folder / f"p{i:02d}.png")
    return str(folder)


def test_slab_counts_add_up_to_the_whole_volume() -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(0, 200, size=(9, 12, 10), dtype=np.uint8)
    whole = GreyLevels.of(data)
    parts = GreyLevels.total(GreyLevels.of(data[z : z + 4]) for z in range(0, 9, 4))
    assert parts == whole
    assert whole.counts == tuple(int(c) for c in np.bincount(data.ravel(), minlength=256))
    assert (whole.voxels, whole.min, whole.max) == (data.size, data.min(), data.max())
    assert whole.any_nonzero
    assert GreyLevels.from_json(whole.to_json()) == whole


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (2, 1100, 1001)])
def test_byte_pair_counting_equals_counting_bytes(shape: tuple[int, int, int]) -> None:
    data = np.random.default_rng(4).integers(0, 256, size=shape, dtype=np.uint8)
    for view in (data, data[:, ::2, 1:]):  # odd sizes, pieces, a strided view
        np.testing.assert_array_equal(uint8_counts(view), np.bincount(view.ravel(), minlength=256))


def test_zero_volumes_and_other_dtypes() -> None:
    zeros = GreyLevels.total([GreyLevels.of(np.zeros((2, 4, 4), np.uint8))] * 3)
    assert not zeros.any_nonzero and zeros.counts is not None and zeros.counts[0] == 96
    # Without a histogram (not 8-bit), min and max tell zeros apart.
    wide = GreyLevels.of(np.array([[[0, 700]]], np.uint16))
    assert wide.counts is None and wide.max == 700 and wide.any_nonzero
    assert not GreyLevels.of(np.zeros((1, 2, 2), np.float32)).any_nonzero
    floats = GreyLevels.of(np.array([[[np.nan, -2.5, np.inf, 4.0]]], np.float32))
    assert (floats.min, floats.max, floats.voxels) == (-2.5, 4.0, 4)
    nothing = GreyLevels.of(np.full((1, 1, 2), np.nan, np.float32))
    assert nothing.min is None and not nothing.any_nonzero
    mixed = GreyLevels.total([GreyLevels.of(np.zeros((1, 1, 1), np.uint8)), wide])
    assert mixed.counts is None and mixed.max == 700


def test_malformed_records_are_refused_and_only_the_full_resolution_has_them() -> None:
    good = GreyLevels.of(np.arange(10, dtype=np.uint8).reshape(1, 2, 5)).to_json()
    assert recorded_levels({ATTRIBUTE: good}) == recorded_levels({ATTRIBUTE: good}, "0")
    assert recorded_levels({ATTRIBUTE: good}, "1") is None  # a pyramid level: not counted
    assert recorded_levels({}) is None
    for bad in ({**good, "counts": good["counts"][:10]}, {**good, "voxels": 11}, "x", {}):
        with pytest.raises(InvalidArgumentError) as err:
            recorded_levels({ATTRIBUTE: bad})
        assert err.value.field == ATTRIBUTE


def test_ingest_records_the_histogram_of_what_it_wrote(tmp_path: Path) -> None:
    store = file_store(tmp_path)
    data = np.random.default_rng(5).integers(0, 256, size=(10, 20, 18), dtype=np.uint8)
    data[:3] = 0  # padding sections count as zeros
    ingest(pages(tmp_path / "p", data), store, "volumes/v.zarr", voxel_size_nm=VOXEL,
           chunk_shape=(4, 16, 16), workers=2)  # fmt: skip
    info = store.volume_info("volumes/v.zarr")
    assert recorded_levels(info.attributes) == GreyLevels.of(data)


def test_ingest_tasks_leave_counts_that_finalize_adds_up(tmp_path: Path) -> None:
    store = file_store(tmp_path)
    data = np.random.default_rng(6).integers(0, 9, size=(7, 16, 16), dtype=np.uint8)
    source = pages(tmp_path / "p", data)
    plan = plan_ingest(source, voxel_size_nm=VOXEL, chunk_shape=(2, 16, 16))
    create_ingest_volume(store, "volumes/t.zarr", plan)
    docs = (store, "jobs/j/ingest/grey_levels")
    first, *rest = plan.z_ranges
    ingest_range(source, store, "volumes/t.zarr", *first, documents=docs)
    # A range that left no counts (an older writer): nothing is recorded, not a wrong sum.
    ingest_range(source, store, "volumes/t.zarr", *rest[0])
    for z_range in rest[1:]:
        ingest_range(source, store, "volumes/t.zarr", *z_range, documents=docs)
    assert gather_levels(docs, 7, 2, 0) is None
    info = finalize_ingest(store, "volumes/t.zarr", levels=None)
    assert info.complete and recorded_levels(info.attributes) is None
    ingest_range(source, store, "volumes/t.zarr", *rest[0], documents=docs)
    levels = gather_levels(docs, 7, 2, 0)
    assert levels == GreyLevels.of(data)
    info = finalize_ingest(store, "volumes/t.zarr", levels=levels)
    assert recorded_levels(info.attributes) == GreyLevels.of(data)


def test_demo_volumes_record_their_grey_levels(tmp_path: Path) -> None:
    store = file_store(tmp_path)
    data = np.zeros((2, 8, 8), np.uint8)
    write_volume(store, "volumes/zeros.zarr", data)
    levels = recorded_levels(store.volume_info("volumes/zeros.zarr").attributes)
    assert levels is not None and not levels.any_nonzero and levels.voxels == 128


@pytest.mark.skipif(not (DATA / "isbi2012").is_dir(), reason="needs ../shared/data/isbi2012")
def test_recorded_histogram_pools_as_the_images_do_on_real_em(tmp_path: Path) -> None:
    store = file_store(tmp_path)
    ingest(str(DATA / "isbi2012" / "test" / "images"), store, "volumes/isbi.zarr",
           voxel_size_nm=(50.0, 4.0, 4.0), chunk_shape=(8, 256, 256), workers=2)  # fmt: skip
    info = store.volume_info("volumes/isbi.zarr")
    levels = recorded_levels(info.attributes)
    assert levels is not None and levels.counts is not None
    images = np.asarray(store.open_volume("volumes/isbi.zarr")[:])
    assert images.shape == (30, 512, 512)
    # Exactly what the adaptation pools from the images read whole.
    assert pooled_reference(levels.counts, info.shape[0]) == reference_histogram(images)
