"""Every adaptation method end to end on tiny synthetic domains (CPU, a few iterations)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from deep3m.adaptation.histogram import HistogramReference
from deep3m.core.errors import FailedPreconditionError, InvalidArgumentError
from deep3m.models.translation import TranslationConfig
from deep3m.training.adaptation.data import Domain
from deep3m.training.adaptation.methods import METHODS, AdaptationSpec, adapt

TINY = AdaptationSpec(
    width=0.0625,
    iterations=4,
    unsupervised_iterations=2,
    batch=2,
    patch=32,
    checkpoints=2,
    ynet_width=0.25,
    translation=TranslationConfig(
        ngf=4, ndf=4, n_blocks=1, nce_patches=16, mlp_channels=8, patch=32
    ),
)


def _blobs(seed: int, n: int = 3, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, size, size), bool)
    for z in range(n):
        for _ in range(3):
            cy, cx = rng.integers(8, size - 8, 2)
            out[z] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= 25
    return out


def _domain(name: str, seed: int, fg: int, bg: int, labelled: bool = True) -> Domain:
    labels = _blobs(seed)
    rng = np.random.default_rng(seed + 1)
    images = np.where(labels, fg, bg) + rng.normal(0, 8, labels.shape)
    images = np.clip(images, 1, 255).astype(np.uint8)
    return Domain.of(name, images, labels if labelled else None)


SOURCE = _domain("src", 0, fg=200, bg=60)
SOURCE_VAL = _domain("src-val", 10, fg=200, bg=60)
TARGET = _domain("tgt", 20, fg=90, bg=170, labelled=False)
TARGET_FEW = _domain("tgt-few", 30, fg=90, bg=170)
TARGET_TEST = _domain("tgt-test", 40, fg=90, bg=170)


@pytest.fixture(scope="module")
def baseline() -> dict:
    result = adapt(
        TINY,
        SOURCE,
        TARGET,
        source_validation=SOURCE_VAL,
        target_scoring=TARGET_TEST,
    )
    return {"state": result.candidates[-1].state, "result": result}


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_each_method_records_candidates_and_card_fields(
    method: str, baseline: dict, tmp_path: Path
) -> None:
    spec = replace(TINY, method=method)
    result = adapt(
        spec,
        SOURCE,
        TARGET,
        source_validation=SOURCE_VAL,
        target_scoring=TARGET_TEST,
        target_labelled=TARGET_FEW,
        base_state=baseline["state"],
        out_dir=tmp_path,
    )
    expected = 1 if method == "fewlabel" else 4  # a tenth of the iterations, at least one
    assert result.stages[-1].iterations == expected
    assert result.chosen in result.candidates
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["method"] == method and doc["chosen"] == result.chosen.name
    for cand in doc["candidates"]:
        assert {"target_solidity", "target_relative_area", "source_validation_iou"} <= set(cand)
        assert 0.0 <= cand["target_iou"] <= 1.0  # the oracle figure, target labels given
    assert {"solidity", "area", "validation", "last", "oracle"} <= set(doc["selected"])
    saved = sorted(p.name for p in (tmp_path / "candidates").glob("*.safetensors"))
    assert saved == sorted(f"{c.name}.safetensors" for c in result.candidates)
    card = result.card["adaptation"]
    assert card["method"] == method and card["chosen_checkpoint"] == result.chosen.name
    hist = HistogramReference.from_dict(card["training_histogram"])
    assert len(hist.counts) == 256
    unsupervised = {"translation", "ssl", "multitask"}
    assert (len(result.stages) > 1) == (method in unsupervised)
    if method == "multitask":
        assert [s.name for s in result.stages] == ["ynet-stage1", "ynet-stage2", "segmentation"]


def test_histogram_matching_trains_on_target_like_source(baseline: dict) -> None:
    result = adapt(replace(TINY, method="histogram"), SOURCE, TARGET)
    matched = HistogramReference.from_dict(result.card["adaptation"]["training_histogram"])
    plain = HistogramReference.from_dict(
        baseline["result"].card["adaptation"]["training_histogram"]
    )
    target = np.asarray(TARGET.images[0])

    # The matched training images have the target's median grey level, not the source's.
    def median(h: HistogramReference) -> int:
        return int(np.searchsorted(h.quantiles, 0.5))

    assert abs(median(matched) - int(np.median(target))) < 10
    assert abs(median(plain) - int(np.median(target))) > 50


def test_ssl_fine_tuning_leaves_the_encoder_frozen(baseline: dict) -> None:
    import torch

    result = adapt(replace(TINY, method="ssl", checkpoints=1), SOURCE, TARGET)
    cands = result.candidates
    assert len(cands) == 1
    pretext_state = result.stages[0]
    assert pretext_state.name == "ssl-pretext" and pretext_state.iterations == 2
    # Re-run the pretext alone with the same seed: the encoder must equal it after fine-tuning.
    spec = replace(TINY, method="ssl")
    from deep3m.training.adaptation.networks import build_segmenter
    from deep3m.training.adaptation.pretraining import ssl_pretext

    torch.manual_seed(spec.seed)
    net = build_segmenter(spec.architecture, frames=1, width=spec.width)
    ssl_pretext(net, spec, SOURCE, TARGET)
    enc = {k: v for k, v in net.state_dict().items() if k.startswith(("inc.", "down."))}
    final = result.net.state_dict()
    assert enc and all(torch.equal(final[k], v) for k, v in enc.items())
    assert not torch.equal(final["head.weight"], net.state_dict()["head.weight"])


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"target": np.zeros((4, 48, 48, 1), np.uint8)}, InvalidArgumentError, "tgt.images[0]"),
        ({"target": np.zeros((48, 48), np.uint8)}, InvalidArgumentError, "tgt.images[0]"),
        ({"target": np.zeros((0, 48, 48), np.uint8)}, InvalidArgumentError, "tgt.images[0]"),
    ],
)
def test_bad_targets_get_a_clear_error(kwargs: dict, error: type, field: str) -> None:
    with pytest.raises(error) as err:
        Domain.of("tgt", kwargs["target"])
    assert err.value.field == field


def test_bad_requests_get_a_clear_error() -> None:
    with pytest.raises(FailedPreconditionError) as err:
        adapt(replace(TINY, method="fewlabel"), SOURCE, TARGET, target_labelled=TARGET_FEW)
    assert err.value.field == "base_model"
    with pytest.raises(InvalidArgumentError) as err:
        adapt(replace(TINY, method="supervised"), SOURCE, TARGET)
    assert err.value.field == "target_labelled"
    with pytest.raises(InvalidArgumentError) as err:
        adapt(TINY, SOURCE, Domain.of("tgt", np.full((2, 8, 8), 9, np.uint8)))
    assert err.value.field == "target"
    with pytest.raises(InvalidArgumentError) as err:
        adapt(TINY, SOURCE, Domain.of("tgt", np.zeros((2, 48, 48), np.uint8)))
    assert "only padding" in err.value.message
    blank = Domain.of("src", SOURCE.images[0], np.zeros_like(SOURCE.images[0]))
    with pytest.raises(InvalidArgumentError) as err:
        adapt(TINY, blank, TARGET)
    assert err.value.field == "source.labels"
    with pytest.raises(InvalidArgumentError) as err:
        replace(TINY, method="magic")
    assert err.value.field == "adaptation"
    with pytest.raises(InvalidArgumentError) as err:
        replace(TINY, select_by="best")
    assert err.value.field == "select_by"
    with pytest.raises(InvalidArgumentError) as err:
        adapt(replace(TINY, select_by="validation"), SOURCE, TARGET)
    assert err.value.field == "validation"
