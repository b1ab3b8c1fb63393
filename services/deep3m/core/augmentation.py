"""CDeep3M's 16 geometric variations and its test-time speed levels.

The numbering follows CDeep3M's ``augment_image_data_only.m`` and
``merge_16_probs_v3.m`` (y = image rows, x = columns; a quarter turn is
counter-clockwise, as MATLAB's ``rot90``):

====  =======================  ====  =======================
v     transform                v     transform
====  =======================  ====  =======================
1     identity                 5     quarter turn clockwise
2     flip y                   6     flip y, then a quarter turn
3     flip x                   7     flip x, then a quarter turn
4     quarter turn             8     half turn
====  =======================  ====  =======================

Variations 9–16 are 1–8 applied to the z-reversed stack. They act on the last
three axes (z, y, x) of numpy arrays or torch tensors; each has an exact
inverse, so predictions made on a variation can be mapped back and averaged.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from deep3m.core.errors import InvalidArgumentError

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

ALL_VARIATIONS: tuple[int, ...] = tuple(range(1, 17))
IN_PLANE_VARIATIONS: tuple[int, ...] = tuple(range(1, 9))
MEMBERS: tuple[str, ...] = ("1fm", "3fm", "5fm")

# CDeep3M speed levels: which variations each ensemble member sees at prediction.
SPEED_LEVELS: dict[int, dict[str, tuple[int, ...]]] = {
    1: {"1fm": IN_PLANE_VARIATIONS, "3fm": ALL_VARIATIONS, "5fm": ALL_VARIATIONS},
    2: {
        "1fm": (1, 6, 11, 15),
        "3fm": (1, 2, 3, 4, 13, 14, 15, 16),
        "5fm": (5, 6, 7, 8, 9, 10, 11, 12),
    },
    4: {"1fm": (2, 3, 6, 7), "3fm": (7, 8, 10, 12), "5fm": (1, 6, 11, 15)},
    10: {"1fm": (1,), "3fm": (1,), "5fm": (1,)},
}
# The cheapest level; the project's default when a request leaves the level unset.
IDENTITY_LEVEL = 10

_Y, _X = -2, -1
# In-plane part of variations 1–8: (axis flipped first or None, counter-clockwise quarter turns).
_IN_PLANE: dict[int, tuple[int | None, int]] = {
    1: (None, 0),
    2: (_Y, 0),
    3: (_X, 0),
    4: (None, 1),
    5: (None, -1),
    6: (_Y, 1),
    7: (_X, 1),
    8: (None, 2),
}


def check_variation(v: int) -> int:
    if isinstance(v, bool) or not 1 <= int(v) <= 16:
        raise InvalidArgumentError(
            f"augmentation variation must be 1..16, got {v}", field="variation"
        )
    return int(v)


def check_tta_level(level: int) -> int:
    if level not in SPEED_LEVELS:
        raise InvalidArgumentError(
            f"tta_level must be one of {sorted(SPEED_LEVELS)}, got {level}", field="tta_level"
        )
    return int(level)


def member_row(frames: int) -> str:
    """The speed-level row for a member with ``frames`` input slices.

    CDeep3M's rows are 1fm, 3fm and 5fm; a member taking more slices uses the
    5fm row, and one with a name outside the table (a U-Net, say) the row of
    its frame count.
    """
    if frames <= 1:
        return "1fm"
    return "3fm" if frames <= 3 else "5fm"


def tta_variations(level: int, member: str) -> tuple[int, ...]:
    """The variations ``member`` (``1fm``, ``3fm`` or ``5fm``) sees at speed ``level``."""
    row = SPEED_LEVELS[check_tta_level(level)]
    if member not in row:
        raise InvalidArgumentError(
            f"unknown ensemble member {member!r}; expected one of {sorted(row)}", field="members"
        )
    return row[member]


def _rot90(x: ArrayT, k: int) -> ArrayT:
    if k % 4 == 0:
        return x
    if isinstance(x, torch.Tensor):
        return torch.rot90(x, k, dims=(_Y, _X))
    return np.rot90(x, k, axes=(_Y, _X))


def _flip(x: ArrayT, axis: int) -> ArrayT:
    if isinstance(x, torch.Tensor):
        return torch.flip(x, dims=(axis,))
    return np.flip(x, axis=axis)


def _split(v: int) -> tuple[bool, int | None, int]:
    """(z reversed, axis flipped or None, quarter turns) of variation ``v``."""
    i = check_variation(v)
    flip_axis, turns = _IN_PLANE[(i - 1) % 8 + 1]
    return i > 8, flip_axis, turns


def swaps_yx(v: int) -> bool:
    """Whether variation ``v`` exchanges the y and x sizes (an odd number of quarter turns)."""
    return _split(v)[2] % 2 == 1


def apply_variation(x: ArrayT, v: int, *, has_z: bool = True) -> ArrayT:
    """Variation ``v`` of ``x`` (…, z, y, x), or (…, y, x) when ``has_z`` is False.

    numpy results are views; torch results are new tensors.
    """
    z_rev, flip_axis, turns = _split(v)
    if z_rev and has_z:
        x = _flip(x, -3)
    if flip_axis is not None:
        x = _flip(x, flip_axis)
    return _rot90(x, turns)


def invert_variation(x: ArrayT, v: int, *, has_z: bool = True) -> ArrayT:
    """Undo :func:`apply_variation` on a prediction of the same layout."""
    z_rev, flip_axis, turns = _split(v)
    x = _rot90(x, -turns)
    if flip_axis is not None:
        x = _flip(x, flip_axis)
    if z_rev and has_z:
        x = _flip(x, -3)
    return x
