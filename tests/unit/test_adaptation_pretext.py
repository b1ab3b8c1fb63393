"""The self-supervised pretext degradation."""

from __future__ import annotations

import pytest
import torch
from deep3m.adaptation.pretext import degrade
from deep3m.core.errors import InvalidArgumentError


def test_degradation_keeps_shape_and_range() -> None:
    clean = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.8
    out = degrade(clean, generator=torch.Generator().manual_seed(1))
    assert out.shape == clean.shape
    peak = clean.amax(dim=(1, 2, 3))
    assert torch.all(out >= 0)
    assert torch.all(out.amax(dim=(1, 2, 3)) <= peak + 1e-6)
    assert (out - clean).abs().mean() > 0.05


def test_degradation_is_noisy_and_blurred() -> None:
    flat = torch.full((1, 1, 32, 32), 0.5)
    noisy_only = degrade(flat, generator=torch.Generator().manual_seed(0), scale=1.0)
    both = degrade(flat, generator=torch.Generator().manual_seed(0))
    assert noisy_only.std() > 0.05  # σ = 0.3 · max

    # ×½ then back: neighbouring pixels agree more than with noise alone.
    def roughness(x: torch.Tensor) -> float:
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    assert roughness(both) < 0.7 * roughness(noisy_only)


def test_degradation_is_reproducible_with_a_generator() -> None:
    clean = torch.rand(2, 1, 16, 16)
    a = degrade(clean, generator=torch.Generator().manual_seed(5))
    b = degrade(clean, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_bad_patches_are_refused() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        degrade(torch.rand(16, 16))
    assert err.value.field == "patches"
    with pytest.raises(InvalidArgumentError):
        degrade(torch.rand(1, 1, 16, 16), scale=0)
