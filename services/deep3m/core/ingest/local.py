"""Ingest in this process: plan, create, every z-range on a bounded pool, finalize;
progress as events, and no partial volume left behind on any failure."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from deep3m.core.errors import CancelledError, InvalidArgumentError
from deep3m.core.events import ProgressEvent
from deep3m.core.executor import bounded_map
from deep3m.core.grey_levels import GreyLevels
from deep3m.core.imageio import ImageSource, open_source
from deep3m.core.ingest.plan import IngestPlan, Shape3, plan_ingest
from deep3m.core.ingest.volume import create_ingest_volume, finalize_ingest, write_range
from deep3m.core.store import Store, check_key

log = logging.getLogger("deep3m.ingest")

Observer = Callable[[ProgressEvent], None]
STAGE = "ingest"


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
            written, levels = _run_ranges(
                array, src, plan, workers, observer, job_id, cancelled, started
            )
            finalize_ingest(store, path, levels=levels, source=plan.source)
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
) -> tuple[int, GreyLevels]:
    if cancelled is not None and cancelled.is_set():
        raise CancelledError("ingest was cancelled before it started")
    failed = threading.Event()
    total = len(plan.z_ranges)
    slice_voxels = plan.shape[1] * plan.shape[2]
    counts = {"done": 0, "bytes": 0, "voxels": 0}

    levels: list[GreyLevels] = []

    def run(z_range: tuple[int, int]) -> tuple[int, int, GreyLevels]:
        try:
            nbytes, range_levels = write_range(array, src, *z_range, plan.z_unit, cancelled, failed)
        except BaseException:
            failed.set()  # the other running ranges stop at their next layer
            raise
        return z_range[1] - z_range[0], nbytes, range_levels

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
        for _, (slices, nbytes, range_levels) in results:
            levels.append(range_levels)
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
    return counts["bytes"], GreyLevels.total(levels)


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
