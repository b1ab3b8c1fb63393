"""Every sharded stage in one process, in order: what the scheduler's tasks do, one by one.

For tests, benchmarks and volumes small enough for one machine; a scheduler
runs the same functions as separate tasks, passing the documents through the
store instead of memory.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deep3m.core.geometry import Block
from deep3m.postprocess.blockwise import block_plan, map_blocks, write_grid
from deep3m.postprocess.foreground import Kind, volume_kind
from deep3m.postprocess.label_image import check_labels_shape
from deep3m.postprocess.labels import LabelSpec
from deep3m.postprocess.sharded.block import BlockSummary, Labelling, summarize_block
from deep3m.postprocess.sharded.merge import (
    IdMap,
    equivalences_among,
    merge_pieces,
)
from deep3m.postprocess.sharded.relabel import relabel_block
from deep3m.postprocess.sharded.table import ObjectStats, reduce_objects


@dataclass(frozen=True, eq=False)
class ShardedResult:
    id_map: IdMap
    objects: ObjectStats


def labelling_for(spec: LabelSpec, kind: Kind, voxel_size_nm: Sequence[float]) -> Labelling:
    """The per-block labelling a :class:`LabelSpec` asks for (as ``label_array`` does it)."""
    if not spec.watershed:
        return Labelling(kind, spec.threshold, spec.connectivity)
    vs = np.asarray(voxel_size_nm, float)
    sampling = vs / vs.min()
    return Labelling(
        kind, spec.threshold, spec.connectivity,
        watershed_h=spec.watershed_h, watershed_halo=spec.watershed_halo,
        sampling=(float(sampling[0]), float(sampling[1]), float(sampling[2])),
    )  # fmt: skip


def label_sharded(
    source: Any,
    target: Any,
    spec: LabelSpec,
    *,
    kind: Kind | None = None,
    voxel_size_nm: Sequence[float] = (1.0, 1.0, 1.0),
    block_shape: Sequence[int] | None = None,
    max_workers: int = 1,
    cancelled: threading.Event | None = None,
) -> ShardedResult:
    """Label ``source`` into ``target`` through stages (a)–(d); returns the id map and table."""
    check_labels_shape(source, target)
    kind = kind or volume_kind(source.dtype)
    plan = block_plan(target.shape, write_grid(target), block_shape)
    run: dict[str, Any] = {"max_workers": max_workers, "cancelled": cancelled}
    labelling = labelling_for(spec, kind, voxel_size_nm)

    def summarize(block: Block) -> BlockSummary:
        return summarize_block(source, block.index, block.core, labelling)

    summaries = map_blocks(summarize, plan, **run)
    faces = {s.faces.index: s.faces for s in summaries}

    def equivalences(block: Block) -> Any:
        return equivalences_among(faces, block.index, plan.grid_shape, spec.connectivity)

    pairs = map_blocks(equivalences, plan, **run)
    id_map = merge_pieces(
        [s.pieces.counts for s in summaries],
        pairs,
        plan.grid_shape,
        min_size_voxels=spec.min_size_voxels,
        seeds=[s.pieces.seeds for s in summaries] if spec.watershed else None,
    )

    def relabel(block: Block) -> int:
        return relabel_block(source, target, block.index, block.core, id_map, labelling)[0]

    map_blocks(relabel, plan, **run)
    objects = reduce_objects((s.pieces for s in summaries), id_map, voxel_size_nm)
    return ShardedResult(id_map, objects)
