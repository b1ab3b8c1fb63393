"""Scheduler restart with a long history, on S3 (SeaweedFS on loopback).

The store holds FINISHED finished jobs and RUNNING running predict jobs (each
with some of its blocks done). Timed: a fresh ``Scheduler.recover()`` — what a
restarted scheduler does behind its NOT_SERVING health before it serves — with
the index of finished jobs (finished jobs are not read; running ones are read
in parallel); median of REPEATS. Baseline, on the same store: the same
restart without the index (every job's ``job.json`` and ``result.json`` read,
in parallel, as before the index existed; it is removed first), run once: it
makes some 40,000 S3 requests.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from deep3m.core.executor import bounded_map
from deep3m.core.store import Store
from deep3m.runtime.settings import Settings
from deep3m.scheduler.core import Scheduler
from deep3m.scheduler.persistence import FINISHED_KEY, JobStore
from deep3m.testing.scheduler import predict_spec, save_test_model, write_volume
from deep3m.testing.seaweed import seaweed_server

FINISHED = 10_000
RUNNING = 10
REPEATS = 3
SHAPE = (8, 64, 64)
BLOCK = [1, 32, 32]  # 32 blocks a job


def _populate(settings: Settings) -> Store:
    store = Store(settings.store_url, settings.storage_options())
    write_volume(store, "volumes/in.zarr", np.zeros(SHAPE, dtype=np.uint8))
    save_test_model(store, "m1")
    s = Scheduler(settings, store=store)
    s.recover()
    # One real finished job, whose documents the other finished ones copy.
    first = s.submit(predict_spec("volumes/done.zarr", block_shape=BLOCK), job_id="done-0").id
    for role in ("inference", "postprocess"):
        grants = s.lease("w", role, 256)
        s.complete_many("w", [(g.lease_id, {"voxels": 1.0}, {}) for g in grants])
    assert s.get(first).state == "SUCCEEDED"
    for i in range(RUNNING):
        job_id = s.submit(
            predict_spec(f"volumes/run{i}.zarr", block_shape=BLOCK), job_id=f"run-{i}"
        ).id
        grants = [g for g in s.lease("w", "inference", 8) if g.job_id == job_id]
        s.complete_many("w", [(g.lease_id, {"voxels": 1.0}, {}) for g in grants])
    job_doc = store.read_bytes(f"jobs/{first}/job.json")
    result_doc = store.read_bytes(f"jobs/{first}/result.json")
    entry = JobStore(store).finished_index()[first]

    def copy(i: int) -> None:
        job_id = f"done-{i}"
        store.write_bytes(
            f"jobs/{job_id}/job.json", job_doc.replace(b'"done-0"', f'"{job_id}"'.encode())
        )
        store.write_bytes(f"jobs/{job_id}/result.json", result_doc)

    for _ in bounded_map(copy, range(1, FINISHED), 16):
        pass
    JobStore(store).index_finished({f"done-{i}": entry for i in range(FINISHED)})
    s.stop()
    return store


def _restart(settings: Settings) -> tuple[float, Scheduler]:
    store = Store(settings.store_url, settings.storage_options())
    started = time.perf_counter()
    s = Scheduler(settings, store=store)
    s.recover()
    return time.perf_counter() - started, s


def _first_get(s: Scheduler) -> float:
    started = time.perf_counter()
    assert s.get(f"done-{FINISHED // 2}").state == "SUCCEEDED"
    return time.perf_counter() - started


def main() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp,
        seaweed_server(Path(tmp) / "s3", bucket="bench-recovery") as server,
    ):
        env = server.settings_env()
        settings = Settings(
            store_url=server.url("deep3m"),
            s3_endpoint_url=env["DEEP3M_S3_ENDPOINT_URL"],
            s3_region=env["DEEP3M_S3_REGION"],
            s3_access_key_id=env["DEEP3M_S3_ACCESS_KEY_ID"],
            s3_secret_access_key=env["DEEP3M_S3_SECRET_ACCESS_KEY"],
            metrics_port=0,
            log_level="WARNING",
        )
        started = time.perf_counter()
        store = _populate(settings)
        print(
            f"store: {FINISHED:,} finished and {RUNNING} running jobs on SeaweedFS "
            f"(written in {time.perf_counter() - started:.0f} s)"
        )
        with_index = []
        for _ in range(REPEATS):
            seconds, s = _restart(settings)
            with_index.append(seconds)
            assert len(s.list_jobs(states=["RUNNING", "PENDING"])) == RUNNING
        fast = statistics.median(with_index)
        print(f"  restart with the index of finished jobs (median of {REPEATS}) {fast:8.2f} s")
        print(f"  first GetJob of a finished job after it   {_first_get(s):8.3f} s", flush=True)
        store.delete(FINISHED_KEY)
        slow, s = _restart(settings)
        assert len(s.list_jobs(states=["SUCCEEDED"])) == FINISHED
        print(f"  baseline: every job read (no index, once) {slow:8.2f} s")
        print(f"  ratio baseline / indexed                  {slow / fast:8.1f}")


if __name__ == "__main__":
    main()
