"""The self-supervised pretext: restore a clean patch from a degraded copy.

Degradation as in Franco-Barranco et al. 2022: add Gaussian noise with
σ = 0.3 · max(patch), clip to [0, max(patch)], then downsample ×½ (bilinear) and
upsample back to the original size. The network learns to map the degraded patch
to the clean one (MSE); no labels, so source and target images both serve.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deep3m.core.errors import InvalidArgumentError

NOISE_FRACTION = 0.3
DOWNSAMPLE = 0.5


def degrade(
    clean: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    noise_fraction: float = NOISE_FRACTION,
    scale: float = DOWNSAMPLE,
) -> torch.Tensor:
    """The degraded copy of a (B, C, Y, X) batch of non-negative patches (same shape)."""
    if clean.ndim != 4:
        raise InvalidArgumentError(
            f"pretext patches must be (batch, channels, y, x), got {tuple(clean.shape)}",
            field="patches",
        )
    if not 0 < scale <= 1:
        raise InvalidArgumentError(f"scale must be in (0, 1], got {scale!r}", field="scale")
    if noise_fraction < 0:
        raise InvalidArgumentError(
            f"noise_fraction must be >= 0, got {noise_fraction!r}", field="noise_fraction"
        )
    x = clean.float()
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    # Drawn where the generator lives (a seeded CPU one stays reproducible), used on x's device.
    noise_device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=noise_device)
    noise = noise.to(x.device)
    noisy = torch.minimum(torch.clamp(x + noise * noise_fraction * peak, min=0.0), peak)
    size = (x.shape[2], x.shape[3])
    small = F.interpolate(noisy, scale_factor=scale, mode="bilinear", align_corners=False)
    return F.interpolate(small, size=size, mode="bilinear", align_corners=False)
