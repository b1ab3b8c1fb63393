"""The scheduler under load (soak): many clients submitting and watching small predict
jobs while worker processes lease and complete over loopback gRPC.

``python -m bench load [--clients 64] [--jobs-per-client 8] [--workers 8]``: a warm-up
round (one job per client) then the measured one; prints jobs/s, LeaseTasks latency
p50/p99 (every call of every worker), health-check latency under load beside the same
check on the idle scheduler a moment before (the baseline), the scheduler's RSS before
and after the measured round, and whether any task was lost or run twice. The test
variant is ``tests/integration/test_load.py``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

from deep3m.testing.load import LoadSpec, describe, percentile, run_load


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench load")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--jobs-per-client", type=int, default=8)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(list(argv))
    spec = LoadSpec(
        clients=args.clients, jobs_per_client=args.jobs_per_client, workers=args.workers
    )
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        result = run_load(spec, Path(tmp))
    for line in describe(spec, result):
        print(f"  {line}")
    idle = percentile(result.idle_health_s, 50)
    print(
        f"  ratio health p50 under load / idle          "
        f"{percentile(result.health_s, 50) / max(idle, 1e-9):8.1f}"
    )
    print(
        f"  ratio lease p50 / idle health p50           "
        f"{percentile(result.lease_s, 50) / max(idle, 1e-9):8.1f}"
    )
    lost = result.tasks_expected - len(result.executions)
    states = sorted(set(result.jobs.values()))
    print(
        f"  tasks expected {result.tasks_expected:,}, run {result.tasks_done:,}, lost {lost}, "
        f"twice {len(result.duplicated)}; job states {states}"
    )
    if lost or result.duplicated or states != ["SUCCEEDED"] or result.health_failures:
        raise SystemExit("the load round lost, repeated or failed something (see above)")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
