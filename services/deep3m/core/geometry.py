"""Boxes and block planning.

A volume is cut into *core* boxes aligned to the output chunk (or shard) grid, so
exactly one task owns each chunk. A task reads its core plus a *halo* of
context; the parts of that read box outside the volume are mirror-padded, and
the halo is cropped away after processing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from deep3m.core.errors import InvalidArgumentError

Shape = tuple[int, ...]


def _as_shape(
    values: Sequence[int], name: str, *, ndim: int | None = None, minimum: int = 0
) -> Shape:
    shape = tuple(int(v) for v in values)
    if ndim is not None and len(shape) != ndim:
        raise InvalidArgumentError(
            f"{name} must have {ndim} values (z, y, x), got {list(shape)}", field=name
        )
    for v in shape:
        if v < minimum:
            raise InvalidArgumentError(
                f"{name} values must be >= {minimum}, got {list(shape)}", field=name
            )
    return shape


@dataclass(frozen=True)
class Box:
    """A half-open box ``[start, stop)`` in voxel coordinates (z, y, x)."""

    start: Shape
    stop: Shape

    def __post_init__(self) -> None:
        if len(self.start) != len(self.stop):
            raise InvalidArgumentError(
                f"box start {list(self.start)} and stop {list(self.stop)} differ in rank",
                field="box",
            )
        if any(b < a for a, b in zip(self.start, self.stop, strict=True)):
            raise InvalidArgumentError(
                f"box stop {list(self.stop)} lies before start {list(self.start)}", field="box"
            )

    @classmethod
    def from_shape(cls, shape: Sequence[int], offset: Sequence[int] | None = None) -> Box:
        off = tuple(offset) if offset is not None else (0,) * len(shape)
        return cls(
            tuple(int(o) for o in off),
            tuple(int(o) + int(s) for o, s in zip(off, shape, strict=True)),
        )

    @property
    def ndim(self) -> int:
        return len(self.start)

    @property
    def shape(self) -> Shape:
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.ndim else 0

    @property
    def empty(self) -> bool:
        return any(s == 0 for s in self.shape)

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))

    def intersect(self, other: Box) -> Box:
        start = tuple(max(a, b) for a, b in zip(self.start, other.start, strict=True))
        stop = tuple(min(a, b) for a, b in zip(self.stop, other.stop, strict=True))
        stop = tuple(max(s, e) for s, e in zip(start, stop, strict=True))
        return Box(start, stop)

    def grow(self, margin: Sequence[int]) -> Box:
        return Box(
            tuple(a - m for a, m in zip(self.start, margin, strict=True)),
            tuple(b + m for b, m in zip(self.stop, margin, strict=True)),
        )

    def translate(self, offset: Sequence[int]) -> Box:
        return Box(
            tuple(a + o for a, o in zip(self.start, offset, strict=True)),
            tuple(b + o for b, o in zip(self.stop, offset, strict=True)),
        )

    def relative_to(self, outer: Box) -> tuple[slice, ...]:
        """Slices that cut this box out of an array covering ``outer``."""
        return self.translate(tuple(-o for o in outer.start)).slices()

    def contains(self, other: Box) -> bool:
        return all(a <= c for a, c in zip(self.start, other.start, strict=True)) and all(
            d <= b for b, d in zip(self.stop, other.stop, strict=True)
        )


@dataclass(frozen=True)
class Block:
    """One unit of blockwise work: the core it writes and the box it reads."""

    index: Shape
    core: Box
    read: Box

    @property
    def id(self) -> str:
        return "b" + "-".join(str(i) for i in self.index)


@dataclass(frozen=True)
class BlockPlan:
    """A lazy grid of blocks over a volume; cheap even for millions of blocks."""

    volume_shape: Shape
    block_shape: Shape
    halo: Shape

    @property
    def grid_shape(self) -> Shape:
        return tuple(-(-v // b) for v, b in zip(self.volume_shape, self.block_shape, strict=True))

    def __len__(self) -> int:
        return int(np.prod(self.grid_shape, dtype=np.int64))

    def block_at(self, index: Sequence[int]) -> Block:
        idx = tuple(int(i) for i in index)
        if len(idx) != len(self.grid_shape) or any(
            not 0 <= i < g for i, g in zip(idx, self.grid_shape, strict=True)
        ):
            raise InvalidArgumentError(
                f"block index {list(idx)} outside grid {self.grid_shape}", field="index"
            )
        start = tuple(i * b for i, b in zip(idx, self.block_shape, strict=True))
        stop = tuple(
            min(s + b, v)
            for s, b, v in zip(start, self.block_shape, self.volume_shape, strict=True)
        )
        core = Box(start, stop)
        return Block(idx, core, core.grow(self.halo))

    def block(self, n: int) -> Block:
        """The n-th block in C order."""
        if not 0 <= n < len(self):
            raise InvalidArgumentError(
                f"block number {n} outside 0..{len(self) - 1}", field="block"
            )
        return self.block_at(np.unravel_index(n, self.grid_shape))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Block]:
        for index in itertools.product(*(range(g) for g in self.grid_shape)):
            yield self.block_at(index)


def plan_blocks(
    volume_shape: Sequence[int],
    block_shape: Sequence[int],
    halo: Sequence[int] | None = None,
    *,
    grid: Sequence[int] | None = None,
) -> BlockPlan:
    """Plan core blocks of ``block_shape`` over a volume.

    ``grid`` is the output array's chunk (or shard) shape: every core must be a
    whole number of grid cells so no two blocks write the same chunk. Edge blocks
    are clipped to the volume, which keeps them aligned too.
    """
    ndim = len(volume_shape)
    vol = _as_shape(volume_shape, "volume_shape", minimum=1)
    block = _as_shape(block_shape, "block_shape", ndim=ndim, minimum=1)
    margin = _as_shape(halo if halo is not None else (0,) * ndim, "halo", ndim=ndim)
    if grid is not None:
        cells = _as_shape(grid, "chunk_shape", ndim=ndim, minimum=1)
        misaligned = [(b, c) for b, c in zip(block, cells, strict=True) if b % c]
        if misaligned:
            raise InvalidArgumentError(
                f"block_shape {list(block)} is not a multiple of the output chunk shape "
                f"{list(cells)}: blocks would share chunks",
                field="block_shape",
            )
    return BlockPlan(vol, block, margin)


class ReadableArray(Protocol):
    shape: tuple[int, ...]

    def __getitem__(self, key: tuple[slice, ...]) -> object: ...


def read_padded(array: ReadableArray, box: Box) -> np.ndarray:
    """Read ``box`` from ``array`` in one read; parts outside are mirror-padded.

    Mirroring is 'reflect' (the border voxel is not repeated), applied repeatedly
    when the halo is larger than the volume.
    """
    volume = Box.from_shape(array.shape)
    inside = box.intersect(volume)
    if inside.empty:
        raise InvalidArgumentError(
            f"box {box} does not overlap the volume {array.shape}", field="box"
        )
    data = np.asarray(array[inside.slices()])
    pad = [
        (i0 - b0, b1 - i1)
        for b0, b1, i0, i1 in zip(box.start, box.stop, inside.start, inside.stop, strict=True)
    ]
    if not any(p for pair in pad for p in pair):
        return data
    # 'reflect' needs at least two voxels along an axis; a singleton axis repeats
    # its voxel. Decided per axis, so a single slice does not change how y and x
    # are mirrored.
    singleton = [s == 1 and p != (0, 0) for s, p in zip(data.shape, pad, strict=True)]
    if not any(singleton):
        return np.pad(data, pad, mode="reflect")
    data = np.pad(
        data, [p if one else (0, 0) for p, one in zip(pad, singleton, strict=True)], mode="edge"
    )
    return np.pad(
        data, [(0, 0) if one else p for p, one in zip(pad, singleton, strict=True)], mode="reflect"
    )


def check_core_aligned(
    core: Box,
    shape: Sequence[int],
    grid: Sequence[int],
    what: str,
    *,
    field: str = "task.block.core",
) -> None:
    """A core must lie inside ``what`` (of ``shape``) and cover whole cells of its write
    grid (chunks or shards; edge cells may be clipped), so one task owns each chunk."""
    if not Box.from_shape(shape).contains(core):
        raise InvalidArgumentError(
            f"block core {core} lies outside the output {what} of shape {list(shape)}",
            field=field,
        )
    for a, b, g, s in zip(core.start, core.stop, grid, shape, strict=True):
        if a % g or (b % g and b != s):
            raise InvalidArgumentError(
                f"block core {core} is not aligned to the write grid {list(grid)} of the output "
                f"{what}: tasks would share chunks",
                field=field,
            )


def grid_cells(box: Box, grid: Sequence[int]) -> int:
    """How many cells of a chunk (or shard) grid the box touches."""
    return math.prod(
        max(0, -(-int(b) // g) - int(a) // g)
        for a, b, g in zip(box.start, box.stop, grid, strict=True)
    )
