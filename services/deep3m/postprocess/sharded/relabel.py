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
from deep3m.core.geometry import Box, check_core_aligned
from deep3m.postprocess.blockwise import write_grid
from deep3m.postprocess.label_image import check_labels_shape
from deep3m.postprocess.sharded.block import Labelling
from deep3m.postprocess.sharded.merge import IdMap


def relabel_block(
    source: Any,
    target: Any,
    index: Sequence[int],
    core: Box,
    id_map: IdMap,
    labelling: Labelling,
) -> tuple[int, np.ndarray]:
    """Write the global labels of ``core``; returns how many objects it holds and the
    labels written (for what is made from them in memory, e.g. a pyramid level)."""
    check_labels_shape(source, target)
    grid = write_grid(target)
    if grid is not None:
        check_core_aligned(core, target.shape, grid, "label volume", field="block.core")
    local, _ = labelling.label_core(source, core)
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
    return int(np.count_nonzero(np.unique(lut[1:]))), final
