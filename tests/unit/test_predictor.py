"""EnsemblePredictor: windows, test-time augmentation, seamless blocks, devices."""

from __future__ import annotations

import threading
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
from deep3m.core.geometry import Block, Box, plan_blocks
from deep3m.core.store import Store
from deep3m.inference.app import compute_slots, pipelined
from deep3m.inference.cache import DevicePool, ModelCache
from deep3m.inference.predictor import (
    EnsemblePredictor,
    foreground_probability,
    inference_devices,
    select_device,
    whole_volume_block,
)
from deep3m.models.card import MemberCard, ModelCard, load_state_dict, save_model
from deep3m.runtime.settings import Settings
from deep3m.testing.nets import FramePicker, LocalNet, PointwiseNet
from torch import nn

FRAMES = {"1fm": 1, "3fm": 3, "5fm": 5}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_card(
    members: tuple[str, ...] = ("1fm", "3fm", "5fm"),
    *,
    halo: tuple[int, int, int] = (2, 16, 16),
    num_classes: int = 2,
) -> ModelCard:
    return ModelCard(
        id="test-model",
        members=tuple(MemberCard(name=m, frames=FRAMES[m]) for m in members),
        normalization_mean=100.0,
        normalization_std=50.0,
        halo=halo,
        input_multiple=16,
        num_classes=num_classes,
    )


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, size=(20, 100, 100), dtype=np.uint8)


def test_level_10_picks_the_window_slices() -> None:
    """Frame k of member N's window for output slice i is input slice i - N//2 + k."""
    raw = np.random.default_rng(0).integers(0, 256, (9, 20, 24)).astype(np.uint8)
    card = make_card(("5fm",))
    norm = card.normalize(raw)
    for index in range(5):
        pred = EnsemblePredictor(
            card, {"5fm": FramePicker(5, index)}, tta_level=10, batch_size=3
        ).predict_padded(raw)
        assert pred.shape == (5, 20, 24) and pred.dtype == np.float32
        want = sigmoid(norm[index : index + 5])
        np.testing.assert_allclose(pred, want, rtol=1e-5, atol=1e-6)


def test_z_reversed_variations_are_mapped_back() -> None:
    """Level 1 on 3fm averages 8 in-plane variations of the stack and 8 of the reversed
    stack; a picker of the first frame sees slice i-1 in the first, i+1 in the second."""
    raw = np.random.default_rng(1).integers(0, 256, (6, 32, 20)).astype(np.uint8)
    card = make_card(("3fm",))
    norm = card.normalize(raw)
    pred = EnsemblePredictor(card, {"3fm": FramePicker(3, 0)}, tta_level=1).predict_padded(raw)
    want = (sigmoid(norm[0:4]) + sigmoid(norm[2:6])) / 2
    np.testing.assert_allclose(pred, want, rtol=1e-5, atol=1e-6)
    # Level 4 for 3fm: {7, 8} in-plane, {10, 12} z-reversed: the same half and half.
    pred4 = EnsemblePredictor(card, {"3fm": FramePicker(3, 0)}, tta_level=4).predict_padded(raw)
    np.testing.assert_allclose(pred4, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(7, 48, 48), (7, 37, 50)])
def test_equivariant_network_gives_the_same_output_at_every_level(
    shape: tuple[int, int, int],
) -> None:
    """A network that commutes with every variation: de-augmenting correctly makes each
    level equal the identity level, so any wrong inverse shows up."""
    raw = np.random.default_rng(2).integers(0, 256, shape).astype(np.uint8)
    card = make_card()
    members: dict[str, nn.Module] = {m: PointwiseNet(f, seed=f) for m, f in FRAMES.items()}
    base = EnsemblePredictor(card, members, tta_level=10).predict_padded(raw)
    assert base.shape == (shape[0] - 4, *shape[1:])
    assert base.std() > 0.01  # not a constant map, so misplacement would be visible
    for level in (1, 2, 4):
        pred = EnsemblePredictor(card, members, tta_level=level).predict_padded(raw)
        np.testing.assert_allclose(pred, base, rtol=1e-5, atol=1e-6)


def test_non_equivariant_network_is_averaged_over_variations() -> None:
    """With LocalNet (not rotation invariant) level 1 differs from level 10 but equals
    the mean of each single-variation prediction mapped back by hand."""
    raw = np.random.default_rng(3).integers(0, 256, (3, 32, 48)).astype(np.uint8)
    card = make_card(("1fm",))
    net = LocalNet(1)
    p10 = EnsemblePredictor(card, {"1fm": net}, tta_level=10).predict_padded(raw)
    p1 = EnsemblePredictor(card, {"1fm": net}, tta_level=1).predict_padded(raw)
    assert np.abs(p1 - p10).max() > 1e-3
    norm = torch.from_numpy(card.normalize(raw[1:2]))  # output slice 1
    manual = []
    with torch.no_grad():
        for k in range(4):
            for flip in (False, True):
                x = norm.flip(-1) if flip else norm
                y = foreground_probability(net(torch.rot90(x, k, (-2, -1))[None]))
                y = torch.rot90(y, -k, (-2, -1))
                manual.append((y.flip(-1) if flip else y)[0].numpy())
    np.testing.assert_allclose(p1[1], np.mean(manual, axis=0), rtol=1e-5, atol=1e-6)


def test_ensemble_averages_members() -> None:
    raw = np.random.default_rng(4).integers(0, 256, (5, 16, 16)).astype(np.uint8)
    card = make_card(("1fm", "3fm"))
    norm = card.normalize(raw)
    pred = EnsemblePredictor(
        card, {"1fm": FramePicker(1, 0), "3fm": FramePicker(3, 2)}, tta_level=10
    ).predict_padded(raw, z_margin=1)
    np.testing.assert_allclose(pred, (sigmoid(norm[1:4]) + sigmoid(norm[2:5])) / 2, rtol=1e-5)


def test_multiclass_foreground_is_one_minus_background() -> None:
    logits = torch.tensor([[[[0.0]], [[1.0]], [[2.0]]]])
    expected = 1 - np.exp(0) / (np.exp(0) + np.exp(1) + np.exp(2))
    assert foreground_probability(logits).item() == pytest.approx(expected, rel=1e-6)
    two = torch.tensor([[[[0.5]], [[-1.5]]]])
    assert foreground_probability(two).item() == pytest.approx(
        np.exp(-1.5) / (np.exp(0.5) + np.exp(-1.5)), rel=1e-6
    )


def test_seamless_blocks_equal_whole_volume(volume: np.ndarray) -> None:
    """Blocks 8×32×32 over 20×100×100 (3×4×4 blocks, edge blocks clipped in every axis)
    with a halo covering LocalNet's receptive field equal one whole-volume pass."""
    halo = (2, 8, 8)
    assert halo[1] >= LocalNet.RADIUS
    card = make_card(halo=halo)
    members: dict[str, nn.Module] = {m: LocalNet(f, seed=f) for m, f in FRAMES.items()}
    predictor = EnsemblePredictor(card, members, tta_level=2, batch_size=8)
    whole = predictor.predict_block(volume, whole_volume_block(volume.shape, halo))
    plan = plan_blocks(volume.shape, (8, 32, 32), halo)
    assert plan.grid_shape == (3, 4, 4)
    stitched = np.full(volume.shape, np.nan, dtype=np.float32)
    for block in plan:
        stitched[block.core.slices()] = predictor.predict_block(volume, block)
    assert not np.isnan(stitched).any()
    np.testing.assert_allclose(stitched, whole, rtol=1e-5, atol=2e-6)


def test_too_little_halo_is_not_seamless(volume: np.ndarray) -> None:
    """The same comparison fails when the halo is below the receptive field: the test
    above can tell seams from no seams."""
    card = make_card(("1fm",), halo=(0, 2, 2))
    predictor = EnsemblePredictor(card, {"1fm": LocalNet(1)}, tta_level=10)
    sub = volume[:4, :96, :96]
    whole = predictor.predict_block(sub, whole_volume_block(sub.shape, (0, 16, 16)))
    block = next(iter(plan_blocks(sub.shape, (4, 32, 32), (0, 2, 2))))
    assert np.abs(predictor.predict_block(sub, block) - whole[block.core.slices()]).max() > 1e-3


def test_predict_block_widens_z_context_and_crops_the_core(volume: np.ndarray) -> None:
    card = make_card(("5fm",))
    predictor = EnsemblePredictor(card, {"5fm": FramePicker(5, 4)}, tta_level=10)
    core = Box((3, 10, 20), (6, 30, 50))
    block = Block((0, 0, 0), core, core)  # no halo at all: z context is added
    assert predictor.read_box(block) == Box((1, 10, 20), (8, 30, 50))
    pred = predictor.predict_block(volume, block)
    want = sigmoid(card.normalize(volume[5:8, 10:30, 20:50]))
    np.testing.assert_allclose(pred, want, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named() -> None:
    card = make_card(("3fm",))
    predictor = EnsemblePredictor(card, {"3fm": FramePicker(3, 1)}, tta_level=10)
    raw = np.zeros((4, 16, 16), np.uint8)
    with pytest.raises(InvalidArgumentError, match="z margin") as exc:
        predictor.predict_padded(raw, z_margin=0)
    assert exc.value.field == "halo"
    with pytest.raises(InvalidArgumentError, match="3D"):
        predictor.predict_padded(raw[0])
    with pytest.raises(InvalidArgumentError, match="nothing to predict"):
        predictor.predict_padded(raw[:2])
    with pytest.raises(InvalidArgumentError, match="'5fm'"):
        EnsemblePredictor(card, {"5fm": FramePicker(5, 1)}, tta_level=10)
    with pytest.raises(InvalidArgumentError, match="tta_level"):
        EnsemblePredictor(card, {"3fm": FramePicker(3, 1)}, tta_level=3)
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        EnsemblePredictor(card, {"3fm": FramePicker(3, 1)}, tta_level=10, batch_size=0)
    with pytest.raises(InvalidArgumentError, match="at least one member"):
        EnsemblePredictor(card, {}, tta_level=10)


def test_wrong_logit_shape_names_the_member() -> None:
    class Cropping(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 2, x.shape[2] // 2, x.shape[3])

    predictor = EnsemblePredictor(make_card(("1fm",)), {"1fm": Cropping()}, tta_level=10)
    with pytest.raises(InvalidArgumentError, match="member '1fm' returned logits"):
        predictor.predict_padded(np.zeros((1, 16, 16), np.uint8))


def test_cancel_stops_between_batches() -> None:
    calls = []

    class Counting(nn.Module):
        def __init__(self, event: threading.Event) -> None:
            super().__init__()
            self.event = event

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(x.shape[0])
            self.event.set()  # cancel while the first batch runs
            return torch.zeros(x.shape[0], 2, *x.shape[2:])

    cancelled = threading.Event()
    predictor = EnsemblePredictor(
        make_card(("1fm",)), {"1fm": Counting(cancelled)}, tta_level=10, batch_size=2
    )
    with pytest.raises(CancelledError):
        predictor.predict_padded(np.zeros((10, 16, 16), np.uint8), cancelled=cancelled)
    assert calls == [2]


def test_device_selection() -> None:
    assert select_device("auto", cuda_available=False) == torch.device("cpu")
    assert select_device("auto", cuda_available=True) == torch.device("cuda")
    assert select_device("cpu", cuda_available=True) == torch.device("cpu")
    assert select_device("cuda", cuda_available=True) == torch.device("cuda")
    with pytest.raises(FailedPreconditionError, match="DEEP3M_DEVICE=cuda") as exc:
        select_device("cuda", cuda_available=False)
    assert exc.value.field == "DEEP3M_DEVICE"
    with pytest.raises(InvalidArgumentError, match="'tpu'"):
        select_device("tpu")
    assert inference_devices("auto", cuda_count=2) == (
        torch.device("cuda", 0),
        torch.device("cuda", 1),
    )
    assert inference_devices("cpu", cuda_count=2) == (torch.device("cpu"),)
    assert inference_devices("auto", cuda_count=0) == (torch.device("cpu"),)


def test_amp_defaults_to_cuda_only() -> None:
    card = make_card(("1fm",))
    assert EnsemblePredictor(card, {"1fm": FramePicker(1, 0)}, tta_level=10).amp is False
    assert (
        EnsemblePredictor(card, {"1fm": FramePicker(1, 0)}, tta_level=10, device="cuda").amp is True
    )  # constructing needs no GPU
    with pytest.raises(InvalidArgumentError, match="mixed precision needs a CUDA device"):
        EnsemblePredictor(card, {"1fm": FramePicker(1, 0)}, tta_level=10, amp=True)


def test_device_pool_hands_out_the_least_busy_device() -> None:
    pool = DevicePool([torch.device("cuda", 0), torch.device("cuda", 1)])
    with pool.acquire() as first, pool.acquire() as second:
        assert {first.index, second.index} == {0, 1}
        assert pool.busy() == (1, 1)
        with pool.acquire() as third:
            assert third.index == 0
            assert pool.busy() == (2, 1)
    assert pool.busy() == (0, 0)


def test_pipelined_capacity_holds_depth_blocks_per_block_computed() -> None:
    settings = Settings(worker_capacity=1, inference_pipeline_depth=3, metrics_port=0)
    gpus = [torch.device("cuda", 0), torch.device("cuda", 1)]
    # One block computes per GPU at a time; three in flight per GPU.
    assert compute_slots(settings, gpus) == 1
    assert pipelined(settings, gpus).worker_capacity == 6
    cpu = [torch.device("cpu")]
    two = Settings(worker_capacity=2, inference_pipeline_depth=2, metrics_port=0)
    assert compute_slots(two, cpu) == 2
    assert pipelined(two, cpu).worker_capacity == 4
    assert pipelined(Settings(inference_pipeline_depth=1, metrics_port=0), cpu).worker_capacity == 1


def test_model_cache_reuses_reloads_and_evicts(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    card = make_card(("1fm", "3fm"))
    save_model(store, card, {m: PointwiseNet(FRAMES[m]).state_dict() for m in ("1fm", "3fm")})
    calls: list[str] = []

    def loader(store: Store, card: ModelCard, member: str, device: torch.device) -> nn.Module:
        calls.append(member)
        net = PointwiseNet(card.member(member).frames)
        net.load_state_dict(load_state_dict(store, card, member))
        return net.to(device)

    cache = ModelCache(loader, capacity=2)
    cpu = torch.device("cpu")
    first = cache.get(store, "test-model", [], cpu)
    assert tuple(first.members) == ("1fm", "3fm") and calls == ["1fm", "3fm"]
    assert cache.get(store, "test-model", ["1fm", "3fm"], cpu) is first
    only3 = cache.get(store, "test-model", ["3fm", "3fm"], cpu)
    assert tuple(only3.members) == ("3fm",) and cache.loads == 2
    # Saved again under the same id with other settings: reloaded, not served stale.
    save_model(
        store,
        card.model_copy(update={"normalization_mean": 7.0}),
        {m: PointwiseNet(FRAMES[m]).state_dict() for m in ("1fm", "3fm")},
    )
    again = cache.get(store, "test-model", [], cpu)
    assert again is not first and again.card.normalization_mean == 7.0 and cache.loads == 3
    assert len(cache) == 2  # capacity 2: the least recently used entry was dropped
    with pytest.raises(InvalidArgumentError, match="no member '5fm'"):
        cache.get(store, "test-model", ["5fm"], cpu)
    with pytest.raises(NotFoundError, match="model 'absent' not found") as exc:
        cache.get(store, "absent", [], cpu)
    assert exc.value.field == "model"
