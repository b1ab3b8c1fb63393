"""Running a function over the blocks of a plan: threads, cancellation, progress.

Every postprocess pass is a map over core blocks on the output chunk grid, so
blocks write disjoint chunks and can run in any order or in parallel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from deep3m.core.errors import CancelledError, InvalidArgumentError
from deep3m.core.executor import bounded_map
from deep3m.core.geometry import Block, BlockPlan, plan_blocks

T = TypeVar("T")
Progress = Callable[[int, int], None]  # (blocks done, blocks total)


def write_grid(array: Any) -> tuple[int, ...] | None:
    """The write grid of a zarr array (its shard shape when sharded, else its chunk
    shape); None for an in-memory array, which any block shape may cut."""
    grid = getattr(array, "shards", None) or getattr(array, "chunks", None)
    return tuple(int(s) for s in grid) if grid else None


def block_plan(
    shape: Sequence[int],
    grid: Sequence[int] | None,
    block_shape: Sequence[int] | None = None,
) -> BlockPlan:
    """Blocks over ``shape`` aligned to ``grid`` (one grid cell each by default)."""
    if block_shape is not None and len(block_shape) != len(shape):
        raise InvalidArgumentError(
            f"block_shape must have {len(shape)} values, got {list(block_shape)}",
            field="block_shape",
        )
    chosen = tuple(block_shape) if block_shape else tuple(grid or shape)
    return plan_blocks(shape, chosen, grid=grid)


def map_blocks(
    fn: Callable[[Block], T],
    plan: BlockPlan,
    *,
    max_workers: int = 1,
    cancelled: threading.Event | None = None,
    progress: Progress | None = None,
) -> list[T]:
    """``fn`` applied to every block, results in plan order.

    Stops at the first error (re-raised) or when ``cancelled`` is set
    (``CancelledError``); blocks already submitted finish first.
    """
    blocks = list(plan)
    total = len(blocks)
    results: list[T | None] = [None] * total
    done = 0
    for index, result in bounded_map(
        fn, blocks, max_workers, stop=cancelled, thread_name_prefix="block"
    ):
        results[index] = result
        done += 1
        if progress:
            progress(done, total)
    if done < total:  # the map stopped early: ``cancelled`` was set
        raise CancelledError("cancelled while processing blocks")
    return results  # type: ignore[return-value]
