"""A predict job succeeds only when its workers say they wrote every chunk.

The fake worker is a plain gRPC client: it leases every inference task and
completes it without writing anything (as a buggy or forged worker would).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from deep3m.client.client import Deep3mClient
from deep3m.core.store import Store
from deep3m.runtime.server import RunningServer, create_server
from deep3m.runtime.settings import Settings
from deep3m.runtime.task import CHUNKS_WRITTEN
from deep3m.scheduler.app import SchedulerApp
from deep3m.scheduler.core import Scheduler
from deep3m.testing.scheduler import lease_cells, save_test_model, write_volume
from deep3m.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

N_BLOCKS = 4  # (2, 64, 64) in blocks of (2, 32, 32)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    settings = Settings(
        store_url=f"file://{tmp_path}/store",
        host="127.0.0.1",
        metrics_port=0,
        retry_backoff_seconds=0.0,
    )
    store = Store(settings.store_url)
    write_volume(store, "volumes/in.zarr", np.ones((2, 64, 64), np.uint8))
    save_test_model(store, "m1")
    scheduler = Scheduler(settings)
    scheduler.recover()
    running = create_server(
        "scheduler", settings, app=SchedulerApp(settings, scheduler), port=0, host="127.0.0.1"
    )
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
