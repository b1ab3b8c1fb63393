"""The scheduler under load: 64 clients submitting and watching small jobs while 8
worker processes lease and complete their tasks over loopback gRPC.

No task is lost or run twice, the scheduler's memory stays bounded, health checks
answer within their deadline throughout, and the lease latency is printed. The
longer soak is ``python -m bench load``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from deep3m.testing.load import LoadSpec, describe, run_load

pytestmark = pytest.mark.slow


def test_64_clients_and_8_worker_processes_lose_and_repeat_no_task(tmp_path: Path) -> None:
    spec = LoadSpec(clients=64, jobs_per_client=1, workers=8)
    result = run_load(spec, tmp_path)
    for line in describe(spec, result):
        print(line)
    # A warm-up round and the measured one, one job per client each.
    assert len(result.jobs) == 2 * spec.clients and result.measured_jobs == spec.clients
    assert set(result.jobs.values()) == {"SUCCEEDED"}
    # 4 x 2 x 2 blocks and one finalize task per job, each run exactly once.
    assert result.tasks_expected == len(result.jobs) * 17
    assert result.duplicated == []
    assert result.tasks_done == result.tasks_expected
    assert {k.split("/", 1)[0] for k in result.executions} == set(result.jobs)
    # Health answered within its deadline the whole time (streams hold no unary thread).
    assert result.health_s and not result.health_failures
    assert max(result.health_s) < spec.health_deadline_s
    # Bounded memory: 64 more finished jobs cost the scheduler well under 0.5 MB each
    # (they stay in memory until pruned after finished_job_retention_days).
    assert result.rss_after_mb - result.rss_before_mb < 32.0
    assert result.lease_s
