"""Exports to TIFF stacks, PNG pages and overlay PNGs."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import tifffile
from deep3m.core.errors import InvalidArgumentError
from deep3m.core.store import Store
from deep3m.postprocess.export import (
    export_array,
    export_overlay,
    export_volume,
    label_colors,
    volume_name,
)
from PIL import Image


def test_probabilities_become_8_bit_tiff_pages(tmp_path: Path) -> None:
    prob = np.random.default_rng(0).random((3, 10, 12)).astype(np.float32)
    (file,) = export_array(prob, str(tmp_path / "out"), "tiff", name="prob")
    assert file == str(tmp_path / "out" / "prob.tif")
    pages = tifffile.imread(file)
    assert pages.dtype == np.uint8 and pages.shape == (3, 10, 12)
    np.testing.assert_array_equal(pages, np.rint(prob * 255).astype(np.uint8))


def test_tiff_to_an_explicit_file_name(tmp_path: Path) -> None:
    data = np.arange(2 * 4 * 4, dtype=np.uint16).reshape(2, 4, 4)
    (file,) = export_array(data, f"file://{tmp_path}/stack.tiff", "tiff")
    assert file == str(tmp_path / "stack.tiff")
    np.testing.assert_array_equal(tifffile.imread(file), data)


def test_labels_become_16_bit_png_pages(tmp_path: Path) -> None:
    labels = np.zeros((2, 6, 6), np.uint32)
    labels[0, 1:3, 1:3] = 300
    labels[1, 4, 4] = 7
    files = export_array(labels, str(tmp_path), "png", name="seg")
    assert [Path(f).name for f in files] == ["seg_0000.png", "seg_0001.png"]
    back = np.stack([np.asarray(Image.open(f)) for f in files])
    np.testing.assert_array_equal(back, labels)


def test_labels_too_large_for_16_bits_are_refused(tmp_path: Path) -> None:
    labels = np.full((1, 2, 2), 70000, np.uint32)
    with pytest.raises(InvalidArgumentError, match="70000") as caught:
        export_array(labels, str(tmp_path), "png")
    assert caught.value.field == "volume"
    assert not list(tmp_path.iterdir())


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        export_array(np.zeros((1, 2, 2), np.uint8), str(tmp_path), "jpeg")
    assert caught.value.field == "format"


def test_export_to_a_memory_url() -> None:
    prefix = f"memory://exports-{uuid.uuid4().hex[:8]}"
    data = np.random.default_rng(1).integers(0, 255, (2, 5, 5)).astype(np.uint8)
    files = export_array(data, prefix, "png", name="img")
    assert files == [f"{prefix}/img_0000.png", f"{prefix}/img_0001.png"]
    fs = fsspec.filesystem("memory")
    with fs.open(files[1], "rb") as fh:
        np.testing.assert_array_equal(np.asarray(Image.open(fh)), data[1])
    fs.rm(prefix, recursive=True)


def test_export_a_stored_label_volume(tmp_path: Path) -> None:
    store = Store(f"file://{tmp_path}/store")
    labels = np.zeros((2, 8, 8), np.uint32)
    labels[:, 2:4, 2:4] = 2
    arr = store.create_volume(
        "volumes/l.zarr", labels.shape, "uint32", attributes={"kind": "labels"}
    )
    arr[:] = labels
    store.mark_complete("volumes/l.zarr", object_count=2)
    (file,) = export_volume(store, "volumes/l.zarr", str(tmp_path / "out"), "tiff")
    assert Path(file).name == "l.tif"
    out = tifffile.imread(file)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, labels)


def test_overlay_pages(tmp_path: Path) -> None:
    image = np.full((2, 8, 8), 100, np.uint8)
    prob = np.zeros((2, 8, 8), np.float32)
    prob[0, :4] = 1.0
    files = export_overlay(image, prob, str(tmp_path), slices=[0])
    assert [Path(f).name for f in files] == ["overlay_0000.png"]
    rgb = np.asarray(Image.open(files[0]))
    assert rgb.shape == (8, 8, 3)
    assert (rgb[4:] == 100).all()  # probability 0: the image shows through unchanged
    assert (rgb[:4, :, 0] > 100).all() and (rgb[:4, :, 1] < 100).all()  # red where p = 1
    labels = np.zeros((2, 8, 8), np.uint32)
    labels[1, 2:4, 2:4] = 5
    labels[1, 5:7, 5:7] = 6
    (file,) = export_overlay(image, labels, str(tmp_path / "lab"), slices=[1])
    page = np.asarray(Image.open(file))
    assert (page[0, 0] == 100).all()
    assert not (page[2, 2] == page[5, 5]).all()  # objects get different colours
    assert (page[2, 2] == page[3, 3]).all()


def test_overlay_checks(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError) as shape:
        export_overlay(np.zeros((1, 4, 4), np.uint8), np.zeros((1, 4, 5)), str(tmp_path))
    assert shape.value.field == "image"
    with pytest.raises(InvalidArgumentError) as slices:
        export_overlay(
            np.zeros((1, 4, 4), np.uint8), np.zeros((1, 4, 4)), str(tmp_path), slices=[3]
        )
    assert slices.value.field == "slices"


def test_label_colours_are_stable_and_distinct() -> None:
    colours = label_colors(np.arange(1, 50))
    assert colours.shape == (49, 3)
    assert len({tuple(c) for c in colours}) > 40
    np.testing.assert_array_equal(label_colors(np.array([7])), label_colors(np.array([7])))


def test_volume_names() -> None:
    assert volume_name("volumes/mito.zarr") == "mito"
    assert volume_name("volumes/mito.zarr/labels/segmentation") == "segmentation"


def test_tiff_file_to_a_memory_url() -> None:
    prefix = f"memory://exports-{uuid.uuid4().hex[:8]}"
    data = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    assert export_array(data, f"{prefix}/sub/one.tif", "tiff") == [f"{prefix}/sub/one.tif"]
    fs = fsspec.filesystem("memory")
    with fs.open(f"{prefix}/sub/one.tif", "rb") as fh:
        np.testing.assert_array_equal(tifffile.imread(fh), data)
    fs.rm(prefix, recursive=True)
