"""Adaptation options: one set of checks for the configuration and the scheduler, the
fingerprint that keeps an adapted member from resuming a plain one, the Y-Net served as a
2-class segmenter, and the whole-volume histogram a prediction-time map is built from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from deep3m.adaptation.histogram import volume_counts
from deep3m.adaptation.options import adaptation_problem
from deep3m.core.errors import InvalidArgumentError
from deep3m.models.recipes import ADAPTATION_ARCHITECTURE, RECIPES
from deep3m.models.registry import build_network
from deep3m.models.ynet import AttentionYNet
from deep3m.training.config import TrainConfig
from deep3m.v1 import common_pb2

BASE = {"model_id": "m", "images": {"path": "a.zarr"}, "labels": {"path": "b.zarr"}}
TARGET = {"path": "t.zarr"}


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"adaptation": "bogus", "adapt_to": TARGET}, "adaptation"),
        ({"select_by": "best", "adapt_to": TARGET}, "select_by"),
        ({"select_by": "area"}, "select_by"),
        ({"adaptation": "translation"}, "adapt_to"),
        ({"adapt_to": TARGET, "adaptation": "ssl", "input_scale": 2}, "input_scale"),
        ({"adapt_to": TARGET, "adaptation": "multitask", "members": ("3fm",)}, "members"),
        ({"adapt_to": TARGET, "num_classes": 3}, "num_classes"),
        ({"adapt_to": TARGET, "base_model": "base"}, "base_model"),
    ],
)
def test_inconsistent_options_name_their_field(values: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        TrainConfig.create(**BASE, **values)
    assert err.value.field == field


def test_the_scheduler_check_is_the_same_function() -> None:
    assert adaptation_problem(
        "ssl", "solidity", adapt_to=False, members=("1fm",), input_scale=1, base_model=False
    ) == ("adapt_to", "adaptation 'ssl' needs a target volume (adapt_to)")
    assert (
        adaptation_problem(
            "none", "solidity", adapt_to=True, members=("1fm",), input_scale=1, base_model=False
        )
        is None
    )


def test_from_spec_reads_the_adaptation_fields_and_trains_at_full_resolution() -> None:
    spec = common_pb2.TrainSpec(
        model="m",
        images=common_pb2.VolumeRef(path="a.zarr"),
        labels=common_pb2.VolumeRef(path="b.zarr"),
        adapt_to=common_pb2.VolumeRef(path="t.zarr", array="0"),
        adaptation="histogram",
        select_by="solidity",
        adaptation_iterations=7,
        adaptation_checkpoints=3,
        match_histogram_at_predict=True,
    )
    config = TrainConfig.from_spec(spec)
    assert config.adapting and config.adapt_to is not None
    assert config.adapt_to.describe() == "t.zarr[0]"
    assert (config.adaptation, config.select_by) == ("histogram", "solidity")
    assert (config.adaptation_iterations, config.adaptation_checkpoints) == (7, 3)
    assert config.match_histogram_at_predict
    # Adaptation trains the network its benchmark measured, at full resolution,
    # whatever the default recipe's plain training uses.
    assert (config.input_scale, config.architecture) == (1, ADAPTATION_ARCHITECTURE)
    plain = TrainConfig.create(**BASE)
    assert plain.architecture == RECIPES["default"]["architecture"] and not plain.adapting
    chosen = TrainConfig.create(**BASE, adapt_to=TARGET, architecture="unet2d", input_scale=1)
    assert chosen.architecture == "unet2d"
    # A snapshot of a plain member is never resumed as an adapted one.
    assert config.fingerprint("1fm") != plain.fingerprint("1fm")
    assert "adapt_to" not in plain.fingerprint("1fm")


def test_multitask_members_are_the_ynet() -> None:
    config = TrainConfig.create(
        **BASE, adapt_to=TARGET, adaptation="multitask", members=("1fm",), architecture="deepem3d"
    )
    assert config.network_architecture == "ynet"


def test_the_ynet_segmenter_serves_the_mask_as_two_class_logits() -> None:
    torch.manual_seed(0)
    trained = AttentionYNet(0.125).eval()
    served = build_network("ynet", frames=1, width=0.125).eval()
    served.load_state_dict({f"ynet.{k}": v for k, v in trained.state_dict().items()})
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        mask = torch.sigmoid(trained(x)[1][:, 0])
        probs = torch.softmax(served(x), dim=1)
    assert probs.shape == (2, 2, 32, 32)
    torch.testing.assert_close(probs[:, 1], mask)
    with pytest.raises(InvalidArgumentError) as err:
        build_network("ynet", frames=3, width=0.125)
    assert err.value.field == "frames"


def test_volume_counts_are_the_whole_volume_histogram() -> None:
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 256, (37, 9, 11), dtype=np.uint8)
    counts = volume_counts(vol, slab=5)
    np.testing.assert_array_equal(counts, np.bincount(vol.ravel(), minlength=256))
    with pytest.raises(InvalidArgumentError) as err:
        volume_counts(vol.astype(np.float32))
    assert err.value.field == "input"
    with pytest.raises(InvalidArgumentError):
        volume_counts(np.zeros((0, 4, 4), np.uint8))
