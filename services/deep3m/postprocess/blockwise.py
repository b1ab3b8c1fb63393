"""Running a function over the blocks of a plan: threads, cancellation, progress.

Every postprocess pass is a map over core blocks on the output chunk grid, so
blocks write disjoint chunks and can run in any order or in parallel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

from deep3m.core.errors import CancelledError, InvalidArgumentError
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
    (``CancelledError``); blocks already running finish first.
    """
    blocks = list(plan)
    total = len(blocks)
    results: list[T | None] = [None] * total
    done = 0

    def check() -> None:
        if cancelled is not None and cancelled.is_set():
            raise CancelledError("cancelled while processing blocks")

    if max_workers <= 1:
        for n, block in enumerate(blocks):
            check()
            results[n] = fn(block)
            done += 1
            if progress:
                progress(done, total)
        return results  # type: ignore[return-value]

    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="block") as pool:
        pending: dict[Future[T], int] = {}
        queue = iter(enumerate(blocks))

        def submit_next() -> bool:
            for n, block in queue:
                pending[pool.submit(fn, block)] = n
                return True
            return False

        for _ in range(max_workers * 2):
            if not submit_next():
                break
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for future in finished:
                    n = pending.pop(future)
                    results[n] = future.result()
                    done += 1
                    if progress:
                        progress(done, total)
                    check()
                    submit_next()
        finally:
            for future in pending:
                future.cancel()
    return results  # type: ignore[return-value]
