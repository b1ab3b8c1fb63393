"""Running one task's handler and turning what happened into an outcome to report.

A handler returning a ``TaskResult`` completes the task. A ``Deep3mError`` fails
it, for good when ``retryable`` is false (bad input); any other exception is
retryable. A task whose worker is stopping and whose handler saved its progress
(``CancelledError`` while ``ctx.stopping``) is given back without an attempt. An
unreachable store is waited out here, not counted as a failure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from deep3m.core.errors import CancelledError, Deep3mError, store_unreachable
from deep3m.core.retry import Backoff, retry_while
from deep3m.runtime.task import TaskContext, TaskHandler, TaskResult
from deep3m.v1 import common_pb2

log = logging.getLogger("deep3m.worker")


@dataclass(frozen=True)
class Outcome:
    """What became of a task: completed with a result, failed (retryable or not), or
    given back unfinished."""

    complete: bool
    result: TaskResult | None = None
    error: common_pb2.ErrorDetail | None = None
    retryable: bool = True
    release: bool = False  # given back unfinished (the worker is stopping): no attempt


def execute(
    handler: TaskHandler | None, ctx: TaskContext, *, worker: str, store_retry_s: float
) -> Outcome:
    """Run ``handler`` (None: this worker has none for the task's stage) on ``ctx``."""
    task = ctx.task
    if handler is None:
        # Another replica (or version) of this role may handle it.
        return Outcome(
            False,
            error=common_pb2.ErrorDetail(
                code="FAILED_PRECONDITION",
                task_id=task.id,
                message=f"{worker} has no handler for stage {task.stage!r}",
            ),
            retryable=True,
        )
    started = time.perf_counter()
    try:
        result = _call_waiting_out_outages(handler, ctx, store_retry_s)
    except Deep3mError as exc:
        if ctx.cancelled.is_set():
            return cancelled_outcome(ctx)
        if ctx.stopping.is_set() and isinstance(exc, CancelledError):
            # The handler saved its progress because this worker is going away.
            return Outcome(False, release=True)
        log.warning(
            "task %s failed: %s",
            task.id,
            exc.message,
            extra={"task_id": task.id, "job_id": task.job_id, "retryable": exc.retryable},
        )
        return Outcome(
            False,
            error=common_pb2.ErrorDetail(
                code=exc.grpc_code_name, message=exc.message, field=exc.field, task_id=task.id
            ),
            retryable=exc.retryable,
        )
    except Exception as exc:
        if ctx.cancelled.is_set():
            return cancelled_outcome(ctx)
        log.exception("task %s raised", task.id, extra={"task_id": task.id, "job_id": task.job_id})
        return Outcome(
            False,
            error=common_pb2.ErrorDetail(
                code="INTERNAL", message=f"{type(exc).__name__}: {exc}", task_id=task.id
            ),
            retryable=True,
        )
    if not isinstance(result, TaskResult):
        return Outcome(
            False,
            error=common_pb2.ErrorDetail(
                code="INTERNAL",
                task_id=task.id,
                message=f"the {task.stage!r} handler returned {type(result).__name__}, not a "
                "TaskResult",
            ),
            retryable=False,
        )
    log.info(
        "task done",
        extra={
            "task_id": task.id,
            "job_id": task.job_id,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    return Outcome(True, result=result)


def _call_waiting_out_outages(
    handler: TaskHandler, ctx: TaskContext, store_retry_s: float
) -> TaskResult:
    """Run ``handler``; while the store is unreachable, run it again with backoff
    (the lease is kept alive meanwhile) for up to ``store_retry_seconds``.

    An outage is nobody's fault: waiting it out here counts no attempt, where a
    failure would, and a few in a row would quarantine healthy blocks. Handlers
    are idempotent (a task may run twice anyway), so a partial first run is fine.
    """
    task = ctx.task

    def note(exc: BaseException, delay: float) -> None:
        log.warning(
            "task %s: store unreachable (%s: %s); running it again in %.1f s",
            task.id,
            type(exc).__name__,
            str(exc)[:200],
            delay,
            extra={"task_id": task.id, "job_id": task.job_id},
        )

    return retry_while(
        lambda: handler(ctx),
        lambda exc: store_unreachable(exc) and not ctx.cancelled.is_set(),
        budget_s=store_retry_s,
        backoff=Backoff(0.5, 5.0, jitter=0.2),
        wait=ctx.cancelled.wait,
        on_retry=note,
    )


def cancelled_outcome(ctx: TaskContext) -> Outcome:
    return Outcome(
        False,
        error=common_pb2.ErrorDetail(
            code="CANCELLED", task_id=ctx.task.id, message="the task was cancelled"
        ),
        retryable=True,
    )
