"""The ``predict`` stage: one task per core block of the output volume.

A task reads its core plus halo from the input in one read (mirror-padded at
the volume border), predicts, and writes exactly its core into the output,
which the scheduler created (float32, chunks aligned with the blocks). The
core must lie on the output's chunk (or shard) grid, so no two tasks write the
same chunk and a retried task rewrites the same bytes.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from deep3m.core.augmentation import IDENTITY_LEVEL
from deep3m.core.errors import CancelledError, InvalidArgumentError
from deep3m.core.geometry import Block, Box, check_core_aligned, grid_cells
from deep3m.inference.setup import PredictorSetup
from deep3m.runtime.metrics import INFERENCE_PHASE_SECONDS
from deep3m.runtime.task import CHUNKS_WRITTEN, StopFlag, TaskContext, TaskResult
from deep3m.v1 import common_pb2


def box_from_proto(box: common_pb2.Box, name: str) -> Box:
    """A 3D box from its proto, or InvalidArgumentError naming ``name``."""
    if len(box.start) != 3 or len(box.stop) != 3:
        raise InvalidArgumentError(
            f"{name} must have 3 start and 3 stop values (z, y, x), got start "
            f"{list(box.start)} stop {list(box.stop)}",
            field=name,
        )
    try:
        return Box(tuple(int(v) for v in box.start), tuple(int(v) for v in box.stop))
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{name}: {exc.message}", field=name) from exc


def block_from_task(task: common_pb2.Task) -> Block:
    if not task.HasField("block"):
        raise InvalidArgumentError(f"predict task {task.id!r} has no block", field="task.block")
    core = box_from_proto(task.block.core, "task.block.core")
    read = box_from_proto(task.block.read, "task.block.read")
    if core.empty:
        raise InvalidArgumentError(
            f"predict task {task.id!r} has an empty core {core}", field="task.block.core"
        )
    if not read.contains(core):
        raise InvalidArgumentError(
            f"read box {read} does not contain the core {core}", field="task.block.read"
        )
    return Block((0, 0, 0), core, read)


class PredictTaskHandler(PredictorSetup):
    """``Callable[[TaskContext], TaskResult]`` for the worker's ``predict`` stage."""

    def __call__(self, ctx: TaskContext) -> TaskResult:
        metrics = self.run(ctx.lease, cancelled=ctx.cancelled, interrupted=ctx.interrupted)
        return TaskResult(metrics=metrics)

    def run(
        self,
        lease: common_pb2.TaskLease,
        *,
        cancelled: StopFlag | None = None,
        interrupted: StopFlag | None = None,
    ) -> dict[str, float]:
        """Predict one block and write its core; returns the task metrics.

        ``cancelled`` (the job cancelled, the lease lost) ends the task wherever it
        is. ``interrupted`` (the worker stopping, or cancelled) ends only the wait for
        the device: a block read but not computed is given back at once, while the
        block computing finishes and is written, its compute not thrown away (the
        worker's grace bounds it; past it the worker cancels).
        """
        started = time.perf_counter()
        if lease.spec.WhichOneof("kind") != "predict":
            raise InvalidArgumentError(
                f"task {lease.task.id!r} of stage predict carries a "
                f"{lease.spec.WhichOneof('kind') or 'empty'} job spec",
                field="spec",
            )
        spec = lease.spec.predict
        block = block_from_task(lease.task)
        if "input" in lease.volumes and "output" in lease.volumes:
            # Resolved and checked by the scheduler at submission (dtype, shape, grid).
            source_ref, target_ref = lease.volumes["input"], lease.volumes["output"]
            in_store = self.roots.store(source_ref.store_url, field="input.store_url")
            out_store = self.roots.store(target_ref.store_url, field="output.store_url")
            source = in_store.open_volume(source_ref.path, source_ref.array)
            volume_id = f"{in_store.key_url(source_ref.path)}[{source_ref.array}]"
            target = out_store.open_volume(target_ref.path, mode="r+", require_complete=False)
            shape, grid = tuple(target_ref.shape), tuple(target_ref.grid)
            out_url = out_store.key_url(target_ref.path)
        else:  # a lease made without a scheduler: check what it names here
            source, target, out_url = self._open_checked(spec)
            volume_id = f"{spec.input.store_url}/{spec.input.path}[{spec.input.array}]"
            shape, grid = tuple(target.shape), tuple(target.shards or target.chunks)
        check_core_aligned(block.core, shape, grid, out_url)
        tta_level = spec.tta_level or IDENTITY_LEVEL

        predicted = self.predict_box(
            source,
            block.core,
            read=block.read,
            model=spec.model,
            members=list(spec.members),
            tta_level=tta_level,
            cancelled=cancelled,
            interrupted=interrupted,
            volume_id=volume_id,
        )
        if cancelled is not None and cancelled.is_set():
            raise CancelledError(f"task {lease.task.id!r} cancelled before writing its core")
        t0 = time.perf_counter()
        target[block.core.slices()] = predicted.probabilities
        write_seconds = time.perf_counter() - t0
        INFERENCE_PHASE_SECONDS.labels(phase="read").observe(predicted.read_seconds)
        INFERENCE_PHASE_SECONDS.labels(phase="predict").observe(predicted.predict_seconds)
        INFERENCE_PHASE_SECONDS.labels(phase="write").observe(write_seconds)
        INFERENCE_PHASE_SECONDS.labels(phase="wait").observe(predicted.wait_seconds)
        return {
            "voxels": float(block.core.size),
            CHUNKS_WRITTEN: float(grid_cells(block.core, grid)),
            "seconds": time.perf_counter() - started,
            "read_seconds": predicted.read_seconds,
            "predict_seconds": predicted.predict_seconds,
            "write_seconds": write_seconds,
            # Read, waiting for the device while other blocks computed (pipelining).
            "wait_seconds": predicted.wait_seconds,
        }

    def _open_checked(self, spec: common_pb2.PredictSpec) -> tuple[Any, Any, str]:
        """Input and output arrays of a spec whose volumes nobody has checked yet."""
        in_store, in_key = self.roots.resolve(spec.input.store_url, spec.input.path, field="input")
        out_store, out_key = self.roots.resolve(
            spec.output.store_url, spec.output.path, field="output"
        )
        source = in_store.open_volume(in_key, spec.input.array)
        target = out_store.open_volume(
            out_key, spec.output.array, mode="r+", require_complete=False
        )
        out_url = out_store.key_url(out_key)
        if np.dtype(target.dtype) != np.float32:
            raise InvalidArgumentError(
                f"output {out_url} has dtype {target.dtype}; predictions are float32",
                field="output",
            )
        if tuple(target.shape) != tuple(source.shape):
            raise InvalidArgumentError(
                f"output {out_url} has shape {list(target.shape)} but the input "
                f"{in_store.key_url(in_key)} has {list(source.shape)}",
                field="output",
            )
        return source, target, out_url
