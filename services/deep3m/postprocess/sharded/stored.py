"""The sharded stages as tasks over documents in the store: what a worker's handler calls.

All documents of one labelling live under one prefix (e.g. ``jobs/<job>/labels``)::

    <prefix>/blocks/<block>.faces.npz    stage (a): face labels
    <prefix>/blocks/<block>.pieces.npz   stage (a): piece statistics
    <prefix>/blocks/<block>.sizes.npz    stage (a): piece sizes and seeds (for the merge)
    <prefix>/blocks/<block>.pairs.npz    stage (b), per block: equivalences
    <prefix>/idmap.npz                   stage (b), once: the global id map
    <prefix>/tables/<k>-of-<n>.npz       stage (d), per shard: part of the table
    <prefix>/objects.npz                 stage (d), once: the whole table (for evaluation)
    <prefix>/truth/...                   the ground truth's faces, sizes, pairs, id map
    <prefix>/evaluation/<block>.npz      evaluation, per block: its part

Each task reads what earlier stages wrote and writes its own documents whole
(a store write replaces a document atomically), so a task that is retried, or
killed and run again elsewhere, leaves the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from deep3m.core.executor import bounded_map
from deep3m.core.geometry import Box
from deep3m.core.store import Store, check_key
from deep3m.postprocess.evaluate import Evaluation, Operand
from deep3m.postprocess.sharded.block import (
    BlockFaces,
    Labelling,
    PieceStats,
    from_document_bytes,
    summarize_block,
    to_document_bytes,
)
from deep3m.postprocess.sharded.density import write_density_outputs
from deep3m.postprocess.sharded.evaluation import (
    BlockEvaluation,
    ObjectPoints,
    evaluate_block,
    global_truth_ids,
    ground_truth_pieces,
    reduce_evaluation,
)
from deep3m.postprocess.sharded.merge import (
    IdMap,
    block_equivalences,
    merge_pieces,
    neighbour_indices,
)
from deep3m.postprocess.sharded.relabel import relabel_block
from deep3m.postprocess.sharded.table import (
    ObjectStats,
    concat_tables,
    reduce_objects,
    write_object_tables,
)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Documents:
    """Where one labelling's documents live."""

    store: Store
    prefix: str

    def __post_init__(self) -> None:
        check_key(self.prefix)

    def _block(self, index: Sequence[int], what: str) -> str:
        return f"{self.prefix}/blocks/b{'-'.join(str(int(i)) for i in index)}.{what}.npz"

    def faces_key(self, index: Sequence[int]) -> str:
        return self._block(index, "faces")

    def pieces_key(self, index: Sequence[int]) -> str:
        return self._block(index, "pieces")

    def pairs_key(self, index: Sequence[int]) -> str:
        return self._block(index, "pairs")

    def sizes_key(self, index: Sequence[int]) -> str:
        return self._block(index, "sizes")

    @property
    def id_map_key(self) -> str:
        return f"{self.prefix}/idmap.npz"

    @property
    def objects_key(self) -> str:
        return f"{self.prefix}/objects.npz"

    @property
    def truth(self) -> Documents:
        """Where the ground truth's components are merged (same layout)."""
        return Documents(self.store, f"{self.prefix}/truth")

    def evaluation_key(self, index: Sequence[int]) -> str:
        return self._block(index, "evaluation")

    def table_part_key(self, shard: tuple[int, int]) -> str:
        return f"{self.prefix}/tables/{int(shard[0])}-of-{int(shard[1])}.npz"

    def faces(self, index: Sequence[int]) -> BlockFaces:
        return BlockFaces.from_bytes(self.store.read_bytes(self.faces_key(index)))

    def pieces(self, index: Sequence[int]) -> PieceStats:
        return PieceStats.from_bytes(self.store.read_bytes(self.pieces_key(index)))

    def pairs(self, index: Sequence[int]) -> np.ndarray:
        data = self.store.read_bytes(self.pairs_key(index))
        return from_document_bytes(data, "equivalences")["pairs"]

    def sizes(self, index: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Piece voxel counts and watershed seeds of one block."""
        d = from_document_bytes(self.store.read_bytes(self.sizes_key(index)), "piece sizes")
        return d["counts"], d["seeds"]

    def id_map(self) -> IdMap:
        return IdMap.from_bytes(self.store.read_bytes(self.id_map_key))


def _grid_indices(grid_shape: Sequence[int]) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in i) for i in np.ndindex(*grid_shape)]


# Small-document reads in flight at once: store round trips, not CPU, set their pace.
READ_THREADS = 8


def in_order(read: Callable[[T], R], items: Sequence[T]) -> Iterator[R]:
    """``read(item)`` for each item, in order, with up to READ_THREADS reads ahead
    (results are reduced in block order, so every run gives the same bytes)."""
    ready: dict[int, R] = {}
    following = 0
    for i, value in bounded_map(read, items, READ_THREADS, in_flight=2 * READ_THREADS):
        ready[i] = value
        while following in ready:
            yield ready.pop(following)
            following += 1


def summarize_task(
    docs: Documents, source: Any, index: Sequence[int], core: Box, labelling: Labelling
) -> dict[str, float]:
    """Stage (a) for one block; returns task metrics."""
    summary = summarize_block(source, index, core, labelling)
    docs.store.write_bytes(docs.faces_key(index), summary.faces.to_bytes())
    docs.store.write_bytes(docs.pieces_key(index), summary.pieces.to_bytes())
    sizes = {"counts": summary.pieces.counts, "seeds": summary.pieces.seeds}
    docs.store.write_bytes(docs.sizes_key(index), to_document_bytes(sizes))
    return {"voxels": float(core.size), "pieces": float(len(summary.pieces))}


def equivalences_task(
    docs: Documents, index: Sequence[int], grid_shape: Sequence[int], connectivity: int
) -> dict[str, float]:
    """Stage (b), per block: the equivalences across the block's upper seams."""
    wanted = neighbour_indices(index, grid_shape, connectivity)
    own, *theirs = in_order(docs.faces, [tuple(index), *wanted])
    pairs = block_equivalences(
        own, dict(zip(wanted, theirs, strict=True)), grid_shape, connectivity
    )
    docs.store.write_bytes(docs.pairs_key(index), to_document_bytes({"pairs": pairs}))
    return {"equivalences": float(len(pairs))}


def merge_task(
    docs: Documents,
    grid_shape: Sequence[int],
    *,
    min_size_voxels: int = 0,
    watershed: bool = False,
) -> IdMap:
    """Stage (b), once: the global id map from every block's piece sizes and
    equivalences (with ``watershed``, pieces tie by seed); reads only small documents."""
    blocks = _grid_indices(grid_shape)
    sizes = list(in_order(docs.sizes, blocks))
    id_map = merge_pieces(
        [counts for counts, _ in sizes],
        in_order(docs.pairs, blocks),
        grid_shape,
        min_size_voxels=min_size_voxels,
        seeds=[seeds for _, seeds in sizes] if watershed else None,
    )
    docs.store.write_bytes(docs.id_map_key, id_map.to_bytes())
    return id_map


def relabel_task(
    docs: Documents,
    source: Any,
    target: Any,
    index: Sequence[int],
    core: Box,
    labelling: Labelling,
    *,
    then: Callable[[IdMap, np.ndarray], None] | None = None,
) -> dict[str, float]:
    """Stage (c) for one block: write its label chunks; ``then(id_map, labels)`` goes
    on from the block's labels in memory (a pyramid level, the table's parts)."""
    id_map = docs.id_map()
    objects, labels = relabel_block(source, target, index, core, id_map, labelling)
    if then is not None:
        then(id_map, labels)
    return {"voxels": float(core.size), "objects": float(objects)}


def table_parts_of(index: Sequence[int], grid_shape: Sequence[int], shards: int) -> list[int]:
    """The table parts the relabel task of block ``index`` reduces: k with k ≡ the
    block's number (mod the blocks), so the first blocks' tasks take them all."""
    if shards <= 1:
        return []  # one part: ``reduce`` reduces the table itself
    number = int(np.ravel_multi_index(tuple(int(i) for i in index), tuple(grid_shape)))
    return list(range(number, shards, int(np.prod(grid_shape))))


def reduce_part_task(
    docs: Documents,
    grid_shape: Sequence[int],
    voxel_size_nm: Sequence[float],
    shard: tuple[int, int],
    *,
    id_map: IdMap | None = None,
) -> dict[str, float]:
    """Stage (d), per shard (objects whose label is k + 1 modulo n): part of the table."""
    stats = reduce_objects(
        in_order(docs.pieces, _grid_indices(grid_shape)),
        id_map if id_map is not None else docs.id_map(),
        voxel_size_nm,
        shard=shard,
    )
    docs.store.write_bytes(docs.table_part_key(shard), stats.to_bytes())
    return {"objects": float(len(stats))}


def reduce_task(
    docs: Documents,
    grid_shape: Sequence[int],
    voxel_size_nm: Sequence[float],
    *,
    labels_store: Store,
    labels_path: str,
    volume: Box,
    window_um: float | None = None,
    shards: int = 1,
) -> tuple[ObjectStats, dict[str, str]]:
    """Stage (d), once: object tables (CSV, Parquet) beside the labels — joined from
    the ``shards`` parts :func:`reduce_part_task` wrote, or reduced here when 1 —
    and with ``window_um`` the density profile and size histogram; returns the
    table and the output keys."""
    if shards > 1:
        stats = concat_tables(
            [
                ObjectStats.from_bytes(docs.store.read_bytes(docs.table_part_key((k, shards))))
                for k in range(shards)
            ]
        )
    else:
        stats = reduce_objects(
            (docs.pieces(i) for i in _grid_indices(grid_shape)), docs.id_map(), voxel_size_nm
        )
    docs.store.write_bytes(docs.objects_key, stats.to_bytes())
    csv_key, parquet_key = write_object_tables(labels_store, labels_path, stats)
    outputs = {"objects_csv": csv_key, "objects_parquet": parquet_key}
    if window_um is not None:
        outputs.update(
            write_density_outputs(labels_store, labels_path, stats, volume, window_um=window_um)
        )
    return stats, outputs


def truth_summarize_task(
    docs: Documents, ground_truth: Any, index: Sequence[int], core: Box, labelling: Labelling
) -> dict[str, float]:
    """Stage (a) for the ground truth of one block: faces and piece sizes only."""
    faces, counts = ground_truth_pieces(ground_truth, index, core, labelling)
    truth = docs.truth
    truth.store.write_bytes(truth.faces_key(index), faces.to_bytes())
    sizes = {"counts": counts, "seeds": np.full(len(counts), -1, np.int64)}
    truth.store.write_bytes(truth.sizes_key(index), to_document_bytes(sizes))
    return {"truth_pieces": float(len(counts))}


def _object_points(docs: Documents, shape: Sequence[int]) -> ObjectPoints:
    stats = ObjectStats.from_bytes(docs.store.read_bytes(docs.objects_key))
    return ObjectPoints.of(stats.labels, stats.volume_voxels, stats.centroid, shape)


def evaluate_block_task(
    docs: Documents,
    prediction: Operand,
    ground_truth: Operand,
    labels: Any,
    index: Sequence[int],
    core: Box,
    truth_labelling: Labelling,
    *,
    threshold: float,
    exclusion_zone: int,
) -> dict[str, float]:
    """Evaluation for one block: its counts and object points, as a document."""
    id_map = None if ground_truth.declared_labels else docs.truth.id_map()
    part = evaluate_block(
        prediction, ground_truth, labels, core, _object_points(docs, labels.shape),
        global_truth_ids(ground_truth, truth_labelling, index, id_map),
        threshold=threshold, exclusion_zone=exclusion_zone,
    )  # fmt: skip
    docs.store.write_bytes(docs.evaluation_key(index), part.to_bytes())
    return {"voxels": float(core.size)}


def evaluate_task(
    docs: Documents, grid_shape: Sequence[int], shape: Sequence[int], *, declared_labels: bool
) -> Evaluation:
    """Evaluation, once: every block's part reduced."""
    parts = in_order(
        lambda i: BlockEvaluation.from_bytes(docs.store.read_bytes(docs.evaluation_key(i))),
        _grid_indices(grid_shape),
    )
    truth_count = None if declared_labels else docs.truth.id_map().object_count
    return reduce_evaluation(parts, _object_points(docs, shape), truth_count)
