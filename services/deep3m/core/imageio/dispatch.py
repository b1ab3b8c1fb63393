"""Which reader opens a source: by URL, folder, zarr marker or file suffix."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deep3m.core.errors import InvalidArgumentError, NotFoundError
from deep3m.core.imageio.hdf5 import HDF5_SPEC, HDF5_SUFFIXES, Hdf5Source
from deep3m.core.imageio.locations import locate
from deep3m.core.imageio.mrc import MRC_SUFFIXES, MrcSource
from deep3m.core.imageio.pages import PageFolderSource, folder_source
from deep3m.core.imageio.png import PNG_SUFFIXES
from deep3m.core.imageio.source import ImageSource
from deep3m.core.imageio.tiff import TIFF_SUFFIXES, TiffStackSource
from deep3m.core.imageio.zarr_array import ZarrSource, is_zarr


def source_path(source: str) -> str:
    """The file, folder or URL a source names (``file.h5:/dataset`` gives ``file.h5``)."""
    source = source.strip()
    h5 = HDF5_SPEC.match(source)
    return h5["file"] if h5 and "://" not in source else source


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
    h5 = HDF5_SPEC.match(source)
    if h5 and "://" not in source:
        path = Path(h5["file"]).expanduser().resolve()
        if not path.is_file():
            raise NotFoundError(f"{h5['file']} does not exist", field=h5["file"])
        return Hdf5Source(path, h5["dataset"], source)
    loc = locate(source, storage_options)
    if not loc.fs.exists(loc.path):
        raise NotFoundError(f"{source} does not exist", field=source)
    if is_zarr(loc):
        return ZarrSource(loc, storage_options)
    if loc.fs.isdir(loc.path):
        return folder_source(loc, verify=verify, workers=workers)
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
