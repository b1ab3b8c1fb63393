"""Recipes and the options the accuracy benchmark chose between, on tiny budgets."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from deep3m.core.errors import CancelledError, InvalidArgumentError
from deep3m.core.events import ProgressEvent
from deep3m.core.store import Store
from deep3m.models.card import load_card, load_member
from deep3m.models.recipes import RECIPES
from deep3m.models.registry import build_network
from deep3m.models.scaled import ScaledInput
from deep3m.testing.training import stage_synthetic, tiny_config
from deep3m.training.config import TrainConfig, VolumeSource
from deep3m.training.data import LabelledVolume, iteration_rng, sample_batch
from deep3m.training.evaluate import best_threshold, select_ensemble
from deep3m.training.objectives import lr_factor, training_loss
from deep3m.training.tasks import assemble_card
from deep3m.training.trainer import best_key, metrics_key, train_member
from deep3m.v1 import common_pb2
from safetensors.torch import load as load_safetensors


@pytest.fixture
def staged(tmp_path: Path) -> tuple[Store, dict[str, str]]:
    """A store holding the synthetic training and validation stacks, and their paths."""
    store = Store(f"file://{tmp_path / 'store'}")
    return store, stage_synthetic(store)


def _default_tiny(
    paths: dict[str, str], model_id: str = "tiny", **overrides: object
) -> TrainConfig:
    """The default recipe's code paths (scaled input, bf16, CE+Dice…) at a tiny size."""
    values: dict[str, object] = {
        "recipe": "default",
        "architecture": "unet2d",
        "width": 0.125,
        "members": ("1fm",),
        "iterations": 12,
        "batch_size": 2,
        "patch_shape": (32, 32),
        "validate_every": 4,
        "snapshot_every": 6,
        "learning_rate": 3e-3,
    }
    values.update(overrides)
    return tiny_config(paths, model_id, **values)


# -- configuration -------------------------------------------------------------------------


def _spec(**fields: object) -> common_pb2.TrainSpec:
    return common_pb2.TrainSpec(
        model="m",
        images=common_pb2.VolumeRef(path="volumes/i.zarr"),
        labels=common_pb2.VolumeRef(path="volumes/l.zarr"),
        **fields,  # type: ignore[arg-type]
    )


def test_default_recipe_fills_unset_fields_and_given_fields_win() -> None:
    config = TrainConfig.from_spec(_spec())
    assert config.recipe == "default"
    for name, value in RECIPES["default"].items():
        assert getattr(config, name) == value, name
    mixed = TrainConfig.from_spec(_spec(recipe="cdeep3m", width=0.25, loss="ce_dice"))
    assert (mixed.architecture, mixed.width, mixed.loss, mixed.input_scale) == (
        "deepem3d",
        0.25,
        "ce_dice",
        1,
    )
    # A JSON round trip keeps every value (the recipe does not overwrite them again).
    assert TrainConfig.from_json(mixed.to_json()) == mixed


def test_new_spec_fields_reach_the_configuration() -> None:
    config = TrainConfig.from_spec(
        _spec(
            max_minutes=1.5,
            optimizer="sgd",
            loss="ce",
            schedule="cosine",
            input_scale=3,
            foreground_fraction=0.25,
        )
    )
    assert (config.max_minutes, config.optimizer, config.loss, config.schedule) == (
        1.5,
        "sgd",
        "ce",
        "cosine",
    )
    assert (config.input_scale, config.foreground_fraction) == (3, 0.25)
    assert config.fingerprint("1fm")["input_scale"] == 3


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"recipe": "fastest"}, "recipe"),
        ({"loss": "hinge"}, "loss"),
        ({"schedule": "step"}, "schedule"),
        ({"input_scale": 9}, "input_scale"),
        ({"foreground_fraction": 1.5}, "foreground_fraction"),
        ({"max_minutes": -1.0}, "max_minutes"),
        ({"optimizer": "lbfgs"}, "optimizer"),
    ],
)
def test_bad_recipe_options_name_the_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        TrainConfig.from_spec(_spec(**fields))
    assert info.value.field == field
    assert field in str(info.value)


def test_schedules() -> None:
    assert lr_factor("poly", 0.5, 0.8) == pytest.approx(0.5**0.8)
    assert lr_factor("cosine", 0.5) == pytest.approx(0.5)
    one = [lr_factor("onecycle", f / 100) for f in range(101)]
    peak = int(np.argmax(one))
    assert peak == 10 and one[peak] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(one[: peak + 1]))  # warm-up rises
    assert all(a >= b for a, b in itertools.pairwise(one[peak:]))  # then decays
    assert one[0] > 0 and one[-1] == pytest.approx(0.0, abs=1e-12)
    for s in ("poly", "cosine", "onecycle"):
        assert lr_factor(s, 2.0) == pytest.approx(0.0, abs=1e-12)  # clipped past the end
    with pytest.raises(ValueError, match="schedule"):
        lr_factor("step", 0.5)


def test_learning_rate_follows_the_larger_of_iteration_and_time_fractions(
    staged: tuple[Store, dict[str, str]],
) -> None:
    _, paths = staged
    config = tiny_config(paths, iterations=100, max_minutes=1.0, schedule="cosine")
    base = config.base_learning_rate
    assert config.learning_rate_at(50, 0.0) == pytest.approx(base * 0.5)
    assert config.learning_rate_at(10, 30.0) == pytest.approx(base * 0.5)  # time is ahead
    assert config.learning_rate_at(0, 60.0) == pytest.approx(0.0, abs=1e-12)


# -- losses and sampling -------------------------------------------------------------------


def test_ce_dice_adds_the_overlap_term() -> None:
    labels = torch.zeros(2, 16, 16, dtype=torch.int64)
    labels[:, 4:12, 4:12] = 1
    perfect = torch.stack([(1 - labels) * 20.0 - 10, labels * 20.0 - 10], 1).float()
    wrong = -perfect
    weights = torch.tensor([1.0, 1.0])
    for logits in (torch.zeros_like(perfect), wrong):
        ce = training_loss("ce", logits, labels, weights)
        both = training_loss("ce_dice", logits, labels, weights)
        assert float(both) > float(ce)
    assert float(training_loss("ce_dice", perfect, labels, weights)) < 0.01
    assert float(training_loss("ce_dice", wrong, labels, weights)) > 10
    with pytest.raises(ValueError, match="loss"):
        training_loss("hinge", perfect, labels, weights)


def test_foreground_aware_sampling_finds_rare_objects() -> None:
    labels = np.zeros((4, 256, 256), np.int64)
    labels[2, 200:210, 30:40] = 1  # one small object
    volume = LabelledVolume(np.random.default_rng(0).random(labels.shape, np.float32), labels, "t")

    def hit_rate(fraction: float) -> float:
        hits = 0
        for it in range(40):
            _, y = sample_batch(volume, iteration_rng(0, 0, it), batch=2, frames=1,
                                patch=(32, 32), foreground_fraction=fraction)  # fmt: skip
            hits += int((y.reshape(2, -1).max(axis=1) > 0).sum())
        return hits / 80

    assert hit_rate(1.0) == 1.0
    assert hit_rate(0.0) < 0.2
    assert 0.3 < hit_rate(0.5) < 0.8


# -- networks ------------------------------------------------------------------------------


@pytest.mark.parametrize(("scale", "size"), [(2, 64), (2, 48), (4, 16)])
def test_scaled_input_returns_full_resolution(scale: int, size: int) -> None:
    net = build_network("resunet2d", frames=3, width=0.125, input_scale=scale).eval()
    assert isinstance(net, ScaledInput) and net.factor == scale
    with torch.no_grad():
        out = net(torch.randn(1, 3, size, size))
    assert out.shape == (1, 2, size, size)
    with pytest.raises(InvalidArgumentError) as info:
        build_network("resunet2d", frames=1, input_scale=5)
    assert info.value.field == "input_scale"


def test_channels_last_is_skipped_for_3d_convolutions(staged: tuple[Store, dict[str, str]]) -> None:
    store, paths = staged
    config = _default_tiny(paths, architecture="deepem3d", members=("3fm",), iterations=2)
    assert train_member(config, "3fm", store).iterations == 2


@pytest.mark.parametrize("architecture", ["resunet2d", "resunet3d"])
def test_residual_unets_share_one_block_definition(architecture: str) -> None:
    net = build_network(architecture, frames=3, width=0.125)
    blocks = [m for m in net.modules() if type(m).__name__ == "_Res"]
    assert len(blocks) == 9  # inc, 4 down, 4 decoder
    conv = torch.nn.Conv3d if architecture == "resunet3d" else torch.nn.Conv2d
    assert all(isinstance(b.body[0], conv) for b in blocks)


# -- the trainer ---------------------------------------------------------------------------


def test_default_recipe_trains_with_bf16_channels_last_and_scaled_input(
    staged: tuple[Store, dict[str, str]],
) -> None:
    store, paths = staged
    config = _default_tiny(
        paths, iterations=40, learning_rate=1e-2, patch_shape=(48, 48), input_scale=2
    )
    assert config.cpu_bfloat16 and config.channels_last and config.input_scale == 2
    events: list[ProgressEvent] = []
    result = train_member(config, "1fm", store, observer=events.append)
    losses = [float(h["loss"]) for h in result.history]
    assert all(np.isfinite(losses)) and np.mean(losses[-2:]) < np.mean(losses[:2])
    # Progress events carry what a display needs.
    last = events[-1].metrics
    for key in ("iteration", "iterations", "loss", "iterations_per_second", "latest_f1"):
        assert key in last, key
    assert last["iterations_per_second"] > 0
    assert any(e.eta_seconds > 0 for e in events)
    assert not any("h on cpu" in e.message for e in events)  # a short plan: no warning


def test_a_plan_of_hours_is_announced_with_its_eta(
    staged: tuple[Store, dict[str, str]],
) -> None:
    store, paths = staged
    config = _default_tiny(paths, iterations=5_000_000, patch_shape=(48, 48))
    events: list[ProgressEvent] = []
    stop = threading.Event()

    def first_report(event: ProgressEvent) -> None:
        events.append(event)
        stop.set()  # one measured rate is all the announcement needs

    with pytest.raises(CancelledError):
        train_member(config, "1fm", store, observer=first_report, cancelled=stop)
    announced = [e for e in events if "h on cpu" in e.message]
    assert announced, [e.message for e in events]
    assert "--minutes" in announced[0].message
    assert announced[0].eta_seconds > 3600


def test_time_budget_stops_training_and_drives_the_schedule(
    staged: tuple[Store, dict[str, str]],
) -> None:
    store, paths = staged
    ticks = itertools.count()

    def clock() -> float:  # one "second" per reading
        return float(next(ticks))

    config = tiny_config(paths, members=("1fm",), iterations=10_000, max_minutes=0.5,
                         validate_every=10_000, schedule="cosine")  # fmt: skip
    result = train_member(config, "1fm", store, clock=clock)
    assert 3 < result.iterations < 30  # 30 budget seconds, a few readings per step
    doc = store.read_json(metrics_key("tiny", "1fm"))
    assert doc["complete"] and doc["iteration"] == result.iterations
    assert doc["elapsed_s"] >= 30
    assert result.history[-1]["lr"] < 0.2 * config.base_learning_rate  # decayed by time
    assert "f1" in result.history[-1]  # validated at the end of the budget


def test_keep_best_keeps_the_best_validation_weights(staged: tuple[Store, dict[str, str]]) -> None:
    store, paths = staged
    config = _default_tiny(paths, iterations=16, learning_rate=0.3, validate_every=2)
    result = train_member(config, "1fm", store)
    doc = store.read_json(metrics_key("tiny", "1fm"))
    validated = [h for h in result.history if "f1" in h]
    best = max(validated, key=lambda h: h["f1"])
    assert doc["best_iteration"] == int(best["iteration"])
    assert result.metrics["f1"] == pytest.approx(best["f1"])
    kept = load_safetensors(store.read_bytes(best_key("tiny", "1fm")))
    final = load_safetensors(store.read_bytes(f"models/tiny/{doc['weights']}"))
    assert kept.keys() == final.keys()
    assert all(torch.equal(kept[k], final[k]) for k in kept)
    assert 0 < doc["threshold"] < 1 and doc["threshold_f1"] >= 0


def test_best_threshold_and_ensemble_selection() -> None:
    rng = np.random.default_rng(0)
    gt = rng.random((2, 64, 64)) < 0.2
    calibrated_low = np.where(gt, 0.35, 0.05) + rng.normal(0, 0.02, gt.shape)
    threshold, f1 = best_threshold(calibrated_low.astype(np.float32), gt)
    assert 0.1 <= threshold <= 0.3 and f1 == pytest.approx(1.0)
    good = np.where(gt, 0.9, 0.1).astype(np.float32)
    noise = rng.random(gt.shape).astype(np.float32)
    chosen = select_ensemble([noise, good], gt)
    assert chosen.weights == (0.0, 1.0)
    assert chosen.f1 >= max(chosen.member_f1) - 1e-9
    both = select_ensemble([good, good], gt)
    assert both.weights == (1.0, 1.0)  # ties keep every member


def test_card_records_recipe_scale_threshold_and_member_weights(
    staged: tuple[Store, dict[str, str]],
) -> None:
    store, paths = staged
    config = _default_tiny(paths, "ens", members=("1fm", "3fm"), iterations=8, input_scale=2)
    for member in config.members:
        train_member(config, member, store)
    card = assemble_card(config, store)
    assert card.input_scale == 2 and card.architecture == "unet2d"
    assert card.training["recipe"] == "default" and card.training["loss"] == "ce_dice"
    assert 0 < card.threshold < 1
    assert card.threshold == card.metrics["selected_threshold"]
    assert {m.weight for m in card.members} <= {0.0, 1.0} and any(m.weight for m in card.members)
    assert card.metrics["selected_f1"] >= max(m.metrics["f1"] for m in card.members) - 0.05
    net = load_member(store, load_card(store, "ens"), "3fm")
    assert isinstance(net, ScaledInput)
    with torch.no_grad():
        assert net(torch.randn(1, 3, 48, 48)).shape == (1, 2, 48, 48)


def test_volume_source_is_unchanged_by_recipes() -> None:
    src = VolumeSource(path="p")
    config = TrainConfig.create(model_id="m", images=src, labels=src, recipe="cdeep3m")
    assert config.images == src and config.recipe == "cdeep3m"


def test_predictor_weights_members_as_the_card_says() -> None:
    from deep3m.inference.predictor import EnsemblePredictor, whole_volume_block
    from deep3m.models.card import MemberCard, ModelCard

    torch.manual_seed(0)
    nets = {m: build_network("resunet2d", frames=1, width=0.125).eval() for m in ("a", "b")}

    def card(weights: tuple[float, float]) -> ModelCard:
        members = tuple(
            MemberCard(name=n, frames=1, weight=w) for n, w in zip(nets, weights, strict=True)
        )
        return ModelCard(id="w", architecture="resunet2d", width=0.125, members=members)

    data = np.random.default_rng(0).integers(0, 255, (1, 32, 32)).astype(np.uint8)
    block = whole_volume_block(data.shape, (0, 0, 0))

    def predict(weights: tuple[float, float], members: dict[str, torch.nn.Module]) -> np.ndarray:
        return EnsemblePredictor(card(weights), members, tta_level=10).predict_block(data, block)

    only_a = predict((1.0, 1.0), {"a": nets["a"]})
    np.testing.assert_allclose(predict((1.0, 0.0), nets), only_a, rtol=1e-6)
    both = predict((1.0, 1.0), nets)
    assert not np.allclose(both, only_a)
    np.testing.assert_allclose(predict((0.0, 0.0), nets), both, rtol=1e-6)  # all 0: equal
