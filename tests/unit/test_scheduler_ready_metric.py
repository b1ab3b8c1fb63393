"""``deep3m_tasks_ready``, what KEDA scales on: pending tasks less those held back.

A task waiting out its retry backoff is pending but not leasable; counting it
(as ``deep3m_tasks_pending`` does) would start a GPU pod that finds nothing to do.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from deep3m.core.store import Store
from deep3m.runtime.settings import Settings
from deep3m.scheduler.app import publish_ready_tasks
from deep3m.scheduler.core import Scheduler
from deep3m.scheduler.jobs import JobError
from deep3m.testing.clock import ManualClock
from deep3m.testing.scheduler import predict_spec, save_test_model, write_volume
from prometheus_client import generate_latest


def scraped(name: str, role: str) -> float:
    exposition = generate_latest().decode()
    found = re.search(rf'^{name}\{{role="{role}"\}} ([0-9.e+-]+)$', exposition, re.MULTILINE)
    assert found is not None, (name, role)
    return float(found.group(1))


def test_tasks_in_retry_backoff_are_pending_but_not_ready(tmp_path: Path) -> None:
    settings = Settings(store_url=str(tmp_path), retry_backoff_seconds=60.0, metrics_port=0)
    store = Store(settings.store_url)
    write_volume(store, "volumes/in.zarr", np.ones((4, 64, 64), np.uint8))
    save_test_model(store, "m1")
    clock = ManualClock()
    scheduler = Scheduler(settings, clock=clock)
    scheduler.recover()
    scheduler.submit(predict_spec("volumes/out.zarr", block_shape=(4, 32, 32)))
    publish_ready_tasks(scheduler)
    try:
        assert scraped("deep3m_tasks_ready", "inference") == 4
        (grant,) = scheduler.lease("pod-a", "inference", 1)
        scheduler.fail(grant.lease_id, "pod-a", JobError("UNAVAILABLE", "flaky"), True)
        # Back in the queue, but not leasable for a minute: no worker for it yet.
        assert scheduler.pending_by_role()["inference"] == 4
        assert scraped("deep3m_tasks_ready", "inference") == 3
        clock.now += 61
        assert scraped("deep3m_tasks_ready", "inference") == 4
        assert scraped("deep3m_tasks_ready", "training") == 0
    finally:
        publish_ready_tasks(None)
    assert scraped("deep3m_tasks_ready", "inference") == 0
