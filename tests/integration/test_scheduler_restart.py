"""Durability: a scheduler killed mid-job resumes every job from the store.

The first test is the done-criterion: ``deep3m serve scheduler`` runs as a real
subprocess, is killed with SIGKILL twice while a job is under way, and is
started again on the same port each time; the workers (in this process) carry
on, and the output equals an undisturbed run's. The others
rebuild a ``Scheduler`` in-process from the same store with a controlled clock.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from deep3m.client.client import Deep3mClient
from deep3m.core.errors import FailedPreconditionError
from deep3m.core.geometry import grid_cells
from deep3m.core.store import Store
from deep3m.launcher.local import free_port
from deep3m.runtime.settings import Settings
from deep3m.runtime.task import CHUNKS_WRITTEN, TaskContext, TaskResult
from deep3m.runtime.worker import Worker
from deep3m.scheduler.core import Scheduler
from deep3m.scheduler.jobs import Grant, JobError
from deep3m.scheduler.persistence import JobStore
from deep3m.testing.clock import ManualClock
from deep3m.testing.scheduler import (
    SchedulerProcess,
    double_block_metrics,
    save_test_model,
    write_volume,
)
from deep3m.testing.scheduler import predict_spec as predict_job
from deep3m.v1 import common_pb2

SHAPE = (8, 64, 64)
BLOCK = [2, 32, 32]  # 4 x 2 x 2 = 16 blocks
N_BLOCKS = 16
WAIT_S = 120.0


class GatedDoubler:
    """Writes 2 * input into the block core; from the ``gate_after``-th call of the gated
    job on, blocks until ``gate`` opens. Counts calls per (job, task)."""

    def __init__(self, store: Store, gated_job: str = "", gate_after: int = 0) -> None:
        self.store = store
        self.gated_job = gated_job
        self.gate_after = gate_after
        self.gate = threading.Event()
        self.in_flight = threading.Event()
        self.calls: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def __call__(self, ctx: TaskContext) -> TaskResult:
        job = ctx.task.job_id
        with self._lock:
            self.calls[(job, ctx.task.id)] += 1
            n = sum(c for (j, _), c in self.calls.items() if j == job)
            gate = self.gate
        if job == self.gated_job and n >= self.gate_after:
            self.in_flight.set()
            if not gate.wait(WAIT_S):
                raise TimeoutError("gate never opened")
        return TaskResult(metrics=double_block_metrics(self.store, ctx.lease))

    def rearm(self, gate_after: int) -> threading.Event:
        """Gate again from the ``gate_after``-th call on; returns the previous gate (to open)."""
        with self._lock:
            previous, self.gate = self.gate, threading.Event()
            self.gate_after = gate_after
            self.in_flight.clear()
        return previous


def finalize(ctx: TaskContext) -> TaskResult:
    return TaskResult(outputs={"finalized": "yes"})


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(f"file://{tmp_path}/store")
    data = np.random.default_rng(1).integers(0, 250, SHAPE, dtype=np.uint8)
    write_volume(s, "volumes/in.zarr", data)
    save_test_model(s, "m1")
    return s


def predict_spec(output: str) -> common_pb2.JobSpec:
    return predict_job(output, block_shape=BLOCK)


@pytest.mark.slow
def test_sigkill_mid_job_resumes_without_redoing_or_losing_blocks(
    store: Store, tmp_path: Path
) -> None:
    lease_s = 4.0
    proc = SchedulerProcess(
        store.url,
        free_port(),
        tmp_path / "scheduler.log",
        env={"DEEP3M_LEASE_SECONDS": str(lease_s), "DEEP3M_RETRY_BACKOFF_SECONDS": "0.05"},
    )
    settings = Settings(
        store_url=store.url,
        scheduler_address=proc.address,
        lease_seconds=lease_s,
        poll_interval_seconds=0.05,
        rpc_timeout_seconds=5.0,
        worker_capacity=2,
        metrics_port=0,
    )
    handler = GatedDoubler(store, gated_job="disturbed", gate_after=6)
    workers = [
        Worker(settings, "inference", {"predict": handler}, worker_id="gpu-0"),
        Worker(settings, "postprocess", {"finalize": finalize}, worker_id="cpu-0"),
    ]
    proc.start()
    try:
        for w in workers:
            w.start()
        with Deep3mClient(proc.address, timeout_s=10.0) as client:
            # An undisturbed run of the same job, for comparison.
            client.submit(predict_spec("volumes/reference.zarr"), job_id="reference")
            assert client.wait("reference", WAIT_S).state == common_pb2.JOB_STATE_SUCCEEDED

            client.submit(predict_spec("volumes/out.zarr"), job_id="disturbed")
            assert handler.in_flight.wait(WAIT_S)
            done_before = set(JobStore(store).done_tasks("disturbed", "predict").tolist())
            proc.kill()  # SIGKILL, mid-job: some blocks done, some running, some pending
            assert 0 < len(done_before) < N_BLOCKS

            proc.start()  # same store, same port
            # Let the job go on until more blocks are done, then kill it again.
            first_gate = handler.rearm(gate_after=11)
            first_gate.set()
            assert handler.in_flight.wait(WAIT_S)
            done_mid = set(JobStore(store).done_tasks("disturbed", "predict").tolist())
            calls_mid = Counter(handler.calls)
            proc.kill()
            assert done_before < done_mid and len(done_mid) < N_BLOCKS

            proc.start()
            handler.gate.set()
            job = client.wait("disturbed", WAIT_S)
    finally:
        handler.gate.set()
        for w in workers:
            w.stop(grace=5.0)
        proc.terminate()

    assert job.state == common_pb2.JOB_STATE_SUCCEEDED, job.errors
    assert job.outputs["finalized"] == "yes"
    assert [(s.tasks_done, s.tasks_total) for s in job.stages] == [(N_BLOCKS, N_BLOCKS), (1, 1)]
    calls = {task: n for (j, task), n in handler.calls.items() if j == "disturbed"}
    assert len(calls) == N_BLOCKS  # nothing lost
    plan_ids = {f"predict/b{z}-{y}-{x}" for z in range(4) for y in range(2) for x in range(2)}
    assert set(calls) == plan_ids
    # Blocks whose completion was recorded before a kill were not redone after it.
    done_ids = {f"predict/b{n // 4}-{(n // 2) % 2}-{n % 2}" for n in done_before}
    assert {t: calls[t] for t in done_ids} == dict.fromkeys(done_ids, 1)
    mid_ids = {f"predict/b{n // 4}-{(n // 2) % 2}-{n % 2}" for n in done_mid}
    assert {t: calls[t] for t in mid_ids} == {t: calls_mid[("disturbed", t)] for t in mid_ids}
    # Only tasks running at a kill can have run twice; capacity is 2, two kills.
    assert sum(calls.values()) <= N_BLOCKS + 4
    assert JobStore(store).done_tasks("disturbed", "predict").size == N_BLOCKS
    np.testing.assert_array_equal(
        store.open_volume("volumes/out.zarr")[...], store.open_volume("volumes/reference.zarr")[...]
    )
    log = (tmp_path / "scheduler.log").read_text()
    assert "resumed 1 job(s)" in log


@pytest.fixture
def settings(store: Store) -> Settings:
    return Settings(
        store_url=store.url,
        lease_seconds=10.0,
        retry_backoff_seconds=1.0,
        max_attempts=2,
        metrics_port=0,
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(2_000_000.0)


def fresh(settings: Settings, clock: ManualClock) -> Scheduler:
    """A new scheduler instance on the same store, as after a restart."""
    s = Scheduler(settings, clock=clock)
    s.recover()
    return s


def finish(s: Scheduler, lease: Grant, worker: str = "w") -> None:
    """Complete a task as a worker that wrote every chunk its block owns."""
    assert lease.task.block is not None
    cells = grid_cells(lease.task.block.core, lease.volumes["output"].grid)
    s.complete(lease.lease_id, worker, {"voxels": 1.0, CHUNKS_WRITTEN: float(cells)})


@pytest.fixture
def first(settings: Settings, clock: ManualClock) -> Iterator[Scheduler]:
    yield fresh(settings, clock)


def test_restart_keeps_done_tasks_and_adopts_running_ones(
    first: Scheduler, settings: Settings, clock: ManualClock
) -> None:
    first.submit(predict_spec("volumes/out.zarr"), job_id="j")
    leases = first.lease("w", "inference", 4)
    finish(first, leases[0])
    finish(first, leases[1])
    # "Killed": the first instance is simply abandoned with two leases out.
    second = fresh(settings, clock)
    job = second.get("j")
    assert job.state == "RUNNING"
    assert (job.stages[0].tasks_done, job.stages[0].tasks_total) == (2, N_BLOCKS)
    # Pending tasks are held back briefly so the old holders can report first.
    assert second.lease("other", "inference", N_BLOCKS) == []
    finish(second, leases[2])  # a completion for an old lease: adopted, not redone
    deadline, cancelled = second.renew(leases[3].lease_id, "w")
    assert not cancelled and deadline == clock.now + settings.lease_seconds
    with pytest.raises(FailedPreconditionError):
        finish(second, leases[0])  # already done: stale
    clock.now += settings.lease_seconds  # past the hold
    rest = second.lease("other", "inference", N_BLOCKS)
    got = {lease.task.id for lease in rest}
    assert len(rest) == N_BLOCKS - 4
    assert not got & {lease.task.id for lease in leases}
    for lease in rest:
        finish(second, lease, "other")
    finish(second, leases[3])
    assert second.get("j").stages[0].tasks_done == N_BLOCKS
    (fin,) = second.lease("cpu", "postprocess", 1)
    assert fin.task.id == "finalize/0"
    third = fresh(settings, clock)  # restart during the finalize stage
    job = third.get("j")
    assert [s.tasks_total for s in job.stages] == [N_BLOCKS, 1]
    third.complete(fin.lease_id, "cpu", {}, {"labels": "volumes/out.zarr/labels"})
    assert third.get("j").state == "SUCCEEDED"
    assert store_volume_complete(third, "volumes/out.zarr")
    fourth = fresh(settings, clock)
    done = fourth.get("j")
    assert done.state == "SUCCEEDED"
    assert done.outputs["labels"] == "volumes/out.zarr/labels"
    assert [(s.tasks_done, s.tasks_total) for s in done.stages] == [(N_BLOCKS, N_BLOCKS), (1, 1)]


def store_volume_complete(s: Scheduler, path: str) -> bool:
    return s.store.volume_info(path).complete


def test_quarantine_and_cancel_survive_a_restart(
    first: Scheduler, settings: Settings, clock: ManualClock
) -> None:
    first.submit(predict_spec("volumes/a.zarr"), job_id="failing")
    first.submit(predict_spec("volumes/b.zarr"), job_id="cancelled")
    (lease,) = first.lease("w", "inference", 1)
    assert lease.job_id == "failing"
    error = JobError("INVALID_ARGUMENT", "corrupt block")
    assert first.fail(lease.lease_id, "w", error, retryable=False)
    first.cancel("cancelled")
    second = fresh(settings, clock)
    assert second.get("cancelled").state == "CANCELLED"
    failing = second.get("failing")
    assert failing.state == "RUNNING"
    assert [(e.task_id, e.message) for e in failing.errors] == [("predict/b0-0-0", "corrupt block")]
    clock.now += settings.lease_seconds
    rest = second.lease("w", "inference", N_BLOCKS)
    assert {lease.job_id for lease in rest} == {"failing"}
    assert len(rest) == N_BLOCKS - 1  # the quarantined block is not retried
    for lease in rest:
        finish(second, lease)
    job = second.get("failing")
    assert job.state == "FAILED"
    assert "predict/b0-0-0" in second.watch("failing")[0].error
    assert fresh(settings, clock).get("failing").state == "FAILED"


def test_a_finished_job_whose_result_was_not_written_finishes_on_restart(
    first: Scheduler, settings: Settings, clock: ManualClock
) -> None:
    first.submit(predict_spec("volumes/out.zarr"), job_id="j")
    for lease in first.lease("w", "inference", N_BLOCKS):
        finish(first, lease)
    (fin,) = first.lease("cpu", "postprocess", 1)
    first.complete(fin.lease_id, "cpu", {"objects": 3.0}, {"labels": "volumes/out.zarr/labels"})
    first.store.delete("jobs/j/result.json")  # as if killed before writing it
    job = fresh(settings, clock).get("j")
    assert job.state == "SUCCEEDED"
    assert job.outputs["labels"] == "volumes/out.zarr/labels"
    assert job.metrics["objects"] == 3.0


def test_a_job_stopped_before_its_first_stage_was_written_is_planned_on_restart(
    first: Scheduler, settings: Settings, clock: ManualClock
) -> None:
    first.submit(predict_spec("volumes/out.zarr"), job_id="j")
    first.store.delete("jobs/j/stages")
    second = fresh(settings, clock)
    assert second.get("j").stages[0].tasks_total == N_BLOCKS
    assert second.pending_by_role()["inference"] == N_BLOCKS


def test_a_job_recorded_without_resolved_volumes_resumes(
    first: Scheduler, settings: Settings, clock: ManualClock
) -> None:
    first.submit(predict_spec("volumes/out.zarr"), job_id="j")
    record = first.store.read_json("jobs/j/job.json")
    del record["volumes"]  # as written before volumes were recorded at submit
    first.store.write_json("jobs/j/job.json", record)
    second = fresh(settings, clock)
    clock.now += settings.lease_seconds  # past the hold
    leases = second.lease("w", "inference", N_BLOCKS)
    assert len(leases) == N_BLOCKS
    assert leases[0].volumes["output"].grid == tuple(BLOCK)
    for lease in leases:
        finish(second, lease)
    (fin,) = second.lease("cpu", "postprocess", 1)
    second.complete(fin.lease_id, "cpu")
    assert second.get("j").state == "SUCCEEDED"
    assert store_volume_complete(second, "volumes/out.zarr")


def test_a_job_planned_by_another_version_fails_on_restart_instead_of_running_on(
    first: Scheduler, settings: Settings, clock: ManualClock
) -> None:
    first.submit(predict_spec("volumes/out.zarr"), job_id="j")
    for lease in first.lease("w", "inference", N_BLOCKS):
        finish(first, lease)
    assert [s.name for s in first.get("j").stages] == ["predict", "finalize"]
    # As an older version would have stored it: another name at stage 1. Planned
    # from its index alone, the next stage would run on outputs it does not expect.
    plan = first.store.read_json("jobs/j/stages/1.json")
    plan["name"] = "reduce_parts"
    first.store.write_json("jobs/j/stages/1.json", plan)
    second = fresh(settings, clock)
    job = second.get("j")
    assert job.state == "FAILED"
    (error,) = [e for e in job.errors if e.code == "FAILED_PRECONDITION"]
    assert "'reduce_parts'" in error.message and "submit the job again" in error.message
    clock.now += settings.lease_seconds  # past any hold: nothing of it is handed out
    assert second.lease("cpu", "postprocess", 1) == []
    assert fresh(settings, clock).get("j").state == "FAILED"
