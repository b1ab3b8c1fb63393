"""Multiscale pyramids for OME-Zarr volumes.

The levels are planned by :func:`deep3m.core.levels.plan_levels` (the
scheduler plans the sharded pyramid stages from the same function). Images
and probabilities are averaged over each window (edge windows over the voxels
they hold); label volumes take the most frequent label of each window (ties:
the smallest label), so ids stay valid. Level n is made from level n - 1.
Levels are written block by block on the level's chunk grid — by one process
(:func:`build_pyramid`) or by the tasks of sharded stages
(:func:`write_level_region`) — and recorded in the group's ``ome.multiscales``
datasets with scale and translation (voxel centres stay aligned with level 0).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import zarr

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.geometry import Block, Box
from deep3m.core.levels import MAX_LEVELS, Level, plan_levels
from deep3m.core.store import FULL_RESOLUTION, Store, check_key, ome_multiscales
from deep3m.postprocess.blockwise import Progress, block_plan, map_blocks, write_grid

__all__ = ["MAX_LEVELS", "Level", "plan_levels"]

Method = Literal["mean", "mode"]


def downsample(data: np.ndarray, factor: Sequence[int], method: Method) -> np.ndarray:
    """Reduce ``data`` by ``factor`` per axis (sizes need not divide)."""
    f = tuple(int(v) for v in factor)
    out_shape = tuple(-(-s // k) for s, k in zip(data.shape, f, strict=True))
    padded_shape = tuple(o * k for o, k in zip(out_shape, f, strict=True))
    pad = [(0, p - s) for p, s in zip(padded_shape, data.shape, strict=True)]
    padded = any(p for _, p in pad)
    offsets = list(np.ndindex(*f))
    if method == "mean":
        source = np.pad(data, pad) if padded else data
        total = np.zeros(out_shape, np.float64)
        for o in offsets:  # strided views: no windowed copy
            total += source[o[0] :: f[0], o[1] :: f[1], o[2] :: f[2]]
        count: np.ndarray | int = (
            sum(_inside(o, f, out_shape, padded_shape, pad).astype(np.int64) for o in offsets)
            if padded
            else len(offsets)
        )
        mean = total / count
        if np.issubdtype(data.dtype, np.integer):
            return np.rint(mean).astype(data.dtype)
        return mean.astype(data.dtype)

    # Mode. Most windows of a label image hold one label (inside an object or the
    # background): that label is the mode, so only the others (object borders, a
    # few per cent) are voted on. Edge padding copies a real entry of the same
    # window, so "every entry equals the first" is decided by the real entries; the
    # vote itself leaves the padding out.
    if padded:
        data = np.pad(data, pad, mode="edge")
    # Entry o of every window: a strided view, no copy.
    entries = [data[o[0] :: f[0], o[1] :: f[1], o[2] :: f[2]] for o in offsets]
    first = entries[0]
    mixed = np.zeros(out_shape, bool)
    for entry in entries[1:]:
        mixed |= entry != first
    out = np.array(first, dtype=data.dtype)
    if mixed.any():
        rows = np.stack([entry[mixed] for entry in entries], axis=-1)
        valid = (
            np.stack([_inside(o, f, out_shape, padded_shape, pad)[mixed] for o in offsets], -1)
            if padded
            else np.ones(rows.shape, bool)
        )
        out[mixed] = _mode_of_rows(rows, valid)
    return out


def _inside(
    offset: Sequence[int],
    factor: Sequence[int],
    out_shape: Sequence[int],
    padded_shape: Sequence[int],
    pad: Sequence[tuple[int, int]],
) -> np.ndarray:
    """Which windows' entry ``offset`` lies in the data (not in the padding)."""
    inside = np.ones(out_shape, bool)
    for axis, (_, p) in enumerate(pad):
        # Entry offset of the last window along ``axis`` sits at padded_shape - factor + offset.
        if p and padded_shape[axis] - factor[axis] + offset[axis] >= padded_shape[axis] - p:
            index = [slice(None)] * 3
            index[axis] = slice(-1, None)
            inside[tuple(index)] = False
    return inside


def _mode_of_rows(rows: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The most frequent valid entry of each row (ties: the smallest): votes counted by
    pairwise comparison, one entry at a time (k <= 8, so no (m, k, k) temporary)."""
    votes = np.zeros(rows.shape, np.int8)
    for j in range(rows.shape[-1]):
        votes += (rows == rows[:, j : j + 1]) & valid[:, j : j + 1]
    votes = np.where(valid, votes, np.int8(-1))
    best = votes.max(axis=-1, keepdims=True)
    candidates = np.where(votes == best, rows, rows.max())
    return np.asarray(candidates.min(axis=-1))


def method_for(attributes: dict[str, Any], ome: dict[str, Any]) -> Method:
    """``mode`` for label images (by their attributes), ``mean`` for everything else."""
    if attributes.get("kind") in ("labels", "mask") or "image-label" in ome:
        return "mode"
    return "mean"


def _group_attrs(group: zarr.Group) -> dict[str, Any]:
    raw: Any = group.attrs.asdict()
    return dict(raw)


@dataclass(frozen=True)
class PyramidPlan:
    """The levels to write for the volume at ``path`` and how to reduce to them."""

    path: str
    method: Method
    levels: tuple[Level, ...]

    def level_paths(self) -> list[str]:
        """Array paths of every level, the full resolution first."""
        return [FULL_RESOLUTION, *(level.path for level in self.levels)]


def pyramid_plan(
    store: Store, path: str, levels: int = 0, *, method: Method | None = None
) -> PyramidPlan:
    """The levels of the volume at ``path`` and how to reduce to them (nothing written)."""
    path = check_key(path)
    info = store.volume_info(path)
    attrs = _group_attrs(zarr.open_group(store.zarr_store(path), mode="r"))
    chosen = method or method_for(dict(attrs.get("deep3m") or {}), dict(attrs.get("ome") or {}))
    return PyramidPlan(path, chosen, tuple(plan_levels(info.shape, info.voxel_size_nm, levels)))


def prepare_pyramid(
    store: Store, path: str, levels: int = 0, *, method: Method | None = None
) -> PyramidPlan:
    """Create (or replace) the arrays of levels 1.. of the volume at ``path``, empty.

    Each level is then written block by block on its own chunk grid
    (:func:`write_level_block`), level after level, and the metadata last
    (:func:`record_pyramid`).
    """
    plan = pyramid_plan(store, path, levels, method=method)
    info = store.volume_info(plan.path)
    base = store.open_volume(plan.path, require_complete=False)
    group = zarr.open_group(store.zarr_store(plan.path), mode="r+")
    for level in plan.levels:
        chunks = tuple(min(c, s) for c, s in zip(info.chunk_shape, level.shape, strict=True))
        group.create_array(
            level.path, shape=level.shape, chunks=chunks, dtype=base.dtype,
            fill_value=base.fill_value, dimension_names=("z", "y", "x"), overwrite=True,
        )  # fmt: skip
    return plan


def write_level_region(store: Store, plan: PyramidPlan, level: int, core: Box) -> None:
    """Write ``core`` of level ``level`` (1..) of a prepared pyramid from level ``level`` - 1:
    what one task of a sharded pyramid stage does."""
    if not 1 <= level <= len(plan.levels):
        raise InvalidArgumentError(
            f"level {level} outside 1..{len(plan.levels)} of the pyramid of {plan.path}",
            field="level",
        )
    below = FULL_RESOLUTION if level == 1 else plan.levels[level - 2].path
    source = store.open_volume(plan.path, below, require_complete=False)
    target = store.open_volume(
        plan.path, plan.levels[level - 1].path, mode="r+", require_complete=False
    )
    write_level_block(source, target, core, plan.levels[level - 1].factor, plan.method)


def write_level_block(
    source: Any, target: Any, core: Box, factor: Sequence[int], method: Method
) -> None:
    """Write ``core`` of a level from the window of the level below it that it covers."""
    read = Box(
        tuple(a * f for a, f in zip(core.start, factor, strict=True)),
        tuple(b * f for b, f in zip(core.stop, factor, strict=True)),
    ).intersect(Box.from_shape(source.shape))
    target[core.slices()] = downsample(np.asarray(source[read.slices()]), factor, method)


def covered_region(below: Box, factor: Sequence[int]) -> Box:
    """The region of a level that the box ``below`` of the level under it covers
    (``below`` starting on a window; a partial last window counts)."""
    if any(a % f for a, f in zip(below.start, factor, strict=True)):
        raise InvalidArgumentError(
            f"region {below} does not start on a {list(factor)} window", field="region"
        )
    return Box(
        tuple(a // f for a, f in zip(below.start, factor, strict=True)),
        tuple(-(-b // f) for b, f in zip(below.stop, factor, strict=True)),
    )


def write_level_from(
    target: Any, data: np.ndarray, below: Box, factor: Sequence[int], method: Method
) -> None:
    """Write the region of a level that ``data`` (the box ``below`` of the level
    under it, already in memory) covers: ``below`` must start on a window."""
    target[covered_region(below, factor).slices()] = downsample(data, factor, method)


def record_pyramid(store: Store, plan: PyramidPlan) -> list[str]:
    """Record the written levels in ``ome.multiscales`` (and drop deeper stale levels);
    returns all level paths."""
    path = plan.path
    info = store.volume_info(path)
    group = zarr.open_group(store.zarr_store(path), mode="r+")
    ome = dict(_group_attrs(group).get("ome") or {})
    # Levels beyond the new depth (from an earlier, deeper run) would be stale.
    # Checked by name rather than listed: listing a group reads every child.
    for n in range(len(plan.levels) + 1, MAX_LEVELS + 1):
        if store.exists(f"{path}/{n}/zarr.json"):
            store.delete(f"{path}/{n}")
    datasets = [(FULL_RESOLUTION, info.voxel_size_nm)] + [
        (lv.path, lv.scale_nm) for lv in plan.levels
    ]
    multiscales = ome_multiscales(path.rsplit("/", 1)[-1], info.voxel_size_nm, datasets)
    for entry, level in zip(
        multiscales["multiscales"][0]["datasets"][1:], plan.levels, strict=True
    ):
        entry["coordinateTransformations"].append(
            {"type": "translation", "translation": list(level.translation_nm)}
        )
    if ome.get("multiscales"):
        # Keep anything else recorded for the image (name, metadata, ...).
        merged = dict(ome["multiscales"][0])
        merged["datasets"] = multiscales["multiscales"][0]["datasets"]
        merged.setdefault("axes", multiscales["multiscales"][0]["axes"])
        ome["multiscales"] = [merged, *ome["multiscales"][1:]]
    else:
        ome.update(multiscales)
    ome.setdefault("version", "0.5")
    group.attrs["ome"] = ome
    return plan.level_paths()


def build_pyramid(
    store: Store,
    path: str,
    levels: int = 0,
    *,
    method: Method | None = None,
    max_workers: int = 1,
    cancelled: threading.Event | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Write pyramid levels 1.. of the volume at ``path``; returns all level paths.

    Existing levels other than "0" are replaced, so a rerun rewrites the same
    bytes. The metadata is updated only after every level is written.
    """
    plan = prepare_pyramid(store, path, levels, method=method)
    previous: Any = store.open_volume(plan.path, require_complete=False)
    for level in plan.levels:
        current = store.open_volume(plan.path, level.path, mode="r+", require_complete=False)
        blocks = block_plan(current.shape, write_grid(current))

        def one(block: Block, source: Any = previous, target: Any = current,
                factor: tuple[int, int, int] = level.factor) -> None:  # fmt: skip
            write_level_block(source, target, block.core, factor, plan.method)

        map_blocks(one, blocks, max_workers=max_workers, cancelled=cancelled, progress=progress)
        previous = current
    return record_pyramid(store, plan)
