"""The worker loop driven against a scheduler in the same process (no sockets).

The same ``Worker`` that talks gRPC in a deployment talks here to
``InProcessSchedulerClient``, which calls the transport-neutral ``Scheduler``
directly: capacity, cancellation through the heartbeat, refusal of a stale
lease, and graceful stop are checked on the real scheduler and queue.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from deep3m.core.errors import (
    CancelledError,
    Deep3mError,
    InvalidArgumentError,
    UnavailableError,
)
from deep3m.core.geometry import grid_cells
from deep3m.core.store import Store
from deep3m.runtime.scheduler_client import Completion
from deep3m.runtime.settings import Settings
from deep3m.runtime.task import CHUNKS_WRITTEN, TaskContext, TaskHandler, TaskResult
from deep3m.runtime.worker import IdlePolling, Worker
from deep3m.scheduler.core import Scheduler
from deep3m.scheduler.inprocess import InProcessSchedulerClient
from deep3m.testing.scheduler import (
    completion_records,
    double_block_metrics,
    predict_spec,
    save_test_model,
    wait_terminal,
    write_volume,
)
from deep3m.v1 import common_pb2

SHAPE = (4, 32, 32)
BLOCK = (1, 32, 32)  # 4 blocks
WAIT_S = 30.0


class Clock:
    """Real time plus an offset the test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Gate:
    """A predict handler that waits at a gate; records how many run at once."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.open = threading.Event()
        self.entered = threading.Semaphore(0)
        self.cancel_seen = threading.Event()
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def __call__(self, ctx: TaskContext) -> TaskResult:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        self.entered.release()
        try:
            while not self.open.wait(0.01):
                if ctx.cancelled.is_set():
                    self.cancel_seen.set()
                    return TaskResult()
            return TaskResult(metrics=double_block_metrics(self.store, ctx.lease))
        finally:
            with self._lock:
                self.running -= 1

    def wait_entered(self, n: int) -> None:
        for _ in range(n):
            assert self.entered.acquire(timeout=WAIT_S), "the handler was not called"


@dataclass
class Env:
    settings: Settings
    store: Store
    scheduler: Scheduler
    clock: Clock

    def worker(self, role: str, handlers: dict[str, TaskHandler], **overrides: object) -> Worker:
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        return Worker(
            settings,
            role,
            handlers,
            worker_id=f"{role}-{id(handlers)}",
            client=InProcessSchedulerClient(self.scheduler),
        )

    def submit(self) -> str:
        return self.scheduler.submit(predict_spec("volumes/out.zarr", block_shape=BLOCK)).id


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    settings = Settings(
        store_url=f"file://{tmp_path}/store",
        lease_seconds=1.0,
        poll_interval_seconds=0.02,
        retry_backoff_seconds=0.01,
        worker_capacity=2,
        metrics_port=0,
    )
    store = Store(settings.store_url)
    write_volume(
        store, "volumes/in.zarr", np.arange(np.prod(SHAPE), dtype=np.uint16).reshape(SHAPE)
    )
    save_test_model(store, "m1")
    clock = Clock()
    scheduler = Scheduler(settings, clock=clock)
    scheduler.recover()
    yield Env(settings, store, scheduler, clock)
    scheduler.stop()


def test_a_worker_runs_no_more_than_its_capacity(env: Env) -> None:
    gate = Gate(env.store)
    inference = env.worker("inference", {"predict": gate})
    finalize = env.worker("postprocess", {"finalize": lambda ctx: TaskResult(outputs={"x": "y"})})
    job_id = env.submit()
    inference.start()
    finalize.start()
    try:
        gate.wait_entered(2)
        # Two held, two left: the loop waits for a free slot instead of leasing more.
        assert env.scheduler.queue_stats()["inference"] == (2, 2)
        gate.open.set()
        event = wait_terminal(env.scheduler, job_id)
    finally:
        inference.stop(grace=5.0)
        finalize.stop(grace=5.0)
    assert event.state == "SUCCEEDED", event
    assert gate.most == 2 and inference.completed == 4
    out = env.store.open_volume("volumes/out.zarr")[:]
    np.testing.assert_array_equal(out, env.store.open_volume("volumes/in.zarr")[:] * 2.0)
    assert env.scheduler.get(job_id).outputs["x"] == "y"


def test_cancelling_the_job_reaches_running_tasks_through_the_heartbeat(env: Env) -> None:
    gate = Gate(env.store)
    worker = env.worker("inference", {"predict": gate}, worker_capacity=1)
    job_id = env.submit()
    worker.start()
    try:
        gate.wait_entered(1)
        env.scheduler.cancel(job_id)
        assert gate.cancel_seen.wait(WAIT_S), "the running task never heard of the cancel"
    finally:
        worker.stop(grace=5.0)
    assert env.scheduler.get(job_id).state == "CANCELLED"
    assert worker.completed == 0
    assert env.scheduler.queue_stats()["inference"] == (0, 0)


def test_a_lease_taken_over_is_refused_and_its_result_not_counted(env: Env) -> None:
    gate = Gate(env.store)
    # Long leases: the worker does not renew during the test, so only the clock expires it.
    worker = env.worker("inference", {"predict": gate}, worker_capacity=1, lease_seconds=60.0)
    job_id = env.submit()
    worker.start()
    gate.wait_entered(1)
    env.clock.offset += 120.0
    assert env.scheduler.expire_leases() == 1
    (grant,) = env.scheduler.lease("other", "inference", 1)
    gate.open.set()
    worker.stop(grace=10.0)  # returns once the in-flight task has tried to report
    assert worker.completed == 0
    stage = env.scheduler.get(job_id).stages[0]
    assert (stage.tasks_done, stage.tasks_leased) == (0, 1)
    assert grant.task.block is not None
    cells = grid_cells(grant.task.block.core, grant.volumes["output"].grid)
    env.scheduler.complete(grant.lease_id, "other", {"voxels": 1.0, CHUNKS_WRITTEN: cells})
    assert env.scheduler.get(job_id).stages[0].tasks_done == 1


def two_in_flight(env: Env) -> tuple[Gate, Worker, str]:
    """A worker of capacity 2 holding two gated tasks of a fresh 4-task job."""
    gate = Gate(env.store)
    worker = env.worker("inference", {"predict": gate})
    job_id = env.submit()
    worker.start()
    gate.wait_entered(2)
    return gate, worker, job_id


def test_stop_lets_running_tasks_finish_within_the_grace(env: Env) -> None:
    gate, worker, job_id = two_in_flight(env)
    gate.open.set()
    worker.stop(grace=10.0)
    stage = env.scheduler.get(job_id).stages[0]
    # Every task it leased was completed before stop returned; none is left held.
    assert (stage.tasks_done, stage.tasks_leased) == (worker.completed, 0)
    assert worker.completed >= 2


def test_stop_releases_tasks_that_outlast_the_grace(env: Env) -> None:
    gate, worker, job_id = two_in_flight(env)
    worker.stop(grace=0.05)
    assert gate.cancel_seen.wait(WAIT_S), "the abandoned tasks were not told to stop"
    # Handed back at once (retryable), not left to expire: all four can be leased again.
    assert env.scheduler.queue_stats()["inference"] == (4, 0)
    assert env.scheduler.get(job_id).stages[0].tasks_done == 0
    env.clock.offset += 10.0  # past the retry backoff
    assert len(env.scheduler.lease("other", "inference", 4)) == 4


def test_stop_gives_back_tasks_that_saved_their_progress_without_an_attempt(env: Env) -> None:
    """A handler that can save its progress is told the worker is stopping, saves and
    raises CancelledError: its task is given back at once, not failed, within the grace."""
    entered = threading.Semaphore(0)
    saved: list[str] = []

    def saver(ctx: TaskContext) -> TaskResult:
        entered.release()
        while not ctx.stopping.wait(0.01):
            assert not ctx.cancelled.is_set(), "stopping is not cancelling"
        assert ctx.interrupted.is_set()
        saved.append(ctx.task.id)
        raise CancelledError(f"{ctx.task.id} saved; it resumes from there")

    worker = env.worker("inference", {"predict": saver})
    job_id = env.submit()
    worker.start()
    for _ in range(2):
        assert entered.acquire(timeout=WAIT_S), "the handler was not called"
    started = time.monotonic()
    worker.stop(grace=60.0)
    assert time.monotonic() - started < 30.0, "stop waited out the grace"
    assert len(saved) == 2
    assert (worker.released, worker.failed, worker.completed) == (2, 0, 0)
    assert env.scheduler.queue_stats()["inference"] == (4, 0)
    # No retry backoff and no attempt counted: leased again at once, still first attempts.
    again = env.scheduler.lease("other", "inference", 4)
    assert len(again) == 4 and {lease.attempt for lease in again} == {1}
    assert env.scheduler.get(job_id).stages[0].tasks_done == 0


def test_a_worker_refuses_a_scheduler_role_and_empty_handlers(env: Env) -> None:
    client = InProcessSchedulerClient(env.scheduler)
    with pytest.raises(InvalidArgumentError) as err:
        Worker(env.settings, "scheduler", {"x": lambda ctx: TaskResult()}, client=client)
    assert err.value.field == "role"
    with pytest.raises(InvalidArgumentError) as err:
        Worker(env.settings, "inference", {}, client=client)
    assert err.value.field == "handlers"


def test_run_once_drives_a_whole_job_in_the_calling_thread(env: Env) -> None:
    """The serial driver: lease what there is, run it here, report; no loop threads."""
    seen: list[str] = []

    def predict(ctx: TaskContext) -> TaskResult:
        seen.append(threading.current_thread().name)
        return TaskResult(metrics=double_block_metrics(env.store, ctx.lease))

    inference = env.worker("inference", {"predict": predict}, worker_capacity=4)
    postprocess = env.worker("postprocess", {"finalize": lambda ctx: TaskResult()})
    job_id = env.submit()
    try:
        assert inference.run_once() == 4
        assert inference.run_once() == 0  # nothing left for this role
        assert postprocess.run_once() == 1
    finally:
        inference.stop(grace=1.0)
        postprocess.stop(grace=1.0)
    assert seen == [threading.current_thread().name] * 4
    assert env.scheduler.get(job_id).state == "SUCCEEDED"
    np.testing.assert_array_equal(
        env.store.open_volume("volumes/out.zarr")[:],
        env.store.open_volume("volumes/in.zarr")[:] * 2.0,
    )


def test_completions_finishing_while_one_is_sent_go_together_in_the_next_call() -> None:
    from deep3m.core.errors import FailedPreconditionError
    from deep3m.runtime.batching import CompletionBatcher

    calls: list[list[str]] = []
    first_sent = threading.Event()
    release_first = threading.Event()

    def send(batch: Sequence[Completion]) -> list[Deep3mError | None]:
        calls.append([lease_id for lease_id, _, _ in batch])
        if len(calls) == 1:
            first_sent.set()
            assert release_first.wait(WAIT_S)
        return [FailedPreconditionError("stale") if lid == "stale" else None for lid in calls[-1]]

    batcher = CompletionBatcher(send)
    errors: dict[str, BaseException] = {}

    def complete(lease_id: str) -> None:
        try:
            batcher.complete((lease_id, {}, {}))
        except Deep3mError as exc:
            errors[lease_id] = exc

    first = threading.Thread(target=complete, args=("a",))
    first.start()
    assert first_sent.wait(WAIT_S)
    rest = [threading.Thread(target=complete, args=(x,)) for x in ("b", "stale", "c")]
    for t in rest:
        t.start()
    # All three are queued behind the call in flight before it returns.
    deadline = time.monotonic() + WAIT_S
    while len(batcher._waiting) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    release_first.set()
    for t in (first, *rest):
        t.join(WAIT_S)
    assert calls[0] == ["a"]
    assert sorted(calls[1]) == ["b", "c", "stale"] and len(calls) == 2
    assert list(errors) == ["stale"] and isinstance(errors["stale"], FailedPreconditionError)


class HungHeartbeats(InProcessSchedulerClient):
    """A worker's client whose renewals never reach the scheduler (a hung worker)."""

    def __init__(self, scheduler: Scheduler) -> None:
        super().__init__(scheduler)
        self.unblock = threading.Event()

    def renew(self, *args: object, **kwargs: object) -> tuple[float, bool]:
        self.unblock.wait(WAIT_S)
        raise UnavailableError("heartbeats hung", field="address")


def test_a_hung_worker_loses_its_task_and_its_late_completion_is_refused(env: Env) -> None:
    gate = Gate(env.store)
    client = HungHeartbeats(env.scheduler)
    hung = Worker(env.settings, "inference", {"predict": gate}, worker_id="hung", client=client)
    job_id = env.submit()
    env.scheduler.start()  # the reaper expires the lease that is never renewed
    hung.start()
    try:
        gate.wait_entered(2)
        taken: dict[str, tuple[str, float]] = {}
        deadline = time.monotonic() + WAIT_S
        while len(taken) < 4 and time.monotonic() < deadline:  # two fresh, two taken over
            env.scheduler.expire_leases()
            for g in env.scheduler.lease("other", "inference", 4, lease_seconds=60.0):
                assert g.task.block is not None
                cells = grid_cells(g.task.block.core, g.volumes["output"].grid)
                taken[g.task.id] = (g.lease_id, float(cells))
        assert len(taken) == 4
        gate.open.set()
    finally:
        client.unblock.set()
        hung.stop(grace=10.0)
    assert hung.completed == 0  # both completions came too late and were refused
    assert env.scheduler.get(job_id).stages[0].tasks_done == 0
    outcomes = env.scheduler.complete_many(
        "other", [(lid, {CHUNKS_WRITTEN: cells}, {}) for lid, cells in taken.values()]
    )
    assert outcomes == [None] * 4
    assert env.scheduler.get(job_id).stages[0].tasks_done == 4


def test_a_store_outage_in_a_task_is_waited_out_without_spending_attempts(env: Env) -> None:
    """A handler meeting an unreachable store runs again with backoff on the same lease;
    a bad-input error is not retried that way."""
    calls: dict[str, int] = {}

    def predict(ctx: TaskContext) -> TaskResult:
        calls[ctx.task.id] = calls.get(ctx.task.id, 0) + 1
        # The first block fails as often as max_attempts (3) allows in all.
        if ctx.task.id.endswith("b0-0-0") and calls[ctx.task.id] <= 3:
            raise OSError("s3 down") from ConnectionRefusedError(111, "Connect call failed")
        return TaskResult(metrics=double_block_metrics(env.store, ctx.lease))

    inference = env.worker("inference", {"predict": predict}, worker_capacity=1)
    postprocess = env.worker("postprocess", {"finalize": lambda ctx: TaskResult()})
    job_id = env.submit()
    try:
        assert sum(inference.run_once() for _ in range(5)) == 4
        assert postprocess.run_once() == 1
    finally:
        inference.stop(grace=1.0)
        postprocess.stop(grace=1.0)
    assert sorted(calls.values()) == [1, 1, 1, 4]
    view = env.scheduler.get(job_id)
    assert view.state == "SUCCEEDED" and not view.errors
    attempts = {r["attempt"] for r in completion_records(env.store, job_id, "predict").values()}
    assert attempts == {1}

    def bad(ctx: TaskContext) -> TaskResult:
        calls["bad"] = calls.get("bad", 0) + 1
        raise InvalidArgumentError("no such channel", field="spec.channel")

    worker = env.worker("inference", {"predict": bad})
    second = env.scheduler.submit(predict_spec("volumes/out2.zarr", block_shape=BLOCK)).id
    try:
        worker.run_once()
    finally:
        worker.stop(grace=1.0)
    assert calls["bad"] == 2  # once per task leased (capacity 2), never again in place
    assert env.scheduler.get(second).stages[0].tasks_quarantined == 2


class EmptyLeaseSignal(InProcessSchedulerClient):
    """Sets ``idle`` whenever a lease call finds nothing to do."""

    def __init__(self, scheduler: Scheduler) -> None:
        super().__init__(scheduler)
        self.idle = threading.Event()

    def lease(
        self, worker_id: str, role: str, max_tasks: int, lease_seconds: float, *, timeout: float
    ) -> list[common_pb2.TaskLease]:
        grants = super().lease(worker_id, role, max_tasks, lease_seconds, timeout=timeout)
        if not grants:
            self.idle.set()
        return grants


def test_an_idle_worker_leases_again_as_soon_as_one_of_its_tasks_ends(env: Env) -> None:
    # A poll interval far beyond the wait: only a task's end can end the idle wait in time.
    settings = env.settings.model_copy(update={"poll_interval_seconds": 600.0})
    client = EmptyLeaseSignal(env.scheduler)
    gate = Gate(env.store)
    worker = Worker(settings, "inference", {"predict": gate}, worker_id="w", client=client)
    first = env.scheduler.submit(predict_spec("volumes/out.zarr", block_shape=SHAPE)).id
    worker.start()
    try:
        gate.wait_entered(1)
        assert client.idle.wait(WAIT_S), "the free slot never found the queue empty"
        second = env.scheduler.submit(predict_spec("volumes/out2.zarr", block_shape=SHAPE)).id
        gate.open.set()
        gate.wait_entered(1)  # leased at once, not after the 600 s backoff
    finally:
        worker.stop(grace=5.0)
    assert worker.completed == 2
    assert env.scheduler.get(first).stages[0].tasks_done == 1
    assert env.scheduler.get(second).stages[0].tasks_done == 1


def test_idle_polls_stay_at_the_base_interval_for_a_while_after_a_task_ends() -> None:
    polls = IdlePolling(0.5, warm=3)
    # Idle from the start: backing off at once, up to 4 x the interval.
    assert [polls.next_delay() for _ in range(4)] == [0.5, 1.0, 2.0, 2.0]
    polls.task_ended()
    # A peer may end the stage any moment: a few polls at the base interval first.
    assert [polls.next_delay() for _ in range(6)] == [0.5, 0.5, 0.5, 0.5, 1.0, 2.0]
    polls.found_work()
    assert [polls.next_delay() for _ in range(2)] == [0.5, 1.0]
