"""Error overlays: true positives, false positives and false negatives in their colours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from deep3m.core.errors import InvalidArgumentError
from deep3m.core.store import Store
from deep3m.postprocess.evaluate import EvaluateSpec, evaluate_volumes
from deep3m.postprocess.overlays import (
    ERROR_COLORS,
    FALSE_NEGATIVE,
    FALSE_POSITIVE,
    TRUE_POSITIVE,
    error_classes,
    error_overlay_page,
    write_error_overlays,
)
from deep3m.testing.volumes import write_volume
from PIL import Image


def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities, ground truth and image of 3 slices with one of each error kind."""
    truth = np.zeros((3, 32, 48), np.uint8)
    truth[:, 4:12, 4:12] = 1  # found
    truth[:, 20:28, 30:40] = 1  # missed
    prob = np.full(truth.shape, 0.1, np.float32)
    prob[:, 4:12, 4:12] = 0.9
    prob[:, 4:12, 30:40] = 0.8  # nothing there
    image = np.tile(np.linspace(0, 200, 48, dtype=np.float32), (3, 32, 1))
    return prob, truth, image


def dominant(pixel: np.ndarray) -> int:
    return int(np.argmax(pixel))  # 0 red, 1 green, 2 blue


def test_error_classes_cover_every_case() -> None:
    predicted = np.array([True, True, False, False])
    truth = np.array([True, False, True, False])
    assert error_classes(predicted, truth).tolist() == [
        TRUE_POSITIVE, FALSE_POSITIVE, FALSE_NEGATIVE, 0,
    ]  # fmt: skip
    with pytest.raises(InvalidArgumentError) as caught:
        error_classes(predicted, truth[:3])
    assert caught.value.field == "ground_truth"


def test_page_colours_and_legend() -> None:
    prob, truth, image = scene()
    classes = error_classes(prob[0] >= 0.5, truth[0] > 0)
    page = error_overlay_page(image[0], classes)
    assert page.dtype == np.uint8 and page.shape[2] == 3
    assert page.shape[0] > 32 and page.shape[1] >= 48  # the legend strip lies below
    assert dominant(page[8, 8]) == 1  # true positive: green
    assert dominant(page[8, 35]) == 0  # false positive: red
    assert dominant(page[24, 35]) == 2  # false negative: blue
    background = page[16, 20]
    assert background[0] == background[1] == background[2]  # the image, in gray
    legend = page[32:].reshape(-1, 3)
    for color, _ in ERROR_COLORS.values():
        assert (legend == np.asarray(color, np.uint8)).all(axis=1).any()  # each swatch is shown


def test_written_pages_one_per_slice(tmp_path: Path) -> None:
    prob, truth, image = scene()
    files = write_error_overlays(
        prob, truth, str(tmp_path / "errors"),
        prediction_kind="probability", ground_truth_kind="labels", image=image, slices=[0, 2],
    )  # fmt: skip
    assert [Path(f).name for f in files] == ["errors_0000.png", "errors_0002.png"]
    page = np.asarray(Image.open(files[1]).convert("RGB"))
    assert dominant(page[24, 35]) == 2 and dominant(page[8, 8]) == 1
    with pytest.raises(InvalidArgumentError) as caught:
        write_error_overlays(
            prob, truth, str(tmp_path / "bad"),
            prediction_kind="probability", ground_truth_kind="labels", image=image[:, :8],
        )  # fmt: skip
    assert caught.value.field == "image"
    assert not (tmp_path / "bad").exists()


def test_evaluate_volumes_writes_overlays(tmp_path: Path) -> None:
    store = Store(f"file://{tmp_path / 'store'}")
    prob, truth, image = scene()
    write_volume(store, "volumes/p.zarr", prob, (3, 16, 16))
    write_volume(store, "volumes/gt.zarr", truth, (3, 16, 16))
    write_volume(store, "volumes/img.zarr", image, (3, 16, 16))
    result = evaluate_volumes(
        (store, "volumes/p.zarr"), (store, "volumes/gt.zarr"), EvaluateSpec(),
        overlays=str(tmp_path / "out"), image=(store, "volumes/img.zarr"),
    )  # fmt: skip
    assert len(result.overlays) == 3 and all(Path(f).is_file() for f in result.overlays)
    assert result.voxels.false_negatives == 3 * 8 * 10
    plain = evaluate_volumes((store, "volumes/p.zarr"), (store, "volumes/gt.zarr"), EvaluateSpec())
    assert plain.overlays == () and plain.voxels == result.voxels
