"""The training handler and run loop: time-based snapshots, and volumes read where the
scheduler resolved them at submission (``lease.volumes``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from deep3m.core.errors import NotFoundError
from deep3m.core.store import Store
from deep3m.runtime.settings import Settings
from deep3m.runtime.task import TaskContext
from deep3m.testing.training import stage_synthetic, tiny_config
from deep3m.training import checkpoint as ckpt
from deep3m.training.tasks import TrainingTasks
from deep3m.training.trainer import train_member
from deep3m.v1 import common_pb2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"file://{tmp_path / 'store'}")


def test_snapshots_follow_wall_time_as_well_as_iterations(store: Store) -> None:
    paths = stage_synthetic(store, validation=False)
    # Iteration snapshots never fall due (1000 > 6): only the wall clock triggers them.
    common = {"members": ("1fm",), "iterations": 6, "snapshot_every": 1000, "validate_every": 6}
    timed = tiny_config(paths, "timed", snapshot_every_minutes=1e-9, checkpoints_kept=100, **common)
    train_member(timed, "1fm", store, device="cpu")
    # After every iteration but the last (the finished member needs none).
    assert ckpt.list_checkpoints(store, "timed", "1fm") == [1, 2, 3, 4, 5]
    untimed = tiny_config(paths, "untimed", **common)
    assert untimed.snapshot_every_minutes == 5.0
    train_member(untimed, "1fm", store, device="cpu")
    assert ckpt.list_checkpoints(store, "untimed", "1fm") == []


def resolved(store: Store, path: str) -> common_pb2.ResolvedVolume:
    info = store.volume_info(path)
    return common_pb2.ResolvedVolume(
        store_url=store.url,
        path=path,
        shape=list(info.shape),
        dtype=str(info.dtype),
        grid=list(info.chunk_shape),
        voxel_size_nm=list(info.voxel_size_nm),
    )


def test_the_handler_reads_the_volumes_resolved_at_submission(store: Store) -> None:
    paths = stage_synthetic(store)
    # The spec still names where the volumes were when the job was written; the lease
    # carries where the scheduler found them. Only the lease's are read.
    spec = common_pb2.TrainSpec(
        model="located",
        images=common_pb2.VolumeRef(path="volumes/gone/images.zarr"),
        labels=common_pb2.VolumeRef(path="volumes/gone/labels.zarr"),
        validation_images=common_pb2.VolumeRef(path="volumes/gone/val-images.zarr"),
        validation_labels=common_pb2.VolumeRef(path="volumes/gone/val-labels.zarr"),
        recipe="cdeep3m",
        architecture="deepem3d",
        width=0.0625,
        members=["1fm"],
        iterations=4,
        batch_size=2,
        patch_shape=[32, 32],
        accumulate_gradients=1,
        validate_every=4,
        seed=1,
    )
    settings = Settings(store_url=store.url, device="cpu", metrics_port=0, worker_enabled=False)
    tasks = TrainingTasks(settings)

    def context(stage: str, params: dict[str, str], with_volumes: bool) -> TaskContext:
        lease = common_pb2.TaskLease(
            task=common_pb2.Task(
                id=f"{stage}/0", job_id="j", stage=stage, role="training", params=params
            ),
            spec=common_pb2.JobSpec(name="t", train=spec),
            lease_id=f"lease-{stage}",
        )
        if with_volumes:
            for name, path in paths.items():
                lease.volumes[name].CopyFrom(resolved(store, path))
        return TaskContext(lease, worker_id="w", settings=settings)

    with pytest.raises(NotFoundError):  # without them, the spec's paths are looked up
        tasks.train(context("train", {"member": "1fm"}, with_volumes=False))
    result = tasks.train(context("train", {"member": "1fm"}, with_volumes=True))
    assert result.metrics["iterations"] == 4
    card = tasks.finalize(context("finalize", {}, with_volumes=True))
    assert card.outputs["model"] == "models/located/model.json"
    assert 0.0 <= card.metrics["ensemble_f1"] <= 1.0
