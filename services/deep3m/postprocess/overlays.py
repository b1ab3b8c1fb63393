"""Error overlays: where a prediction agrees with the ground truth and where it fails.

Each page shows the image in gray with true positives (predicted and true)
in green, false positives (predicted, not true) in red and false negatives
(true, missed) in blue, and a legend in a strip below the image, so no voxel
of the page is hidden. Foreground is read as evaluation reads it (threshold
for probabilities, nonzero for labels and masks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from deep3m.core.errors import InvalidArgumentError
from deep3m.postprocess.export import gray_page, page_indices, write_png_pages
from deep3m.postprocess.foreground import Kind, foreground

TRUE_POSITIVE, FALSE_POSITIVE, FALSE_NEGATIVE = 1, 2, 3
# Colour-blind-safe enough to tell apart: green, red, blue.
ERROR_COLORS: Mapping[int, tuple[tuple[int, int, int], str]] = {
    TRUE_POSITIVE: ((0, 200, 0), "true positive"),
    FALSE_POSITIVE: ((230, 30, 30), "false positive"),
    FALSE_NEGATIVE: ((30, 110, 255), "false negative"),
}
_ROW_PX = 14
_LEGEND_WIDTH_PX = 140


def error_classes(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per voxel: 0 (true negative), 1 (true positive), 2 (false positive), 3 (false negative)."""
    if predicted.shape != truth.shape:
        raise InvalidArgumentError(
            f"prediction shape {predicted.shape} differs from ground truth shape {truth.shape}",
            field="ground_truth",
        )
    out = np.zeros(predicted.shape, np.uint8)
    out[predicted & truth] = TRUE_POSITIVE
    out[predicted & ~truth] = FALSE_POSITIVE
    out[~predicted & truth] = FALSE_NEGATIVE
    return out


def _legend(width: int) -> np.ndarray:
    strip = Image.new("RGB", (width, _ROW_PX * len(ERROR_COLORS) + 4), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    for row, (color, name) in enumerate(ERROR_COLORS.values()):
        top = 2 + row * _ROW_PX
        draw.rectangle((4, top + 2, 13, top + 11), fill=color)
        draw.text((18, top), name, fill=(255, 255, 255), font=font)
    return np.asarray(strip)


def error_overlay_page(
    image: np.ndarray | None, classes: np.ndarray, *, alpha: float = 0.6
) -> np.ndarray:
    """An RGB page (uint8): ``image`` in gray (black when None) under the error colours,
    with the legend below."""
    if not 0.0 < alpha <= 1.0:
        raise InvalidArgumentError(f"alpha must lie in (0, 1], got {alpha}", field="alpha")
    if image is not None and image.shape != classes.shape:
        raise InvalidArgumentError(
            f"image page shape {image.shape} differs from the prediction's {classes.shape}",
            field="image",
        )
    base = gray_page(image) if image is not None else np.zeros(classes.shape, np.uint8)
    rgb = np.repeat(base.astype(np.float64)[..., None], 3, axis=-1)
    for value, (color, _) in ERROR_COLORS.items():
        hit = classes == value
        rgb[hit] = rgb[hit] * (1 - alpha) + np.asarray(color, np.float64) * alpha
    page = np.asarray(np.rint(rgb), np.uint8)
    width = max(page.shape[1], _LEGEND_WIDTH_PX)
    canvas = np.zeros((page.shape[0], width, 3), np.uint8)
    canvas[:, : page.shape[1]] = page
    return np.concatenate([canvas, _legend(width)], axis=0)


def write_error_overlays(
    prediction: Any,
    ground_truth: Any,
    destination: str,
    *,
    prediction_kind: Kind,
    ground_truth_kind: Kind,
    threshold: float = 0.5,
    image: Any | None = None,
    slices: Sequence[int] | None = None,
    alpha: float = 0.6,
    prefix: str = "errors",
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """One error-overlay PNG per slice (all by default) into ``destination`` (a local
    folder or a remote URL); ``prediction``, ``ground_truth`` and ``image`` are 3-D
    arrays (zarr or numpy) of one shape. Returns the files written."""
    shape = tuple(ground_truth.shape)
    for name, array in (("prediction", prediction), ("image", image)):
        if array is not None and tuple(array.shape) != shape:
            raise InvalidArgumentError(
                f"{name} shape {tuple(array.shape)} differs from ground truth shape {shape}",
                field=name,
            )
    pages = list(page_indices(shape, slices))

    def render(z: int) -> np.ndarray:
        predicted = foreground(np.asarray(prediction[z]), prediction_kind, threshold)
        truth = foreground(np.asarray(ground_truth[z]), ground_truth_kind, threshold)
        page = np.asarray(image[z]) if image is not None else None
        return error_overlay_page(page, error_classes(predicted, truth), alpha=alpha)

    return write_png_pages(
        render, pages, shape[0], destination, prefix=prefix, storage_options=storage_options
    )
