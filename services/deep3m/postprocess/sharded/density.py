"""Where the objects are: counts per region, density profiles and size histograms.

An object belongs where its centroid lies. Densities are objects per mm³
(1 mm³ = 10¹⁸ nm³). The density profile slides a window (``window_um`` wide,
every ``step_um``) along z, y and x through the volume's box (or a given box),
as in CDeep3M's nuclei density figure; windows lie wholly inside the box, and
along an axis shorter than the window the one window is the whole extent.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.geometry import Block, Box
from deep3m.core.store import Store
from deep3m.postprocess.blockwise import block_plan, map_blocks, write_grid
from deep3m.postprocess.evaluate import values_at
from deep3m.postprocess.objects import csv_text
from deep3m.postprocess.sharded.table import ObjectStats, table_keys

NM3_PER_MM3 = 1e18
NM_PER_UM = 1e3
AXES = ("z", "y", "x")
PROFILE_COLUMNS = ("axis", "position_um", "objects", "window_volume_mm3", "density_per_mm3")


@dataclass(frozen=True)
class RegionCount:
    region: str
    objects: int
    volume_mm3: float

    @property
    def density_per_mm3(self) -> float:
        return self.objects / self.volume_mm3 if self.volume_mm3 else 0.0


def region_counts_csv(counts: Sequence[RegionCount]) -> str:
    return csv_text(
        ("region", "objects", "volume_mm3", "density_per_mm3"),
        [(c.region, c.objects, c.volume_mm3, c.density_per_mm3) for c in counts],
    )


def _voxel_mm3(table: ObjectStats) -> float:
    return float(np.prod(table.voxel_size_nm)) / NM3_PER_MM3


def counts_in_boxes(table: ObjectStats, boxes: Mapping[str, Box]) -> list[RegionCount]:
    """Objects whose centroid lies in each named box (voxel coordinates, half-open)."""
    out = []
    for name, box in boxes.items():
        if box.ndim != 3 or box.empty:
            raise InvalidArgumentError(
                f"region {name!r} must be a non-empty 3D box, got {box}", field="regions"
            )
        inside = np.all(
            (table.centroid >= np.asarray(box.start)) & (table.centroid < np.asarray(box.stop)),
            axis=1,
        )
        out.append(RegionCount(name, int(inside.sum()), box.size * _voxel_mm3(table)))
    return out


def counts_in_mask(
    table: ObjectStats,
    regions: Any,
    *,
    block_shape: Sequence[int] | None = None,
    max_workers: int = 1,
    cancelled: threading.Event | None = None,
) -> list[RegionCount]:
    """Objects per region of an integer region volume (0: no region), by centroid voxel,
    and each region's volume; the region volume is read block by block."""
    if not np.issubdtype(np.dtype(regions.dtype), np.integer) and regions.dtype != np.bool_:
        raise InvalidArgumentError(
            f"a region volume holds integer region ids, not {regions.dtype}", field="regions"
        )
    plan = block_plan(regions.shape, write_grid(regions), block_shape)

    def sizes(block: Block) -> np.ndarray:
        return np.bincount(np.asarray(regions[block.core.slices()]).astype(np.int64).ravel())

    parts = map_blocks(sizes, plan, max_workers=max_workers, cancelled=cancelled)
    voxels = np.zeros(max((len(p) for p in parts), default=1), np.int64)
    for part in parts:
        voxels[: len(part)] += part
    shape = np.asarray(regions.shape)
    points = np.clip(np.floor(table.centroid + 0.5).astype(np.int64), 0, shape - 1)
    hit = values_at(regions, points, plan.block_shape).astype(np.int64)
    objects = np.bincount(hit, minlength=len(voxels))
    return [
        RegionCount(str(r), int(objects[r]), int(voxels[r]) * _voxel_mm3(table))
        for r in range(1, len(voxels))
        if voxels[r]
    ]


@dataclass(frozen=True, eq=False)
class DensityProfile:
    """Rows of (axis, window centre in µm, objects, window volume, density)."""

    window_um: float
    axis: np.ndarray  # (n,) str
    position_um: np.ndarray
    objects: np.ndarray
    volume_mm3: np.ndarray

    @property
    def density_per_mm3(self) -> np.ndarray:
        return self.objects / self.volume_mm3

    def along(self, axis: str) -> tuple[np.ndarray, np.ndarray]:
        """(window centres in µm, densities) along one axis."""
        pick = self.axis == axis
        return self.position_um[pick], self.density_per_mm3[pick]

    def to_csv(self) -> str:
        density = self.density_per_mm3
        rows = [
            (str(self.axis[i]), float(self.position_um[i]), int(self.objects[i]),
             float(self.volume_mm3[i]), float(density[i]))
            for i in range(len(self.axis))
        ]  # fmt: skip
        return csv_text(
            ("axis", "position_um", "objects", "window_volume_mm3", "density_per_mm3"), rows
        )


def density_profile(
    table: ObjectStats,
    box: Box,
    *,
    window_um: float,
    step_um: float | None = None,
) -> DensityProfile:
    """Objects per mm³ in a window sliding along each axis of ``box`` (voxel coordinates)."""
    if not window_um > 0 or (step_um is not None and not step_um > 0):
        raise InvalidArgumentError(
            f"window_um and step_um must be > 0, got {window_um} and {step_um}",
            field="window_um",
        )
    vs = np.asarray(table.voxel_size_nm)
    lo_nm, hi_nm = np.asarray(box.start) * vs, np.asarray(box.stop) * vs
    extent_nm = hi_nm - lo_nm
    window, step = window_um * NM_PER_UM, (step_um or window_um / 2) * NM_PER_UM
    inside = np.all((table.centroid >= box.start) & (table.centroid < box.stop), axis=1)
    centres = table.centroid_nm[inside]
    axes, positions, objects, volumes = [], [], [], []
    for a, name in enumerate(AXES):
        # Along an axis shorter than the window, the one window is the whole extent.
        width = min(window, float(extent_nm[a]))
        cross_nm2 = float(np.prod(np.delete(extent_nm, a)))
        starts = lo_nm[a] + np.arange(0, extent_nm[a] - width + 1e-9 * width, step)
        along = np.sort(centres[:, a])
        counts = np.searchsorted(along, starts + width, "left") - np.searchsorted(
            along, starts, "left"
        )
        axes += [name] * len(starts)
        positions.append((starts + width / 2) / NM_PER_UM)
        objects.append(counts)
        volumes.append(np.full(len(starts), width * cross_nm2 / NM3_PER_MM3))
    return DensityProfile(
        float(window_um), np.asarray(axes), np.concatenate(positions),
        np.concatenate(objects).astype(np.int64), np.concatenate(volumes),
    )  # fmt: skip


@dataclass(frozen=True, eq=False)
class SizeHistogram:
    """Objects per volume bin; bins are logarithmic, in µm³."""

    edges_um3: np.ndarray  # (bins + 1,)
    counts: np.ndarray  # (bins,)

    def to_csv(self) -> str:
        rows = [
            (float(self.edges_um3[i]), float(self.edges_um3[i + 1]), int(c))
            for i, c in enumerate(self.counts)
        ]
        return csv_text(("volume_from_um3", "volume_to_um3", "objects"), rows)


def size_histogram(table: ObjectStats, *, bins: int = 20) -> SizeHistogram:
    """Histogram of object volumes over ``bins`` logarithmic bins spanning the objects."""
    if bins < 1:
        raise InvalidArgumentError(f"bins must be >= 1, got {bins}", field="bins")
    volumes = table.volume_nm3 / NM_PER_UM**3
    if not len(volumes):
        return SizeHistogram(np.zeros(bins + 1), np.zeros(bins, np.int64))
    lo, hi = float(volumes.min()), float(volumes.max())
    edges = np.geomspace(lo, hi * (1 + 1e-9), bins + 1) if hi > lo else np.array([lo, hi * 2])
    counts, _ = np.histogram(volumes, edges)
    return SizeHistogram(edges, counts.astype(np.int64))


def _figure_png(draw: Any, size: tuple[float, float]) -> bytes:
    # The object API on an Agg canvas: no pyplot state, no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    draw(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def density_profile_png(profile: DensityProfile) -> bytes:
    """The profile along z, y and x as one PNG (three panels)."""

    def draw(fig: Any) -> None:
        for i, name in enumerate(AXES):
            ax = fig.add_subplot(1, 3, i + 1)
            pos, density = profile.along(name)
            ax.plot(pos, density, marker="o", markersize=3)
            ax.set_xlabel(f"{name} (µm)")
            ax.set_ylabel("objects per mm³")
            ax.set_title(f"along {name}, {profile.window_um:g} µm window")
            ax.set_ylim(bottom=0)

    return _figure_png(draw, (12, 3.6))


def size_histogram_png(histogram: SizeHistogram) -> bytes:
    """The size histogram as a PNG (log volume axis)."""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        edges = histogram.edges_um3
        ax.stairs(histogram.counts, edges, fill=True)
        if edges[0] > 0:
            ax.set_xscale("log")
        ax.set_xlabel("object volume (µm³)")
        ax.set_ylabel("objects")

    return _figure_png(draw, (6, 4))


def output_keys(labels_path: str) -> dict[str, str]:
    """Keys of the density and size outputs, beside the object tables."""
    csv_key, _ = table_keys(labels_path)
    stem = csv_key.removesuffix(".objects.csv")
    return {
        "density_csv": f"{stem}.density.csv",
        "density_png": f"{stem}.density.png",
        "sizes_csv": f"{stem}.sizes.csv",
        "sizes_png": f"{stem}.sizes.png",
    }


def write_density_outputs(
    store: Store,
    labels_path: str,
    table: ObjectStats,
    box: Box,
    *,
    window_um: float,
    step_um: float | None = None,
    bins: int = 20,
) -> dict[str, str]:
    """Density profile and size histogram, as tables and PNGs; returns their keys."""
    keys = output_keys(labels_path)
    profile = density_profile(table, box, window_um=window_um, step_um=step_um)
    histogram = size_histogram(table, bins=bins)
    store.write_bytes(keys["density_csv"], profile.to_csv().encode())
    store.write_bytes(keys["density_png"], density_profile_png(profile))
    store.write_bytes(keys["sizes_csv"], histogram.to_csv().encode())
    store.write_bytes(keys["sizes_png"], size_histogram_png(histogram))
    return keys
