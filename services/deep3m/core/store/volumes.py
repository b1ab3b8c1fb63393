"""OME-Zarr 0.5 volumes on top of a store's keys.

A volume is a group with the full-resolution array at ``0`` and ``ome``
multiscale attributes. It is *complete* only once its writer marks it so, which
makes ingest atomic: a failed or interrupted write never looks complete.
"""

from __future__ import annotations

import posixpath
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store as ZarrStore

from deep3m.core.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    clip,
)
from deep3m.core.store.keys import check_key

FULL_RESOLUTION = "0"
# Anisotropic EM (z coarser than y/x): thin, wide chunks keep slice reads cheap.
DEFAULT_CHUNK_SHAPE: tuple[int, int, int] = (8, 256, 256)
AXES = ("z", "y", "x")


@dataclass(frozen=True)
class VolumeInfo:
    path: str
    shape: tuple[int, ...]
    dtype: str
    chunk_shape: tuple[int, ...]
    shard_shape: tuple[int, ...] | None
    voxel_size_nm: tuple[float, ...]
    complete: bool
    attributes: Mapping[str, Any] = field(default_factory=dict)


def ome_multiscales(
    name: str, voxel_size_nm: Sequence[float], levels: Sequence[tuple[str, Sequence[float]]]
) -> dict[str, Any]:
    """OME-Zarr 0.5 ``ome`` attributes for a z, y, x image."""
    return {
        "version": "0.5",
        "multiscales": [
            {
                "name": name,
                "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in AXES],
                "datasets": [
                    {
                        "path": path,
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [float(s) for s in scale]}
                        ],
                    }
                    for path, scale in levels
                ],
            }
        ],
    }


def _deep3m_attrs(group: zarr.Group) -> dict[str, Any]:
    meta = group.attrs.asdict().get("deep3m", {})
    return dict(meta) if isinstance(meta, dict) else {}


class VolumeStore(ABC):
    """Volume operations for any store that has keys and a zarr view of them."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def key_url(self, key: str) -> str: ...

    @abstractmethod
    def delete(self, prefix: str) -> None: ...

    @abstractmethod
    def zarr_store(self, key: str = "", *, read_only: bool = False) -> ZarrStore: ...

    def create_volume(
        self,
        path: str,
        shape: Sequence[int],
        dtype: str | np.dtype[Any],
        *,
        voxel_size_nm: Sequence[float] = (1.0, 1.0, 1.0),
        chunk_shape: Sequence[int] | None = None,
        shard_shape: Sequence[int] | None = None,
        fill_value: float = 0,
        overwrite: bool = False,
        attributes: Mapping[str, Any] | None = None,
    ) -> zarr.Array:
        """Create an OME-Zarr group with an empty array ``0``, marked incomplete."""
        path = check_key(path)
        shape_t = tuple(int(s) for s in shape)
        if len(shape_t) != 3 or any(s <= 0 for s in shape_t):
            raise InvalidArgumentError(
                f"volume shape must be 3 positive sizes, got {shape_t}", field="shape"
            )
        if len(voxel_size_nm) != 3 or any(v <= 0 for v in voxel_size_nm):
            raise InvalidArgumentError(
                f"voxel_size_nm must be 3 positive sizes (z, y, x), got {list(voxel_size_nm)}",
                field="voxel_size_nm",
            )
        chunks = tuple(int(c) for c in (chunk_shape or DEFAULT_CHUNK_SHAPE))
        if len(chunks) != 3 or any(c <= 0 for c in chunks):
            raise InvalidArgumentError(
                f"chunk_shape must be 3 positive sizes, got {list(chunks)}", field="chunk_shape"
            )
        chunks = tuple(min(c, s) for c, s in zip(chunks, shape_t, strict=True))
        shards: tuple[int, ...] | None = None
        if shard_shape:
            shards = tuple(int(s) for s in shard_shape)
            if len(shards) != 3 or any(
                s <= 0 or s % c for s, c in zip(shards, chunks, strict=True)
            ):
                raise InvalidArgumentError(
                    f"shard_shape {list(shards)} must be 3 positive multiples of the chunk shape "
                    f"{list(chunks)}",
                    field="shard_shape",
                )
        if self.exists(path):
            if not overwrite:
                raise AlreadyExistsError(f"{self.key_url(path)} already exists", field="output")
            self.delete(path)
        group = zarr.create_group(self.zarr_store(path), overwrite=True)
        group.attrs.update(
            {
                "ome": ome_multiscales(
                    posixpath.basename(path), voxel_size_nm, [(FULL_RESOLUTION, voxel_size_nm)]
                ),
                "deep3m": {"complete": False, **dict(attributes or {})},
            }
        )
        return group.create_array(
            FULL_RESOLUTION,
            shape=shape_t,
            chunks=chunks,
            shards=shards,
            dtype=np.dtype(dtype),
            fill_value=fill_value,
            dimension_names=AXES,
        )

    def _open_group(self, path: str, *, mode: str = "r") -> zarr.Group:
        path = check_key(path)
        try:
            return zarr.open_group(self.zarr_store(path, read_only=mode == "r"), mode=mode)  # type: ignore[arg-type]
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise NotFoundError(
                f"volume {self.key_url(path)} does not exist", field="volume"
            ) from exc

    def mark_complete(self, path: str, **extra: Any) -> None:
        group = self._open_group(path, mode="r+")
        meta = dict(_deep3m_attrs(group))
        meta.update(extra)
        meta["complete"] = True
        group.attrs["deep3m"] = meta

    def volume_info(self, path: str, array: str = "") -> VolumeInfo:
        if not self.exists(f"{check_key(path)}/zarr.json"):
            raise NotFoundError(f"volume {self.key_url(path)} does not exist", field="volume")
        group = self._open_group(path)
        arr = self._array_in(group, path, array)
        attrs: dict[str, Any] = dict(group.attrs.asdict())
        scale = (1.0, 1.0, 1.0)
        try:
            datasets = attrs["ome"]["multiscales"][0]["datasets"]
            for ds in datasets:
                if ds["path"] == (array or FULL_RESOLUTION):
                    scale = tuple(ds["coordinateTransformations"][0]["scale"])
        except (KeyError, IndexError, TypeError):
            pass
        return VolumeInfo(
            path=path,
            shape=tuple(arr.shape),
            dtype=str(arr.dtype),
            chunk_shape=tuple(arr.chunks),
            shard_shape=tuple(arr.shards) if arr.shards is not None else None,
            voxel_size_nm=tuple(float(s) for s in scale),
            complete=bool(attrs.get("deep3m", {}).get("complete", True)),
            attributes=attrs.get("deep3m", {}),
        )

    def _array_in(self, group: zarr.Group, path: str, array: str) -> zarr.Array:
        name = array or FULL_RESOLUTION
        if name.startswith("/") or any(p in ("", ".", "..") for p in name.split("/")):
            # zarr raises a bare ValueError on these; the array stays inside its volume.
            raise InvalidArgumentError(
                f"array {clip(name)} must be a name inside the volume (no '/', '.' or '..' "
                "segments)",
                field="array",
            )
        try:
            arr = group[name]
        except KeyError as exc:
            raise NotFoundError(
                f"array {name!r} not found in volume {self.key_url(path)}", field="array"
            ) from exc
        if not isinstance(arr, zarr.Array):
            raise InvalidArgumentError(
                f"{self.key_url(path)}/{name} is a group, not an array", field="array"
            )
        return arr

    def open_volume(
        self, path: str, array: str = "", *, mode: str = "r", require_complete: bool = True
    ) -> zarr.Array:
        """Open a volume's array; incomplete volumes are refused unless asked for."""
        if not self.exists(f"{check_key(path)}/zarr.json"):
            raise NotFoundError(f"volume {self.key_url(path)} does not exist", field="volume")
        group = self._open_group(path, mode="r+" if mode != "r" else "r")
        if require_complete and not _deep3m_attrs(group).get("complete", True):
            raise FailedPreconditionError(
                f"volume {self.key_url(path)} is incomplete (an ingest or job is still writing "
                "it, or failed)",
                field="volume",
            )
        return self._array_in(group, path, array)
