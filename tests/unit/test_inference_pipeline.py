"""Pipelined prediction: blocks read and written while another block computes.

The compute gate on its own (first come first served, at most ``slots`` holders,
cancellation while waiting), then the real inference worker (``Worker`` +
``PredictTaskHandler``) against the in-process scheduler: reads overlap compute,
one block computes at a time however many are in flight, a failing write fails
its task and the job, cancelling mid-stream ends every block held, and stopping
the worker gives back the blocks waiting for the device at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from deep3m.core.errors import CancelledError, InvalidArgumentError
from deep3m.core.store import Store
from deep3m.inference.app import pipelined
from deep3m.inference.cache import ComputeGate, DevicePool, ModelCache
from deep3m.inference.tasks import PredictTaskHandler
from deep3m.models.card import ModelCard
from deep3m.runtime.settings import Settings
from deep3m.runtime.worker import Worker
from deep3m.scheduler.core import Scheduler
from deep3m.scheduler.inprocess import InProcessSchedulerClient
from deep3m.testing.nets import PointwiseNet
from deep3m.testing.scheduler import predict_spec, save_test_model, wait_terminal, write_volume
from torch import nn

SHAPE = (6, 32, 32)
BLOCK = (1, 32, 32)  # 6 blocks, one output chunk each
WAIT_S = 30.0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Wait for a state the test can observe (not for a guessed length of time)."""
    deadline = time.monotonic() + WAIT_S
    ready = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        ready.wait(0.005)


# -- the gate ------------------------------------------------------------------------------
def test_the_gate_admits_in_arrival_order_one_at_a_time() -> None:
    gate = ComputeGate(1)
    order: list[int] = []
    release = threading.Event()

    def holder(i: int) -> None:
        with gate.hold():
            order.append(i)
            if i == 0:
                release.wait(WAIT_S)

    threads = [threading.Thread(target=holder, args=(0,))]
    threads[0].start()
    wait_until(lambda: order == [0], "the first holder")
    for i in range(1, 5):
        threads.append(threading.Thread(target=holder, args=(i,)))
        threads[-1].start()
        wait_until(lambda i=i: gate.waiting == i, f"holder {i} in the queue")  # type: ignore[misc]
    release.set()
    for t in threads:
        t.join(WAIT_S)
    assert order == [0, 1, 2, 3, 4]
    assert gate.most_holding == 1


def test_a_gate_with_two_slots_holds_two_and_refuses_zero() -> None:
    gate = ComputeGate(2)
    inside = threading.Barrier(3, timeout=WAIT_S)

    def holder() -> None:
        with gate.hold():
            inside.wait()  # both holders are inside at once, or this times out

    threads = [threading.Thread(target=holder) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    for t in threads:
        t.join(WAIT_S)
    assert gate.most_holding == 2
    with pytest.raises(InvalidArgumentError, match="slots"):
        ComputeGate(0)


def test_a_cancelled_waiter_leaves_the_queue_and_the_next_one_goes_first() -> None:
    gate = ComputeGate(1)
    order: list[str] = []
    cancelled = threading.Event()
    errors: list[BaseException] = []
    release = threading.Event()

    def first() -> None:
        with gate.hold():
            order.append("first")
            release.wait(WAIT_S)

    def cancelled_one() -> None:
        try:
            with gate.hold(cancelled):
                order.append("cancelled")
        except CancelledError as exc:
            errors.append(exc)

    def last() -> None:
        with gate.hold():
            order.append("last")

    a, b, c = (threading.Thread(target=f) for f in (first, cancelled_one, last))
    a.start()
    wait_until(lambda: order == ["first"], "the first holder")
    b.start()
    wait_until(lambda: gate.waiting == 1, "the second in the queue")
    c.start()
    wait_until(lambda: gate.waiting == 2, "the third in the queue")
    cancelled.set()
    b.join(WAIT_S)
    assert len(errors) == 1 and gate.waiting == 1
    release.set()
    for t in (a, c):
        t.join(WAIT_S)
    assert order == ["first", "last"]


# -- the worker ----------------------------------------------------------------------------
class Instrumented(nn.Module):
    """PointwiseNet that records each forward pass and can hold it at a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.net = PointwiseNet(1)
        self.calls = 0
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.calls += 1
        self.entered.set()
        if not self.hold.wait(WAIT_S):
            raise AssertionError("the test never released the network")
        return self.net(x)  # type: ignore[no-any-return]


@dataclass
class Env:
    settings: Settings
    store: Store
    scheduler: Scheduler
    net: Instrumented
    devices: DevicePool
    root: Path

    def leased(self) -> int:
        return self.scheduler.busy_by_pod("inference").get("inference-pipeline", 0)

    def worker(self) -> Worker:
        def loader(store: Store, card: ModelCard, member: str, device: torch.device) -> nn.Module:
            return self.net

        handler = PredictTaskHandler(self.settings, cache=ModelCache(loader), devices=self.devices)
        settings = pipelined(self.settings, self.devices.devices)
        return Worker(
            settings,
            "inference",
            {"predict": handler},
            worker_id="inference-pipeline",
            client=InProcessSchedulerClient(self.scheduler),
        )

    def submit(self, max_attempts: int = 0, block: tuple[int, ...] = BLOCK) -> str:
        spec = predict_spec("volumes/out.zarr", block_shape=block, max_attempts=max_attempts)
        return self.scheduler.submit(spec).id


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    settings = Settings(
        store_url=f"file://{tmp_path}/store",
        device="cpu",
        lease_seconds=1.0,
        poll_interval_seconds=0.02,
        retry_backoff_seconds=0.01,
        worker_capacity=1,
        inference_pipeline_depth=3,
        batch_size=1,
        metrics_port=0,
    )
    store = Store(settings.store_url)
    write_volume(
        store, "volumes/in.zarr", np.arange(np.prod(SHAPE), dtype=np.uint16).reshape(SHAPE)
    )
    save_test_model(store, "m1")
    scheduler = Scheduler(settings)
    scheduler.recover()
    devices = DevicePool([torch.device("cpu")], slots=1)
    yield Env(settings, store, scheduler, Instrumented(), devices, tmp_path / "store")
    scheduler.stop()


def test_every_block_is_predicted_once_one_at_a_time(env: Env) -> None:
    worker = env.worker()
    job = env.submit()
    worker.start()
    try:
        wait_until(lambda: worker.completed == SHAPE[0], "every block predicted")
    finally:
        worker.stop(grace=5.0)
    stage = env.scheduler.get(job).stages[0]
    assert (stage.name, stage.tasks_done, stage.tasks_total) == ("predict", 6, 6)
    assert env.net.calls == SHAPE[0]
    # Three blocks in flight, never more than one computing.
    assert env.devices.gate(env.devices.devices[0]).most_holding == 1
    out = np.asarray(env.store.open_volume("volumes/out.zarr", require_complete=False)[...])
    assert out.shape == SHAPE and np.all((out > 0) & (out < 1))


def start_with_the_first_block_held(
    env: Env, block: tuple[int, ...] = BLOCK
) -> tuple[Worker, str, ComputeGate]:
    """A worker whose first block computes until ``env.net.hold`` is set, once the next
    two blocks have been read and wait for the device (prefetched)."""
    env.net.hold.clear()
    worker = env.worker()
    job = env.submit(block=block)
    worker.start()
    gate = env.devices.gate(env.devices.devices[0])
    try:
        assert env.net.entered.wait(WAIT_S)
        wait_until(lambda: gate.waiting == 2, "two blocks prefetched")
    except BaseException:
        env.net.hold.set()
        worker.stop(grace=5.0)
        raise
    return worker, job, gate


def test_blocks_are_read_while_one_computes_and_no_more_than_the_depth(env: Env) -> None:
    worker, job, _ = start_with_the_first_block_held(env)
    try:
        # Depth 3: the block computing and the two prefetched, no more leased.
        assert env.leased() == 3
        env.net.hold.set()
        wait_until(lambda: worker.completed == SHAPE[0], "every block predicted")
    finally:
        env.net.hold.set()
        worker.stop(grace=5.0)
    assert env.scheduler.get(job).stages[0].tasks_done == SHAPE[0]


def test_a_failing_write_fails_the_task_and_the_job(env: Env) -> None:
    worker = env.worker()
    job = env.submit(max_attempts=1)
    # A file where the output's chunk folder must go: every write of a chunk fails.
    chunks = env.root / "volumes" / "out.zarr" / "0" / "c"
    if chunks.exists():
        raise AssertionError("the output already has chunks")
    chunks.write_text("not a folder")
    worker.start()
    try:
        done = wait_terminal(env.scheduler, job)
    finally:
        worker.stop(grace=5.0)
    assert done.state == "FAILED"
    assert worker.completed == 0 and worker.failed >= 1
    assert "c/" in done.message or "Directory" in done.message, done.message


def test_cancelling_mid_stream_ends_every_block_held(env: Env) -> None:
    worker, job, gate = start_with_the_first_block_held(env)
    try:
        env.scheduler.cancel(job)
        # The prefetched blocks leave the queue through the heartbeat's cancellation.
        wait_until(lambda: gate.waiting == 0, "the waiting blocks cancelled")
        env.net.hold.set()
        done = wait_terminal(env.scheduler, job)
        wait_until(lambda: env.leased() == 0, "every lease given back")
    finally:
        env.net.hold.set()
        worker.stop(grace=5.0)
    assert done.state == "CANCELLED"
    # Only the block that was computing ran its network; nothing was completed.
    assert env.net.calls == 1
    assert worker.completed == 0


def test_stopping_gives_back_the_waiting_blocks_at_once_and_finishes_the_computing_one(
    env: Env,
) -> None:
    """SIGTERM (``Worker.stop``): the blocks read and waiting for the device are handed
    back at once, without an attempt, while the block computing finishes (both of its
    slices, one forward pass each) and is written."""
    two_slices = (2, *BLOCK[1:])  # 3 blocks
    worker, job, gate = start_with_the_first_block_held(env, two_slices)
    stopper = threading.Thread(target=worker.stop, kwargs={"grace": 60.0})
    try:
        stopper.start()
        wait_until(lambda: worker.released == 2, "the waiting blocks given back")
        assert gate.waiting == 0 and env.leased() == 1
    finally:
        env.net.hold.set()
        stopper.join(WAIT_S)
    assert not stopper.is_alive(), "stop waited out the grace"
    assert (worker.completed, worker.released, worker.failed) == (1, 2, 0)
    assert env.net.calls == 2
    stage = env.scheduler.get(job).stages[0]
    assert (stage.tasks_done, stage.tasks_leased) == (1, 0)
    # Given back, not failed: the other two lease again at once, first attempts still.
    again = env.scheduler.lease("other", "inference", 3)
    assert len(again) == 2 and {lease.attempt for lease in again} == {1}
    out = np.asarray(env.store.open_volume("volumes/out.zarr", require_complete=False)[...])
    assert np.count_nonzero(out.reshape(SHAPE[0], -1).any(axis=1)) == 2
