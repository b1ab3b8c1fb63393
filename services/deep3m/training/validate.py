"""Check a training job's inputs before any GPU time is spent on it.

Every problem is a typed error whose message names the volume, field or value:
missing or incomplete volumes, images and labels of different shapes, labels
with no foreground (or values beyond ``num_classes``), fewer slices than the
widest member needs, a patch larger than the images, and a base model that
cannot be fine-tuned into this job (missing, another architecture, width,
class count, or lacking a member).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.locations import StoreRoots
from deep3m.core.store import Store, VolumeInfo, check_key
from deep3m.models.card import ModelCard, load_card
from deep3m.training.config import TrainConfig, VolumeSource

# Labels are checked for foreground in slabs of this many slices (bounded memory).
_SLAB = 8


@dataclass(frozen=True)
class Located:
    """A volume already resolved and checked (by the scheduler, at submission)."""

    store: Store
    key: str
    info: VolumeInfo


# Input volumes by field name ("images", "labels", "validation_images", ...).
LocatedVolumes = Mapping[str, Located]


def resolve_source(
    src: VolumeSource,
    store: Store,
    roots: StoreRoots | None,
    *,
    field: str,
    located: LocatedVolumes | None = None,
) -> tuple[Store, str]:
    """The store and key of a referenced volume: as located, or resolved here (checked
    against ``roots`` when given)."""
    if located is not None and field in located:
        return located[field].store, located[field].key
    if roots is not None:
        return roots.resolve(src.store_url, src.path, field=field)
    try:
        key = check_key(src.path)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(exc.message, field=f"{field}.path") from exc
    if not src.store_url:
        return store, key
    return Store(src.store_url), key


@dataclass(frozen=True)
class CheckedInputs:
    images: VolumeInfo
    labels: VolumeInfo
    validation_images: VolumeInfo | None
    validation_labels: VolumeInfo | None
    base_card: ModelCard | None


def _info(
    src: VolumeSource,
    store: Store,
    roots: StoreRoots | None,
    field: str,
    located: LocatedVolumes | None = None,
) -> VolumeInfo:
    if located is not None and field in located:
        return located[field].info  # complete and numeric: checked at submission
    s, key = resolve_source(src, store, roots, field=field)
    info = s.volume_info(key, src.array)
    if not info.complete:
        from deep3m.core.errors import FailedPreconditionError

        raise FailedPreconditionError(
            f"{field} volume {s.key_url(key)} is incomplete (its ingest is still running or "
            "failed)",
            field=field,
        )
    if not (np.issubdtype(np.dtype(info.dtype), np.number) or np.dtype(info.dtype) == np.bool_):
        raise InvalidArgumentError(
            f"{field} volume {s.key_url(key)} has non-numeric dtype {info.dtype}", field=field
        )
    return info


def _same_shape(
    images: VolumeInfo, labels: VolumeInfo, img: VolumeSource, lbl: VolumeSource, field: str
) -> None:
    if images.shape != labels.shape:
        raise InvalidArgumentError(
            f"images {img.describe()} have shape {list(images.shape)} (z, y, x) but labels "
            f"{lbl.describe()} have shape {list(labels.shape)}: they must match voxel for voxel",
            field=field,
        )


def _enough_slices(info: VolumeInfo, src: VolumeSource, config: TrainConfig, field: str) -> None:
    depth = info.shape[0]
    for member in config.members:
        frames = config.frames(member)
        if depth < frames:
            raise InvalidArgumentError(
                f"{field} {src.describe()} has {depth} slice(s), but member {member!r} needs "
                f"at least {frames} consecutive slices",
                field="members",
            )


def _check_labels(
    src: VolumeSource,
    store: Store,
    roots: StoreRoots | None,
    field: str,
    num_classes: int,
    *,
    need_foreground: bool,
    located: LocatedVolumes | None = None,
) -> None:
    s, key = resolve_source(src, store, roots, field=field, located=located)
    arr = s.open_volume(key, src.array)
    found = False
    low, high = 0, 0
    for z in range(0, arr.shape[0], _SLAB):
        slab = np.asarray(arr[z : z + _SLAB])
        if slab.size == 0:
            continue
        found = found or bool(np.any(slab != 0))
        low, high = min(low, int(slab.min())), max(high, int(slab.max()))
    if need_foreground and not found:
        raise InvalidArgumentError(
            f"{field} {src.describe()} have no foreground: every voxel is 0, so there is "
            "nothing to learn (label the structures to segment with non-zero values)",
            field=field,
        )
    if num_classes > 2 and (low < 0 or high >= num_classes):
        raise InvalidArgumentError(
            f"{field} {src.describe()} hold values {low}..{high}, but num_classes is "
            f"{num_classes} (labels must be 0..{num_classes - 1})",
            field=field,
        )


def _check_base(config: TrainConfig, store: Store) -> ModelCard:
    base = load_card(store, config.base_model)
    mismatches = []
    if base.architecture != config.architecture:
        mismatches.append(f"architecture {base.architecture!r} (this job: {config.architecture!r})")
    if abs(base.width - config.width) > 1e-9:
        mismatches.append(f"width {base.width} (this job: {config.width})")
    if base.num_classes != config.num_classes:
        mismatches.append(f"num_classes {base.num_classes} (this job: {config.num_classes})")
    if mismatches:
        raise InvalidArgumentError(
            f"base model {config.base_model!r} cannot be fine-tuned into this job: it has "
            + "; ".join(mismatches)
            + ". Fine-tuning needs the same network.",
            field="base_model",
        )
    for member in config.members:
        if member not in base.member_names:
            raise InvalidArgumentError(
                f"base model {config.base_model!r} has no member {member!r} to start from "
                f"(it has {list(base.member_names)})",
                field="members",
            )
        if not base.member(member).weights:
            raise InvalidArgumentError(
                f"member {member!r} of base model {config.base_model!r} has no trained weights",
                field="base_model",
            )
    return base


def check_training_inputs(
    config: TrainConfig,
    store: Store,
    *,
    roots: StoreRoots | None = None,
    located: LocatedVolumes | None = None,
) -> CheckedInputs:
    """Validate everything a training job reads; raises before any training starts.

    Volumes in ``located`` are not looked up again; their contents (labels) still are."""
    images = _info(config.images, store, roots, "images", located)
    labels = _info(config.labels, store, roots, "labels", located)
    _same_shape(images, labels, config.images, config.labels, "labels")
    _enough_slices(images, config.images, config, "images")
    py, px = config.patch_shape
    if py > images.shape[1] or px > images.shape[2]:
        raise InvalidArgumentError(
            f"patch_shape {[py, px]} is larger than the images {config.images.describe()} "
            f"(y, x size {list(images.shape[1:])}); use a patch of at most that size",
            field="patch_shape",
        )
    val_images = val_labels = None
    if config.validation_images is not None and config.validation_labels is not None:
        val_images = _info(config.validation_images, store, roots, "validation_images", located)
        val_labels = _info(config.validation_labels, store, roots, "validation_labels", located)
        _same_shape(
            val_images,
            val_labels,
            config.validation_images,
            config.validation_labels,
            "validation_labels",
        )
        _enough_slices(val_images, config.validation_images, config, "validation_images")
    base = _check_base(config, store) if config.base_model else None
    # Reading labels is the one costly check: after everything cheap has passed.
    _check_labels(
        config.labels,
        store,
        roots,
        "labels",
        config.num_classes,
        need_foreground=True,
        located=located,
    )
    if config.validation_labels is not None:
        _check_labels(
            config.validation_labels,
            store,
            roots,
            "validation_labels",
            config.num_classes,
            need_foreground=False,
            located=located,
        )
    return CheckedInputs(images, labels, val_images, val_labels, base)
