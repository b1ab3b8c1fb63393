"""Object tables: per label, volume (voxels and nm³), centroid and bounding box.

Computed blockwise: each block yields partial sums (voxel count, coordinate
sums, bounding-box extremes) for the labels it holds, and the partials of all
blocks reduce exactly to the whole-volume figures. Centroids and boxes are in
voxel coordinates (z, y, x) of the full-resolution array; boxes are half-open.
"""

from __future__ import annotations

import csv
import io
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from deep3m.core.geometry import Block
from deep3m.core.store import Store
from deep3m.postprocess.blockwise import Progress, block_plan, map_blocks, write_grid

COLUMNS = (
    "label", "volume_voxels", "volume_nm3",
    "centroid_z", "centroid_y", "centroid_x",
    "centroid_z_nm", "centroid_y_nm", "centroid_x_nm",
    "bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1",
)  # fmt: skip


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """CSV with a header line; floats as ``repr`` (round-trips exactly)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([repr(float(v)) if isinstance(v, float) else v for v in row])
    return buf.getvalue()


@dataclass(frozen=True, eq=False)
class BlockStats:
    """Partial figures of the labels present in one block (rows sorted by label)."""

    labels: np.ndarray  # (n,) int64
    counts: np.ndarray  # (n,) int64
    coord_sums: np.ndarray  # (n, 3) int64
    starts: np.ndarray  # (n, 3) int64, inclusive
    stops: np.ndarray  # (n, 3) int64, exclusive

    @classmethod
    def empty(cls) -> BlockStats:
        z1 = np.zeros(0, np.int64)
        z3 = np.zeros((0, 3), np.int64)
        return cls(z1, z1, z3, z3, z3)


def block_stats(labels: np.ndarray, origin: Sequence[int]) -> BlockStats:
    """Figures of the nonzero labels in ``labels``, a block whose corner is ``origin``."""
    mask = labels != 0
    if not mask.any():
        return BlockStats.empty()
    values = labels[mask]
    lo, hi = int(values.min()), int(values.max())
    if hi - lo < 4 * values.size:
        # Ids in a block usually span a narrow range: count instead of sorting.
        present = np.bincount(values - lo, minlength=hi - lo + 1) > 0
        ids = np.flatnonzero(present) + lo
        lut = np.cumsum(present) - 1
        inverse = lut[values - lo]
    else:
        ids, inverse = np.unique(values, return_inverse=True)
    compact = np.zeros(labels.shape, np.int32)
    compact[mask] = inverse + 1
    counts = np.bincount(inverse, minlength=len(ids)).astype(np.int64)
    coords = np.nonzero(mask)
    off = np.asarray(origin, np.int64)
    sums = (
        np.stack([np.bincount(inverse, weights=c, minlength=len(ids)) for c in coords], axis=1)
        .round()
        .astype(np.int64)
        + counts[:, None] * off[None, :]
    )
    boxes = ndimage.find_objects(compact)
    starts = np.array([[s.start for s in box] for box in boxes], np.int64) + off  # type: ignore[union-attr]
    stops = np.array([[s.stop for s in box] for box in boxes], np.int64) + off  # type: ignore[union-attr]
    return BlockStats(ids.astype(np.int64), counts, sums, starts, stops)


class InPhysicalUnits:
    """Volume and centroid in nm, for a table with voxel counts, voxel centroids and a
    voxel size."""

    volume_voxels: np.ndarray
    centroid: np.ndarray
    voxel_size_nm: tuple[float, float, float]

    @property
    def volume_nm3(self) -> np.ndarray:
        return self.volume_voxels * float(np.prod(self.voxel_size_nm))

    @property
    def centroid_nm(self) -> np.ndarray:
        return self.centroid * np.asarray(self.voxel_size_nm)


@dataclass(frozen=True, eq=False)
class ObjectTable(InPhysicalUnits):
    labels: np.ndarray  # (n,) int64, ascending
    volume_voxels: np.ndarray  # (n,) int64
    centroid: np.ndarray  # (n, 3) float64, voxels (z, y, x)
    bbox_start: np.ndarray  # (n, 3) int64
    bbox_stop: np.ndarray  # (n, 3) int64
    voxel_size_nm: tuple[float, float, float]

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, keep: np.ndarray) -> ObjectTable:
        """The rows where the boolean ``keep`` is true."""
        return ObjectTable(
            self.labels[keep], self.volume_voxels[keep], self.centroid[keep],
            self.bbox_start[keep], self.bbox_stop[keep], self.voxel_size_nm,
        )  # fmt: skip

    def rows(self) -> list[dict[str, Any]]:
        vol_nm3, cen_nm = self.volume_nm3, self.centroid_nm
        out = []
        for i in range(len(self)):
            values = (
                int(self.labels[i]), int(self.volume_voxels[i]), float(vol_nm3[i]),
                *(float(v) for v in self.centroid[i]), *(float(v) for v in cen_nm[i]),
                *(int(v) for v in self.bbox_start[i]), *(int(v) for v in self.bbox_stop[i]),
            )  # fmt: skip
            out.append(dict(zip(COLUMNS, values, strict=True)))
        return out

    def to_csv(self) -> str:
        return csv_text(COLUMNS, [[row[c] for c in COLUMNS] for row in self.rows()])

    def to_json(self) -> dict[str, Any]:
        return {
            "voxel_size_nm": list(self.voxel_size_nm),
            "object_count": len(self),
            "columns": list(COLUMNS),
            "objects": self.rows(),
        }


def reduce_stats(parts: Sequence[BlockStats], voxel_size_nm: Sequence[float]) -> ObjectTable:
    """Combine the partial figures of all blocks into one table."""
    vs = (float(voxel_size_nm[0]), float(voxel_size_nm[1]), float(voxel_size_nm[2]))
    parts = [p for p in parts if len(p.labels)]
    if not parts:
        e = BlockStats.empty()
        return ObjectTable(e.labels, e.counts, np.zeros((0, 3)), e.starts, e.stops, vs)
    labels = np.concatenate([p.labels for p in parts])
    ids, inverse = np.unique(labels, return_inverse=True)
    n = len(ids)
    counts = np.zeros(n, np.int64)
    np.add.at(counts, inverse, np.concatenate([p.counts for p in parts]))
    sums = np.zeros((n, 3), np.int64)
    np.add.at(sums, inverse, np.concatenate([p.coord_sums for p in parts]))
    starts = np.full((n, 3), np.iinfo(np.int64).max, np.int64)
    np.minimum.at(starts, inverse, np.concatenate([p.starts for p in parts]))
    stops = np.full((n, 3), np.iinfo(np.int64).min, np.int64)
    np.maximum.at(stops, inverse, np.concatenate([p.stops for p in parts]))
    centroid = sums / counts[:, None]
    return ObjectTable(ids, counts, centroid, starts, stops, vs)


def object_table(
    labels: Any,
    voxel_size_nm: Sequence[float],
    *,
    block_shape: Sequence[int] | None = None,
    max_workers: int = 1,
    cancelled: threading.Event | None = None,
    progress: Progress | None = None,
) -> ObjectTable:
    """The object table of a label array (zarr or numpy), computed block by block."""
    plan = block_plan(labels.shape, write_grid(labels), block_shape)

    def one(block: Block) -> BlockStats:
        return block_stats(np.asarray(labels[block.core.slices()]), block.core.start)

    parts = map_blocks(one, plan, max_workers=max_workers, cancelled=cancelled, progress=progress)
    return reduce_stats(parts, voxel_size_nm)


def table_keys(labels_path: str) -> tuple[str, str]:
    """Keys of the CSV and JSON tables for the labels at ``labels_path``.

    They sit next to the top-level volume group, outside the zarr hierarchy
    (zarr readers warn about foreign files inside groups):
    ``volumes/p.zarr/labels/seg`` → ``volumes/p.seg.objects.csv``;
    ``volumes/l.zarr`` → ``volumes/l.objects.csv``.
    """
    image, sep, name = labels_path.rstrip("/").partition("/labels/")
    stem = image.removesuffix(".zarr") + (f".{name}" if sep else "")
    return f"{stem}.objects.csv", f"{stem}.objects.json"


def write_object_table(store: Store, labels_path: str, table: ObjectTable) -> list[str]:
    """Write the CSV and JSON tables for ``labels_path``; returns their keys."""
    csv_key, json_key = table_keys(labels_path)
    store.write_bytes(csv_key, table.to_csv().encode())
    store.write_json(json_key, table.to_json())
    return [csv_key, json_key]
