"""The pieces an ingest job runs as tasks: create the incomplete volume, write one
z-range into it, mark it complete."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from deep3m.core.errors import (
    AlreadyExistsError,
    CancelledError,
    FailedPreconditionError,
    InvalidArgumentError,
)
from deep3m.core.imageio import ImageSource, open_source
from deep3m.core.ingest.plan import IngestPlan
from deep3m.core.store import Store, VolumeInfo, check_key


def create_ingest_volume(
    store: Store, output_path: str, plan: IngestPlan, *, overwrite: bool = False
) -> zarr.Array:
    """Create the (incomplete) output volume of ``plan``; ingest tasks fill it."""
    path = check_key(output_path)
    if not path:
        raise InvalidArgumentError("output path is empty", field="output.path")
    if not overwrite and store.exists(path):
        note = ""
        try:
            if not store.volume_info(path).complete:
                note = " (incomplete: an earlier ingest failed or is still running)"
        except Exception:  # anything unreadable there is still in the way
            note = ""
        raise AlreadyExistsError(
            f"{store.key_url(path)} already exists{note}; choose another path or overwrite",
            field="output.path",
        )
    return store.create_volume(
        path,
        plan.shape,
        plan.dtype,
        voxel_size_nm=plan.voxel_size_nm,
        chunk_shape=plan.chunk_shape,
        shard_shape=plan.shard_shape,
        overwrite=overwrite,
        attributes={"ingest": {"source": plan.source, "tasks": len(plan.z_ranges)}},
    )


def _check_target(array: zarr.Array, source: ImageSource, where: str) -> int:
    dtype = np.dtype(str(array.dtype))
    if tuple(array.shape) != source.shape or dtype != source.dtype:
        raise FailedPreconditionError(
            f"{where} is {tuple(array.shape)} {array.dtype} but {source.description} is "
            f"{source.shape} {source.dtype}",
            field="output",
        )
    return int((array.shards or array.chunks)[0])


def write_range(
    array: zarr.Array,
    source: ImageSource,
    z_start: int,
    z_stop: int,
    unit: int,
    *stop_when: threading.Event | None,
) -> int:
    """Copy slices ``[z_start, z_stop)``, one chunk (or shard) layer at a time."""
    written = 0
    for z in range(z_start, z_stop, unit):
        if any(event is not None and event.is_set() for event in stop_when):
            raise CancelledError(f"ingest of slices {z_start}..{z_stop} was cancelled")
        stop = min(z + unit, z_stop)
        data = source.read(z, stop)
        array[z:stop] = data
        written += data.nbytes
    return written


def ingest_range(
    source: str | ImageSource,
    store: Store,
    output_path: str,
    z_start: int,
    z_stop: int,
    *,
    cancelled: threading.Event | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> int:
    """Write slices ``[z_start, z_stop)`` of ``source`` into the created volume.

    The range must start on a chunk (or shard) layer and end on one or at the
    last slice. Idempotent: a retry rewrites the same chunks. Returns the
    uncompressed bytes written.
    """
    path = check_key(output_path)
    # A task reads only its own slices: per-slice headers are checked as they are read.
    src = (
        open_source(source, storage_options=storage_options, verify=False, workers=1)
        if isinstance(source, str)
        else source
    )
    try:
        array = store.open_volume(path, mode="r+", require_complete=False)
        unit = _check_target(array, src, store.key_url(path))
        depth = src.shape[0]
        if (
            not (0 <= z_start < z_stop <= depth)
            or z_start % unit
            or (z_stop % unit and z_stop != depth)
        ):
            raise InvalidArgumentError(
                f"z-range [{z_start}, {z_stop}) must lie in 0..{depth} on multiples of the "
                f"chunk z-size {unit}",
                field="z_range",
            )
        return write_range(array, src, z_start, z_stop, unit, cancelled)
    finally:
        if isinstance(source, str):
            src.close()


def finalize_ingest(store: Store, output_path: str, **extra: Any) -> VolumeInfo:
    """Mark an ingested volume complete (the last step; readers accept it from now)."""
    path = check_key(output_path)
    store.mark_complete(path, ingested_unix_s=time.time(), **extra)
    return store.volume_info(path)
