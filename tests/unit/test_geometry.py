"""Property tests of block planning and mirror-padded reads (deep3m.core.geometry)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from deep3m.core.errors import InvalidArgumentError
from deep3m.core.geometry import Box, plan_blocks, read_padded
from hypothesis import given, settings
from hypothesis import strategies as st

sizes = st.integers(min_value=1, max_value=13)
shape3 = st.tuples(sizes, sizes, sizes)
halo3 = st.tuples(*(st.integers(min_value=0, max_value=6),) * 3)

FAST = settings(max_examples=60, deadline=None)


def reflect_reference(data: np.ndarray, box: Box) -> np.ndarray:
    """The expected read: per axis numpy 'reflect', or repeating a single voxel."""
    pad = [
        (max(0, -a), max(0, b - s)) for a, b, s in zip(box.start, box.stop, data.shape, strict=True)
    ]
    out = data
    for axis, (before, after) in enumerate(pad):
        if before or after:
            widths = [(0, 0)] * data.ndim
            widths[axis] = (before, after)
            out = np.pad(out, widths, mode="reflect" if data.shape[axis] > 1 else "edge")
    shifted = box.translate([p[0] for p in pad])
    return out[shifted.slices()]


@FAST
@given(volume=shape3, block=shape3, halo=halo3)
def test_cores_cover_every_voxel_exactly_once(volume, block, halo) -> None:
    plan = plan_blocks(volume, block, halo)
    coverage = np.zeros(volume, dtype=np.int32)
    count = 0
    for b in plan:
        coverage[b.core.slices()] += 1
        assert b.read == b.core.grow(halo)
        count += 1
    assert count == len(plan) == int(np.prod(plan.grid_shape))
    assert (coverage == 1).all()


@FAST
@given(
    volume=shape3,
    grid=st.tuples(*(st.integers(1, 5),) * 3),
    factor=st.tuples(*(st.integers(1, 3),) * 3),
)
def test_cores_align_to_the_chunk_grid_and_edges_are_clipped(volume, grid, factor) -> None:
    block = tuple(g * f for g, f in zip(grid, factor, strict=True))
    plan = plan_blocks(volume, block, grid=grid)
    owners: dict[tuple[int, ...], int] = {}
    for n, b in enumerate(plan):
        for a, e, g, v, bs in zip(b.core.start, b.core.stop, grid, volume, block, strict=True):
            assert a % g == 0
            assert e % g == 0 or e == v, "a core may end off-grid only at the volume edge"
            assert e <= v
            assert e - a == bs or e == v, "only edge blocks are smaller than block_shape"
        # Every chunk this core touches lies wholly inside it.
        cells = [
            range(a // g, -(-e // g))
            for a, e, g in zip(b.core.start, b.core.stop, grid, strict=True)
        ]
        for cell in itertools.product(*cells):
            cell_box = Box(
                tuple(c * g for c, g in zip(cell, grid, strict=True)),
                tuple(min((c + 1) * g, v) for c, g, v in zip(cell, grid, volume, strict=True)),
            )
            assert b.core.contains(cell_box)
            assert cell not in owners, f"chunk {cell} owned by blocks {owners.get(cell)} and {n}"
            owners[cell] = n
    assert len(owners) == int(np.prod([-(-v // g) for v, g in zip(volume, grid, strict=True)]))


@FAST
@given(volume=shape3, block=shape3, halo=halo3, seed=st.integers(0, 2**16))
def test_read_padded_then_crop_gives_back_the_core(volume, block, halo, seed) -> None:
    data = np.random.default_rng(seed).integers(0, 1000, size=volume, dtype=np.int32)
    for b in plan_blocks(volume, block, halo):
        read = read_padded(data, b.read)
        assert read.shape == b.read.shape
        np.testing.assert_array_equal(read[b.core.relative_to(b.read)], data[b.core.slices()])


@FAST
@given(volume=st.tuples(*(st.integers(2, 9),) * 3), halo=halo3, seed=st.integers(0, 2**16))
def test_mirror_padding_matches_numpy_reflect(volume, halo, seed) -> None:
    data = np.random.default_rng(seed).integers(0, 1000, size=volume, dtype=np.int32)
    box = Box.from_shape(volume).grow(halo)
    expected = np.pad(data, [(h, h) for h in halo], mode="reflect")
    np.testing.assert_array_equal(read_padded(data, box), expected)


@FAST
@given(volume=shape3, block=shape3, halo=halo3, seed=st.integers(0, 2**16))
def test_mirror_padding_per_axis_including_single_voxel_axes(volume, block, halo, seed) -> None:
    # A single slice (z = 1) must not change how y and x are mirrored.
    data = np.random.default_rng(seed).integers(0, 1000, size=volume, dtype=np.int32)
    for b in plan_blocks(volume, block, halo):
        np.testing.assert_array_equal(read_padded(data, b.read), reflect_reference(data, b.read))


@pytest.mark.parametrize("block", [(0, 4, 4), (4, -1, 4), (4, 4, 0), (4, 4)])
def test_zero_negative_or_wrong_rank_block_shape_is_refused(block) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        plan_blocks((8, 8, 8), block)
    assert err.value.field == "block_shape"
    assert "block_shape" in err.value.message
    assert str(list(block)) in err.value.message


@FAST
@given(grid=st.tuples(*(st.integers(2, 6),) * 3), axis=st.integers(0, 2), offset=st.integers(1, 5))
def test_block_shape_off_the_chunk_grid_is_refused(grid, axis, offset) -> None:
    block = list(grid)
    block[axis] = grid[axis] + offset % grid[axis] or grid[axis] + 1
    if block[axis] % grid[axis] == 0:
        block[axis] += 1
    with pytest.raises(InvalidArgumentError) as err:
        plan_blocks((40, 40, 40), block, grid=grid)
    assert err.value.field == "block_shape"
    assert str(block) in err.value.message
    assert str(list(grid)) in err.value.message
