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

Modules: ``source`` (the ``ImageSource`` interface, pixel types), ``locations``
(local paths and URLs), one reader per format (``tiff``, ``png``, ``pages`` for
folders of single-page files, ``hdf5``, ``mrc``, ``zarr_array``), ``dispatch``
(``open_source``) and ``export``.
"""

from __future__ import annotations

from deep3m.core.imageio.dispatch import open_source, source_path
from deep3m.core.imageio.export import export_png, export_tiff
from deep3m.core.imageio.hdf5 import HDF5_SUFFIXES, Hdf5Source
from deep3m.core.imageio.mrc import MRC_SUFFIXES, MrcSource
from deep3m.core.imageio.pages import PageFolderSource
from deep3m.core.imageio.png import PNG_SUFFIXES
from deep3m.core.imageio.source import SUPPORTED_DTYPES, ImageSource, Shape3, check_dtype
from deep3m.core.imageio.tiff import TIFF_SUFFIXES, TiffStackSource
from deep3m.core.imageio.zarr_array import ZarrSource

__all__ = [
    "HDF5_SUFFIXES",
    "MRC_SUFFIXES",
    "PNG_SUFFIXES",
    "SUPPORTED_DTYPES",
    "TIFF_SUFFIXES",
    "Hdf5Source",
    "ImageSource",
    "MrcSource",
    "PageFolderSource",
    "Shape3",
    "TiffStackSource",
    "ZarrSource",
    "check_dtype",
    "export_png",
    "export_tiff",
    "open_source",
    "source_path",
]
