"""The ``finalize`` stage of a prediction job without postprocessing, run once after
every block is written: it marks the probability volume complete (rewriting the
same bytes when repeated, so a retried task is harmless).

A job with ``postprocess`` never plans it: its labels, tables, evaluation and
pyramids are the sharded stages of :mod:`deep3m.postprocess.labelling_tasks`.
The probability volume is the lease's ``output`` volume, resolved and checked by
the scheduler at submit.
"""

from __future__ import annotations

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.locations import StoreRoots
from deep3m.runtime.settings import Settings, get_settings
from deep3m.runtime.task import TaskContext, TaskResult
from deep3m.v1 import common_pb2


def finalize_predict(
    spec: common_pb2.JobSpec,
    roots: StoreRoots,
    *,
    output: common_pb2.ResolvedVolume | None = None,
) -> tuple[dict[str, str], dict[str, float]]:
    """Finalize a prediction job; returns (outputs, metrics).

    ``output`` is the probability volume as resolved at submit (``lease.volumes``);
    without it (a spec no scheduler has seen) the spec's reference is resolved here.
    """
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
    if output is not None:
        store, key = roots.store(output.store_url, field="output.store_url"), output.path
    else:
        store, key = roots.resolve(p.output.store_url, p.output.path, field="output")
    store.mark_complete(key)
    return {"probabilities": store.key_url(key)}, {}


def handle_finalize_predict(ctx: TaskContext, *, settings: Settings | None = None) -> TaskResult:
    """Worker handler for the postprocess role's ``finalize`` tasks."""
    chosen = settings or getattr(ctx, "settings", None) or get_settings()
    outputs, metrics = finalize_predict(
        ctx.lease.spec, StoreRoots.from_settings(chosen), output=ctx.lease.volumes.get("output")
    )
    return TaskResult(metrics=metrics, outputs=outputs)
