"""Prediction jobs: ``predict`` (inference, one task per core block), then ``finalize``
(postprocess) — or, with ``postprocess``, the sharded labelling stages of
:mod:`.labelling` into the label image ``<output>/labels/<name>``.

The output is a float32 probability volume created at submit, its chunks (or
shards) aligned with the blocks so exactly one task owns each chunk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.geometry import grid_cells, plan_blocks
from deep3m.core.store import DEFAULT_CHUNK_SHAPE
from deep3m.runtime.task import CHUNKS_WRITTEN
from deep3m.scheduler.kinds.base import (
    JobKind,
    KindContext,
    NewVolume,
    PreparedJob,
    Resolved,
    VolumeFacts,
    replace_repeated,
)
from deep3m.scheduler.kinds.labelling import (
    DEFAULT_THRESHOLD,
    finish_labelling,
    labelling_stages,
    labels_volume,
    plan_labelling,
    resolve_ground_truth,
    resolve_labelling,
)
from deep3m.scheduler.kinds.refs import (
    check_same_array,
    existing_output,
    facts,
    input_volume,
    mark_output_complete,
    output_location,
    shape3,
)
from deep3m.scheduler.stages import StageDef, StagePlan
from deep3m.v1 import common_pb2

# CDeep3M tiles slices at 1024²; with a 32-voxel halo that keeps re-computed context
# under 15 % of the work, which is what makes blockwise prediction pay off.
DEFAULT_BLOCK_SHAPE: tuple[int, int, int] = (8, 1024, 1024)
PROBABILITY_DTYPE = "float32"


def chunk_for_block(block: Sequence[int]) -> tuple[int, ...]:
    """Output chunks for a block: the default chunk where it divides the block, else the block.

    So each block is a whole number of chunks and no two tasks share one.
    """
    return tuple(c if b % c == 0 else b for b, c in zip(block, DEFAULT_CHUNK_SHAPE, strict=True))


def fit_to_grid(block: Sequence[int], shape: Sequence[int], grid: Sequence[int]) -> tuple[int, ...]:
    """``block`` no larger than the volume rounded up to whole grid cells (stays aligned)."""
    return tuple(min(b, -(-s // g) * g) for b, s, g in zip(block, shape, grid, strict=True))


def default_block(shape: Sequence[int], grid: Sequence[int]) -> tuple[int, ...]:
    """The default block rounded down to the grid (at least one cell), fitted to the volume."""
    return fit_to_grid(
        tuple(max(g, (d // g) * g) for g, d in zip(grid, DEFAULT_BLOCK_SHAPE, strict=True)),
        shape,
        grid,
    )


class PredictKind(JobKind):
    name = "predict"
    stages = (StageDef("predict", "inference"), StageDef("finalize", "postprocess"))

    def stages_for(self, resolved: Resolved) -> tuple[StageDef, ...]:
        if not resolved.spec.predict.postprocess:
            return self.stages
        labelling = resolved.spec.predict.labelling
        return (self.stages[0], *labelling_stages(resolved.volume("labels"), labelling))

    def validate(self, spec: common_pb2.JobSpec, ctx: KindContext) -> PreparedJob:
        from deep3m.core.augmentation import IDENTITY_LEVEL, SPEED_LEVELS
        from deep3m.models.card import check_model_id, load_card

        p = spec.predict
        check_model_id(p.model)
        card = load_card(ctx.roots.store(), p.model)
        members = tuple(p.members) or card.member_names
        if len(set(members)) != len(members):
            raise InvalidArgumentError(f"members {list(members)} repeat a name", field="members")
        frames = max(card.member(m).frames for m in members)
        tta_level = p.tta_level or IDENTITY_LEVEL
        if tta_level not in SPEED_LEVELS:
            raise InvalidArgumentError(
                f"tta_level must be one of {sorted(SPEED_LEVELS)}, got {p.tta_level}",
                field="tta_level",
            )

        in_store, in_key, info = input_volume(ctx.roots, p.input, "input")
        shape = tuple(info.shape)
        halo = shape3(p.halo, "halo", minimum=0) if p.halo else tuple(card.halo)
        if halo[0] < frames // 2:
            raise InvalidArgumentError(
                f"halo {list(halo)} is too small in z: {frames}-frame members need {frames // 2} "
                "slices of context on each side",
                field="halo",
            )
        out_store, out_key, existing = output_location(ctx.roots, p.output, "output")
        if (out_store.url, out_key) == (in_store.url, in_key):
            raise InvalidArgumentError(
                f"output {out_store.key_url(out_key)} is the input volume", field="output"
            )
        requested = shape3(p.block_shape, "block_shape", minimum=1) if p.block_shape else None
        volumes: tuple[NewVolume, ...] = ()
        action = existing_output(
            out_store, out_key, existing, "output", overwrite=p.overwrite, ctx=ctx
        )
        if action == "reuse" and existing is not None:
            check_same_array(
                out_store, out_key, existing, "output", shape=shape, dtype=PROBABILITY_DTYPE
            )
            grid = tuple(existing.shard_shape or existing.chunk_shape)
            block = fit_to_grid(requested, shape, grid) if requested else default_block(shape, grid)
        else:
            block = tuple(
                min(b, s) for b, s in zip(requested or DEFAULT_BLOCK_SHAPE, shape, strict=True)
            )
            grid = chunk_for_block(block)
            volumes = (
                NewVolume(
                    out_store,
                    out_key,
                    shape,
                    PROBABILITY_DTYPE,
                    tuple(info.voxel_size_nm),
                    grid,
                    attributes={
                        "kind": "probabilities",
                        "model": p.model,
                        "input": in_store.key_url(in_key),
                    },
                    replace=action == "replace",
                ),
            )
        plan_blocks(shape, block, halo, grid=grid)  # InvalidArgumentError names block_shape
        read_voxels = math.prod(b + 2 * h for b, h in zip(block, halo, strict=True))
        if read_voxels > ctx.max_region_voxels:
            raise InvalidArgumentError(
                f"block_shape {list(block)} with halo {list(halo)} reads {read_voxels} voxels per "
                f"task, more than the limit of {ctx.max_region_voxels}; use smaller blocks",
                field="block_shape",
            )
        threshold = p.threshold
        resolved = self.resolved_spec(spec)
        r = resolved.predict
        labels: dict[str, VolumeFacts] = {}
        if p.postprocess:
            threshold = threshold or DEFAULT_THRESHOLD
            if not 0.0 < threshold < 1.0:
                raise InvalidArgumentError(
                    f"threshold must lie in (0, 1), got {p.threshold}", field="threshold"
                )
            given = common_pb2.LabelSpec()
            given.CopyFrom(p.labelling)
            given.threshold = threshold
            if not given.block_shape:
                replace_repeated(given.block_shape, block)
            labelling = resolve_labelling(
                given, shape=shape, grid=grid, default_block=block, prefix="labelling."
            )
            labels_key = f"{out_key}/labels/{labelling.name}"
            labelling.input.CopyFrom(p.output)
            labelling.output.CopyFrom(
                common_pb2.VolumeRef(store_url=p.output.store_url, path=labels_key)
            )
            r.labelling.CopyFrom(labelling)
            # Inside the output group: free unless the output is being resumed.
            _, _, labels_existing = output_location(ctx.roots, labelling.output, "output")
            new_labels, labels["labels"] = labels_volume(
                out_store, labels_key, labels_existing,
                shape=shape, chunk_shape=grid, shard_shape=None,
                voxel_size_nm=info.voxel_size_nm, source=out_store.key_url(out_key),
                field="output",
            )  # fmt: skip
            volumes = (*volumes, *new_labels)
            truth = resolve_ground_truth(ctx.roots, labelling, shape, prefix="labelling.")
            if truth is not None:
                labels["ground_truth"] = truth
        r.tta_level = tta_level
        r.threshold = threshold
        replace_repeated(r.members, members)
        replace_repeated(r.block_shape, block)
        replace_repeated(r.halo, halo)
        output = VolumeFacts(
            out_store.url,
            out_key,
            "",
            shape,
            PROBABILITY_DTYPE,
            tuple(int(g) for g in grid),
            tuple(float(v) for v in info.voxel_size_nm),
        )
        return PreparedJob(
            self.name,
            Resolved(
                resolved,
                {
                    "input": facts(in_store, in_key, p.input.array, info),
                    "output": output,
                    **labels,
                },
            ),
            {
                "probabilities": out_store.key_url(out_key),
                **({"labels": out_store.key_url(labels["labels"].path)} if labels else {}),
            },
            volumes,
        )

    def plan(self, index: int, resolved: Resolved) -> StagePlan | None:
        if index != 0 and resolved.spec.predict.postprocess:
            return plan_labelling(
                index, 1, resolved.volume("labels"), resolved.spec.predict.labelling
            )
        if index != 0:
            return super().plan(index, resolved)
        p = resolved.spec.predict
        output = resolved.volume("output")
        plan = plan_blocks(output.shape, tuple(p.block_shape), tuple(p.halo), grid=output.grid)
        sdef = self.stages[0]
        return StagePlan(
            index,
            sdef.name,
            sdef.role,
            "blocks",
            {
                "volume_shape": list(plan.volume_shape),
                "block_shape": list(plan.block_shape),
                "halo": list(plan.halo),
            },
        )

    def check_completion(
        self, plan: StagePlan, task: int, metrics: Mapping[str, float], resolved: Resolved
    ) -> str:
        if plan.name != "predict":
            return ""
        block = plan.task(task).block
        if block is None:
            return ""
        expected = grid_cells(block.core, resolved.volume("output").grid)
        reported = metrics.get(CHUNKS_WRITTEN)
        if reported is None or not math.isfinite(reported) or int(reported) != expected:
            return (
                f"the worker reported {CHUNKS_WRITTEN}={reported!r} but block {block.id} owns "
                f"{expected} output chunk(s); the completion does not count"
            )
        return ""

    def check_records(
        self, plan: StagePlan, records: Mapping[int, Mapping[str, Any]], resolved: Resolved
    ) -> str:
        # Counted from the records, not from chunk objects in the store: zarr writes
        # no object for a chunk that holds only the fill value (an all-zero block).
        if plan.name != "predict":
            return ""
        output = resolved.volume("output")
        total = 0
        for task in range(plan.n_tasks):
            metrics = dict(records.get(task, {}).get("metrics") or {})
            refused = self.check_completion(plan, task, metrics, resolved)
            if refused:
                return f"the completion record of task {task}: {refused}"
            total += int(metrics.get(CHUNKS_WRITTEN, 0))
        owned = math.prod(
            -(-int(n) // int(g)) for n, g in zip(output.shape, output.grid, strict=True)
        )
        if total != owned:
            return (
                f"the completion records account for {total} of the output's {owned} "
                "chunk(s); the output is not marked complete"
            )
        return ""

    def on_stage_finished(
        self, plan: StagePlan, resolved: Resolved, ctx: KindContext, job_id: str
    ) -> None:
        if plan.name == "predict":
            mark_output_complete(
                ctx.roots, resolved.volume("output"), job_id, retry_s=ctx.store_retry_s
            )
        elif resolved.spec.predict.postprocess:
            labelling = resolved.spec.predict.labelling
            finish_labelling(plan, 1, resolved.volume("labels"), labelling, ctx, job_id)
