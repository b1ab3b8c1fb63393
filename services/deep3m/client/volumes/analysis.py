"""Blockwise work over whole volumes: label, evaluate, pyramid."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from deep3m.client.volumes.refs import Progress, default_workers, jsonable
from deep3m.core.errors import InvalidArgumentError
from deep3m.core.store import Store, check_key


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
