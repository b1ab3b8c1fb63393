"""Training samples: N-frame stacks and the centre slice's labels, augmented.

The labelled volumes are read once from the store into memory (training sets
are a few dozen slices; a cap refuses anything that would not fit). Each sample
is a random patch around a random centre slice: ``frames`` consecutive slices,
mirrored at the first and last slice so every labelled slice can be a centre,
then one of CDeep3M's 16 geometric variations and the optional intensity
augmentations (contrast, blur, noise, elastic).

Randomness comes from :func:`iteration_rng`, seeded by (seed, rank, iteration):
a resumed run draws exactly the samples an uninterrupted run would, and every
data-parallel rank draws its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage

from deep3m.core.augmentation import apply_variation
from deep3m.core.errors import InvalidArgumentError, ResourceExhaustedError
from deep3m.core.store import Store

# Refuse to load training volumes larger than this (bytes of float32 images).
MAX_TRAINING_BYTES = 8 * 1024**3
# Variations that keep a non-square patch's shape (no quarter turns).
_SHAPE_KEEPING = tuple(v for v in range(1, 17) if (v - 1) % 2 == 0)


@dataclass(frozen=True)
class Normalization:
    """Intensity normalisation ``(raw − mean) / std`` learned from the training images."""

    mean: float
    std: float

    def apply(self, raw: np.ndarray) -> np.ndarray:
        return (
            (np.asarray(raw, dtype=np.float32) - np.float32(self.mean)) / np.float32(self.std)
        ).astype(np.float32, copy=False)


def compute_normalization(raw: np.ndarray) -> Normalization:
    data = np.asarray(raw, dtype=np.float64)
    std = float(data.std())
    return Normalization(float(data.mean()), std if std > 1e-6 else 1.0)


def read_volume(store: Store, path: str, array: str = "", *, what: str) -> np.ndarray:
    """The whole array of a complete volume, refused when it would not fit in memory."""
    arr = store.open_volume(path, array)
    nbytes = int(np.prod(arr.shape)) * 4
    if nbytes > MAX_TRAINING_BYTES:
        raise ResourceExhaustedError(
            f"{what} volume {store.key_url(path)} of shape {list(arr.shape)} needs "
            f"{nbytes / 1024**3:.1f} GiB in memory; training loads at most "
            f"{MAX_TRAINING_BYTES / 1024**3:.0f} GiB — crop it or train on a subset",
            field=what,
        )
    return np.asarray(arr[...])


def to_classes(raw: np.ndarray, num_classes: int, *, where: str) -> np.ndarray:
    """Class indices: binary → any non-zero is foreground; otherwise the raw values."""
    if num_classes == 2:
        return (np.asarray(raw) != 0).astype(np.int64)
    labels = np.asarray(raw)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise InvalidArgumentError(
            f"labels in {where} range over {int(labels.min())}..{int(labels.max())}, but "
            f"num_classes is {num_classes} (labels must be 0..{num_classes - 1})",
            field="labels",
        )
    return labels.astype(np.int64)


def class_weights(labels: np.ndarray, num_classes: int, balance: bool) -> np.ndarray:
    """Loss weight per class: 1/√frequency, normalised so the mean voxel weight is 1."""
    if not balance:
        return np.ones(num_classes, np.float32)
    counts = np.bincount(labels.ravel(), minlength=num_classes).astype(np.float64)
    freq = np.maximum(counts / max(counts.sum(), 1.0), 1e-4)
    weights = 1.0 / np.sqrt(freq)
    weights /= float((weights * freq).sum())
    return weights.astype(np.float32)


@dataclass(frozen=True)
class LabelledVolume:
    """Normalised images (Z, Y, X) float32 with class labels (Z, Y, X) int64."""

    images: np.ndarray
    labels: np.ndarray
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.images.shape
        return int(z), int(y), int(x)

    @cached_property
    def foreground_voxels(self) -> np.ndarray:
        """Flat indices of the foreground (non-zero) labels, for foreground-aware sampling."""
        return np.flatnonzero(self.labels)


def frame_indices(z: int, frames: int, depth: int) -> np.ndarray:
    """Slices ``z − frames//2 … z + frames//2``, mirrored at the volume's ends."""
    idx = np.arange(z - frames // 2, z + frames // 2 + 1)
    if depth == 1:
        return np.zeros_like(idx)
    period = 2 * (depth - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= depth, period - idx, idx)


def slice_stack(images: np.ndarray, z: int, frames: int) -> np.ndarray:
    return images[frame_indices(z, frames, images.shape[0])]


def iteration_rng(seed: int, rank: int, iteration: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, rank, iteration]))


def _contrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gain = float(np.exp(rng.uniform(-0.3, 0.3)))
    return x * gain + rng.uniform(-0.3, 0.3)


def _blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        return x
    sigma = rng.uniform(0.3, 1.2)
    return np.asarray(ndimage.gaussian_filter(x, sigma=(0, sigma, sigma), mode="reflect"))


def _noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        return x
    return x + rng.normal(0.0, rng.uniform(0.02, 0.15), size=x.shape).astype(np.float32)


def _elastic(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator, spacing: int = 32, alpha_px: float = 4.0
) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random displacement (a coarse grid, cubic-upsampled) of image and labels."""
    if rng.random() < 0.5:
        return x, y
    h, w = y.shape
    grid = (max(2, h // spacing + 1), max(2, w // spacing + 1))
    fields = []
    for _ in range(2):
        coarse = rng.normal(0.0, alpha_px, size=grid)
        fields.append(ndimage.zoom(coarse, (h / grid[0], w / grid[1]), order=3)[:h, :w])
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = [yy + fields[0], xx + fields[1]]
    warped = np.stack(
        [ndimage.map_coordinates(f, coords, order=1, mode="reflect") for f in x]
    ).astype(np.float32)
    labels = ndimage.map_coordinates(y, coords, order=0, mode="reflect")
    return warped, labels.astype(y.dtype)


def sample_patch(
    volume: LabelledVolume,
    rng: np.random.Generator,
    *,
    frames: int,
    patch: tuple[int, int],
    augment: bool = True,
    intensity: Sequence[str] = (),
    foreground_fraction: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One (frames, py, px) image patch and its (py, px) centre-slice labels.

    With probability ``foreground_fraction`` the patch is placed around a random
    foreground voxel (anywhere in the patch, not only its centre), else uniformly.
    """
    depth, height, width = volume.shape
    py, px = patch
    centred = foreground_fraction > 0 and rng.random() < foreground_fraction
    fg = volume.foreground_voxels if centred else None
    if fg is not None and fg.size:
        fz, cy, cx = np.unravel_index(int(fg[rng.integers(fg.size)]), volume.shape)
        z = int(fz)
        y0 = int(np.clip(cy - rng.integers(py), 0, height - py))
        x0 = int(np.clip(cx - rng.integers(px), 0, width - px))
    else:
        z = int(rng.integers(depth))
        y0 = int(rng.integers(height - py + 1))
        x0 = int(rng.integers(width - px + 1))
    idx = frame_indices(z, frames, depth)
    x = volume.images[idx, y0 : y0 + py, x0 : x0 + px]
    y = volume.labels[z, y0 : y0 + py, x0 : x0 + px]
    if augment:
        choices = range(1, 17) if py == px else _SHAPE_KEEPING
        v = int(rng.choice(choices))
        # Variations 9–16 reverse z: the centre slice stays the centre.
        x = apply_variation(x, v, has_z=True)
        y = apply_variation(y, v, has_z=False)
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y)
    for name in intensity:
        if name == "contrast":
            x = _contrast(x, rng)
        elif name == "blur":
            x = _blur(x, rng)
        elif name == "noise":
            x = _noise(x, rng)
        elif name == "elastic":
            x, y = _elastic(x, y, rng)
    return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)


def sample_batch(
    volume: LabelledVolume,
    rng: np.random.Generator,
    *,
    batch: int,
    frames: int,
    patch: tuple[int, int],
    augment: bool = True,
    intensity: Sequence[str] = (),
    foreground_fraction: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` patches: images (B, frames, py, px) float32, labels (B, py, px) int64."""
    pairs = [
        sample_patch(
            volume,
            rng,
            frames=frames,
            patch=patch,
            augment=augment,
            intensity=intensity,
            foreground_fraction=foreground_fraction,
        )
        for _ in range(batch)
    ]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def pad_to_multiple(x: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Mirror-pad the last two axes up to a multiple; returns the padded array and (y, x)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    pad = [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)]
    return np.pad(x, pad, mode="symmetric"), (h, w)
