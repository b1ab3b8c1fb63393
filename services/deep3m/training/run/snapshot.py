"""Snapshots of a run: every ``snapshot_every`` iterations and every
``snapshot_every_minutes`` of wall time, whichever comes first, so that a
preemption of a long member costs minutes, not hours. A snapshot holds the
weights, the optimiser (and gradient scaler), the RNG, the history and the
best-so-far figures; only the newest ``checkpoints_kept`` are kept.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from deep3m.training import checkpoint as ckpt
from deep3m.training.run.state import Run, agree_int


def meta(run: Run) -> dict[str, Any]:
    return {
        "fingerprint": run.config.fingerprint(run.member),
        "normalization": {
            "mean": run.data.normalization.mean,
            "std": run.data.normalization.std,
        },
        "elapsed_s": run.elapsed(),
        "best_f1": run.best_f1,
        "best_iteration": run.best_iteration,
    }


def snapshot_due(run: Run, done: int) -> bool:
    """After ``done`` iterations: by count, or because the wall-clock interval has passed."""
    config = run.config
    if done % config.snapshot_every == 0:
        return True
    late = time.monotonic() - run.last_snapshot >= config.snapshot_every_minutes * 60.0
    # Under DDP every rank snapshots at the same iteration: rank 0's clock decides.
    return bool(agree_int(int(late), run.device))


def snapshot(run: Run, iteration: int) -> None:
    run.last_snapshot = time.monotonic()
    if run.rank != 0:
        return
    config = run.config
    ckpt.save_checkpoint(
        run.store,
        config.model_id,
        run.member,
        ckpt.Checkpoint(
            iteration=iteration,
            model=run.net.state_dict(),
            optimizer=run.optimizer.state_dict(),
            scaler=run.scaler.state_dict() if run.scaler is not None else None,
            rng={"torch": torch.get_rng_state()},
            history=tuple(run.history),
            meta=meta(run),
        ),
    )
    ckpt.prune_checkpoints(run.store, config.model_id, run.member, config.checkpoints_kept)
    run.publish(
        iteration,
        {"snapshot_iteration": float(iteration)},
        f"{run.member}: snapshot at iteration {iteration}",
    )
