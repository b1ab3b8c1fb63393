"""The training role on real gRPC servers (loopback, port 0) and a real file store.

TrainMember streams progress and writes the member; the task handlers run with the
worker's real TaskContext; a training job runs end to end through the real
scheduler and the role's worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from deep3m.client.client import Deep3mClient
from deep3m.core.store import Store
from deep3m.launcher.local import free_port
from deep3m.models.card import load_card, load_member
from deep3m.models.registry import seamless_halo_yx
from deep3m.runtime.interceptor import error_detail
from deep3m.runtime.server import RunningServer, create_server
from deep3m.runtime.settings import Settings
from deep3m.runtime.worker import TaskContext, TaskResult
from deep3m.testing.training import stage_synthetic
from deep3m.training.demo_data import write_volume
from deep3m.training.tasks import TrainingTasks
from deep3m.v1 import common_pb2, training_pb2, training_pb2_grpc


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"file://{tmp_path / 'store'}")


@pytest.fixture
def paths(store: Store) -> dict[str, str]:
    return stage_synthetic(store)


def make_settings(store: Store, **extra: object) -> Settings:
    return Settings(
        store_url=store.url, device="cpu", metrics_port=0, worker_enabled=False, **extra
    )  # type: ignore[arg-type]


@pytest.fixture
def server(store: Store) -> Iterator[RunningServer]:
    running = create_server("training", make_settings(store), port=0, host="127.0.0.1")
    yield running
    running.stop(grace=1.0)


def train_spec(paths: dict[str, str], model: str = "svc", **extra: object) -> common_pb2.TrainSpec:
    return common_pb2.TrainSpec(
        model=model,
        images=common_pb2.VolumeRef(path=paths["images"]),
        labels=common_pb2.VolumeRef(path=paths["labels"]),
        validation_images=common_pb2.VolumeRef(path=paths["validation_images"]),
        validation_labels=common_pb2.VolumeRef(path=paths["validation_labels"]),
        architecture="deepem3d",
        width=0.0625,
        iterations=12,
        batch_size=4,
        patch_shape=[32, 32],
        accumulate_gradients=1,
        validate_every=6,
        snapshot_every=6,
        learning_rate=0.05,
        seed=3,
        **extra,  # type: ignore[arg-type]
    )


def lease(
    spec: common_pb2.TrainSpec, stage: str, params: dict[str, str] | None = None
) -> common_pb2.TaskLease:
    return common_pb2.TaskLease(
        task=common_pb2.Task(
            id=f"{stage}/0", job_id="job-1", stage=stage, role="training", params=params or {}
        ),
        spec=common_pb2.JobSpec(name="t", train=spec),
        lease_id=f"lease-{stage}",
    )


def test_train_member_streams_progress_then_finalize_builds_the_card(
    server: RunningServer, store: Store, paths: dict[str, str]
) -> None:
    spec = train_spec(paths, members=["1fm", "3fm"])
    with grpc.insecure_channel(server.address) as channel:
        stub = training_pb2_grpc.TrainingStub(channel)
        events = list(
            stub.TrainMember(training_pb2.TrainMemberRequest(spec=spec, member="1fm"), timeout=120)
        )
        assert events[-1].state == common_pb2.JOB_STATE_SUCCEEDED
        iterations = [int(e.metrics["iteration"]) for e in events if "loss" in e.metrics]
        assert iterations[-1] == 12 and iterations == sorted(iterations)
        validated = [e for e in events[:-1] if "f1" in e.metrics]
        assert [int(e.metrics["iteration"]) for e in validated] == [6, 12]
        assert {"val_loss", "precision", "recall", "jaccard"} <= set(validated[-1].metrics)
        assert all(e.task_id == "1fm" for e in events)

        # The card needs every member: finalize refuses until 3fm is trained too.
        with pytest.raises(grpc.RpcError) as err:
            stub.GetModel(training_pb2.GetModelRequest(model="svc"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        tasks = TrainingTasks(make_settings(store))
        ctx = TaskContext(
            lease(spec, "train", {"member": "3fm"}), worker_id="w", settings=make_settings(store)
        )
        result = tasks.train(ctx)
        assert isinstance(result, TaskResult)
        assert result.metrics["iterations"] == 12 and "f1" in result.metrics
        assert result.outputs["weights"] == "models/svc/3fm/weights.safetensors"

        ctx = TaskContext(lease(spec, "finalize"), worker_id="w", settings=make_settings(store))
        final = tasks.finalize(ctx)
        again = tasks.finalize(ctx)  # idempotent: a retried finalize writes the same card
        assert final == again
        assert final.outputs["model"] == "models/svc/model.json"
        assert 0.0 <= final.metrics["ensemble_f1"] <= 1.0

        got = stub.GetModel(training_pb2.GetModelRequest(model="svc"), timeout=10)
        assert (got.id, got.architecture, list(got.members)) == ("svc", "deepem3d", ["1fm", "3fm"])
        listed = stub.ListModels(training_pb2.ListModelsRequest(), timeout=10)
        assert [m.id for m in listed.models] == ["svc"]

    card = load_card(store, "svc")
    assert card.width == 0.0625 and card.halo[0] == 1
    # y/x: deepem3d's receptive field (±229 px) on its 16-px grid
    assert card.halo[1:] == (240, 240) == (seamless_halo_yx("deepem3d"),) * 2
    assert card.members[0].metrics["f1"] == pytest.approx(validated[-1].metrics["f1"])
    net = load_member(store, card, "3fm")
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 2, 32, 32)


def test_bad_input_is_invalid_argument_before_training(
    server: RunningServer, store: Store, paths: dict[str, str]
) -> None:
    write_volume(store, "volumes/blank.zarr", np.zeros((8, 64, 64), np.uint8))
    spec = train_spec(paths, model="blank")
    spec.labels.path = "volumes/blank.zarr"
    with grpc.insecure_channel(server.address) as channel:
        stub = training_pb2_grpc.TrainingStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(
                stub.TrainMember(
                    training_pb2.TrainMemberRequest(spec=spec, member="1fm"), timeout=60
                )
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    detail = error_detail(err.value)
    assert detail.field == "labels" and "no foreground" in detail.message
    assert not store.exists("models/blank")


def test_training_job_through_the_scheduler(store: Store, paths: dict[str, str]) -> None:
    """A train job on the real scheduler: one task per member on the training role's
    worker, then finalize; the card and both members' weights land in the store."""
    port = free_port()
    # Progress rides on lease renewals (a third of the lease): short leases let the
    # validation reports of this short training reach the watch stream.
    settings = Settings(
        store_url=store.url,
        device="cpu",
        metrics_port=0,
        scheduler_address=f"127.0.0.1:{port}",
        poll_interval_seconds=0.05,
        lease_seconds=0.9,
    )
    scheduler = create_server("scheduler", settings, port=port, host="127.0.0.1")
    role = create_server("training", settings, port=0, host="127.0.0.1")
    try:
        with Deep3mClient(scheduler.address) as client:
            job = client.train(
                images=paths["images"],
                labels=paths["labels"],
                model="job-model",
                validation_images=paths["validation_images"],
                validation_labels=paths["validation_labels"],
                architecture="deepem3d",
                width=0.0625,
                members=["1fm", "3fm"],
                iterations=24,
                batch_size=2,
                patch_shape=[32, 32],
                accumulate_gradients=1,
                validate_every=6,
                snapshot_every=6,
                learning_rate=0.05,
            )
            train_metrics = [
                e.metrics
                for e in client.watch(job.id, timeout_s=240)
                if e.stage == "train" and "f1" in e.metrics
            ]
            final = client.get(job.id)
    finally:
        role.stop(grace=5.0)
        scheduler.stop(grace=1.0)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, list(final.errors)
    assert train_metrics, "validation metrics reached the watch stream"
    card = load_card(store, "job-model")
    assert card.member_names == ("1fm", "3fm")
    assert all(m.iterations == 24 and m.weights for m in card.members)
    assert "ensemble_f1" in card.metrics
