"""Lazy image sources (TIFF, PNG, HDF5, MRC, zarr) and TIFF/PNG export.

Every source is a stack of 2D slices with a ``shape`` (z, y, x), a ``dtype`` and
``read(z_start, z_stop)``. ``open_source`` validates every slice header (size,
pixel type, channels; for PNG also the chunk checksums, which catches truncated
files) before anything is written anywhere, and names the offending file.

Pixel types: unsigned 8- and 16-bit images are the norm. Signed 8- and 16-bit
data (MRC modes 0 and 1, some HDF5 files) is accepted and kept signed, unchanged:
converting would either shift the values or need a full pass over the data to
prove they fit. Palette PNGs are read as raw palette indices (label images),
never expanded to RGB; 1-bit images become 0/1 ``uint8``. RGB/RGBA, float,
complex and 32-bit data are refused.

Sources may be local paths or ``file://``, ``s3://`` and ``memory://`` URLs
(TIFF, PNG and zarr; HDF5 and MRC must be local files).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import fsspec
import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from deep3m.core.errors import (
    Deep3mError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)

SUPPORTED_DTYPES = ("uint8", "uint16", "int8", "int16")
TIFF_SUFFIXES = (".tif", ".tiff")
PNG_SUFFIXES = (".png",)
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
MRC_SUFFIXES = (".mrc", ".mrcs", ".rec", ".st", ".map", ".ali")
_HDF5_SPEC = re.compile(r"^(?P<file>.*?\.(?:h5|hdf5|hdf|he5))(?::(?P<dataset>.*))?$", re.IGNORECASE)
# EM slices are large by design; Pillow's default guards against image bombs
# from untrusted web content would refuse a 20k x 20k section.
_MAX_PIXELS = 2**32
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < _MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = _MAX_PIXELS

Shape3 = tuple[int, int, int]


# -- pixel types ----------------------------------------------------------------
def check_dtype(dtype: np.dtype[Any] | str, where: str) -> np.dtype[Any]:
    """Normalise and check a pixel type; refuses float, complex, 32-bit and wider."""
    dt = np.dtype(dtype)
    if dt == np.bool_:
        return np.dtype(np.uint8)
    native = dt.newbyteorder("=")
    if native.name in SUPPORTED_DTYPES:
        return native
    if dt.kind in "fc":
        raise InvalidArgumentError(
            f"{where}: {dt.name} (floating point) images are not supported; convert to "
            "8- or 16-bit integers",
            field=where,
        )
    raise InvalidArgumentError(
        f"{where}: pixel type {dt.name} is not supported; use 8- or 16-bit grayscale "
        f"({', '.join(SUPPORTED_DTYPES)})",
        field=where,
    )


def _natural_key(name: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key with numbers compared by value, so ``img2`` comes before ``img10``."""
    parts = re.split(r"(\d+)", name)
    key = [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p]
    return (*key, (2, 0, name))


# -- file access ----------------------------------------------------------------
@dataclass(frozen=True)
class _Location:
    """A file or folder, local or behind an fsspec URL."""

    fs: Any
    path: str
    display: str

    @property
    def local(self) -> bool:
        return "file" in _protocols(self.fs)

    def open_bytes(self, *, whole: bool = True) -> BinaryIO:
        """A binary file; remote ones are fetched whole (one request per slice
        file) unless ``whole`` is off (multi-page TIFFs: ranged reads of the pages)."""
        if self.local:
            return open(self.path, "rb")
        if whole:
            return io.BytesIO(self.fs.cat_file(self.path))
        return self.fs.open(self.path, "rb")  # type: ignore[no-any-return]

    def child(self, name: str) -> _Location:
        sep = "" if self.display.endswith("/") else "/"
        return _Location(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.display}{sep}{name}")


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def _locate(source: str, storage_options: Mapping[str, Any] | None) -> _Location:
    if "://" in source:
        scheme = urlparse(source).scheme
        if scheme not in ("file", "s3", "memory"):
            raise InvalidArgumentError(
                f"unsupported source URL scheme {scheme!r} in {source!r}", field="source"
            )
        options = dict(storage_options or {}) if scheme == "s3" else {}
        fs, path = fsspec.core.url_to_fs(source, **options)
        if scheme == "file":
            return _Location(fs, str(Path(path).resolve()), source)
        return _Location(fs, path.rstrip("/"), source)
    fs = fsspec.filesystem("file")
    return _Location(fs, str(Path(source).expanduser().resolve()), source)


# -- sources ----------------------------------------------------------------------
class ImageSource(ABC):
    """A lazily read stack of 2D slices; ``read`` is safe to call from many threads."""

    description: str
    shape: Shape3
    dtype: np.dtype[Any]
    #: Voxel size (z, y, x) from the file's metadata, when it records one.
    voxel_size_nm: tuple[float, float, float] | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def slice_nbytes(self) -> int:
        return self.shape[1] * self.shape[2] * self.dtype.itemsize

    def check_range(self, z_start: int, z_stop: int) -> None:
        if not 0 <= z_start < z_stop <= self.shape[0]:
            raise InvalidArgumentError(
                f"slice range [{z_start}, {z_stop}) is outside 0..{self.shape[0]} of "
                f"{self.description}",
                field="z_range",
            )

    def read(self, z_start: int, z_stop: int) -> np.ndarray:
        """Slices ``[z_start, z_stop)`` as a (z, y, x) array of ``dtype``."""
        self.check_range(z_start, z_stop)
        out = self._read(z_start, z_stop)
        expected = (z_stop - z_start, self.shape[1], self.shape[2])
        if out.shape != expected or out.dtype != self.dtype:
            raise InvalidArgumentError(
                f"{self.description}: slices {z_start}..{z_stop} read as {out.shape} "
                f"{out.dtype}, expected {expected} {self.dtype} (changed since it was opened?)",
                field="source",
            )
        return out

    @abstractmethod
    def _read(self, z_start: int, z_stop: int) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027 - most sources hold no open handles
        """Release open handles (memory maps); reading after close is not allowed."""

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.description!r}, shape={self.shape}, dtype={self.dtype})"
        )


@dataclass(frozen=True)
class _SliceHeader:
    shape: tuple[int, int]
    dtype: np.dtype[Any]


class _TiffLogCapture(logging.Handler):
    """Collects tifffile's complaints about the file being read by this thread.

    tifffile logs, rather than raises, on broken page chains (a truncated
    multi-page file looks like a shorter stack otherwise).
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _tiff_problems() -> Iterator[list[str]]:
    handler = _TiffLogCapture()
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _tiff_page_header(page: Any, where: str) -> _SliceHeader:
    if int(getattr(page, "samplesperpixel", 1)) > 1:
        raise InvalidArgumentError(
            f"{where} has {page.samplesperpixel} samples per pixel (RGB/RGBA?); deep3m needs "
            "single-channel grayscale images",
            field=where,
        )
    shape = tuple(int(s) for s in page.shape)
    if len(shape) != 2:
        raise InvalidArgumentError(
            f"{where} has a {len(shape)}D page {shape}; expected 2D", field=where
        )
    dtype = check_dtype(page.dtype, where)
    return _SliceHeader((shape[0], shape[1]), dtype)


def _tiff_data_within(page: Any, file_size: int, where: str) -> None:
    for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False):
        if int(offset) + int(count) > file_size:
            raise InvalidArgumentError(
                f"{where} is truncated: image data ends at byte {int(offset) + int(count)} but "
                f"the file has {file_size} bytes",
                field=where,
            )


def _file_size(fh: BinaryIO) -> int:
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    fh.seek(0)
    return size


def _tiff_headers(loc: _Location) -> list[_SliceHeader]:
    """Validate every page header of a TIFF file; one header per page."""
    try:
        with loc.open_bytes(whole=False) as fh, _tiff_problems() as problems:
            size = _file_size(fh)
            with tifffile.TiffFile(fh) as tf:
                pages = list(tf.pages)
                headers = []
                for i, page in enumerate(pages):
                    where = loc.display if len(pages) == 1 else f"{loc.display} (page {i})"
                    headers.append(_tiff_page_header(page, where))
                    _tiff_data_within(page, size, where)
                series = tf.series[0] if tf.series else None
                if series is not None and len(tf.series) == 1:
                    axes = dict(zip(series.axes, series.shape, strict=True))
                    if axes.get("C", 1) > 1 or axes.get("S", 1) > 1:
                        raise InvalidArgumentError(
                            f"{loc.display} has {axes.get('C', axes.get('S'))} channels; "
                            "deep3m needs a single-channel stack",
                            field=loc.display,
                        )
                    planes = int(np.prod([n for a, n in axes.items() if a not in "YX"]))
                    if planes != len(pages) and (tf.is_shaped or tf.is_imagej):
                        raise InvalidArgumentError(
                            f"{loc.display} is truncated: its metadata describes {planes} pages "
                            f"but only {len(pages)} can be read",
                            field=loc.display,
                        )
    except FileNotFoundError as exc:
        raise NotFoundError(f"{loc.display} does not exist", field=loc.display) from exc
    except Deep3mError:
        raise
    except (tifffile.TiffFileError, ValueError, OSError, KeyError, IndexError) as exc:
        raise InvalidArgumentError(
            f"{loc.display} is not a readable TIFF file: {exc}", field=loc.display
        ) from exc
    if problems:
        raise InvalidArgumentError(
            f"{loc.display} is corrupt or truncated: {problems[0]}", field=loc.display
        )
    if not headers:
        raise InvalidArgumentError(f"{loc.display} contains no images", field=loc.display)
    return headers


_PNG_MODES: dict[str, str] = {
    "L": "uint8",
    "P": "uint8",
    "1": "uint8",
    "I;16": "uint16",
    "I;16B": "uint16",
    "I;16L": "uint16",
    # Pillow may open 16-bit grayscale PNGs as 32-bit "I"; PNG holds at most 16 bits.
    "I": "uint16",
}


def _png_header(loc: _Location, *, verify: bool) -> _SliceHeader:
    try:
        with loc.open_bytes() as fh, Image.open(fh) as im:
            mode, (width, height) = im.mode, im.size
            fmt = im.format
            if verify:
                # Reads every chunk and checks its CRC: finds truncated or damaged files.
                im.verify()
    except FileNotFoundError as exc:
        raise NotFoundError(f"{loc.display} does not exist", field=loc.display) from exc
    except UnidentifiedImageError as exc:
        raise InvalidArgumentError(
            f"{loc.display} is not a readable image file", field=loc.display
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidArgumentError(
            f"{loc.display} is corrupt or truncated: {exc}", field=loc.display
        ) from exc
    if fmt != "PNG":
        raise InvalidArgumentError(f"{loc.display} is a {fmt} file, not PNG", field=loc.display)
    if mode in ("F", "I;16S", "I;32F"):
        raise InvalidArgumentError(
            f"{loc.display}: floating point or signed images (mode {mode}) are not supported",
            field=loc.display,
        )
    if mode not in _PNG_MODES:
        raise InvalidArgumentError(
            f"{loc.display} is a {mode} image ({len(mode)} channels); deep3m needs "
            "single-channel grayscale (or palette/label) images",
            field=loc.display,
        )
    return _SliceHeader((height, width), np.dtype(_PNG_MODES[mode]))


def _read_png(loc: _Location, header: _SliceHeader) -> np.ndarray:
    try:
        with loc.open_bytes() as fh, Image.open(fh) as im:
            mode = im.mode
            # Palette images: np.asarray gives the raw indices, never RGB.
            data = np.asarray(im)
    except FileNotFoundError as exc:
        raise NotFoundError(f"{loc.display} does not exist", field=loc.display) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidArgumentError(
            f"{loc.display} is corrupt or truncated: {exc}", field=loc.display
        ) from exc
    dtype = _PNG_MODES.get(mode)
    if dtype is None or np.dtype(dtype) != header.dtype:
        raise InvalidArgumentError(
            f"{loc.display} is a {mode} image but the stack is {header.dtype.name}: all slices "
            "must have the same type",
            field=loc.display,
        )
    if data.shape != header.shape:
        raise InvalidArgumentError(
            f"{loc.display} has size {data.shape[1]}x{data.shape[0]} (x by y) but the stack is "
            f"{header.shape[1]}x{header.shape[0]}: all slices must be the same size",
            field=loc.display,
        )
    return data.astype(header.dtype, copy=False)


def _read_tiff_pages(loc: _Location, pages: range) -> np.ndarray:
    try:
        with loc.open_bytes(whole=False) as fh, tifffile.TiffFile(fh) as tf:
            return np.stack([tf.pages[i].asarray() for i in pages])  # type: ignore[union-attr]
    except FileNotFoundError as exc:
        raise NotFoundError(f"{loc.display} does not exist", field=loc.display) from exc
    except (tifffile.TiffFileError, ValueError, OSError, KeyError, IndexError) as exc:
        raise InvalidArgumentError(
            f"{loc.display} is corrupt or truncated: {exc}", field=loc.display
        ) from exc


def _check_same_size(headers: Sequence[_SliceHeader], names: Sequence[str]) -> _SliceHeader:
    first = headers[0]
    for header, name in zip(headers, names, strict=True):
        if header.shape != first.shape:
            raise InvalidArgumentError(
                f"{name} has size {header.shape[1]}x{header.shape[0]} (x by y) but "
                f"{names[0]} has {first.shape[1]}x{first.shape[0]}: all slices must be the "
                "same size",
                field=name,
            )
        if header.dtype != first.dtype:
            raise InvalidArgumentError(
                f"{name} has pixel type {header.dtype.name} but {names[0]} has "
                f"{first.dtype.name}: all slices must have the same type",
                field=name,
            )
    return first


class TiffStackSource(ImageSource):
    """A multi-page TIFF file: page i is slice z = i."""

    def __init__(self, loc: _Location) -> None:
        self._loc = loc
        self.description = loc.display
        headers = _tiff_headers(loc)
        names = [f"{loc.display} (page {i})" for i in range(len(headers))]
        first = _check_same_size(headers, names)
        self.shape = (len(headers), *first.shape)
        self.dtype = first.dtype

    def _read(self, z_start: int, z_stop: int) -> np.ndarray:
        return _read_tiff_pages(self._loc, range(z_start, z_stop)).astype(self.dtype, copy=False)


class PageFolderSource(ImageSource):
    """A folder (or list) of single-page TIFF or PNG files, one per slice.

    ``verify`` checks every file's header (and PNG checksums) now; without it
    only the first file is checked now and each other one when it is read.
    """

    def __init__(
        self,
        display: str,
        files: Sequence[_Location],
        kind: str,
        *,
        verify: bool = True,
        workers: int = 4,
    ) -> None:
        self.description = display
        self._files = tuple(files)
        self._kind = kind
        to_check = self._files if verify else self._files[:1]
        if len(to_check) > 1 and workers > 1:
            with ThreadPoolExecutor(min(workers, len(to_check))) as pool:
                headers = list(pool.map(lambda f: self._header_of(f, verify), to_check))
        else:
            headers = [self._header_of(f, verify) for f in to_check]
        self._header = _check_same_size(headers, [f.display for f in to_check])
        self.shape = (len(self._files), *self._header.shape)
        self.dtype = self._header.dtype

    def _header_of(self, loc: _Location, verify: bool) -> _SliceHeader:
        if self._kind == "png":
            return _png_header(loc, verify=verify)
        pages = _tiff_headers(loc)
        if len(pages) != 1:
            raise InvalidArgumentError(
                f"{loc.display} has {len(pages)} pages; a folder of TIFF files must hold one "
                "slice per file",
                field=loc.display,
            )
        return pages[0]

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(f.display for f in self._files)

    def _read(self, z_start: int, z_stop: int) -> np.ndarray:
        out = np.empty((z_stop - z_start, *self.shape[1:]), dtype=self.dtype)
        for i, loc in enumerate(self._files[z_start:z_stop]):
            if self._kind == "png":
                out[i] = _read_png(loc, self._header)
                continue
            _check_same_size(
                [self._header, self._header_of(loc, False)], [self._files[0].display, loc.display]
            )
            out[i] = _read_tiff_pages(loc, range(1))[0]
        return out


class Hdf5Source(ImageSource):
    """One 2D or 3D dataset of an HDF5 file (``file.h5`` or ``file.h5:/group/data``)."""

    def __init__(self, path: Path, dataset: str | None, display: str) -> None:
        import h5py

        self._path = path
        self.description = display
        try:
            with h5py.File(path, "r") as f:
                name = dataset if dataset else self._only_dataset(f, display)
                obj = f.get(name)
                if obj is None:
                    raise NotFoundError(f"dataset {name!r} not found in {path}", field=display)
                if not isinstance(obj, h5py.Dataset):
                    raise InvalidArgumentError(
                        f"{display}: {name!r} is a group, not a dataset", field=display
                    )
                shape = tuple(int(s) for s in obj.shape)
                dtype = obj.dtype
                self._dataset = str(obj.name)
                voxel_size = self._voxel_size(obj.attrs)
        except Deep3mError:
            raise
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidArgumentError(
                f"{path} is not a readable HDF5 file: {exc}", field=display
            ) from exc
        self.description = f"{path}:{self._dataset}"
        if len(shape) not in (2, 3) or any(s <= 0 for s in shape):
            raise InvalidArgumentError(
                f"{self.description} has shape {shape}; expected a non-empty 2D or 3D "
                "single-channel dataset (z, y, x)",
                field=display,
            )
        self._two_d = len(shape) == 2
        self.shape = (1, shape[0], shape[1]) if len(shape) == 2 else (shape[0], shape[1], shape[2])
        self.dtype = check_dtype(dtype, self.description)
        self.voxel_size_nm = voxel_size

    @staticmethod
    def _voxel_size(attrs: Any) -> tuple[float, float, float] | None:
        # Fiji/ilastik store element_size_um (micrometres); others a "resolution" in nm.
        for key, factor in (("element_size_um", 1000.0), ("resolution", 1.0)):
            if key in attrs:
                values = np.ravel(np.asarray(attrs[key], dtype=np.float64)) * factor
                if values.size == 3 and bool(np.all(values > 0)):
                    return (float(values[0]), float(values[1]), float(values[2]))
        return None

    @staticmethod
    def _only_dataset(f: Any, display: str) -> str:
        import h5py

        found: list[str] = []

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and obj.ndim in (2, 3):
                found.append("/" + name)

        f.visititems(visit)
        if len(found) == 1:
            return found[0]
        if not found:
            raise InvalidArgumentError(f"{display} contains no 2D or 3D dataset", field=display)
        raise InvalidArgumentError(
            f"{display} contains several datasets ({', '.join(found[:5])}); name one as "
            f"'{display}:/path/to/dataset'",
            field=display,
        )

    def _read(self, z_start: int, z_stop: int) -> np.ndarray:
        import h5py

        with h5py.File(self._path, "r") as f:
            ds = f[self._dataset]
            data = ds[()][None] if self._two_d else ds[z_start:z_stop]
        return np.asarray(data).astype(self.dtype, copy=False)


class MrcSource(ImageSource):
    """An MRC file (volume or image stack), memory-mapped."""

    def __init__(self, path: Path, display: str) -> None:
        import mrcfile

        self.description = display
        try:
            self._mrc = mrcfile.mmap(path, mode="r")
        except (ValueError, OSError, EOFError) as exc:
            raise InvalidArgumentError(
                f"{display} is not a readable MRC file: {exc}", field=display
            ) from exc
        data = self._mrc.data
        if data is None or data.ndim not in (2, 3) or data.size == 0:
            shape = None if data is None else data.shape
            self._mrc.close()
            raise InvalidArgumentError(
                f"{display} holds no 2D or 3D image (shape {shape})", field=display
            )
        self._data = data if data.ndim == 3 else data[None]
        try:
            self.dtype = check_dtype(self._data.dtype, display)
        except InvalidArgumentError:
            self._mrc.close()
            raise
        self.shape = (int(self._data.shape[0]), int(self._data.shape[1]), int(self._data.shape[2]))
        size = self._mrc.voxel_size
        sizes = (float(size.z) / 10, float(size.y) / 10, float(size.x) / 10)  # Å → nm
        if all(s > 0 for s in sizes):
            self.voxel_size_nm = sizes

    def _read(self, z_start: int, z_stop: int) -> np.ndarray:
        return np.array(self._data[z_start:z_stop], dtype=self.dtype)

    def close(self) -> None:
        self._mrc.close()


class ZarrSource(ImageSource):
    """An existing zarr v3 array, or the full-resolution level of an OME-Zarr group."""

    def __init__(self, loc: _Location, storage_options: Mapping[str, Any] | None) -> None:
        import zarr
        import zarr.storage

        self.description = loc.display
        store: Any
        if loc.local:
            store = zarr.storage.LocalStore(loc.path, read_only=True)
        else:
            url = loc.display if "://" in loc.display else loc.path
            scheme = urlparse(url).scheme
            options = dict(storage_options or {}) if scheme == "s3" else None
            store = zarr.storage.FsspecStore.from_url(url, storage_options=options, read_only=True)
        try:
            node = zarr.open(store=store, mode="r")
        except (FileNotFoundError, KeyError, zarr.errors.NodeTypeValidationError) as exc:
            raise NotFoundError(
                f"no zarr array or group at {loc.display}", field=loc.display
            ) from exc
        except (ValueError, OSError) as exc:
            raise InvalidArgumentError(
                f"{loc.display} is not a readable zarr node: {exc}", field=loc.display
            ) from exc
        scale: Sequence[float] | None = None
        if isinstance(node, zarr.Group):
            attrs: dict[str, Any] = dict(node.attrs)
            meta = attrs.get("deep3m")
            if isinstance(meta, dict) and meta.get("complete", True) is False:
                raise FailedPreconditionError(
                    f"{loc.display} is an incomplete volume (still being written, or failed)",
                    field=loc.display,
                )
            level, scale = self._ome_level(attrs)
            try:
                node = node[level]
            except KeyError as exc:
                raise InvalidArgumentError(
                    f"{loc.display} is a zarr group without an array {level!r}", field=loc.display
                ) from exc
        if not isinstance(node, zarr.Array):
            raise InvalidArgumentError(f"{loc.display} is not a zarr array", field=loc.display)
        shape = tuple(int(s) for s in node.shape)
        if len(shape) not in (2, 3) or any(s <= 0 for s in shape):
            raise InvalidArgumentError(
                f"{loc.display} has shape {shape}; expected a 2D or 3D array (z, y, x)",
                field=loc.display,
            )
        self._array = node
        self._two_d = len(shape) == 2
        self.shape = (1, shape[0], shape[1]) if self._two_d else (shape[0], shape[1], shape[2])
        self.dtype = check_dtype(node.dtype, loc.display)  # type: ignore[arg-type]
        if scale is not None and len(scale) == 3 and all(float(s) > 0 for s in scale):
            self.voxel_size_nm = (float(scale[0]), float(scale[1]), float(scale[2]))

    @staticmethod
    def _ome_level(attrs: Mapping[str, Any]) -> tuple[str, Sequence[float] | None]:
        try:
            ms = attrs.get("ome", attrs)["multiscales"][0]
            ds = ms["datasets"][0]
            units = {a.get("unit") for a in ms.get("axes", []) if isinstance(a, dict)}
            scale = ds["coordinateTransformations"][0]["scale"]
            return str(ds["path"]), scale if units <= {"nanometer"} else None
        except (KeyError, IndexError, TypeError):
            return "0", None

    def _read(self, z_start: int, z_stop: int) -> np.ndarray:
        if self._two_d:
            data = np.asarray(self._array[...])[None]
        else:
            data = np.asarray(self._array[z_start:z_stop])
        return data.astype(self.dtype, copy=False)


# -- opening ----------------------------------------------------------------------
def source_path(source: str) -> str:
    """The file, folder or URL a source names (``file.h5:/dataset`` gives ``file.h5``)."""
    source = source.strip()
    h5 = _HDF5_SPEC.match(source)
    return h5["file"] if h5 and "://" not in source else source


def _is_zarr(loc: _Location) -> bool:
    name = loc.path.rstrip("/")
    if name.endswith(".zarr") or ".zarr/" in name:
        return True
    try:
        return bool(loc.fs.isdir(loc.path)) and bool(loc.fs.exists(f"{name}/zarr.json"))
    except OSError:
        return False


def _folder(loc: _Location, *, verify: bool, workers: int) -> PageFolderSource:
    try:
        entries = loc.fs.ls(loc.path, detail=True)
    except FileNotFoundError as exc:
        raise NotFoundError(f"folder {loc.display} does not exist", field=loc.display) from exc
    names = sorted(
        (str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file"),
        key=_natural_key,
    )
    names = [n for n in names if not n.startswith(".")]
    pngs = [n for n in names if n.lower().endswith(PNG_SUFFIXES)]
    tiffs = [n for n in names if n.lower().endswith(TIFF_SUFFIXES)]
    if pngs and tiffs:
        raise InvalidArgumentError(
            f"folder {loc.display} mixes PNG ({pngs[0]}, ...) and TIFF ({tiffs[0]}, ...) "
            "files; keep one kind per stack",
            field=loc.display,
        )
    if not pngs and not tiffs:
        others = (
            f" (it holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            if names
            else ""
        )
        raise InvalidArgumentError(
            f"folder {loc.display} contains no PNG or TIFF images{others}", field=loc.display
        )
    kind = "png" if pngs else "tiff"
    files = [loc.child(n) for n in (pngs or tiffs)]
    return PageFolderSource(loc.display, files, kind, verify=verify, workers=workers)


def open_source(
    source: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    verify: bool = True,
    workers: int = 4,
) -> ImageSource:
    """Open and validate an image source; every slice header is checked here.

    ``source``: a multi-page TIFF, a PNG or TIFF file (one slice), a folder of
    PNG or TIFF pages (sorted numerically: ``img2`` before ``img10``), an HDF5
    file (``file.h5`` with exactly one 2D/3D dataset, or ``file.h5:/dataset``),
    an MRC file, or a zarr array / OME-Zarr group (path or URL).
    ``verify`` also checks PNG data checksums (reads each file once).
    """
    if not source or not source.strip():
        raise InvalidArgumentError("source is empty", field="source")
    source = source.strip()
    h5 = _HDF5_SPEC.match(source)
    if h5 and "://" not in source:
        path = Path(h5["file"]).expanduser().resolve()
        if not path.is_file():
            raise NotFoundError(f"{h5['file']} does not exist", field=h5["file"])
        return Hdf5Source(path, h5["dataset"], source)
    loc = _locate(source, storage_options)
    if not loc.fs.exists(loc.path):
        raise NotFoundError(f"{source} does not exist", field=source)
    if _is_zarr(loc):
        return ZarrSource(loc, storage_options)
    if loc.fs.isdir(loc.path):
        return _folder(loc, verify=verify, workers=workers)
    suffix = Path(loc.path).suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return TiffStackSource(loc)
    if suffix in PNG_SUFFIXES:
        return PageFolderSource(source, [loc], "png", verify=verify, workers=1)
    if suffix in HDF5_SUFFIXES or suffix in MRC_SUFFIXES:
        if not loc.local:
            raise InvalidArgumentError(
                f"{source}: HDF5 and MRC sources must be local files", field=source
            )
        if suffix in MRC_SUFFIXES:
            return MrcSource(Path(loc.path), source)
        return Hdf5Source(Path(loc.path), None, source)
    raise InvalidArgumentError(
        f"{source}: unknown image file type {suffix or '(no extension)'!r}; use TIFF, PNG, "
        "HDF5, MRC or zarr",
        field=source,
    )


# -- export -----------------------------------------------------------------------
class _Slices:
    """Reads a (z, y, x) array-like one slice at a time (zarr arrays stay lazy)."""

    def __init__(self, array: Any, what: str) -> None:
        shape = tuple(int(s) for s in getattr(array, "shape", ()))
        if len(shape) != 3 or any(s <= 0 for s in shape):
            raise InvalidArgumentError(
                f"{what} needs a non-empty 3D (z, y, x) array, got shape {shape}", field="array"
            )
        self.array = array
        self.shape = shape
        self.dtype = check_dtype(np.dtype(array.dtype), "array")

    def __iter__(self) -> Iterator[np.ndarray]:
        for z in range(self.shape[0]):
            yield np.asarray(self.array[z]).astype(self.dtype, copy=False)


def export_tiff(array: Any, path: str | Path) -> Path:
    """Write a (z, y, x) array as a multi-page grayscale TIFF, one page per slice."""
    slices = _Slices(array, "export_tiff")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with tifffile.TiffWriter(
            tmp, bigtiff=slices.dtype.itemsize * int(np.prod(slices.shape)) > 2**31
        ) as tw:
            for page in slices:
                tw.write(page, photometric="minisblack", metadata=None)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def export_png(array: Any, folder: str | Path, *, prefix: str = "slice") -> list[Path]:
    """Write a (z, y, x) array as PNG pages ``<prefix>_0000.png``... (8 or 16-bit)."""
    slices = _Slices(array, "export_png")
    if slices.dtype.kind == "i":
        raise InvalidArgumentError(
            f"PNG cannot hold signed {slices.dtype.name} pixels; export as TIFF", field="array"
        )
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    digits = max(4, len(str(slices.shape[0] - 1)))
    written = []
    for z, page in enumerate(slices):
        target = out / f"{prefix}_{z:0{digits}d}.png"
        tmp = target.with_name(target.name + ".tmp")
        Image.fromarray(np.ascontiguousarray(page)).save(tmp, format="PNG")
        tmp.replace(target)
        written.append(target)
    return written
