"""Domains as in-memory stacks, and the patch sampler the adaptation loops share.

Images are (z, y, x) grey levels 0…255 (uint8, or float32 after histogram
matching or translation); labels are boolean stacks of the same shape. Networks
see grey levels / 255. Patches are random crops of ``frames`` consecutive slices
(mirrored at the stack ends) under one of CDeep3M's 8 in-plane variations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from deep3m.core.augmentation import IN_PLANE_VARIATIONS, apply_variation
from deep3m.core.errors import InvalidArgumentError
from deep3m.training.adaptation.runtime import current

SCALE = 255.0


def check_stack(arr: np.ndarray, field_name: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != 3:
        raise InvalidArgumentError(
            f"{field_name} must be a (z, y, x) stack, got {a.ndim} dimensions (shape {a.shape})",
            field=field_name,
        )
    if a.size == 0 or 0 in a.shape:
        raise InvalidArgumentError(f"{field_name} is empty (shape {a.shape})", field=field_name)
    return a


@dataclass(frozen=True)
class Domain:
    """One domain's stacks: images, and labels where known (same shapes)."""

    name: str
    images: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...] | None = None
    voxel_size_nm: tuple[float, float, float] | None = field(default=None)

    def __post_init__(self) -> None:
        if not self.images:
            raise InvalidArgumentError(f"domain {self.name!r} has no images", field=self.name)
        for i, img in enumerate(self.images):
            check_stack(img, f"{self.name}.images[{i}]")
        if self.labels is not None:
            if len(self.labels) != len(self.images):
                raise InvalidArgumentError(
                    f"domain {self.name!r}: {len(self.labels)} label stacks for "
                    f"{len(self.images)} image stacks",
                    field=f"{self.name}.labels",
                )
            for i, (img, lbl) in enumerate(zip(self.images, self.labels, strict=True)):
                if np.shape(lbl) != np.shape(img):
                    raise InvalidArgumentError(
                        f"{self.name}.labels[{i}] shape {np.shape(lbl)} differs from its images "
                        f"{np.shape(img)}",
                        field=f"{self.name}.labels[{i}]",
                    )

    @classmethod
    def of(
        cls,
        name: str,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        voxel_size_nm: tuple[float, float, float] | None = None,
    ) -> Domain:
        lbl = None if labels is None else (np.asarray(labels) > 0,)
        return cls(name, (np.asarray(images),), lbl, voxel_size_nm)

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def with_images(self, images: Sequence[np.ndarray], suffix: str) -> Domain:
        return Domain(f"{self.name}{suffix}", tuple(images), self.labels, self.voxel_size_nm)

    def min_size(self) -> int:
        return min(min(s.shape[1], s.shape[2]) for s in self.images)


def mirror_index(i: int, n: int) -> int:
    """Index ``i`` reflected into 0…n-1 (…, 2, 1, 0, 1, 2, …, n-1, n-2, …)."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    i = abs(i) % period
    return period - i if i >= n else i


class PatchSampler:
    """Random augmented patches from one domain.

    ``alternate`` (same shapes as ``domain.images``, e.g. the histogram-matched
    copy) replaces a patch's source stack with probability ``alternate_p``: the
    online augmentation.
    """

    def __init__(
        self,
        domain: Domain,
        *,
        patch: int,
        frames: int,
        seed: int,
        alternate: Sequence[np.ndarray] | None = None,
        alternate_p: float = 0.0,
        with_labels: bool = True,
    ) -> None:
        if patch > domain.min_size():
            raise InvalidArgumentError(
                f"patch {patch} is larger than the smallest slice of {domain.name!r} "
                f"({domain.min_size()} px)",
                field="patch",
            )
        if with_labels and not domain.labelled:
            raise InvalidArgumentError(
                f"domain {domain.name!r} has no labels to train on", field=domain.name
            )
        if alternate is not None and [a.shape for a in alternate] != [
            i.shape for i in domain.images
        ]:
            raise InvalidArgumentError("alternate stacks must match the images", field="alternate")
        self.domain = domain
        self.patch = patch
        self.frames = frames
        self.rng = np.random.default_rng(seed)
        self.alternate = tuple(alternate) if alternate is not None else None
        self.alternate_p = alternate_p
        self.with_labels = with_labels
        sizes = np.array([s.shape[0] for s in domain.images], dtype=np.float64)
        self._weights = sizes / sizes.sum()

    def _window(self, stack: np.ndarray, z: int) -> np.ndarray:
        half = self.frames // 2
        n = stack.shape[0]
        return stack[[mirror_index(i, n) for i in range(z - half, z + half + 1)]]

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x (B, frames, P, P) in [0, 1], labels (B, P, P) int64 or None)``."""
        xs, ys = [], []
        p = self.patch
        for _ in range(batch):
            s = int(self.rng.choice(len(self.domain.images), p=self._weights))
            stack = self.domain.images[s]
            if self.alternate is not None and self.rng.random() < self.alternate_p:
                stack = self.alternate[s]
            z = int(self.rng.integers(stack.shape[0]))
            y0 = int(self.rng.integers(stack.shape[1] - p + 1))
            x0 = int(self.rng.integers(stack.shape[2] - p + 1))
            v = int(self.rng.choice(IN_PLANE_VARIATIONS))
            win = self._window(stack, z)[:, y0 : y0 + p, x0 : x0 + p]
            xs.append(np.ascontiguousarray(apply_variation(win, v, has_z=False), dtype=np.float32))
            if self.with_labels and self.domain.labels is not None:
                lbl = self.domain.labels[s][z, y0 : y0 + p, x0 : x0 + p]
                ys.append(np.ascontiguousarray(apply_variation(lbl, v, has_z=False)))
        # On the stages' device (the runtime's): the networks are there.
        device = current().device
        x = torch.from_numpy(np.stack(xs) / SCALE).float().to(device)
        y = torch.from_numpy(np.stack(ys).astype(np.int64)).to(device) if ys else None
        return x, y

    def labelled_sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sample` for a sampler built ``with_labels``."""
        x, y = self.sample(batch)
        if y is None:
            raise InvalidArgumentError(
                f"domain {self.domain.name!r} is sampled without labels", field=self.domain.name
            )
        return x, y
