"""The scheduler over real gRPC on loopback, with the real client and real workers.

The workers run test handlers registered for the ``predict`` and ``finalize``
stages: a predict task writes ``2 * input`` into its block's core of the
output volume, exactly as the inference role writes probabilities.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from deep3m.client.client import Deep3mClient
from deep3m.core.errors import (
    AlreadyExistsError,
    CancelledError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from deep3m.core.events import ProgressEvent
from deep3m.core.store import Store
from deep3m.runtime.rpc_errors import from_rpc_error
from deep3m.runtime.server import RunningServer, create_server
from deep3m.runtime.settings import Settings
from deep3m.runtime.task import CHUNKS_WRITTEN, TaskContext, TaskHandler, TaskResult
from deep3m.runtime.worker import Worker
from deep3m.scheduler.app import SchedulerApp
from deep3m.scheduler.core import Scheduler
from deep3m.scheduler.persistence import JobStore
from deep3m.testing.clock import ManualClock
from deep3m.testing.scheduler import (
    double_block_metrics,
    lease_cells,
    save_test_model,
    write_volume,
)
from deep3m.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from prometheus_client import REGISTRY

SHAPE = (6, 64, 64)
BLOCK = [2, 32, 32]  # 3 x 2 x 2 = 12 blocks
N_BLOCKS = 12
WAIT_S = 60.0


class DoubleBlocks:
    """The test's predict handler: output core = 2 * input core; counts calls per task."""

    def __init__(self, store: Store, before: Callable[[TaskContext], None] | None = None) -> None:
        self.store = store
        self.before = before
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, ctx: TaskContext) -> TaskResult:
        with self._lock:
            self.calls[ctx.task.id] += 1
        if self.before is not None:
            self.before(ctx)
        return TaskResult(metrics=double_block_metrics(self.store, ctx.lease))


def finalize(ctx: TaskContext) -> TaskResult:
    return TaskResult(metrics={"finalized": 1.0}, outputs={"summary": ctx.task.job_id})


@dataclass
class Env:
    settings: Settings
    store: Store
    server: RunningServer
    scheduler: Scheduler
    client: Deep3mClient
    data: np.ndarray
    workers: list[Worker]

    def worker(
        self,
        role: str,
        handlers: dict[str, TaskHandler],
        *,
        start: bool = True,
        **overrides: object,
    ) -> Worker:
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        w = Worker(settings, role, handlers, worker_id=f"{role}-{len(self.workers)}")
        self.workers.append(w)
        if start:
            w.start()
        return w


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = dict(
        store_url=f"file://{tmp_path}/store",
        lease_seconds=1.5,
        retry_backoff_seconds=0.05,
        poll_interval_seconds=0.05,
        rpc_timeout_seconds=10.0,
        host="127.0.0.1",
        metrics_port=0,
    )
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from start_env(tmp_path)


def start_env(tmp_path: Path, clock: Callable[[], float] | None = None) -> Iterator[Env]:
    settings = make_settings(tmp_path)
    store = Store(settings.store_url)
    data = np.random.default_rng(0).integers(0, 200, SHAPE, dtype=np.uint8)
    write_volume(store, "volumes/in.zarr", data)
    save_test_model(store, "m1")
    scheduler = Scheduler(settings, clock=clock) if clock else Scheduler(settings)
    scheduler.recover()
    server = create_server(
        "scheduler", settings, app=SchedulerApp(settings, scheduler), port=0, host="127.0.0.1"
    )
    settings = settings.model_copy(update={"scheduler_address": server.address})
    client = Deep3mClient(server.address, timeout_s=10.0)
    env = Env(settings, store, server, scheduler, client, data, [])
    try:
        yield env
    finally:
        for w in env.workers:
            w.stop(grace=2.0)
        client.close()
        server.stop(grace=1.0)


def submit(env: Env, output: str = "volumes/out.zarr", max_attempts: int = 0) -> str:
    job = env.client.predict(
        "volumes/in.zarr",
        "m1",
        output,
        block_shape=BLOCK,
        halo=[0, 4, 4],
        max_attempts=max_attempts,
    )
    return job.id


class Watcher:
    """Collects a job's events in a thread; ``started`` once the stream is open."""

    def __init__(
        self,
        client: Deep3mClient,
        job_id: str,
        on_event: Callable[[ProgressEvent], None] | None = None,
    ) -> None:
        self.events: list[ProgressEvent] = []
        self.started = threading.Event()
        self._client, self._job_id, self._on_event = client, job_id, on_event
        self._thread = threading.Thread(target=self._run)
        self._thread.start()
        assert self.started.wait(WAIT_S)

    def _run(self) -> None:
        for event in self._client.watch(self._job_id, timeout_s=WAIT_S):
            self.events.append(event)
            self.started.set()
            if self._on_event is not None:
                self._on_event(event)

    def join(self) -> list[ProgressEvent]:
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive()
        return self.events


def metric(name: str, role: str) -> float:
    return REGISTRY.get_sample_value(name, {"role": role}) or 0.0


def test_predict_job_runs_to_completion_and_streams_progress(env: Env) -> None:
    handler = DoubleBlocks(env.store)
    completed_before = metric("deep3m_tasks_completed_total", "inference")
    voxels_before = metric("deep3m_voxels_processed_total", "inference")
    job_id = submit(env)
    assert env.client.queue_stats()["inference"] == {"pending": N_BLOCKS, "leased": 0}
    watcher = Watcher(env.client, job_id)  # subscribed before any work starts
    env.worker("inference", {"predict": handler})
    env.worker("postprocess", {"finalize": finalize})
    events = watcher.join()

    assert events[0].message == "current state"
    assert events[-1].state == "SUCCEEDED" and events[-1].terminal
    predict_done = [e.tasks_done for e in events if e.stage == "predict"]
    assert predict_done == sorted(predict_done) and predict_done[-1] == N_BLOCKS
    assert {e.task_id for e in events if e.stage == "predict" and e.task_id} == set(handler.calls)
    assert any(e.voxels_per_second > 0 for e in events)
    assert any(e.stage == "finalize" for e in events)
    assert [e.state for e in events].count("RUNNING") >= 1

    job = env.client.get(job_id)
    assert job.state == common_pb2.JOB_STATE_SUCCEEDED
    assert job.spec.WhichOneof("kind") == "predict"
    assert [(s.name, s.role, s.tasks_done, s.tasks_total) for s in job.stages] == [
        ("predict", "inference", N_BLOCKS, N_BLOCKS),
        ("finalize", "postprocess", 1, 1),
    ]
    assert job.outputs["summary"] == job_id
    assert job.outputs["probabilities"].endswith("volumes/out.zarr")
    assert job.metrics["voxels"] == float(np.prod(SHAPE))
    assert job.metrics["finalized"] == 1.0
    assert sorted(handler.calls.values()) == [1] * N_BLOCKS
    out = env.store.open_volume("volumes/out.zarr")  # complete, or this raises
    np.testing.assert_array_equal(out[...], env.data.astype(np.float32) * 2)
    assert metric("deep3m_tasks_completed_total", "inference") - completed_before == N_BLOCKS
    assert metric("deep3m_voxels_processed_total", "inference") - voxels_before == np.prod(SHAPE)
    assert env.client.queue_stats()["inference"] == {"pending": 0, "leased": 0}
    assert [j.id for j in env.client.jobs(states=["SUCCEEDED"])] == [job_id]
    assert env.client.jobs(states=["RUNNING"]) == []
    # The job's records are in the store: spec, a record of every block, the result.
    assert JobStore(env.store).done_tasks(job_id, "predict").tolist() == list(range(N_BLOCKS))
    assert env.store.read_json(f"jobs/{job_id}/result.json")["state"] == "SUCCEEDED"


def test_cancel_reaches_a_running_handler(env: Env) -> None:
    started, observed = threading.Event(), threading.Event()

    def wait_for_cancel(ctx: TaskContext) -> TaskResult:
        started.set()
        if ctx.cancelled.wait(WAIT_S):  # set by the heartbeat's renew reply
            observed.set()
            raise CancelledError("stopped on request")
        return TaskResult()

    job_id = submit(env)
    env.worker("inference", {"predict": wait_for_cancel})
    assert started.wait(WAIT_S)
    job = env.client.cancel(job_id)
    assert job.state == common_pb2.JOB_STATE_CANCELLED
    assert observed.wait(WAIT_S), "the running handler never saw the cancellation"
    assert env.client.queue_stats()["inference"]["pending"] == 0
    assert env.store.exists(f"jobs/{job_id}/cancelled")
    assert env.client.cancel(job_id).state == common_pb2.JOB_STATE_CANCELLED  # idempotent
    events = list(env.client.watch(job_id, timeout_s=5))
    assert [e.state for e in events] == ["CANCELLED"]


def test_failing_blocks_are_quarantined_and_the_job_fails_naming_them(env: Env) -> None:
    def fail_some(ctx: TaskContext) -> None:
        if ctx.task.id == "predict/b0-1-0":
            raise RuntimeError("boom in b0-1-0")
        if ctx.task.id == "predict/b1-0-1":
            raise InvalidArgumentError("corrupt block", field="input")

    handler = DoubleBlocks(env.store, before=fail_some)
    retries_before = metric("deep3m_task_retries_total", "inference")
    quarantined_before = metric("deep3m_tasks_quarantined_total", "inference")
    job_id = submit(env, max_attempts=2)
    env.worker("inference", {"predict": handler}, worker_capacity=2)
    job = env.client.wait(job_id, WAIT_S)

    assert job.state == common_pb2.JOB_STATE_FAILED
    errors = {e.task_id: e for e in job.errors}
    assert set(errors) == {"predict/b0-1-0", "predict/b1-0-1"}
    assert "RuntimeError: boom in b0-1-0" in errors["predict/b0-1-0"].message
    assert errors["predict/b1-0-1"].code == "INVALID_ARGUMENT"
    assert handler.calls["predict/b0-1-0"] == 2  # retried once, then quarantined
    assert handler.calls["predict/b1-0-1"] == 1  # not retryable: at once
    assert all(n == 1 for t, n in handler.calls.items() if t not in errors)
    stage = job.stages[0]
    assert (stage.tasks_done, stage.tasks_quarantined) == (N_BLOCKS - 2, 2)
    assert job.stages[1].tasks_total == 0  # finalize never planned
    assert metric("deep3m_task_retries_total", "inference") - retries_before == 1
    assert metric("deep3m_tasks_quarantined_total", "inference") - quarantined_before == 2
    final = list(env.client.watch(job_id, timeout_s=5))[-1]
    assert final.state == "FAILED" and "predict/b0-1-0" in final.error
    with pytest.raises(Exception, match="incomplete"):
        env.store.open_volume("volumes/out.zarr")  # never marked complete


def test_progress_reported_by_a_handler_reaches_watchers(env: Env) -> None:
    seen = threading.Event()

    def long_task(ctx: TaskContext) -> TaskResult:
        ctx.report({"iteration": 5.0, "loss": 0.25}, "iteration 5")
        assert seen.wait(WAIT_S)  # the watcher saw it through the next heartbeat
        return TaskResult(metrics=double_block_metrics(env.store, ctx.lease))

    def on_event(event: ProgressEvent) -> None:
        if event.metrics.get("iteration") == 5.0:
            seen.set()

    job_id = submit(env)
    watcher = Watcher(env.client, job_id, on_event)
    env.worker("inference", {"predict": long_task}, worker_capacity=1)
    env.worker("postprocess", {"finalize": finalize})
    assert env.client.wait(job_id, WAIT_S).state == common_pb2.JOB_STATE_SUCCEEDED
    reports = [e for e in watcher.join() if e.metrics.get("loss") == 0.25]
    assert reports and reports[0].message == "iteration 5" and reports[0].task_id


def test_bad_requests_get_clear_status_codes(env: Env) -> None:
    c = env.client
    with pytest.raises(NotFoundError, match="model 'ghost' not found") as err:
        c.predict("volumes/in.zarr", "ghost", "volumes/x.zarr")
    assert err.value.field == "model"
    with pytest.raises(NotFoundError, match=r"missing\.zarr") as missing:
        c.predict("volumes/missing.zarr", "m1", "volumes/x.zarr")
    assert missing.value.field == "input"
    write_volume(env.store, "volumes/taken.zarr", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(AlreadyExistsError, match=r"volumes/taken\.zarr") as taken:
        c.predict("volumes/in.zarr", "m1", "volumes/taken.zarr")
    assert taken.value.field == "output"
    with pytest.raises(InvalidArgumentError, match="halo") as halo:
        c.predict("volumes/in.zarr", "m1", "volumes/x.zarr", halo=[-1, 0, 0])
    assert halo.value.field == "halo"
    with pytest.raises(NotFoundError):
        c.get("no-such-job")
    with pytest.raises(InvalidArgumentError, match="job id"):
        c.get("../etc")
    # Nothing half-written: no job records, no output volume.
    assert env.store.list("jobs") == []
    assert not env.store.exists("volumes/x.zarr")

    first = c.predict("volumes/in.zarr", "m1", "volumes/x.zarr", job_id="mine")
    assert c.predict("volumes/in.zarr", "m1", "volumes/x.zarr", job_id="mine").id == first.id
    with pytest.raises(AlreadyExistsError, match="different spec"):
        c.predict("volumes/in.zarr", "m1", "volumes/x.zarr", job_id="mine", tta_level=1)

    stub = scheduler_pb2_grpc.SchedulerStub(grpc.insecure_channel(env.server.address))
    with pytest.raises(grpc.RpcError) as rpc:
        stub.CompleteTask(
            scheduler_pb2.CompleteTaskRequest(lease_id="x:1:mine:predict:0", worker_id="w"),
            timeout=5,
        )
    assert rpc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert isinstance(from_rpc_error(rpc.value), FailedPreconditionError)
    with pytest.raises(grpc.RpcError) as rpc:
        stub.LeaseTasks(scheduler_pb2.LeaseTasksRequest(worker_id="w", role="gpu"), timeout=5)
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown worker role 'gpu'" in (rpc.value.details() or "")


def test_submit_job_refuses_a_training_job_the_stack_cannot_feed(env: Env) -> None:
    write_volume(env.store, "volumes/s4.zarr", np.zeros((4, 64, 64), np.uint8))
    write_volume(env.store, "volumes/s4-labels.zarr", np.ones((4, 64, 64), np.uint8))
    spec = common_pb2.JobSpec(
        train=common_pb2.TrainSpec(
            images=common_pb2.VolumeRef(path="volumes/s4.zarr"),
            labels=common_pb2.VolumeRef(path="volumes/s4-labels.zarr"),
            model="new",
        )
    )
    stub = scheduler_pb2_grpc.SchedulerStub(grpc.insecure_channel(env.server.address))
    with pytest.raises(grpc.RpcError) as rpc:
        stub.SubmitJob(scheduler_pb2.SubmitJobRequest(spec=spec), timeout=10)
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(rpc.value)
    assert error.field == "members" and "--members 1fm,3fm" in error.message
    spec.train.learning_rate = float("nan")
    spec.train.members.extend(["1fm", "3fm"])
    with pytest.raises(InvalidArgumentError) as err:
        env.client.submit(spec)
    assert err.value.field == "learning_rate"
    assert env.store.list("jobs") == []
    # A patch larger than the image is clipped, and the job says so.
    spec.train.learning_rate = 0.0
    spec.train.patch_shape.extend([320, 320])
    job = env.client.submit(spec, job_id="clipped")
    assert list(job.spec.train.patch_shape) == [64, 64]
    (note,) = job.notes
    assert "clipped to the image" in note
    assert list(env.client.get("clipped").notes) == [note]


def test_a_stale_completion_never_overwrites_the_newer_one(tmp_path: Path) -> None:
    clock = ManualClock()
    for env in start_env(tmp_path, clock):
        job_id = submit(env)
        stub = scheduler_pb2_grpc.SchedulerStub(grpc.insecure_channel(env.server.address))

        def lease(
            worker: str, stub: scheduler_pb2_grpc.SchedulerStub = stub
        ) -> common_pb2.TaskLease:
            reply = stub.LeaseTasks(
                scheduler_pb2.LeaseTasksRequest(
                    worker_id=worker, role="inference", max_tasks=1, lease_seconds=1.5
                ),
                timeout=5,
            )
            (only,) = reply.leases
            return only

        old = lease("slow")
        assert old.task.id == "predict/b0-0-0" and old.task.attempt == 1
        clock.now += 2.0  # past the deadline
        assert env.scheduler.expire_leases() == 1
        new = lease("fast")
        assert new.task.id == old.task.id and new.task.attempt == 2
        with pytest.raises(grpc.RpcError) as rpc:
            stub.CompleteTask(
                scheduler_pb2.CompleteTaskRequest(
                    lease_id=old.lease_id, worker_id="slow", metrics={"voxels": 1.0}
                ),
                timeout=5,
            )
        assert rpc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "stale lease" in (rpc.value.details() or "")
        renew = stub.RenewLease(
            scheduler_pb2.RenewLeaseRequest(lease_id=new.lease_id, worker_id="fast"), timeout=5
        )
        assert renew.deadline_unix_s == clock.now + 1.5 and not renew.cancelled
        stub.CompleteTask(
            scheduler_pb2.CompleteTaskRequest(
                lease_id=new.lease_id,
                worker_id="fast",
                metrics={"voxels": 7.0, CHUNKS_WRITTEN: lease_cells(new)},
            ),
            timeout=5,
        )
        record = env.store.read_bytes(f"jobs/{job_id}/done/predict/0")
        assert b'"worker_id": "fast"' in record
        stage = env.client.get(job_id).stages[0]
        assert (stage.tasks_done, stage.tasks_leased) == (1, 0)


def test_watch_ends_when_the_server_stops(env: Env) -> None:
    job_id = submit(env)
    first = threading.Event()
    ended: list[BaseException | None] = []

    def watch() -> None:
        try:
            for _ in env.client.watch(job_id, timeout_s=WAIT_S):
                first.set()
            ended.append(None)
        except Exception as exc:  # the stream may end with UNAVAILABLE
            ended.append(exc)

    t = threading.Thread(target=watch)
    t.start()
    assert first.wait(WAIT_S)
    env.server.stop(grace=1.0)
    t.join(WAIT_S)
    assert not t.is_alive() and len(ended) == 1
    assert not isinstance(ended[0], TimeoutError)


def test_run_once_leases_what_is_there(env: Env) -> None:
    handler = DoubleBlocks(env.store)
    worker = env.worker("inference", {"predict": handler}, start=False, worker_capacity=5)
    assert worker.run_once() == 0
    job_id = submit(env)
    assert worker.run_once() == 5
    assert sum(handler.calls.values()) == 5
    stage = env.client.get(job_id).stages[0]
    assert (stage.tasks_done, stage.tasks_leased) == (5, 0)


def test_stopping_a_worker_hands_unfinished_tasks_back(env: Env) -> None:
    started, release = threading.Event(), threading.Event()

    def stuck(ctx: TaskContext) -> TaskResult:
        started.set()
        release.wait(WAIT_S)
        return TaskResult()

    job_id = submit(env)
    worker = env.worker("inference", {"predict": stuck}, worker_capacity=1)
    assert started.wait(WAIT_S)
    worker.stop(grace=0.2)
    release.set()
    stage = env.client.get(job_id).stages[0]
    assert (stage.tasks_leased, stage.tasks_done) == (0, 0)
    assert env.client.queue_stats()["inference"]["pending"] == N_BLOCKS
    # Given back, not failed: no attempt counted, leasable again at once (no backoff).
    assert env.scheduler.queue.attempts(job_id, "predict", 0) == 0
    (again,) = env.scheduler.lease("next", "inference", 1)
    assert again.task.id == "predict/b0-0-0"
