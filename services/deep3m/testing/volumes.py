"""Small volumes for tests and benchmarks: stored, in memory, or synthetic."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr
from scipy import ndimage

from deep3m.core.store import Store


def write_volume(
    store: Store,
    path: str,
    data: np.ndarray,
    chunks: Sequence[int],
    *,
    voxel_size_nm: Sequence[float] = (1.0, 1.0, 1.0),
    complete: bool = True,
    **attributes: Any,
) -> zarr.Array:
    """Store ``data`` as an OME-Zarr volume at ``path`` (marked complete unless told)."""
    arr = store.create_volume(
        path,
        data.shape,
        data.dtype,
        voxel_size_nm=voxel_size_nm,
        chunk_shape=chunks,
        attributes=attributes or None,
    )
    arr[...] = data
    if complete:
        store.mark_complete(path)
    return arr


def memory_array(
    data: np.ndarray, chunks: Sequence[int], *, dtype: str | None = None
) -> zarr.Array:
    """An in-memory zarr array holding ``data`` (or zeros of ``dtype`` when given)."""
    arr = zarr.create_array(
        zarr.storage.MemoryStore(),
        shape=data.shape,
        chunks=tuple(chunks),
        dtype=dtype or data.dtype,
        fill_value=0,
    )
    if dtype is None:
        arr[...] = data
    return arr


def smooth_field(shape: Sequence[int], seed: int, sigma: float = 1.5) -> np.ndarray:
    """Gaussian-smoothed noise scaled to [0, 1] (float32): blob-like 'probabilities'."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).random(tuple(shape)), sigma)
    return ((field - field.min()) / (field.max() - field.min())).astype(np.float32)


def same_partition(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal up to a relabelling: same foreground, and a one-to-one id mapping."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape or ((got > 0) != (want > 0)).any():
        return False
    fg = want > 0
    pairs = np.unique(np.stack([got[fg], want[fg]], axis=1), axis=0)
    return len(pairs) == len(np.unique(got[fg])) == len(np.unique(want[fg]))
