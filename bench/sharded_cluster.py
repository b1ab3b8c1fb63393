"""The sharded labelling stages run as a ``label`` job on postprocess worker processes.

A scheduler process and N ``deep3m serve postprocess`` processes, each pinned to
one core (``sched_setaffinity``) and taking one task at a time, label a stored
probability volume of many blocks: threshold + connected components joined
across blocks + object table (+ the label pyramid), measured from submit to the
job's end, so scheduling, leases and store I/O are included. Start-up is not.
Every block passes through three per-block stages, so a job of B blocks is
about 3B + 4 + table_shards tasks, each a lease, a completion record in the
store and a worker poll: with small blocks that round trip, not the labelling,
sets the rate.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence

from deep3m.client.client import Deep3mClient
from deep3m.launcher.local import LocalCluster, LocalClusterSpec, free_port, wait_serving
from deep3m.v1 import common_pb2


def _pin(core: int) -> None:
    os.sched_setaffinity(0, {core})


def label_job_seconds(
    store_url: str, volume: str, workers: int, block_shape: Sequence[int], *, tag: str
) -> tuple[float, common_pb2.Job]:
    """Seconds from submitting a label job of ``volume`` to its end, on ``workers``
    single-core postprocess processes; and the finished job."""
    env = {"DEEP3M_POLL_INTERVAL_SECONDS": "0.02", "DEEP3M_WORKER_CAPACITY": "1"}
    cores = sorted(os.sched_getaffinity(0))
    spec = LocalClusterSpec(store_url=store_url, roles=("scheduler",), extra_env=env)
    with LocalCluster(spec) as cluster:
        cluster.start(free_ports=True)
        for n in range(workers):
            port = free_port()
            cluster.processes[f"postprocess-{n}"] = subprocess.Popen(
                [sys.executable, "-m", "deep3m.client.cli", "serve", "postprocess"],
                env={
                    **os.environ,
                    **env,
                    "DEEP3M_STORE_URL": cluster.store_url,
                    "DEEP3M_GRPC_PORT": str(port),
                    "DEEP3M_HOST": "127.0.0.1",
                    "DEEP3M_METRICS_PORT": "0",
                    "DEEP3M_SCHEDULER_ADDRESS": cluster.scheduler_address,
                    "DEEP3M_LOG_FORMAT": "json",
                },
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda core=cores[n % len(cores)]: _pin(core),
            )
            wait_serving(
                f"127.0.0.1:{port}", cluster.processes[f"postprocess-{n}"], 120, "postprocess"
            )
        with Deep3mClient(cluster.scheduler_address, timeout_s=60) as client:
            started = time.perf_counter()
            job = client.label(
                volume,
                output=f"volumes/bench-labels-{tag}.zarr",
                block_shape=list(block_shape),
                job_id=f"bench-label-{tag}",
            )
            final = client.wait(job.id, 3600)
            seconds = time.perf_counter() - started
    if final.state != common_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"label job failed: {[e.message for e in final.errors]}")
    return seconds, final
