"""zarr: an existing v3 array, or the full-resolution level of an OME-Zarr group."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

import numpy as np
import zarr
import zarr.storage

from deep3m.core.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from deep3m.core.imageio.locations import Location
from deep3m.core.imageio.source import ImageSource, check_dtype


class ZarrSource(ImageSource):
    """An existing zarr v3 array, or the full-resolution level of an OME-Zarr group."""

    def __init__(self, loc: Location, storage_options: Mapping[str, Any] | None) -> None:

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


def is_zarr(loc: Location) -> bool:
    name = loc.path.rstrip("/")
    if name.endswith(".zarr") or ".zarr/" in name:
        return True
    try:
        return bool(loc.fs.isdir(loc.path)) and bool(loc.fs.exists(f"{name}/zarr.json"))
    except OSError:
        return False
