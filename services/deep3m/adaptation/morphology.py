"""The morphology prior for label-free checkpoint selection.

Mitochondria keep their shape across microscopes: compact, convex-ish cross
sections. From the source labels: label each stack in 3D, take the 2D cross
section of every object on every slice, keep regions over 10 px and average
their solidity (area / convex-hull area) → ``s_src``. At each checkpoint the
thresholded target prediction gives ``s_pred`` the same way; the checkpoint with
the smallest ``|s_pred − s_src|`` wins. The older criterion compares the mean
relative object area (region area / slice area) instead.

A checkpoint that predicts no foreground region has no figure: it cannot be
chosen. When no checkpoint has one, the selection falls back (to the last
candidate) and says so in ``Selection.fallback`` instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from skimage.measure import label, regionprops

from deep3m.core.errors import InvalidArgumentError

MIN_AREA_PX = 10
Criterion = Literal["solidity", "area"]
CRITERIA: tuple[str, ...] = ("solidity", "area")


@dataclass(frozen=True)
class Morphology:
    """Shape figures of a binary stack; NaN where it has no region over the size floor."""

    solidity: float
    relative_area: float
    regions: int

    @property
    def empty(self) -> bool:
        return self.regions == 0

    def value(self, criterion: Criterion) -> float:
        return self.solidity if criterion == "solidity" else self.relative_area

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in asdict(self).items()
        }


def _as_stack(mask: np.ndarray, field: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InvalidArgumentError(
            f"{field} must be a 2D slice or a (z, y, x) stack, got shape {arr.shape}", field=field
        )
    if arr.size == 0:
        raise InvalidArgumentError(f"{field} is empty (shape {arr.shape})", field=field)
    return arr.astype(bool)


def morphology(
    masks: np.ndarray | Iterable[np.ndarray],
    *,
    min_area_px: int = MIN_AREA_PX,
    field: str = "mask",
) -> Morphology:
    """Mean solidity and mean relative area of the 2D cross sections of the 3D objects.

    ``masks``: one binary (z, y, x) stack, or several (each labelled on its own,
    e.g. stacks of different sizes). Regions of ``min_area_px`` pixels or fewer
    are left out.
    """
    stacks = [masks] if isinstance(masks, np.ndarray) else list(masks)
    if not stacks:
        raise InvalidArgumentError(f"{field}: no stacks given", field=field)
    solidity: list[float] = []
    relative: list[float] = []
    for i, m in enumerate(stacks):
        stack = _as_stack(m, field if len(stacks) == 1 else f"{field}[{i}]")
        labels3d = label(stack, connectivity=stack.ndim)
        slice_px = float(stack.shape[1] * stack.shape[2])
        for section in labels3d:
            if not section.any():
                continue
            for region in regionprops(section):
                if region.area > min_area_px:
                    solidity.append(float(region.solidity))
                    relative.append(float(region.area) / slice_px)
    if not solidity:
        return Morphology(math.nan, math.nan, 0)
    return Morphology(float(np.mean(solidity)), float(np.mean(relative)), len(solidity))


def check_criterion(criterion: str) -> Criterion:
    if criterion not in CRITERIA:
        raise InvalidArgumentError(
            f"unknown selection criterion {criterion!r}; choose one of {', '.join(CRITERIA)}",
            field="select_by",
        )
    return criterion  # type: ignore[return-value]


@dataclass(frozen=True)
class Selection:
    """Which candidate a morphology criterion chose, and every candidate's distance."""

    chosen: str
    criterion: Criterion
    reference: float
    distances: dict[str, float | None]
    fallback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def select_checkpoint(
    candidates: Sequence[tuple[str, Morphology]],
    reference: Morphology,
    criterion: str = "solidity",
) -> Selection:
    """The candidate whose figure lies closest to the source labels' (``reference``).

    Candidates are ``(name, morphology of its thresholded target prediction)`` in
    training order. Ties go to the later candidate (more training).
    """
    crit = check_criterion(criterion)
    if not candidates:
        raise InvalidArgumentError("no checkpoints to choose from", field="checkpoints")
    if reference.empty:
        raise InvalidArgumentError(
            f"the source labels have no object cross section over {MIN_AREA_PX} px: "
            "no morphology to compare with",
            field="labels",
        )
    ref = reference.value(crit)
    distances: dict[str, float | None] = {}
    best: tuple[float, int, str] | None = None
    for order, (name, morph) in enumerate(candidates):
        if morph.empty:
            distances[name] = None
            continue
        d = abs(morph.value(crit) - ref)
        distances[name] = d
        if best is None or (d, -order) <= (best[0], -best[1]):
            best = (d, order, name)
    if best is None:
        last = candidates[-1][0]
        return Selection(
            chosen=last,
            criterion=crit,
            reference=ref,
            distances=distances,
            fallback=f"no checkpoint predicts foreground on the target; kept the last ({last})",
        )
    return Selection(chosen=best[2], criterion=crit, reference=ref, distances=distances)
