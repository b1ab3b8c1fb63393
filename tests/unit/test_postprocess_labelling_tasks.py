"""The labelling handlers of a predict job, run task by task as the scheduler plans them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from deep3m.core.levels import plan_levels
from deep3m.core.store import Store
from deep3m.postprocess.labelling_tasks import labelling_handlers
from deep3m.postprocess.pyramid import Method, downsample
from deep3m.runtime.settings import Settings
from deep3m.runtime.task import TaskContext, TaskResult
from deep3m.scheduler.kinds.base import VolumeFacts
from deep3m.scheduler.kinds.labelling import plan_labelling
from deep3m.v1 import common_pb2
from scipy import ndimage

SHAPE = (4, 300, 260)
CHUNKS = (4, 128, 128)
VOXEL_SIZE_NM = (40.0, 6.0, 6.0)


def _resolved(store: Store, path: str, dtype: str) -> common_pb2.ResolvedVolume:
    return common_pb2.ResolvedVolume(
        store_url=store.url, path=path, shape=SHAPE, dtype=dtype, grid=CHUNKS,
        voxel_size_nm=VOXEL_SIZE_NM,
    )  # fmt: skip


def _run_job(store: Store, block: list[int]) -> dict[str, list[TaskResult]]:
    """Every labelling stage of a predict job over ``volumes/p.zarr``; results by stage."""
    spec = common_pb2.JobSpec(
        predict=common_pb2.PredictSpec(
            output=common_pb2.VolumeRef(path="volumes/p.zarr"),
            postprocess=True,
            labelling=common_pb2.LabelSpec(
                threshold=0.5, connectivity=1, name="segmentation", block_shape=block,
                table_shards=4,
            ),
        )
    )  # fmt: skip
    volumes = {
        "output": _resolved(store, "volumes/p.zarr", "float32"),
        "labels": _resolved(store, "volumes/l.zarr", "uint32"),
    }
    facts = VolumeFacts(store.url, "volumes/l.zarr", "", SHAPE, "uint32", CHUNKS, VOXEL_SIZE_NM)
    settings = Settings(store_url=store.url, metrics_port=0, worker_enabled=False)
    handlers = labelling_handlers(settings)
    results: dict[str, list[TaskResult]] = {}
    index = 0
    while (plan := plan_labelling(index, 0, facts, spec.predict.labelling)) is not None:
        for n in range(plan.n_tasks):
            task = plan.task(n)
            proto = common_pb2.Task(id=task.id, job_id="j1", stage=plan.name, params=task.params)
            if task.block is not None:
                proto.block.core.start.extend(task.block.core.start)
                proto.block.core.stop.extend(task.block.core.stop)
            lease = common_pb2.TaskLease(task=proto, spec=spec, volumes=volumes)
            result = handlers[plan.name](TaskContext(lease, worker_id="w", settings=settings))
            results.setdefault(plan.name, []).append(result)
        index += 1
    return results


@pytest.mark.parametrize(
    ("block", "level_stages"),
    [([4, 256, 256], []), ([4, 128, 128], ["pyramid_1"])],
)
def test_pyramids_of_labels_and_probabilities_equal_whole_volume_downsampling(
    tmp_path: Path, block: list[int], level_stages: list[str]
) -> None:
    store = Store(f"file://{tmp_path}")
    field = ndimage.gaussian_filter(np.random.default_rng(0).random(SHAPE), (0.5, 3, 3))
    prob = ((field - field.min()) / (field.max() - field.min())).astype(np.float32)
    arr = store.create_volume(
        "volumes/p.zarr", SHAPE, "float32", voxel_size_nm=VOXEL_SIZE_NM, chunk_shape=CHUNKS,
        attributes={"kind": "probabilities"},
    )  # fmt: skip
    arr[:] = prob
    store.mark_complete("volumes/p.zarr")
    store.create_volume(
        "volumes/l.zarr", SHAPE, "uint32", voxel_size_nm=VOXEL_SIZE_NM, chunk_shape=CHUNKS,
        attributes={"kind": "labels"},
    )  # fmt: skip
    results = _run_job(store, block)
    # 256² blocks halve into the 128² level-1 chunks: relabel writes level 1 itself.
    assert [s for s in results if s.startswith("pyramid")] == level_stages
    (reduced,) = results["reduce"]
    assert reduced.metrics["pyramid_levels"] == 2.0
    labels = np.asarray(store.open_volume("volumes/l.zarr")[:])
    n = ndimage.label(prob >= 0.5)[1]
    assert n > 3 and int(labels.max()) == n == reduced.metrics["objects"]
    (level,) = plan_levels(SHAPE, VOXEL_SIZE_NM)
    cases: list[tuple[str, np.ndarray, Method]] = [
        ("volumes/l.zarr", labels, "mode"),
        ("volumes/p.zarr", prob, "mean"),
    ]
    for path, data, method in cases:
        got = np.asarray(store.open_volume(path, level.path)[:])
        np.testing.assert_array_equal(got, downsample(data, level.factor, method))
        datasets = store.read_json(f"{path}/zarr.json")["attributes"]["ome"]["multiscales"][0]
        assert [d["path"] for d in datasets["datasets"]] == ["0", "1"]
    assert store.volume_info("volumes/l.zarr").complete
