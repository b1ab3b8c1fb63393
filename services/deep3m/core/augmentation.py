"""CDeep3M's 16 geometric variations and its test-time speed levels.

Variations 1–8 are the eight in-plane symmetries of the square (1 is the
identity; 2–4 rotate by 90°, 180°, 270°; 5 flips x; 6–8 flip x, then rotate);
9–16 are the same on the z-reversed stack. They act on the last three axes
(z, y, x) of numpy arrays or torch tensors, and each has an exact inverse, so
predictions made on a variation can be mapped back and averaged.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from deep3m.core.errors import InvalidArgumentError

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

ALL_VARIATIONS: tuple[int, ...] = tuple(range(1, 17))
IN_PLANE_VARIATIONS: tuple[int, ...] = tuple(range(1, 9))

# CDeep3M speed levels: which variations each ensemble member sees at prediction.
SPEED_LEVELS: dict[int, dict[str, tuple[int, ...]]] = {
    1: {"1fm": IN_PLANE_VARIATIONS, "3fm": ALL_VARIATIONS, "5fm": ALL_VARIATIONS},
    2: {"1fm": (1, 6, 11, 15), "3fm": (1, 2, 3, 4, 13, 14, 15, 16),
        "5fm": (5, 6, 7, 8, 9, 10, 11, 12)},
    4: {"1fm": (2, 3, 6, 7), "3fm": (7, 8, 10, 12), "5fm": (1, 6, 11, 15)},
    10: {"1fm": (1,), "3fm": (1,), "5fm": (1,)},
}


def check_variation(v: int) -> int:
    if not 1 <= int(v) <= 16:
        raise InvalidArgumentError(f"augmentation variation must be 1..16, got {v}",
                                   field="variation")
    return int(v)


def tta_variations(level: int, member: str) -> tuple[int, ...]:
    """The variations ``member`` sees at speed ``level`` (CDeep3M's table).

    Members other than 1fm/3fm/5fm (e.g. a U-Net) use the 3fm/5fm row when they
    take several frames and the 1fm row otherwise; callers pass the frame name.
    """
    if level not in SPEED_LEVELS:
        raise InvalidArgumentError(
            f"tta_level must be one of {sorted(SPEED_LEVELS)}, got {level}", field="tta_level"
        )
    row = SPEED_LEVELS[level]
    if member not in row:
        raise InvalidArgumentError(f"unknown ensemble member {member!r}; expected one of "
                                   f"{sorted(row)}", field="members")
    return row[member]


def _rot90(x: ArrayT, k: int) -> ArrayT:
    if k % 4 == 0:
        return x
    if isinstance(x, torch.Tensor):
        return torch.rot90(x, k, dims=(-2, -1))
    return np.rot90(x, k, axes=(-2, -1))


def _flip(x: ArrayT, axis: int) -> ArrayT:
    if isinstance(x, torch.Tensor):
        return torch.flip(x, dims=(axis,))
    return np.flip(x, axis=axis)


def _split(v: int) -> tuple[bool, bool, int]:
    """(z reversed, x flipped, quarter turns) of variation ``v``."""
    i = check_variation(v) - 1
    return i >= 8, (i % 8) >= 4, i % 4


def apply_variation(x: ArrayT, v: int, *, has_z: bool = True) -> ArrayT:
    """Variation ``v`` of ``x`` (…, z, y, x), or (…, y, x) when ``has_z`` is False."""
    z_rev, x_flip, turns = _split(v)
    if z_rev and has_z:
        x = _flip(x, -3)
    if x_flip:
        x = _flip(x, -1)
    return _rot90(x, turns)


def invert_variation(x: ArrayT, v: int, *, has_z: bool = True) -> ArrayT:
    """Undo :func:`apply_variation` on a prediction of the same layout."""
    z_rev, x_flip, turns = _split(v)
    x = _rot90(x, -turns)
    if x_flip:
        x = _flip(x, -1)
    if z_rev and has_z:
        x = _flip(x, -3)
    return x
