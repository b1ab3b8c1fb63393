"""The morphology prior and label-free checkpoint selection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from deep3m.adaptation.morphology import Morphology, morphology, select_checkpoint
from deep3m.core.errors import InvalidArgumentError
from deep3m.training.adaptation.candidates import CandidateRecorder, choose, selections
from deep3m.training.adaptation.data import Domain
from torch import nn


def _discs(shape: tuple[int, int, int], centres: list[tuple[int, int]], r: int) -> np.ndarray:
    z, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    sl = np.zeros((h, w), bool)
    for cy, cx in centres:
        sl |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return np.repeat(sl[None], z, axis=0)


def _streaks(shape: tuple[int, int, int], rows: list[int]) -> np.ndarray:
    z, h, w = shape
    sl = np.zeros((h, w), bool)
    for r in rows:
        # Thin wavy lines, as a membrane-like false positive would look.
        xs = np.arange(4, w - 4)
        ys = (r + 3 * np.sin(xs / 3.0)).astype(int)
        sl[ys, xs] = True
        sl[ys + 1, xs] = True
    return np.repeat(sl[None], z, axis=0)


def test_discs_are_solid_and_streaks_are_not() -> None:
    shape = (3, 64, 64)
    discs = morphology(_discs(shape, [(16, 16), (44, 40)], 7))
    streaks = morphology(_streaks(shape, [20, 44]))
    assert discs.solidity > 0.9
    assert streaks.solidity < 0.5
    assert discs.regions == 2 * 3  # two objects, a cross section on each of 3 slices
    assert discs.relative_area == pytest.approx(np.pi * 49 / 64**2, rel=0.1)


def test_small_regions_are_left_out() -> None:
    mask = np.zeros((1, 32, 32), bool)
    mask[0, 2:5, 2:5] = True  # 9 px: left out
    mask[0, 10:20, 10:20] = True
    m = morphology(mask)
    assert m.regions == 1
    assert m.relative_area == pytest.approx(100 / 32**2)
    empty = morphology(np.zeros((2, 8, 8), bool))
    assert empty.empty and math.isnan(empty.solidity)
    assert empty.to_dict()["solidity"] is None


def test_selection_by_solidity_and_area() -> None:
    ref = Morphology(0.95, 0.02, 10)
    cands = [
        ("a", Morphology(0.60, 0.021, 5)),
        ("b", Morphology(0.93, 0.10, 5)),
        ("c", Morphology(math.nan, math.nan, 0)),
    ]
    sol = select_checkpoint(cands, ref, "solidity")
    assert sol.chosen == "b" and sol.fallback is None
    assert sol.distances["c"] is None
    assert sol.distances["b"] == pytest.approx(0.02)
    assert select_checkpoint(cands, ref, "area").chosen == "a"


def test_no_foreground_anywhere_falls_back_to_the_last_and_says_so() -> None:
    none = Morphology(math.nan, math.nan, 0)
    sel = select_checkpoint([("a", none), ("b", none)], Morphology(0.9, 0.01, 3))
    assert sel.chosen == "b"
    assert sel.fallback is not None and "no checkpoint predicts foreground" in sel.fallback


def test_bad_selection_input_is_refused() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        select_checkpoint([("a", Morphology(0.9, 0.1, 1))], Morphology(math.nan, math.nan, 0))
    assert err.value.field == "labels"
    with pytest.raises(InvalidArgumentError) as err:
        select_checkpoint([], Morphology(0.9, 0.1, 1))
    assert err.value.field == "checkpoints"
    with pytest.raises(InvalidArgumentError) as err:
        select_checkpoint([("a", Morphology(0.9, 0.1, 1))], Morphology(0.9, 0.1, 1), "volume")
    assert err.value.field == "select_by"
    with pytest.raises(InvalidArgumentError) as err:
        morphology(np.zeros((2, 2, 8, 8), bool))
    assert err.value.field == "mask"


class _FixedMap(nn.Module):
    """A stand-in network whose 'weights' are the mask it predicts for every slice."""

    def __init__(self, mask: np.ndarray) -> None:
        super().__init__()
        self.frames = 1
        self.register_buffer("mask", torch.from_numpy(mask.astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.mask.shape
        fg = (self.mask * 10 - 5).expand(x.shape[0], 1, h, w)
        return torch.cat([-fg, fg], dim=1)[..., : x.shape[2], : x.shape[3]]


def test_solidity_selection_picks_the_checkpoint_with_mitochondria_like_shapes() -> None:
    shape = (4, 64, 64)
    truth = _discs(shape, [(18, 20), (46, 44)], 8)
    target = Domain.of("target", np.full(shape, 120, np.uint8))
    scoring = Domain.of("target-test", np.full(shape, 120, np.uint8), truth)
    source_labels = _discs(shape, [(30, 30)], 9)  # other places, same kind of shape
    blobs = _discs(shape, [(18, 21), (45, 44)], 7)[0]
    streaks = _streaks(shape, [18, 46])[0]
    net = _FixedMap(streaks)
    rec = CandidateRecorder(net, target, target_scoring=scoring)
    for it, mask in ((100, streaks), (200, blobs), (300, streaks)):
        net.mask.copy_(torch.from_numpy(mask.astype(np.float32)))
        rec(it)
    reference = morphology(source_labels)
    chosen, info = choose(rec.candidates, "solidity", reference)
    assert chosen.iteration == 200
    assert info["fallback"] is None
    # The oracle agrees, and the last checkpoint is the worse one.
    picks = selections(rec.candidates, reference)
    assert picks["oracle"]["chosen"] == chosen.name
    assert picks["last"]["target_iou"] < chosen.target_iou - 0.3
    # Selection by validation needs a source validation set: a clear error, recorded.
    assert picks["validation"]["chosen"] is None and "validation" in picks["validation"]["error"]


def test_a_target_without_foreground_at_any_checkpoint_is_a_recorded_fallback() -> None:
    shape = (2, 32, 32)
    net = _FixedMap(np.zeros(shape[1:], bool))
    rec = CandidateRecorder(net, Domain.of("t", np.full(shape, 50, np.uint8)))
    rec(1)
    rec(2)
    chosen, info = choose(rec.candidates, "solidity", morphology(_discs(shape, [(16, 16)], 6)))
    assert chosen.iteration == 2
    assert "no checkpoint predicts foreground" in info["fallback"]
