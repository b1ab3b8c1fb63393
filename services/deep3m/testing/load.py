"""Load on a real scheduler: many clients submitting and watching small predict jobs
while worker processes lease and complete their tasks over loopback gRPC.

``run_load(spec, root)`` starts ``deep3m serve scheduler`` (a ``file://`` store under
``root``), ``spec.workers`` worker processes (``python -m deep3m.testing.load worker``:
the real ``Worker`` for the inference and postprocess roles, with handlers that report
the chunks a block owns without writing them), and ``spec.clients`` client threads, each
with its own channel, submitting ``spec.jobs_per_client`` jobs one after another and
following each with ``WatchJob`` to its end. A thread checks the scheduler's health with
a short deadline throughout. Workers record every task they ran and the latency of
every ``LeaseTasks`` call; the result gathers them with the scheduler's RSS before and
after, so a test can assert that no task was lost or run twice.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deep3m.core.store import Store
from deep3m.launcher.local import free_port
from deep3m.runtime.scheduler_client import GrpcSchedulerClient
from deep3m.runtime.settings import Settings
from deep3m.runtime.task import CHUNKS_WRITTEN, TaskContext, TaskResult
from deep3m.runtime.worker import Worker
from deep3m.testing.processes import spawn_module, stop
from deep3m.testing.scheduler import (
    SchedulerProcess,
    lease_cells,
    predict_spec,
    save_test_model,
    write_volume,
)
from deep3m.v1 import common_pb2

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


@dataclass(frozen=True)
class LoadSpec:
    clients: int = 64
    jobs_per_client: int = 1
    # Jobs per client run before the measured round: the scheduler's thread pool and
    # allocator arenas grow once, to the load's size, and are counted in "before".
    warmup_jobs_per_client: int = 1
    workers: int = 8
    # The input volume; each job predicts it in blocks of ``block`` (plus one finalize task).
    shape: tuple[int, int, int] = (4, 32, 32)
    block: tuple[int, int, int] = (1, 16, 16)
    worker_capacity: int = 4
    # The chart's liveness and readiness probes give a check 5 s (timeoutSeconds).
    health_deadline_s: float = 5.0
    health_every_s: float = 0.05
    job_timeout_s: float = 300.0


@dataclass
class LoadResult:
    jobs: dict[str, str]  # job id → final state (warm-up round included)
    measured_jobs: int  # of which in the measured round
    tasks_expected: int  # tasks of every job, from the scheduler's own counts
    executions: Counter[str]  # "job/task" → times a worker ran it
    lease_s: list[float]  # every LeaseTasks call's latency, all workers
    health_s: list[float]  # every health check's latency
    health_failures: list[str]  # checks that failed or did not say SERVING
    rss_before_mb: float
    rss_after_mb: float
    seconds: float  # from the first submit to the last job's end
    idle_health_s: list[float] = field(default_factory=list)  # before any load

    @property
    def tasks_done(self) -> int:
        return sum(self.executions.values())

    @property
    def duplicated(self) -> list[str]:
        return sorted(k for k, n in self.executions.items() if n > 1)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else 0.0


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


# -- the worker process --------------------------------------------------------------
class TimedClient(GrpcSchedulerClient):
    """The gRPC scheduler client, timing every ``LeaseTasks`` call."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.lease_s: list[float] = []
        self._times = threading.Lock()

    def lease(
        self, worker_id: str, role: str, max_tasks: int, lease_seconds: float, *, timeout: float
    ) -> list[common_pb2.TaskLease]:
        started = time.perf_counter()
        try:
            return super().lease(worker_id, role, max_tasks, lease_seconds, timeout=timeout)
        finally:
            with self._times:
                self.lease_s.append(time.perf_counter() - started)


def _worker_main(address: str, out: Path, capacity: int) -> None:
    settings = Settings(
        scheduler_address=address,
        worker_capacity=capacity,
        poll_interval_seconds=0.02,
        lease_seconds=60.0,
        metrics_port=0,
        log_level="WARNING",
    )
    ran: list[str] = []
    ran_lock = threading.Lock()

    def note(ctx: TaskContext) -> None:
        with ran_lock:
            ran.append(f"{ctx.task.job_id}/{ctx.task.id}")

    def predict(ctx: TaskContext) -> TaskResult:
        note(ctx)
        return TaskResult(metrics={CHUNKS_WRITTEN: lease_cells(ctx.lease)})

    def finalize(ctx: TaskContext) -> TaskResult:
        note(ctx)
        return TaskResult()

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    pid = os.getpid()
    clients = [TimedClient(address), TimedClient(address)]
    workers = [
        Worker(settings, "inference", {"predict": predict}, worker_id=f"i{pid}", client=clients[0]),
        Worker(
            settings, "postprocess", {"finalize": finalize}, worker_id=f"p{pid}", client=clients[1]
        ),
    ]
    for w in workers:
        w.start()
    stopping.wait()
    for w in workers:
        w.stop(grace=10.0)
    partial = out.with_suffix(".tmp")
    partial.write_text(json.dumps({"ran": ran, "lease_s": clients[0].lease_s + clients[1].lease_s}))
    partial.rename(out)  # whole or absent: the driver never reads half of it


# -- the driver ------------------------------------------------------------------------
class HealthPoller:
    """Checks health every ``every_s`` with a ``deadline_s`` deadline until stopped."""

    def __init__(self, address: str, deadline_s: float, every_s: float) -> None:
        self.address = address
        self.deadline_s = deadline_s
        self.every_s = every_s
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-poller", daemon=True)

    def _run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="")
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    reply = stub.Check(request, timeout=self.deadline_s)
                    if reply.status != health_pb2.HealthCheckResponse.SERVING:
                        self.failures.append(f"status {reply.status}")
                except grpc.RpcError as err:
                    self.failures.append(f"{err.code()}: {err.details()}")
                self.latencies.append(time.perf_counter() - started)
                self._stop.wait(self.every_s)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _client(
    address: str, spec: LoadSpec, index: int, jobs: int, tag: str
) -> dict[str, tuple[str, int]]:
    """Submit and watch ``jobs`` jobs in turn: job id → (final state, tasks)."""
    from deep3m.client.client import Deep3mClient

    out: dict[str, tuple[str, int]] = {}
    with Deep3mClient(address, timeout_s=60) as client:
        for j in range(jobs):
            output = f"volumes/{tag}-{index}-{j}.zarr"
            job = client.submit(predict_spec(output, block_shape=spec.block, halo=(0, 0, 0)))
            state = ""  # as the watch stream names it
            for event in client.watch(job.id, timeout_s=spec.job_timeout_s):
                state = event.state
                if event.state in TERMINAL:
                    break
            final = client.get(job.id)
            out[job.id] = (state, sum(s.tasks_total for s in final.stages))
    return out


def run_load(spec: LoadSpec, root: Path) -> LoadResult:
    """Run one load round under ``root`` (a fresh folder); see the module docstring."""
    store_url = f"file://{root}/store"
    store = Store(store_url)
    write_volume(store, "volumes/in.zarr", np.zeros(spec.shape, np.uint8), chunk_shape=spec.block)
    save_test_model(store, "m1", halo=(0, 0, 0))
    scheduler = SchedulerProcess(
        store_url,
        free_port(),
        root / "scheduler.log",
        env={
            "DEEP3M_LOG_LEVEL": "WARNING",
            "DEEP3M_LEASE_SECONDS": "60",
            "DEEP3M_MAX_WATCH_STREAMS": str(max(128, 2 * spec.clients)),
        },
    )
    scheduler.start(timeout_s=120)
    assert scheduler.process is not None
    outs = [root / f"worker-{i}.json" for i in range(spec.workers)]
    workers = []
    try:
        for i, out in enumerate(outs):
            args = ["worker", scheduler.address, str(out), str(spec.worker_capacity)]
            workers.append(spawn_module("deep3m.testing.load", args, root / f"worker-{i}.log"))
        with HealthPoller(scheduler.address, spec.health_deadline_s, spec.health_every_s) as idle:
            threading.Event().wait(1.0)  # a baseline second of health checks before the load

        def round_of(jobs_each: int, tag: str) -> dict[str, tuple[str, int]]:
            got: dict[str, tuple[str, int]] = {}
            with ThreadPoolExecutor(spec.clients, thread_name_prefix="load-client") as pool:
                for one in pool.map(
                    lambda i: _client(scheduler.address, spec, i, jobs_each, tag),
                    range(spec.clients),
                ):
                    got.update(one)
            return got

        warmup = round_of(spec.warmup_jobs_per_client, "warmup")
        rss_before = rss_mb(scheduler.process.pid)
        with HealthPoller(scheduler.address, spec.health_deadline_s, spec.health_every_s) as hp:
            started = time.perf_counter()
            jobs = round_of(spec.jobs_per_client, "out")
            seconds = time.perf_counter() - started
        rss_after = rss_mb(scheduler.process.pid)
    finally:
        codes = [stop(w) for w in workers]
        scheduler.terminate()
    missing = [str(o) for o, c in zip(outs, codes, strict=True) if c != 0 or not o.exists()]
    if missing:
        raise RuntimeError(f"worker process(es) failed; see the logs beside {missing}")
    executions: Counter[str] = Counter()
    lease_s: list[float] = []
    for out in outs:
        data: dict[str, Any] = json.loads(out.read_text())
        executions.update(data["ran"])
        lease_s += [float(x) for x in data["lease_s"]]
    jobs.update(warmup)  # every task of both rounds counts: none lost, none twice
    return LoadResult(
        jobs={job_id: state for job_id, (state, _) in jobs.items()},
        measured_jobs=len(jobs) - len(warmup),
        tasks_expected=sum(n for _, n in jobs.values()),
        executions=executions,
        lease_s=lease_s,
        health_s=hp.latencies,
        health_failures=hp.failures,
        rss_before_mb=rss_before,
        rss_after_mb=rss_after,
        seconds=seconds,
        idle_health_s=idle.latencies,
    )


def describe(spec: LoadSpec, result: LoadResult) -> list[str]:
    """The figures of one round, one per line."""
    ms = 1000.0
    return [
        f"{spec.clients} clients x {spec.jobs_per_client} job(s), {spec.workers} worker "
        f"processes: {result.measured_jobs} jobs in {result.seconds:.1f} s "
        f"({result.measured_jobs / max(result.seconds, 1e-9):,.1f} jobs/s); "
        f"{result.tasks_done:,} tasks run in all, {len(result.duplicated)} twice",
        f"lease latency p50 {percentile(result.lease_s, 50) * ms:.2f} ms, "
        f"p99 {percentile(result.lease_s, 99) * ms:.2f} ms ({len(result.lease_s):,} calls)",
        f"health check p50 {percentile(result.health_s, 50) * ms:.2f} ms, "
        f"p99 {percentile(result.health_s, 99) * ms:.2f} ms, "
        f"max {max(result.health_s, default=0.0) * ms:.2f} ms ({len(result.health_s)} checks, "
        f"{len(result.health_failures)} failed); idle p50 "
        f"{percentile(result.idle_health_s, 50) * ms:.2f} ms",
        f"scheduler RSS {result.rss_before_mb:.1f} MB before, {result.rss_after_mb:.1f} MB "
        f"after (+{result.rss_after_mb - result.rss_before_mb:.1f} MB, "
        f"{(result.rss_after_mb - result.rss_before_mb) * 1024 / max(result.measured_jobs, 1):.1f}"
        " KB per job)",
    ]


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m deep3m.testing.load")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="one worker process (started by run_load)")
    worker.add_argument("address")
    worker.add_argument("out", type=Path)
    worker.add_argument("capacity", type=int)
    args = parser.parse_args(argv)
    _worker_main(args.address, args.out, args.capacity)


if __name__ == "__main__":
    main(sys.argv[1:])
