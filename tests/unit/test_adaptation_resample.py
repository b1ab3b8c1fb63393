"""Resampling a stack to another pixel size before adapting."""

from __future__ import annotations

import numpy as np
import pytest
from deep3m.adaptation.resample import rescale_stack
from deep3m.core.errors import InvalidArgumentError


def test_a_4nm_stack_on_the_5_9nm_grid() -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, 512, 512)).astype(np.uint8)
    labels = np.zeros((2, 512, 512), np.uint8)
    labels[:, 100:200, 100:300] = 1
    out = rescale_stack(images, 4.0, 5.9)
    lbl = rescale_stack(labels, 4.0, 5.9, labels=True)
    assert out.shape == (2, 347, 347) and out.dtype == np.uint8
    assert set(np.unique(lbl)) == {0, 1}
    # The object keeps its size in nanometres: about (4 / 5.9)² of its pixels.
    assert lbl.sum() / labels.sum() == pytest.approx((4 / 5.9) ** 2, rel=0.03)
    assert rescale_stack(images, 5.9, 5.9) is images


def test_bad_pixel_sizes_and_shapes_are_refused() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        rescale_stack(np.zeros((1, 8, 8), np.uint8), 0.0, 5.9)
    assert err.value.field == "voxel_size_nm"
    with pytest.raises(InvalidArgumentError) as err:
        rescale_stack(np.zeros((8, 8), np.uint8), 4.0, 5.9)
    assert err.value.field == "images"
