"""Image sources and export (deep3m.core.imageio) on real files written here."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import fsspec
import h5py
import mrcfile
import numpy as np
import pytest
import tifffile
from deep3m.core.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from deep3m.core.imageio import (
    Hdf5Source,
    MrcSource,
    PageFolderSource,
    TiffStackSource,
    ZarrSource,
    export_png,
    export_tiff,
    open_source,
)
from deep3m.core.store import Store
from PIL import Image

RNG = np.random.default_rng(7)


def stack(z: int = 5, y: int = 24, x: int = 32, dtype: str = "uint8") -> np.ndarray:
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max, size=(z, y, x), endpoint=True, dtype=dtype)


def write_pngs(folder: Path, data: np.ndarray, names: list[str] | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"s{i:03d}.png" for i in range(len(data))]
    paths = []
    for name, page in zip(names, data, strict=True):
        Image.fromarray(page).save(folder / name)
        paths.append(folder / name)
    return paths


# -- reading ---------------------------------------------------------------------------
def test_png_folder_is_read_in_numeric_file_name_order(tmp_path: Path) -> None:
    data = stack(4)
    # Written in an order where plain string sorting would put img10 before img2.
    names = ["img1.png", "img2.png", "img10.png", "img100.png"]
    write_pngs(tmp_path / "pages", data, names)
    (tmp_path / "pages" / "notes.txt").write_text("not an image")
    src = open_source(str(tmp_path / "pages"))
    assert isinstance(src, PageFolderSource)
    assert [Path(f).name for f in src.files] == names
    assert src.shape == (4, 24, 32) and src.dtype == np.uint8
    np.testing.assert_array_equal(src.read(0, 4), data)
    np.testing.assert_array_equal(src.read(2, 3), data[2:3])


def test_palette_png_reads_raw_indices_not_colours(tmp_path: Path) -> None:
    labels = RNG.integers(0, 3, size=(16, 20), dtype=np.uint8)
    im = Image.fromarray(labels, mode="P")
    # A palette that maps the indices to unrelated colours.
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [9] * (256 * 3 - 9))
    im.save(tmp_path / "lab.png")
    src = open_source(str(tmp_path / "lab.png"))
    assert src.shape == (1, 16, 20) and src.dtype == np.uint8
    np.testing.assert_array_equal(src.read(0, 1)[0], labels)


def test_sixteen_bit_and_one_bit_png(tmp_path: Path) -> None:
    data16 = stack(3, dtype="uint16")
    write_pngs(tmp_path / "p16", data16)
    src = open_source(str(tmp_path / "p16"))
    assert src.dtype == np.uint16
    np.testing.assert_array_equal(src.read(0, 3), data16)

    mask = RNG.integers(0, 2, size=(10, 12)).astype(bool)
    Image.fromarray(mask).convert("1").save(tmp_path / "mask.png")
    src = open_source(str(tmp_path / "mask.png"))
    assert src.dtype == np.uint8
    np.testing.assert_array_equal(src.read(0, 1)[0], mask.astype(np.uint8))


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16"])
def test_multipage_tiff(tmp_path: Path, dtype: str) -> None:
    data = stack(6, dtype=dtype)
    tifffile.imwrite(tmp_path / "s.tif", data, photometric="minisblack")
    src = open_source(str(tmp_path / "s.tif"))
    assert isinstance(src, TiffStackSource)
    assert src.shape == data.shape and src.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(src.read(1, 5), data[1:5])


def test_folder_of_tiff_pages(tmp_path: Path) -> None:
    data = stack(3, dtype="uint16")
    (tmp_path / "t").mkdir()
    for i, page in enumerate(data):
        tifffile.imwrite(tmp_path / "t" / f"z{i}.tiff", page)
    src = open_source(str(tmp_path / "t"))
    assert src.shape == data.shape
    np.testing.assert_array_equal(src.read(0, 3), data)


def test_hdf5_single_dataset_and_named_dataset(tmp_path: Path) -> None:
    data = stack(4, dtype="uint16")
    with h5py.File(tmp_path / "one.h5", "w") as f:
        f.create_dataset("volumes/raw", data=data)
        f["volumes/raw"].attrs["element_size_um"] = [0.04, 0.006, 0.006]
    src = open_source(str(tmp_path / "one.h5"))
    assert isinstance(src, Hdf5Source)
    assert src.shape == data.shape
    assert src.voxel_size_nm == pytest.approx((40.0, 6.0, 6.0))
    np.testing.assert_array_equal(src.read(1, 3), data[1:3])

    with h5py.File(tmp_path / "two.h5", "w") as f:
        f.create_dataset("raw", data=data)
        f.create_dataset("labels", data=data[:, :, :5])
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "two.h5"))
    assert "two.h5" in err.value.message and "/labels" in err.value.message
    src = open_source(f"{tmp_path / 'two.h5'}:/labels")
    np.testing.assert_array_equal(src.read(0, 4), data[:, :, :5])
    with pytest.raises(NotFoundError) as nf:
        open_source(f"{tmp_path / 'two.h5'}:/nope")
    assert "nope" in nf.value.message


def test_mrc_is_memory_mapped_and_keeps_signed_values(tmp_path: Path) -> None:
    data = stack(4, dtype="int16")
    with mrcfile.new(tmp_path / "v.mrc") as mrc:
        mrc.set_data(data)
        mrc.voxel_size = (12.0, 8.0, 8.0)  # x, y, z in Å
    with open_source(str(tmp_path / "v.mrc")) as src:
        assert isinstance(src, MrcSource)
        assert src.dtype == np.int16 and src.shape == data.shape
        assert src.voxel_size_nm == pytest.approx((0.8, 0.8, 1.2))
        np.testing.assert_array_equal(src.read(0, 4), data)


def test_zarr_sources_ome_group_plain_array_and_incomplete(tmp_path: Path) -> None:
    store = Store(f"file://{tmp_path / 'store'}")
    data = stack(5)
    arr = store.create_volume(
        "volumes/a.zarr", data.shape, "uint8", voxel_size_nm=(30, 4, 4), chunk_shape=(2, 8, 8)
    )
    arr[:] = data
    with pytest.raises(FailedPreconditionError) as err:
        open_source(store.key_url("volumes/a.zarr"))
    assert "incomplete" in err.value.message
    store.mark_complete("volumes/a.zarr")
    src = open_source(store.key_url("volumes/a.zarr"))
    assert isinstance(src, ZarrSource)
    assert src.voxel_size_nm == (30.0, 4.0, 4.0)
    np.testing.assert_array_equal(src.read(0, 5), data)
    # The array itself, as a local path.
    src = open_source(str(tmp_path / "store" / "volumes" / "a.zarr" / "0"))
    np.testing.assert_array_equal(src.read(3, 5), data[3:5])


def test_png_folder_behind_a_memory_url() -> None:
    data = stack(3)
    fs = fsspec.filesystem("memory")
    root = f"/imgs-{uuid.uuid4().hex[:8]}"
    for i, page in enumerate(data):
        with fs.open(f"{root}/p{i}.png", "wb") as fh:
            Image.fromarray(page).save(fh, format="PNG")
    try:
        src = open_source(f"memory://{root}")
        np.testing.assert_array_equal(src.read(0, 3), data)
    finally:
        fs.rm(root, recursive=True)


# -- bad input -------------------------------------------------------------------------
def assert_names(err: pytest.ExceptionInfo[Exception], name: str) -> None:
    assert name in str(err.value), f"{name!r} not named in {err.value!s}"


def test_missing_file_and_folder_are_not_found(tmp_path: Path) -> None:
    for missing in (tmp_path / "nope.tif", tmp_path / "no-folder", tmp_path / "x.h5"):
        with pytest.raises(NotFoundError) as err:
            open_source(str(missing))
        assert_names(err, missing.name)


def test_corrupt_png_is_named(tmp_path: Path) -> None:
    write_pngs(tmp_path / "f", stack(3))
    (tmp_path / "f" / "s001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "f"))
    assert_names(err, "s001.png")


def test_truncated_png_is_named(tmp_path: Path) -> None:
    paths = write_pngs(tmp_path / "f", stack(3))
    raw = paths[2].read_bytes()
    paths[2].write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "f"))
    assert_names(err, "s002.png")
    assert "truncated" in err.value.message or "corrupt" in err.value.message
    # Without the up-front check, reading that slice fails the same way.
    src = open_source(str(tmp_path / "f"), verify=False)
    np.testing.assert_array_equal(src.read(0, 1).shape, (1, 24, 32))
    with pytest.raises(InvalidArgumentError) as err:
        src.read(0, 3)
    assert_names(err, "s002.png")


def test_corrupt_and_truncated_tiff_are_named(tmp_path: Path) -> None:
    (tmp_path / "bad.tif").write_bytes(b"II*\x00" + b"\xff" * 64)
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "bad.tif"))
    assert_names(err, "bad.tif")

    tifffile.imwrite(tmp_path / "full.tif", stack(8), photometric="minisblack")
    raw = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "cut.tif"))
    assert_names(err, "cut.tif")
    assert "truncated" in err.value.message or "corrupt" in err.value.message

    # A single page whose pixel data is cut short.
    tifffile.imwrite(tmp_path / "one.tif", stack(1)[0])
    raw = (tmp_path / "one.tif").read_bytes()
    (tmp_path / "one-cut.tif").write_bytes(raw[:-100])
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "one-cut.tif"))
    assert_names(err, "one-cut.tif")


def test_slices_of_different_sizes_name_the_odd_file(tmp_path: Path) -> None:
    write_pngs(tmp_path / "f", stack(3))
    Image.fromarray(stack(1, 24, 30)[0]).save(tmp_path / "f" / "s001.png")
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "f"))
    assert_names(err, "s001.png")
    assert "30x24" in err.value.message and "32x24" in err.value.message

    pages = [stack(1, 10, 10)[0], stack(1, 10, 12)[0]]
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as tw:
        for page in pages:
            tw.write(page)
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "mixed.tif"))
    assert_names(err, "mixed.tif (page 1)")


def test_slices_of_different_types_are_refused(tmp_path: Path) -> None:
    write_pngs(tmp_path / "f", stack(2))
    Image.fromarray(stack(1, dtype="uint16")[0]).save(tmp_path / "f" / "s002.png")
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "f"))
    assert_names(err, "s002.png")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA"])
def test_colour_png_is_refused(tmp_path: Path, mode: str) -> None:
    Image.new(mode, (8, 8)).save(tmp_path / "c.png")
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "c.png"))
    assert_names(err, "c.png")
    assert mode in err.value.message


def test_rgb_and_float_tiff_are_refused(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((3, 8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "rgb.tif"))
    assert_names(err, "rgb.tif")
    assert "RGB" in err.value.message

    tifffile.imwrite(tmp_path / "float.tif", np.zeros((2, 8, 8), np.float32))
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "float.tif"))
    assert_names(err, "float.tif")
    assert "float32" in err.value.message

    (tmp_path / "fl").mkdir()
    Image.fromarray(np.zeros((8, 8), np.float32)).save(tmp_path / "fl" / "a.tif")
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "fl"))
    assert_names(err, "a.tif")


def test_float_and_wide_integer_data_is_refused_in_hdf5_and_mrc(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("raw", data=np.zeros((2, 4, 4), np.float64))
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "f.h5"))
    assert_names(err, "f.h5")
    assert "float64" in err.value.message
    with mrcfile.new(tmp_path / "f.mrc") as mrc:
        mrc.set_data(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "f.mrc"))
    assert_names(err, "f.mrc")
    with h5py.File(tmp_path / "i.h5", "w") as f:
        f.create_dataset("raw", data=np.zeros((2, 4, 4), np.uint32))
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "i.h5"))
    assert "uint32" in err.value.message


def test_empty_folder_and_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "empty"))
    assert_names(err, "empty")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("x")
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "docs"))
    assert_names(err, "readme.txt")


def test_mixed_png_and_tiff_folder_and_unknown_extension(tmp_path: Path) -> None:
    write_pngs(tmp_path / "m", stack(1))
    tifffile.imwrite(tmp_path / "m" / "b.tif", stack(1)[0])
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "m"))
    assert "mixes" in err.value.message
    (tmp_path / "image.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(InvalidArgumentError) as err:
        open_source(str(tmp_path / "image.jpg"))
    assert_names(err, "image.jpg")
    assert ".jpg" in err.value.message


def test_read_outside_the_stack_is_refused(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "s.tif", stack(3), photometric="minisblack")
    src = open_source(str(tmp_path / "s.tif"))
    for z0, z1 in ((0, 4), (2, 2), (-1, 1)):
        with pytest.raises(InvalidArgumentError):
            src.read(z0, z1)


# -- export ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_export_round_trips_through_tiff_and_png(tmp_path: Path, dtype: str) -> None:
    data = stack(4, dtype=dtype)
    out = export_tiff(data, tmp_path / "o" / "s.tif")
    with tifffile.TiffFile(out) as tf:
        assert len(tf.pages) == 4
    np.testing.assert_array_equal(open_source(str(out)).read(0, 4), data)
    files = export_png(data, tmp_path / "pngs")
    assert [f.name for f in files] == [f"slice_{i:04d}.png" for i in range(4)]
    np.testing.assert_array_equal(open_source(str(tmp_path / "pngs")).read(0, 4), data)


def test_export_refuses_signed_png_and_non_3d(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError):
        export_png(stack(2, dtype="int16"), tmp_path / "x")
    with pytest.raises(InvalidArgumentError):
        export_tiff(np.zeros((4, 4), np.uint8), tmp_path / "x.tif")
    with pytest.raises(InvalidArgumentError):
        export_tiff(np.zeros((2, 4, 4), np.float32), tmp_path / "x.tif")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.tif").exists()


def test_tiff_stack_behind_a_memory_url() -> None:
    data = stack(5, dtype="uint16")
    fs = fsspec.filesystem("memory")
    path = f"/tiffs-{uuid.uuid4().hex[:8]}/s.tif"
    with fs.open(path, "wb") as fh:
        tifffile.imwrite(fh, data, photometric="minisblack")
    try:
        src = open_source(f"memory://{path}")
        assert isinstance(src, TiffStackSource)
        np.testing.assert_array_equal(src.read(1, 4), data[1:4])
    finally:
        fs.rm(path)


@pytest.mark.s3
def test_sources_on_s3(s3_server, s3_prefix: str) -> None:  # type: ignore[no-untyped-def]
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
    pages = stack(3)
    for i, page in enumerate(pages):
        with fs.open(f"{s3_prefix}/pngs/p{i}.png", "wb") as fh:
            Image.fromarray(page).save(fh, format="PNG")
    buffer = io.BytesIO()  # tifffile seeks while writing; S3 uploads cannot
    tifffile.imwrite(buffer, pages, photometric="minisblack")
    fs.pipe(f"{s3_prefix}/s.tif", buffer.getvalue())
    opts = s3_server.storage_options
    np.testing.assert_array_equal(
        open_source(f"{s3_prefix}/pngs", storage_options=opts).read(0, 3), pages
    )
    np.testing.assert_array_equal(
        open_source(f"{s3_prefix}/s.tif", storage_options=opts).read(0, 3), pages
    )
    with pytest.raises(NotFoundError) as err:
        open_source(f"{s3_prefix}/missing", storage_options=opts)
    assert "missing" in err.value.message
