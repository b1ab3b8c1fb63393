"""Bring a stack to another in-plane pixel size (what a user does before adapting).

Networks learn object sizes in pixels: a 4 nm target seen by a 5.9 nm model has
mitochondria 1.5× too large. Rescaling the target's y/x by ``from/to`` puts both
domains on one pixel grid; z is left alone (sections are predicted one by one).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from deep3m.core.errors import InvalidArgumentError


def rescale_factor(from_nm: float, to_nm: float) -> float:
    if not (from_nm > 0 and to_nm > 0):
        raise InvalidArgumentError(
            f"pixel sizes must be positive, got {from_nm!r} → {to_nm!r}", field="voxel_size_nm"
        )
    return float(from_nm) / float(to_nm)


def rescale_stack(
    stack: np.ndarray, from_nm: float, to_nm: float, *, labels: bool = False
) -> np.ndarray:
    """A (z, y, x) stack resampled in y/x from ``from_nm`` to ``to_nm`` pixels.

    Images use linear interpolation (kept uint8 if they were); labels nearest.
    """
    arr = np.asarray(stack)
    if arr.ndim != 3:
        raise InvalidArgumentError(
            f"a stack must be (z, y, x), got shape {arr.shape}", field="images"
        )
    f = rescale_factor(from_nm, to_nm)
    if abs(f - 1.0) < 1e-6:
        return arr
    out = ndimage.zoom(arr.astype(np.float32), (1.0, f, f), order=0 if labels else 1)
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(arr.dtype)
