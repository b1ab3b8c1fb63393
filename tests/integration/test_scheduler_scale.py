"""The scheduler under load and at scale: batched completions, no store I/O under its
lock, watchers that cannot starve unary calls, recovery behind a NOT_SERVING port,
and the index of finished jobs with its retention."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from deep3m.core.errors import FailedPreconditionError, UnavailableError
from deep3m.core.geometry import grid_cells
from deep3m.core.store import FileStore, Store
from deep3m.launcher.local import free_port
from deep3m.runtime.interceptor import ErrorMappingInterceptor
from deep3m.runtime.scheduler_client import GrpcSchedulerClient
from deep3m.runtime.server import create_server
from deep3m.runtime.settings import Settings
from deep3m.runtime.task import CHUNKS_WRITTEN
from deep3m.scheduler.app import SchedulerApp
from deep3m.scheduler.app import build as build_scheduler
from deep3m.scheduler.core import Scheduler
from deep3m.scheduler.persistence import FINISHED_KEY, JobStore
from deep3m.scheduler.service import SchedulerServicer
from deep3m.testing.clock import ManualClock
from deep3m.testing.scheduler import (
    lease_cells,
    predict_spec,
    save_test_model,
    write_volume,
)
from deep3m.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SHAPE = (4, 32, 32)
BLOCK = [1, 16, 16]  # 4 x 2 x 2 = 16 blocks
N_BLOCKS = 16
WAIT_S = 30.0


class GatedStore(FileStore):
    """A real file store whose writes (or reads) of keys containing ``key_part`` wait
    at a gate; ``entered`` is set when one is waiting."""

    def __init__(self, url: str, key_part: str = "", *, reads: bool = False) -> None:
        super().__init__(url)
        self.key_part = key_part
        self.reads = reads
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail_writes = False

    def _wait(self, key: str) -> None:
        if self.key_part and self.key_part in key and not self.gate.is_set():
            self.entered.set()
            assert self.gate.wait(WAIT_S), "the gate never opened"

    def write_bytes(self, key: str, data: bytes) -> None:
        if self.fail_writes and "/done/" in key:
            raise OSError("the store refused the write")
        if not self.reads:
            self._wait(key)
        super().write_bytes(key, data)

    def read_bytes(self, key: str) -> bytes:
        if self.reads:
            self._wait(key)
        return super().read_bytes(key)


def owned(grant: Any, voxels: float | None = None) -> dict[str, float]:
    """Completion metrics of a predict task: the chunks its block owns (checked)."""
    if not isinstance(grant, common_pb2.TaskLease) and grant.task.block is None:
        return {} if voxels is None else {"voxels": voxels}  # not a block task
    cells = (
        lease_cells(grant)
        if isinstance(grant, common_pb2.TaskLease)
        else float(grid_cells(grant.task.block.core, grant.volumes["output"].grid))
    )
    return {CHUNKS_WRITTEN: cells, **({"voxels": voxels} if voxels is not None else {})}


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        store_url=f"file://{tmp_path}/store",
        lease_seconds=30.0,
        retry_backoff_seconds=0.01,
        metrics_port=0,
        host="127.0.0.1",
    )
    values.update(overrides)
    return Settings(**values)


def prepare(settings: Settings) -> None:
    store = Store(settings.store_url)
    data = np.arange(np.prod(SHAPE), dtype=np.uint16).reshape(SHAPE)
    write_volume(store, "volumes/in.zarr", data)
    save_test_model(store, "m1")


def submit(s: Scheduler, output: str = "volumes/out.zarr", job_id: str = "") -> str:
    return s.submit(predict_spec(output, block_shape=BLOCK), job_id=job_id).id


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = make_settings(tmp_path)
    prepare(s)
    return s


def test_a_batch_of_completions_is_one_document_and_each_is_answered(
    settings: Settings,
) -> None:
    s = Scheduler(settings, clock=ManualClock())
    s.recover()
    job_id = submit(s)
    grants = s.lease("w", "inference", 10)
    other = s.lease("x", "inference", 1)[0]
    batch = [(g.lease_id, owned(g, 256.0), {}) for g in grants]
    # A forged lease and another worker's lease are refused; the rest are recorded.
    batch.insert(3, ("forged", {}, {}))
    batch.append((other.lease_id, owned(other), {}))
    outcomes = s.complete_many("w", batch)
    assert [o is None for o in outcomes] == [True] * 3 + [False] + [True] * 7 + [False]
    assert isinstance(outcomes[3], FailedPreconditionError)
    assert isinstance(outcomes[-1], FailedPreconditionError)
    names = s.store.list(f"jobs/{job_id}/done/predict")
    assert len(names) == 1 and names[0].startswith("batch-")
    assert s.get(job_id).stages[0].tasks_done == 10
    # Completing again is stale: done once.
    assert isinstance(s.complete_many("w", batch[:1])[0], FailedPreconditionError)

    # A restart rebuilds exactly what was acknowledged.
    clock = ManualClock()
    again = Scheduler(settings, clock=clock)
    again.recover()
    stage = again.get(job_id).stages[0]
    assert (stage.tasks_done, stage.tasks_total) == (10, N_BLOCKS)
    clock.now += settings.lease_seconds  # past the hold for adoptions
    leased = {g.task.id for g in again.lease("y", "inference", 100)}
    done = {g.task.id for g in grants}
    assert leased.isdisjoint(done) and len(leased) == N_BLOCKS - 10


def test_a_batch_the_store_refuses_is_unavailable_and_the_leases_still_held(
    tmp_path: Path, settings: Settings
) -> None:
    store = GatedStore(settings.store_url)
    s = Scheduler(settings, store=store, clock=ManualClock())
    s.recover()
    job_id = submit(s)
    grants = s.lease("w", "inference", 4)
    store.fail_writes = True
    outcomes = s.complete_many("w", [(g.lease_id, owned(g), {}) for g in grants])
    assert all(isinstance(o, UnavailableError) for o in outcomes)
    assert s.get(job_id).stages[0].tasks_done == 0
    store.fail_writes = False
    assert s.complete_many("w", [(g.lease_id, owned(g), {}) for g in grants]) == [None] * 4
    assert s.get(job_id).stages[0].tasks_done == 4


@pytest.mark.parametrize("key_part", ["/result.json", "/stages/1.json", "/quarantine/"])
def test_no_store_write_happens_under_the_scheduler_lock(settings: Settings, key_part: str) -> None:
    store = GatedStore(settings.store_url, key_part)
    s = Scheduler(settings, store=store, clock=ManualClock())
    s.recover()
    slow = submit(s, "volumes/slow.zarr", "slow")
    other = submit(s, "volumes/other.zarr", "other")
    leased = s.lease("w", "inference", 2 * N_BLOCKS)
    grants = [g for g in leased if g.job_id == slow]
    elsewhere = next(g for g in leased if g.job_id == other)
    if key_part == "/quarantine/":
        action = threading.Thread(
            target=s.fail, args=(grants[0].lease_id, "w", _error(), False), daemon=True
        )
    elif key_part == "/stages/1.json":  # the last block starts the next stage
        ok = s.complete_many("w", [(g.lease_id, owned(g), {}) for g in grants[:-1]])
        assert ok == [None] * (N_BLOCKS - 1)
        action = threading.Thread(
            target=s.complete, args=(grants[-1].lease_id, "w", owned(grants[-1])), daemon=True
        )
    else:
        action = threading.Thread(target=s.cancel, args=(slow,), daemon=True)
    action.start()
    assert store.entered.wait(WAIT_S)
    # While that write waits on the store, the scheduler answers everyone else.
    done = threading.Event()

    def others() -> None:
        s.renew(elsewhere.lease_id, "w")
        assert s.get(other).id == other
        s.list_jobs()
        s.queue_stats()
        done.set()

    threading.Thread(target=others, daemon=True).start()
    assert done.wait(5.0), "the scheduler's lock was held during a store write"
    # A job whose result is not yet persisted is not shown as ended.
    if key_part == "/result.json":
        assert s.get(slow).state != "CANCELLED"
    store.gate.set()
    action.join(WAIT_S)
    assert not action.is_alive()
    if key_part == "/result.json":
        assert s.get(slow).state == "CANCELLED"
        assert store.read_json(f"jobs/{slow}/result.json")["state"] == "CANCELLED"
    elif key_part == "/stages/1.json":
        assert [st.tasks_total for st in s.get(slow).stages] == [N_BLOCKS, 1]
        assert s.lease("p", "postprocess", 1)[0].job_id == slow
    else:
        assert store.list(f"jobs/{slow}/quarantine/predict") == [str(grants[0].task.number)]


def _error() -> Any:
    from deep3m.scheduler.jobs import JobError

    return JobError("INVALID_ARGUMENT", "poison block")


@pytest.fixture
def server(settings: Settings) -> Iterator[tuple[Scheduler, str]]:
    small = settings.model_copy(update={"max_watch_streams": 24})
    scheduler = Scheduler(small)
    scheduler.recover()
    running = create_server(
        "scheduler", small, app=SchedulerApp(small, scheduler), port=0, host="127.0.0.1"
    )
    try:
        yield scheduler, running.address
    finally:
        running.stop(grace=0.5)


def test_watchers_beyond_the_thread_pool_do_not_starve_health_or_leases(
    server: tuple[Scheduler, str],
) -> None:
    scheduler, address = server
    job_id = submit(scheduler)
    channel = grpc.insecure_channel(address)
    stub = scheduler_pb2_grpc.SchedulerStub(channel)
    streams = []
    try:
        # More watchers than the 16 threads unary calls get, each waiting on its stream.
        for _ in range(20):
            stream = stub.WatchJob(scheduler_pb2.WatchJobRequest(job_id=job_id), timeout=WAIT_S)
            next(stream)  # the current state: the stream holds its thread now
            streams.append(stream)
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=2.0
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reply = stub.LeaseTasks(
            scheduler_pb2.LeaseTasksRequest(worker_id="w", role="inference", max_tasks=4),
            timeout=2.0,
        )
        assert len(reply.leases) == 4
        # Beyond the cap a watcher is refused at once, never queued behind the others.
        for _ in range(4):
            stream = stub.WatchJob(scheduler_pb2.WatchJobRequest(job_id=job_id), timeout=WAIT_S)
            next(stream)
            streams.append(stream)
        refused = stub.WatchJob(scheduler_pb2.WatchJobRequest(job_id=job_id), timeout=2.0)
        with pytest.raises(grpc.RpcError) as rpc:
            next(refused)
        assert rpc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for stream in streams:
            stream.cancel()
        channel.close()


def test_the_port_answers_not_serving_until_recovery_ends(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    prepare(settings)
    first = Scheduler(settings)
    first.recover()
    job_id = submit(first)
    first.stop()
    # The restarted scheduler's reads of the job's plan wait at a gate.
    store = GatedStore(settings.store_url, f"jobs/{job_id}/stages", reads=True)
    port = free_port()
    app = build_scheduler(settings)
    app.scheduler = Scheduler(settings, store=store)
    app.scheduler.begin_recovery()
    started: list[Any] = []
    thread = threading.Thread(
        target=lambda: started.append(
            create_server("scheduler", settings, app=app, port=port, host="127.0.0.1")
        ),
        daemon=True,
    )
    thread.start()
    try:
        assert store.entered.wait(WAIT_S)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5.0
            )
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as rpc:
                scheduler_pb2_grpc.SchedulerStub(channel).LeaseTasks(
                    scheduler_pb2.LeaseTasksRequest(worker_id="w", role="inference"), timeout=5.0
                )
            assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE
            store.gate.set()
            thread.join(WAIT_S)
            assert started, "the server did not start"
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5.0
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reply = scheduler_pb2_grpc.SchedulerStub(channel).GetJob(
                scheduler_pb2.GetJobRequest(job_id=job_id), timeout=5.0
            )
            assert reply.stages[0].tasks_total == N_BLOCKS
    finally:
        store.gate.set()
        thread.join(WAIT_S)
        for running in started:
            running.stop(grace=0.5)


def finish_job(s: Scheduler, job_id: str) -> None:
    for role in ("inference", "postprocess"):
        grants = [g for g in s.lease("w", role, 256) if g.job_id == job_id]
        assert s.complete_many("w", [(g.lease_id, owned(g), {}) for g in grants]) == [None] * len(
            grants
        )


def test_finished_jobs_are_indexed_loaded_when_asked_and_pruned(settings: Settings) -> None:
    clock = ManualClock()
    s = Scheduler(settings.model_copy(update={"finished_job_retention_days": 1.0}), clock=clock)
    s.recover()
    done = []
    for i in range(3):
        clock.now += 1.0
        done.append(submit(s, f"volumes/out{i}.zarr", f"done{i}"))
        finish_job(s, done[-1])
        assert s.get(done[-1]).state == "SUCCEEDED"
    running = submit(s, "volumes/running.zarr", "running")
    index = s.store.read_json(FINISHED_KEY)["jobs"]
    assert sorted(index) == done and {e["state"] for e in index.values()} == {"SUCCEEDED"}

    # A restart reads only the index for finished jobs; they load when asked for.
    store = GatedStore(settings.store_url, "/result.json", reads=True)
    store.gate.set()  # count, do not block
    reads: list[str] = []
    original = store.read_bytes

    def counting(key: str) -> bytes:
        reads.append(key)
        return original(key)

    store.read_bytes = counting  # type: ignore[method-assign]
    again = Scheduler(s.settings, store=store, clock=clock)
    again.recover()
    assert not any(k.startswith("jobs/done") for k in reads), reads
    assert again.get("running").state == "PENDING"
    assert [j.id for j in again.list_jobs(states=["SUCCEEDED"])] == sorted(done, reverse=True)
    assert again.get("done1").stages[0].tasks_done == N_BLOCKS
    assert any(k.startswith("jobs/done1/") for k in reads)

    # Past the retention the finished jobs and their documents go; the running one stays.
    clock.now += 2 * 86400.0
    assert again.prune_finished() == 3
    assert JobStore(store).listed_job_ids() == [running]
    assert again.list_jobs() and [j.id for j in again.list_jobs()] == [running]
    assert store.read_json(FINISHED_KEY)["jobs"] == {}


class WithoutBatches(SchedulerServicer):
    """A scheduler of an earlier version: no ``CompleteTasks``."""

    def CompleteTasks(self, request: Any, context: grpc.ServicerContext) -> Any:
        return scheduler_pb2_grpc.SchedulerServicer.CompleteTasks(self, request, context)


def test_a_worker_completes_one_by_one_against_a_scheduler_without_batches(
    settings: Settings,
) -> None:
    scheduler = Scheduler(settings)
    scheduler.recover()
    job_id = submit(scheduler)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), interceptors=[ErrorMappingInterceptor()]
    )
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(WithoutBatches(scheduler), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = GrpcSchedulerClient(f"127.0.0.1:{port}")
    try:
        leases = client.lease("w", "inference", 3, 30.0, timeout=5.0)
        batch = [(lease.lease_id, owned(lease, 1.0), {}) for lease in leases]
        outcomes = client.complete_many("w", [*batch, ("forged", {}, {})], timeout=5.0)
    finally:
        client.close()
        server.stop(0).wait()
    assert outcomes[:3] == [None] * 3 and isinstance(outcomes[3], FailedPreconditionError)
    assert scheduler.get(job_id).stages[0].tasks_done == 3


def test_the_autoscaler_hears_held_tasks_and_leases_per_pod(settings: Settings) -> None:
    clock = ManualClock()
    s = Scheduler(settings, clock=clock)
    s.recover()
    submit(s)
    grants = s.lease("pod-a", "inference", 3) + s.lease("pod-b", "inference", 1)
    assert s.busy_by_pod("inference") == {"pod-a": 3, "pod-b": 1}
    assert s.busy_by_pod("training") == {}
    assert s.held_by_role()["inference"] == 0
    s.fail(grants[0].lease_id, "pod-a", _error(), True)  # retried after a backoff
    assert s.held_by_role()["inference"] == 1
    assert s.busy_by_pod("inference") == {"pod-a": 2, "pod-b": 1}
    clock.now += 60.0
    assert s.held_by_role()["inference"] == 0
