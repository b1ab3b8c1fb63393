"""Histogram matching to a pooled reference (Franco-Barranco et al. 2022).

The reference is the 256-bin histogram of all images of a domain pooled
together. Bin 0 is replaced by a linear extrapolation from bins 1 and 2,
``max(0, 2·h1 − h2)``, because zero is mostly padding (black borders of aligned
sections), not tissue. An image is mapped onto the reference through the
cumulative histograms (the quantile of each grey level is looked up in the
reference's quantiles); zero stays zero, so padding stays padding.

Used offline (every source image matched to the target), online as a training
augmentation (each sample matched with probability ``p``), and at prediction in
the other direction (target images → the training data's histogram, which the
model card keeps as plain data: :meth:`HistogramReference.to_dict`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deep3m.core.errors import InvalidArgumentError

BINS = 256


def corrected_zero_bin(h1: float, h2: float) -> float:
    """Bin 0 extrapolated from bins 1 and 2 (the line through them at 0), never negative."""
    return max(0.0, 2.0 * float(h1) - float(h2))


def _check_image(image: np.ndarray, field: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.size == 0:
        raise InvalidArgumentError(f"{field} is empty (shape {arr.shape})", field=field)
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgumentError(
            f"{field} must hold 8-bit grey levels (integers 0…255), got dtype {arr.dtype}",
            field=field,
        )
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= BINS:
        raise InvalidArgumentError(
            f"{field} grey levels must lie in 0…{BINS - 1}, found {lo}…{hi}", field=field
        )
    return arr


def _counts(image: np.ndarray) -> np.ndarray:
    return np.bincount(image.ravel().astype(np.int64), minlength=BINS).astype(np.float64)


@dataclass(frozen=True)
class HistogramReference:
    """A domain's pooled 256-bin histogram (bin 0 already corrected), per image."""

    counts: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.counts) != BINS:
            raise InvalidArgumentError(
                f"a histogram reference has {BINS} bins, got {len(self.counts)}",
                field="histogram.counts",
            )
        arr = np.asarray(self.counts, dtype=np.float64)
        if not np.all(np.isfinite(arr)) or np.any(arr < 0) or arr.sum() <= 0:
            raise InvalidArgumentError(
                "histogram counts must be finite, non-negative and not all zero",
                field="histogram.counts",
            )

    @property
    def quantiles(self) -> np.ndarray:
        c = np.cumsum(np.asarray(self.counts, dtype=np.float64))
        return np.asarray(c / c[-1])

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a model card or a metrics document."""
        return {"bins": BINS, "counts": [float(c) for c in self.counts]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HistogramReference:
        if not isinstance(data, Mapping) or "counts" not in data:
            raise InvalidArgumentError(
                "a histogram reference needs a 'counts' list", field="histogram"
            )
        if int(data.get("bins", BINS)) != BINS:
            raise InvalidArgumentError(
                f"histogram references have {BINS} bins, got {data.get('bins')!r}",
                field="histogram.bins",
            )
        return cls(tuple(float(c) for c in data["counts"]))


def reference_histogram(images: np.ndarray | Iterable[np.ndarray]) -> HistogramReference:
    """The pooled histogram of ``images`` (a stack or any iterable of 2D/3D arrays)."""
    stacks = [images] if isinstance(images, np.ndarray) else list(images)
    if not stacks:
        raise InvalidArgumentError("no images to build a histogram from", field="images")
    total = np.zeros(BINS, dtype=np.float64)
    n_images = 0
    for i, img in enumerate(stacks):
        arr = _check_image(img, f"images[{i}]")
        total += _counts(arr)
        n_images += arr.shape[0] if arr.ndim == 3 else 1
    return pooled_reference(total, n_images)


def pooled_reference(
    counts: Sequence[float] | np.ndarray, n_images: int, *, field: str = "images"
) -> HistogramReference:
    """The reference of a domain whose ``n_images`` images (slices) together count
    ``counts`` voxels per grey level: :func:`reference_histogram` without the images,
    e.g. from the counts a volume's writer recorded."""
    total = np.array(counts, dtype=np.float64)
    if total.shape != (BINS,) or n_images < 1:
        raise InvalidArgumentError(
            f"a pooled histogram needs {BINS} counts over at least one image, got "
            f"{total.shape[0] if total.ndim == 1 else total.shape} counts over {n_images}",
            field=field,
        )
    total[0] = corrected_zero_bin(total[1], total[2])
    if total.sum() <= 0:
        raise InvalidArgumentError(
            "the images hold only padding (grey level 0): no histogram to match to",
            field=field,
        )
    return HistogramReference(tuple(float(c) for c in total / n_images))


def lut_from_counts(counts: np.ndarray, reference: HistogramReference) -> np.ndarray:
    """The grey-level map (256 float32) taking a histogram ``counts`` onto ``reference``.

    For a volume predicted block by block, build the map once from the whole
    volume's histogram and apply it to every block (:func:`apply_lut`): matching
    each block on its own would give every block a different map, and seams.
    """
    c = np.asarray(counts, dtype=np.float64).copy()
    if c.shape != (BINS,) or np.any(c < 0) or c.sum() <= 0:
        raise InvalidArgumentError(
            f"a histogram to match needs {BINS} non-negative counts, not all zero",
            field="histogram",
        )
    if c[0] > 0:
        if c[0] == c.sum():
            c[0] = 1.0  # an all-black image: nothing to match, zero stays zero
        elif c[1] > 0 and c[2] > 0:
            c[0] = corrected_zero_bin(c[1], c[2])
        else:
            c[0] = 0.0
    src_q = np.cumsum(c) / c.sum()
    lut = np.interp(src_q, reference.quantiles, np.arange(BINS, dtype=np.float64))
    lut[0] = 0.0  # padding stays padding
    return lut.astype(np.float32)


def matching_lut(image: np.ndarray, reference: HistogramReference) -> np.ndarray:
    """The grey-level map (256 floats) that takes ``image``'s histogram onto the reference."""
    return lut_from_counts(_counts(_check_image(image, "image")), reference)


def apply_lut(image: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """``lut[image]`` for 8-bit grey levels (float32 out)."""
    arr = _check_image(image, "image")
    return np.asarray(lut, dtype=np.float32)[arr.astype(np.int64)]


def match_histogram(
    image: np.ndarray, reference: HistogramReference, *, dtype: type = np.float32
) -> np.ndarray:
    """``image`` (uint8 levels, any shape) mapped onto ``reference``.

    The result is float32 grey levels in [0, 255] (the map is continuous), or
    rounded to ``np.uint8`` when asked, e.g. to write a volume.
    """
    out = apply_lut(image, matching_lut(image, reference))
    if np.dtype(dtype) == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(dtype)


def match_stack(
    stack: np.ndarray, reference: HistogramReference, *, dtype: type = np.float32
) -> np.ndarray:
    """Every slice of a (Z, Y, X) stack matched on its own, as the method does per image."""
    arr = np.asarray(stack)
    if arr.ndim != 3:
        raise InvalidArgumentError(
            f"a stack must be (z, y, x), got shape {arr.shape}", field="images"
        )
    return np.stack([match_histogram(s, reference, dtype=dtype) for s in arr])


def random_histogram_matching(
    image: np.ndarray,
    reference: HistogramReference,
    rng: np.random.Generator,
    *,
    p: float = 0.5,
) -> np.ndarray:
    """The online augmentation: ``image`` matched with probability ``p``, else as it is
    (both as float32 grey levels)."""
    if not 0.0 <= p <= 1.0:
        raise InvalidArgumentError(f"p must be in [0, 1], got {p!r}", field="histogram_p")
    if rng.random() < p:
        return match_histogram(image, reference)
    return np.asarray(image, dtype=np.float32)


def prediction_reference(adaptation: Mapping[str, Any] | None) -> HistogramReference | None:
    """What prediction should match its input to, from a model card's ``adaptation``
    record: the training histogram when the card asks for matching, else None."""
    if not adaptation or not adaptation.get("match_histogram_at_predict"):
        return None
    if "training_histogram" not in adaptation:
        raise InvalidArgumentError(
            "the model asks for histogram matching but records no training histogram",
            field="adaptation.training_histogram",
        )
    return HistogramReference.from_dict(adaptation["training_histogram"])


def volume_counts(array: Any, *, slab: int = 16, field: str = "input") -> np.ndarray:
    """The 256-bin counts of a whole (z, y, x) volume of 8-bit grey levels, read
    ``slab`` sections at a time (the histogram a prediction-time map is built from)."""
    shape = tuple(int(s) for s in array.shape)
    if len(shape) != 3 or 0 in shape:
        raise InvalidArgumentError(
            f"{field} must be a non-empty (z, y, x) volume to match its histogram, "
            f"got shape {list(shape)}",
            field=field,
        )
    total = np.zeros(BINS, dtype=np.float64)
    for z in range(0, shape[0], slab):
        total += _counts(_check_image(np.asarray(array[z : z + slab]), field))
    return total
