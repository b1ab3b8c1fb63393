"""Training jobs: ``train`` (training, one task per ensemble member), ``finalize`` (training).

Everything a worker would only discover after minutes of set-up is refused
here, at submission, naming the field: members the stack cannot feed (a 5fm
member needs 5 slices), numbers that are not finite or absurdly large, a base
model that does not exist. A patch larger than the image is clipped to it,
with a note kept in the job (`Job.notes`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from deep3m.adaptation.options import adaptation_problem
from deep3m.core.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from deep3m.core.grey_levels import GreyLevels, recorded_levels
from deep3m.core.store import VolumeInfo
from deep3m.models.recipes import RECIPE_NAMES, recipe_architecture, recipe_defaults
from deep3m.scheduler.kinds.base import (
    JobKind,
    KindContext,
    PreparedJob,
    Resolved,
    VolumeFacts,
    replace_repeated,
)
from deep3m.scheduler.kinds.refs import facts, input_volume
from deep3m.scheduler.stages import StageDef, StagePlan
from deep3m.v1 import common_pb2

# Kept here rather than imported from deep3m.models.registry, which pulls in torch:
# the scheduler image has none. A unit test keeps them equal.
ARCHITECTURES = ("deepem3d", "resunet2d", "resunet3d", "unet2d")
PATCH_MULTIPLE = 16  # the networks' total stride (registry.INPUT_MULTIPLE)
DEFAULT_MEMBERS: Mapping[str, tuple[str, ...]] = {
    "deepem3d": ("1fm", "3fm", "5fm"),
    "resunet2d": ("1fm",),
    "resunet3d": ("1fm",),
    "unet2d": ("1fm",),
}
# Choices of the training configuration (deep3m.training.config.TrainConfig); a unit
# test keeps them equal to its Literal types. "" chooses the recipe's value.
CHOICES: Mapping[str, tuple[str, ...]] = {
    "optimizer": ("sgd", "adam"),
    "loss": ("ce", "ce_dice"),
    "schedule": ("poly", "cosine", "onecycle"),
}
MAX_INPUT_SCALE = 4  # deep3m.models.scaled.MAX_INPUT_SCALE
MAX_MINUTES = 100_000
_MEMBER_NAME = re.compile(r"^([1-9][0-9]?)fm$")
MAX_COUNT = 10**9  # iterations and intervals: more would run for years
MAX_CHECKPOINTS = 1000  # adaptation candidates (each predicts the whole target)
# Upper bounds of the training configuration (deep3m.training.config.TrainConfig).
LIMITS: Mapping[str, float] = {
    "width": 8.0,
    "batch_size": 1024,
    "accumulate_gradients": 1024,
    "num_classes": 255,
    "learning_rate": 10.0,
    "iterations": MAX_COUNT,
    "add_iterations": MAX_COUNT,
    "validate_every": MAX_COUNT,
    "snapshot_every": MAX_COUNT,
    "adaptation_iterations": MAX_COUNT,
    "adaptation_checkpoints": MAX_CHECKPOINTS,
    "snapshot_every_minutes": 1440.0,  # config.MAX_SNAPSHOT_MINUTES
}


def member_frames(member: str) -> int:
    match = _MEMBER_NAME.match(member)
    if not match or int(match[1]) % 2 == 0:
        raise InvalidArgumentError(
            f"member {member!r} must name an odd frame count, like '1fm', '3fm' or '5fm'",
            field="members",
        )
    return int(match[1])


def check_numbers(t: common_pb2.TrainSpec) -> None:
    """Every number finite, non-negative and below its limit (0 means the default)."""
    for name, limit in LIMITS.items():
        value = getattr(t, name)
        if not math.isfinite(value) or value < 0 or value > limit:
            raise InvalidArgumentError(
                f"{name} must be a number in 0..{limit:g} (0 chooses the default), got {value}",
                field=name,
            )
    for name, allowed in CHOICES.items():
        value = getattr(t, name)
        if value and value not in allowed:
            raise InvalidArgumentError(
                f"{name} must be one of {', '.join(allowed)}, got {value[:64]!r}", field=name
            )
    if t.recipe and t.recipe not in RECIPE_NAMES:
        raise InvalidArgumentError(
            f"recipe must be one of {', '.join(RECIPE_NAMES)}, got {t.recipe[:64]!r}",
            field="recipe",
        )
    if not math.isfinite(t.max_minutes) or not 0 <= t.max_minutes <= MAX_MINUTES:
        raise InvalidArgumentError(
            f"max_minutes must be a number in 0..{MAX_MINUTES} (0: no time budget), "
            f"got {t.max_minutes}",
            field="max_minutes",
        )
    if not 0 <= t.input_scale <= MAX_INPUT_SCALE:
        raise InvalidArgumentError(
            f"input_scale must be 1..{MAX_INPUT_SCALE} (0 chooses the recipe's), "
            f"got {t.input_scale}",
            field="input_scale",
        )
    if not math.isfinite(t.foreground_fraction) or not 0 <= t.foreground_fraction <= 1:
        raise InvalidArgumentError(
            f"foreground_fraction must be in 0..1, got {t.foreground_fraction}",
            field="foreground_fraction",
        )
    if t.num_classes == 1:
        raise InvalidArgumentError(
            f"num_classes must be >= 2, got {t.num_classes}", field="num_classes"
        )
    if t.voxel_size_nm and (
        len(t.voxel_size_nm) != 3 or not all(math.isfinite(v) and v > 0 for v in t.voxel_size_nm)
    ):
        raise InvalidArgumentError(
            f"voxel_size_nm must be 3 positive sizes (z, y, x), got {list(t.voxel_size_nm)}",
            field="voxel_size_nm",
        )
    if t.patch_shape and (
        len(t.patch_shape) != 2 or any(s <= 0 or s % PATCH_MULTIPLE for s in t.patch_shape)
    ):
        raise InvalidArgumentError(
            f"patch_shape must be 2 positive multiples of {PATCH_MULTIPLE} (y, x), got "
            f"{list(t.patch_shape)}",
            field="patch_shape",
        )


def check_members_fit(
    members: tuple[str, ...], volume: VolumeFacts, name: str, ref: common_pb2.VolumeRef
) -> None:
    """Each member reads ``frames`` consecutive slices: the stack must have that many."""
    depth = volume.shape[0]
    too_wide = [m for m in members if member_frames(m) > depth]
    if not too_wide:
        return
    fitting = [m for m in members if member_frames(m) <= depth] or ["1fm"]
    raise InvalidArgumentError(
        f"{name} {ref.path} has {depth} slice(s), too few for member(s) "
        f"{', '.join(too_wide)} (an Nfm member needs N consecutive slices); "
        f"train fewer members, e.g. --members {','.join(fitting)}",
        field="members",
    )


def check_adaptation(
    t: common_pb2.TrainSpec,
    members: tuple[str, ...],
    input_scale: int,
    volumes: Mapping[str, VolumeFacts],
    target_levels: GreyLevels | None = None,
) -> None:
    """The adaptation options agree, and the target is a non-empty stack like the images
    (holding more than padding, where its writer recorded its grey levels)."""
    problem = adaptation_problem(
        t.adaptation or "none",
        t.select_by or "validation",
        adapt_to=bool(t.adapt_to.path),
        members=members,
        input_scale=input_scale,
        base_model=bool(t.base_model),
        num_classes=t.num_classes or 2,
    )
    if problem is not None:
        raise InvalidArgumentError(problem[1], field=problem[0])
    target = volumes.get("adapt_to")
    if target is None:
        return
    if 0 in target.shape:
        raise InvalidArgumentError(
            f"adapt_to {t.adapt_to.path} is empty (shape {list(target.shape)})", field="adapt_to"
        )
    for name in ("images", "adapt_to"):
        if volumes[name].dtype != "uint8":
            raise InvalidArgumentError(
                f"adaptation matches 8-bit grey levels: {name} {getattr(t, name).path} holds "
                f"{volumes[name].dtype}; ingest it as uint8",
                field=name,
            )
    if min(target.shape[1:]) < PATCH_MULTIPLE:
        raise InvalidArgumentError(
            f"adapt_to {t.adapt_to.path} slices (y, x size {list(target.shape[1:])}) are "
            f"smaller than the smallest patch the networks take ({PATCH_MULTIPLE} px)",
            field="adapt_to",
        )
    check_members_fit(members, target, "adapt_to", t.adapt_to)
    if target_levels is not None and not target_levels.any_nonzero:
        raise InvalidArgumentError(
            f"adapt_to {t.adapt_to.path} holds only zeros (padding; its recorded grey-level "
            "histogram has no non-zero level): nothing to adapt to",
            field="adapt_to",
        )


def target_levels(info: VolumeInfo, ref: common_pb2.VolumeRef) -> GreyLevels | None:
    """The grey levels the target's writer recorded, if any."""
    try:
        return recorded_levels(info.attributes, ref.array)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"adapt_to {ref.path}: {exc.message}", field="adapt_to") from exc


def clip_patch(patch: tuple[int, ...], images: VolumeFacts) -> tuple[tuple[int, ...], str]:
    """The patch clipped to the images (whole multiples of the stride), and a note if clipped."""
    if not patch:
        return patch, ""
    fit = tuple(
        min(p, (s // PATCH_MULTIPLE) * PATCH_MULTIPLE)
        for p, s in zip(patch, images.shape[1:], strict=True)
    )
    if min(fit) < PATCH_MULTIPLE:
        raise InvalidArgumentError(
            f"the images (y, x size {list(images.shape[1:])}) are smaller than the smallest "
            f"patch the networks take ({PATCH_MULTIPLE} × {PATCH_MULTIPLE})",
            field="images",
        )
    if fit == patch:
        return patch, ""
    return fit, (
        f"patch_shape {list(patch)} is larger than the images (y, x size "
        f"{list(images.shape[1:])}): patches are clipped to the image, {list(fit)}"
    )


class TrainKind(JobKind):
    name = "train"
    stages = (StageDef("train", "training"), StageDef("finalize", "training"))

    def validate(self, spec: common_pb2.JobSpec, ctx: KindContext) -> PreparedJob:
        from deep3m.models.card import check_model_id, model_exists

        t = spec.train
        check_model_id(t.model)
        store = ctx.roots.store()
        if model_exists(store, t.model):
            raise AlreadyExistsError(
                f"model {t.model!r} already exists in {store.url}; choose another model id",
                field="model",
            )
        if t.base_model:
            check_model_id(t.base_model)
            if not model_exists(store, t.base_model):
                raise NotFoundError(
                    f"base_model {t.base_model!r} not found in {store.url}", field="base_model"
                )
        check_numbers(t)
        # Unset fields come from the recipe, so a plain submission trains the benchmarked
        # default (models.recipes) and the checks below see what will really run.
        recipe = recipe_defaults(t.recipe)
        architecture = t.architecture or recipe_architecture(
            t.recipe, adapting=bool(t.adapt_to.path)
        )
        if architecture not in ARCHITECTURES:
            raise InvalidArgumentError(
                f"architecture must be one of {', '.join(ARCHITECTURES)}, got {t.architecture!r}",
                field="architecture",
            )
        # The recipe's members unless another architecture than the recipe's was named.
        members = tuple(t.members) or (
            tuple(recipe["members"])
            if t.architecture in ("", recipe["architecture"])
            else DEFAULT_MEMBERS[architecture]
        )
        for m in members:
            member_frames(m)
        if len(set(members)) != len(members):
            raise InvalidArgumentError(f"members {list(members)} repeat a name", field="members")
        volumes: dict[str, VolumeFacts] = {}
        levels: GreyLevels | None = None
        if t.adaptation == "multitask" and not t.members:
            members = ("1fm",)  # the Y-Net is 2D
        for name in ("images", "labels", "validation_images", "validation_labels", "adapt_to"):
            ref = getattr(t, name)
            if (name.startswith("validation") or name == "adapt_to") and not ref.path:
                continue
            vol_store, key, info = input_volume(ctx.roots, ref, name)
            volumes[name] = facts(vol_store, key, ref.array, info)
            if name == "adapt_to":
                levels = target_levels(info, ref)
        has_vi, has_vl = "validation_images" in volumes, "validation_labels" in volumes
        if has_vi != has_vl:
            raise InvalidArgumentError(
                "give both validation_images and validation_labels, or neither",
                field="validation_labels" if has_vi else "validation_images",
            )
        for images, labels in (("images", "labels"), ("validation_images", "validation_labels")):
            if images not in volumes:
                continue
            img, lbl = volumes[images].shape, volumes[labels].shape
            if img != lbl:
                raise InvalidArgumentError(
                    f"{labels} shape {list(lbl)} differs from {images} shape {list(img)}",
                    field=labels,
                )
            check_members_fit(members, volumes[images], images, getattr(t, images))
        input_scale = t.input_scale or (1 if t.adapt_to.path else int(recipe["input_scale"]))
        check_adaptation(t, members, input_scale, volumes, levels)
        asked_patch = tuple(int(s) for s in t.patch_shape) or tuple(recipe["patch_shape"])
        patch, note = clip_patch(asked_patch, volumes["images"])
        if "adapt_to" in volumes:
            patch, target_note = clip_patch(patch, volumes["adapt_to"])
            note = note or target_note
        resolved = self.resolved_spec(spec)
        resolved.train.architecture = architecture
        replace_repeated(resolved.train.members, members)
        replace_repeated(resolved.train.patch_shape, patch)
        return PreparedJob(
            self.name,
            Resolved(resolved, volumes),
            {"model": f"models/{t.model}"},
            notes=(note,) if note else (),
        )

    def plan(self, index: int, resolved: Resolved) -> StagePlan | None:
        if index != 0:
            return super().plan(index, resolved)
        sdef = self.stages[0]
        return StagePlan(
            index, sdef.name, sdef.role, "members", {"members": list(resolved.spec.train.members)}
        )
