"""Label jobs: the sharded labelling stages over an existing probability or mask volume.

The labels go to the label image ``<input>/labels/<name>`` (or to ``output``),
a uint32 volume created at submit on the input's chunk (and shard) grid, and
sealed by the ``reduce`` stage together with the object tables.
"""

from __future__ import annotations

from deep3m.core.errors import InvalidArgumentError
from deep3m.scheduler.kinds.base import JobKind, KindContext, PreparedJob, Resolved
from deep3m.scheduler.kinds.labelling import (
    LABELLING_STAGES,
    finish_labelling,
    labelling_stages,
    labels_volume,
    plan_labelling,
    resolve_ground_truth,
    resolve_labelling,
)
from deep3m.scheduler.kinds.predict import default_block
from deep3m.scheduler.kinds.refs import facts, input_volume, output_location
from deep3m.scheduler.stages import StageDef, StagePlan
from deep3m.v1 import common_pb2


class LabelKind(JobKind):
    name = "label"
    stages = LABELLING_STAGES

    def validate(self, spec: common_pb2.JobSpec, ctx: KindContext) -> PreparedJob:
        given = spec.label
        in_store, in_key, info = input_volume(ctx.roots, given.input, "input")
        grid = tuple(int(g) for g in (info.shard_shape or info.chunk_shape))
        resolved = self.resolved_spec(spec)
        label = resolved.label
        label.CopyFrom(
            resolve_labelling(
                given, shape=info.shape, grid=grid, default_block=default_block(info.shape, grid)
            )
        )
        if given.output.path:
            out_ref = given.output
        else:
            out_ref = common_pb2.VolumeRef(
                store_url=given.input.store_url, path=f"{in_key}/labels/{label.name}"
            )
            label.output.CopyFrom(out_ref)
        out_store, out_key, existing = output_location(ctx.roots, out_ref, "output")
        if (out_store.url, out_key) == (in_store.url, in_key):
            raise InvalidArgumentError(
                f"output {out_store.key_url(out_key)} is the input volume", field="output"
            )
        volumes, labels = labels_volume(
            out_store, out_key, existing,
            shape=info.shape, chunk_shape=info.chunk_shape, shard_shape=info.shard_shape,
            voxel_size_nm=info.voxel_size_nm, source=in_store.key_url(in_key), field="output",
        )  # fmt: skip
        truth = resolve_ground_truth(ctx.roots, label, info.shape)
        return PreparedJob(
            self.name,
            Resolved(
                resolved,
                {
                    "input": facts(in_store, in_key, given.input.array, info),
                    "labels": labels,
                    **({"ground_truth": truth} if truth else {}),
                },
            ),
            {"labels": out_store.key_url(out_key)},
            volumes,
        )

    def stages_for(self, resolved: Resolved) -> tuple[StageDef, ...]:
        return labelling_stages(resolved.volume("labels"), resolved.spec.label)

    def plan(self, index: int, resolved: Resolved) -> StagePlan | None:
        return plan_labelling(index, 0, resolved.volume("labels"), resolved.spec.label)

    def on_stage_finished(
        self, plan: StagePlan, resolved: Resolved, ctx: KindContext, job_id: str
    ) -> None:
        finish_labelling(plan, 0, resolved.volume("labels"), resolved.spec.label, ctx, job_id)
