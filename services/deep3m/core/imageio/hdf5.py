"""HDF5: one 2D or 3D dataset of a local file (``file.h5`` or ``file.h5:/group/data``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from deep3m.core.errors import Deep3mError, InvalidArgumentError, NotFoundError
from deep3m.core.imageio.source import ImageSource, check_dtype

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
HDF5_SPEC = re.compile(r"^(?P<file>.*?\.(?:h5|hdf5|hdf|he5))(?::(?P<dataset>.*))?$", re.IGNORECASE)


class Hdf5Source(ImageSource):
    """One 2D or 3D dataset of an HDF5 file (``file.h5`` or ``file.h5:/group/data``)."""

    def __init__(self, path: Path, dataset: str | None, display: str) -> None:

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

        with h5py.File(self._path, "r") as f:
            ds = f[self._dataset]
            data = ds[()][None] if self._two_d else ds[z_start:z_stop]
        return np.asarray(data).astype(self.dtype, copy=False)
