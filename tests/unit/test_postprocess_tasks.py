"""The finalize task of a prediction job without postprocessing: complete; idempotent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from deep3m.core.errors import InvalidArgumentError, NotFoundError
from deep3m.core.locations import StoreRoots
from deep3m.core.store import Store
from deep3m.postprocess.tasks import finalize_predict, handle_finalize_predict
from deep3m.runtime.settings import Settings
from deep3m.runtime.worker import TaskContext, TaskResult
from deep3m.v1 import common_pb2
from scipy import ndimage

SHAPE = (4, 300, 260)


def probability_volume(store: Store, path: str) -> np.ndarray:
    field = ndimage.gaussian_filter(np.random.default_rng(0).random(SHAPE), (0.5, 3, 3))
    prob = ((field - field.min()) / (field.max() - field.min())).astype(np.float32)
    arr = store.create_volume(
        path,
        SHAPE,
        "float32",
        voxel_size_nm=(40.0, 6.0, 6.0),
        chunk_shape=(4, 128, 128),
        attributes={"kind": "probabilities"},
    )
    arr[:] = prob  # written by predict tasks; not yet marked complete
    return prob


def predict_spec(path: str, *, postprocess: bool, threshold: float = 0.0) -> common_pb2.JobSpec:
    return common_pb2.JobSpec(
        predict=common_pb2.PredictSpec(
            output=common_pb2.VolumeRef(path=path), postprocess=postprocess, threshold=threshold
        )
    )


def test_without_postprocess_only_marks_complete(tmp_path: Path) -> None:
    store = Store(f"file://{tmp_path}")
    probability_volume(store, "volumes/p.zarr")
    assert not store.volume_info("volumes/p.zarr").complete
    roots = StoreRoots(store.url)
    outputs, metrics = finalize_predict(predict_spec("volumes/p.zarr", postprocess=False), roots)
    assert outputs == {"probabilities": f"{store.url}/volumes/p.zarr"}
    assert metrics == {}
    assert store.volume_info("volumes/p.zarr").complete
    assert not store.exists("volumes/p.zarr/labels")


def test_the_handler_marks_complete_and_retries_are_harmless(tmp_path: Path) -> None:
    store = Store(f"file://{tmp_path}")
    probability_volume(store, "volumes/p.zarr")
    settings = Settings(store_url=store.url, metrics_port=0, worker_enabled=False)
    lease = common_pb2.TaskLease(
        task=common_pb2.Task(id="t1", job_id="j1", stage="finalize"),
        spec=predict_spec("volumes/p.zarr", postprocess=False),
    )
    ctx = TaskContext(lease, worker_id="w", settings=settings)
    result = handle_finalize_predict(ctx)
    assert isinstance(result, TaskResult)
    assert result.outputs == {"probabilities": f"{store.url}/volumes/p.zarr"}
    before = {k: store.read_bytes(k) for k in store.walk_files("volumes")}
    assert handle_finalize_predict(ctx) == result  # a retried task
    assert before == {k: store.read_bytes(k) for k in store.walk_files("volumes")}


def test_bad_specs(tmp_path: Path) -> None:
    roots = StoreRoots(Store(f"file://{tmp_path}").url)
    with pytest.raises(InvalidArgumentError) as kind:
        finalize_predict(common_pb2.JobSpec(ingest=common_pb2.IngestSpec(source="x")), roots)
    assert kind.value.field == "spec"
    with pytest.raises(NotFoundError):
        finalize_predict(predict_spec("volumes/none.zarr", postprocess=False), roots)
    # Postprocessing is the sharded stages' work; finalize refuses it, writing nothing.
    with pytest.raises(InvalidArgumentError) as sharded:
        finalize_predict(predict_spec("volumes/none.zarr", postprocess=True), roots)
    assert sharded.value.field == "postprocess"


def test_the_handler_uses_the_output_resolved_at_submit(tmp_path: Path) -> None:
    store = Store(f"file://{tmp_path}")
    probability_volume(store, "volumes/p.zarr")
    settings = Settings(store_url=store.url, metrics_port=0, worker_enabled=False)
    resolved = common_pb2.ResolvedVolume(
        store_url=store.url, path="volumes/p.zarr", shape=SHAPE, dtype="float32"
    )
    lease = common_pb2.TaskLease(
        task=common_pb2.Task(id="t1", job_id="j1", stage="finalize"),
        # The spec's reference is not looked at again: the lease's volume is the one.
        spec=predict_spec("volumes/not-resolved-again.zarr", postprocess=False),
        volumes={"output": resolved},
    )
    result = handle_finalize_predict(TaskContext(lease, worker_id="w", settings=settings))
    assert result.outputs == {"probabilities": f"{store.url}/volumes/p.zarr"}
    assert store.volume_info("volumes/p.zarr").complete
    assert not store.exists("volumes/not-resolved-again.zarr")
