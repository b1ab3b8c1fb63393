"""The ``finalize`` stage of a prediction job, run once after every block is written.

It marks the probability volume complete and, when the job asks for
postprocessing, thresholds it (``predict.threshold``, 0.5 when unset), labels
the objects into ``<probabilities>/labels/segmentation``, writes the object
table next to them and builds pyramids of both. Every step rewrites the same
bytes when repeated, so a retried task is harmless. The probability volume is
the lease's ``output`` volume, resolved and checked by the scheduler at submit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.locations import StoreRoots
from deep3m.postprocess.foreground import check_threshold
from deep3m.postprocess.labels import DEFAULT_LABEL_NAME, LabelSpec, label_volume
from deep3m.postprocess.pyramid import build_pyramid
from deep3m.runtime.settings import Settings, get_settings
from deep3m.runtime.task import TaskContext, TaskResult
from deep3m.v1 import common_pb2

# Progress reports during a long finalize, at most this often.
REPORT_EVERY_S = 2.0


Report = Callable[[Mapping[str, float], str], None]


def finalize_predict(
    spec: common_pb2.JobSpec,
    roots: StoreRoots,
    *,
    cancelled: threading.Event | None = None,
    report: Report | None = None,
    max_workers: int = 1,
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
    if output is not None:
        store, key = roots.store(output.store_url, field="output.store_url"), output.path
    else:
        store, key = roots.resolve(p.output.store_url, p.output.path, field="output")
    store.mark_complete(key)
    outputs = {"probabilities": store.key_url(key)}
    metrics: dict[str, float] = {}
    if not p.postprocess:
        return outputs, metrics

    threshold = check_threshold(p.threshold)
    last = [0.0]

    def progress(stage: str) -> Callable[[int, int], None]:
        def tell(done: int, total: int) -> None:
            now = time.monotonic()
            if report is not None and (done == total or now - last[0] >= REPORT_EVERY_S):
                last[0] = now
                report({"blocks_done": float(done), "blocks_total": float(total)}, stage)

        return tell

    labelled = label_volume(
        store, key, LabelSpec(threshold=threshold), name=DEFAULT_LABEL_NAME,
        max_workers=max_workers, cancelled=cancelled, progress=progress("labelling"),
    )  # fmt: skip
    probability_levels = build_pyramid(
        store,
        key,
        max_workers=max_workers,
        cancelled=cancelled,
        progress=progress("probability pyramid"),
    )
    label_levels = build_pyramid(
        store,
        labelled.labels_path,
        max_workers=max_workers,
        cancelled=cancelled,
        progress=progress("label pyramid"),
    )
    csv_key, json_key = labelled.table_keys
    outputs.update(
        labels=store.key_url(labelled.labels_path),
        objects_csv=store.key_url(csv_key),
        objects_json=store.key_url(json_key),
    )
    metrics.update(
        objects=float(labelled.object_count),
        threshold=threshold,
        pyramid_levels=float(max(len(probability_levels), len(label_levels))),
    )
    return outputs, metrics


def handle_finalize_predict(ctx: TaskContext, *, settings: Settings | None = None) -> TaskResult:
    """Worker handler for the postprocess role's ``finalize`` tasks."""
    chosen = settings or getattr(ctx, "settings", None) or get_settings()
    roots = StoreRoots.from_settings(chosen)
    outputs, metrics = finalize_predict(
        ctx.lease.spec, roots, cancelled=ctx.cancelled,
        report=lambda m, message: ctx.report(m, message=message),
        output=ctx.lease.volumes.get("output"),
    )  # fmt: skip
    return TaskResult(metrics=metrics, outputs=outputs)
