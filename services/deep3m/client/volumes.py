"""Volume operations behind the ``deep3m`` command line, run in this process.

Each function acts on volumes in a store through the plain postprocess and
core modules and returns a JSON-ready report (lists, numbers, strings and
None only), which the CLI prints as text or as one JSON object. Failures are
``Deep3mError`` subclasses whose message names the offending volume, option or
value.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deep3m.core.errors import Deep3mError, InvalidArgumentError, NotFoundError
from deep3m.core.store import FULL_RESOLUTION, Store, check_key, normalize_url

# Each operation imports its postprocess or model module when it runs: they pull
# scikit-image and torch (seconds of start-up), which the other commands never need.
Progress = Callable[[int, int], None]  # (done, total)
# Slices exported or overlaid per run are listed, so keep a ceiling on typos like 0-99999.
MAX_SLICES = 100_000


def default_workers() -> int:
    """Threads for blockwise work: the machine's cores, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


# -- stores and references ----------------------------------------------------------
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


def _renamed(exc: Deep3mError, field: str) -> Deep3mError:
    """The same error, naming the argument the user gave instead of a generic field."""
    return type(exc)(exc.message, field=field)


# -- JSON -------------------------------------------------------------------------
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


# -- describe ---------------------------------------------------------------------
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


# -- label ------------------------------------------------------------------------
def label(
    store: Store,
    path: str,
    *,
    threshold: float = 0.5,
    watershed: bool = False,
    min_size_voxels: int = 0,
    connectivity: int = 1,
    name: str = "",
    output: tuple[Store, str] | None = None,
    workers: int | None = None,
    cancelled: threading.Event | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Threshold and label a volume; labels go to ``<path>/labels/<name>`` or ``output``."""
    from deep3m.postprocess.labels import DEFAULT_LABEL_NAME, LabelSpec, label_volume

    spec = LabelSpec(
        threshold=threshold, watershed=watershed, min_size_voxels=min_size_voxels,
        connectivity=connectivity,
    )  # fmt: skip
    if output is not None and output[0].url == store.url and check_key(output[1]) == path:
        raise InvalidArgumentError(
            f"--output {output[1]!r} is the input volume; choose another path", field="output"
        )
    result = label_volume(
        store, path, spec,
        output=output, name=name or DEFAULT_LABEL_NAME,
        max_workers=workers or default_workers(), cancelled=cancelled, progress=progress,
    )  # fmt: skip
    out_store = output[0] if output is not None else store
    sizes = result.objects.volume_voxels
    return jsonable(  # type: ignore[no-any-return]
        {
            "volume": path,
            "labels": result.labels_path,
            "labels_url": out_store.key_url(result.labels_path),
            "object_count": result.object_count,
            "tables": [out_store.key_url(k) for k in result.table_keys],
            "threshold": spec.threshold,
            "watershed": spec.watershed,
            "min_size_voxels": spec.min_size_voxels,
            "connectivity": spec.connectivity,
            "foreground_voxels": int(sizes.sum()),
            "object_voxels": {
                "min": int(sizes.min()) if len(sizes) else None,
                "median": float(np.median(sizes)) if len(sizes) else None,
                "max": int(sizes.max()) if len(sizes) else None,
            },
        }
    )


# -- evaluate ---------------------------------------------------------------------
def evaluate(
    prediction: tuple[Store, str],
    ground_truth: tuple[Store, str],
    *,
    threshold: float = 0.5,
    exclusion_zone_voxels: int = 0,
    objects: bool = True,
    min_size_voxels: int = 0,
    overlays: str | None = None,
    image: tuple[Store, str] | None = None,
    overlay_slices: Sequence[int] | None = None,
    workers: int | None = None,
    cancelled: threading.Event | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Voxel (and object) precision, recall, F1 and Jaccard of a prediction; with
    ``overlays`` (a folder or URL) error-overlay PNGs there, over ``image`` if given."""
    from deep3m.postprocess.evaluate import EvaluateSpec, evaluate_volumes

    if image is not None and overlays is None:
        raise InvalidArgumentError(
            "--image is only used with --overlays DIR (the image under the errors)", field="image"
        )
    spec = EvaluateSpec(
        threshold=threshold, exclusion_zone_voxels=exclusion_zone_voxels, objects=objects,
        min_size_voxels=min_size_voxels,
    )  # fmt: skip
    result = evaluate_volumes(
        prediction, ground_truth, spec,
        overlays=overlays, image=image, overlay_slices=list(overlay_slices or ()) or None,
        max_workers=workers or default_workers(), cancelled=cancelled, progress=progress,
    )  # fmt: skip
    v = result.voxels
    report: dict[str, Any] = {
        "prediction": prediction[0].key_url(prediction[1]),
        "ground_truth": ground_truth[0].key_url(ground_truth[1]),
        "threshold": spec.threshold,
        "exclusion_zone_voxels": spec.exclusion_zone_voxels,
        "min_size_voxels": spec.min_size_voxels,
        "precision": v.precision,
        "recall": v.recall,
        "f1": v.f1,
        "jaccard": v.jaccard,
        "counts": {
            "true_positives": v.true_positives,
            "false_positives": v.false_positives,
            "false_negatives": v.false_negatives,
            "true_negatives": v.true_negatives,
        },
        "objects": None,
        "overlays": list(result.overlays),
    }
    if result.objects is not None:
        o = result.objects
        report["objects"] = {
            "predicted": o.predicted,
            "ground_truth": o.ground_truth,
            "true_positives": o.true_positives,
            "false_positives": o.false_positives,
            "false_negatives": o.false_negatives,
            "precision": o.precision,
            "recall": o.recall,
            "f1": o.f1,
        }
    return jsonable(report)  # type: ignore[no-any-return]


# -- pyramid ----------------------------------------------------------------------
def pyramid(
    store: Store,
    path: str,
    *,
    levels: int = 0,
    method: str | None = None,
    workers: int | None = None,
    cancelled: threading.Event | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Build (or rebuild) the multiscale levels of a complete volume."""
    from deep3m.postprocess.pyramid import build_pyramid

    if method not in (None, "mean", "mode"):
        raise InvalidArgumentError(f"method must be mean or mode, got {method!r}", field="method")
    # Refuse volumes still being written: their levels would be built from holes.
    store.open_volume(path)
    paths = build_pyramid(
        store, path, levels,
        method=method,  # type: ignore[arg-type]
        max_workers=workers or default_workers(), cancelled=cancelled, progress=progress,
    )  # fmt: skip
    rows = []
    for level in paths:
        info = store.volume_info(path, level)
        rows.append(
            {
                "path": level,
                "shape": list(info.shape),
                "voxel_size_nm": list(info.voxel_size_nm),
                "chunk_shape": list(info.chunk_shape),
            }
        )
    return jsonable({"volume": path, "url": store.key_url(path), "levels": rows})  # type: ignore[no-any-return]


# -- export -----------------------------------------------------------------------
def parse_slices(text: str) -> list[int]:
    """``"0,4,10-12"`` → [0, 4, 10, 11, 12] (ranges inclusive); empty → []."""
    chosen: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        try:
            start = int(lo)
            stop = int(hi) if dash else start
        except ValueError:
            raise InvalidArgumentError(
                f"--slices must be z indices or ranges like 0,4,10-12; got {part!r}",
                field="slices",
            ) from None
        if start < 0 or stop < start:
            raise InvalidArgumentError(
                f"--slices range {part!r} must run from a smaller to a larger index >= 0",
                field="slices",
            )
        chosen.extend(range(start, stop + 1))
        if len(chosen) > MAX_SLICES:
            raise InvalidArgumentError(
                f"--slices selects more than {MAX_SLICES} slices", field="slices"
            )
    return list(dict.fromkeys(chosen))


class _SliceView:
    """The chosen z-slices of an array, read lazily one slice at a time."""

    def __init__(self, array: Any, slices: Sequence[int]) -> None:
        depth = int(array.shape[0])
        for z in slices:
            if not 0 <= z < depth:
                raise InvalidArgumentError(f"slice {z} lies outside 0..{depth - 1}", field="slices")
        self.array = array
        self.slices = list(slices)
        self.dtype = array.dtype
        self.shape = (len(self.slices), *(int(s) for s in array.shape[1:]))

    def __getitem__(self, z: int) -> Any:
        return self.array[self.slices[z]]


def export(
    store: Store,
    path: str,
    destination: str,
    fmt: str,
    *,
    array: str = "",
    image: tuple[Store, str] | None = None,
    slices: Sequence[int] = (),
    alpha: float = 0.5,
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a volume as a TIFF stack or PNG pages, or overlay PNGs over ``image``;
    an existing destination (a file, or a folder that is not empty) only with ``overwrite``."""
    from deep3m.postprocess.export import (
        FORMATS,
        export_array,
        export_overlay,
        refuse_existing,
        volume_name,
    )
    from deep3m.postprocess.foreground import volume_kind

    if fmt not in FORMATS:
        raise InvalidArgumentError(
            f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}", field="format"
        )
    if fmt == "overlay" and image is None:
        raise InvalidArgumentError(
            "--format overlay needs --image VOLUME (the image to draw over)", field="image"
        )
    if fmt != "overlay" and image is not None:
        raise InvalidArgumentError(
            f"--image is only used with --format overlay, not {fmt}", field="image"
        )
    info = store.volume_info(path, array)
    data = store.open_volume(path, array)
    kind = volume_kind(info.dtype, info.attributes)
    if not overwrite:
        refuse_existing(
            destination, storage_options=storage_options, hint="--overwrite replaces it"
        )
    if image is not None:
        try:
            image_data = image[0].open_volume(image[1])
        except Deep3mError as exc:
            raise _renamed(exc, "image") from exc
        files = export_overlay(
            image_data, data, destination,
            kind=kind, slices=list(slices) or None, alpha=alpha, prefix=volume_name(path),
            storage_options=storage_options,
        )  # fmt: skip
    else:
        count = info.attributes.get("object_count")
        files = export_array(
            _SliceView(data, slices) if slices else data, destination, fmt,
            kind=kind, name=volume_name(path),
            max_label=int(count) if isinstance(count, int) else None,
            storage_options=storage_options,
        )  # fmt: skip
    return jsonable(  # type: ignore[no-any-return]
        {
            "volume": path,
            "url": store.key_url(path),
            "format": fmt,
            "destination": destination,
            "slices": list(slices) or None,
            "files": [str(f) for f in files],
        }
    )


# -- models -----------------------------------------------------------------------
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
    return jsonable({"store": store.url, "models": found, "invalid": invalid})


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
    }  # type: ignore[no-any-return]
