"""Blockwise connected components with global relabelling, watershed, min-size."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from deep3m.core.errors import AlreadyExistsError, CancelledError, InvalidArgumentError
from deep3m.core.store import Store
from deep3m.postprocess.label_image import labels_path_for
from deep3m.postprocess.labels import LabelSpec, label_array, label_volume
from deep3m.testing.volumes import memory_array, same_partition, smooth_field, write_volume
from PIL import Image
from scipy import ndimage


def zarr_pair(shape: tuple[int, ...], chunks: tuple[int, ...], data: np.ndarray,
              dtype: str = "uint32") -> tuple[zarr.Array, zarr.Array]:  # fmt: skip
    assert data.shape == shape
    return memory_array(data, chunks), memory_array(data, chunks, dtype=dtype)


@pytest.mark.parametrize("connectivity", [1, 2, 3])
@pytest.mark.parametrize(("shape", "chunks"), [((16, 30, 37), (4, 8, 8)), ((9, 16, 16), (3, 5, 7))])
def test_blockwise_equals_whole_volume_label(
    connectivity: int, shape: tuple[int, int, int], chunks: tuple[int, int, int]
) -> None:
    prob = smooth_field(shape, seed=connectivity, sigma=1.2)
    threshold = float(np.quantile(prob, 0.8))  # about a fifth of the voxels: many objects
    src, dst = zarr_pair(shape, chunks, prob)
    result = label_array(src, dst, LabelSpec(threshold=threshold, connectivity=connectivity))
    structure = ndimage.generate_binary_structure(3, connectivity)
    want, n = ndimage.label(prob >= threshold, structure=structure)
    got = dst[:]
    assert result.object_count == n
    assert n >= 3  # the volume really holds several objects
    assert result.pieces > n  # ... cut into pieces by the blocks, then joined
    assert same_partition(got, want)
    assert set(np.unique(got)) == set(range(n + 1))  # consecutive ids


def test_objects_crossing_block_corners() -> None:
    # Blocks of 4³; a diagonal staircase crosses block corners, touching only by corners.
    shape = (16, 16, 16)
    mask = np.zeros(shape, bool)
    for i in range(16):
        mask[i, i, i] = True
    mask[3, 3, 12] = mask[4, 4, 11] = True  # a 2-voxel object across a block corner
    # A large blob spanning several blocks in every axis.
    z, y, x = np.indices(shape)
    mask |= (z - 11) ** 2 + (y - 4) ** 2 + (x - 11) ** 2 <= 9
    for connectivity in (1, 3):
        src, dst = zarr_pair(shape, (4, 4, 4), mask.astype(np.uint8))
        result = label_array(src, dst, LabelSpec(connectivity=connectivity))
        want, n = ndimage.label(mask, ndimage.generate_binary_structure(3, connectivity))
        assert result.object_count == n
        assert same_partition(dst[:], want)
    # 26-connectivity joins the staircase into one object across 4 blocks.
    assert len(np.unique(dst[:][np.arange(16), np.arange(16), np.arange(16)])) == 1


def test_blocks_may_be_larger_than_chunks_but_aligned() -> None:
    prob = smooth_field((12, 24, 24), seed=7, sigma=1.2)
    src, dst = zarr_pair(prob.shape, (4, 6, 6), prob)
    label_array(src, dst, LabelSpec(), block_shape=(8, 12, 12))
    assert same_partition(dst[:], ndimage.label(prob >= 0.5)[0])
    with pytest.raises(InvalidArgumentError, match="block_shape") as caught:
        label_array(src, dst, LabelSpec(), block_shape=(5, 12, 12))
    assert caught.value.field == "block_shape"


def test_threads_give_the_same_bytes() -> None:
    prob = smooth_field((16, 32, 32), seed=3, sigma=1.2)
    src, one = zarr_pair(prob.shape, (4, 8, 8), prob)
    _, four = zarr_pair(prob.shape, (4, 8, 8), prob)
    label_array(src, one, LabelSpec())
    label_array(src, four, LabelSpec(), max_workers=4)
    np.testing.assert_array_equal(one[:], four[:])


def test_min_size_filter_matches_a_direct_computation() -> None:
    prob = smooth_field((16, 32, 32), seed=11, sigma=1.0)
    src, dst = zarr_pair(prob.shape, (4, 8, 8), prob)
    result = label_array(src, dst, LabelSpec(threshold=0.6, min_size_voxels=20))
    whole, _ = ndimage.label(prob >= 0.6)
    sizes = np.bincount(whole.ravel())
    big = np.flatnonzero(sizes >= 20)
    big = big[big > 0]
    want = np.where(np.isin(whole, big), whole, 0)
    assert result.object_count == len(big)
    assert 0 < len(big) < len(sizes) - 1  # some objects really were dropped
    assert same_partition(dst[:], want)
    assert (result.objects.volume_voxels >= 20).all()


def test_integer_probabilities_and_label_inputs() -> None:
    prob = smooth_field((8, 16, 16), seed=5, sigma=1.2)
    as_uint8 = np.rint(prob * 255).astype(np.uint8)
    src, dst = zarr_pair(prob.shape, (4, 8, 8), as_uint8)
    label_array(src, dst, LabelSpec(threshold=0.5), kind="probability")
    assert same_partition(dst[:], ndimage.label(as_uint8 >= 128)[0])
    label_array(src, dst, LabelSpec(threshold=0.5))  # an integer volume: nonzero is foreground
    assert (dst[:] > 0).sum() == (as_uint8 > 0).sum()


def two_touching_spheres() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shape = (36, 40, 64)
    z, y, x = np.indices(shape)
    a = (z - 18) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 11**2
    b = (z - 18) ** 2 + (y - 20) ** 2 + (x - 40) ** 2 <= 11**2
    return a, b, (a | b).astype(np.float32)


# The second grid cuts both spheres in every axis and puts a block face on the
# plane where they touch (x = 30).
@pytest.mark.parametrize("chunks", [(36, 40, 64), (18, 20, 30)], ids=["one-block", "blocks"])
def test_watershed_splits_two_touching_spheres(chunks: tuple[int, int, int]) -> None:
    a, b, prob = two_touching_spheres()
    assert ndimage.label(prob > 0)[1] == 1  # one component without splitting
    src, dst = zarr_pair(prob.shape, chunks, prob)
    result = label_array(src, dst, LabelSpec(watershed=True, watershed_halo=(12, 16, 16)))
    got = dst[:]
    assert result.object_count == 2
    only_a, only_b = np.unique(got[a & ~b]), np.unique(got[b & ~a])
    assert len(only_a) == 1 and len(only_b) == 1 and only_a[0] != only_b[0]
    assert ((got > 0) == (prob > 0)).all()
    plain = label_array(src, dst, LabelSpec())
    assert plain.object_count == 1


def test_watershed_keeps_small_objects_without_a_peak() -> None:
    mask = np.zeros((4, 12, 12), np.float32)
    mask[1, 2, 2] = 1  # one voxel: no h-maximum of height 2
    mask[1:3, 6:10, 6:10] = 1
    src, dst = zarr_pair(mask.shape, (4, 12, 12), mask)
    result = label_array(src, dst, LabelSpec(watershed=True))
    assert result.object_count == 2
    assert ((dst[:] > 0) == (mask > 0)).all()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": 0.0}, "threshold"),
        ({"connectivity": 4}, "connectivity"),
        ({"min_size_voxels": -1}, "min_size_voxels"),
        ({"watershed_halo": (1, 2)}, "watershed_halo"),
        ({"dtype": "int8"}, "dtype"),
    ],
)
def test_spec_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        LabelSpec(**kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field


def make_volume(store: Store, path: str, data: np.ndarray, chunks: tuple[int, int, int]) -> None:
    write_volume(store, path, data, chunks, voxel_size_nm=(40.0, 6.0, 6.0))


def test_label_volume_writes_an_ome_label_image(tmp_path: Path) -> None:
    store = Store(f"file://{tmp_path}")
    prob = smooth_field((8, 32, 32), seed=2, sigma=1.2)
    make_volume(store, "volumes/p.zarr", prob, (4, 16, 16))
    out = label_volume(store, "volumes/p.zarr", LabelSpec(), name="mito")
    assert (
        out.labels_path == labels_path_for("volumes/p.zarr", "mito") == "volumes/p.zarr/labels/mito"
    )
    labels_group = zarr.open_group(store.zarr_store("volumes/p.zarr/labels"), mode="r")
    assert labels_group.attrs["ome"] == {"version": "0.5", "labels": ["mito"]}
    group = zarr.open_group(store.zarr_store(out.labels_path), mode="r")
    ome = group.attrs["ome"]
    assert ome["image-label"]["source"]["image"] == "../../"
    assert ome["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [
        40.0, 6.0, 6.0,
    ]  # fmt: skip
    info = store.volume_info(out.labels_path)
    assert info.complete and info.attributes["kind"] == "labels"
    assert info.attributes["object_count"] == out.object_count
    assert info.dtype == "uint32" and info.chunk_shape == (4, 16, 16)
    assert same_partition(store.open_volume(out.labels_path)[:], ndimage.label(prob >= 0.5)[0])
    assert out.table_keys == ("volumes/p.mito.objects.csv", "volumes/p.mito.objects.json")
    for key in out.table_keys:
        assert store.exists(key)
    # The image itself is still readable and unchanged.
    np.testing.assert_array_equal(store.open_volume("volumes/p.zarr")[:], prob)


def test_label_volume_to_an_explicit_output_and_rerun(tmp_path: Path) -> None:
    store = Store(f"file://{tmp_path}")
    prob = smooth_field((8, 16, 16), seed=4, sigma=1.2)
    make_volume(store, "volumes/p.zarr", prob, (4, 8, 8))
    first = label_volume(
        store, "volumes/p.zarr", LabelSpec(dtype="uint64"), output=(store, "volumes/l.zarr")
    )
    before = {k: store.read_bytes(k) for k in store.walk_files("volumes")}
    again = label_volume(
        store, "volumes/p.zarr", LabelSpec(dtype="uint64"), output=(store, "volumes/l.zarr")
    )
    after = {k: store.read_bytes(k) for k in store.walk_files("volumes")}
    assert "volumes/l.objects.csv" in after
    assert first.object_count == again.object_count
    assert before == after  # a rerun rewrites the same bytes
    assert store.volume_info("volumes/l.zarr").dtype == "uint64"


def test_label_volume_never_replaces_an_image(tmp_path: Path) -> None:
    store = Store(f"file://{tmp_path}")
    prob = smooth_field((4, 16, 16), seed=1, sigma=1.2)
    make_volume(store, "volumes/p.zarr", prob, (4, 8, 8))
    make_volume(store, "volumes/img.zarr", prob, (4, 8, 8))
    with pytest.raises(AlreadyExistsError) as caught:
        label_volume(store, "volumes/p.zarr", LabelSpec(), output=(store, "volumes/img.zarr"))
    assert caught.value.field == "output.path"
    np.testing.assert_array_equal(store.open_volume("volumes/img.zarr")[:], prob)


def test_cancelled_labelling_leaves_nothing_behind(tmp_path: Path) -> None:
    store = Store(f"file://{tmp_path}")
    make_volume(store, "volumes/p.zarr", smooth_field((8, 32, 32), seed=9, sigma=1.2), (4, 8, 8))
    cancel = threading.Event()

    def progress(done: int, total: int) -> None:
        if done >= total // 2:
            cancel.set()

    with pytest.raises(CancelledError):
        label_volume(store, "volumes/p.zarr", LabelSpec(), cancelled=cancel, progress=progress)
    assert not store.exists("volumes/p.zarr/labels/segmentation")
    assert not store.exists("volumes/p.segmentation.objects.csv")


def test_label_name_must_be_one_segment() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        labels_path_for("volumes/p.zarr", "a/b")
    assert caught.value.field == "name"


@pytest.mark.data
def test_real_mitochondria_masks_blockwise_equal_whole(data_dir: Path) -> None:
    folder = data_dir / "cdeep3m-mito" / "training" / "labels"
    pages = [np.asarray(Image.open(p))[:384, :384] for p in sorted(folder.glob("*.png"))]
    mask = np.stack(pages).astype(np.uint8)
    assert mask.shape == (20, 384, 384) and set(np.unique(mask)) == {0, 1}
    src, dst = zarr_pair(mask.shape, (8, 128, 128), mask)
    result = label_array(src, dst, LabelSpec())
    want, n = ndimage.label(mask)
    assert result.object_count == n > 10
    assert same_partition(dst[:], want)
