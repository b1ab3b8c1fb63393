"""Stage (d): the object table, reduced from every block's piece statistics and the id map.

Figures per object, in physical units where they have one (the column names
say which):

- volume: voxel count, and nm³;
- centroid: mean voxel position, in voxels and nm;
- bounding box: half-open, in voxels;
- mean probability: over the object's voxels (1 for a mask or label source);
- ``boundary_face_area_nm2``: the area of the voxel faces between the object
  and background — exact for the voxel solid, but it overestimates a smooth
  surface (a sphere by about 3/2); faces where watershed-split objects touch
  each other count for neither;
- ``surface_area_nm2``: that area × 2/3, the mean ratio of a surface's area
  to its voxel-face area over isotropic orientations (Cauchy's projection
  formula); the estimate sphericity uses;
- solidity: voxels / voxels whose centres lie in the object's convex hull
  (the hull of its voxels' face centres, as skimage's ``solidity``), 1 for a
  convex object;
- sphericity: π^(1/3) (6 V)^(2/3) / A, 1 for a ball.

Written as Parquet (typed columns, for pandas/pyarrow) beside CSV.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Imported with the module (a worker's start), not by the first reduce task: the
# import costs more than the rest of that single task, which the job waits on.
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.spatial import ConvexHull

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.store import Store
from deep3m.postprocess.objects import InPhysicalUnits, csv_text
from deep3m.postprocess.objects import table_keys as object_table_keys
from deep3m.postprocess.sharded.block import PieceStats, from_document_bytes, to_document_bytes
from deep3m.postprocess.sharded.merge import IdMap

# Mean ratio of a surface's area to the area of its voxel faces (isotropic surfaces).
VOXEL_FACE_AREA_RATIO = 2.0 / 3.0
# Voxel centres on a hull facet count as inside.
_EPS = 1e-7

COLUMNS = (
    "label", "volume_voxels", "volume_nm3", "surface_area_nm2", "boundary_face_area_nm2",
    "centroid_z_nm", "centroid_y_nm", "centroid_x_nm",
    "centroid_z_voxels", "centroid_y_voxels", "centroid_x_voxels",
    "bbox_z0_voxels", "bbox_y0_voxels", "bbox_x0_voxels",
    "bbox_z1_voxels", "bbox_y1_voxels", "bbox_x1_voxels",
    "mean_probability", "solidity", "sphericity",
)  # fmt: skip


def check_voxel_size(voxel_size_nm: Sequence[float]) -> tuple[float, float, float]:
    if len(voxel_size_nm) != 3 or not all(
        math.isfinite(float(v)) and float(v) > 0 for v in voxel_size_nm
    ):
        raise InvalidArgumentError(
            f"voxel_size_nm must be 3 positive sizes, got {list(voxel_size_nm)}",
            field="voxel_size_nm",
        )
    return (float(voxel_size_nm[0]), float(voxel_size_nm[1]), float(voxel_size_nm[2]))


@dataclass(frozen=True, eq=False)
class ObjectStats(InPhysicalUnits):
    """One row per object, labels ascending."""

    labels: np.ndarray  # (n,) int64
    volume_voxels: np.ndarray  # (n,) int64
    centroid: np.ndarray  # (n, 3) float64 voxels
    bbox_start: np.ndarray  # (n, 3) int64
    bbox_stop: np.ndarray  # (n, 3) int64
    mean_probability: np.ndarray  # (n,) float64
    boundary_face_area_nm2: np.ndarray  # (n,) float64
    convex_voxels: np.ndarray  # (n,) int64 voxels inside the convex hull
    voxel_size_nm: tuple[float, float, float]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def surface_area_nm2(self) -> np.ndarray:
        return self.boundary_face_area_nm2 * VOXEL_FACE_AREA_RATIO

    @property
    def solidity(self) -> np.ndarray:
        return self.volume_voxels / self.convex_voxels

    @property
    def sphericity(self) -> np.ndarray:
        return np.pi ** (1 / 3) * (6 * self.volume_nm3) ** (2 / 3) / self.surface_area_nm2

    def columns(self) -> dict[str, np.ndarray]:
        """Every column of :data:`COLUMNS` as an array."""
        cen, cen_nm = self.centroid, self.centroid_nm
        values = [
            self.labels, self.volume_voxels, self.volume_nm3, self.surface_area_nm2,
            self.boundary_face_area_nm2, cen_nm[:, 0], cen_nm[:, 1], cen_nm[:, 2],
            cen[:, 0], cen[:, 1], cen[:, 2], *self.bbox_start.T, *self.bbox_stop.T,
            self.mean_probability, self.solidity, self.sphericity,
        ]  # fmt: skip
        return dict(zip(COLUMNS, values, strict=True))

    def to_csv(self) -> str:
        cols = self.columns()
        rows = zip(*(cols[c].tolist() for c in COLUMNS), strict=True)
        return csv_text(COLUMNS, rows)

    _FIELDS = (
        "labels", "volume_voxels", "centroid", "bbox_start", "bbox_stop",
        "mean_probability", "boundary_face_area_nm2", "convex_voxels",
    )  # fmt: skip

    def to_bytes(self) -> bytes:
        """The table as a document (a reduce shard's output)."""
        arrays = {name: getattr(self, name) for name in self._FIELDS}
        return to_document_bytes({**arrays, "voxel_size_nm": np.asarray(self.voxel_size_nm)})

    @classmethod
    def from_bytes(cls, data: bytes) -> ObjectStats:
        d = from_document_bytes(data, "object table")
        vs = check_voxel_size(d["voxel_size_nm"].tolist())
        return cls(**{name: d[name] for name in cls._FIELDS}, voxel_size_nm=vs)

    def to_parquet(self) -> bytes:
        meta = {"voxel_size_nm": ",".join(repr(v) for v in self.voxel_size_nm)}
        table = pa.table({c: pa.array(v) for c, v in self.columns().items()}, metadata=meta)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.getvalue()


def _empty(voxel_size_nm: tuple[float, float, float]) -> ObjectStats:
    z1, z3 = np.zeros(0, np.int64), np.zeros((0, 3), np.int64)
    f1 = np.zeros(0)
    return ObjectStats(z1, z1, np.zeros((0, 3)), z3, z3, f1, f1, f1, voxel_size_nm)


def reduce_objects(
    pieces: Iterable[PieceStats],
    id_map: IdMap,
    voxel_size_nm: Sequence[float],
    *,
    shard: tuple[int, int] = (0, 1),
) -> ObjectStats:
    """The object table from every block's piece statistics (in any order).

    ``shard=(k, n)`` keeps only the objects whose label is k + 1 modulo n, so
    n tasks can share the per-object hull work; :func:`concat_tables` joins
    their tables.
    """
    vs = check_voxel_size(voxel_size_nm)
    k, of = shard
    if of < 1 or not 0 <= k < of:
        raise InvalidArgumentError(
            f"shard must be (k, n) with 0 <= k < n, got {shard}", field="shard"
        )
    ids, counts, sums, starts, stops, prob, faces = [], [], [], [], [], [], []
    points, point_ids = [], []
    for part in pieces:
        if not len(part):
            continue
        glob = id_map.for_block(part.index)[1:]
        if len(glob) != len(part):
            raise InvalidArgumentError(
                f"block {list(part.index)} has {len(part)} pieces but the id map knows {len(glob)}",
                field="pieces",
            )
        kept = (glob > 0) & ((glob - 1) % of == k)
        ids.append(glob[kept])
        counts.append(part.counts[kept])
        sums.append(part.coord_sums[kept])
        starts.append(part.bbox_start[kept])
        stops.append(part.bbox_stop[kept])
        prob.append(part.probability_sums[kept])
        faces.append(part.boundary_faces[kept])
        owner = np.repeat(np.where(kept, glob, 0), np.diff(part.hull_offsets))
        points.append(part.hull_points[owner > 0])
        point_ids.append(owner[owner > 0])
    if not ids or not sum(len(i) for i in ids):
        return _empty(vs)
    labels, inverse = np.unique(np.concatenate(ids), return_inverse=True)
    n = len(labels)

    def add(parts: list[np.ndarray], width: int | None) -> np.ndarray:
        shape = (n,) if width is None else (n, width)
        out = np.zeros(shape, parts[0].dtype)
        np.add.at(out, inverse, np.concatenate(parts))
        return out

    volume = add(counts, None)
    coord_sums = add(sums, 3)
    bbox_start = np.full((n, 3), np.iinfo(np.int64).max, np.int64)
    np.minimum.at(bbox_start, inverse, np.concatenate(starts))
    bbox_stop = np.full((n, 3), np.iinfo(np.int64).min, np.int64)
    np.maximum.at(bbox_stop, inverse, np.concatenate(stops))
    face_counts = add(faces, 3)
    # A face normal to z has area y·x, and so on.
    face_area = np.array([vs[1] * vs[2], vs[0] * vs[2], vs[0] * vs[1]])
    convex = _convex_voxels(
        np.concatenate(points),
        np.searchsorted(labels, np.concatenate(point_ids)),
        bbox_start,
        bbox_stop,
    )
    return ObjectStats(
        labels, volume, coord_sums / volume[:, None], bbox_start, bbox_stop,
        add(prob, None) / volume, face_counts @ face_area, convex, vs,
    )  # fmt: skip


def concat_tables(parts: Sequence[ObjectStats]) -> ObjectStats:
    """One table from the tables of disjoint shards, labels ascending."""
    if not parts:
        raise InvalidArgumentError("no tables to join", field="parts")
    vs = parts[0].voxel_size_nm
    if any(p.voxel_size_nm != vs for p in parts):
        raise InvalidArgumentError("tables of different voxel sizes", field="parts")
    labels = np.concatenate([p.labels for p in parts])
    order = np.argsort(labels, kind="stable")
    if len(np.unique(labels)) != len(labels):
        raise InvalidArgumentError("the tables share objects: shards overlap", field="parts")
    joined = {f: np.concatenate([getattr(p, f) for p in parts])[order] for f in ObjectStats._FIELDS}
    return ObjectStats(**joined, voxel_size_nm=vs)


def _convex_voxels(
    points: np.ndarray, owner: np.ndarray, bbox_start: np.ndarray, bbox_stop: np.ndarray
) -> np.ndarray:
    """Per object, the voxel centres inside the hull of its (doubled) points.

    Counted slice by slice and row by row: in slice z only the facets that
    cross it bound the hull's cross-section, and in each (z, y) row that
    cross-section is an interval of x.
    """
    order = np.argsort(owner, kind="stable")
    points, owner = points[order], owner[order]
    n = len(bbox_start)
    bounds = np.searchsorted(owner, np.arange(n + 1))
    out = np.zeros(n, np.int64)
    for i in range(n):
        hull = ConvexHull(points[bounds[i] : bounds[i + 1]] / 2.0)
        corners_z = hull.points[hull.simplices][:, :, 0]
        z_lo, z_hi = corners_z.min(axis=1), corners_z.max(axis=1)
        ys = np.arange(bbox_start[i, 1], bbox_stop[i, 1], dtype=np.float64)
        for z in range(int(bbox_start[i, 0]), int(bbox_stop[i, 0])):
            crossing = (z_lo <= z + _EPS) & (z_hi >= z - _EPS)
            eq = hull.equations[crossing]  # inside: n·p + o <= 0
            rest = -(np.outer(ys, eq[:, 1]) + (eq[:, 0] * z + eq[:, 3]))  # n_x·x <= rest
            out[i] += _row_widths(rest, eq[:, 2])
    return out


def _row_widths(rest: np.ndarray, nx: np.ndarray) -> int:
    """Integer x with nx·x <= rest for every facet (columns), summed over rows."""
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = rest / nx
    upper = np.where(nx > _EPS, bound, np.inf).min(axis=1, initial=np.inf)
    lower = np.where(nx < -_EPS, bound, -np.inf).max(axis=1, initial=-np.inf)
    open_row = (np.where(np.abs(nx) <= _EPS, rest, 0.0) >= -_EPS).all(axis=1)
    width = np.floor(upper + _EPS) - np.ceil(lower - _EPS) + 1
    return int(np.clip(width, 0, None)[open_row & np.isfinite(width)].sum())


def table_keys(labels_path: str) -> tuple[str, str]:
    """Keys of the CSV and Parquet object tables of the labels at ``labels_path``,
    beside the volume group (as :func:`deep3m.postprocess.objects.table_keys`)."""
    csv_key, _ = object_table_keys(labels_path)
    return csv_key, csv_key.removesuffix(".csv") + ".parquet"


def evaluation_key(labels_path: str) -> str:
    """Key of the evaluation figures of the labels at ``labels_path``, beside the tables."""
    return table_keys(labels_path)[0].removesuffix(".objects.csv") + ".evaluation.json"


def write_object_tables(store: Store, labels_path: str, stats: ObjectStats) -> tuple[str, str]:
    """Write the CSV and Parquet tables; returns their keys."""
    csv_key, parquet_key = table_keys(labels_path)
    store.write_bytes(csv_key, stats.to_csv().encode())
    store.write_bytes(parquet_key, stats.to_parquet())
    return csv_key, parquet_key
