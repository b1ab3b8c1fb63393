"""The levels of a multiscale pyramid over a volume: pure arithmetic on its shape.

Each level halves y and x. z is halved only once the in-plane voxel size has
caught up with it (when halving z brings the level closer to isotropic: z
voxel size × √2 ≤ the new y size), so anisotropic EM (e.g. 40 × 6 × 6 nm)
keeps every slice in the first levels while isotropic data shrinks in all
three axes. Shared by the scheduler (which plans one stage per level) and the
postprocess role (which writes them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from deep3m.core.errors import InvalidArgumentError

MAX_LEVELS = 16
# Automatic depth: stop once the largest in-plane side fits in this many voxels.
AUTO_STOP_SIDE = 256


@dataclass(frozen=True)
class Level:
    path: str
    shape: tuple[int, int, int]
    factor: tuple[int, int, int]  # relative to the previous level
    scale_nm: tuple[float, float, float]
    translation_nm: tuple[float, float, float]


def plan_levels(
    shape: Sequence[int], voxel_size_nm: Sequence[float], levels: int = 0
) -> list[Level]:
    """Levels 1.. of a pyramid over a level-0 ``shape``; ``levels=0`` chooses the depth."""
    if levels < 0 or levels > MAX_LEVELS:
        raise InvalidArgumentError(
            f"levels must lie in 0..{MAX_LEVELS} (0: automatic), got {levels}", field="levels"
        )
    base = np.asarray(voxel_size_nm, float)
    cur_shape = np.asarray(shape, int)
    scale = base.copy()
    out: list[Level] = []
    while len(out) < (levels or MAX_LEVELS):
        if levels == 0 and max(cur_shape[1:]) <= AUTO_STOP_SIDE:
            break
        if max(cur_shape[1:]) <= 1:
            if levels:
                raise InvalidArgumentError(
                    f"a {list(shape)} volume has at most {len(out)} pyramid levels, "
                    f"{levels} were asked for",
                    field="levels",
                )
            break
        # Halve z when that leaves it at most sqrt(2) coarser than the new in-plane
        # size, i.e. when halving brings the level closer to isotropic.
        fz = 2 if scale[0] * np.sqrt(2) <= 2 * scale[1] and cur_shape[0] > 1 else 1
        factor = np.array([fz, 2, 2])
        cur_shape = -(-cur_shape // factor)
        scale = scale * factor
        translation = (scale - base) / 2
        out.append(
            Level(
                str(len(out) + 1),
                (int(cur_shape[0]), int(cur_shape[1]), int(cur_shape[2])),
                (int(factor[0]), int(factor[1]), int(factor[2])),
                (float(scale[0]), float(scale[1]), float(scale[2])),
                (float(translation[0]), float(translation[1]), float(translation[2])),
            )
        )
    return out


def level_block(
    block: Sequence[int], level: int, levels: Sequence[Level], grid: Sequence[int]
) -> list[int]:
    """The task region of pyramid level ``level`` (1..) of a blockwise labelling: the
    labelling block shrunk by the level's total factor, so a task reads about one
    block of level 0, rounded down to whole grid cells (at least one) where the
    level spans a cell, else the whole axis (the level's one chunk)."""
    total = np.prod([lv.factor for lv in levels[:level]], axis=0)
    shape = levels[level - 1].shape
    return [
        max(g, (int(b) // int(f)) // g * g) if s >= g else int(s)
        for b, f, s, g in zip(block, total, shape, grid, strict=True)
    ]


def level_one_in_blocks(
    shape: Sequence[int], block: Sequence[int], levels: Sequence[Level], grid: Sequence[int]
) -> bool:
    """Whether level 1's task regions are exactly the level-0 blocks downsampled
    (the same grid of tasks, each region its block divided by the factor): then
    the task that writes a block can write its level-1 region from memory."""
    if not levels:
        return False
    region = level_block(block, 1, levels, grid)
    for s, b, r, f, s1 in zip(shape, block, region, levels[0].factor, levels[0].shape, strict=True):
        one_block = int(b) >= int(s) and int(r) >= int(s1)
        if not one_block and int(r) * int(f) != int(b):
            return False
    return True
