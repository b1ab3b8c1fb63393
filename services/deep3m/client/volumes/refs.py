"""Stores and volume references as the command line gives them, JSON-ready values,
and the defaults the volume operations share."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deep3m.core.errors import Deep3mError, InvalidArgumentError, NotFoundError
from deep3m.core.store import Store, check_key, normalize_url

# Each operation imports its postprocess or model module when it runs: they pull
# scikit-image and torch (seconds of start-up), which the other commands never need.
Progress = Callable[[int, int], None]  # (done, total)


def default_workers() -> int:
    """Threads for blockwise work: the machine's cores, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def split_ref(text: str) -> tuple[str, str]:
    """``s3://bucket/prefix//volumes/x.zarr`` → (store URL, key); a plain key → ("", key)."""
    if "//" in text.split("://", 1)[-1]:
        store, key = text.rsplit("//", 1)
        return store, key
    return "", text


def open_existing_store(url: str, storage_options: Mapping[str, Any] | None = None) -> Store:
    """The store at ``url``; a local store must already exist (nothing is created)."""
    norm = normalize_url(url)
    if norm.startswith("file://") and not Path(norm.removeprefix("file://")).is_dir():
        raise NotFoundError(f"store {norm} does not exist", field="store")
    return Store(norm, storage_options)


def default_threshold(store: Store, key: str) -> float:
    """The threshold training chose on validation for the model that predicted ``key``
    (its model card's), else 0.5: a volume no model of this store predicted."""
    from deep3m.models.card import load_card, model_exists  # only this default needs it
    from deep3m.postprocess.foreground import DEFAULT_THRESHOLD

    model = store.volume_info(key).attributes.get("model")
    if isinstance(model, str) and model and model_exists(store, model):
        return float(load_card(store, model).threshold)
    return DEFAULT_THRESHOLD


def resolve(
    text: str,
    default_store: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    field: str = "volume",
) -> tuple[Store, str]:
    """(store, key) for a volume argument: a key in the default store or ``STORE//KEY``."""
    store_url, key = split_ref(text)
    if not key:
        raise InvalidArgumentError(f"{field} is empty", field=field)
    try:
        key = check_key(key)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(
            f"{field} {text!r}: {exc.message} (give a path inside the store, e.g. "
            "volumes/stack.zarr, or STORE_URL//PATH)",
            field=field,
        ) from exc
    return open_existing_store(store_url or default_store, storage_options), key


def renamed(exc: Deep3mError, field: str) -> Deep3mError:
    """The same error, naming the argument the user gave instead of a generic field."""
    return type(exc)(exc.message, field=field)


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, numpy scalars as Python numbers, NaN/inf as None."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
