"""What counts as foreground in a volume: a thresholded probability or a nonzero label.

A volume's *kind* comes from its ``deep3m.kind`` attribute when that says
``"probabilities"`` (as the scheduler marks prediction outputs), ``"labels"`` or
``"mask"``; otherwise (e.g. ``"image"``) from its dtype:
floating point means a probability in [0, 1], integers and booleans mean
labels or a mask (nonzero is foreground). Integer probability maps (e.g. uint8
0..255) must say so with ``deep3m.kind = "probability"``; they are scaled by
the dtype's maximum before thresholding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from deep3m.core.errors import InvalidArgumentError

Kind = Literal["probability", "labels", "mask"]
KINDS: tuple[Kind, ...] = ("probability", "labels", "mask")
DEFAULT_THRESHOLD = 0.5


def check_threshold(threshold: float, *, field: str = "threshold") -> float:
    """A probability threshold in (0, 1]; 0 (a protobuf default) means 0.5."""
    value = float(threshold)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise InvalidArgumentError(f"{field} must lie in [0, 1], got {threshold}", field=field)
    return value if value > 0 else DEFAULT_THRESHOLD


def volume_kind(dtype: np.dtype[Any] | str, attributes: Mapping[str, Any] | None = None) -> Kind:
    declared = (attributes or {}).get("kind")
    if declared in ("probabilities", "probability"):
        return "probability"
    if declared in ("labels", "mask"):
        return "labels" if declared == "labels" else "mask"
    dt = np.dtype(dtype)
    return "probability" if np.issubdtype(dt, np.floating) else "labels"


def foreground(data: np.ndarray, kind: Kind, threshold: float) -> np.ndarray:
    """Boolean mask of foreground voxels of ``data`` (a block of a volume of ``kind``)."""
    if kind != "probability":
        return np.asarray(data != 0)
    if np.issubdtype(data.dtype, np.integer):
        # Integer probabilities: compare in the integer domain to avoid a float copy.
        top = np.iinfo(data.dtype).max
        return np.asarray(data >= math.ceil(threshold * top - 1e-9))
    if data.dtype == np.bool_:
        return np.asarray(data)
    return np.asarray(data >= threshold)
