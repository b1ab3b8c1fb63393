"""Stage (c), one task per block: the block's labels under their global ids, written once.

The core is labelled again exactly as stage (a) labelled it (the labelling is
deterministic), mapped through the block's slice of the id map and written to
the core of the label volume. Cores lie on the label volume's chunk (or shard)
grid, so each chunk has one writer, and a retried task writes the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from deep3m.core.errors import FailedPreconditionError, InvalidArgumentError
from deep3m.core.geometry import Box
from deep3m.postprocess.sharded.block import Labelling
from deep3m.postprocess.sharded.merge import IdMap


def check_core_on_grid(core: Box, shape: Sequence[int], grid: Sequence[int] | None) -> None:
    """A core must cover whole cells of the target's write grid (edge cells may be clipped)."""
    if grid is None:
        return
    for a, b, g, s in zip(core.start, core.stop, grid, shape, strict=True):
        if a % g or (b % g and b != s):
            raise InvalidArgumentError(
                f"block core {core} is not aligned to the label volume's write grid "
                f"{list(grid)}: blocks would share chunks",
                field="block.core",
            )


def relabel_block(
    source: Any,
    target: Any,
    index: Sequence[int],
    core: Box,
    id_map: IdMap,
    labelling: Labelling,
) -> int:
    """Write the global labels of ``core``; returns how many objects it holds."""
    if tuple(source.shape) != tuple(target.shape):
        raise InvalidArgumentError(
            f"labels shape {tuple(target.shape)} must equal the source shape {tuple(source.shape)}",
            field="output",
        )
    grid = getattr(target, "shards", None) or getattr(target, "chunks", None)
    check_core_on_grid(core, target.shape, grid)
    local = labelling.core_labels(source, core)
    lut = id_map.for_block(index)
    if int(local.max(initial=0)) != len(lut) - 1:
        raise FailedPreconditionError(
            f"block {list(index)} now has {int(local.max(initial=0))} pieces but the id map "
            f"knows {len(lut) - 1}: the source changed since it was labelled"
        )
    dtype = np.dtype(target.dtype)
    if id_map.object_count > np.iinfo(dtype).max:
        raise InvalidArgumentError(
            f"{id_map.object_count} objects do not fit in {dtype}; use uint64", field="dtype"
        )
    final = lut.astype(dtype)[local]
    target[core.slices()] = final
    return int(np.count_nonzero(np.unique(lut[1:])))
