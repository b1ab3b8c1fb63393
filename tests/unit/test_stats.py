"""Blockwise intensity statistics (deep3m.core.stats) against numpy on the whole array."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from deep3m.core.errors import InvalidArgumentError
from deep3m.core.stats import compute_statistics, statistics_block_shape
from deep3m.core.store import Store
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int8", "int16"])
def test_integer_statistics_are_exact(dtype: str) -> None:
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    data = rng.normal(0 if info.min < 0 else info.max / 3, info.max / 8, size=(11, 37, 29))
    data = data.clip(info.min, info.max).astype(dtype)
    store = Store(f"memory://stats-{uuid.uuid4().hex[:8]}")
    arr = store.create_volume("v.zarr", data.shape, dtype, chunk_shape=(3, 8, 8))
    arr[:] = data
    result = compute_statistics(arr, bins=50, block_shape=(3, 16, 8), workers=3)
    s = result.statistics
    as_float = data.astype(np.float64)
    assert s.count == data.size
    assert (s.min, s.max) == (data.min(), data.max())
    assert s.mean == pytest.approx(as_float.mean(), rel=1e-12)
    assert s.std == pytest.approx(as_float.std(), rel=1e-12)
    assert (s.p01, s.p50, s.p99) == tuple(np.percentile(data, [1, 50, 99]))
    counts, edges = np.histogram(data, bins=50, range=(data.min(), data.max()))
    assert result.histogram.counts == tuple(counts)
    np.testing.assert_allclose(result.histogram.edges, edges)
    store.delete("v.zarr")


def test_float_statistics_skip_nan_and_percentiles_are_within_a_fine_bin() -> None:
    rng = np.random.default_rng(4)
    data = rng.gamma(2.0, 3.0, size=(6, 40, 40)).astype(np.float32)
    data[0, 0, :5] = np.nan
    finite = data[np.isfinite(data)].astype(np.float64)
    result = compute_statistics(data, bins=16, block_shape=(2, 20, 40))
    s = result.statistics
    assert s.count == finite.size
    assert (s.min, s.max) == (finite.min(), finite.max())
    assert s.mean == pytest.approx(finite.mean(), rel=1e-9)
    assert s.std == pytest.approx(finite.std(), rel=1e-9)
    width = (finite.max() - finite.min()) / 65536
    for got, q in zip((s.p01, s.p50, s.p99), (1, 50, 99), strict=True):
        assert abs(got - np.percentile(finite, q)) <= width
    counts, _ = np.histogram(finite, bins=16, range=(finite.min(), finite.max()))
    assert result.histogram.counts == tuple(counts)


def test_constant_volume_and_bad_bins() -> None:
    data = np.full((3, 4, 5), 7, dtype=np.uint8)
    s = compute_statistics(data, bins=4).statistics
    assert (s.min, s.max, s.mean, s.std, s.p01, s.p99) == (7, 7, 7, 0, 7, 7)
    for bins in (0, -1, 70000):
        with pytest.raises(InvalidArgumentError) as err:
            compute_statistics(data, bins=bins)
        assert err.value.field == "histogram_bins"


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(*(st.integers(1, 9),) * 3),
    block=st.tuples(*(st.integers(1, 4),) * 3),
    seed=st.integers(0, 999),
)
def test_any_block_shape_gives_the_same_answer(shape, block, seed) -> None:
    data = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    whole = compute_statistics(data, block_shape=shape, workers=1)
    blocked = compute_statistics(data, block_shape=block, workers=2)
    assert blocked.histogram == whole.histogram
    a, b = blocked.statistics, whole.statistics
    assert (a.count, a.min, a.max, a.p01, a.p50, a.p99) == (
        b.count,
        b.min,
        b.max,
        b.p01,
        b.p50,
        b.p99,
    )
    assert a.mean == pytest.approx(b.mean) and a.std == pytest.approx(b.std, abs=1e-9)


def test_statistics_blocks_are_whole_chunks_of_bounded_size() -> None:
    block = statistics_block_shape((1000, 4096, 4096), (8, 256, 256), 1, 32 * 2**20)
    assert all(b % c == 0 for b, c in zip(block, (8, 256, 256), strict=True))
    assert np.prod(block) <= 32 * 2**20
    assert statistics_block_shape((3, 10, 10), (8, 256, 256), 2) == (3, 10, 10)
