"""Worker handlers for the sharded labelling stages of ``label`` and ``predict`` jobs.

Each handler is a thin body over :mod:`deep3m.postprocess.sharded.stored`: the
lease names the job (its resolved spec: ``label``, or ``predict.labelling``),
the source volume (``input`` for label jobs, the probabilities ``output`` for
predict jobs) and the ``labels`` volume created at submit. The stages' small
documents live under ``jobs/<job>/labelling`` in the default store; every task
rewrites the same bytes when repeated, so a retried or re-leased task is
harmless.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.geometry import Box
from deep3m.core.levels import Level, level_one_in_blocks, plan_levels
from deep3m.core.locations import StoreRoots
from deep3m.core.store import Store
from deep3m.core.store.keys import labelling_documents
from deep3m.postprocess.evaluate import Operand
from deep3m.postprocess.foreground import volume_kind
from deep3m.postprocess.label_image import mark_label_image, register_label_image
from deep3m.postprocess.labels import LabelSpec
from deep3m.postprocess.pyramid import (
    MAX_LEVELS,
    covered_region,
    prepare_pyramid,
    pyramid_plan,
    record_pyramid,
    write_level_from,
    write_level_region,
)
from deep3m.postprocess.sharded.block import Labelling
from deep3m.postprocess.sharded.merge import IdMap
from deep3m.postprocess.sharded.pipeline import labelling_for
from deep3m.postprocess.sharded.stored import (
    Documents,
    equivalences_task,
    evaluate_block_task,
    evaluate_task,
    merge_task,
    reduce_part_task,
    reduce_task,
    relabel_task,
    summarize_task,
    table_parts_of,
    truth_summarize_task,
)
from deep3m.postprocess.sharded.table import evaluation_key
from deep3m.runtime.settings import Settings
from deep3m.runtime.task import TaskContext, TaskHandler, TaskResult
from deep3m.v1 import common_pb2


@dataclass(frozen=True)
class LabellingJob:
    """What every labelling task of one job needs, from its lease."""

    spec: common_pb2.LabelSpec
    source_store: Store
    source: common_pb2.ResolvedVolume
    labels_store: Store
    labels: common_pb2.ResolvedVolume
    docs: Documents
    # Predict jobs also get a pyramid of their probabilities.
    pyramid_source: bool
    # The ground truth of an evaluating job.
    truth_store: Store | None = None
    truth: common_pb2.ResolvedVolume | None = None

    def truth_operand(self) -> Operand:
        if self.truth_store is None or self.truth is None:
            raise InvalidArgumentError(
                "the job has no resolved ground_truth volume; resubmit it", field="ground_truth"
            )
        info = self.truth_store.volume_info(self.truth.path, self.truth.array)
        array = self.truth_store.open_volume(self.truth.path, self.truth.array)
        return Operand.of(array, dict(info.attributes))

    def truth_labelling(self, truth: Operand) -> Labelling:
        """How the ground truth's objects are found: its components, never size-filtered."""
        spec = LabelSpec(threshold=self.spec.threshold, connectivity=self.spec.connectivity)
        return labelling_for(spec, truth.kind, self.voxel_size_nm)

    def merges_truth(self) -> Operand | None:
        """The ground truth, when its components go through the labelling stages
        (given, and not a declared label volume)."""
        if self.truth is None:
            return None
        truth = self.truth_operand()
        return None if truth.declared_labels else truth

    def source_operand(self) -> Operand:
        info = self.source_store.volume_info(self.source.path, self.source.array)
        return Operand.of(self.open_source(), dict(info.attributes))

    @property
    def block_shape(self) -> tuple[int, ...]:
        return tuple(int(b) for b in self.spec.block_shape)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(
            -(-int(s) // b) for s, b in zip(self.labels.shape, self.block_shape, strict=True)
        )

    @property
    def voxel_size_nm(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.labels.voxel_size_nm)

    @property
    def in_image(self) -> bool:
        """The labels are the label image ``<source>/labels/<name>`` of the source group."""
        return self.labels.store_url == self.source.store_url and self.labels.path == (
            f"{self.source.path}/labels/{self.spec.name}"
        )

    def label_spec(self) -> LabelSpec:
        return LabelSpec(
            threshold=self.spec.threshold,
            connectivity=self.spec.connectivity,
            min_size_voxels=int(self.spec.min_size_voxels),
            watershed=self.spec.watershed,
        )

    def labelling(self) -> Labelling:
        info = self.source_store.volume_info(self.source.path, self.source.array)
        kind = volume_kind(info.dtype, info.attributes)
        return labelling_for(self.label_spec(), kind, self.voxel_size_nm)

    def open_source(self) -> Any:
        return self.source_store.open_volume(self.source.path, self.source.array)

    def open_labels(self) -> Any:
        return self.labels_store.open_volume(self.labels.path, mode="r+", require_complete=False)

    def level_one(self) -> Level | None:
        """Pyramid level 1 when each relabel task writes its block's region of it (the
        scheduler plans no ``pyramid_1`` stage then), else None."""
        shape = tuple(int(s) for s in self.labels.shape)
        levels = plan_levels(shape, self.voxel_size_nm)
        grid = tuple(int(g) for g in self.labels.grid)
        return levels[0] if level_one_in_blocks(shape, self.block_shape, levels, grid) else None

    def pyramids(self) -> list[tuple[Store, str]]:
        """The volumes the pyramid stages reduce: the labels (and a predict job's
        probabilities)."""
        out = [(self.labels_store, self.labels.path)]
        if self.pyramid_source:
            out.append((self.source_store, self.source.path))
        return out

    @staticmethod
    def region(task: common_pb2.Task) -> Box:
        """The core box of a task planned over blocks."""
        core = task.block.core
        if len(core.start) != 3 or len(core.stop) != 3:
            raise InvalidArgumentError(
                f"labelling task {task.id!r} carries no 3-D block", field="task.block"
            )
        return Box(tuple(int(v) for v in core.start), tuple(int(v) for v in core.stop))

    def block(self, task: common_pb2.Task) -> tuple[tuple[int, ...], Box]:
        """The block index and core box of a per-block task."""
        box = self.region(task)
        index = tuple(a // b for a, b in zip(box.start, self.block_shape, strict=True))
        return index, box


def labelling_job(lease: common_pb2.TaskLease, roots: StoreRoots) -> LabellingJob:
    spec = lease.spec
    which = spec.WhichOneof("kind")
    if which == "label":
        label, source_name = spec.label, "input"
    elif which == "predict" and spec.predict.postprocess:
        label, source_name = spec.predict.labelling, "output"
    else:
        raise InvalidArgumentError(
            f"task {lease.task.id!r} of stage {lease.task.stage} needs a label job or a predict "
            f"job with postprocess, got a {which or 'empty'} job spec",
            field="spec",
        )
    for name in (source_name, "labels"):
        if name not in lease.volumes:
            raise InvalidArgumentError(
                f"task {lease.task.id!r} carries no resolved {name!r} volume; resubmit the job",
                field=name,
            )
    if len(label.block_shape) != 3:
        raise InvalidArgumentError(
            f"the job's labelling block_shape {list(label.block_shape)} is not resolved",
            field="block_shape",
        )
    source, labels = lease.volumes[source_name], lease.volumes["labels"]
    truth = lease.volumes["ground_truth"] if label.ground_truth.path else None
    if label.ground_truth.path and "ground_truth" not in lease.volumes:
        raise InvalidArgumentError(
            f"task {lease.task.id!r} carries no resolved 'ground_truth' volume; resubmit the job",
            field="ground_truth",
        )
    return LabellingJob(
        label,
        roots.store(source.store_url, field=f"{source_name}.store_url"),
        source,
        roots.store(labels.store_url, field="labels.store_url"),
        labels,
        Documents(roots.store(), labelling_documents(lease.task.job_id)),
        pyramid_source=which == "predict",
        truth_store=roots.store(truth.store_url, field="ground_truth.store_url") if truth else None,
        truth=truth,
    )


def summarize(job: LabellingJob, ctx: TaskContext) -> TaskResult:
    index, core = job.block(ctx.task)
    metrics = summarize_task(job.docs, job.open_source(), index, core, job.labelling())
    truth = job.merges_truth()
    if truth is not None:
        labelling = job.truth_labelling(truth)
        metrics.update(truth_summarize_task(job.docs, truth.array, index, core, labelling))
    return TaskResult(metrics=metrics)


def equivalences(job: LabellingJob, ctx: TaskContext) -> TaskResult:
    index, core = job.block(ctx.task)
    metrics = equivalences_task(job.docs, index, job.grid_shape, job.spec.connectivity)
    if job.merges_truth() is not None:
        equivalences_task(job.docs.truth, index, job.grid_shape, job.spec.connectivity)
    return TaskResult(metrics={**metrics, "voxels": float(core.size)})


def merge(job: LabellingJob, ctx: TaskContext) -> TaskResult:
    del ctx
    started = time.perf_counter()
    id_map = merge_task(
        job.docs,
        job.grid_shape,
        min_size_voxels=int(job.spec.min_size_voxels),
        watershed=job.spec.watershed,
    )
    metrics = {
        "objects": float(id_map.object_count),
        "equivalences": float(id_map.equivalences),
        # The merge's own cost (reads and union-find), apart from scheduling.
        "merge_seconds": time.perf_counter() - started,
    }
    if job.merges_truth() is not None:
        truth_map = merge_task(job.docs.truth, job.grid_shape)
        metrics["truth_objects"] = float(truth_map.object_count)
    # The pyramid stages (and relabel, writing level 1) write into these levels.
    for pyramid_store, pyramid_path in job.pyramids():
        prepare_pyramid(pyramid_store, pyramid_path)
    return TaskResult(metrics=metrics)


def evaluate_blocks(job: LabellingJob, ctx: TaskContext) -> TaskResult:
    index, core = job.block(ctx.task)
    truth = job.truth_operand()
    labels = job.labels_store.open_volume(job.labels.path, require_complete=False)
    metrics = evaluate_block_task(
        job.docs, job.source_operand(), truth, labels, index, core, job.truth_labelling(truth),
        threshold=job.spec.threshold, exclusion_zone=int(job.spec.exclusion_zone_voxels),
    )  # fmt: skip
    return TaskResult(metrics=metrics)


def evaluate(job: LabellingJob, ctx: TaskContext) -> TaskResult:
    """The evaluation reduced, written beside the object tables, and as job metrics."""
    del ctx
    shape = tuple(int(s) for s in job.labels.shape)
    declared = job.truth_operand().declared_labels
    figures = evaluate_task(job.docs, job.grid_shape, shape, declared_labels=declared).as_dict()
    key = evaluation_key(job.labels.path)
    job.labels_store.write_json(
        key,
        {
            "threshold": float(job.spec.threshold),
            "exclusion_zone_voxels": int(job.spec.exclusion_zone_voxels),
            "min_size_voxels": int(job.spec.min_size_voxels),
            **figures,
        },
    )
    return TaskResult(metrics=figures, outputs={"evaluation": job.labels_store.key_url(key)})


def relabel(job: LabellingJob, ctx: TaskContext) -> TaskResult:
    """The block's labels; from them in memory its region of pyramid level 1 (where
    the regions are the blocks downsampled); and the table parts it is given."""
    index, core = job.block(ctx.task)
    level = job.level_one()
    shards = max(1, int(job.spec.table_shards))

    def then(id_map: IdMap, labels: np.ndarray) -> None:
        if level is not None:
            target = job.labels_store.open_volume(
                job.labels.path, level.path, mode="r+", require_complete=False
            )
            write_level_from(target, labels, core, level.factor, "mode")
            if job.pyramid_source:
                store, path = job.source_store, job.source.path
                region = covered_region(core, level.factor)
                write_level_region(store, pyramid_plan(store, path), 1, region)
        for k in table_parts_of(index, job.grid_shape, shards):
            reduce_part_task(
                job.docs, job.grid_shape, job.voxel_size_nm, (k, shards), id_map=id_map
            )

    metrics = relabel_task(
        job.docs, job.open_source(), job.open_labels(), index, core, job.labelling(), then=then
    )
    return TaskResult(metrics=metrics)


def reduce(job: LabellingJob, ctx: TaskContext) -> TaskResult:
    """The tables beside the labels (joined from the parts the relabel tasks reduced),
    the labels sealed (label image marked, complete), the multiscales recorded."""
    del ctx
    store, path = job.labels_store, job.labels.path
    stats, keys = reduce_task(
        job.docs, job.grid_shape, job.voxel_size_nm,
        labels_store=store, labels_path=path,
        volume=Box.from_shape(tuple(int(s) for s in job.labels.shape)),
        shards=max(1, int(job.spec.table_shards)),
    )  # fmt: skip
    # Every level is written by now: the pyramid stages come before this one.
    levels = [record_pyramid(s, pyramid_plan(s, p)) for s, p in job.pyramids()]
    if job.in_image:
        register_label_image(store, job.source.path, job.spec.name)
        mark_label_image(store, path)
    store.mark_complete(
        path, object_count=len(stats), threshold=job.spec.threshold,
        watershed=job.spec.watershed, min_size_voxels=int(job.spec.min_size_voxels),
        connectivity=job.spec.connectivity,
    )  # fmt: skip
    outputs = {name: store.key_url(key) for name, key in keys.items()}
    outputs["labels"] = store.key_url(path)
    return TaskResult(
        metrics={
            "objects": float(len(stats)),
            "threshold": float(job.spec.threshold),
            "pyramid_levels": float(max(len(p) for p in levels)),
        },
        outputs=outputs,
    )


def pyramid_level(job: LabellingJob, ctx: TaskContext) -> TaskResult:
    """One chunk-aligned region of one level (the stage's name says which), for the
    labels and, in a predict job, the probabilities."""
    level = int(ctx.task.stage.removeprefix("pyramid_"))
    core = job.region(ctx.task)
    for store, path in job.pyramids():
        write_level_region(store, pyramid_plan(store, path), level, core)
    return TaskResult(metrics={"voxels": float(core.size)})


Body = Callable[[LabellingJob, TaskContext], TaskResult]
BODIES: Mapping[str, Body] = {
    "summarize": summarize,
    "equivalences": equivalences,
    "merge": merge,
    "relabel": relabel,
    "reduce": reduce,
    "evaluate_blocks": evaluate_blocks,
    "evaluate": evaluate,
    **{f"pyramid_{n}": pyramid_level for n in range(1, MAX_LEVELS + 1)},
}


def _run(body: Body, roots: StoreRoots, ctx: TaskContext) -> TaskResult:
    return body(labelling_job(ctx.lease, roots), ctx)


def labelling_handlers(settings: Settings) -> dict[str, TaskHandler]:
    """Stage → handler, for the postprocess role's worker."""
    roots = StoreRoots.from_settings(settings)
    return {stage: functools.partial(_run, body, roots) for stage, body in BODIES.items()}
