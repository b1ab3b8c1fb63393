"""The fence wired into the scheduler: persistence refuses writes without it, a fenced-off
scheduler stops writing at once, the file lock, the keeper, and the role app.

Clocks are injected (``ManualClock``) where a lease has to run out; the two
schedulers share one store (``memory://`` through ``LocalConditionalStore``,
or a folder for the lock), as two processes would.
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import grpc
import pytest
from deep3m.core.errors import UnavailableError
from deep3m.core.store import Store
from deep3m.runtime.server import create_server
from deep3m.runtime.settings import Settings
from deep3m.scheduler.app import SchedulerApp
from deep3m.scheduler.conditional import LocalConditionalStore
from deep3m.scheduler.core import Scheduler
from deep3m.scheduler.fence_keeper import FenceKeeper, holder_name, open_fence
from deep3m.scheduler.fence_lock import LOCK_KEY, LockFence
from deep3m.scheduler.fencing import EPOCH_FIELD, FENCE_KEY, Fence, FencedError, FenceRecord
from deep3m.scheduler.persistence import EPOCHS_KEY, FINISHED_KEY, JobStore
from deep3m.testing.clock import ManualClock
from grpc_health.v1 import health_pb2, health_pb2_grpc

TTL = 60.0
WAIT_S = 30.0


def memory_store() -> Store:
    return Store(f"memory://fence-{uuid.uuid4().hex[:8]}")


def fence(store: Store, holder: str, wall: ManualClock, mono: ManualClock) -> Fence:
    return Fence(LocalConditionalStore(store), holder, ttl_s=TTL, clock=wall, monotonic=mono)


def every_write(jobs: JobStore) -> dict[str, object]:
    """One call of each kind of state write the scheduler makes."""
    return {
        "done": lambda: jobs.mark_done("j1", "predict", 0, {"ok": 1}),
        "done batch": lambda: jobs.mark_done_batch("j1", "predict", {1: {}, 2: {}}),
        "quarantine": lambda: jobs.save_quarantine("j1", "predict", 3, {"code": "X"}),
        "cancel": lambda: jobs.mark_cancelled("j1"),
        "result": lambda: jobs.save_result("j1", {"state": "FAILED"}),
        "finished index": lambda: jobs.index_finished({"j1": {"state": "FAILED"}}),
        "epochs": lambda: jobs.register_epoch("old-2"),
        "delete": lambda: jobs.delete_job("j1"),
    }


def test_a_scheduler_whose_fence_was_taken_over_writes_nothing() -> None:
    store = memory_store()
    wall, old_mono, new_mono = ManualClock(), ManualClock(), ManualClock()
    old = fence(store, "old", wall, old_mono)
    old.acquire()
    old_jobs = JobStore(store, old)
    old_jobs.register_epoch("old-1")
    old_jobs.index_finished({"j0": {"state": "SUCCEEDED"}})
    old_jobs.mark_done("j1", "predict", 0, {"by": "old"})

    # The second scheduler is refused while the first one's lease is live.
    new = fence(store, "new", wall, new_mono)
    with pytest.raises(FencedError, match="'old' holds epoch 1"):
        new.acquire()

    # The old one is cut off (paused, partitioned): it renews no more, and its own
    # clock has not moved, so its local check alone would still let it write.
    wall.now += TTL + 1
    assert new.acquire().epoch == 2
    new_jobs = JobStore(store, new)  # adopts the epochs and the finished index
    assert new_jobs.register_epoch("new-1") == ["old-1"]
    assert json.loads(store.read_bytes(FINISHED_KEY))[EPOCH_FIELD] == 2

    # Read-modify-write documents: refused against the fence and their versions.
    with pytest.raises(FencedError, match="epoch 2 of 'new'"):
        old_jobs.index_finished({"j1": {"state": "FAILED"}})
    with pytest.raises(FencedError, match="epoch 2 of 'new'"):
        old_jobs.register_epoch("old-2")
    # Its renewal finds the fence taken: from then on every write is refused, no I/O.
    with pytest.raises(FencedError, match="fenced off"):
        old.renew()
    before = {k: store.read_bytes(k) for k in store.walk_files("")}
    for name, write in every_write(old_jobs).items():
        with pytest.raises(FencedError, match="fenced off"):
            write()  # type: ignore[operator]
        assert {k: store.read_bytes(k) for k in store.walk_files("")} == before, name
    assert new_jobs.finished_index() == {"j0": {"state": "SUCCEEDED"}}
    new_jobs.index_finished({"j2": {"state": "SUCCEEDED"}})
    new_jobs.save_result("j2", {"state": "SUCCEEDED"})


def test_a_fence_not_renewed_in_time_stops_writes_before_anyone_may_claim() -> None:
    store = memory_store()
    wall, mono = ManualClock(), ManualClock()
    mine = fence(store, "a", wall, mono)
    mine.acquire()
    jobs = JobStore(store, mine)
    jobs.mark_done("j1", "s", 0, {})
    # Three quarters of the TTL without a renewal: writes stop (a quarter before the
    # store's record expires, which is when another scheduler may claim).
    mono.now += 0.75 * TTL
    wall.now += 0.75 * TTL
    with pytest.raises(FencedError, match="lapse"):
        jobs.mark_done("j1", "s", 1, {})
    with pytest.raises(FencedError, match="'a' holds epoch 1"):
        fence(store, "b", wall, ManualClock()).acquire()
    # Renewed before anyone claimed: it writes again.
    mine.renew()
    jobs.mark_done("j1", "s", 1, {})
    assert sorted(store.list("jobs/j1/done/s")) == ["0", "1"]


def test_a_released_fence_is_claimed_at_once_with_the_next_epoch() -> None:
    store = memory_store()
    wall = ManualClock()
    first = fence(store, "a", wall, ManualClock())
    first.acquire()
    first.release()
    with pytest.raises(FencedError, match="released"):
        JobStore(store, first)
    assert fence(store, "b", wall, ManualClock()).acquire() == FenceRecord(2, "b", wall.now + TTL)


def test_a_store_without_a_fence_writes_as_before() -> None:
    store = memory_store()
    jobs = JobStore(store)
    for write in every_write(jobs).values():
        write()  # type: ignore[operator]
    assert not store.exists(FENCE_KEY)


# -- file:// ---------------------------------------------------------------------------


def test_the_file_lock_admits_one_holder_and_names_it(tmp_path: Path) -> None:
    first = LockFence(tmp_path, "sched-a")
    assert first.acquire().epoch == 1
    second = LockFence(tmp_path, "sched-b")
    # flock belongs to an open file: even a second fence in this process is refused.
    with pytest.raises(FencedError, match="'sched-a' \\(epoch 1\\) holds the lock"):
        second.acquire()
    jobs = JobStore(Store(str(tmp_path)), first)
    jobs.mark_done("j1", "s", 0, {})
    first.renew()
    first.release()
    with pytest.raises(FencedError, match="released"):
        jobs.mark_done("j1", "s", 1, {})
    assert second.acquire().epoch == 2
    second.release()


def test_a_replaced_lock_file_fences_its_holder_off(tmp_path: Path) -> None:
    mine = LockFence(tmp_path, "sched-a")
    mine.acquire()
    jobs = JobStore(Store(str(tmp_path)), mine)
    lock = tmp_path / LOCK_KEY
    lock.unlink()  # e.g. the folder wiped under a running scheduler
    other = LockFence(tmp_path, "sched-b")
    assert other.acquire().holder == "sched-b"
    with pytest.raises(FencedError, match="removed or replaced"):
        mine.renew()
    with pytest.raises(FencedError, match="lost its fence"):
        jobs.mark_done("j1", "s", 0, {})
    other.release()
    mine.release()


def test_open_fence_picks_the_mechanism_by_scheme(tmp_path: Path) -> None:
    settings = Settings(store_url=str(tmp_path))
    assert isinstance(open_fence(Store(str(tmp_path)), settings, "h"), LockFence)
    assert isinstance(open_fence(memory_store(), settings, "h"), Fence)
    name = holder_name()
    assert name.split(":")[1].isdigit() and name != holder_name()


# -- the keeper ------------------------------------------------------------------------


def test_the_keeper_gives_up_naming_the_holder_and_reports_a_lost_fence() -> None:
    store = memory_store()
    wall = ManualClock()
    holder = fence(store, "a", wall, ManualClock())
    holder.acquire()
    lost: list[FencedError] = []
    done = threading.Event()

    def on_lost(exc: FencedError) -> None:
        lost.append(exc)
        done.set()

    waiting = FenceKeeper(
        fence(store, "b", wall, ManualClock()), renew_s=0.05, wait_s=0.0, on_lost=on_lost
    )
    with pytest.raises(FencedError, match="'a' holds epoch 1"):
        waiting.claim()

    # The holder's lease ran out (its renewals had stopped); another claims the fence.
    taker = fence(store, "b", ManualClock(wall.now + 2 * TTL), ManualClock())
    taker.acquire()
    keeper = FenceKeeper(holder, renew_s=0.05, wait_s=0.0, on_lost=on_lost)
    keeper.start()
    assert done.wait(WAIT_S)
    assert "fenced off" in lost[0].message
    keeper.stop()  # lost: nothing released, the taker keeps the fence
    taker.verify()


# -- the scheduler role ------------------------------------------------------------------


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=WAIT_S, wait_for_ready=True
        )
        return int(reply.status)


def test_a_second_scheduler_role_on_one_store_is_refused(tmp_path: Path) -> None:
    settings = Settings(store_url=str(tmp_path), metrics_port=0, fence_wait_seconds=0)
    first = create_server("scheduler", settings, port=0, host="127.0.0.1")
    try:
        holder = json.loads((tmp_path / LOCK_KEY).read_bytes())["holder"]
        with pytest.raises(FencedError, match=f"{holder!r} \\(epoch 1\\) holds the lock"):
            create_server("scheduler", settings, port=0, host="127.0.0.1")
        assert _health(first.address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        first.stop(grace=0.5)
    # Stopped cleanly: the next one claims at once, with the next epoch.
    second = create_server("scheduler", settings, port=0, host="127.0.0.1")
    try:
        assert json.loads((tmp_path / LOCK_KEY).read_bytes())["epoch"] == 2
        assert len(json.loads((tmp_path / EPOCHS_KEY).read_bytes())["epochs"]) == 2
    finally:
        second.stop(grace=0.5)


def test_a_scheduler_role_fenced_off_stops_serving_and_writing() -> None:
    store = memory_store()
    settings = Settings(
        store_url=store.url, metrics_port=0, fence_ttl_seconds=TTL, fence_renew_seconds=0.05
    )
    wall = ManualClock()
    app = SchedulerApp(
        settings,
        Scheduler(settings, store=store),
        fence=Fence(LocalConditionalStore(store), "a", ttl_s=TTL, clock=wall),
    )
    running = create_server("scheduler", settings, app=app, port=0, host="127.0.0.1")
    try:
        assert _health(running.address) == health_pb2.HealthCheckResponse.SERVING
        # Another scheduler takes the fence over: on its clock the first one's lease ran
        # out (the first one keeps renewing, so a claim may lose a race to a renewal).
        taker = Fence(
            LocalConditionalStore(store), "b", ttl_s=TTL, clock=ManualClock(wall.now + 2 * TTL)
        )
        for _ in range(100):
            try:
                taker.acquire()
                break
            except FencedError as exc:
                assert "lost the race" in exc.message
        else:
            pytest.fail("the takeover never won against the renewals")
        assert running.ended.wait(WAIT_S)
        assert isinstance(running.aborted, FencedError)
        assert "fenced off" in running.aborted.message
        assert _health(running.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(UnavailableError, match="fenced off"):
            app.scheduler.jobs_store.save_result("j1", {"state": "FAILED"})
        assert not store.exists("jobs/j1/result.json")
    finally:
        running.stop(grace=0.5)
    assert json.loads(store.read_bytes(FENCE_KEY))["holder"] == "b"
