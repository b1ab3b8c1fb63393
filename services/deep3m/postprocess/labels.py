"""Threshold a probability volume and label its objects, block by block.

Connected components are found per block (blocks on the output chunk grid),
then joined across block faces, edges and corners, and finally relabelled to
consecutive ids, so the result equals ``scipy.ndimage.label`` on the whole
volume up to the order of the ids. Passes:

1. per block: foreground mask, local labels 1..n written to the output array,
   voxel count per local label;
2. per block: read the core plus one voxel beyond it, turn local labels into
   provisional global ids (block offset + local id) and collect the pairs of
   ids that touch across the block boundary under the chosen connectivity;
3. join touching ids (connected components of the pair graph, i.e. a
   union-find over the provisional ids), drop objects smaller than
   ``min_size_voxels``, number the rest 1..N in the order of their first voxel
   by block, and rewrite every block through that lookup table, collecting the
   object table on the way.

Watershed splitting (``watershed=True``, :mod:`.watershed`) replaces the
per-block labelling of pass 1 and ties pieces by seed rather than by contact.
The labels land in an OME-Zarr label image (:mod:`.label_image`) unless an
output volume is named.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.geometry import Block, Box
from deep3m.core.store import Store
from deep3m.postprocess.blockwise import Progress, block_plan, map_blocks, write_grid
from deep3m.postprocess.foreground import Kind, foreground, volume_kind
from deep3m.postprocess.label_image import (
    DEFAULT_LABEL_NAME,
    LabelDtype,
    check_labels_shape,
    labels_path_for,
    mark_label_image,
    prepare_labels_volume,
    register_label_image,
)
from deep3m.postprocess.objects import (
    BlockStats,
    ObjectTable,
    block_stats,
    reduce_stats,
    table_keys,
    write_object_table,
)
from deep3m.postprocess.watershed import watershed_block, watershed_joins


@dataclass(frozen=True)
class LabelSpec:
    """How to turn a probability (or mask) volume into labelled objects."""

    threshold: float = 0.5
    # 1: faces (6-neighbourhood, as scipy.ndimage.label), 2: +edges, 3: +corners (26).
    connectivity: int = 1
    min_size_voxels: int = 0
    watershed: bool = False
    watershed_h: float = 2.0
    watershed_halo: tuple[int, int, int] = (4, 16, 16)
    dtype: LabelDtype = "uint32"

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise InvalidArgumentError(
                f"threshold must lie in (0, 1], got {self.threshold}", field="threshold"
            )
        if self.connectivity not in (1, 2, 3):
            raise InvalidArgumentError(
                f"connectivity must be 1, 2 or 3, got {self.connectivity}", field="connectivity"
            )
        if self.min_size_voxels < 0:
            raise InvalidArgumentError(
                f"min_size_voxels must be >= 0, got {self.min_size_voxels}",
                field="min_size_voxels",
            )
        if not self.watershed_h > 0:
            raise InvalidArgumentError(
                f"watershed_h must be > 0, got {self.watershed_h}", field="watershed_h"
            )
        if len(self.watershed_halo) != 3 or any(h < 0 for h in self.watershed_halo):
            raise InvalidArgumentError(
                f"watershed_halo must be 3 sizes >= 0, got {list(self.watershed_halo)}",
                field="watershed_halo",
            )
        if self.dtype not in ("uint32", "uint64"):
            raise InvalidArgumentError(
                f"dtype must be uint32 or uint64, got {self.dtype!r}", field="dtype"
            )


@dataclass(frozen=True, eq=False)
class LabelResult:
    object_count: int
    objects: ObjectTable
    pieces: int  # per-block labels before joining
    joins: int  # pairs of pieces joined across block boundaries


def _half_neighbourhood(connectivity: int) -> list[tuple[int, int, int]]:
    """Offsets d with d > 0 lexicographically: each neighbour pair appears once."""
    structure = ndimage.generate_binary_structure(3, connectivity)
    offsets = [tuple(int(v) - 1 for v in idx) for idx in np.argwhere(structure)]
    return [d for d in offsets if d > (0, 0, 0)]  # type: ignore[misc]


def _shifted(shape: Sequence[int], d: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    src = tuple(slice(max(0, -o), s - max(0, o)) for s, o in zip(shape, d, strict=True))
    dst = tuple(slice(max(0, o), s - max(0, -o)) for s, o in zip(shape, d, strict=True))
    return src, dst


def label_array(
    source: Any,
    target: Any,
    spec: LabelSpec,
    *,
    kind: Kind | None = None,
    voxel_size_nm: Sequence[float] = (1.0, 1.0, 1.0),
    block_shape: Sequence[int] | None = None,
    max_workers: int = 1,
    cancelled: threading.Event | None = None,
    progress: Progress | None = None,
) -> LabelResult:
    """Label ``source`` into ``target`` (zarr or numpy arrays of the same 3-D shape).

    Blocks follow ``target``'s chunk (or shard) grid unless ``block_shape``
    (a multiple of it) is given. ``progress`` gets (blocks done, total) over
    all three passes.
    """
    check_labels_shape(source, target)
    kind = kind or volume_kind(source.dtype)
    plan = block_plan(target.shape, write_grid(target), block_shape)
    volume = Box.from_shape(target.shape)
    n_blocks = len(plan)
    stage = [0]

    def staged(done: int, total: int) -> None:
        if progress:
            progress(stage[0] * n_blocks + done, 3 * n_blocks)

    run = {"max_workers": max_workers, "cancelled": cancelled, "progress": staged}

    # Pass 1: local labels.
    structure = ndimage.generate_binary_structure(3, spec.connectivity)
    vs = np.asarray(voxel_size_nm, float)
    sampling = vs / vs.min()

    def first(block: Block) -> tuple[np.ndarray, np.ndarray]:
        if spec.watershed:
            read = block.core.grow(spec.watershed_halo).intersect(volume)
            mask = foreground(np.asarray(source[read.slices()]), kind, spec.threshold)
            local, n, seeds = watershed_block(
                mask, read, block.core, volume,
                connectivity=spec.connectivity, h=spec.watershed_h, sampling=sampling,
            )  # fmt: skip
        else:
            mask = foreground(np.asarray(source[block.core.slices()]), kind, spec.threshold)
            local, n = ndimage.label(mask, structure=structure)
            seeds = np.full(n, -1, np.int64)
        target[block.core.slices()] = local.astype(target.dtype, copy=False)
        return np.bincount(local.ravel(), minlength=n + 1)[1:].astype(np.int64), seeds

    first_pass = map_blocks(first, plan, **run)  # type: ignore[arg-type]
    counts = np.array([len(sz) for sz, _ in first_pass], np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    pieces = int(counts.sum())
    sizes = np.concatenate([[0], *(sz for sz, _ in first_pass)]).astype(np.int64)
    seed = np.concatenate([[-1], *(sd for _, sd in first_pass)]).astype(np.int64)
    block_of = np.concatenate([[-1], np.repeat(np.arange(n_blocks), counts)]).astype(np.int64)

    # Pass 2: contacts across block boundaries.
    stage[0] = 1
    offsets = _half_neighbourhood(spec.connectivity)
    grid_shape = plan.grid_shape

    # Read only the sides the offsets reach: the + sides, and - sides of y/x
    # only for diagonal connectivity.
    below = tuple(max(0, -min(d[i] for d in offsets)) for i in range(3))
    above = tuple(max(0, max(d[i] for d in offsets)) for i in range(3))

    def contacts(block: Block) -> tuple[np.ndarray, np.ndarray]:
        read = Box(
            tuple(a - m for a, m in zip(block.core.start, below, strict=True)),
            tuple(b + m for b, m in zip(block.core.stop, above, strict=True)),
        ).intersect(volume)
        ids = np.asarray(target[read.slices()]).astype(np.int64)
        lo = [a // b for a, b in zip(read.start, plan.block_shape, strict=True)]
        hi = [(a - 1) // b for a, b in zip(read.stop, plan.block_shape, strict=True)]
        for index in itertools.product(*(range(i, j + 1) for i, j in zip(lo, hi, strict=True))):
            part = plan.block_at(index).core.intersect(read)
            view = ids[part.relative_to(read)]
            view[view > 0] += starts[np.ravel_multi_index(index, grid_shape)]
        inside = np.zeros(ids.shape, bool)
        inside[block.core.relative_to(read)] = True
        found = []
        for d in offsets:
            src, dst = _shifted(ids.shape, d)
            a, b = ids[src], ids[dst]
            hit = inside[src] & ~inside[dst] & (a > 0) & (b > 0)
            if hit.any():
                found.append(np.stack([a[hit], b[hit]], axis=1))
        if not found:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        pair = np.concatenate(found)
        # Orient every pair from the earlier block to the later one; count each
        # distinct pair once per block (one int64 key per pair sorts fast).
        swap = block_of[pair[:, 0]] > block_of[pair[:, 1]]
        pair[swap] = pair[swap][:, ::-1]
        keys, n = np.unique(pair[:, 0] * key_base + pair[:, 1], return_counts=True)
        return keys, n

    key_base = np.int64(pieces + 1)
    found = map_blocks(contacts, plan, **run)  # type: ignore[arg-type]
    all_keys = np.concatenate([k for k, _ in found])
    keys, where = np.unique(all_keys, return_inverse=True)
    contact = np.bincount(
        where, weights=np.concatenate([n for _, n in found]), minlength=len(keys)
    ).astype(np.int64)
    pairs = np.stack([keys // key_base, keys % key_base], axis=1)
    n_nodes = pieces + 1
    if spec.watershed:
        pairs = watershed_joins(pairs, contact, seed, pieces)
        n_nodes += len(np.unique(seed[seed >= 0]))

    # Pass 3: join, filter, number, rewrite.
    stage[0] = 2
    graph = coo_matrix(
        (np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n_nodes, n_nodes)
    )
    _, component = connected_components(graph, directed=False)
    component = component[: pieces + 1]
    comp_ids, first_node = np.unique(component[1:], return_index=True)
    comp_sizes = np.bincount(component[1:], weights=sizes[1:], minlength=component.max() + 1)
    keep = comp_sizes[comp_ids] >= max(spec.min_size_voxels, 1)
    ordered = comp_ids[np.argsort(first_node, kind="stable")]
    ordered = ordered[keep[np.searchsorted(comp_ids, ordered)]]
    object_count = len(ordered)
    if object_count > np.iinfo(np.dtype(target.dtype)).max:
        raise InvalidArgumentError(
            f"{object_count} objects do not fit in {target.dtype}; use uint64", field="dtype"
        )
    final_of_comp = np.zeros(component.max() + 1, np.int64)
    final_of_comp[ordered] = np.arange(1, object_count + 1)
    lut = final_of_comp[component]
    lut[0] = 0

    def rewrite(block: Block) -> BlockStats:
        local = np.asarray(target[block.core.slices()]).astype(np.int64)
        n = int(np.ravel_multi_index(block.index, grid_shape))
        final = np.where(local > 0, lut[local + starts[n]], 0)
        target[block.core.slices()] = final.astype(target.dtype, copy=False)
        return block_stats(final, block.core.start)

    stats = map_blocks(rewrite, plan, **run)  # type: ignore[arg-type]
    table = reduce_stats(stats, voxel_size_nm)
    return LabelResult(object_count, table, pieces, len(pairs))


@dataclass(frozen=True, eq=False)
class LabelOutput:
    """Where a labelling landed and what it found."""

    store_url: str
    labels_path: str
    object_count: int
    table_keys: tuple[str, ...]
    objects: ObjectTable = field(repr=False)


def label_volume(
    store: Store,
    path: str,
    spec: LabelSpec,
    *,
    array: str = "",
    output: tuple[Store, str] | None = None,
    name: str = DEFAULT_LABEL_NAME,
    block_shape: Sequence[int] | None = None,
    max_workers: int = 1,
    cancelled: threading.Event | None = None,
    progress: Progress | None = None,
) -> LabelOutput:
    """Label the volume at ``path`` and write labels plus object table to the store.

    Without ``output`` the labels go to ``<path>/labels/<name>`` (OME-Zarr label
    image); otherwise to the given ``(store, path)`` volume. The labels volume is
    marked complete only at the end; on failure it is removed.
    """
    info = store.volume_info(path, array)
    source = store.open_volume(path, array)
    kind = volume_kind(info.dtype, info.attributes)
    in_image = output is None
    out_store, out_path = output if output is not None else (store, labels_path_for(path, name))
    if in_image:
        register_label_image(store, path, name)
    target = prepare_labels_volume(
        out_store, out_path, info.shape,
        dtype=spec.dtype, voxel_size_nm=info.voxel_size_nm, chunk_shape=info.chunk_shape,
        shard_shape=info.shard_shape, source=store.key_url(path),
    )  # fmt: skip
    try:
        if in_image:
            mark_label_image(out_store, out_path)
        result = label_array(
            source, target, spec,
            kind=kind, voxel_size_nm=info.voxel_size_nm, block_shape=block_shape,
            max_workers=max_workers, cancelled=cancelled, progress=progress,
        )  # fmt: skip
        keys = write_object_table(out_store, out_path, result.objects)
        out_store.mark_complete(
            out_path, object_count=result.object_count, threshold=spec.threshold,
            watershed=spec.watershed, min_size_voxels=spec.min_size_voxels,
            connectivity=spec.connectivity,
        )  # fmt: skip
    except BaseException:
        out_store.delete(out_path)
        for key in table_keys(out_path):
            out_store.delete(key)
        raise
    return LabelOutput(out_store.url, out_path, result.object_count, tuple(keys), result.objects)
