"""Stage (a), one task per block: label the core and describe it in two small documents.

The core's foreground (threshold, or nonzero) is labelled 1..n by
``connected-components-3d`` (several times faster than ``scipy.ndimage.label``
on the same mask, and deterministic: the same mask always gives the same
labels, which is what lets stage (c) label again instead of storing them).

:class:`BlockFaces` holds the local labels on the six faces of the core — all
the merge needs to find pieces that continue into a neighbour.
:class:`PieceStats` holds, per piece, partial figures that add up exactly
across blocks: voxel count, coordinate sums (centroid), bounding box,
probability sum (mean probability), boundary faces per axis (surface area)
and candidate convex-hull points (solidity). Boundary faces need the mask one
voxel beyond the core, so the block is read with a one-voxel halo; outside the
volume is background. Two face-adjacent foreground voxels always belong to one
object, so a face on the block boundary is a surface face exactly when the
voxel beyond it is background: no neighbour's labels are needed.

Coordinates are global voxel indices (z, y, x); hull points (voxel face
centres) are stored doubled (``2·centre ± 1`` along one axis) so they stay
integers.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cc3d
import numcodecs
import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from deep3m.core.errors import FailedPreconditionError, InvalidArgumentError
from deep3m.core.geometry import Box
from deep3m.postprocess.foreground import Kind, foreground
from deep3m.postprocess.watershed import watershed_block

# cc3d names neighbourhoods by neighbour count; LabelSpec by scipy's rank.
CC3D_CONNECTIVITY: dict[int, Literal[6, 18, 26]] = {1: 6, 2: 18, 3: 26}
# Pieces with at most this many candidate face centres skip qhull here; the reduce
# stage takes the hull of the union anyway.
_HULL_DIRECT = 64
# A voxel as a convex solid: its six face centres (doubled coordinates), an
# octahedron, as skimage's convex hull images use; it keeps a single voxel or a
# flat object full-dimensional for qhull.
_FACE_CENTRES = np.array(
    [(-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)], np.int64
)


# Documents: named arrays laid out raw behind a small JSON index, compressed whole
# with zstd. Reading one is a decompression and a view per array: no zip CRC pass and
# no copy per member, which made .npz decoding a fifth of a postprocess worker's CPU.
# Documents written as .npz (plain or zstd-compressed) are still read.
_ZSTD = numcodecs.Zstd(level=1)
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ARRAYS_MAGIC = b"D3MARR01"
_ALIGN = 16


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def to_document_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    index, parts, offset = [], [], 0
    for name, value in arrays.items():
        array = np.asarray(value)  # tobytes() below is C order whatever the layout
        if array.dtype.hasobject:
            raise InvalidArgumentError(f"array {name!r} of a document holds objects", field=name)
        index.append([name, array.dtype.str, list(array.shape), offset])
        parts += [array.tobytes(), bytes(_aligned(array.nbytes) - array.nbytes)]
        offset += _aligned(array.nbytes)
    header = json.dumps(index).encode()
    head = _ARRAYS_MAGIC + struct.pack("<Q", len(header)) + header
    head += bytes(_aligned(len(head)) - len(head))
    return bytes(_ZSTD.encode(head + b"".join(parts)))


def _arrays_from(data: bytes) -> dict[str, np.ndarray]:
    (length,) = struct.unpack_from("<Q", data, len(_ARRAYS_MAGIC))
    start = len(_ARRAYS_MAGIC) + 8
    base = _aligned(start + length)
    out = {}
    for name, dtype, shape, offset in json.loads(data[start : start + length]):
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if base + offset + count * dt.itemsize > len(data):
            raise ValueError(f"array {name!r} runs past the end of the document")
        out[str(name)] = np.frombuffer(data, dt, count, base + offset).reshape(tuple(shape))
    return out


def from_document_bytes(data: bytes, what: str) -> dict[str, np.ndarray]:
    """The arrays of a document (read-only views of it)."""
    try:
        if data[:4] == _ZSTD_MAGIC:
            data = bytes(_ZSTD.decode(data))
        if data[: len(_ARRAYS_MAGIC)] == _ARRAYS_MAGIC:
            return _arrays_from(data)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (ValueError, OSError, KeyError, EOFError, RuntimeError, TypeError, struct.error) as exc:
        raise FailedPreconditionError(f"{what} document is unreadable: {exc}") from exc


def _box_arrays(box: Box) -> dict[str, np.ndarray]:
    return {"start": np.asarray(box.start, np.int64), "stop": np.asarray(box.stop, np.int64)}


def _box_of(arrays: Mapping[str, np.ndarray]) -> Box:
    return Box(tuple(int(v) for v in arrays["start"]), tuple(int(v) for v in arrays["stop"]))


@dataclass(frozen=True, eq=False)
class BlockFaces:
    """Local labels (uint32) on the low and high face of the core along each axis.

    ``low[a]`` is the core's first plane along axis ``a`` (the other two axes
    in order), ``high[a]`` its last.
    """

    index: tuple[int, ...]
    core: Box
    low: tuple[np.ndarray, np.ndarray, np.ndarray]
    high: tuple[np.ndarray, np.ndarray, np.ndarray]

    def to_bytes(self) -> bytes:
        arrays = {"index": np.asarray(self.index, np.int64), **_box_arrays(self.core)}
        for a in range(3):
            arrays[f"low{a}"] = self.low[a]
            arrays[f"high{a}"] = self.high[a]
        return to_document_bytes(arrays)

    @classmethod
    def from_bytes(cls, data: bytes) -> BlockFaces:
        d = from_document_bytes(data, "block faces")
        low = (d["low0"], d["low1"], d["low2"])
        high = (d["high0"], d["high1"], d["high2"])
        return cls(tuple(int(v) for v in d["index"]), _box_of(d), low, high)


@dataclass(frozen=True, eq=False)
class PieceStats:
    """Partial figures of the pieces 1..n of one block (row i is local label i + 1)."""

    index: tuple[int, ...]
    core: Box
    counts: np.ndarray  # (n,) int64 voxels
    coord_sums: np.ndarray  # (n, 3) int64, global voxel coordinates
    bbox_start: np.ndarray  # (n, 3) int64, inclusive
    bbox_stop: np.ndarray  # (n, 3) int64, exclusive
    probability_sums: np.ndarray  # (n,) float64
    boundary_faces: np.ndarray  # (n, 3) int64 faces normal to z, y, x on the boundary
    hull_points: np.ndarray  # (m, 3) int64 doubled face-centre coordinates
    hull_offsets: np.ndarray  # (n + 1,) int64: piece i owns points [o[i], o[i+1])
    seeds: np.ndarray  # (n,) int64 watershed seed key (global linear index), -1: none

    def __len__(self) -> int:
        return len(self.counts)

    _FIELDS = (
        "counts", "coord_sums", "bbox_start", "bbox_stop", "probability_sums",
        "boundary_faces", "hull_points", "hull_offsets", "seeds",
    )  # fmt: skip

    def to_bytes(self) -> bytes:
        arrays = {"index": np.asarray(self.index, np.int64), **_box_arrays(self.core)}
        arrays.update({name: getattr(self, name) for name in self._FIELDS})
        return to_document_bytes(arrays)

    @classmethod
    def from_bytes(cls, data: bytes) -> PieceStats:
        d = from_document_bytes(data, "piece statistics")
        index = tuple(int(v) for v in d["index"])
        return cls(index, _box_of(d), *(d[name] for name in cls._FIELDS))


@dataclass(frozen=True, eq=False)
class BlockSummary:
    """What stage (a) produces for one block."""

    faces: BlockFaces
    pieces: PieceStats


def check_connectivity(connectivity: int) -> int:
    if connectivity not in CC3D_CONNECTIVITY:
        raise InvalidArgumentError(
            f"connectivity must be 1, 2 or 3, got {connectivity}", field="connectivity"
        )
    return connectivity


def label_mask(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """Labels 1..n (uint32) of a boolean core mask."""
    neighbours = CC3D_CONNECTIVITY[check_connectivity(connectivity)]
    if sum(s > 1 for s in mask.shape) <= 1:
        # On a line every neighbourhood is the same; cc3d 4.1 fails on lines with 26.
        neighbours = 6
    labels = cc3d.connected_components(
        np.ascontiguousarray(mask), connectivity=neighbours, binary_image=True,
        out_dtype=np.uint32,
    )  # fmt: skip
    return np.asarray(labels, np.uint32)


@dataclass(frozen=True)
class Labelling:
    """How a block's foreground is found and labelled: the same in stages (a) and (c).

    With ``watershed_h`` set, touching objects are split per block by
    :func:`deep3m.postprocess.watershed.watershed_block` on the core read with
    ``watershed_halo`` (``sampling``: the voxel size relative to its finest
    axis), and each piece carries its seed so the merge ties pieces by seed.
    """

    kind: Kind
    threshold: float = 0.5
    connectivity: int = 1
    watershed_h: float | None = None
    watershed_halo: tuple[int, int, int] = (4, 16, 16)
    sampling: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        check_connectivity(self.connectivity)
        if not 0.0 < self.threshold <= 1.0:
            raise InvalidArgumentError(
                f"threshold must lie in (0, 1], got {self.threshold}", field="threshold"
            )
        if self.watershed_h is not None and not self.watershed_h > 0:
            raise InvalidArgumentError(
                f"watershed_h must be > 0, got {self.watershed_h}", field="watershed_h"
            )

    def mask(self, data: np.ndarray) -> np.ndarray:
        return foreground(data, self.kind, self.threshold)

    def label_core(self, source: Any, core: Box) -> tuple[np.ndarray, np.ndarray]:
        """The core's local labels 1..n (uint32) and each piece's seed key (-1: none;
        always -1 without watershed), exactly as :func:`summarize_block` numbers them."""
        if self.watershed_h is None:
            local = label_mask(self.mask(np.asarray(source[core.slices()])), self.connectivity)
            return local, np.full(int(local.max(initial=0)), -1, np.int64)
        volume = Box.from_shape(source.shape)
        read = core.grow(self.watershed_halo).intersect(volume)
        mask = self.mask(np.asarray(source[read.slices()]))
        local, _, seeds = watershed_block(
            mask, read, core, volume,
            connectivity=self.connectivity, h=self.watershed_h, sampling=self.sampling,
        )  # fmt: skip
        return local.astype(np.uint32), seeds.astype(np.int64)


def _probabilities(values: np.ndarray, kind: Kind) -> np.ndarray:
    if kind != "probability":
        return np.ones(values.shape, np.float64)
    if np.issubdtype(values.dtype, np.integer):
        return values.astype(np.float64) / float(np.iinfo(values.dtype).max)
    return values.astype(np.float64)


def _boundary_faces(local: np.ndarray, halo_mask: np.ndarray, n: int) -> np.ndarray:
    """Per piece, the faces (normal to each axis) between it and background."""
    faces = np.zeros((n, 3), np.int64)
    inner = (slice(1, -1),) * 3
    fg = local > 0
    for axis in range(3):
        for step in (-1, 1):
            shifted = list(inner)
            shifted[axis] = slice(1 + step, halo_mask.shape[axis] - 1 + step)
            hit = local[fg & ~halo_mask[tuple(shifted)]]
            faces[:, axis] += np.bincount(hit, minlength=n + 1)[1:]
    return faces


def _hull_candidates(
    local: np.ndarray, origin: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Doubled voxel face centres whose hull is each piece's convex hull.

    Hull vertices are extreme points, and a voxel whose two neighbours along any
    axis hold its piece is their midpoint, so only voxels that end a run of their
    piece along z, y and x alike are candidates (found on the whole block at
    once); of their face centres only the vertices of the hull are kept.
    """
    if not n:
        return np.zeros((0, 3), np.int64), np.zeros(n + 1, np.int64)
    candidate = local > 0
    for axis in range(3):
        if local.shape[axis] < 3:
            continue
        mid = [slice(None)] * 3
        lower, upper = list(mid), list(mid)
        mid[axis], lower[axis], upper[axis] = slice(1, -1), slice(None, -2), slice(2, None)
        centre = local[tuple(mid)]
        # Inside a run along ``axis``: both neighbours hold the voxel's piece.
        candidate[tuple(mid)] &= (centre != local[tuple(lower)]) | (centre != local[tuple(upper)])
    z, y, x = np.nonzero(candidate)
    ends = local[z, y, x].astype(np.int64)
    order = np.argsort(ends, kind="stable")  # raster order within each piece
    coords = np.stack([z[order], y[order], x[order]], axis=1).astype(np.int64) + origin
    labels = ends[order]
    bounds = np.searchsorted(labels, np.arange(1, n + 2))
    points, offsets = [], [0]
    for i in range(n):
        centres = coords[bounds[i] : bounds[i + 1]]
        # One qhull call per piece (its fixed cost dominates at these sizes); the
        # face centres are never flat, so qhull always accepts them.
        faces = (2 * centres[:, None, :] + _FACE_CENTRES[None, :, :]).reshape(-1, 3)
        if len(faces) > _HULL_DIRECT:
            faces = faces[ConvexHull(faces).vertices]
        points.append(faces)
        offsets.append(offsets[-1] + len(faces))
    return np.concatenate(points).astype(np.int64), np.asarray(offsets, np.int64)


def summarize_block(
    source: Any,
    index: Sequence[int],
    core: Box,
    labelling: Labelling,
) -> BlockSummary:
    """Label ``core`` of ``source`` (a zarr or numpy volume) and describe its pieces."""
    volume = Box.from_shape(source.shape)
    if core.ndim != 3 or core.empty or not volume.contains(core):
        raise InvalidArgumentError(
            f"block core {core} must be a non-empty box inside the volume {volume}",
            field="block.core",
        )
    grown = core.grow((1, 1, 1))
    read = grown.intersect(volume)
    data = np.asarray(source[read.slices()])
    halo_mask = np.zeros(grown.shape, bool)
    halo_mask[read.relative_to(grown)] = labelling.mask(data)
    values = data[core.relative_to(read)]
    if labelling.watershed_h is None:
        local = label_mask(halo_mask[1:-1, 1:-1, 1:-1], labelling.connectivity)
        seeds = np.full(int(local.max(initial=0)), -1, np.int64)
    else:
        local, seeds = labelling.label_core(source, core)
    n = int(local.max(initial=0))
    origin = np.asarray(core.start, np.int64)

    fg = np.nonzero(local)
    ids = local[fg].astype(np.int64)
    counts = np.bincount(ids, minlength=n + 1)[1:].astype(np.int64)
    sums = (
        np.stack([np.bincount(ids, weights=c, minlength=n + 1)[1:] for c in fg], axis=1)
        .round()
        .astype(np.int64)
        + counts[:, None] * origin[None, :]
    )
    boxes = ndimage.find_objects(local, max_label=n)
    starts = np.array([[s.start for s in b] for b in boxes], np.int64).reshape(n, 3)  # type: ignore[union-attr]
    stops = np.array([[s.stop for s in b] for b in boxes], np.int64).reshape(n, 3)  # type: ignore[union-attr]
    probability = np.bincount(
        ids, weights=_probabilities(values[fg], labelling.kind), minlength=n + 1
    )[1:]
    hull_points, hull_offsets = _hull_candidates(local, origin, n)

    idx = tuple(int(v) for v in index)
    faces = BlockFaces(
        idx,
        core,
        low=tuple(np.ascontiguousarray(local.take(0, axis=a)) for a in range(3)),  # type: ignore[arg-type]
        high=tuple(np.ascontiguousarray(local.take(-1, axis=a)) for a in range(3)),  # type: ignore[arg-type]
    )
    pieces = PieceStats(
        idx, core, counts, sums, starts + origin, stops + origin, probability,
        _boundary_faces(local, halo_mask, n), hull_points, hull_offsets, seeds,
    )  # fmt: skip
    return BlockSummary(faces, pieces)
