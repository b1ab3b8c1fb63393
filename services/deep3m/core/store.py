"""The object store: zarr v3 volumes and JSON documents under one root URL.

Backends: ``file://`` (default), ``s3://`` (s3fs, asynchronous inside zarr) and
``memory://`` (tests). Volumes are OME-Zarr 0.5 groups with the full-resolution
array at ``0``. A volume is *complete* only once its writer marks it so, which
makes ingest atomic: a failed or interrupted write never looks complete.
"""

from __future__ import annotations

import builtins
import json
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec
import numpy as np
import zarr
import zarr.storage
from zarr.abc.store import Store as StoreLike

from deep3m.core.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    clip,
)

SUPPORTED_SCHEMES = ("file", "s3", "memory")
FULL_RESOLUTION = "0"
# Anisotropic EM (z coarser than y/x): thin, wide chunks keep slice reads cheap.
DEFAULT_CHUNK_SHAPE: tuple[int, int, int] = (8, 256, 256)
AXES = ("z", "y", "x")


def normalize_url(url: str) -> str:
    """Canonical form of a store URL: scheme, no trailing slash, absolute files."""
    if "://" not in url:
        url = "file://" + url
    try:
        parsed = urlparse(url)
    except ValueError as exc:  # e.g. an unbalanced "[" read as an IPv6 host
        raise InvalidArgumentError(
            f"store URL {clip(url)} does not parse: {exc}", field="store_url"
        ) from None
    if parsed.scheme not in SUPPORTED_SCHEMES:
        raise InvalidArgumentError(
            f"unsupported store URL scheme {parsed.scheme!r} in {url!r}; "
            f"use one of {', '.join(s + '://' for s in SUPPORTED_SCHEMES)}",
            field="store_url",
        )
    if parsed.scheme == "file":
        local = url[len("file://") :]
        try:
            return "file://" + str(Path(local).expanduser().resolve())
        except (RuntimeError, OSError, ValueError) as exc:  # "~nobody", loops, ...
            raise InvalidArgumentError(
                f"store URL {clip(url)} names no usable local path: {exc}", field="store_url"
            ) from None
    return url.rstrip("/")


def check_key(key: str) -> str:
    """A relative key inside the store: no absolute paths, no ``..`` escapes."""
    if key.startswith("/") or "\\" in key:
        raise InvalidArgumentError(f"store path {clip(key)} must be relative", field="path")
    parts = [p for p in key.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise InvalidArgumentError(f"store path {clip(key)} leaves the store root", field="path")
    if parts and parts[0].endswith(":"):
        # "s3://bucket/x.zarr" as a path would become a local folder named "s3:".
        raise InvalidArgumentError(
            f"store path {clip(key)} is a URL; give it as the store URL, not as a store path",
            field="path",
        )
    return "/".join(parts)


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


def _dirs_under(fs: Any, full: str) -> list[str]:
    """Directory entries below ``full`` on a filesystem that has them (children first)."""
    found: list[str] = []
    try:
        entries = fs.ls(full, detail=True, refresh=True)
    except FileNotFoundError:
        return found
    for entry in entries:
        name = str(entry["name"]).rstrip("/")
        if name != full and entry.get("type") == "directory":
            found += _dirs_under(fs, name)
            found.append(name)
    return found


def _deep3m_attrs(group: zarr.Group) -> dict[str, Any]:
    meta = group.attrs.asdict().get("deep3m", {})
    return dict(meta) if isinstance(meta, dict) else {}


class Store:
    """One store root. Thread-safe for independent keys; cheap to construct."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = normalize_url(url)
        self.scheme = urlparse(self.url).scheme
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        fs_options = dict(self.storage_options) if self.scheme == "s3" else {}
        self._fs, self._root = fsspec.core.url_to_fs(self.url, **fs_options)
        self._root = self._root.rstrip("/")
        if self.scheme == "file":
            Path(self._root).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- keys and documents -------------------------------------------------
    def _full(self, key: str) -> str:
        key = check_key(key)
        return f"{self._root}/{key}" if key else self._root

    def key_url(self, key: str) -> str:
        return f"{self.url}/{check_key(key)}"

    def exists(self, key: str) -> bool:
        return bool(self._fs.exists(self._full(key)))

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._full(key)
        if self.scheme == "file":
            # Write then rename, so readers never see half a document.
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(path + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        else:
            # Object stores replace whole objects atomically on PUT.
            self._fs.pipe_file(path, data)

    def read_bytes(self, key: str) -> bytes:
        try:
            return bytes(self._fs.cat_file(self._full(key)))
        except FileNotFoundError as exc:
            raise NotFoundError(f"{self.key_url(key)} does not exist", field=key) from exc

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, key: str) -> Any:
        raw = self.read_bytes(key)
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(
                f"{self.key_url(key)} is not valid JSON: {exc}", field=key
            ) from exc

    def list(self, prefix: str) -> builtins.list[str]:
        """Immediate children of ``prefix`` (names, not keys); empty if absent."""
        try:
            entries = self._fs.ls(self._full(prefix), detail=False)
        except FileNotFoundError:
            return []
        names = sorted({posixpath.basename(str(e).rstrip("/")) for e in entries})
        return [n for n in names if n and not n.endswith(".tmp")]

    def walk_files(self, prefix: str) -> Iterator[str]:
        base = self._full(prefix)
        try:
            found = self._fs.find(base)
        except FileNotFoundError:
            return
        root_len = len(self._root) + 1
        for path in found:
            yield str(path)[root_len:]

    def delete(self, prefix: str) -> None:
        """Remove a key or a whole prefix; missing is fine."""
        path = self._full(prefix)
        if not check_key(prefix):
            raise InvalidArgumentError("refusing to delete the store root", field="path")
        try:
            if self._fs.exists(path):
                self._fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        if self.scheme == "s3":
            self._fs.invalidate_cache()
        self._prune_empty_dirs(check_key(prefix))

    def _prune_empty_dirs(self, key: str) -> None:
        """Drop directories left empty by a delete, so every backend lists alike.

        Object stores have no directories, but local disks and S3 servers with a
        real namespace (SeaweedFS) keep them and would still list them.
        """
        parts = key.split("/")
        try:
            if self.scheme == "s3":
                # Directory entries left under the deleted prefix, deepest first.
                for entry in _dirs_under(self._fs, self._full(key)):
                    self._fs.rm_file(entry + "/")
                self._fs.invalidate_cache()
            # The deleted key may remain as a directory entry (S3), then its parents.
            for depth in range(len(parts), 0, -1):
                full = self._full("/".join(parts[:depth]))
                if self._fs.exists(full) and any(
                    str(entry).rstrip("/") != full for entry in self._fs.ls(full, detail=False)
                ):
                    return
                if self.scheme == "file":
                    if Path(full).is_dir():
                        Path(full).rmdir()
                elif self.scheme == "s3":
                    self._fs.rm_file(full + "/")
                    self._fs.invalidate_cache()
        except OSError:  # includes FileNotFoundError: a concurrent writer got there first
            return
        finally:
            if self.scheme == "s3":
                # Listings cached while pruning must not hide later writes.
                self._fs.invalidate_cache()

    # -- zarr --------------------------------------------------------------
    def zarr_store(self, key: str = "", *, read_only: bool = False) -> StoreLike:
        """A zarr store rooted at ``key`` inside this store."""
        if self.scheme == "file":
            path = Path(self._full(key))
            if not read_only:
                path.mkdir(parents=True, exist_ok=True)
            return zarr.storage.LocalStore(path, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(
            self.key_url(key) if key else self.url,
            storage_options=self.storage_options or None,
            read_only=read_only,
        )

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

    def update_volume_attributes(self, path: str, **extra: Any) -> None:
        group = self._open_group(path, mode="r+")
        meta = dict(_deep3m_attrs(group))
        meta.update(extra)
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


def open_store(url: str, settings: Any = None) -> Store:
    """A store for ``url`` with S3 options from settings (or the AWS chain)."""
    options: Mapping[str, Any] = settings.storage_options() if settings is not None else {}
    return Store(url, options if url.startswith("s3://") else None)
