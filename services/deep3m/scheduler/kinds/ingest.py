"""Ingest jobs: ``ingest`` (tiling, one task per z-range), then ``finalize`` (tiling).

Image files (or a zarr array) become an OME-Zarr volume created at submit from
the source's header; each z-range is a whole number of the output's z grid, so
tasks never share a chunk.
"""

from __future__ import annotations

import math

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.store import DEFAULT_CHUNK_SHAPE
from deep3m.scheduler.kinds.base import (
    JobKind,
    KindContext,
    NewVolume,
    PreparedJob,
    Resolved,
    VolumeFacts,
    replace_repeated,
)
from deep3m.scheduler.kinds.refs import (
    check_same_array,
    existing_output,
    mark_output_complete,
    output_location,
    shape3,
)
from deep3m.scheduler.stages import StageDef, StagePlan
from deep3m.v1 import common_pb2


class IngestKind(JobKind):
    name = "ingest"
    stages = (StageDef("ingest", "tiling"), StageDef("finalize", "tiling"))

    def validate(self, spec: common_pb2.JobSpec, ctx: KindContext) -> PreparedJob:
        i = spec.ingest
        # URLs and local paths must lie under a configured root (unless widened).
        ctx.roots.check_source(i.source, restrict_local=ctx.restrict_local_inputs, field="source")
        if i.voxel_size_nm and (len(i.voxel_size_nm) != 3 or min(i.voxel_size_nm) <= 0):
            raise InvalidArgumentError(
                f"voxel_size_nm must be 3 positive sizes (z, y, x), got {list(i.voxel_size_nm)}",
                field="voxel_size_nm",
            )
        chunks_in = (
            shape3(i.chunk_shape, "chunk_shape", minimum=1)
            if i.chunk_shape
            else DEFAULT_CHUNK_SHAPE
        )
        if i.slices_per_task < 0:
            raise InvalidArgumentError(
                f"slices_per_task must be >= 0, got {i.slices_per_task}", field="slices_per_task"
            )
        out_store, out_key, existing = output_location(ctx.roots, i.output, "output")

        from deep3m.core.imageio import open_source

        options = ctx.roots.store().storage_options if i.source.startswith("s3://") else None
        # Headers are checked here; pixel checksums when the ingest tasks read the data.
        with open_source(i.source, storage_options=options, verify=False) as src:
            shape = tuple(int(s) for s in src.shape)
            dtype = str(src.dtype)
            source_voxel = src.voxel_size_nm
        if (
            not i.voxel_size_nm
            and source_voxel
            and not all(math.isfinite(v) and v > 0 for v in source_voxel)
        ):
            raise InvalidArgumentError(
                f"the source's header gives voxel size {list(source_voxel)}, which is not 3 "
                "positive finite sizes; set voxel_size_nm (--voxel-size) explicitly",
                field="voxel_size_nm",
            )
        voxel = tuple(i.voxel_size_nm) or tuple(source_voxel or (1.0, 1.0, 1.0))
        chunks = tuple(min(c, s) for c, s in zip(chunks_in, shape, strict=True))
        shards: tuple[int, ...] | None = None
        if i.shard_shape:
            shards = shape3(i.shard_shape, "shard_shape", minimum=1)
            if any(s % c for s, c in zip(shards, chunks, strict=True)):
                raise InvalidArgumentError(
                    f"shard_shape {list(shards)} must be a multiple of the chunk shape "
                    f"{list(chunks)}",
                    field="shard_shape",
                )
        grid_z = (shards or chunks)[0]
        slices = i.slices_per_task or grid_z
        if slices % grid_z:
            raise InvalidArgumentError(
                f"slices_per_task {slices} must be a multiple of the output's z grid {grid_z} "
                "(chunk or shard depth): tasks would share chunks",
                field="slices_per_task",
            )
        volumes: tuple[NewVolume, ...] = ()
        action = existing_output(
            out_store, out_key, existing, "output", overwrite=i.overwrite, ctx=ctx
        )
        if action == "reuse" and existing is not None:
            check_same_array(
                out_store,
                out_key,
                existing,
                "output",
                shape=shape,
                dtype=dtype,
                chunks=chunks,
                shards=shards,
            )
        else:
            volumes = (
                NewVolume(
                    out_store,
                    out_key,
                    shape,
                    dtype,
                    voxel,
                    chunks,
                    shards,
                    {"kind": "image", "source": i.source},
                    replace=action == "replace",
                ),
            )
        resolved = self.resolved_spec(spec)
        r = resolved.ingest
        replace_repeated(r.voxel_size_nm, voxel)
        replace_repeated(r.chunk_shape, chunks)
        r.slices_per_task = slices
        output = VolumeFacts(
            out_store.url, out_key, "", shape, dtype, tuple(shards or chunks), tuple(voxel)
        )
        return PreparedJob(
            self.name,
            Resolved(resolved, {"output": output}),
            {"volume": out_store.key_url(out_key)},
            volumes,
        )

    def plan(self, index: int, resolved: Resolved) -> StagePlan | None:
        if index != 0:
            return super().plan(index, resolved)
        sdef = self.stages[0]
        return StagePlan(
            index,
            sdef.name,
            sdef.role,
            "zranges",
            {
                "volume_shape": list(resolved.volume("output").shape),
                "slices": int(resolved.spec.ingest.slices_per_task),
            },
        )

    def on_stage_finished(
        self, plan: StagePlan, resolved: Resolved, ctx: KindContext, job_id: str
    ) -> None:
        if plan.name == "ingest":
            mark_output_complete(
                ctx.roots, resolved.volume("output"), job_id, retry_s=ctx.store_retry_s
            )
