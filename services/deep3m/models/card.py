"""The model package in the store: a ``model.json`` card and per-member weights.

```
models/<id>/model.json                 the card (this module's ModelCard)
models/<id>/<member>/weights.safetensors
models/<id>/<member>/checkpoints/…      training snapshots (see deep3m.training)
```

Weights are safetensors, never pickles, so loading a model runs no code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from deep3m.core.errors import InvalidArgumentError, NotFoundError
from deep3m.core.store import Store

MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
Architecture = Literal["deepem3d", "resunet2d", "resunet3d", "unet2d", "ynet"]


def check_model_id(model_id: str) -> str:
    if not MODEL_ID.match(model_id or ""):
        raise InvalidArgumentError(
            f"model id {model_id!r} must be 1–128 letters, digits, '.', '_' or '-'",
            field="model",
        )
    return model_id


class MemberCard(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    frames: int = Field(ge=1)
    weights: str = ""  # path relative to the model folder; empty until trained
    iterations: int = 0
    # Weight in the ensemble average, chosen on validation (0: left out of the merge).
    weight: float = Field(default=1.0, ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)

    @field_validator("frames")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"frames must be odd (centre slice predicted), got {v}")
        return v


class ModelCard(BaseModel):
    """What a model is, how to feed it, and how it was made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = 1
    id: str
    architecture: Architecture = "deepem3d"
    width: float = Field(default=1.0, gt=0)
    num_classes: int = Field(default=2, ge=2)
    members: tuple[MemberCard, ...]
    # Intensity normalisation: (x - mean) / std on the raw voxel values.
    normalization_mean: float = 0.0
    normalization_std: float = Field(default=1.0, gt=0)
    voxel_size_nm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Recommended context (z, y, x) around each predicted block.
    halo: tuple[int, int, int] = (2, 32, 32)
    # Input y/x sizes must be multiples of this (the network's total stride).
    input_multiple: int = Field(default=16, ge=1)
    # The networks see their input downscaled by this factor (ScaledInput).
    input_scale: int = Field(default=1, ge=1)
    # Foreground probability threshold chosen on the validation slices: the default of
    # labelling and evaluation with this model.
    threshold: float = Field(default=0.5, gt=0, lt=1)
    iterations: int = 0
    base_model: str = ""
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    # Domain adaptation: method, target, reference statistics, the chosen checkpoint;
    # ``match_histogram_at_predict`` makes prediction match its input to
    # ``training_histogram`` (deep3m.adaptation.histogram.prediction_reference).
    adaptation: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_model_id(v)

    @model_validator(mode="after")
    def _members_unique(self) -> ModelCard:
        names = [m.name for m in self.members]
        if not names:
            raise ValueError("a model needs at least one member")
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        return self

    def member(self, name: str) -> MemberCard:
        for m in self.members:
            if m.name == name:
                return m
        raise InvalidArgumentError(
            f"model {self.id!r} has no member {name!r}; it has {[m.name for m in self.members]}",
            field="members",
        )

    @property
    def member_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    @property
    def max_frames(self) -> int:
        return max(m.frames for m in self.members)

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        """float32 (raw − mean) / std; one copy of ``raw``, the arithmetic in place."""
        out = np.array(raw, dtype=np.float32)
        out -= np.float32(self.normalization_mean)
        out /= np.float32(self.normalization_std)
        return out

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str = "model.json") -> ModelCard:
        try:
            return cls.model_validate(dict(data))
        except ValueError as exc:
            raise InvalidArgumentError(
                f"invalid model card {source}: {exc}", field="model"
            ) from exc


def card_key(model_id: str) -> str:
    return f"models/{check_model_id(model_id)}/model.json"


def weights_key(model_id: str, member: str) -> str:
    return f"models/{check_model_id(model_id)}/{member}/weights.safetensors"


def model_exists(store: Store, model_id: str) -> bool:
    return store.exists(card_key(model_id))


def load_card(store: Store, model_id: str) -> ModelCard:
    key = card_key(model_id)
    if not store.exists(key):
        raise NotFoundError(
            f"model {model_id!r} not found in {store.url} (no {key})", field="model"
        )
    return ModelCard.from_json(store.read_json(key), source=store.key_url(key))


def save_card(store: Store, card: ModelCard) -> None:
    store.write_json(card_key(card.id), card.to_json())


def save_weights(
    store: Store, model_id: str, member: str, state_dict: Mapping[str, torch.Tensor]
) -> str:
    """Write one member's weights; returns the path relative to the model folder."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    store.write_bytes(weights_key(model_id, member), save_safetensors(tensors))
    return f"{member}/weights.safetensors"


def save_model(
    store: Store, card: ModelCard, weights: Mapping[str, Mapping[str, torch.Tensor]]
) -> ModelCard:
    """Write every member's weights, then the card (last, so a card means complete)."""
    members = []
    for m in card.members:
        if m.name not in weights:
            raise InvalidArgumentError(f"no weights given for member {m.name!r}", field="members")
        members.append(
            m.model_copy(update={"weights": save_weights(store, card.id, m.name, weights[m.name])})
        )
    final = card.model_copy(update={"members": tuple(members)})
    save_card(store, final)
    return final


def load_state_dict(store: Store, card: ModelCard, member: str) -> dict[str, torch.Tensor]:
    m = card.member(member)
    if not m.weights:
        raise NotFoundError(
            f"member {member!r} of model {card.id!r} has no weights yet", field="members"
        )
    return read_safetensors(store, f"models/{card.id}/{m.weights}")


def read_safetensors(store: Store, key: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; anything else is one clear, non-retryable error."""
    data = store.read_bytes(key)
    try:
        return load_safetensors(data)
    except Exception as exc:  # the parser's errors name no file
        raise InvalidArgumentError(
            f"{store.key_url(key)} is not a valid safetensors file ({exc}); weights are "
            "loaded only from safetensors",
            field=key,
        ) from None


def load_member(
    store: Store, card: ModelCard, member: str, device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """Build a member's network from the registry and load its weights (eval mode)."""
    from deep3m.models.registry import build_network

    m = card.member(member)
    net = build_network(
        card.architecture,
        frames=m.frames,
        width=card.width,
        num_classes=card.num_classes,
        input_scale=card.input_scale,
    )
    state = load_state_dict(store, card, member)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InvalidArgumentError(
            f"weights of member {member!r} do not fit architecture {card.architecture!r} "
            f"(width {card.width}): {exc}",
            field="model",
        ) from exc
    return net.to(device).eval()
