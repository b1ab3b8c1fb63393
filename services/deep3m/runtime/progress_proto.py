"""Progress events and job states on the wire.

``deep3m.core.events.ProgressEvent`` names states as strings (``"RUNNING"``);
the protocol uses the ``JobState`` enum. Server and client convert here, so
both sides agree on every field.
"""

from __future__ import annotations

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.events import JOB_STATES, TERMINAL_STATES, ProgressEvent
from deep3m.v1 import common_pb2

# The state names live with the events; named here too for the callers on the wire side.
__all__ = [
    "JOB_STATES",
    "TERMINAL_STATES",
    "event_from_proto",
    "event_to_proto",
    "state_from_proto",
    "state_to_proto",
]


def state_to_proto(state: str) -> common_pb2.JobState:
    """``"RUNNING"`` → ``JOB_STATE_RUNNING``; empty → unspecified."""
    if not state:
        return common_pb2.JOB_STATE_UNSPECIFIED
    name = state.upper()
    if name not in JOB_STATES:
        raise InvalidArgumentError(
            f"unknown job state {state!r}; use one of {', '.join(JOB_STATES)}", field="state"
        )
    return common_pb2.JobState.Value("JOB_STATE_" + name)  # type: ignore[return-value]


def state_from_proto(value: int) -> str:
    """``JOB_STATE_RUNNING`` → ``"RUNNING"``; unspecified → empty."""
    if value == common_pb2.JOB_STATE_UNSPECIFIED:
        return ""
    try:
        return str(common_pb2.JobState.Name(value)).removeprefix("JOB_STATE_")
    except ValueError:
        raise InvalidArgumentError(f"unknown job state value {value}", field="state") from None


def event_to_proto(event: ProgressEvent) -> common_pb2.ProgressEvent:
    msg = common_pb2.ProgressEvent(
        job_id=event.job_id,
        time_unix_s=event.time_unix_s,
        state=state_to_proto(event.state),
        stage=event.stage,
        tasks_done=event.tasks_done,
        tasks_total=event.tasks_total,
        voxels_per_second=event.voxels_per_second,
        eta_seconds=event.eta_seconds,
        message=event.message,
        task_id=event.task_id,
    )
    msg.metrics.update({k: float(v) for k, v in event.metrics.items()})
    if event.error:
        msg.error.message = event.error
        msg.error.task_id = event.task_id
    return msg


def event_from_proto(msg: common_pb2.ProgressEvent) -> ProgressEvent:
    return ProgressEvent(
        job_id=msg.job_id,
        state=state_from_proto(msg.state),
        stage=msg.stage,
        tasks_done=int(msg.tasks_done),
        tasks_total=int(msg.tasks_total),
        voxels_per_second=float(msg.voxels_per_second),
        eta_seconds=float(msg.eta_seconds),
        message=msg.message,
        metrics=dict(msg.metrics),
        error=msg.error.message if msg.HasField("error") else "",
        task_id=msg.task_id,
        time_unix_s=float(msg.time_unix_s),
    )
