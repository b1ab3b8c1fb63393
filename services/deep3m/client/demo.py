"""The demo: train a small ensemble on the CDeep3M mitochondria sample and score it.

Runs the embedded deployment (every role as its own process, a ``file://``
store), then drives it through the same client the CLI uses: ingest the
images and labels, train the ensemble (one task per member), predict the
validation slices, and score them against their labels.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from deep3m.client.client import Deep3mClient
from deep3m.client.progress import follow_job
from deep3m.client.volumes import evaluate
from deep3m.core.errors import FailedPreconditionError
from deep3m.core.store import Store
from deep3m.launcher.local import LocalCluster, LocalClusterSpec
from deep3m.models.card import load_card
from deep3m.training.demo_data import DEMO_RECIPE, sample_paths
from deep3m.v1 import common_pb2

VOXEL_SIZE_NM = (40.0, 5.9, 5.9)


def _ref(path: str) -> Any:
    return common_pb2.VolumeRef(path=path)


def _run(client: Any, job: Any, console: Console, what: str) -> Any:
    console.print(f"[bold]{what}[/bold] (job {job.id})")
    final = follow_job(client, job.id, console=console)
    if final.state != common_pb2.JOB_STATE_SUCCEEDED:
        errors = "; ".join(f"{e.task_id}: {e.message}" for e in final.errors) or "no details"
        raise FailedPreconditionError(
            f"{what} ended {common_pb2.JobState.Name(final.state)}: {errors}", field=job.id
        )
    return final


def write_overlays(image: np.ndarray, probability: np.ndarray, folder: Path) -> list[Path]:
    """Grey image with the foreground probability in red, one PNG per slice."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for z in range(image.shape[0]):
        grey = image[z].astype(np.float32)
        lo, hi = np.percentile(grey, (1, 99))
        grey = np.clip((grey - lo) / max(hi - lo, 1e-6), 0, 1)
        alpha = np.clip(probability[z], 0, 1) * 0.6
        rgb = np.stack([grey * (1 - alpha) + alpha, grey * (1 - alpha), grey * (1 - alpha)], -1)
        path = folder / f"overlay_{z:03d}.png"
        Image.fromarray((rgb * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def run_demo(
    store_path: str, *, console: Console, budget_minutes: float | None = None
) -> dict[str, Any]:
    started = time.monotonic()
    data = sample_paths()
    root = Path(store_path).resolve()
    console.print(f"demo data: {data.description}")
    recipe = DEMO_RECIPE.scaled(budget_minutes) if budget_minutes else DEMO_RECIPE
    run_id = time.strftime("%Y%m%d-%H%M%S")
    model_id = f"demo-{run_id}"
    sources = [data.train_images, data.train_labels, data.val_images, data.val_labels]
    cluster = LocalCluster(
        LocalClusterSpec(
            store_url=str(root),
            log_dir=root / "logs",
            input_roots=(os.path.commonpath([str(Path(p).resolve()) for p in sources]),),
        )
    )
    console.print(
        "starting the embedded services (scheduler, tiling, training, inference, postprocess)…"
    )
    cluster.start(free_ports=True)
    try:
        with Deep3mClient(cluster.scheduler_address, timeout_s=60) as client:
            volumes = {
                "train-images": data.train_images,
                "train-labels": data.train_labels,
                "val-images": data.val_images,
                "val-labels": data.val_labels,
            }
            for name, source in volumes.items():
                job = client.ingest(
                    str(source),
                    _ref(f"volumes/{run_id}/{name}.zarr"),
                    voxel_size_nm=list(VOXEL_SIZE_NM),
                )
                _run(client, job, console, f"ingest {name}")
            job = client.train(
                images=_ref(f"volumes/{run_id}/train-images.zarr"),
                labels=_ref(f"volumes/{run_id}/train-labels.zarr"),
                validation_images=_ref(f"volumes/{run_id}/val-images.zarr"),
                validation_labels=_ref(f"volumes/{run_id}/val-labels.zarr"),
                model=model_id,
                **recipe.train_kwargs(),
            )
            _run(client, job, console, f"train {model_id} ({', '.join(recipe.members)})")
            prob_path = f"volumes/{run_id}/val-probabilities.zarr"
            job = client.predict(
                _ref(f"volumes/{run_id}/val-images.zarr"),
                model_id,
                _ref(prob_path),
                tta_level=recipe.tta_level,
            )
            _run(client, job, console, f"predict validation (TTA level {recipe.tta_level})")
    finally:
        cluster.stop()
    store = Store(str(root))
    probability = np.asarray(store.open_volume(prob_path)[:])
    image_path = f"volumes/{run_id}/val-images.zarr"
    image = np.asarray(store.open_volume(image_path)[:])
    overlays = write_overlays(image, probability, root / "overlays" / run_id)
    # Scored as `deep3m evaluate` scores it, at the threshold training chose on the
    # validation slices (the model card's), with its error overlays beside the others.
    threshold = load_card(store, model_id).threshold
    errors_dir = root / "overlays" / run_id / "errors"
    scores = evaluate(
        (store, prob_path), (store, f"volumes/{run_id}/val-labels.zarr"),
        threshold=threshold, objects=False, overlays=str(errors_dir), image=(store, image_path),
    )  # fmt: skip
    table = Table(title=f"validation accuracy (voxels, threshold {threshold:.2f})")
    for col in ("precision", "recall", "F1", "Jaccard"):
        table.add_column(col, justify="right")
    table.add_row(*(f"{scores[k]:.3f}" for k in ("precision", "recall", "f1", "jaccard")))
    console.print(table)
    console.print(f"probability map: {store.key_url(prob_path)}")
    console.print(f"overlay PNGs:    {overlays[0].parent}")
    console.print(f"error overlays:  {errors_dir} (TP green, FP red, FN blue)")
    console.print(f"model:           {store.key_url(f'models/{model_id}')}")
    console.print(f"took {(time.monotonic() - started) / 60:.1f} min")
    return {
        "precision": scores["precision"],
        "recall": scores["recall"],
        "f1": scores["f1"],
        "jaccard": scores["jaccard"],
        "threshold": threshold,
        "probabilities": store.key_url(prob_path),
        "overlays": str(overlays[0].parent),
        "error_overlays": list(scores["overlays"]),
        "model": model_id,
        "seconds": time.monotonic() - started,
    }
