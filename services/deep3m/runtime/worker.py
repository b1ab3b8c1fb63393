"""The pull worker every role runs: lease, heartbeat, run a handler, report.

A ``Worker`` leases up to ``worker_capacity`` tasks of its role from the
scheduler, runs each with the handler registered for the task's stage, and
completes or fails it. Completions that finish while another is being sent
go together in the next ``CompleteTasks`` call (one call, one store write, for
many tasks). A heartbeat thread renews every lease at about a third of its
length; a renew that answers *cancelled* (or finds the lease taken over) sets
``ctx.cancelled``, which handlers check between steps. ``stop`` sets
``ctx.stopping`` on the running tasks: one that saves its progress and raises
``CancelledError`` is given back at once (no attempt counted); the others get
the grace period to finish, then are given back too.

The scheduler is reached through a ``SchedulerClient``: gRPC by default, or a
scheduler in the same process (``deep3m.scheduler.inprocess``). Failures: a
handler raising a ``Deep3mError`` with ``retryable=False`` fails the task for
good (bad input); any other exception is retryable. The scheduler decides
when to stop retrying. Every call carries a deadline; an unreachable
scheduler is retried with backoff (a restart must not lose finished work), and
an empty queue is polled with backoff, never in a busy loop, and again at once
when one of the worker's tasks ends (its completion may have started the next
stage: no backoff delay between stages). After one of its tasks ended, a worker
polls a few times at the base interval before backing off: a peer's last task
of the stage may start the next one any moment (``IdlePolling``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from deep3m.core.errors import (
    CancelledError,
    Deep3mError,
    InvalidArgumentError,
)
from deep3m.core.retry import Backoff
from deep3m.runtime.batching import CompletionBatcher
from deep3m.runtime.channel import ChannelSecurity
from deep3m.runtime.outcome import Outcome, execute
from deep3m.runtime.scheduler_client import (
    WORKER_CHANNEL_OPTIONS,
    GrpcSchedulerClient,
    SchedulerClient,
)
from deep3m.runtime.settings import ROLES, Settings
from deep3m.runtime.task import TaskContext, TaskHandler, TaskResult
from deep3m.v1 import common_pb2

# The task contract lives in deep3m.runtime.task; named here too for the callers of the worker.
__all__ = ["WORKER_CHANNEL_OPTIONS", "TaskContext", "TaskHandler", "TaskResult", "Worker"]

log = logging.getLogger("deep3m.worker")

MIN_RENEW_INTERVAL_S = 0.05
MAX_UNREACHABLE_BACKOFF_S = 2.0
# Empty polls at the base interval after one of the worker's tasks ended.
WARM_POLLS = 10


class IdlePolling:
    """The waits between empty polls: ``poll_s`` × 1, 2, 4 — except that after one of
    the worker's tasks ended the next ``warm`` waits are ``poll_s``, since the end of
    a stage (on this worker or a peer) is likely near."""

    def __init__(self, poll_s: float, warm: int = WARM_POLLS) -> None:
        self._backoff = Backoff(poll_s, 4 * poll_s)
        self._poll_s = poll_s
        self._warm = warm
        self._warm_left = 0

    def next_delay(self) -> float:
        if self._warm_left > 0:
            self._warm_left -= 1
            return self._poll_s
        return self._backoff.next_delay()

    def found_work(self) -> None:
        self._backoff.reset()

    def task_ended(self) -> None:
        self._backoff.reset()
        self._warm_left = self._warm


@dataclass
class _Active:
    ctx: TaskContext
    interval_s: float
    next_renew: float
    abandoned: threading.Event = field(default_factory=threading.Event)
    # The outcome is being reported: the scheduler may be recording it right now.
    delivering: bool = False


class Worker:
    """Pulls and runs tasks of one role; ``handlers`` are keyed by stage name."""

    def __init__(
        self,
        settings: Settings,
        role: str,
        handlers: Mapping[str, TaskHandler],
        *,
        worker_id: str | None = None,
        channel: grpc.Channel | None = None,
        client: SchedulerClient | None = None,
    ) -> None:
        if role not in ROLES or role == "scheduler":
            raise InvalidArgumentError(
                f"worker role must be one of {', '.join(r for r in ROLES if r != 'scheduler')}, "
                f"got {role!r}",
                field="role",
            )
        if not handlers:
            raise InvalidArgumentError(
                "a worker needs at least one stage handler", field="handlers"
            )
        self.settings = settings
        self.role = role
        self.handlers = dict(handlers)
        self.worker_id = (
            worker_id
            or settings.worker_id
            or f"{role}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        )
        self._client: SchedulerClient = client or GrpcSchedulerClient(
            settings.scheduler_address,
            channel=channel,
            security=None if channel is not None else ChannelSecurity.from_settings(settings),
        )
        self._timeout = settings.rpc_timeout_seconds
        self._capacity = settings.worker_capacity
        self._lease_s = settings.lease_seconds
        self._poll_s = settings.poll_interval_seconds
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._active: dict[str, _Active] = {}
        # Tasks ended so far: an idle loop leases again at once after one, since its
        # completion may have made the next stage's tasks available.
        self._ended = 0
        # ``_ended`` as the idle loop last saw it.
        self._ended_seen = 0
        self._stop = threading.Event()
        self._hb_stop = threading.Event()
        self._hb_wake = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._hb_thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._completions = CompletionBatcher(
            lambda batch: self._client.complete_many(self.worker_id, batch, timeout=self._timeout)
        )
        self.completed = 0
        self.failed = 0
        self.released = 0

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        """Lease and run tasks in the background until ``stop``."""
        if self._loop_thread is not None:
            return
        self._stop.clear()
        self._executor = ThreadPoolExecutor(self._capacity, thread_name_prefix=f"{self.role}-task")
        self._ensure_heartbeat()
        self._loop_thread = threading.Thread(
            target=self._loop, name=f"{self.role}-worker", daemon=True
        )
        self._loop_thread.start()
        log.info(
            "worker started",
            extra={"worker_id": self.worker_id, "role": self.role, "capacity": self._capacity},
        )

    def stop(self, grace: float) -> None:
        """Stop leasing; tell running tasks (``ctx.stopping``): they finish, or save their
        progress and are given back, within ``grace`` s; what is left is given back then."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        if self._loop_thread is not None:
            self._loop_thread.join()
            self._loop_thread = None
        end = time.monotonic() + max(grace, 0.0)
        with self._changed:
            for active in self._active.values():
                active.ctx.stopping.set()
            while self._active and (remaining := end - time.monotonic()) > 0:
                self._changed.wait(remaining)
            leftover = list(self._active.values())
        for active in leftover:
            active.ctx.cancelled.set()
            active.abandoned.set()
            # Given back, not failed: a worker going away (spot interruption, scale-down)
            # is not the task's fault, so no attempt is counted and no one waits for expiry.
            with contextlib.suppress(Deep3mError):  # else the lease expires instead
                self._client.release(
                    active.ctx.lease.lease_id, self.worker_id, timeout=min(self._timeout, 5.0)
                )
        self._hb_stop.set()
        self._hb_wake.set()
        if self._hb_thread is not None:
            self._hb_thread.join()
            self._hb_thread = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._client.close()
        log.info("worker stopped", extra={"worker_id": self.worker_id, "abandoned": len(leftover)})

    def run_once(self) -> int:
        """Lease what is available now (up to capacity), run it here; returns the count."""
        self._ensure_heartbeat()
        leases = self._lease(self._capacity)
        for lease in leases:
            self._run(self._register(lease))
        return len(leases)

    # -- leasing ----------------------------------------------------------------------
    def _lease(self, max_tasks: int) -> list[common_pb2.TaskLease]:
        return self._client.lease(
            self.worker_id, self.role, max_tasks, self._lease_s, timeout=self._timeout
        )

    def _loop(self) -> None:
        # An empty queue is polled at poll_interval × 1, 2, 4; an unreachable scheduler
        # is retried from twice that up to a couple of seconds.
        idle = IdlePolling(self._poll_s)
        unreachable = Backoff(
            2 * self._poll_s, max(MAX_UNREACHABLE_BACKOFF_S, 2 * self._poll_s), jitter=0.1
        )
        while not self._stop.is_set():
            with self._changed:
                while len(self._active) >= self._capacity and not self._stop.is_set():
                    self._changed.wait()
                free = self._capacity - len(self._active)
            if self._stop.is_set():
                return
            try:
                leases = self._lease(free)
            except Deep3mError as exc:
                if unreachable.attempt == 0:
                    log.warning(
                        "cannot lease tasks: %s", exc.message, extra={"worker_id": self.worker_id}
                    )
                self._stop.wait(unreachable.next_delay())
                continue
            except Exception:  # never let the loop die; the next round retries
                log.exception("lease round failed")
                self._stop.wait(self._poll_s)
                continue
            unreachable.reset()
            if not leases:
                self._wait_idle(idle)
                continue
            idle.found_work()
            executor = self._executor
            for lease in leases:
                active = self._register(lease)
                if executor is None:
                    self._run(active)
                else:
                    executor.submit(self._run, active)

    def _wait_idle(self, idle: IdlePolling) -> None:
        """Wait out an empty queue's backoff, or less: until one of our tasks ends
        (then the polls start over, warm) or ``stop``."""
        with self._changed:
            if self._ended != self._ended_seen:
                idle.task_ended()  # ended while the worker was busy
            ended = self._ended_seen = self._ended
            self._changed.wait_for(
                lambda: self._ended != ended or self._stop.is_set(), timeout=idle.next_delay()
            )
            if self._ended != ended:
                idle.task_ended()
                self._ended_seen = self._ended

    def _register(self, lease: common_pb2.TaskLease) -> _Active:
        remaining = lease.deadline_unix_s - time.time()
        length = min(self._lease_s, remaining) if remaining > 0 else self._lease_s
        interval = max(length / 3.0, MIN_RENEW_INTERVAL_S)
        active = _Active(
            TaskContext(lease, worker_id=self.worker_id, settings=self.settings),
            interval,
            time.monotonic() + interval,
        )
        with self._changed:
            self._active[lease.lease_id] = active
        self._hb_wake.set()
        return active

    # -- running ------------------------------------------------------------------------
    def _run(self, active: _Active) -> None:
        try:
            outcome = self._execute(active.ctx)
            active.delivering = True
            self._deliver(active, outcome)
        except Exception:  # a task thread must never take the worker down
            log.exception("task %s: reporting failed", active.ctx.task.id)
        finally:
            with self._changed:
                self._active.pop(active.ctx.lease.lease_id, None)
                self._ended += 1
                self._changed.notify_all()

    def _execute(self, ctx: TaskContext) -> Outcome:
        return execute(
            self.handlers.get(ctx.task.stage),
            ctx,
            worker=f"worker {self.worker_id} ({self.role})",
            store_retry_s=self.settings.store_retry_seconds,
        )

    def _report(self, ctx: TaskContext, outcome: Outcome) -> None:
        lease_id = ctx.lease.lease_id
        if outcome.release:
            self._client.release(lease_id, self.worker_id, timeout=min(self._timeout, 5.0))
            self.released += 1
            return
        if outcome.complete and outcome.result is not None:
            result = outcome.result
            self._completions.complete((lease_id, result.metrics, result.outputs))
            self.completed += 1
            return
        error = outcome.error or common_pb2.ErrorDetail(code="INTERNAL", task_id=ctx.task.id)
        quarantined = self._client.fail(
            lease_id, self.worker_id, error, outcome.retryable, timeout=self._timeout
        )
        self.failed += 1
        if quarantined and error.code != "CANCELLED":
            log.warning("task %s will not be retried", ctx.task.id, extra={"task_id": ctx.task.id})

    def _deliver(self, active: _Active, outcome: Outcome) -> None:
        """Report the outcome; retries while the scheduler is unreachable."""
        ctx = active.ctx
        give_up = time.monotonic() + max(10 * self._lease_s, 60.0)
        backoff = Backoff(0.2, MAX_UNREACHABLE_BACKOFF_S)
        while not active.abandoned.is_set():
            try:
                self._report(ctx, outcome)
                return
            except Deep3mError as exc:
                if not exc.retryable or time.monotonic() > give_up:
                    # Stale (taken over), cancelled or unknown: nothing more to report.
                    log.info(
                        "task %s: outcome not recorded: %s",
                        ctx.task.id,
                        exc.message,
                        extra={"task_id": ctx.task.id},
                    )
                    return
                active.abandoned.wait(backoff.next_delay())

    # -- heartbeats ----------------------------------------------------------------------
    def _ensure_heartbeat(self) -> None:
        if self._hb_thread is None:
            self._hb_stop.clear()
            self._hb_thread = threading.Thread(
                target=self._heartbeat_loop, name=f"{self.role}-heartbeat", daemon=True
            )
            self._hb_thread.start()

    def _heartbeat_loop(self) -> None:
        while not self._hb_stop.is_set():
            now = time.monotonic()
            with self._lock:
                active = list(self._active.values())
            for a in active:
                if a.next_renew <= now and not a.abandoned.is_set():
                    self._renew(a)
            with self._lock:
                upcoming = [a.next_renew for a in self._active.values() if not a.abandoned.is_set()]
            wait = min(upcoming, default=time.monotonic() + 1.0) - time.monotonic()
            self._hb_wake.wait(min(max(wait, 0.0), 1.0))
            self._hb_wake.clear()

    def _renew(self, active: _Active) -> None:
        ctx = active.ctx
        try:
            _, cancelled = self._client.renew(
                ctx.lease.lease_id,
                self.worker_id,
                ctx.take_progress(),
                timeout=min(self._timeout, max(active.interval_s, 1.0)),
            )
        except Deep3mError as exc:
            if exc.retryable or (active.delivering and not isinstance(exc, CancelledError)):
                # While its completion is being recorded the lease is not renewable; if
                # recording fails (the store is down) the lease is ours again: keep trying.
                active.next_renew = time.monotonic() + min(active.interval_s, 0.5)
                return
            if isinstance(exc, CancelledError):
                ctx.cancelled.set()
                active.next_renew = time.monotonic() + active.interval_s
            else:  # stale: the task was taken over; stop working on it, stop renewing
                ctx.cancelled.set()
                active.next_renew = math.inf
            log.info(
                "task %s: lease renewal refused: %s",
                ctx.task.id,
                exc.message,
                extra={"task_id": ctx.task.id},
            )
            return
        except Exception:  # the heartbeat thread must outlive any one renewal
            log.exception("task %s: lease renewal failed", ctx.task.id)
            active.next_renew = time.monotonic() + min(active.interval_s, 0.5)
            return
        if cancelled:
            ctx.cancelled.set()
        active.next_renew = time.monotonic() + active.interval_s
