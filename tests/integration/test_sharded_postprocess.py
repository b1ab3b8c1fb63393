"""Sharded postprocess through the real services: a scheduler, an inference server and
two postprocess servers (each with its worker) on loopback, driven by the Python client.

Covers: ``predict`` with ``postprocess`` on real EM slices and the standalone ``label``
job; labels equal a whole-volume ``scipy.ndimage.label`` of the thresholded
probabilities up to id order, the object table equals a direct numpy computation,
and both postprocess workers took part.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from deep3m.client.client import Deep3mClient
from deep3m.core.levels import plan_levels
from deep3m.core.store import Store
from deep3m.launcher.local import free_port, wait_serving
from deep3m.postprocess.evaluate import EvaluateSpec, evaluate_volumes
from deep3m.postprocess.pyramid import downsample
from deep3m.postprocess.sharded.table import table_keys
from deep3m.testing.scheduler import roles_in_process, save_random_model, write_volume
from deep3m.testing.volumes import same_partition, smooth_field
from deep3m.v1 import common_pb2
from PIL import Image
from scipy import ndimage

pytestmark = pytest.mark.slow

IMAGES = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cdeep3m-mito" / "training"
).resolve() / "images"
VOXEL_SIZE_NM = (40.0, 6.0, 6.0)  # write_volume's


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"file://{tmp_path_factory.mktemp('sharded')}/store"


@pytest.fixture(scope="module")
def address(store_url: str) -> Iterator[str]:
    roles = ("inference", "postprocess", "postprocess")
    with roles_in_process(store_url, *roles, worker_capacity=1, lease_seconds=3.0) as running:
        yield running


@pytest.fixture(scope="module")
def client(address: str) -> Iterator[Deep3mClient]:
    with Deep3mClient(address, timeout_s=30) as c:
        yield c


def _succeeded(client: Deep3mClient, job: common_pb2.Job) -> common_pb2.Job:
    final = client.wait(job.id, 300)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, [
        (e.task_id, e.message) for e in final.errors
    ]
    return final


def _workers_of(store: Store, job_id: str, stage: str) -> set[str]:
    import json

    prefix = f"jobs/{job_id}/done/{stage}"
    return {
        str(json.loads(store.read_bytes(f"{prefix}/{n}"))["worker_id"]) for n in store.list(prefix)
    }


def check_objects(store: Store, labels_path: str, labels: np.ndarray, prob: np.ndarray) -> int:
    """The stored object table against numpy over the labels as written; returns its length."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(store.read_bytes(table_keys(labels_path)[1]))).to_pydict()
    ids = np.arange(1, int(labels.max()) + 1)
    assert table["label"] == ids.tolist()
    counts = ndimage.sum_labels(np.ones_like(labels), labels, ids)
    np.testing.assert_array_equal(table["volume_voxels"], counts)
    centroids = np.asarray(ndimage.center_of_mass(np.ones_like(labels), labels, ids))
    for axis, name in enumerate("zyx"):
        np.testing.assert_allclose(table[f"centroid_{name}_voxels"], centroids[:, axis])
        np.testing.assert_allclose(
            table[f"centroid_{name}_nm"], centroids[:, axis] * VOXEL_SIZE_NM[axis]
        )
    boxes = ndimage.find_objects(labels)
    for axis, name in enumerate("zyx"):
        np.testing.assert_array_equal(table[f"bbox_{name}0_voxels"], [b[axis].start for b in boxes])
        np.testing.assert_array_equal(table[f"bbox_{name}1_voxels"], [b[axis].stop for b in boxes])
    mean = ndimage.mean(prob, labels, ids)
    np.testing.assert_allclose(table["mean_probability"], mean, rtol=1e-5)
    np.testing.assert_allclose(
        table["volume_nm3"], counts * float(np.prod(VOXEL_SIZE_NM)), rtol=1e-9
    )
    return len(ids)


def check_labels(store: Store, labels_path: str, prob: np.ndarray, threshold: float) -> None:
    labels = np.asarray(store.open_volume(labels_path)[:])
    want, n = ndimage.label(prob >= threshold)
    assert n > 3  # several objects, so the joins across blocks are exercised
    assert same_partition(labels, want)
    assert int(labels.max()) == n  # consecutive ids
    assert check_objects(store, labels_path, labels, prob) == n
    info = store.volume_info(labels_path)
    assert info.complete and info.attributes["object_count"] == n


def test_label_job_shards_over_two_postprocess_workers(
    client: Deep3mClient, store_url: str
) -> None:
    store = Store(store_url)
    prob = smooth_field((6, 64, 96), seed=3)
    write_volume(store, "volumes/label/prob.zarr", prob, chunk_shape=(2, 32, 32))
    job = _succeeded(
        client, client.label("volumes/label/prob.zarr", threshold=0.55, block_shape=[2, 32, 32])
    )
    labels_path = "volumes/label/prob.zarr/labels/segmentation"
    assert job.outputs["labels"] == store.key_url(labels_path)
    assert job.outputs["objects_parquet"] == store.key_url(table_keys(labels_path)[1])
    check_labels(store, labels_path, prob, 0.55)
    stages = {s.name: (s.tasks_done, s.tasks_total) for s in job.stages}
    assert stages["summarize"] == stages["relabel"] == (3 * 2 * 3, 3 * 2 * 3)
    assert stages["merge"] == stages["reduce"] == (1, 1)
    # Both workers took tasks (18 blocks, one task at a time each).
    assert len(_workers_of(store, job.id, "summarize") | _workers_of(store, job.id, "relabel")) == 2
    # The label image is registered in its image; reduce recorded the pyramid (a volume this
    # small keeps level 0 only).
    ome = store.read_json("volumes/label/prob.zarr/labels/zarr.json")["attributes"]["ome"]
    assert ome["labels"] == ["segmentation"]
    assert job.metrics["pyramid_levels"] == 1.0
    assert not any(name.startswith("pyramid") for name in stages)
    # The stages' documents went once the job succeeded; its records stay.
    assert store.list(f"jobs/{job.id}/labelling") == []
    assert store.list(f"jobs/{job.id}/done/merge")


@pytest.mark.parametrize(
    ("block", "level_stages"),
    [
        # 256² blocks, level-1 regions of one 128² chunk: relabel writes level 1 itself.
        ([4, 256, 256], {"pyramid_2": 4}),
        # 128² blocks: a level-1 chunk spans 4 blocks, so level 1 is a stage of its own.
        ([4, 128, 128], {"pyramid_1": 9, "pyramid_2": 4}),
    ],
)
def test_sharded_pyramid_equals_whole_volume_downsampling(
    client: Deep3mClient, store_url: str, block: list[int], level_stages: dict[str, int]
) -> None:
    store = Store(store_url)
    prob = smooth_field((4, 600, 520), seed=4, sigma=4.0)
    source = f"volumes/pyr{block[1]}/prob.zarr"
    write_volume(store, source, prob, chunk_shape=(2, 128, 128))
    job = _succeeded(client, client.label(source, block_shape=block))
    stages = {s.name: s.tasks_total for s in job.stages}
    # Level 1 (4 x 300 x 260) and level 2 (4 x 150 x 130) in regions of one 128² chunk.
    assert {n: t for n, t in stages.items() if n.startswith("pyramid")} == level_stages
    assert job.metrics["pyramid_levels"] == 3.0
    path = f"{source}/labels/segmentation"
    want = np.asarray(store.open_volume(path)[:])
    ome = store.read_json(f"{path}/zarr.json")["attributes"]["ome"]
    datasets = ome["multiscales"][0]["datasets"]
    assert ome["version"] == "0.5" and [d["path"] for d in datasets] == ["0", "1", "2"]
    assert [a["name"] for a in ome["multiscales"][0]["axes"]] == ["z", "y", "x"]
    for n, level in enumerate(plan_levels(prob.shape, VOXEL_SIZE_NM), start=1):
        want = downsample(want, level.factor, "mode")
        got = np.asarray(store.open_volume(path, level.path)[:])
        np.testing.assert_array_equal(got, want)
        assert datasets[n]["coordinateTransformations"] == [
            {"type": "scale", "scale": list(level.scale_nm)},
            {"type": "translation", "translation": list(level.translation_nm)},
        ]
    assert set(np.unique(got)) <= set(np.unique(store.open_volume(path)[:]))


def _real_slices(folder: Path = IMAGES) -> np.ndarray:
    if not folder.is_dir():
        pytest.skip(f"real EM slices missing at {folder}")
    files = sorted(folder.glob("*.png"))[:4]
    return np.stack([np.asarray(Image.open(f))[200:296, 300:428] for f in files]).astype(np.uint8)


def store_key(store: Store, url: str) -> str:
    assert url.startswith(store.url + "/"), url
    return url.removeprefix(store.url + "/")


def check_evaluation(
    store: Store, job: common_pb2.Job, prob_path: str, spec: EvaluateSpec
) -> dict[str, float]:
    """Every figure of the job's evaluation equals the whole-volume reference computation."""
    want = evaluate_volumes((store, prob_path), (store, "volumes/em/gt.zarr"), spec).as_dict()
    got = {k: job.metrics[k] for k in want}
    assert got == pytest.approx(want, abs=1e-12), (got, want)
    written = store.read_json(store_key(store, job.outputs["evaluation"]))
    assert {k: written[k] for k in want} == pytest.approx(want, abs=1e-12)
    assert written["min_size_voxels"] == spec.min_size_voxels
    return want


def test_predict_then_sharded_postprocess_on_real_slices(
    client: Deep3mClient, store_url: str
) -> None:
    store = Store(store_url)
    write_volume(store, "volumes/em/img.zarr", _real_slices(), chunk_shape=(2, 32, 32))
    save_random_model(store, "tiny", frames=1, halo=(0, 16, 16))
    block = [2, 32, 64]
    first = _succeeded(
        client,
        client.predict("volumes/em/img.zarr", "tiny", "volumes/em/p0.zarr", block_shape=block),
    )
    assert [s.name for s in first.stages] == ["predict", "finalize"]
    # A threshold that cuts the random network's output into several objects.
    p0 = np.asarray(store.open_volume("volumes/em/p0.zarr")[:])
    threshold = float(np.round(np.quantile(p0, 0.75), 4))
    assert 0.0 < threshold < 1.0

    # The real mitochondria labels of the same slices are the ground truth.
    truth = _real_slices(IMAGES.parent / "labels")
    assert truth.any()
    write_volume(store, "volumes/em/gt.zarr", truth, chunk_shape=(2, 32, 32))
    job = client.predict(
        "volumes/em/img.zarr", "tiny", "volumes/em/p.zarr",
        block_shape=block, postprocess=True, threshold=threshold,
        ground_truth="volumes/em/gt.zarr", exclusion_zone_voxels=1,
    )  # fmt: skip
    seen = {event.stage for event in client.watch(job.id, timeout_s=300)}
    final = _succeeded(client, job)
    names = [s.name for s in final.stages]
    # No pyramid levels: 96 x 128 fits one level.
    assert names == ["predict", "summarize", "equivalences", "merge", "relabel", "reduce",
                     "evaluate_blocks", "evaluate"]  # fmt: skip
    # One progress stream followed prediction and every postprocess stage.
    assert {"predict", "summarize", "relabel", "reduce"} <= seen
    prob = np.asarray(store.open_volume("volumes/em/p.zarr")[:])
    labels_path = "volumes/em/p.zarr/labels/segmentation"
    check_labels(store, labels_path, prob, np.float32(threshold).item())
    assert final.outputs["labels"] == store.key_url(labels_path)
    assert final.metrics["objects"] == float(ndimage.label(prob >= np.float32(threshold))[1])
    assert store.read_json(f"{labels_path}/zarr.json")["attributes"]["ome"]["multiscales"]
    t = np.float32(threshold).item()
    figures = check_evaluation(
        store, final, "volumes/em/p.zarr", EvaluateSpec(threshold=t, exclusion_zone_voxels=1)
    )
    assert figures["object_true_positives"] + figures["object_false_negatives"] > 0

    # Labelled again with a size filter: the evaluation counts the objects the labels keep.
    sizes = np.bincount(ndimage.label(prob >= t)[0].ravel())[1:]
    min_size = int(np.median(sizes)) + 1
    job = _succeeded(
        client,
        client.label(
            "volumes/em/p.zarr", output="volumes/em/big.zarr", threshold=t,
            min_size_voxels=min_size, block_shape=block, ground_truth="volumes/em/gt.zarr",
        ),
    )  # fmt: skip
    kept = int((sizes >= min_size).sum())
    assert 0 < kept < len(sizes) and job.metrics["objects"] == kept
    filtered = check_evaluation(
        store, job, "volumes/em/p.zarr", EvaluateSpec(threshold=t, min_size_voxels=min_size)
    )
    tp, fp = filtered["object_true_positives"], filtered["object_false_positives"]
    assert tp + fp == kept
    assert store.list(f"jobs/{job.id}/labelling") == []


def test_a_postprocess_worker_killed_mid_stage_changes_nothing(
    client: Deep3mClient, address: str, store_url: str, tmp_path: Path
) -> None:
    store = Store(store_url)
    prob = smooth_field((8, 64, 128), seed=5)
    write_volume(store, "volumes/kill/prob.zarr", prob, chunk_shape=(2, 32, 32))
    reference = client.label(
        "volumes/kill/prob.zarr", output="volumes/kill/ref.zarr", block_shape=[2, 32, 32]
    )
    _succeeded(client, reference)

    # A third worker in its own process, to be killed with SIGKILL while the relabel
    # stage runs; the tasks it held come back when their leases expire.
    port = free_port()
    env = {
        **os.environ,
        "DEEP3M_STORE_URL": store_url, "DEEP3M_GRPC_PORT": str(port), "DEEP3M_HOST": "127.0.0.1",
        "DEEP3M_METRICS_PORT": "0", "DEEP3M_SCHEDULER_ADDRESS": address,
        "DEEP3M_WORKER_ID": "doomed-postprocess", "DEEP3M_LEASE_SECONDS": "3",
        "DEEP3M_POLL_INTERVAL_SECONDS": "0.05",
    }  # fmt: skip
    with open(tmp_path / "doomed.log", "wb") as log:
        doomed = subprocess.Popen(
            [sys.executable, "-m", "deep3m.client.cli", "serve", "postprocess"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_serving(f"127.0.0.1:{port}", doomed, 120, "postprocess")
        job = client.label(
            "volumes/kill/prob.zarr", output="volumes/kill/out.zarr", block_shape=[2, 32, 32]
        )
        for event in client.watch(job.id, timeout_s=300):
            if event.stage == "relabel" and 0 < event.tasks_done < event.tasks_total:
                break
        doomed.send_signal(signal.SIGKILL)
        assert doomed.wait(timeout=30) == -signal.SIGKILL
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait(timeout=30)
    _succeeded(client, job)
    assert "doomed-postprocess" in _workers_of(store, job.id, "summarize")
    got = np.asarray(store.open_volume("volumes/kill/out.zarr")[:])
    np.testing.assert_array_equal(got, np.asarray(store.open_volume("volumes/kill/ref.zarr")[:]))
    for ref_key, out_key in zip(
        table_keys("volumes/kill/ref.zarr"), table_keys("volumes/kill/out.zarr"), strict=True
    ):
        assert store.read_bytes(out_key) == store.read_bytes(ref_key)
    check_labels(store, "volumes/kill/out.zarr", prob, 0.5)


def test_submit_label_from_the_cli_follows_every_stage(address: str, store_url: str) -> None:
    import json

    from deep3m.client.cli import app
    from typer.testing import CliRunner

    store = Store(store_url)
    prob = smooth_field((4, 64, 64), seed=9)
    write_volume(store, "volumes/cli/prob.zarr", prob, chunk_shape=(2, 32, 32))
    truth = (smooth_field((4, 64, 64), seed=10) > 0.6).astype(np.uint8)
    write_volume(store, "volumes/cli/gt.zarr", truth, chunk_shape=(2, 32, 32))
    result = CliRunner().invoke(
        app,
        ["--scheduler", address, "--output", "json", "submit-label", "volumes/cli/prob.zarr",
         "--threshold", "0.6", "--block-shape", "2,32,32", "--name", "cells",
         "--ground-truth", "volumes/cli/gt.zarr", "--exclusion-zone", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    *events, final = [json.loads(line) for line in result.stdout.splitlines()]
    assert final["state"] == "JOB_STATE_SUCCEEDED"
    assert {"summarize", "equivalences", "merge", "relabel", "reduce", "evaluate"} <= {
        e.get("stage") for e in events
    }
    want = evaluate_volumes(
        (store, "volumes/cli/prob.zarr"), (store, "volumes/cli/gt.zarr"),
        EvaluateSpec(threshold=0.6, exclusion_zone_voxels=2),
    ).as_dict()  # fmt: skip
    assert {k: final["metrics"][k] for k in want} == pytest.approx(want, abs=1e-12)
    check_labels(store, "volumes/cli/prob.zarr/labels/cells", prob, 0.6)
