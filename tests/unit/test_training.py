"""Training: config, sampling, the loop, snapshots and resume, fine-tuning, DDP, bad input.

Everything runs on a real ``file://`` store with tiny networks and synthetic stacks
(``deep3m.testing.training``); the resume test kills a real training process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from deep3m.core.errors import (
    CancelledError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from deep3m.core.events import ProgressEvent
from deep3m.core.store import Store
from deep3m.models.card import load_card, load_member
from deep3m.testing.training import stage_synthetic, synthetic_stack, tiny_config
from deep3m.training import checkpoint as ckpt
from deep3m.training.config import TrainConfig, VolumeSource
from deep3m.training.data import (
    LabelledVolume,
    Normalization,
    class_weights,
    frame_indices,
    iteration_rng,
    sample_batch,
    to_classes,
)
from deep3m.training.demo_data import write_volume
from deep3m.training.distributed import train_member_distributed
from deep3m.training.tasks import assemble_card
from deep3m.training.trainer import (
    initial_network,
    make_optimizer,
    member_loss,
    metrics_key,
    plot_key,
    train_member,
)
from deep3m.v1 import common_pb2
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny networks gain nothing from intra-op threads on a shared 2-core machine."""
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


def _losses(history: tuple[object, ...] | list[object]) -> list[float]:
    return [float(h["loss"]) for h in history if "loss" in h]  # type: ignore[index,operator]


# -- configuration -------------------------------------------------------------------------


def test_cdeep3m_recipe_follows_cdeep3m_solver() -> None:
    spec = common_pb2.TrainSpec(
        model="m",
        images=common_pb2.VolumeRef(path="volumes/i.zarr"),
        labels=common_pb2.VolumeRef(path="volumes/l.zarr"),
        recipe="cdeep3m",
    )
    config = TrainConfig.from_spec(spec)
    assert config.optimizer == "sgd"
    assert config.base_learning_rate == pytest.approx(1e-2)
    assert (config.lr_power, config.momentum, config.weight_decay) == (0.8, 0.9, 5e-4)
    assert config.accumulate_gradients == 8
    assert config.snapshot_every == 2000
    assert config.members == ("1fm", "3fm", "5fm")
    assert (config.architecture, config.width, config.patch_shape) == ("deepem3d", 1.0, (320, 320))
    assert (config.loss, config.schedule, config.input_scale, config.keep_best) == (
        "ce",
        "poly",
        1,
        False,
    )
    assert config.validation_images is None
    # Poly policy: full rate at 0, (1 - 1/2)^0.8 of it half way, zero at the end.
    assert config.learning_rate_at(0) == pytest.approx(1e-2)
    assert config.learning_rate_at(config.iterations // 2) == pytest.approx(1e-2 * 0.5**0.8)
    assert config.learning_rate_at(config.iterations) == 0.0


@pytest.mark.parametrize(
    ("update", "field"),
    [
        ({"patch_shape": [100, 96]}, "patch_shape"),
        ({"patch_shape": [96, 96, 96]}, "patch_shape"),
        ({"members": ["1fm", "4fm"]}, "members"),
        ({"architecture": "vgg"}, "architecture"),
        ({"intensity_augmentations": ["sharpen"]}, "intensity_augmentations"),
        ({"model": "bad/id"}, "model"),
        ({"validation_images": {"path": "volumes/v.zarr"}}, "validation_labels.path"),
    ],
)
def test_bad_spec_names_the_field(update: dict[str, object], field: str) -> None:
    base: dict[str, object] = {
        "model": "m",
        "images": {"path": "volumes/i.zarr"},
        "labels": {"path": "volumes/l.zarr"},
    }
    base.update(update)
    with pytest.raises(InvalidArgumentError) as err:
        TrainConfig.from_spec(common_pb2.TrainSpec(**base))  # type: ignore[arg-type]
    assert err.value.field == field


# -- samples -------------------------------------------------------------------------------


def test_frames_are_mirrored_at_the_volume_ends() -> None:
    assert frame_indices(0, 5, 10).tolist() == [2, 1, 0, 1, 2]
    assert frame_indices(9, 5, 10).tolist() == [7, 8, 9, 8, 7]
    assert frame_indices(4, 3, 10).tolist() == [3, 4, 5]


def test_samples_keep_the_centre_slice_under_all_16_variations() -> None:
    depth = 6
    # Every slice holds its own index: the centre frame must equal the label's slice.
    images = np.repeat(np.arange(depth, dtype=np.float32)[:, None, None], 32 * 32).reshape(
        depth, 32, 32
    )
    volume = LabelledVolume(images, np.asarray(images, dtype=np.int64), "index")
    seen_z_reversed = False
    for it in range(40):
        x, y = sample_batch(volume, iteration_rng(0, 0, it), batch=2, frames=5, patch=(16, 16))
        assert x.shape == (2, 5, 16, 16) and y.shape == (2, 16, 16)
        assert np.array_equal(x[:, 2], y.astype(np.float32))
        seen_z_reversed |= bool((x[:, 0, 0, 0] > x[:, 4, 0, 0]).any())
    assert seen_z_reversed  # z-reversing variations (9–16) were drawn


def test_same_iteration_draws_the_same_samples_and_ranks_differ() -> None:
    images, labels = synthetic_stack(6, 48)
    volume = LabelledVolume(images.astype(np.float32), labels.astype(np.int64), "syn")
    a = sample_batch(
        volume,
        iteration_rng(3, 0, 11),
        batch=3,
        frames=3,
        patch=(32, 32),
        intensity=("contrast", "blur", "noise", "elastic"),
    )
    b = sample_batch(
        volume,
        iteration_rng(3, 0, 11),
        batch=3,
        frames=3,
        patch=(32, 32),
        intensity=("contrast", "blur", "noise", "elastic"),
    )
    c = sample_batch(volume, iteration_rng(3, 1, 11), batch=3, frames=3, patch=(32, 32))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert set(np.unique(a[1])) <= {0, 1}  # elastic warping keeps labels discrete


def test_class_weights_favour_the_rare_class() -> None:
    labels = np.zeros((1, 10, 10), np.int64)
    labels[0, :1] = 1  # 10 % foreground
    w = class_weights(labels, 2, balance=True)
    assert w[1] > 2.5 * w[0]
    assert float(w[0] * 0.9 + w[1] * 0.1) == pytest.approx(1.0)
    assert class_weights(labels, 2, balance=False).tolist() == [1.0, 1.0]


def test_multiclass_labels_beyond_num_classes_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="num_classes is 3"):
        to_classes(np.array([[0, 1, 5]]), 3, where="labels.zarr")
    assert to_classes(np.array([0, 7, 255]), 2, where="x").tolist() == [0, 1, 1]


# -- the loop ------------------------------------------------------------------------------


@pytest.mark.parametrize("member", ["1fm", "3fm", "5fm"])
def test_each_member_learns(store: Store, paths: dict[str, str], member: str) -> None:
    config = tiny_config(paths, members=(member,))
    events: list[ProgressEvent] = []
    result = train_member(config, member, store, observer=events.append)
    losses = _losses(result.history)
    assert len(losses) == config.iterations
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert result.iterations == 30 and result.frames == int(member[0])
    # Validation metrics were streamed and stored.
    validated = [e for e in events if "f1" in e.metrics]
    assert [int(e.metrics["iteration"]) for e in validated] == [10, 20, 30]
    assert {"loss", "val_loss", "precision", "recall", "f1", "jaccard"} <= set(
        validated[-1].metrics
    )
    assert validated[-1].metrics["f1"] > 0.5
    doc = store.read_json(metrics_key("tiny", member))
    assert doc["complete"] and doc["weights"] == f"{member}/weights.safetensors"
    assert store.read_bytes(plot_key("tiny", member)).startswith(b"\x89PNG")
    assert store.exists(f"models/tiny/{member}/weights.safetensors")


def test_finished_member_is_not_trained_again(store: Store, paths: dict[str, str]) -> None:
    config = tiny_config(paths, members=("1fm",), iterations=4, validate_every=4)
    first = train_member(config, "1fm", store)
    events: list[ProgressEvent] = []
    again = train_member(config, "1fm", store, observer=events.append)
    assert events == []  # a retried task after completion returns the stored result
    assert all(torch.equal(first.state_dict[k], again.state_dict[k]) for k in first.state_dict)


def test_cancel_leaves_a_snapshot_to_resume_from(store: Store, paths: dict[str, str]) -> None:
    config = tiny_config(paths, members=("1fm",), iterations=20, snapshot_every=100)
    cancelled = threading.Event()

    def observer(event: ProgressEvent) -> None:
        if event.metrics.get("iteration") == 6:
            cancelled.set()

    with pytest.raises(CancelledError):
        train_member(config, "1fm", store, observer=observer, cancelled=cancelled)
    assert ckpt.list_checkpoints(store, "tiny", "1fm") == [6]
    result = train_member(config, "1fm", store)
    assert result.resumed_from == 6
    assert [int(h["iteration"]) for h in result.history] == list(range(1, 21))


def test_snapshot_round_trip_is_exact(store: Store, paths: dict[str, str]) -> None:
    config = tiny_config(paths, members=("1fm",), optimizer="sgd")
    net = initial_network(config, "1fm", store)
    opt = make_optimizer(config, net)
    net(torch.randn(2, 1, 32, 32)).sum().backward()
    opt.step()
    ckpt.save_checkpoint(
        store,
        "tiny",
        "1fm",
        ckpt.Checkpoint(
            iteration=3,
            model=net.state_dict(),
            optimizer=opt.state_dict(),
            rng={"torch": torch.get_rng_state()},
            history=({"iteration": 3.0, "loss": 0.5},),
        ),
    )
    assert ckpt.latest_checkpoint(store, "tiny", "1fm") == 3
    snap = ckpt.load_checkpoint(store, "tiny", "1fm", 3)
    assert all(torch.equal(snap.model[k], v) for k, v in net.state_dict().items())
    opt2 = make_optimizer(config, initial_network(config, "1fm", store))
    opt2.load_state_dict(snap.optimizer)
    buffers = {i: s["momentum_buffer"] for i, s in opt.state_dict()["state"].items()}
    restored = {i: s["momentum_buffer"] for i, s in opt2.state_dict()["state"].items()}
    assert buffers.keys() == restored.keys() and buffers
    assert all(torch.equal(buffers[i], restored[i]) for i in buffers)
    # An unfinished snapshot (tensors without the JSON) is never picked.
    store.write_bytes("models/tiny/1fm/checkpoints/ckpt-00000009.safetensors", b"partial")
    assert ckpt.latest_checkpoint(store, "tiny", "1fm") == 3


@pytest.mark.slow
def test_killed_worker_resumes_from_its_newest_snapshot(
    store: Store, paths: dict[str, str], tmp_path: Path
) -> None:
    """SIGKILL a training process after its first snapshot; the retry continues from the
    newest snapshot and ends where an undisturbed run ends."""
    config = tiny_config(
        paths,
        model_id="killed",
        members=("1fm",),
        iterations=40,
        snapshot_every=4,
        validate_every=40,
        width=0.125,
        patch_shape=(48, 48),
    )
    config_file = tmp_path / "config.json"
    config_file.write_text(config.to_json())
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deep3m.training",
            "train-member",
            "--config",
            str(config_file),
            "--member",
            "1fm",
            "--store",
            store.url,
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    ) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:  # blocks on the process's own progress lines
                if "snapshot_iteration" in json.loads(line).get("metrics", {}):
                    os.kill(proc.pid, signal.SIGKILL)
                    break
        finally:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    newest = ckpt.latest_checkpoint(store, "killed", "1fm")
    assert newest is not None and 4 <= newest < 40
    assert (
        not store.read_json(metrics_key("killed", "1fm")).get("complete", False)
        if store.exists(metrics_key("killed", "1fm"))
        else True
    )

    events: list[ProgressEvent] = []
    resumed = train_member(config, "1fm", store, observer=events.append)
    assert resumed.resumed_from == newest
    first_new = next(e for e in events if "loss" in e.metrics)
    assert first_new.metrics["iteration"] == newest + 1  # not from zero
    assert [int(h["iteration"]) for h in resumed.history] == list(range(1, 41))

    reference = train_member(config.model_copy(update={"model_id": "undisturbed"}), "1fm", store)
    # Same samples per iteration (seeded by iteration) and exact snapshots: the same weights.
    for key, value in reference.state_dict.items():
        assert torch.allclose(resumed.state_dict[key].float(), value.float(), atol=1e-5), key
    assert _losses(resumed.history) == pytest.approx(_losses(reference.history), rel=1e-4)


def test_fine_tuning_starts_from_the_base_weights(store: Store, paths: dict[str, str]) -> None:
    base_config = tiny_config(
        paths, model_id="base", members=("1fm",), iterations=6, validate_every=6
    )
    train_member(base_config, "1fm", store)
    base_card = assemble_card(base_config, store, score=False)
    assert load_card(store, "base").members[0].weights

    config = tiny_config(
        paths,
        model_id="tuned",
        members=("1fm",),
        base_model="base",
        add_iterations=3,
        validate_every=3,
    )
    assert config.total_iterations == 3
    base_net = load_member(store, base_card, "1fm").train()
    start = initial_network(config, "1fm", store)
    assert all(torch.equal(start.state_dict()[k], v) for k, v in base_net.state_dict().items())

    # The first training loss is the base model's loss on the first batch.
    images = np.asarray(store.open_volume(paths["images"])[...])
    labels = to_classes(np.asarray(store.open_volume(paths["labels"])[...]), 2, where="")
    norm = Normalization(base_card.normalization_mean, base_card.normalization_std)
    volume = LabelledVolume(norm.apply(images), labels, "train")
    x, y = sample_batch(
        volume,
        iteration_rng(config.seed, 0, 0),
        batch=config.batch_size,
        frames=1,
        patch=config.patch_shape,
    )
    with torch.no_grad():
        expected = member_loss(
            base_net(torch.from_numpy(x)),
            torch.from_numpy(y),
            torch.from_numpy(class_weights(labels, 2, True)),
        ).item()
    result = train_member(config, "1fm", store)
    assert result.history[0]["loss"] == pytest.approx(expected, rel=1e-5)
    tuned = assemble_card(config, store, score=False)
    assert tuned.base_model == "base"
    assert tuned.iterations == base_card.iterations + 3


@pytest.mark.slow
def test_ddp_on_two_gloo_processes_averages_gradients(
    store: Store, paths: dict[str, str], tmp_path: Path
) -> None:
    config = tiny_config(
        paths, model_id="ddp", members=("1fm",), iterations=1, optimizer="sgd", validate_every=1
    )
    dump = tmp_path / "ranks"
    dump.mkdir()
    result = train_member_distributed(
        config, "1fm", store, 2, device_type="cpu", dump_rank_weights=dump, threads_per_rank=1
    )
    rank0, rank1 = (
        load_file(str(dump / "rank0.safetensors")),
        load_file(str(dump / "rank1.safetensors")),
    )
    # What a single process does with the average of the two ranks' gradients.
    net = initial_network(config, "1fm", store)
    params = dict(net.named_parameters())
    opt = make_optimizer(config, net)
    images = np.asarray(store.open_volume(paths["images"])[...])
    labels = to_classes(np.asarray(store.open_volume(paths["labels"])[...]), 2, where="")
    norm = Normalization(float(images.mean()), float(images.std()))
    volume = LabelledVolume(norm.apply(images), labels, "train")
    weights = torch.from_numpy(class_weights(labels, 2, True))
    grads = []
    for rank in (0, 1):
        net.zero_grad()
        x, y = sample_batch(
            volume,
            iteration_rng(config.seed, rank, 0),
            batch=config.batch_size,
            frames=1,
            patch=config.patch_shape,
        )
        member_loss(net(torch.from_numpy(x)), torch.from_numpy(y), weights).backward()
        grads.append({k: p.grad.clone() for k, p in params.items()})  # type: ignore[union-attr]
    for k, p in params.items():
        p.grad = (grads[0][k] + grads[1][k]) / 2
    opt.step()
    for k, p in params.items():
        assert torch.equal(rank0[k], rank1[k]), f"ranks disagree on {k}"
        assert torch.allclose(rank0[k], p.detach(), atol=1e-6), k
    assert result.iterations == 1
    assert store.read_json(metrics_key("ddp", "1fm"))["world_size"] == 2


# -- bad input -----------------------------------------------------------------------------


def _bad(store: Store, config: TrainConfig, member: str = "1fm") -> Exception:
    with pytest.raises((InvalidArgumentError, NotFoundError, FailedPreconditionError)) as err:
        train_member(config, member, store)
    assert not store.exists(f"models/{config.model_id}"), "nothing may be written"
    return err.value  # type: ignore[return-value]


def test_images_and_labels_of_different_shapes(store: Store, paths: dict[str, str]) -> None:
    write_volume(store, "volumes/small-labels.zarr", np.ones((8, 48, 64), np.uint8))
    config = tiny_config(paths, labels=VolumeSource(path="volumes/small-labels.zarr"))
    err = _bad(store, config)
    assert "small-labels.zarr" in str(err) and "[8, 48, 64]" in str(err)


def test_labels_without_foreground(store: Store, paths: dict[str, str]) -> None:
    write_volume(store, "volumes/empty.zarr", np.zeros((8, 64, 64), np.uint8))
    err = _bad(store, tiny_config(paths, labels=VolumeSource(path="volumes/empty.zarr")))
    assert "no foreground" in str(err) and "empty.zarr" in str(err)


def test_fewer_slices_than_the_5fm_member_needs(store: Store) -> None:
    paths = stage_synthetic(store, "volumes/thin", depth=3, validation=False)
    err = _bad(store, tiny_config(paths), member="1fm")
    assert "5fm" in str(err) and "3 slice" in str(err)
    assert getattr(err, "field", "") == "members"


def test_patch_larger_than_the_images(store: Store, paths: dict[str, str]) -> None:
    err = _bad(store, tiny_config(paths, patch_shape=(96, 96)))
    assert getattr(err, "field", "") == "patch_shape" and "[64, 64]" in str(err)


def test_base_model_of_another_architecture(store: Store, paths: dict[str, str]) -> None:
    other = tiny_config(
        paths,
        model_id="unet",
        architecture="resunet2d",
        members=("1fm",),
        iterations=2,
        validate_every=2,
    )
    train_member(other, "1fm", store)
    assemble_card(other, store, score=False)
    config = tiny_config(paths, model_id="ft2", base_model="unet", members=("1fm",))
    err = _bad(store, config)
    assert getattr(err, "field", "") == "base_model" and "resunet2d" in str(err)


def test_missing_and_incomplete_volumes(store: Store, paths: dict[str, str]) -> None:
    err = _bad(store, tiny_config(paths, images=VolumeSource(path="volumes/nope.zarr")))
    assert isinstance(err, NotFoundError) and "nope.zarr" in str(err)
    arr = store.create_volume("volumes/half.zarr", (8, 64, 64), "uint8")
    arr[...] = 1
    err = _bad(store, tiny_config(paths, images=VolumeSource(path="volumes/half.zarr")))
    assert isinstance(err, FailedPreconditionError) and "incomplete" in str(err)


# -- demo data -----------------------------------------------------------------------------


def test_packaged_demo_sample_and_recipe() -> None:
    from deep3m.training.demo_data import DEMO_RECIPE, PACKAGE_SAMPLE, load_stack, sample_paths

    data = sample_paths(prefer_full=False)
    assert not data.full and data.train_images.is_relative_to(PACKAGE_SAMPLE)
    images, labels = load_stack(data.train_images), load_stack(data.train_labels)
    assert images.shape == labels.shape == (20, 320, 320)
    assert load_stack(data.val_images).shape == (10, 320, 320)
    assert set(np.unique(labels)) == {0, 1}  # raw palette indices, not colours
    assert (PACKAGE_SAMPLE / "LICENSE.txt").read_text().startswith("Different license")
    size = sum(f.stat().st_size for f in PACKAGE_SAMPLE.rglob("*") if f.is_file())
    assert size < 5 * 1024 * 1024
    # The recipe's keywords are TrainSpec fields, and it validates as a configuration.
    kwargs = dict(DEMO_RECIPE.train_kwargs())
    spec = common_pb2.TrainSpec(
        model="demo",
        images=common_pb2.VolumeRef(path="i"),
        labels=common_pb2.VolumeRef(path="l"),
        **kwargs,
    )
    config = TrainConfig.from_spec(spec)
    assert config.members == DEMO_RECIPE.members and config.iterations == DEMO_RECIPE.iterations
    assert config.recipe == DEMO_RECIPE.recipe and config.architecture == "unet2d"
    assert config.max_minutes * len(config.members) == pytest.approx(DEMO_RECIPE.minutes)
    half = DEMO_RECIPE.scaled(DEMO_RECIPE.minutes / 2)
    assert half.minutes == DEMO_RECIPE.minutes / 2 and half.members == DEMO_RECIPE.members
    with pytest.raises(InvalidArgumentError):
        DEMO_RECIPE.scaled(0)
