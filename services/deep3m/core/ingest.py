"""Ingest an image stack into an OME-Zarr volume, in parallel by z-range.

The volume is created incomplete, every z-range is written by one task (ranges
are aligned to the chunk, or shard, z-size, so each range owns whole chunks and
a retried range rewrites the same bytes), and only then is it marked complete.
``ingest`` runs all of it in this process and deletes the partial volume on any
failure or interruption; the scheduler's ingest job runs the same pieces as
tasks: ``plan_ingest`` + ``create_ingest_volume`` when the job is planned,
``ingest_range`` per task, ``finalize_ingest`` last.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from deep3m.core.errors import (
    AlreadyExistsError,
    CancelledError,
    FailedPreconditionError,
    InvalidArgumentError,
)
from deep3m.core.events import ProgressEvent
from deep3m.core.executor import bounded_map
from deep3m.core.imageio import ImageSource, open_source
from deep3m.core.store import DEFAULT_CHUNK_SHAPE, Store, VolumeInfo, check_key

log = logging.getLogger("deep3m.ingest")

Shape3 = tuple[int, int, int]
Observer = Callable[[ProgressEvent], None]
STAGE = "ingest"


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


@dataclass(frozen=True)
class IngestResult:
    path: str
    url: str
    shape: Shape3
    dtype: str
    voxel_size_nm: tuple[float, float, float]
    chunk_shape: Shape3
    shard_shape: Shape3 | None
    seconds: float
    #: Uncompressed bytes of image data written.
    bytes_written: int
    tasks: int


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


def _write_range(
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
        return _write_range(array, src, z_start, z_stop, unit, cancelled)
    finally:
        if isinstance(source, str):
            src.close()


def finalize_ingest(store: Store, output_path: str, **extra: Any) -> VolumeInfo:
    """Mark an ingested volume complete (the last step; readers accept it from now)."""
    path = check_key(output_path)
    store.mark_complete(path, ingested_unix_s=time.time(), **extra)
    return store.volume_info(path)


def ingest(
    source: str | ImageSource,
    store: Store,
    output_path: str,
    *,
    voxel_size_nm: Sequence[float] | None = None,
    chunk_shape: Sequence[int] | None = None,
    shard_shape: Sequence[int] | None = None,
    slices_per_task: int = 0,
    workers: int = 4,
    observer: Observer | None = None,
    overwrite: bool = False,
    job_id: str = "",
    cancelled: threading.Event | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> IngestResult:
    """Ingest ``source`` into ``store``/``output_path`` as a complete OME-Zarr volume.

    All slice headers are validated before anything is written. Any failure,
    cancellation or interruption deletes the partial volume and re-raises.
    """
    if workers < 1:
        raise InvalidArgumentError(f"workers must be >= 1, got {workers}", field="workers")
    started = time.monotonic()
    src = (
        open_source(source, storage_options=storage_options, workers=workers)
        if isinstance(source, str)
        else source
    )
    try:
        plan = plan_ingest(
            src,
            voxel_size_nm=voxel_size_nm,
            chunk_shape=chunk_shape,
            shard_shape=shard_shape,
            slices_per_task=slices_per_task,
        )
        path = check_key(output_path)
        array = create_ingest_volume(store, path, plan, overwrite=overwrite)
        try:
            written = _run_ranges(array, src, plan, workers, observer, job_id, cancelled, started)
            finalize_ingest(store, path, source=plan.source)
        except BaseException as exc:
            # Atomic: whatever the failure (or Ctrl-C), no partial volume stays behind.
            log.warning(
                "ingest failed; removing %s", store.key_url(path), extra={"error": str(exc)}
            )
            try:
                store.delete(path)
            except Exception:  # keep the original error; the volume still reads incomplete
                log.exception("could not remove the partial volume %s", store.key_url(path))
            _emit(
                observer, ProgressEvent(job_id, "FAILED", STAGE, message=str(exc), error=str(exc))
            )
            raise
    finally:
        if isinstance(source, str):
            src.close()
    seconds = time.monotonic() - started
    _emit(
        observer,
        ProgressEvent(
            job_id,
            "SUCCEEDED",
            STAGE,
            tasks_done=len(plan.z_ranges),
            tasks_total=len(plan.z_ranges),
            voxels_per_second=_rate(plan.nbytes // np.dtype(plan.dtype).itemsize, seconds),
            message=f"ingested {plan.source} into {store.key_url(path)}",
            metrics={"bytes": float(written), "seconds": seconds},
        ),
    )
    return IngestResult(
        path,
        store.key_url(path),
        plan.shape,
        plan.dtype,
        plan.voxel_size_nm,
        plan.chunk_shape,
        plan.shard_shape,
        seconds,
        written,
        len(plan.z_ranges),
    )


def _emit(observer: Observer | None, event: ProgressEvent) -> None:
    if observer is not None:
        observer(event)


def _rate(amount: float, seconds: float) -> float:
    return amount / seconds if seconds > 0 else 0.0


def _run_ranges(
    array: zarr.Array,
    src: ImageSource,
    plan: IngestPlan,
    workers: int,
    observer: Observer | None,
    job_id: str,
    cancelled: threading.Event | None,
    started: float,
) -> int:
    if cancelled is not None and cancelled.is_set():
        raise CancelledError("ingest was cancelled before it started")
    failed = threading.Event()
    total = len(plan.z_ranges)
    slice_voxels = plan.shape[1] * plan.shape[2]
    counts = {"done": 0, "bytes": 0, "voxels": 0}

    def run(z_range: tuple[int, int]) -> tuple[int, int]:
        try:
            nbytes = _write_range(array, src, *z_range, plan.z_unit, cancelled, failed)
        except BaseException:
            failed.set()  # the other running ranges stop at their next layer
            raise
        return z_range[1] - z_range[0], nbytes

    _emit(
        observer,
        ProgressEvent(
            job_id, "RUNNING", STAGE, tasks_total=total, message=f"ingesting {plan.source}"
        ),
    )
    # A bounded number of ranges in flight keeps memory bounded too.
    results = bounded_map(
        run, plan.z_ranges, max(1, min(workers, total)), thread_name_prefix="ingest"
    )
    try:
        for _, (slices, nbytes) in results:
            counts["done"] += 1
            counts["bytes"] += nbytes
            counts["voxels"] += slices * slice_voxels
            _progress(observer, job_id, counts["done"], total, counts["voxels"], started, plan)
    except BaseException:
        # Set before ``results`` is finalised (it waits for the running ranges):
        # they stop at their next layer.
        failed.set()
        raise
    if cancelled is not None and cancelled.is_set():
        raise CancelledError("ingest was cancelled")
    return counts["bytes"]


def _progress(
    observer: Observer | None,
    job_id: str,
    done: int,
    total: int,
    voxels: int,
    started: float,
    plan: IngestPlan,
) -> None:
    elapsed = time.monotonic() - started
    rate = _rate(voxels, elapsed)
    remaining = int(np.prod(plan.shape, dtype=np.int64)) - voxels
    _emit(
        observer,
        ProgressEvent(
            job_id,
            "RUNNING",
            STAGE,
            tasks_done=done,
            tasks_total=total,
            voxels_per_second=rate,
            eta_seconds=remaining / rate if rate > 0 else 0.0,
        ),
    )
