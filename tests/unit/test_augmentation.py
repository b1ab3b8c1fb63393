"""CDeep3M's 16 variations and speed levels (deep3m.core.augmentation)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from deep3m.core.augmentation import (
    ALL_VARIATIONS,
    IN_PLANE_VARIATIONS,
    SPEED_LEVELS,
    apply_variation,
    check_variation,
    invert_variation,
    member_row,
    swaps_yx,
    tta_variations,
)
from deep3m.core.errors import InvalidArgumentError
from hypothesis import given, settings
from hypothesis import strategies as st

# The speed-level table as the issue states it (CDeep3M's runprediction levels).
ISSUE_LEVELS = {
    1: {"1fm": range(1, 9), "3fm": range(1, 17), "5fm": range(1, 17)},
    2: {"1fm": [1, 6, 11, 15], "3fm": [1, 2, 3, 4, 13, 14, 15, 16], "5fm": range(5, 13)},
    4: {"1fm": [2, 3, 6, 7], "3fm": [7, 8, 10, 12], "5fm": [1, 6, 11, 15]},
    10: {"1fm": [1], "3fm": [1], "5fm": [1]},
}


def test_speed_levels_equal_the_issue_table() -> None:
    assert set(SPEED_LEVELS) == set(ISSUE_LEVELS)
    for level, rows in ISSUE_LEVELS.items():
        assert set(SPEED_LEVELS[level]) == set(rows)
        for member, variations in rows.items():
            assert tta_variations(level, member) == tuple(variations)


def test_unknown_level_and_member_are_named() -> None:
    with pytest.raises(InvalidArgumentError, match="tta_level must be one of") as exc:
        tta_variations(3, "1fm")
    assert exc.value.field == "tta_level"
    with pytest.raises(InvalidArgumentError, match="'7fm'") as exc:
        tta_variations(1, "7fm")
    assert exc.value.field == "members"


@pytest.mark.parametrize("v", [0, 17, -1, True])
def test_variation_out_of_range(v: int) -> None:
    with pytest.raises(InvalidArgumentError, match=r"1\.\.16"):
        check_variation(v)


@pytest.mark.parametrize(("frames", "row"), [(1, "1fm"), (3, "3fm"), (5, "5fm"), (7, "5fm")])
def test_member_row_by_frames(frames: int, row: str) -> None:
    assert member_row(frames) == row


def test_in_plane_variations_follow_cdeep3m() -> None:
    # augment_image_data_only.m with y = rows, x = columns, rot90 counter-clockwise.
    m = np.array([[1, 2], [3, 4]])
    expected = {
        1: [[1, 2], [3, 4]],  # identity
        2: [[3, 4], [1, 2]],  # flipdim(., 1): flip y
        3: [[2, 1], [4, 3]],  # flipdim(., 2): flip x
        4: [[2, 4], [1, 3]],  # rot90
        5: [[3, 1], [4, 2]],  # rot90(., -1)
        6: [[4, 2], [3, 1]],  # rot90(flipdim(., 1))
        7: [[1, 3], [2, 4]],  # rot90(flipdim(., 2))
        8: [[4, 3], [2, 1]],  # rot90(., 2)
    }
    for v, want in expected.items():
        np.testing.assert_array_equal(apply_variation(m, v, has_z=False), want)
        np.testing.assert_array_equal(apply_variation(m[None], v)[0], want)


def test_in_plane_variations_are_distinct() -> None:
    x = np.arange(25).reshape(1, 5, 5)
    images = [apply_variation(x, v).tobytes() for v in IN_PLANE_VARIATIONS]
    assert len(set(images)) == 8


def test_all_sixteen_distinct_and_upper_half_is_z_reversed() -> None:
    x = np.arange(3 * 4 * 4).reshape(3, 4, 4)
    images = [apply_variation(x, v).tobytes() for v in ALL_VARIATIONS]
    assert len(set(images)) == 16
    for v in IN_PLANE_VARIATIONS:
        np.testing.assert_array_equal(apply_variation(x, v + 8), apply_variation(x[::-1], v))


def test_without_z_the_upper_half_repeats_the_lower() -> None:
    x = np.arange(12).reshape(3, 4)
    for v in IN_PLANE_VARIATIONS:
        np.testing.assert_array_equal(
            apply_variation(x, v + 8, has_z=False), apply_variation(x, v, has_z=False)
        )


@pytest.mark.parametrize("v", ALL_VARIATIONS)
def test_inverse_is_exact_numpy_and_torch(v: int) -> None:
    rng = np.random.default_rng(v)
    x = rng.random((2, 3, 5, 7)).astype(np.float32)  # batch, z, y, x; y != x
    y = apply_variation(x, v)
    assert y.shape[-2:] == ((7, 5) if swaps_yx(v) else (5, 7))
    np.testing.assert_array_equal(invert_variation(y, v), x)
    t = torch.from_numpy(x)
    ty = apply_variation(t, v)
    assert torch.equal(invert_variation(ty, v), t)
    np.testing.assert_array_equal(ty.numpy(), y)  # numpy and torch agree


def test_swaps_yx_for_odd_quarter_turns() -> None:
    assert [v for v in ALL_VARIATIONS if swaps_yx(v)] == [4, 5, 6, 7, 12, 13, 14, 15]


@settings(max_examples=40, deadline=None)
@given(
    v=st.sampled_from(ALL_VARIATIONS),
    shape=st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6)),
)
def test_inverse_property(v: int, shape: tuple[int, int, int]) -> None:
    x = np.arange(int(np.prod(shape))).reshape(shape)
    np.testing.assert_array_equal(invert_variation(apply_variation(x, v), v), x)


def test_variations_form_the_group_of_the_square() -> None:
    # Composition of two in-plane variations is again one of the eight.
    x = np.arange(9).reshape(1, 3, 3)
    table = {apply_variation(x, v).tobytes(): v for v in IN_PLANE_VARIATIONS}
    for a, b in itertools.product(IN_PLANE_VARIATIONS, repeat=2):
        assert apply_variation(apply_variation(x, a), b).tobytes() in table
