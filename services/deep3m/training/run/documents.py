"""The member's ``metrics.json`` and ``validation.png``, rewritten as the run goes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deep3m.training.outputs import metrics_key, plot_key
from deep3m.training.plots import validation_plot
from deep3m.training.run.state import Run

VALIDATION_KEYS = ("val_loss", "accuracy", "precision", "recall", "f1", "jaccard")


def final_metrics(run: Run) -> dict[str, float]:
    """The latest figures; with ``keep_best``, validation figures of the kept weights."""
    out: dict[str, float] = {}
    for h in run.history:
        out.update({k: v for k, v in h.items() if k != "lr"})
    if run.config.keep_best and run.best_iteration:
        for h in run.history:
            if int(h.get("iteration", -1)) == run.best_iteration and "f1" in h:
                out.update({k: h[k] for k in VALIDATION_KEYS if k in h})
    return out


def write_metrics(
    run: Run, iteration: int, complete: bool, weights: str = "", extra: Mapping[str, Any] = {}
) -> None:
    if run.rank != 0:
        return
    config, data = run.config, run.data
    run.store.write_json(
        metrics_key(config.model_id, run.member),
        {
            "member": run.member,
            "frames": run.frames,
            "iteration": iteration,
            "iterations": config.total_iterations,
            "complete": complete,
            "weights": weights,
            "final": final_metrics(run),
            "history": run.history,
            "normalization": {"mean": data.normalization.mean, "std": data.normalization.std},
            "class_weights": [float(w) for w in data.class_weights],
            "validation_source": data.validation_source,
            "voxel_size_nm": list(data.voxel_size_nm),
            "fingerprint": config.fingerprint(run.member),
            "resumed_from": run.resumed_from,
            "world_size": run.world,
            "device": run.device.type,
            "best_iteration": run.best_iteration,
            "elapsed_s": run.elapsed(),
            **extra,
        },
    )
    title = f"{config.model_id} {run.member} ({config.architecture}, width {config.width})"
    run.store.write_bytes(
        plot_key(config.model_id, run.member), validation_plot(run.history, title)
    )
