"""The scheduler's plain values as protos, for the servicer and the in-process client."""

from __future__ import annotations

from collections.abc import Sequence

from deep3m.core.errors import Deep3mError
from deep3m.runtime.progress_proto import state_to_proto
from deep3m.scheduler.jobs import Grant, JobError, JobView
from deep3m.scheduler.kinds.base import VolumeFacts
from deep3m.v1 import common_pb2, scheduler_pb2


def error_to_proto(error: JobError) -> common_pb2.ErrorDetail:
    return common_pb2.ErrorDetail(
        code=error.code, message=error.message, task_id=error.task_id, field=error.field
    )


def error_from_proto(error: common_pb2.ErrorDetail) -> JobError:
    return JobError(error.code, error.message, task_id=error.task_id, field=error.field)


def job_to_proto(view: JobView) -> common_pb2.Job:
    out = common_pb2.Job(
        id=view.id,
        spec=view.spec,
        state=state_to_proto(view.state),
        created_unix_s=view.created_unix_s,
        updated_unix_s=view.updated_unix_s,
        errors=[error_to_proto(e) for e in view.errors],
        notes=view.notes,
    )
    out.outputs.update(view.outputs)
    out.metrics.update(view.metrics)
    for s in view.stages:
        out.stages.add(
            name=s.name,
            role=s.role,
            tasks_total=s.tasks_total,
            tasks_done=s.tasks_done,
            tasks_leased=s.tasks_leased,
            tasks_quarantined=s.tasks_quarantined,
        )
    return out


def volume_to_proto(facts: VolumeFacts) -> common_pb2.ResolvedVolume:
    return common_pb2.ResolvedVolume(
        store_url=facts.store_url,
        path=facts.path,
        array=facts.array,
        shape=facts.shape,
        dtype=facts.dtype,
        grid=facts.grid,
        voxel_size_nm=facts.voxel_size_nm,
    )


def grant_to_proto(grant: Grant) -> common_pb2.TaskLease:
    spec = grant.task
    task = common_pb2.Task(
        id=spec.id, job_id=grant.job_id, stage=grant.stage, role=grant.role, attempt=grant.attempt
    )
    task.params.update(spec.params)
    if spec.block is not None:
        task.block.core.start.extend(spec.block.core.start)
        task.block.core.stop.extend(spec.block.core.stop)
        task.block.read.start.extend(spec.block.read.start)
        task.block.read.stop.extend(spec.block.read.stop)
    lease = common_pb2.TaskLease(
        task=task, spec=grant.spec, lease_id=grant.lease_id, deadline_unix_s=grant.deadline_unix_s
    )
    for name, facts in grant.volumes.items():
        lease.volumes[name].CopyFrom(volume_to_proto(facts))
    return lease


def completions_to_proto(
    completions: Sequence[scheduler_pb2.TaskCompletion], errors: Sequence[Deep3mError | None]
) -> scheduler_pb2.CompleteTasksResponse:
    """One result per completion, in order; an error only where it was not recorded."""
    reply = scheduler_pb2.CompleteTasksResponse()
    for completion, error in zip(completions, errors, strict=True):
        result = reply.results.add(lease_id=completion.lease_id)
        if error is not None:
            result.error.CopyFrom(
                common_pb2.ErrorDetail(
                    code=error.grpc_code_name, message=error.message, field=error.field
                )
            )
    return reply
