"""Intensity statistics and histograms of a volume, computed block by block.

Memory stays bounded by one block per worker whatever the volume size. Min,
max, mean and standard deviation are exact (means and squared deviations are
merged per block with Chan's parallel formula). Percentiles follow numpy's
default (linear interpolation between order statistics): exact for 8- and
16-bit integers, which are counted per value; for other types they come from a
65,536-bin histogram between min and max (error below one bin width).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.executor import bounded_map
from deep3m.core.geometry import Box, plan_blocks

MAX_HISTOGRAM_BINS = 65536
DEFAULT_HISTOGRAM_BINS = 256
FINE_BINS = 65536
# A block of about this many bytes per read keeps memory bounded and reads large.
TARGET_BLOCK_BYTES = 32 * 1024 * 1024
PERCENTILES = (1.0, 50.0, 99.0)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class IntensityStatistics:
    count: int
    min: float
    max: float
    mean: float
    std: float
    p01: float
    p50: float
    p99: float


@dataclass(frozen=True)
class Histogram:
    """``counts[i]`` values fall in ``[edges[i], edges[i+1])`` (the last bin is closed)."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]


@dataclass(frozen=True)
class VolumeStatistics:
    statistics: IntensityStatistics
    histogram: Histogram


@dataclass
class _Moments:
    """Running count, mean and sum of squared deviations (Chan et al.)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf

    @classmethod
    def of(cls, data: np.ndarray) -> _Moments:
        if data.size == 0:
            return cls()
        values = data.astype(np.float64, copy=False)
        mean = float(values.mean())
        m2 = float(np.square(values - mean).sum())
        return cls(int(values.size), mean, m2, float(values.min()), float(values.max()))

    def merge(self, other: _Moments) -> None:
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean, other.m2
            self.lo, self.hi = other.lo, other.hi
            return
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / n
        self.m2 += other.m2 + delta * delta * self.count * other.count / n
        self.count = n
        self.lo = min(self.lo, other.lo)
        self.hi = max(self.hi, other.hi)


def statistics_block_shape(
    shape: Sequence[int], grid: Sequence[int], itemsize: int, target_bytes: int = TARGET_BLOCK_BYTES
) -> tuple[int, ...]:
    """Whole grid cells, grown along x, then y, then z up to about ``target_bytes``."""
    block = [min(int(g), int(s)) for g, s in zip(grid, shape, strict=True)]
    for axis in reversed(range(len(block))):
        while block[axis] < shape[axis]:
            grown = block.copy()
            grown[axis] = min(block[axis] * 2, int(shape[axis]))
            # Keep whole cells so every read maps onto whole chunks.
            grown[axis] = -(-grown[axis] // int(grid[axis])) * int(grid[axis])
            if int(np.prod(grown)) * itemsize > target_bytes:
                return tuple(block)
            block = grown
    return tuple(block)


def _blocks(array: Any, block_shape: Sequence[int] | None) -> list[Box]:
    shape = tuple(int(s) for s in array.shape)
    grid = getattr(array, "shards", None) or getattr(array, "chunks", None) or shape
    block = (
        tuple(block_shape)
        if block_shape
        else statistics_block_shape(shape, grid, np.dtype(array.dtype).itemsize)
    )
    return [b.core for b in plan_blocks(shape, block)]


def _exact_counts(dtype: np.dtype[Any]) -> tuple[int, int] | None:
    """(offset, number of values) when every value can be counted individually."""
    if dtype.kind in "ub" and dtype.itemsize <= 2:
        return 0, 2 ** (8 * dtype.itemsize)
    if dtype.kind == "i" and dtype.itemsize <= 2:
        return 2 ** (8 * dtype.itemsize - 1), 2 ** (8 * dtype.itemsize)
    return None


def _percentile_from_counts(values: np.ndarray, cumulative: np.ndarray, q: float) -> float:
    """numpy's linear percentile, given sorted distinct values and cumulative counts."""
    n = int(cumulative[-1])
    rank = (n - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    v_lo = float(values[np.searchsorted(cumulative, lo, side="right")])
    v_hi = float(values[np.searchsorted(cumulative, hi, side="right")])
    return v_lo + (rank - lo) * (v_hi - v_lo)


def _check_bins(bins: int) -> int:
    if not 1 <= int(bins) <= MAX_HISTOGRAM_BINS:
        raise InvalidArgumentError(
            f"histogram_bins must be between 1 and {MAX_HISTOGRAM_BINS}, got {bins}",
            field="histogram_bins",
        )
    return int(bins)


def _finite(data: np.ndarray) -> np.ndarray:
    return data[np.isfinite(data)] if data.dtype.kind in "fc" else data


def compute_statistics(
    array: Any,
    *,
    bins: int = DEFAULT_HISTOGRAM_BINS,
    block_shape: Sequence[int] | None = None,
    workers: int = 4,
) -> VolumeStatistics:
    """Statistics and a ``bins``-bin histogram over [min, max] of any array-like.

    ``array`` is a zarr array or anything with ``shape``, ``dtype`` and numpy
    slicing. NaN and infinite values (float data) are left out.
    """
    bins = _check_bins(bins)
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "uibf":
        raise InvalidArgumentError(f"cannot compute statistics of {dtype.name} data", field="dtype")
    boxes = _blocks(array, block_shape)

    def read(box: Box) -> np.ndarray:
        return _finite(np.asarray(array[box.slices()]))

    exact = _exact_counts(dtype)
    moments = _Moments()
    if exact is not None:
        offset, size = exact
        counts = np.zeros(size, dtype=np.int64)

        def first_pass(box: Box) -> tuple[_Moments, np.ndarray]:
            data = read(box)
            shifted = data.astype(np.int64).ravel() + offset if offset else data.ravel()
            return _Moments.of(data), np.bincount(shifted, minlength=size)

        for _, (block_moments, block_counts) in bounded_map(first_pass, boxes, workers):
            moments.merge(block_moments)
            counts += block_counts
        present = np.nonzero(counts)[0]
        values = (present - offset).astype(np.float64)
        weights = counts[present]
    else:
        for _, block_moments in bounded_map(lambda b: _Moments.of(read(b)), boxes, workers):
            moments.merge(block_moments)
        values, weights, direct = _fine_histogram(read, boxes, moments, bins, workers)
    if moments.count == 0:
        empty = IntensityStatistics(0, *(math.nan,) * 7)
        return VolumeStatistics(empty, Histogram((), ()))
    cumulative = np.cumsum(weights)
    p01, p50, p99 = (_percentile_from_counts(values, cumulative, q) for q in PERCENTILES)
    # Integer data: binning the distinct values with their counts equals binning
    # every voxel. Other data was binned voxel by voxel in the second pass.
    hist_counts, edges = np.histogram(
        values, bins=bins, range=(moments.lo, moments.hi), weights=weights
    )
    if exact is None:
        hist_counts = direct
    stats = IntensityStatistics(
        count=moments.count,
        min=moments.lo,
        max=moments.hi,
        mean=moments.mean,
        std=math.sqrt(moments.m2 / moments.count),
        p01=p01,
        p50=p50,
        p99=p99,
    )
    histogram = Histogram(
        tuple(float(e) for e in edges), tuple(int(c) for c in np.rint(hist_counts).astype(np.int64))
    )
    return VolumeStatistics(stats, histogram)


def _fine_histogram(
    read: Callable[[Box], np.ndarray],
    boxes: list[Box],
    moments: _Moments,
    bins: int,
    workers: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Second pass for non-integer data.

    Returns the centres and counts of the occupied bins of a fine histogram (for
    percentiles) and the counts of the requested ``bins``-bin histogram.
    """
    if moments.count == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(bins, dtype=np.int64)
    value_range = (moments.lo, moments.hi)
    fine = np.zeros(FINE_BINS, dtype=np.int64)
    direct = np.zeros(bins, dtype=np.int64)

    def count(box: Box) -> tuple[np.ndarray, np.ndarray]:
        data = read(box)
        return (
            np.histogram(data, bins=FINE_BINS, range=value_range)[0],
            np.histogram(data, bins=bins, range=value_range)[0],
        )

    for _, (block_fine, block_direct) in bounded_map(count, boxes, workers):
        fine += block_fine
        direct += block_direct
    if moments.lo == moments.hi:
        return np.array([moments.lo]), np.array([moments.count], dtype=np.int64), direct
    edges = np.linspace(moments.lo, moments.hi, FINE_BINS + 1)
    # A value is represented by its bin's centre; min and max are exact.
    centres = (edges[:-1] + edges[1:]) / 2
    centres[0], centres[-1] = moments.lo, moments.hi
    present = np.nonzero(fine)[0]
    return centres[present], fine[present], direct
