"""The sharded labelling stages run as a ``label`` job on postprocess worker processes.

A scheduler process and N ``deep3m serve postprocess`` processes, each pinned to
one core (``sched_setaffinity``), label a stored probability volume of many
blocks: threshold + connected components joined across blocks + object table
(+ the label pyramid), measured from submit to the job's end, so scheduling,
leases and store I/O are included. Start-up is not. Each worker holds
``capacity`` leases at once (leased together, completions batched), so one
task's store reads and writes overlap another's compute on the same core.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from deep3m.client.client import Deep3mClient
from deep3m.launcher.local import LocalCluster, LocalClusterSpec, free_port, wait_serving
from deep3m.v1 import common_pb2


@dataclass(frozen=True)
class JobRun:
    seconds: float
    job: common_pb2.Job
    # Stage name → wall seconds from its planning to its last event.
    stage_seconds: dict[str, float]
    # Largest peak resident set (VmHWM) among the worker processes, MB.
    worker_peak_mb: float
    # CPU seconds (user + system) the job cost the scheduler and all workers together:
    # the scheduler is not pinned, so on 2 cores it takes from the workers' share.
    scheduler_cpu_s: float
    workers_cpu_s: float


def _pin(pid: int, core: int) -> None:
    """Pin every thread of process ``pid`` to ``core`` (threads it starts later inherit).

    From the parent, not through ``preexec_fn``: that runs Python in the forked child
    of a threaded process (zarr's I/O thread) and can deadlock there."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(tid), {core})


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def label_job(
    store_url: str,
    volume: str,
    workers: int,
    block_shape: Sequence[int],
    *,
    tag: str,
    capacity: int = 2,
) -> JobRun:
    """A label job of ``volume`` on ``workers`` single-core postprocess processes."""
    env = {"DEEP3M_POLL_INTERVAL_SECONDS": "0.02", "DEEP3M_WORKER_CAPACITY": str(capacity)}
    cores = sorted(os.sched_getaffinity(0))
    spec = LocalClusterSpec(store_url=store_url, roles=("scheduler",), extra_env=env)
    names = [f"postprocess-{n}" for n in range(workers)]
    with LocalCluster(spec) as cluster:
        cluster.start(free_ports=True)
        for n, name in enumerate(names):
            port = free_port()
            cluster.processes[name] = subprocess.Popen(
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
            )
            core = cores[n % len(cores)]
            _pin(cluster.processes[name].pid, core)
            wait_serving(f"127.0.0.1:{port}", cluster.processes[name], 120, "postprocess")
            _pin(cluster.processes[name].pid, core)  # threads started before the first pin
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        pids = {n: cluster.processes[n].pid for n in ("scheduler", *names)}
        cpu_before = {n: _cpu_s(pid) for n, pid in pids.items()}
        with Deep3mClient(cluster.scheduler_address, timeout_s=60) as client:
            started = time.perf_counter()
            job = client.label(
                volume,
                output=f"volumes/bench-labels-{tag}.zarr",
                block_shape=list(block_shape),
                job_id=f"bench-label-{tag}",
            )
            for event in client.watch(job.id, timeout_s=3600):
                if event.stage:
                    first.setdefault(event.stage, event.time_unix_s)
                    last[event.stage] = event.time_unix_s
                if event.terminal:
                    break
            seconds = time.perf_counter() - started
            final = client.get(job.id)
        cpu = {n: _cpu_s(pid) - cpu_before[n] for n, pid in pids.items()}
        peak = max(_peak_rss_mb(cluster.processes[name].pid) for name in names)
    if final.state != common_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"label job failed: {[e.message for e in final.errors]}")
    stages = [s.name for s in final.stages]
    # A stage runs from its planning until the next one is planned (the last: until its end).
    ends = [first.get(n, 0.0) for n in stages[1:]] + [last.get(stages[-1], 0.0)]
    durations = {n: max(0.0, e - first.get(n, e)) for n, e in zip(stages, ends, strict=True)}
    workers_cpu = sum(cpu[n] for n in names)
    return JobRun(seconds, final, durations, peak, cpu["scheduler"], workers_cpu)
