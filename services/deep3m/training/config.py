"""The training configuration: one frozen, validated object built from a TrainSpec.

Every field a caller leaves unset comes from a **recipe** (``deep3m.models.recipes``):

- ``default`` — what won ``python -m bench accuracy`` (docs/ACCURACY.md): a
  residual 2D U-Net at width 0.5 seeing its input at half resolution, 4 patches of
  512² (256² seen), half of them placed on foreground, class-balanced
  cross-entropy plus Dice, AdamW 2e-3 with a one-cycle schedule, bfloat16 autocast
  and channels_last on the CPU, the weights of the best validation F1 kept.
- ``cdeep3m`` — CDeep3M's Caffe solver (``solver.prototxt`` of the
  ``inception_residual_train_prediction_*`` models) and networks: DeepEM3D at full
  width, members 1fm/3fm/5fm, SGD with momentum 0.9, base rate 1e-2, the "poly"
  policy with power 0.8, weight decay 5e-4, gradient accumulation (``iter_size``) 8,
  30000 iterations, last weights; batch 4 patches of 320² (CDeep3M: 5 with
  ``iter_size`` 8); class balancing by inverse √frequency loss weights (CDeep3M
  balanced by choosing patch centres); validation on whole slices every 500
  iterations (CDeep3M: 20 random patches every 20).

A budget can be given in minutes per member (``max_minutes``) as well as in
iterations; whichever runs out first ends the run.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deep3m.adaptation.options import adaptation_problem
from deep3m.core.errors import InvalidArgumentError
from deep3m.models.card import check_model_id
from deep3m.models.recipes import (
    CDEEP3M_ITERATIONS,
    CDEEP3M_MEMBERS,
    RECIPE_NAMES,
    RECIPES,
    recipe_architecture,
)
from deep3m.models.registry import INPUT_MULTIPLE, check_architecture, member_frames
from deep3m.models.scaled import MAX_INPUT_SCALE
from deep3m.training.objectives import Loss, Schedule, lr_factor

INTENSITY_AUGMENTATIONS = ("contrast", "blur", "noise", "elastic")
DEFAULT_LEARNING_RATE = {"sgd": 1e-2, "adam": 1e-3}
MAX_SNAPSHOT_MINUTES = 1440.0


class VolumeSource(BaseModel):
    """A volume reference as given (store URL may be empty: the default store)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store_url: str = ""
    path: str
    array: str = ""

    def describe(self) -> str:
        where = f"{self.store_url}/" if self.store_url else ""
        return f"{where}{self.path}" + (f"[{self.array}]" if self.array else "")


class TrainConfig(BaseModel):
    """Everything one training job needs; every member of the job shares it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_id: str
    recipe: Literal["default", "cdeep3m"] = "default"
    images: VolumeSource
    labels: VolumeSource
    validation_images: VolumeSource | None = None
    validation_labels: VolumeSource | None = None
    architecture: str = "deepem3d"
    width: float = Field(default=1.0, gt=0, le=8)
    members: tuple[str, ...] = CDEEP3M_MEMBERS
    num_classes: int = Field(default=2, ge=2, le=255)
    iterations: int = Field(default=CDEEP3M_ITERATIONS, ge=1)
    base_model: str = ""
    add_iterations: int = Field(default=0, ge=0)
    batch_size: int = Field(default=4, ge=1, le=1024)
    patch_shape: tuple[int, int] = (320, 320)
    accumulate_gradients: int = Field(default=8, ge=1, le=1024)
    validate_every: int = Field(default=500, ge=1)
    snapshot_every: int = Field(default=2000, ge=1)
    # Also snapshot after this much wall time, so a preemption costs minutes.
    snapshot_every_minutes: float = Field(default=5.0, gt=0, le=MAX_SNAPSHOT_MINUTES)
    # Loss values are reported at least this often between validations.
    log_every: int = Field(default=10, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    learning_rate: float = Field(default=0.0, ge=0)  # 0: the optimiser's default
    lr_power: float = Field(default=0.8, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    class_balance: bool = True
    intensity_augmentations: tuple[str, ...] = ()
    voxel_size_nm: tuple[float, float, float] | None = None
    mixed_precision: bool = True  # CUDA: float16 autocast
    seed: int = Field(default=0, ge=0)
    checkpoints_kept: int = Field(default=2, ge=1)
    loss: Loss = "ce"
    schedule: Schedule = "poly"
    # Fraction of patches placed around a foreground voxel (the rest uniformly).
    foreground_fraction: float = Field(default=0.0, ge=0, le=1)
    # The network sees its input downscaled by this factor (ScaledInput).
    input_scale: int = Field(default=1, ge=1, le=MAX_INPUT_SCALE)
    # CPU: bfloat16 autocast (AVX-512 BF16 makes it about twice as fast).
    cpu_bfloat16: bool = False
    channels_last: bool = False
    # Time budget per member (0: none); training stops at it or at ``iterations``,
    # whichever comes first, and the schedule runs on the larger of the two fractions.
    max_minutes: float = Field(default=0.0, ge=0, le=100_000)
    # Keep the weights of the best validation F1, not the last.
    keep_best: bool = False
    # Domain adaptation: the unlabelled volume the model is for, the method, how the
    # kept checkpoint is chosen, the unsupervised stages' iterations (0: as many as the
    # supervised stage), the candidate checkpoints, and whether prediction matches its
    # input to the training histogram.
    adapt_to: VolumeSource | None = None
    adaptation: str = "none"
    select_by: str = "validation"
    adaptation_iterations: int = Field(default=0, ge=0)
    adaptation_checkpoints: int = Field(default=5, ge=1, le=1000)
    match_histogram_at_predict: bool = False

    @model_validator(mode="before")
    @classmethod
    def _recipe(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("recipe", "default")
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; choose from {list(RECIPE_NAMES)}")
        merged = {**RECIPES[name], **data}
        if data.get("adapt_to") is not None:
            if "input_scale" not in data:
                # The adaptation procedures train at full resolution.
                merged["input_scale"] = 1
            if "architecture" not in data:
                merged["architecture"] = recipe_architecture(name, adapting=True)
        return merged

    @field_validator("model_id")
    @classmethod
    def _model_id(cls, v: str) -> str:
        return check_model_id(v)

    @field_validator("architecture")
    @classmethod
    def _architecture(cls, v: str) -> str:
        return check_architecture(v)

    @field_validator("members")
    @classmethod
    def _members(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one member is needed")
        if len(set(v)) != len(v):
            raise ValueError(f"members must be unique, got {list(v)}")
        for m in v:
            member_frames(m)
        return v

    @field_validator("patch_shape")
    @classmethod
    def _patch(cls, v: tuple[int, int]) -> tuple[int, int]:
        if any(s <= 0 or s % INPUT_MULTIPLE for s in v):
            raise ValueError(
                f"patch_shape {list(v)} must be positive multiples of {INPUT_MULTIPLE} (y, x)"
            )
        return v

    @field_validator("intensity_augmentations")
    @classmethod
    def _augs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [a for a in v if a not in INTENSITY_AUGMENTATIONS]
        if unknown:
            raise ValueError(
                f"unknown intensity augmentation(s) {unknown}; choose from "
                f"{list(INTENSITY_AUGMENTATIONS)}"
            )
        return tuple(dict.fromkeys(v))

    @field_validator("voxel_size_nm")
    @classmethod
    def _voxels(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError(f"voxel_size_nm must be positive (z, y, x), got {list(v)}")
        return v

    @model_validator(mode="after")
    def _pairs(self) -> TrainConfig:
        if (self.validation_images is None) != (self.validation_labels is None):
            raise ValueError(
                "validation_images and validation_labels go together: give both or neither"
            )
        if self.base_model:
            check_model_id(self.base_model)
            if self.base_model == self.model_id:
                raise ValueError(
                    f"base_model {self.base_model!r} cannot be the model being trained"
                )
        problem = adaptation_problem(
            self.adaptation,
            self.select_by,
            adapt_to=self.adapt_to is not None,
            members=self.members,
            input_scale=self.input_scale,
            base_model=bool(self.base_model),
            num_classes=self.num_classes,
        )
        if problem is not None:
            raise InvalidArgumentError(problem[1], field=problem[0])
        return self

    # -- derived --------------------------------------------------------------
    @property
    def base_learning_rate(self) -> float:
        return self.learning_rate or DEFAULT_LEARNING_RATE[self.optimizer]

    @property
    def total_iterations(self) -> int:
        """Iterations this job runs: ``add_iterations`` when fine-tuning and given."""
        if self.base_model and self.add_iterations:
            return self.add_iterations
        return self.iterations

    def frames(self, member: str) -> int:
        return member_frames(member)

    @property
    def max_frames(self) -> int:
        return max(member_frames(m) for m in self.members)

    @property
    def adapting(self) -> bool:
        return self.adapt_to is not None

    @property
    def network_architecture(self) -> str:
        """What the members are: the multi-task method trains the attention Y-Net."""
        return "ynet" if self.adaptation == "multitask" else self.architecture

    def learning_rate_at(self, iteration: int, elapsed_s: float = 0.0) -> float:
        """base · the schedule's factor at the run's fraction (iterations or budget)."""
        fraction = max(iteration, 0) / self.total_iterations
        if self.max_minutes:
            fraction = max(fraction, elapsed_s / (self.max_minutes * 60.0))
        return self.base_learning_rate * lr_factor(self.schedule, fraction, self.lr_power)

    def fingerprint(self, member: str) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed by this configuration."""
        return {
            "model_id": self.model_id,
            "member": member,
            "frames": self.frames(member),
            "architecture": self.architecture,
            "width": self.width,
            "num_classes": self.num_classes,
            "iterations": self.total_iterations,
            "base_model": self.base_model,
            "batch_size": self.batch_size,
            "patch_shape": list(self.patch_shape),
            "accumulate_gradients": self.accumulate_gradients,
            "optimizer": self.optimizer,
            "learning_rate": self.base_learning_rate,
            "recipe": self.recipe,
            "loss": self.loss,
            "schedule": self.schedule,
            "input_scale": self.input_scale,
            "foreground_fraction": self.foreground_fraction,
            "max_minutes": self.max_minutes,
            "seed": self.seed,
            "images": self.images.describe(),
            "labels": self.labels.describe(),
        } | self._adaptation_fingerprint()

    def _adaptation_fingerprint(self) -> dict[str, Any]:
        if self.adapt_to is None:
            return {}
        return {
            "adapt_to": self.adapt_to.describe(),
            "adaptation": self.adaptation,
            "select_by": self.select_by,
            "adaptation_iterations": self.adaptation_iterations,
            "adaptation_checkpoints": self.adaptation_checkpoints,
        }

    @classmethod
    def create(cls, **values: Any) -> TrainConfig:
        """Build from keywords; a bad value raises InvalidArgumentError naming the field."""
        recipe = values.get("recipe", "default")
        if recipe not in RECIPES:
            raise InvalidArgumentError(
                f"invalid training spec: recipe: unknown recipe {recipe!r}; choose from "
                f"{list(RECIPE_NAMES)}",
                field="recipe",
            )
        try:
            return cls(**values)
        except ValidationError as exc:
            raise _invalid(exc) from None

    @classmethod
    def from_spec(cls, spec: Any) -> TrainConfig:
        """From a ``common_pb2.TrainSpec``; zero/empty fields take the defaults."""
        values: dict[str, Any] = {
            "model_id": spec.model,
            "images": _source(spec.images, "images"),
            "labels": _source(spec.labels, "labels"),
        }
        if spec.validation_images.path or spec.validation_labels.path:
            values["validation_images"] = _source(spec.validation_images, "validation_images")
            values["validation_labels"] = _source(spec.validation_labels, "validation_labels")
        optional: dict[str, Any] = {
            "architecture": spec.architecture,
            "width": spec.width,
            "members": tuple(spec.members),
            "iterations": spec.iterations,
            "base_model": spec.base_model,
            "add_iterations": spec.add_iterations,
            "batch_size": spec.batch_size,
            "patch_shape": tuple(spec.patch_shape),
            "validate_every": spec.validate_every,
            "snapshot_every": spec.snapshot_every,
            "snapshot_every_minutes": spec.snapshot_every_minutes,
            "intensity_augmentations": tuple(spec.intensity_augmentations),
            "learning_rate": spec.learning_rate,
            "accumulate_gradients": spec.accumulate_gradients,
            "voxel_size_nm": tuple(spec.voxel_size_nm),
            "num_classes": spec.num_classes,
            "seed": spec.seed,
            "recipe": spec.recipe,
            "max_minutes": spec.max_minutes,
            "optimizer": spec.optimizer,
            "loss": spec.loss,
            "schedule": spec.schedule,
            "input_scale": spec.input_scale,
            "foreground_fraction": spec.foreground_fraction,
            "adaptation": spec.adaptation,
            "select_by": spec.select_by,
            "adaptation_iterations": spec.adaptation_iterations,
            "adaptation_checkpoints": spec.adaptation_checkpoints,
            "match_histogram_at_predict": spec.match_histogram_at_predict,
        }
        values.update({k: v for k, v in optional.items() if v})
        if spec.adapt_to.path:
            values["adapt_to"] = _source(spec.adapt_to, "adapt_to")
        if "voxel_size_nm" in values and len(values["voxel_size_nm"]) != 3:
            raise InvalidArgumentError(
                f"voxel_size_nm must have 3 values (z, y, x), got {list(spec.voxel_size_nm)}",
                field="voxel_size_nm",
            )
        if "patch_shape" in values and len(values["patch_shape"]) != 2:
            raise InvalidArgumentError(
                f"patch_shape must have 2 values (y, x), got {list(spec.patch_shape)}",
                field="patch_shape",
            )
        return cls.create(**values)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise _invalid(exc) from None


def _source(ref: Any, name: str) -> VolumeSource:
    if not ref.path:
        raise InvalidArgumentError(
            f"{name}.path is empty: name the {name} volume", field=f"{name}.path"
        )
    return VolumeSource(store_url=ref.store_url, path=ref.path, array=ref.array)


# Config field → the TrainSpec field a user wrote.
_SPEC_NAMES = {"model_id": "model"}


def _invalid(exc: ValidationError) -> InvalidArgumentError:
    problems = []
    fields = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "spec"
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidArgumentError) and cause.field:
            loc = cause.field  # a whole-config check names its own field
        loc = _SPEC_NAMES.get(loc, loc)
        fields.append(loc)
        msg = str(err["msg"]).removeprefix("Value error, ")
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        problems.append(f"{loc}: {msg}{shown}")
    return InvalidArgumentError(
        "invalid training spec: " + "; ".join(problems), field=fields[0] if fields else "spec"
    )
