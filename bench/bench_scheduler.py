"""Scheduler capacity: lease→complete round trips, and planning a million-block job.

1. Task completions per second over loopback gRPC: 8 worker *processes* each
   loop ``LeaseTasks(max_tasks=BATCH)`` → ``CompleteTasks`` (all of them in
   one call) against one scheduler (file:// store, so every call writes its
   records, one document per call), and the same one task at a time
   (``LeaseTasks(max_tasks=1)`` → ``CompleteTask``). Baseline, side by side:
   the same 8 processes making unary calls in pairs to a bare gRPC health
   ``Check`` on a server built the same way (thread pool, error interceptor)
   — the transport's ceiling for one task per round trip on this machine.
2. Submitting a predict job of 1,000,000 blocks: validate, create the output
   volume, persist the job and its plan, build the queue; wall time (median)
   and peak traced memory, plus the time a restarted scheduler needs to
   resume it. Baseline: materialising blocks as Python objects (what a
   task-list design would hold), measured on 100,000 blocks and scaled ×10.

Figures are medians of REPEATS runs. The machine's cores are shared with the
workers, so both sides of each ratio pay the same contention.
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing as mp
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from concurrent import futures
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import grpc
from deep3m.core.geometry import BlockPlan
from deep3m.core.store import Store
from deep3m.runtime.interceptor import ErrorMappingInterceptor
from deep3m.runtime.server import create_server
from deep3m.runtime.settings import Settings
from deep3m.scheduler.app import SchedulerApp
from deep3m.scheduler.core import Scheduler
from deep3m.testing.scheduler import save_test_model
from deep3m.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

WORKERS = 8
BATCH = 64
REPEATS = 3
SECONDS = 2.0
BIG_SHAPE = (100, 6400, 6400)  # with (1, 64, 64) blocks: 100 x 100 x 100 = 1,000,000 blocks
BIG_BLOCK = [1, 64, 64]
NAIVE_SAMPLE = 100_000


# -- worker processes --------------------------------------------------------------
def _lease(stub: scheduler_pb2_grpc.SchedulerStub, worker: str, n: int) -> list[Any]:
    reply = stub.LeaseTasks(
        scheduler_pb2.LeaseTasksRequest(
            worker_id=worker, role="inference", max_tasks=n, lease_seconds=60
        ),
        timeout=10,
    )
    return list(reply.leases)


def _complete_batch(stub: scheduler_pb2_grpc.SchedulerStub, worker: str) -> int:
    request = scheduler_pb2.CompleteTasksRequest(worker_id=worker)
    for lease in _lease(stub, worker, BATCH):
        request.completions.add(lease_id=lease.lease_id).metrics["voxels"] = 4096.0
    if not request.completions:
        return 0
    results = stub.CompleteTasks(request, timeout=10).results
    return sum(1 for r in results if not r.error.code)


def _complete_one(stub: scheduler_pb2_grpc.SchedulerStub, worker: str) -> int:
    count = 0
    for lease in _lease(stub, worker, 1):
        request = scheduler_pb2.CompleteTaskRequest(lease_id=lease.lease_id, worker_id=worker)
        request.metrics["voxels"] = 4096.0
        stub.CompleteTask(request, timeout=10)
        count += 1
    return count


def _drive(
    address: str,
    worker: str,
    seconds: float,
    barrier: Barrier,
    step: Callable[[scheduler_pb2_grpc.SchedulerStub, str], int],
) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        barrier.wait()
        count = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            count += step(stub, worker)
        return count


def _batched_worker(address: str, worker: str, seconds: float, barrier: Barrier) -> int:
    return _drive(address, worker, seconds, barrier, _complete_batch)


def _scheduler_worker(address: str, worker: str, seconds: float, barrier: Barrier) -> int:
    return _drive(address, worker, seconds, barrier, _complete_one)


def _echo_worker(address: str, worker: str, seconds: float, barrier: Barrier) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        barrier.wait()
        count = 0
        end = time.perf_counter() + seconds
        request = health_pb2.HealthCheckRequest(service="")
        while time.perf_counter() < end:
            stub.Check(request, timeout=10)
            stub.Check(request, timeout=10)  # two calls: one "round trip"
            count += 1
        return count


def _rate(
    pool: Any, target: Callable[[str, str, float, Barrier], int], address: str, manager: Any
) -> float:
    barrier = manager.Barrier(WORKERS + 1)
    results = [
        pool.apply_async(target, (address, f"w{i}", SECONDS, barrier)) for i in range(WORKERS)
    ]
    barrier.wait()
    started = time.perf_counter()
    total = sum(r.get(timeout=120) for r in results)
    return total / max(time.perf_counter() - started, SECONDS)


def _bare_server() -> tuple[grpc.Server, int]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16), interceptors=[ErrorMappingInterceptor()]
    )
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _predict_spec(output: str, block: list[int]) -> common_pb2.JobSpec:
    return common_pb2.JobSpec(
        predict=common_pb2.PredictSpec(
            input=common_pb2.VolumeRef(path="volumes/in.zarr"),
            model="bench",
            output=common_pb2.VolumeRef(path=output),
            block_shape=block,
            halo=[0, 0, 0],
            tta_level=10,
        )
    )


def round_trips(root: Path) -> tuple[float, float, float]:
    settings = Settings(
        store_url=f"file://{root}/rt", lease_seconds=60, metrics_port=0, log_level="WARNING"
    )
    store = Store(settings.store_url)
    store.create_volume("volumes/in.zarr", (200, 2048, 2048), "uint8", chunk_shape=(1, 64, 64))
    store.mark_complete("volumes/in.zarr")
    save_test_model(store, "bench", halo=(0, 0, 0))
    scheduler = Scheduler(settings)
    scheduler.recover()
    job = scheduler.submit(_predict_spec("volumes/out.zarr", [1, 64, 64]))
    print(f"  job of {job.stages[0].tasks_total:,} blocks to draw from")
    running = create_server(
        "scheduler", settings, app=SchedulerApp(settings, scheduler), port=0, host="127.0.0.1"
    )
    bare, bare_port = _bare_server()
    ctx = mp.get_context("spawn")
    batched_rates, sched_rates, echo_rates = [], [], []
    try:
        with ctx.Manager() as manager, ctx.Pool(WORKERS) as pool:
            for _ in range(REPEATS):  # interleaved, so drift hits all alike
                batched_rates.append(_rate(pool, _batched_worker, running.address, manager))
                sched_rates.append(_rate(pool, _scheduler_worker, running.address, manager))
                echo_rates.append(_rate(pool, _echo_worker, f"127.0.0.1:{bare_port}", manager))
    finally:
        running.stop(grace=1.0)
        bare.stop(1.0).wait()
    return (
        statistics.median(batched_rates),
        statistics.median(sched_rates),
        statistics.median(echo_rates),
    )


def big_job(root: Path) -> dict[str, float]:
    settings = Settings(store_url=f"file://{root}/big", metrics_port=0, log_level="WARNING")
    store = Store(settings.store_url)
    store.create_volume("volumes/in.zarr", BIG_SHAPE, "uint8", chunk_shape=(1, 64, 64))
    store.mark_complete("volumes/in.zarr")
    save_test_model(store, "bench", halo=(0, 0, 0))
    times, resume_times = [], []
    blocks = 0
    for i in range(REPEATS):
        scheduler = Scheduler(settings)
        scheduler.recover()
        gc.collect()
        started = time.perf_counter()
        job = scheduler.submit(_predict_spec(f"volumes/out{i}.zarr", BIG_BLOCK), job_id=f"big{i}")
        times.append(time.perf_counter() - started)
        blocks = job.stages[0].tasks_total
        started = time.perf_counter()
        resumed = Scheduler(settings)
        resumed.recover()
        resume_times.append(time.perf_counter() - started)
        assert resumed.get(f"big{i}").stages[0].tasks_total == blocks
    scheduler = Scheduler(settings)
    scheduler.recover()
    gc.collect()
    tracemalloc.start()
    scheduler.submit(_predict_spec("volumes/traced.zarr", BIG_BLOCK), job_id="traced")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    docs = sum(1 for _ in store.walk_files("jobs/big0"))

    # Baseline: blocks as objects, on a sample, scaled to the full job.
    plan = BlockPlan(BIG_SHAPE, tuple(BIG_BLOCK), (0, 0, 0))
    naive_times = []
    for _ in range(REPEATS):
        gc.collect()
        started = time.perf_counter()
        sample = list(itertools.islice(plan, NAIVE_SAMPLE))
        naive_times.append(time.perf_counter() - started)
        del sample
    gc.collect()
    tracemalloc.start()
    sample = list(itertools.islice(plan, NAIVE_SAMPLE))
    _, naive_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del sample
    scale = blocks / NAIVE_SAMPLE
    return {
        "blocks": blocks,
        "seconds": statistics.median(times),
        "peak_mb": peak / 1e6,
        "resume_seconds": statistics.median(resume_times),
        "documents": docs,
        "naive_seconds": statistics.median(naive_times) * scale,
        "naive_peak_mb": naive_peak / 1e6 * scale,
    }


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-scheduler-") as tmp:
        root = Path(tmp)
        print(
            f"task completions, {WORKERS} worker processes, loopback gRPC, "
            f"median of {REPEATS} x {SECONDS:g} s"
        )
        batched, sched, echo = round_trips(root)
        print(f"  scheduler, batches of {BATCH} (lease + complete) {batched:10,.0f} tasks/s")
        print(f"  scheduler, one task per round trip      {sched:10,.0f} tasks/s")
        print(f"  baseline: bare gRPC, 2 unary calls      {echo:10,.0f} pairs/s")
        print(f"  ratio batched / baseline                {batched / echo:10.2f}")
        print(f"  ratio one at a time / baseline          {sched / echo:10.2f}")
        print()
        print(f"submitting a predict job of 1,000,000 blocks (median of {REPEATS})")
        big = big_job(root)
        print(f"  blocks planned                        {big['blocks']:12,.0f}")
        print(f"  validate + plan + persist + queue     {big['seconds']:12.3f} s")
        print(f"  peak traced memory                    {big['peak_mb']:12.1f} MB")
        print(f"  documents written for the job         {big['documents']:12,.0f}")
        print(f"  resume after a restart                {big['resume_seconds']:12.3f} s")
        print(
            f"  baseline: blocks as objects (x{big['blocks'] / NAIVE_SAMPLE:g} of "
            f"{NAIVE_SAMPLE:,}) {big['naive_seconds']:8.3f} s, {big['naive_peak_mb']:.0f} MB"
        )
        print(
            f"  ratio time  (baseline / deep3m)       {big['naive_seconds'] / big['seconds']:12.1f}"
        )
        print(
            f"  ratio memory (baseline / deep3m)      "
            f"{big['naive_peak_mb'] / max(big['peak_mb'], 1e-9):12.1f}"
        )


if __name__ == "__main__":
    main()
