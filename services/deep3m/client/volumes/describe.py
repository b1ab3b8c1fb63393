"""What is in a store: a volume described, the models listed."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from deep3m.client.volumes.refs import default_workers, jsonable
from deep3m.core.errors import Deep3mError
from deep3m.core.store import FULL_RESOLUTION, Store


def _group_ome(store: Store, key: str) -> dict[str, Any]:
    if not store.exists(f"{key}/zarr.json"):
        return {}
    meta = store.read_json(f"{key}/zarr.json")
    ome = meta.get("attributes", {}).get("ome") if isinstance(meta, dict) else None
    return dict(ome) if isinstance(ome, dict) else {}


def _levels(ome: Mapping[str, Any]) -> list[str]:
    try:
        return [str(d["path"]) for d in ome["multiscales"][0]["datasets"]]
    except (KeyError, IndexError, TypeError):
        return []


def describe_volume(
    store: Store,
    path: str,
    *,
    array: str = "",
    bins: int = 16,
    statistics: bool = True,
    workers: int | None = None,
) -> dict[str, Any]:
    """Geometry, metadata, pyramid levels, label images and (for a complete volume)
    intensity statistics with a ``bins``-bin histogram."""
    from deep3m.core.stats import compute_statistics

    info = store.volume_info(path, array)
    ome = _group_ome(store, path)
    labels = _group_ome(store, f"{path}/labels").get("labels") or []
    itemsize = np.dtype(info.dtype).itemsize
    report: dict[str, Any] = {
        "volume": path,
        "url": store.key_url(path),
        "array": array or FULL_RESOLUTION,
        "shape": list(info.shape),
        "dtype": info.dtype,
        "voxels": math.prod(info.shape),
        "size_bytes": math.prod(info.shape) * itemsize,
        "chunk_shape": list(info.chunk_shape),
        "shard_shape": list(info.shard_shape) if info.shard_shape else None,
        "voxel_size_nm": list(info.voxel_size_nm),
        "complete": info.complete,
        "attributes": dict(info.attributes),
        "levels": _levels(ome),
        "labels": [str(n) for n in labels],
        "statistics": None,
        "histogram": None,
    }
    if statistics and info.complete:
        data = store.open_volume(path, array)
        computed = compute_statistics(data, bins=bins, workers=workers or default_workers())
        s = computed.statistics
        report["statistics"] = {
            "count": s.count, "min": s.min, "max": s.max, "mean": s.mean, "std": s.std,
            "p01": s.p01, "p50": s.p50, "p99": s.p99,
        }  # fmt: skip
        report["histogram"] = {
            "bins": len(computed.histogram.counts),
            "edges": list(computed.histogram.edges),
            "counts": list(computed.histogram.counts),
        }
    return jsonable(report)  # type: ignore[no-any-return]


def list_models(store: Store) -> dict[str, Any]:
    """Every ``models/<id>/model.json`` in the store; unreadable cards are listed apart."""
    from deep3m.models.card import card_key, load_card

    found: list[dict[str, Any]] = []
    invalid: list[dict[str, str]] = []
    for model_id in store.list("models"):
        try:
            if not store.exists(card_key(model_id)):
                continue  # a model still being written (the card comes last)
            card = load_card(store, model_id)
        except Deep3mError as exc:
            invalid.append({"id": model_id, "error": exc.message})
            continue
        found.append(
            {
                "id": card.id,
                "architecture": card.architecture,
                "width": card.width,
                "members": [
                    {
                        "name": m.name,
                        "frames": m.frames,
                        "iterations": m.iterations,
                        "trained": bool(m.weights),
                        "metrics": dict(m.metrics),
                    }
                    for m in card.members
                ],
                "iterations": card.iterations,
                "metrics": dict(card.metrics),
                "voxel_size_nm": list(card.voxel_size_nm),
                "base_model": card.base_model or None,
                "adaptation": _adaptation_summary(card.adaptation),
            }
        )
    return jsonable({"store": store.url, "models": found, "invalid": invalid})  # type: ignore[no-any-return]


def _adaptation_summary(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a listing shows of a card's ``adaptation`` (None: not adapted): the method,
    target and criterion, and each member's chosen checkpoint (the histograms and
    morphology stay in the card)."""
    if not record:
        return None
    members = record.get("members") or {}
    return {
        "method": record.get("method"),
        "target": record.get("target"),
        "select_by": record.get("select_by"),
        "match_histogram_at_predict": bool(record.get("match_histogram_at_predict")),
        "chosen": {m: (r or {}).get("chosen_checkpoint") for m, r in members.items()},
        "fallback": record.get("fallback"),
    }
