"""The scheduler's statistics: ``deep3m_tasks_pending`` counts only tasks a worker could
lease now, and follows held tasks as they turn leasable with time alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from deep3m.core.store import Store
from deep3m.runtime.settings import Settings
from deep3m.scheduler.core import Scheduler
from deep3m.scheduler.jobs import JobError
from deep3m.testing.clock import ManualClock
from deep3m.testing.scheduler import predict_spec, save_test_model, write_volume
from prometheus_client import REGISTRY

SHAPE = (4, 32, 32)
N_BLOCKS = 16  # blocks of 1 x 16 x 16


def pending_gauge(role: str = "inference") -> float | None:
    return REGISTRY.get_sample_value("deep3m_tasks_pending", {"role": role})


def scheduler(tmp_path: Path, clock: ManualClock) -> Scheduler:
    settings = Settings(
        store_url=f"file://{tmp_path}/store",
        lease_seconds=30.0,
        retry_backoff_seconds=10.0,
        metrics_port=0,
    )
    s = Scheduler(settings, clock=clock)
    s.recover()
    return s


def with_job(tmp_path: Path, clock: ManualClock) -> Scheduler:
    """A scheduler with one predict job of ``N_BLOCKS`` tasks, none leased yet."""
    s = scheduler(tmp_path, clock)
    store = Store(s.settings.store_url)
    write_volume(store, "volumes/in.zarr", np.zeros(SHAPE, np.uint16))
    save_test_model(store, "m1")
    s.submit(predict_spec("volumes/out.zarr", block_shape=[1, 16, 16]))
    return s


def test_the_pending_gauge_leaves_out_tasks_in_retry_backoff(tmp_path: Path) -> None:
    clock = ManualClock()
    s = with_job(tmp_path, clock)
    assert pending_gauge() == N_BLOCKS
    (grant,) = s.lease("w", "inference", 1)
    assert pending_gauge() == N_BLOCKS - 1
    s.fail(grant.lease_id, "w", JobError("INTERNAL", "flaky"), True)  # backs off 10 s
    assert s.pending_by_role()["inference"] == N_BLOCKS
    assert s.held_by_role()["inference"] == 1
    assert pending_gauge() == N_BLOCKS - 1  # the held task is no one's to lease yet

    clock.now += 11.0  # the backoff is over: nothing else changed the queue
    assert s.expire_leases() == 0
    assert pending_gauge() == N_BLOCKS


def test_the_pending_gauge_leaves_out_tasks_held_after_a_restart(tmp_path: Path) -> None:
    clock = ManualClock()
    with_job(tmp_path, clock)
    assert pending_gauge() == N_BLOCKS

    # A restart holds pending tasks back for min(lease / 2, 30 s) = 15 s.
    again = scheduler(tmp_path, clock)
    assert again.held_by_role()["inference"] == N_BLOCKS
    assert pending_gauge() == 0
    clock.now += 16.0
    again.expire_leases()
    assert pending_gauge() == N_BLOCKS
