"""Where a run starts: the newest snapshot of the same configuration, or a clean slate.

Because each iteration's samples come from an RNG seeded by the iteration
number, a resumed run continues exactly as an uninterrupted one would; a run
under a time budget carries its elapsed time over.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from deep3m.core.errors import FailedPreconditionError
from deep3m.training import checkpoint as ckpt
from deep3m.training.outputs import best_key
from deep3m.training.run.state import Run, agree_int

log = logging.getLogger("deep3m.training")


def restore(run: Run, resume: bool) -> int:
    """The iteration to start from: the newest snapshot's, or 0 (snapshots cleared)."""
    config, store, member = run.config, run.store, run.member
    if not resume:
        if run.rank == 0:
            ckpt.delete_checkpoints(store, config.model_id, member)
            if store.exists(best_key(config.model_id, member)):
                store.delete(best_key(config.model_id, member))
        return 0
    latest = ckpt.latest_checkpoint(store, config.model_id, member) if run.rank == 0 else None
    start = agree_int(latest if latest is not None else -1, run.device)
    if start < 0:
        return 0
    snap = ckpt.load_checkpoint(store, config.model_id, member, start)
    if snap.meta.get("fingerprint") != config.fingerprint(member):
        raise FailedPreconditionError(
            f"{store.key_url(ckpt.checkpoint_dir(config.model_id, member))} holds "
            "snapshots of a different training configuration; train under another "
            "model id or delete that folder",
            field="model",
        )
    run.net.load_state_dict(snap.model, strict=True)
    run.optimizer.load_state_dict(snap.optimizer)
    if run.scaler is not None and snap.scaler:
        run.scaler.load_state_dict(snap.scaler)
    _restore_rng(snap.rng)
    run.history = [dict(h) for h in snap.history]
    run.elapsed_before = float(snap.meta.get("elapsed_s", 0.0))
    run.best_f1 = float(snap.meta.get("best_f1", -1.0))
    run.best_iteration = int(snap.meta.get("best_iteration", 0))
    if run.best_iteration and store.exists(best_key(config.model_id, member)):
        from safetensors.torch import load as load_safetensors

        run.best_state = load_safetensors(store.read_bytes(best_key(config.model_id, member)))
    log.info(
        "resuming from snapshot",
        extra={"model": config.model_id, "member": member, "iteration": start},
    )
    run.resumed_from = start
    return start


def _restore_rng(state: Mapping[str, torch.Tensor]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"].to(torch.uint8))
