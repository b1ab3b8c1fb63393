"""A validated ingest: the source's shape and voxel size, the output layout, the
z-ranges of its tasks. Nothing is written here."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.imageio import ImageSource, open_source
from deep3m.core.store import DEFAULT_CHUNK_SHAPE

Shape3 = tuple[int, int, int]


@dataclass(frozen=True)
class IngestPlan:
    """A validated ingest: output layout and the z-ranges of its tasks."""

    source: str
    shape: Shape3
    dtype: str
    voxel_size_nm: tuple[float, float, float]
    chunk_shape: Shape3
    shard_shape: Shape3 | None
    z_ranges: tuple[tuple[int, int], ...]

    @property
    def z_unit(self) -> int:
        """Slices per chunk (or shard) layer: ranges start on multiples of this."""
        return (self.shard_shape or self.chunk_shape)[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "voxel_size_nm": list(self.voxel_size_nm),
            "chunk_shape": list(self.chunk_shape),
            "shard_shape": list(self.shard_shape) if self.shard_shape else None,
            "z_ranges": [list(r) for r in self.z_ranges],
        }


def _shape3(values: Sequence[int] | None, name: str) -> Shape3 | None:
    if values is None or len(values) == 0:
        return None
    try:
        shape = tuple(int(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"{name} must be 3 integers (z, y, x), got {values!r}", field=name
        ) from exc
    if len(shape) != 3 or any(v <= 0 for v in shape):
        raise InvalidArgumentError(
            f"{name} must be 3 positive sizes (z, y, x), got {list(shape)}", field=name
        )
    return (shape[0], shape[1], shape[2])


def _voxel_size(values: Sequence[float] | None, source: ImageSource) -> tuple[float, float, float]:
    if values is None or len(values) == 0:
        if source.voxel_size_nm is None:
            raise InvalidArgumentError(
                f"voxel_size_nm is required: {source.description} records no voxel size "
                "(give z, y, x in nanometres)",
                field="voxel_size_nm",
            )
        return source.voxel_size_nm
    sizes = tuple(float(v) for v in values)
    if len(sizes) != 3 or not all(math.isfinite(v) and v > 0 for v in sizes):
        raise InvalidArgumentError(
            f"voxel_size_nm must be 3 positive sizes in nanometres (z, y, x), got {list(sizes)}",
            field="voxel_size_nm",
        )
    return (sizes[0], sizes[1], sizes[2])


def _clip_layout(
    chunks: Shape3, shards: Shape3 | None, shape: Shape3
) -> tuple[Shape3, Shape3 | None]:
    """Chunks no larger than the volume; shards still whole chunks, no larger than needed."""
    clipped = (min(chunks[0], shape[0]), min(chunks[1], shape[1]), min(chunks[2], shape[2]))
    if shards is None:
        return clipped, None
    sizes = [
        v if c >= v else min(s, -(-v // c) * c)
        for s, c, v in zip(shards, chunks, shape, strict=True)
    ]
    return clipped, (sizes[0], sizes[1], sizes[2])


def z_ranges(depth: int, unit: int, slices_per_task: int = 0) -> tuple[tuple[int, int], ...]:
    """Cut ``[0, depth)`` into ranges of ``slices_per_task`` (a multiple of ``unit``)."""
    step = slices_per_task or unit
    if step < 0 or step % unit:
        raise InvalidArgumentError(
            f"slices_per_task {slices_per_task} must be a positive multiple of the chunk "
            f"z-size {unit} (or 0 to choose it), so each task owns whole chunks",
            field="slices_per_task",
        )
    return tuple((z, min(z + step, depth)) for z in range(0, depth, step))


def plan_ingest(
    source: str | ImageSource,
    *,
    voxel_size_nm: Sequence[float] | None = None,
    chunk_shape: Sequence[int] | None = None,
    shard_shape: Sequence[int] | None = None,
    slices_per_task: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> IngestPlan:
    """Validate a source and the requested layout; nothing is written.

    ``voxel_size_nm`` empty: taken from the file's metadata (MRC, HDF5,
    OME-Zarr) or refused. ``chunk_shape`` empty: (8, 256, 256), clipped to the
    volume. ``slices_per_task`` 0: one chunk (or shard) layer per task.
    """
    src = (
        open_source(source, storage_options=storage_options) if isinstance(source, str) else source
    )
    try:
        shape = src.shape
        sizes = _voxel_size(voxel_size_nm, src)
        asked = _shape3(chunk_shape, "chunk_shape") or DEFAULT_CHUNK_SHAPE
        shards = _shape3(shard_shape, "shard_shape")
        if shards is not None and any(s % c for s, c in zip(shards, asked, strict=True)):
            raise InvalidArgumentError(
                f"shard_shape {list(shards)} must be a multiple of the chunk shape {list(asked)}",
                field="shard_shape",
            )
        chunks, shards = _clip_layout(asked, shards, shape)
        if slices_per_task < 0:
            raise InvalidArgumentError(
                f"slices_per_task must be >= 0, got {slices_per_task}", field="slices_per_task"
            )
        unit = (shards or chunks)[0]
        ranges = z_ranges(shape[0], unit, slices_per_task)
        return IngestPlan(src.description, shape, src.dtype.name, sizes, chunks, shards, ranges)
    finally:
        if isinstance(source, str):
            src.close()
