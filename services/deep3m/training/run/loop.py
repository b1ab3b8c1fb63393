"""The run loop: steps from the start iteration until the iterations or the time
budget run out, reporting, validating and snapshotting on the way. A stop
request (job cancelled, or the worker going away) is honoured between
iterations: a snapshot is written first, so the task resumes from there."""

from __future__ import annotations

import time

import torch.distributed as dist

from deep3m.core.errors import CancelledError
from deep3m.runtime.task import StopFlag
from deep3m.training.run.documents import write_metrics
from deep3m.training.run.iteration import step
from deep3m.training.run.selection import report
from deep3m.training.run.snapshot import snapshot, snapshot_due
from deep3m.training.run.state import Run, agree_int


def loop(run: Run, start: int, stop: StopFlag | None) -> int:
    """Steps from ``start``; returns the iterations done. Raises CancelledError on ``stop``."""
    from deep3m.runtime.metrics import TRAINING_ITERATIONS

    config, total = run.config, run.config.total_iterations
    interval_loss, interval_n = 0.0, 0
    interval_started = time.monotonic()
    samples_per_iteration = config.batch_size * config.accumulate_gradients * run.world
    done = start
    for it in range(start, total):
        stopping = stop is not None and stop.is_set()
        if agree_int(int(stopping), run.device, op=dist.ReduceOp.MAX if run.world > 1 else None):
            snapshot(run, it)
            write_metrics(run, it, complete=False)
            raise CancelledError(
                f"training of {config.model_id}/{run.member} stopped at iteration {it} "
                "(snapshot written); it resumes from there",
                field="job",
            )
        step_loss, lr = step(run, it)
        if run.rank == 0:
            TRAINING_ITERATIONS.inc()
        done = it + 1
        interval_loss += step_loss
        interval_n += 1
        final = done == total or run.out_of_time()
        validate_now = done % config.validate_every == 0 or final
        if done % config.log_every == 0 or validate_now:
            seconds = max(time.monotonic() - interval_started, 1e-9)
            report(run, done, interval_loss / interval_n, lr, interval_n, seconds,
                   samples_per_iteration, validate_now)  # fmt: skip
            interval_loss, interval_n = 0.0, 0
            interval_started = time.monotonic()
        if final:
            break
        if snapshot_due(run, done):
            snapshot(run, done)
    return done
