"""Resolving and checking the volumes a spec names, and creating the ones it makes.

Shared by the job kinds; every error names the spec field that referenced the volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from deep3m.core.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    clip,
    store_unreachable,
)
from deep3m.core.locations import StoreRoots
from deep3m.core.retry import retry_while
from deep3m.core.store import Store, VolumeInfo
from deep3m.scheduler.kinds.base import KindContext, NewVolume, VolumeFacts
from deep3m.v1 import common_pb2


def shape3(values: Sequence[int], name: str, *, minimum: int, ndim: int = 3) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    if len(out) != ndim or any(v < minimum for v in out):
        raise InvalidArgumentError(
            f"{name} must be {ndim} values (z, y, x) >= {minimum}, got {list(out)}", field=name
        )
    return out


def _with_field(exc: Exception, name: str) -> Exception:
    """Re-raise a store error under the spec field that referenced the volume."""
    if isinstance(exc, NotFoundError | InvalidArgumentError | FailedPreconditionError):
        return type(exc)(exc.message, field=name)
    return exc


def facts(store: Store, key: str, array: str, info: VolumeInfo) -> VolumeFacts:
    return VolumeFacts(
        store.url,
        key,
        array,
        tuple(int(s) for s in info.shape),
        str(info.dtype),
        tuple(int(g) for g in (info.shard_shape or info.chunk_shape)),
        tuple(float(v) for v in info.voxel_size_nm),
    )


def input_volume(
    roots: StoreRoots, ref: common_pb2.VolumeRef, name: str
) -> tuple[Store, str, VolumeInfo]:
    """A complete z, y, x volume the job reads."""
    store, key = roots.resolve(ref.store_url, ref.path, field=name)
    try:
        info = store.volume_info(key, ref.array)
    except Exception as exc:
        raise _with_field(exc, name) from exc
    if not info.complete:
        raise FailedPreconditionError(
            f"{name} volume {store.key_url(key)} is incomplete (still being written, or its "
            "writer failed)",
            field=name,
        )
    if len(info.shape) != 3:
        raise InvalidArgumentError(
            f"{name} volume {store.key_url(key)} has {len(info.shape)} axes; expected z, y, x",
            field=name,
        )
    return store, key, info


def output_location(
    roots: StoreRoots, ref: common_pb2.VolumeRef, name: str
) -> tuple[Store, str, VolumeInfo | None]:
    """The output location, and what it already holds (None when free)."""
    store, key = roots.resolve(ref.store_url, ref.path, field=name)
    if ref.array not in ("", "0"):
        raise InvalidArgumentError(
            f"{name}.array must be empty (the full-resolution array '0'), got {ref.array!r}",
            field=f"{name}.array",
        )
    if store.exists(f"{key}/zarr.json"):
        try:
            return store, key, store.volume_info(key)
        except NotFoundError as exc:
            raise AlreadyExistsError(
                f"{name} path {store.key_url(key)} already holds something that is not a "
                "deep3m volume; choose another output path",
                field=name,
            ) from exc
    if store.exists(key):
        raise AlreadyExistsError(
            f"{name} path {store.key_url(key)} already exists and is not a volume; choose "
            "another output path",
            field=name,
        )
    return store, key, None


def check_same_array(
    store: Store,
    key: str,
    info: VolumeInfo,
    name: str,
    *,
    shape: Sequence[int],
    dtype: str,
    chunks: Sequence[int] | None = None,
    shards: Sequence[int] | None = None,
) -> None:
    """An existing output is reused only when it is the array the job would create."""
    differs = [
        f"shape {list(info.shape)} (need {list(shape)})"
        if tuple(info.shape) != tuple(shape)
        else "",
        f"dtype {info.dtype} (need {dtype})" if np.dtype(info.dtype) != np.dtype(dtype) else "",
        f"chunks {list(info.chunk_shape)} (need {list(chunks)})"
        if chunks is not None and tuple(info.chunk_shape) != tuple(chunks)
        else "",
        f"shards {list(info.shard_shape or ())} (need {list(shards or ())})"
        if chunks is not None and tuple(info.shard_shape or ()) != tuple(shards or ())
        else "",
    ]
    problems = [d for d in differs if d]
    if problems:
        raise AlreadyExistsError(
            f"{name} {store.key_url(key)} already holds a different array: "
            + "; ".join(problems)
            + ". Choose another output path or remove it",
            field=name,
        )


def existing_output(
    store: Store, key: str, info: VolumeInfo | None, name: str, *, overwrite: bool, ctx: KindContext
) -> Literal["new", "reuse", "replace"]:
    """What to do with what the output location holds.

    Nothing: create it. Re-validating a submitted job: reuse its own output. A
    complete volume is replaced only with ``overwrite``; an incomplete one is the
    debris of a job that failed or was cancelled (a running job's output is
    refused by the scheduler before this), so a retry replaces it.
    """
    if info is None:
        return "new"
    if ctx.resume:
        return "reuse"
    if overwrite or not info.complete:
        return "replace"
    meta = info.attributes
    written = ", ".join(
        f"{k} {clip(meta[k], 80)}" for k in ("job", "model", "source") if meta.get(k)
    )
    raise AlreadyExistsError(
        f"{name} {store.key_url(key)} already holds a complete volume"
        + (f" ({written})" if written else "")
        + "; set overwrite (--overwrite) to replace it, or choose another path",
        field=name,
    )


def create_outputs(volumes: Sequence[NewVolume], job_id: str) -> list[NewVolume]:
    """Create a job's new output volumes (incomplete); returns those created."""
    created: list[NewVolume] = []
    try:
        for vol in volumes:
            vol.store.create_volume(
                vol.key,
                vol.shape,
                vol.dtype,
                voxel_size_nm=vol.voxel_size_nm,
                chunk_shape=vol.chunk_shape,
                shard_shape=vol.shard_shape,
                attributes={**vol.attributes, "job": job_id},
                overwrite=vol.replace,
            )
            created.append(vol)
    except Exception:
        remove_outputs(created)
        raise
    return created


def remove_outputs(volumes: Sequence[NewVolume]) -> None:
    for vol in volumes:
        vol.store.delete(vol.key)


def mark_output_complete(
    roots: StoreRoots, output: VolumeFacts, job_id: str, *, retry_s: float = 120.0
) -> None:
    """A volume every block of which is written becomes complete (an unreachable store
    is waited out for ``retry_s``)."""
    store = roots.store(output.store_url, field="output.store_url")
    retry_while(
        lambda: store.mark_complete(output.path, job=job_id), store_unreachable, budget_s=retry_s
    )
