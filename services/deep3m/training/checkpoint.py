"""Training snapshots in the store, without pickles.

``models/<id>/<member>/checkpoints/ckpt-<iteration>.safetensors`` holds every
tensor (model weights and buffers, optimizer state, RNG state);
``ckpt-<iteration>.json`` holds the rest (iteration, optimizer hyper-parameters,
gradient-scaler state, the metrics history, the configuration fingerprint). The
JSON is written last, so a snapshot exists only once both are complete; the
newest complete snapshot is the one a restarted task resumes from.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.store import Store
from deep3m.models.card import read_safetensors

_NAME = re.compile(r"^ckpt-(\d{8,})\.json$")


def checkpoint_dir(model_id: str, member: str) -> str:
    return f"models/{model_id}/{member}/checkpoints"


def _stem(model_id: str, member: str, iteration: int) -> str:
    return f"{checkpoint_dir(model_id, member)}/ckpt-{iteration:08d}"


@dataclass(frozen=True)
class Checkpoint:
    iteration: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    history: tuple[Mapping[str, float], ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)


def flatten_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors and JSON-able scalars."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(
    tensors: Mapping[str, torch.Tensor], doc: Mapping[str, Any]
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in doc.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": dict(sorted(state.items())), "param_groups": doc["param_groups"]}


def write_record(
    store: Store, stem: str, tensors: Mapping[str, torch.Tensor], doc: Mapping[str, Any]
) -> None:
    """``stem.safetensors`` then ``stem.json``: the JSON marks the record complete, so a
    reader that finds it finds the tensors in place."""
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    store.write_bytes(f"{stem}.safetensors", save_safetensors(data))
    store.write_json(f"{stem}.json", dict(doc))


def save_checkpoint(store: Store, model_id: str, member: str, ckpt: Checkpoint) -> str:
    """Write a snapshot (tensors first, then the JSON that completes it); returns its key."""
    opt_tensors, opt_doc = flatten_optimizer(ckpt.optimizer)
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in ckpt.model.items()}
    tensors.update(opt_tensors)
    tensors.update({f"rng.{k}": v for k, v in ckpt.rng.items()})
    stem = _stem(model_id, member, ckpt.iteration)
    write_record(
        store,
        stem,
        tensors,
        {
            "iteration": ckpt.iteration,
            "optimizer": opt_doc,
            "scaler": ckpt.scaler,
            "history": [dict(h) for h in ckpt.history],
            "meta": dict(ckpt.meta),
        },
    )
    return f"{stem}.json"


def list_checkpoints(store: Store, model_id: str, member: str) -> list[int]:
    """Iterations of the complete snapshots, oldest first."""
    names = set(store.list(checkpoint_dir(model_id, member)))
    found = []
    for name in names:
        m = _NAME.match(name)
        if m and f"ckpt-{m.group(1)}.safetensors" in names:
            found.append(int(m.group(1)))
    return sorted(found)


def latest_checkpoint(store: Store, model_id: str, member: str) -> int | None:
    found = list_checkpoints(store, model_id, member)
    return found[-1] if found else None


def load_checkpoint(store: Store, model_id: str, member: str, iteration: int) -> Checkpoint:
    stem = _stem(model_id, member, iteration)
    doc = store.read_json(f"{stem}.json")
    try:
        tensors = read_safetensors(store, f"{stem}.safetensors")
        return Checkpoint(
            iteration=int(doc["iteration"]),
            model={k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")},
            optimizer=unflatten_optimizer(tensors, doc["optimizer"]),
            scaler=doc.get("scaler"),
            rng={k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")},
            history=tuple(doc.get("history", ())),
            meta=doc.get("meta", {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"checkpoint {store.key_url(stem)} is unreadable: {exc}", field="checkpoint"
        ) from exc


def prune_checkpoints(store: Store, model_id: str, member: str, keep: int) -> None:
    """Delete all but the newest ``keep`` snapshots (JSON first: never a JSON without data)."""
    for iteration in list_checkpoints(store, model_id, member)[:-keep]:
        stem = _stem(model_id, member, iteration)
        store.delete(f"{stem}.json")
        store.delete(f"{stem}.safetensors")


def delete_checkpoints(store: Store, model_id: str, member: str) -> None:
    store.delete(checkpoint_dir(model_id, member))
