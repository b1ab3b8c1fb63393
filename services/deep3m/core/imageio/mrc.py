"""MRC: a volume or image stack, memory-mapped; voxel size from the header (Å)."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.imageio.source import ImageSource, check_dtype

MRC_SUFFIXES = (".mrc", ".mrcs", ".rec", ".st", ".map", ".ali")


class MrcSource(ImageSource):
    """An MRC file (volume or image stack), memory-mapped."""

    def __init__(self, path: Path, display: str) -> None:

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
