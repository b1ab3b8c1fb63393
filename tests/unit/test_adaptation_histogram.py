"""Histogram matching to a pooled target reference."""

from __future__ import annotations

import numpy as np
import pytest
from deep3m.adaptation.histogram import (
    BINS,
    HistogramReference,
    apply_lut,
    corrected_zero_bin,
    lut_from_counts,
    match_histogram,
    match_stack,
    prediction_reference,
    random_histogram_matching,
    reference_histogram,
)
from deep3m.core.errors import InvalidArgumentError


def _cdf(values: np.ndarray) -> np.ndarray:
    counts = np.bincount(values.ravel(), minlength=BINS).astype(float)
    return np.cumsum(counts) / counts.sum()


def _images(rng: np.random.Generator, mean: float, sd: float, shape=(4, 64, 64)) -> np.ndarray:
    return np.clip(rng.normal(mean, sd, shape), 1, 255).astype(np.uint8)


def test_matched_source_follows_the_target_distribution() -> None:
    rng = np.random.default_rng(0)
    source = _images(rng, 80, 15)
    target = _images(rng, 170, 35)
    ref = reference_histogram(target)
    matched = match_stack(source, ref, dtype=np.uint8)
    before = np.abs(_cdf(source) - _cdf(target)).max()
    after = np.abs(_cdf(matched) - _cdf(target)).max()
    assert before > 0.9
    assert after < 0.03
    # The map is monotone: grey-level order is kept.
    order = np.argsort(source[0].ravel(), kind="stable")
    assert np.all(np.diff(match_histogram(source[0], ref).ravel()[order]) >= -1e-5)


def test_zero_stays_zero_and_padding_does_not_shift_the_tissue() -> None:
    rng = np.random.default_rng(1)
    source = _images(rng, 90, 20, (1, 64, 64))[0]
    padded = source.copy()
    padded[:, :20] = 0  # a black border from alignment
    target = _images(rng, 160, 20)
    ref = reference_histogram(target)
    out = match_histogram(padded, ref)
    assert np.all(out[:, :20] == 0)
    # Tissue maps about as it does without the border: the zero bin was corrected.
    plain = match_histogram(source, ref)
    assert np.abs(out[:, 20:] - plain[:, 20:]).mean() < 3.0
    assert out[:, 20:].min() > 0


def test_zero_bin_correction_of_the_reference() -> None:
    assert corrected_zero_bin(5, 3) == 7.0
    assert corrected_zero_bin(1, 5) == 0.0
    rng = np.random.default_rng(2)
    target = np.clip(rng.integers(0, 40, (2, 32, 32)), 0, 255).astype(np.uint8)
    target[:, :8] = 0  # heavy padding
    raw = np.bincount(target.ravel(), minlength=BINS) / 2
    ref = reference_histogram(target)
    assert ref.counts[0] == pytest.approx(max(0.0, 2 * raw[1] - raw[2]))
    assert ref.counts[0] < raw[0] / 4
    assert ref.counts[1:] == pytest.approx(tuple(raw[1:]))


def test_reference_round_trips_as_plain_data() -> None:
    ref = reference_histogram(np.arange(256, dtype=np.uint8).reshape(1, 16, 16))
    data = ref.to_dict()
    assert data["bins"] == BINS and len(data["counts"]) == BINS
    assert HistogramReference.from_dict(data) == ref
    with pytest.raises(InvalidArgumentError) as err:
        HistogramReference.from_dict({"bins": 128, "counts": [1.0] * 128})
    assert err.value.field == "histogram.bins"


def test_online_augmentation_probability() -> None:
    rng = np.random.default_rng(3)
    img = _images(rng, 60, 10, (32, 32))
    ref = reference_histogram(_images(rng, 200, 10))
    never = random_histogram_matching(img, ref, np.random.default_rng(0), p=0.0)
    always = random_histogram_matching(img, ref, np.random.default_rng(0), p=1.0)
    assert np.array_equal(never, img.astype(np.float32))
    assert always.mean() > 150
    draws = np.random.default_rng(4)
    hits = sum(random_histogram_matching(img, ref, draws, p=0.5).mean() > 150 for _ in range(200))
    assert 70 < hits < 130
    with pytest.raises(InvalidArgumentError):
        random_histogram_matching(img, ref, draws, p=1.5)


@pytest.mark.parametrize(
    ("image", "field"),
    [
        (np.zeros((0, 4), np.uint8), "images[0]"),
        (np.full((4, 4), 0.5, np.float32), "images[0]"),
        (np.full((4, 4), 300, np.uint16), "images[0]"),
    ],
)
def test_bad_images_are_refused(image: np.ndarray, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        reference_histogram([image])
    assert err.value.field == field


def test_an_all_padding_target_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="only padding"):
        reference_histogram(np.zeros((2, 8, 8), np.uint8))


def test_one_volume_map_applied_block_by_block_matches_the_whole() -> None:
    rng = np.random.default_rng(5)
    volume = _images(rng, 70, 25, (2, 64, 64))
    ref = reference_histogram(_images(rng, 150, 30))
    lut = lut_from_counts(np.bincount(volume.ravel(), minlength=BINS), ref)
    blocks = [apply_lut(volume[:, :32], lut), apply_lut(volume[:, 32:], lut)]
    assert np.array_equal(np.concatenate(blocks, axis=1), match_histogram(volume, ref))


def test_prediction_reference_from_a_model_card_record() -> None:
    ref = reference_histogram(np.arange(256, dtype=np.uint8).reshape(1, 16, 16))
    record = {"match_histogram_at_predict": True, "training_histogram": ref.to_dict()}
    assert prediction_reference(record) == ref
    assert prediction_reference({**record, "match_histogram_at_predict": False}) is None
    assert prediction_reference(None) is None
    with pytest.raises(InvalidArgumentError) as err:
        prediction_reference({"match_histogram_at_predict": True})
    assert err.value.field == "adaptation.training_histogram"
