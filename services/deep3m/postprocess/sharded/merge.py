"""Stage (b): pieces that touch across block faces become one object, with one global id.

A piece is named by its block and local label, packed into one int64
(``block_linear << 32 | local``), so equivalences can be found before anyone
knows how many pieces each block holds.

:func:`block_equivalences` runs per block (in parallel): it pairs the block's
high face along each axis with the low faces of the blocks beyond it — for
diagonal connectivity also those one step aside, since a voxel on an edge
touches voxels of up to four blocks. Every pair of touching voxels in
different blocks is found exactly once: from the block that is lower along the
first axis where their blocks differ. Each equivalence carries its number of
touching voxel pairs (the watershed merge joins a seedless piece to its
largest contact).

:func:`merge_pieces` runs once: union-find (connected components of the
equivalence graph) over all pieces, objects below a size dropped, the rest
numbered 1..N in the order of their first piece (block order, then raster
order). Its cost grows with the pieces and equivalences, not with the voxels,
and its result, :class:`IdMap`, is one small document.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from deep3m.core.errors import FailedPreconditionError, InvalidArgumentError
from deep3m.postprocess.sharded.block import (
    BlockFaces,
    check_connectivity,
    from_document_bytes,
    to_document_bytes,
)
from deep3m.postprocess.watershed import watershed_joins

LOCAL_BITS = 32
_LOCAL_MASK = (1 << LOCAL_BITS) - 1


def pack(block_linear: int, local: np.ndarray) -> np.ndarray:
    """Packed piece keys of the nonzero ``local`` labels of one block (0 stays 0)."""
    local = local.astype(np.int64)
    return np.where(local > 0, (np.int64(block_linear) << LOCAL_BITS) | local, 0)


def _aside(connectivity: int) -> int:
    return 1 if connectivity > 1 else 0


def _above(
    index: Sequence[int], grid_shape: Sequence[int], axis: int, aside: int
) -> Iterator[tuple[int, ...]]:
    """Blocks one step up ``axis`` from ``index``, and up to ``aside`` steps across in
    the axes after it (a pair of voxels whose blocks also differ in an earlier axis is
    found from that axis's seam, so each touching pair is counted once)."""
    steps = [
        (0,) if a < axis else (1,) if a == axis else tuple(range(-aside, aside + 1))
        for a in range(3)
    ]
    for step in itertools.product(*steps):
        n = tuple(int(i + s) for i, s in zip(index, step, strict=True))
        if all(0 <= v < g for v, g in zip(n, grid_shape, strict=True)):
            yield n


def neighbour_indices(
    index: Sequence[int], grid_shape: Sequence[int], connectivity: int
) -> list[tuple[int, ...]]:
    """The blocks whose faces :func:`block_equivalences` needs for block ``index``."""
    r = _aside(check_connectivity(connectivity))
    found = {n: None for axis in range(3) for n in _above(index, grid_shape, axis, r)}
    return list(found)


def _in_plane_offsets(axis: int, connectivity: int) -> list[tuple[int, int]]:
    """Offsets (in the two other axes) of the neighbours one step up ``axis``."""
    structure = ndimage.generate_binary_structure(3, connectivity)
    offsets = []
    for idx in np.argwhere(structure):
        d = [int(v) - 1 for v in idx]
        if d[axis] == 1:
            others = [d[a] for a in range(3) if a != axis]
            offsets.append((others[0], others[1]))
    return offsets


def block_equivalences(
    faces: BlockFaces,
    neighbours: Mapping[tuple[int, ...], BlockFaces],
    grid_shape: Sequence[int],
    connectivity: int,
) -> np.ndarray:
    """(m, 3) int64: packed keys of a piece of ``faces``' block, of a piece it touches in
    a block above it, and how many voxel pairs touch; ``neighbours`` holds (at least)
    :func:`neighbour_indices`."""
    r = _aside(check_connectivity(connectivity))
    grid = tuple(int(g) for g in grid_shape)
    own = int(np.ravel_multi_index(faces.index, grid))
    found = []
    for axis in range(3):
        if faces.index[axis] + 1 >= grid[axis]:
            continue
        others = [a for a in range(3) if a != axis]
        lo = [faces.core.start[a] - r for a in others]
        hi = [faces.core.stop[a] + r for a in others]
        upper = np.zeros((hi[0] - lo[0], hi[1] - lo[1]), np.int64)
        for n in _above(faces.index, grid, axis, r):
            other = neighbours.get(n)
            if other is None:
                raise FailedPreconditionError(
                    f"faces of block {list(n)} are missing: the equivalences of block "
                    f"{list(faces.index)} need them"
                )
            plane = pack(int(np.ravel_multi_index(n, grid)), other.low[axis])
            a0, a1 = (other.core.start[a] for a in others)
            b0, b1 = (other.core.stop[a] for a in others)
            s0, s1 = max(a0, lo[0]), max(a1, lo[1])
            e0, e1 = min(b0, hi[0]), min(b1, hi[1])
            if s0 < e0 and s1 < e1:
                upper[s0 - lo[0] : e0 - lo[0], s1 - lo[1] : e1 - lo[1]] = plane[
                    s0 - a0 : e0 - a0, s1 - a1 : e1 - a1
                ]
        lower = pack(own, faces.high[axis])
        n0, n1 = lower.shape
        for d0, d1 in _in_plane_offsets(axis, connectivity):
            # lower voxel (u, v) touches upper voxel (u + d0, v + d1), where it exists.
            u = slice(max(0, -d0 - r), n0 - max(0, d0 - r))
            v = slice(max(0, -d1 - r), n1 - max(0, d1 - r))
            a = lower[u, v]
            b = upper[
                u.start + d0 + r : u.stop + d0 + r,
                v.start + d1 + r : v.stop + d1 + r,
            ]
            hit = (a > 0) & (b > 0)
            if hit.any():
                found.append(np.stack([a[hit], b[hit]], axis=1))
    if not found:
        return np.zeros((0, 3), np.int64)
    pairs, contacts = np.unique(np.concatenate(found), axis=0, return_counts=True)
    return np.concatenate([pairs, contacts[:, None].astype(np.int64)], axis=1)


def equivalences_among(
    faces: Mapping[tuple[int, ...], BlockFaces],
    index: Sequence[int],
    grid_shape: Sequence[int],
    connectivity: int,
) -> np.ndarray:
    """:func:`block_equivalences` of block ``index``, its neighbours taken from ``faces``
    (the faces of every block, in memory)."""
    own = tuple(int(i) for i in index)
    wanted = neighbour_indices(own, grid_shape, connectivity)
    return block_equivalences(faces[own], {n: faces[n] for n in wanted}, grid_shape, connectivity)


@dataclass(frozen=True, eq=False)
class IdMap:
    """Global object id of every piece (0: dropped), by block in plan order."""

    grid_shape: tuple[int, ...]
    piece_counts: np.ndarray  # (blocks,) int64
    lut: np.ndarray  # (pieces,) int64
    object_count: int
    equivalences: int

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.piece_counts)[:-1]]).astype(np.int64)

    def for_block(self, index: Sequence[int]) -> np.ndarray:
        """Lookup table local label → global id for one block (entry 0 is 0)."""
        b = int(np.ravel_multi_index(tuple(index), self.grid_shape))
        start = int(self.starts[b])
        return np.concatenate([[0], self.lut[start : start + int(self.piece_counts[b])]]).astype(
            np.int64
        )

    def to_bytes(self) -> bytes:
        return to_document_bytes(
            {
                "grid_shape": np.asarray(self.grid_shape, np.int64),
                "piece_counts": self.piece_counts,
                "lut": self.lut,
                "object_count": np.asarray(self.object_count, np.int64),
                "equivalences": np.asarray(self.equivalences, np.int64),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> IdMap:
        d = from_document_bytes(data, "id map")
        return cls(
            tuple(int(v) for v in d["grid_shape"]),
            d["piece_counts"],
            d["lut"],
            int(d["object_count"]),
            int(d["equivalences"]),
        )


def merge_pieces(
    piece_sizes: Sequence[np.ndarray],
    equivalences: Iterable[np.ndarray],
    grid_shape: Sequence[int],
    *,
    min_size_voxels: int = 0,
    seeds: Sequence[np.ndarray] | None = None,
) -> IdMap:
    """Join equivalent pieces; ``piece_sizes[b]`` are block ``b``'s piece voxel counts
    (plan order, local labels 1..n).

    With ``seeds`` (per block, each piece's watershed seed key, -1: none) pieces are
    tied by seed instead of by contact, as
    :func:`deep3m.postprocess.watershed.watershed_joins` explains.
    """
    grid = tuple(int(g) for g in grid_shape)
    if len(piece_sizes) != int(np.prod(grid)):
        raise InvalidArgumentError(
            f"{len(piece_sizes)} blocks of piece sizes for a grid of {list(grid)} blocks",
            field="piece_sizes",
        )
    if min_size_voxels < 0:
        raise InvalidArgumentError(
            f"min_size_voxels must be >= 0, got {min_size_voxels}", field="min_size_voxels"
        )
    counts = np.array([len(s) for s in piece_sizes], np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    total = int(counts.sum())
    sizes = (
        np.concatenate([np.asarray(s, np.int64) for s in piece_sizes])
        if total
        else np.zeros(0, np.int64)
    )
    rows = [np.asarray(e, np.int64).reshape(-1, 3) for e in equivalences]
    if not total:
        return IdMap(grid, counts, np.zeros(0, np.int64), 0, 0)
    table = np.concatenate(rows) if rows else np.zeros((0, 3), np.int64)
    keys, contact = table[:, :2], table[:, 2]
    block, local = keys >> LOCAL_BITS, keys & _LOCAL_MASK
    if len(keys) and (
        (block.max() >= len(counts)) or (local.min() < 1) or (local > counts[block]).any()
    ):
        raise FailedPreconditionError(
            "equivalences name pieces the blocks do not have: faces and piece statistics "
            "come from different labellings"
        )
    # Pieces are nodes 1..total (0 stays background), as watershed_joins numbers them.
    dense = starts[block] + local
    nodes = total + 1
    if seeds is not None:
        seed = np.concatenate([[-1], *(np.asarray(s, np.int64) for s in seeds)])
        if len(seed) != nodes:
            raise InvalidArgumentError(f"{len(seed) - 1} seeds for {total} pieces", field="seeds")
        dense = watershed_joins(dense, contact, seed, total)
        nodes += len(np.unique(seed[seed >= 0]))
    graph = coo_matrix(
        (np.ones(len(dense), np.int8), (dense[:, 0], dense[:, 1])), shape=(nodes, nodes)
    )
    _, component = connected_components(graph, directed=False)
    component = component[1 : total + 1]
    comp_ids, first_piece = np.unique(component, return_index=True)
    comp_sizes = np.bincount(component, weights=sizes, minlength=len(comp_ids))
    keep = comp_sizes[comp_ids] >= max(min_size_voxels, 1)
    ordered = comp_ids[np.argsort(first_piece, kind="stable")]
    ordered = ordered[keep[np.searchsorted(comp_ids, ordered)]]
    final = np.zeros(int(component.max()) + 1, np.int64)
    final[ordered] = np.arange(1, len(ordered) + 1)
    return IdMap(grid, counts, final[component], len(ordered), len(keys))
