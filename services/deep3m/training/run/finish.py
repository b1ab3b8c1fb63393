"""The end of a run: the kept weights (the last, or the best validation F1's with
``keep_best``) and the probability threshold that scores best on the validation
slices, written with the completed ``metrics.json``."""

from __future__ import annotations

import time
from typing import Any

from deep3m.models.card import save_weights
from deep3m.training.evaluate import best_threshold, foreground_probabilities
from deep3m.training.outputs import MemberResult
from deep3m.training.run.documents import final_metrics, write_metrics
from deep3m.training.run.state import Run, cpu_state


def finish(run: Run, done: int) -> MemberResult:
    """Write the kept weights and the validation-chosen threshold."""
    config = run.config
    if config.keep_best and run.best_state is not None:
        run.net.load_state_dict(run.best_state, strict=True)
    state = cpu_state(run.net)
    weights = ""
    extra: dict[str, Any] = {}
    if run.rank == 0:
        # The threshold with the best F1 on the validation slices (the training
        # slices when no validation volume was given: validation_source says which).
        with run.autocast():
            probs = foreground_probabilities(
                [(run.net, run.frames, 1.0)], run.data.validation, run.device
            )
        threshold, f1 = best_threshold(probs, run.data.validation.labels > 0)
        extra = {"threshold": threshold, "threshold_f1": f1}
        weights = save_weights(run.store, config.model_id, run.member, state)
        write_metrics(run, done, complete=True, weights=weights, extra=extra)
    return MemberResult(
        member=run.member,
        frames=run.frames,
        iterations=done,
        weights=weights,
        metrics=final_metrics(run),
        history=tuple(run.history),
        normalization=run.data.normalization,
        resumed_from=run.resumed_from,
        seconds=time.monotonic() - run.started,
        state_dict=state,
    )
