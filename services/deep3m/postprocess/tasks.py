"""The ``finalize`` stage of a prediction job without postprocessing, run once after
every block is written: it marks the probability volume complete (rewriting the
same bytes when repeated, so a retried task is harmless).

A job with ``postprocess`` never plans it: its labels, tables, evaluation and
pyramids are the sharded stages of :mod:`deep3m.postprocess.labelling_tasks`.
"""

from __future__ import annotations

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.locations import StoreRoots
from deep3m.runtime.settings import Settings, get_settings
from deep3m.runtime.task import TaskContext, TaskResult
from deep3m.v1 import common_pb2


def finalize_predict(
    spec: common_pb2.JobSpec, roots: StoreRoots
) -> tuple[dict[str, str], dict[str, float]]:
    """Finalize a prediction job; returns (outputs, metrics)."""
    if spec.WhichOneof("kind") != "predict":
        raise InvalidArgumentError(
            f"finalize needs a predict job spec, got {spec.WhichOneof('kind') or 'an empty'} one",
            field="spec",
        )
    p = spec.predict
    if p.postprocess:
        raise InvalidArgumentError(
            "a predict job with postprocess runs the sharded labelling stages, not finalize; "
            "resubmit it",
            field="postprocess",
        )
    store, key = roots.resolve(p.output.store_url, p.output.path, field="output")
    store.mark_complete(key)
    return {"probabilities": store.key_url(key)}, {}


def handle_finalize_predict(ctx: TaskContext, *, settings: Settings | None = None) -> TaskResult:
    """Worker handler for the postprocess role's ``finalize`` tasks."""
    chosen = settings or getattr(ctx, "settings", None) or get_settings()
    outputs, metrics = finalize_predict(ctx.lease.spec, StoreRoots.from_settings(chosen))
    return TaskResult(metrics=metrics, outputs=outputs)
