"""Where a member's training documents live, and reading a finished member back.

``models/<id>/<member>/`` holds ``metrics.json`` (figures, history, the
configuration fingerprint, ``complete`` once the weights are written),
``validation.png``, ``best.safetensors`` while training with ``keep_best``,
and the member's weights. A member whose ``metrics.json`` is complete, matches
the configuration's fingerprint and names weights that exist is done: a retried
task returns it instead of training again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from deep3m.core.store import Store
from deep3m.training.config import TrainConfig
from deep3m.training.data import Normalization


def member_dir(model_id: str, member: str) -> str:
    return f"models/{model_id}/{member}"


def metrics_key(model_id: str, member: str) -> str:
    return f"{member_dir(model_id, member)}/metrics.json"


def plot_key(model_id: str, member: str) -> str:
    return f"{member_dir(model_id, member)}/validation.png"


def best_key(model_id: str, member: str) -> str:
    return f"{member_dir(model_id, member)}/best.safetensors"


@dataclass(frozen=True)
class MemberResult:
    member: str
    frames: int
    iterations: int
    weights: str  # relative to the model folder; empty on ranks other than 0
    metrics: Mapping[str, float]
    history: tuple[Mapping[str, float], ...]
    normalization: Normalization
    resumed_from: int = 0
    seconds: float = 0.0
    state_dict: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)


def completed_member(store: Store, config: TrainConfig, member: str) -> dict[str, Any] | None:
    key = metrics_key(config.model_id, member)
    if not store.exists(key):
        return None
    doc = store.read_json(key)
    if (
        doc.get("complete")
        and doc.get("fingerprint") == config.fingerprint(member)
        and doc.get("weights")
        and store.exists(f"models/{config.model_id}/{doc['weights']}")
    ):
        return dict(doc)
    return None


def result_from_store(
    store: Store, config: TrainConfig, member: str, doc: Mapping[str, Any]
) -> MemberResult:
    from deep3m.models.card import read_safetensors

    state = read_safetensors(store, f"models/{config.model_id}/{doc['weights']}")
    norm = doc.get("normalization", {})
    return MemberResult(
        member=member,
        frames=config.frames(member),
        iterations=int(doc["iteration"]),
        weights=str(doc["weights"]),
        metrics=dict(doc.get("final", {})),
        history=tuple(doc.get("history", ())),
        normalization=Normalization(float(norm.get("mean", 0.0)), float(norm.get("std", 1.0))),
        resumed_from=int(doc.get("resumed_from", 0)),
        state_dict=state,
    )
