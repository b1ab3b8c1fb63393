"""The pieces an ingest job runs as tasks: create the incomplete volume, write one
z-range into it, mark it complete.

Each range counts the grey levels of the data it writes
(:mod:`deep3m.core.grey_levels`); a task keeps its range's counts in a small
document of the job (:func:`deep3m.core.store.keys.ingest_documents`) and the
finalize step adds them up into the volume's attributes, so the volume is read
only once, by the copy itself.
"""

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
from deep3m.core.grey_levels import GreyLevels
from deep3m.core.imageio import ImageSource, open_source
from deep3m.core.ingest.plan import IngestPlan, z_ranges
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
) -> tuple[int, GreyLevels]:
    """Copy slices ``[z_start, z_stop)``, one chunk (or shard) layer at a time; returns
    the bytes written and the grey levels of what was written."""
    written = 0
    layers = []
    for z in range(z_start, z_stop, unit):
        if any(event is not None and event.is_set() for event in stop_when):
            raise CancelledError(f"ingest of slices {z_start}..{z_stop} was cancelled")
        stop = min(z + unit, z_stop)
        data = source.read(z, stop)
        array[z:stop] = data
        written += data.nbytes
        layers.append(GreyLevels.of(data))
    return written, GreyLevels.total(layers)


def _range_name(z_start: int, z_stop: int) -> str:
    return f"{z_start:09d}-{z_stop:09d}.json"


def ingest_range(
    source: str | ImageSource,
    store: Store,
    output_path: str,
    z_start: int,
    z_stop: int,
    *,
    cancelled: threading.Event | None = None,
    storage_options: Mapping[str, Any] | None = None,
    documents: tuple[Store, str] | None = None,
) -> int:
    """Write slices ``[z_start, z_stop)`` of ``source`` into the created volume.

    The range must start on a chunk (or shard) layer and end on one or at the
    last slice. Idempotent: a retry rewrites the same chunks (and the same
    document). Returns the uncompressed bytes written. ``documents`` (store,
    prefix) is where the range's grey-level counts go for :func:`finalize_ingest`.
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
        written, levels = write_range(array, src, z_start, z_stop, unit, cancelled)
        if documents is not None:
            docs, prefix = documents
            docs.write_json(f"{prefix}/{_range_name(z_start, z_stop)}", levels.to_json())
        return written
    finally:
        if isinstance(source, str):
            src.close()


def gather_levels(
    documents: tuple[Store, str], depth: int, unit: int, slices_per_task: int
) -> GreyLevels | None:
    """The volume's grey levels from its ranges' documents; None unless every range of
    the plan left one (e.g. a range written by an older worker)."""
    docs, prefix = documents
    present = set(docs.list(prefix))
    parts = []
    for z_start, z_stop in z_ranges(depth, unit, slices_per_task):
        name = _range_name(z_start, z_stop)
        if name not in present:
            return None
        parts.append(GreyLevels.from_json(docs.read_json(f"{prefix}/{name}"), where=name))
    return GreyLevels.total(parts)


def finalize_ingest(
    store: Store, output_path: str, *, levels: GreyLevels | None = None, **extra: Any
) -> VolumeInfo:
    """Mark an ingested volume complete (the last step; readers accept it from now),
    recording its grey levels when known."""
    path = check_key(output_path)
    recorded = levels.attributes() if levels is not None else {}
    store.mark_complete(path, ingested_unix_s=time.time(), **recorded, **extra)
    return store.volume_info(path)
