"""Training test support: small synthetic labelled stacks and tiny configurations.

The synthetic stack has smooth blobs (about a third of the voxels) that are
brighter than the background, with noise, and continuous across slices, so a
tiny network learns them within a few dozen iterations and multi-frame members
see real z context.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from deep3m.core.store import Store
from deep3m.training.config import TrainConfig, VolumeSource
from deep3m.training.demo_data import write_volume


def synthetic_stack(
    depth: int = 8, size: int = 64, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8, labels uint8 in {0, 1}) of shape (depth, size, size)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((depth, size, size)), sigma=(1.0, 4.0, 4.0))
    labels = (field > np.quantile(field, 0.66)).astype(np.uint8)
    images = 90.0 + 70.0 * labels + rng.normal(0.0, 15.0, labels.shape)
    return np.clip(images, 0, 255).astype(np.uint8), labels


def stage_synthetic(
    store: Store,
    prefix: str = "volumes/syn",
    *,
    depth: int = 8,
    size: int = 64,
    seed: int = 0,
    validation: bool = True,
) -> dict[str, str]:
    """Write training (and validation) stacks; returns {name: volume path}."""
    paths = {}
    images, labels = synthetic_stack(depth, size, seed=seed)
    paths["images"] = write_volume(store, f"{prefix}/images.zarr", images)
    paths["labels"] = write_volume(store, f"{prefix}/labels.zarr", labels)
    if validation:
        vi, vl = synthetic_stack(max(5, depth // 2), size, seed=seed + 1)
        paths["validation_images"] = write_volume(store, f"{prefix}/val-images.zarr", vi)
        paths["validation_labels"] = write_volume(store, f"{prefix}/val-labels.zarr", vl)
    return paths


def tiny_config(paths: dict[str, str], model_id: str = "tiny", **overrides: Any) -> TrainConfig:
    """A configuration that trains in well under a second per member on a CPU."""
    values: dict[str, Any] = {
        "model_id": model_id,
        # CDeep3M's recipe: the plainest code path (no input scaling, autocast, Dice).
        "recipe": "cdeep3m",
        "images": VolumeSource(path=paths["images"]),
        "labels": VolumeSource(path=paths["labels"]),
        "architecture": "deepem3d",
        "width": 0.0625,
        "members": ("1fm", "3fm", "5fm"),
        "iterations": 30,
        "batch_size": 4,
        "patch_shape": (32, 32),
        "accumulate_gradients": 1,
        "validate_every": 10,
        "snapshot_every": 10,
        "log_every": 1,
        "optimizer": "adam",
        "learning_rate": 3e-3,
        "seed": 7,
    }
    if "validation_images" in paths:
        values["validation_images"] = VolumeSource(path=paths["validation_images"])
        values["validation_labels"] = VolumeSource(path=paths["validation_labels"])
    values.update(overrides)
    return TrainConfig.create(**values)
