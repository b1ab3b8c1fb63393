"""A scheduler that does not trust its callers: verified completions, bounded requests.

The fake worker is a plain gRPC client: it leases every inference task and
completes it without writing anything (as a buggy or forged worker would).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tifffile
from deep3m.client.client import Deep3mClient
from deep3m.core.errors import AlreadyExistsError, InvalidArgumentError
from deep3m.core.geometry import grid_cells
from deep3m.core.store import Store
from deep3m.runtime.healthcheck import check_health
from deep3m.runtime.interceptor import error_detail
from deep3m.runtime.server import RunningServer, create_server
from deep3m.runtime.settings import Settings
from deep3m.runtime.task import CHUNKS_WRITTEN
from deep3m.scheduler.core import Scheduler
from deep3m.testing.clock import ManualClock
from deep3m.testing.scheduler import (
    lease_cells,
    predict_spec,
    save_test_model,
    serve_scheduler,
    write_volume,
)
from deep3m.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, tiling_pb2, tiling_pb2_grpc

N_BLOCKS = 4  # (2, 64, 64) in blocks of (2, 32, 32)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    settings = Settings(
        store_url=f"file://{tmp_path}/store",
        host="127.0.0.1",
        metrics_port=0,
        retry_backoff_seconds=0.0,
    )
    running = serve_scheduler(settings, np.ones((2, 64, 64), np.uint8))
    try:
        yield running
    finally:
        running.stop(grace=1.0)


def lease_all(stub: scheduler_pb2_grpc.SchedulerStub) -> list[common_pb2.TaskLease]:
    reply = stub.LeaseTasks(
        scheduler_pb2.LeaseTasksRequest(worker_id="fake", role="inference", max_tasks=64),
        timeout=10,
    )
    return list(reply.leases)


def test_completions_without_written_chunks_never_finish_the_job(
    server: RunningServer, tmp_path: Path
) -> None:
    with Deep3mClient(server.address) as client:
        job = client.predict(
            "volumes/in.zarr",
            "m1",
            "volumes/out.zarr",
            block_shape=[2, 32, 32],
            halo=[0, 4, 4],
            max_attempts=2,
        )
        with grpc.insecure_channel(server.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            refused = 0
            for _attempt in range(2):
                leases = lease_all(stub)
                assert len(leases) == N_BLOCKS
                for lease in leases:
                    claimed = {} if refused % 2 else {CHUNKS_WRITTEN: lease_cells(lease) - 1}
                    with pytest.raises(grpc.RpcError) as err:
                        stub.CompleteTask(
                            scheduler_pb2.CompleteTaskRequest(
                                lease_id=lease.lease_id,
                                worker_id="fake",
                                metrics={"voxels": 2048.0, **claimed},
                            ),
                            timeout=10,
                        )
                    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                    assert "does not count" in (err.value.details() or "")
                    refused += 1
        done = client.wait(job.id, timeout_s=30)
    assert done.state == common_pb2.JOB_STATE_FAILED
    assert done.stages[0].tasks_done == 0 and done.stages[0].tasks_quarantined == N_BLOCKS
    assert "chunks_written" in done.errors[0].message
    store = Store(f"file://{tmp_path}/store")
    assert not store.volume_info("volumes/out.zarr").complete
    assert store.list(f"jobs/{job.id}/done/predict") == []


def test_a_lost_completion_record_keeps_the_output_incomplete(tmp_path: Path) -> None:
    settings = Settings(store_url=f"file://{tmp_path}/store", metrics_port=0)
    store = Store(settings.store_url)
    write_volume(store, "volumes/in.zarr", np.ones((2, 64, 64), np.uint8))
    save_test_model(store, "m1")
    scheduler = Scheduler(settings, clock=ManualClock())
    scheduler.recover()
    job = scheduler.submit(predict_spec("volumes/out.zarr", block_shape=[2, 64, 32]), "j")
    first, second = scheduler.lease("w", "inference", 2)
    for grant in (first, second):
        assert grant.task.block is not None
        cells = grid_cells(grant.task.block.core, grant.volumes["output"].grid)
        scheduler.complete(grant.lease_id, "w", {CHUNKS_WRITTEN: float(cells)})
        if grant is first:  # the record of the first block vanishes from the store
            store.delete(f"jobs/{job.id}/done/predict/{first.task.number}")
    view = scheduler.get(job.id)
    assert view.state == "FAILED"
    assert any("only 1 of 2 task(s) have a completion record" in e.message for e in view.errors)
    assert not store.volume_info("volumes/out.zarr").complete


def _scheduler_with_job(tmp_path: Path, data: np.ndarray) -> tuple[Scheduler, Store, str]:
    settings = Settings(store_url=f"file://{tmp_path}/store", metrics_port=0)
    store = Store(settings.store_url)
    write_volume(store, "volumes/in.zarr", data)
    save_test_model(store, "m1")
    scheduler = Scheduler(settings, clock=ManualClock())
    scheduler.recover()
    job = scheduler.submit(predict_spec("volumes/out.zarr", block_shape=[2, 64, 32]), "j")
    return scheduler, store, job.id


def _complete_blocks(scheduler: Scheduler, store: Store) -> None:
    """Lease both blocks, write their cores as the data says (zeros leave the chunks
    unwritten) and complete them with the chunks they own."""
    for grant in scheduler.lease("w", "inference", 2):
        assert grant.task.block is not None
        core = grant.task.block.core
        target = store.open_volume("volumes/out.zarr", mode="r+", require_complete=False)
        source = store.open_volume("volumes/in.zarr")
        target[core.slices()] = np.asarray(source[core.slices()], np.float32)
        cells = grid_cells(core, grant.volumes["output"].grid)
        scheduler.complete(grant.lease_id, "w", {CHUNKS_WRITTEN: float(cells)})


def test_an_all_zero_prediction_is_counted_from_its_records(tmp_path: Path) -> None:
    scheduler, store, job_id = _scheduler_with_job(tmp_path, np.zeros((2, 64, 64), np.uint8))
    _complete_blocks(scheduler, store)
    # zarr stores no object for a chunk holding only the fill value: nothing to count.
    chunk_files = [p for p in (tmp_path / "store/volumes/out.zarr/0").rglob("*") if p.is_file()]
    assert [p.name for p in chunk_files] == ["zarr.json"]
    assert scheduler.get(job_id).state == "RUNNING"  # on to the finalize stage
    assert store.volume_info("volumes/out.zarr").complete
    np.testing.assert_array_equal(store.open_volume("volumes/out.zarr")[:], 0.0)


def test_a_record_short_of_its_chunks_keeps_the_output_incomplete(tmp_path: Path) -> None:
    scheduler, store, job_id = _scheduler_with_job(tmp_path, np.ones((2, 64, 64), np.uint8))
    (first, second) = scheduler.lease("w", "inference", 2)
    for grant in (first, second):
        assert grant.task.block is not None
        cells = grid_cells(grant.task.block.core, grant.volumes["output"].grid)
        scheduler.complete(grant.lease_id, "w", {CHUNKS_WRITTEN: float(cells)})
        if grant is first:  # its record is rewritten, claiming one chunk fewer
            key = f"jobs/{job_id}/done/predict/{first.task.number}"
            record = store.read_json(key)
            record["metrics"][CHUNKS_WRITTEN] = float(cells - 1)
            store.write_json(key, record)
    view = scheduler.get(job_id)
    assert view.state == "FAILED"
    assert any(
        f"completion record of task {first.task.number}" in e.message and e.code == "DATA_LOSS"
        for e in view.errors
    ), view.errors
    assert not store.volume_info("volumes/out.zarr").complete


def stub_for(server: RunningServer) -> tuple[grpc.Channel, scheduler_pb2_grpc.SchedulerStub]:
    channel = grpc.insecure_channel(server.address)
    return channel, scheduler_pb2_grpc.SchedulerStub(channel)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_oversized_fields_are_refused_naming_the_field_without_echoing_it(
    server: RunningServer,
) -> None:
    channel, stub = stub_for(server)
    with channel:
        spec = predict_spec("volumes/out.zarr", block_shape=[2, 32, 32])
        spec.name = "n" * 5_000_000
        err = rpc_error(lambda: stub.SubmitJob(scheduler_pb2.SubmitJobRequest(spec=spec)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_detail(err).field == "name"
        assert len(err.details() or "") < 200
        long_id = "j" * 100_000
        for call in (
            lambda: stub.SubmitJob(
                scheduler_pb2.SubmitJobRequest(
                    spec=predict_spec("volumes/o.zarr", block_shape=[2, 32, 32]), job_id=long_id
                )
            ),
            lambda: stub.GetJob(scheduler_pb2.GetJobRequest(job_id=long_id)),
            lambda: stub.GetJob(scheduler_pb2.GetJobRequest(job_id="j" * 500)),
        ):
            err = rpc_error(call)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_detail(err).field == "job_id"
            assert len(err.details() or "") < 200
        spec = predict_spec("volumes/out.zarr", block_shape=[2, 32, 32])
        spec.predict.members.extend(["1fm"] * 2000)
        err = rpc_error(lambda: stub.SubmitJob(scheduler_pb2.SubmitJobRequest(spec=spec)))
        assert error_detail(err).field == "members"
        assert "2000 entries" in (err.details() or "")
        lease = scheduler_pb2.LeaseTasksRequest(
            worker_id="w", role="inference", lease_seconds=float("nan")
        )
        err = rpc_error(lambda: stub.LeaseTasks(lease))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_detail(err).field == "lease_seconds"
    assert check_health(server.address) == "SERVING"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_voxel_sizes_must_be_finite(server: RunningServer, tmp_path: Path, bad: float) -> None:
    source = tmp_path / "stack.tif"
    tifffile.imwrite(source, np.zeros((2, 16, 16), np.uint8))
    with Deep3mClient(server.address) as client:
        with pytest.raises(InvalidArgumentError, match="finite") as err:
            client.ingest(str(source), "volumes/ingested.zarr", voxel_size_nm=[40.0, bad, 4.0])
        assert err.value.field == "voxel_size_nm"
    assert not Store(f"file://{tmp_path}/store").exists("volumes/ingested.zarr")


def test_listing_pages_its_replies(server: RunningServer) -> None:
    with Deep3mClient(server.address) as client:
        ids = {
            client.predict(
                "volumes/in.zarr",
                "m1",
                f"volumes/out{i}.zarr",
                block_shape=[2, 32, 32],
                halo=[0, 4, 4],
            ).id
            for i in range(5)
        }
        channel, stub = stub_for(server)
        with channel:
            pages, token = [], ""
            while True:
                reply = stub.ListJobs(
                    scheduler_pb2.ListJobsRequest(limit=2, page_token=token), timeout=10
                )
                pages.append([j.id for j in reply.jobs])
                token = reply.next_page_token
                if not token:
                    break
            assert [len(p) for p in pages] == [2, 2, 1]
            assert {i for p in pages for i in p} == ids
            err = rpc_error(lambda: stub.ListJobs(scheduler_pb2.ListJobsRequest(limit=5000)))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            err = rpc_error(lambda: stub.ListJobs(scheduler_pb2.ListJobsRequest(page_token="../x")))
            assert error_detail(err).field == "page_token"
        assert {j.id for j in client.jobs()} == ids
        assert len(client.jobs(limit=3)) == 3


def test_one_job_per_output_and_no_urls_as_paths(server: RunningServer, tmp_path: Path) -> None:
    with Deep3mClient(server.address) as client:
        first = client.predict("volumes/in.zarr", "m1", "volumes/out.zarr", halo=[0, 4, 4])
        for overwrite in (False, True):
            with pytest.raises(AlreadyExistsError, match=f"being written by job '{first.id}'"):
                client.predict(
                    "volumes/in.zarr", "m1", "volumes/out.zarr", halo=[0, 4, 4], overwrite=overwrite
                )
        client.cancel(first.id)
        # Cancelled: its incomplete output no longer blocks a new job.
        second = client.predict("volumes/in.zarr", "m1", "volumes/out.zarr", halo=[0, 4, 4])
        assert second.state == common_pb2.JOB_STATE_PENDING
        with pytest.raises(InvalidArgumentError, match="is a URL") as err:
            client.predict("volumes/in.zarr", "m1", "s3://other-bucket/x.zarr")
        assert err.value.field == "output.path"
    assert not (tmp_path / "store" / "s3:").exists()


@pytest.mark.parametrize("array", ["../../..", "0/../..", "labels/../../x", "/etc", "a//b"])
def test_array_names_that_leave_their_volume_are_invalid_not_internal(
    tmp_path: Path, array: str
) -> None:
    settings = Settings(store_url=f"file://{tmp_path}/store", metrics_port=0, worker_enabled=False)
    write_volume(Store(settings.store_url), "volumes/in.zarr", np.zeros((2, 8, 8), np.uint8))
    running = create_server("tiling", settings, port=0, host="127.0.0.1")
    try:
        channel, _ = stub_for(running)
        with channel:
            describe = tiling_pb2_grpc.TilingStub(channel).Describe
            ref = common_pb2.VolumeRef(path="volumes/in.zarr", array=array)
            err = rpc_error(lambda: describe(tiling_pb2.DescribeRequest(volume=ref), timeout=10))
    finally:
        running.stop(grace=1.0)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert error_detail(err).field.endswith("array")
