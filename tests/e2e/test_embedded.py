"""End to end through the embedded deployment (`deep3m up`): every role is its
own `deep3m serve <role>` process on loopback with a file:// store, driven by
the same Python client the CLI uses.

Covers: ingest → train → predict on real EM slices; an inference worker killed
with SIGKILL mid-job and replaced (the job finishes with output identical to an
undisturbed run).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from deep3m.client.client import Deep3mClient
from deep3m.core.store import Store
from deep3m.launcher.local import LocalCluster, LocalClusterSpec, free_port
from deep3m.models.card import load_card
from deep3m.testing.scheduler import save_random_model, write_volume
from deep3m.v1 import common_pb2

pytestmark = pytest.mark.slow

SAMPLE = (
    Path(__file__).resolve().parents[2] / "services" / "deep3m" / "data" / "sample" / "cdeep3m-mito"
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    root = tmp_path_factory.mktemp("embedded")
    spec = LocalClusterSpec(
        store_url=str(root / "store"),
        log_dir=root / "logs",
        # Short leases so a killed worker's block is re-queued quickly.
        extra_env={
            "DEEP3M_LEASE_SECONDS": "4",
            "DEEP3M_RETRY_BACKOFF_SECONDS": "0.2",
            "DEEP3M_POLL_INTERVAL_SECONDS": "0.2",
        },
    )
    with LocalCluster(spec) as running:
        running.start(free_ports=True, timeout_s=180)
        yield running


@pytest.fixture()
def client(cluster: LocalCluster) -> Iterator[Deep3mClient]:
    with Deep3mClient(cluster.scheduler_address, timeout_s=30) as c:
        yield c


def _succeeded(client: Deep3mClient, job: common_pb2.Job, timeout_s: float) -> common_pb2.Job:
    final = client.wait(job.id, timeout_s)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, [
        (e.task_id, e.message) for e in final.errors
    ]
    return final


def test_ingest_train_predict(cluster: LocalCluster, client: Deep3mClient) -> None:
    images = SAMPLE / "training" / "images"
    labels = SAMPLE / "training" / "labels"
    if not images.is_dir():
        pytest.skip(f"packaged sample missing at {images}")
    for name, source in (("img", images), ("lbl", labels)):
        job = client.ingest(str(source), f"volumes/e2e/{name}.zarr", voxel_size_nm=[40.0, 5.9, 5.9])
        _succeeded(client, job, 120)
    store = Store(cluster.store_url)
    raw = np.asarray(store.open_volume("volumes/e2e/img.zarr")[:])
    assert raw.dtype == np.uint8 and raw.ndim == 3

    job = client.train(
        "volumes/e2e/img.zarr",
        "volumes/e2e/lbl.zarr",
        "e2e-model",
        validation_images="volumes/e2e/img.zarr",
        validation_labels="volumes/e2e/lbl.zarr",
        architecture="deepem3d",
        width=0.0625,
        members=["1fm", "3fm"],
        iterations=6,
        batch_size=2,
        patch_shape=[64, 64],
        validate_every=3,
        snapshot_every=3,
    )
    _succeeded(client, job, 300)
    card = load_card(store, "e2e-model")
    assert card.member_names == ("1fm", "3fm")
    assert all(m.weights for m in card.members)

    job = client.predict("volumes/e2e/img.zarr", "e2e-model", "volumes/e2e/prob.zarr", tta_level=4)
    _succeeded(client, job, 300)
    prob = np.asarray(store.open_volume("volumes/e2e/prob.zarr")[:])
    assert prob.shape == raw.shape
    assert np.isfinite(prob).all() and prob.min() >= 0.0 and prob.max() <= 1.0
    # Not a constant map: the network responds to the image.
    assert float(prob.std()) > 0.0


def test_inference_worker_killed_mid_job(
    cluster: LocalCluster, client: Deep3mClient, tmp_path: Path
) -> None:
    store = Store(cluster.store_url)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, size=(8, 256, 256), dtype=np.uint8)
    write_volume(store, "volumes/kill/in.zarr", data, chunk_shape=(2, 64, 64))
    save_random_model(store, "kill-model")

    reference = client.predict(
        "volumes/kill/in.zarr", "kill-model", "volumes/kill/ref.zarr", block_shape=[2, 64, 64]
    )
    _succeeded(client, reference, 300)

    job = client.predict(
        "volumes/kill/in.zarr", "kill-model", "volumes/kill/out.zarr", block_shape=[2, 64, 64]
    )
    # Kill the inference worker once some blocks are done and others remain.
    for event in client.watch(job.id, timeout_s=300):
        if event.stage == "predict" and 0 < event.tasks_done < event.tasks_total:
            break
    victim = cluster.processes["inference"]
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    env = {
        **os.environ,
        "DEEP3M_STORE_URL": cluster.store_url,
        "DEEP3M_GRPC_PORT": str(free_port()),  # 0 would mean the role's default port
        "DEEP3M_METRICS_PORT": "0",
        "DEEP3M_HOST": "127.0.0.1",
        "DEEP3M_SCHEDULER_ADDRESS": cluster.scheduler_address,
        "DEEP3M_WORKER_ID": "replacement-inference",
        "DEEP3M_LEASE_SECONDS": "4",
        "DEEP3M_POLL_INTERVAL_SECONDS": "0.2",
    }
    with open(tmp_path / "replacement.log", "wb") as log:
        replacement = subprocess.Popen(
            [sys.executable, "-m", "deep3m.client.cli", "serve", "inference"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            final = _succeeded(client, job, 300)
        finally:
            replacement.send_signal(signal.SIGTERM)
            replacement.wait(timeout=60)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED
    expected = np.asarray(store.open_volume("volumes/kill/ref.zarr")[:])
    got = np.asarray(store.open_volume("volumes/kill/out.zarr")[:])
    np.testing.assert_array_equal(got, expected)
