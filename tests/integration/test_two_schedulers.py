"""Two real scheduler processes on one store: the second is refused until the first dies.

Run on a ``file://`` folder (an flock: released by the kernel when its holder is
SIGKILLed, so the successor claims at once) and on a real S3 server (SeaweedFS:
the epoch fence on conditional writes, claimed only once the killed holder's
TTL ran out).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from deep3m.core.store import Store
from deep3m.launcher.local import free_port
from deep3m.scheduler.fence_lock import LOCK_KEY
from deep3m.scheduler.fencing import FENCE_KEY
from deep3m.testing.scheduler import (
    SchedulerProcess,
    predict_spec,
    save_test_model,
    write_volume,
)
from deep3m.testing.seaweed import SeaweedServer
from deep3m.v1 import scheduler_pb2, scheduler_pb2_grpc
from grpc_health.v1 import health_pb2

TTL_S = 4.0
RENEW_S = 0.5
WAIT_S = 90.0

pytestmark = pytest.mark.slow


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[str, Store, dict[str, str], str]:
    """(store URL, store, settings env, the key of the fence record) of one backend."""
    if request.param == "file":
        store = Store(str(tmp_path / "store"))
        return store.url, store, {}, LOCK_KEY
    server: SeaweedServer = request.getfixturevalue("s3_server")
    url = server.url(f"fence-{tmp_path.name[-12:]}")
    return url, Store(url, server.storage_options), server.settings_env(), FENCE_KEY


def test_a_second_scheduler_is_refused_and_takes_over_once_the_first_dies(
    backend: tuple[str, Store, dict[str, str], str], tmp_path: Path
) -> None:
    url, store, env, fence_key = backend
    write_volume(store, "volumes/in.zarr", np.ones((2, 64, 64), np.uint8))
    save_test_model(store, "m1")
    env = {
        **env,
        "DEEP3M_FENCE_TTL_SECONDS": str(TTL_S),
        "DEEP3M_FENCE_RENEW_SECONDS": str(RENEW_S),
        "DEEP3M_SHUTDOWN_GRACE_SECONDS": "1",
    }

    def scheduler(name: str, wait_s: float) -> SchedulerProcess:
        return SchedulerProcess(
            url,
            free_port(),
            tmp_path / f"{name}.log",
            env={**env, "DEEP3M_FENCE_WAIT_SECONDS": str(wait_s)},
        )

    first = scheduler("first", 0)
    first.start()
    second = scheduler("second", WAIT_S)
    try:
        assert first.process is not None
        with grpc.insecure_channel(first.address) as channel:
            job = scheduler_pb2_grpc.SchedulerStub(channel).SubmitJob(
                scheduler_pb2.SubmitJobRequest(
                    spec=predict_spec("volumes/out.zarr", block_shape=(2, 32, 32)), job_id="j1"
                ),
                timeout=30,
            )
        assert job.id == "j1"

        # A second scheduler on the same store is refused: it exits non-zero, naming
        # the holder (host:pid:nonce).
        refused = scheduler("refused", 0)
        refused.spawn()
        assert refused.wait_exit(WAIT_S) != 0
        said = (tmp_path / "refused.log").read_text()
        assert f":{first.process.pid}:" in said and "holds" in said, said
        assert "only one scheduler may write state" in said

        # One that may wait answers NOT_SERVING while the first one lives ...
        second.spawn()
        assert second.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert json.loads(store.read_bytes(fence_key))["epoch"] == 1

        # ... and takes over once it dies without releasing anything.
        first.kill()
        killed = time.monotonic()
        second.wait_serving(WAIT_S)
        waited = time.monotonic() - killed
        assert second.process is not None
        record = json.loads(store.read_bytes(fence_key))
        assert record["epoch"] == 2
        assert f":{second.process.pid}:" in record["holder"]
        if fence_key == FENCE_KEY:
            # The killed holder's record had at least TTL - RENEW left when it died.
            assert waited >= TTL_S - RENEW_S - 0.25, waited
        with grpc.insecure_channel(second.address) as channel:
            resumed = scheduler_pb2_grpc.SchedulerStub(channel).GetJob(
                scheduler_pb2.GetJobRequest(job_id="j1"), timeout=30
            )
        assert resumed.id == "j1"
        assert second.health() == health_pb2.HealthCheckResponse.SERVING
    finally:
        first.kill()
        second.terminate()
    # A clean stop released the fence: the next one claims at once.
    third = scheduler("third", 0)
    third.start()
    try:
        assert json.loads(store.read_bytes(fence_key))["epoch"] == 3
    finally:
        assert third.terminate() == 0
