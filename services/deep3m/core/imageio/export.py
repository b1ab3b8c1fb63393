"""Export a (z, y, x) array as a multi-page TIFF or as PNG pages, one slice at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.imageio.source import check_dtype


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
