"""Small networks with known properties, for tests and benchmarks of prediction.

Each follows the registry's forward contract: float32 (B, frames, Y, X) in,
logits (B, classes, Y, X) for the centre slice out.

- ``PointwiseNet``: 1×1 convolutions with weights symmetric across frames, so
  it commutes with all 16 CDeep3M variations.
- ``FramePicker``: class-1 logit = one input frame, class-0 logit = 0, so the
  foreground probability is ``sigmoid`` of that frame: shows which slices a
  window holds.
- ``LocalNet``: 3×3 convolutions around one 2× pooling, a receptive field of
  ``RADIUS`` pixels: a block with that much halo predicts its core exactly as
  a whole-volume pass does.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from deep3m.core.errors import InvalidArgumentError


class PointwiseNet(nn.Module):
    def __init__(
        self, frames: int, *, num_classes: int = 2, hidden: int = 8, seed: int = 0
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(hidden, frames, 1, 1, generator=gen)
        # Symmetric across frames: reversing the stack leaves the features unchanged.
        w = (w + w.flip(1)) / 2
        self.first = nn.Conv2d(frames, hidden, 1)
        self.second = nn.Conv2d(hidden, num_classes, 1)
        values = {
            "first.weight": w,
            "first.bias": torch.randn(hidden, generator=gen),
            "second.weight": torch.randn(num_classes, hidden, 1, 1, generator=gen),
            "second.bias": torch.randn(num_classes, generator=gen),
        }
        self.load_state_dict(values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))  # type: ignore[no-any-return]


class FramePicker(nn.Module):
    def __init__(self, frames: int, index: int) -> None:
        super().__init__()
        if not 0 <= index < frames:
            raise InvalidArgumentError(
                f"frame index {index} outside 0..{frames - 1}", field="index"
            )
        self.frames = frames
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        picked = x[:, self.index]
        return torch.stack([torch.zeros_like(picked), picked], dim=1)


class LocalNet(nn.Module):
    """conv3 → pool 2 → conv3 → upsample 2 → conv3; Y and X must be multiples of ``multiple``."""

    RADIUS = 7  # bound on the receptive field's reach, in pixels each side

    def __init__(
        self,
        frames: int,
        *,
        num_classes: int = 2,
        hidden: int = 6,
        multiple: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.multiple = multiple
        self.conv1 = nn.Conv2d(frames, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv3 = nn.Conv2d(hidden, num_classes, 3, padding=1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % self.multiple or x.shape[-1] % self.multiple:
            raise InvalidArgumentError(
                f"input {tuple(x.shape)} is not a multiple of {self.multiple} in y/x", field="input"
            )
        h = functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        h = functional.interpolate(torch.relu(self.conv2(h)), scale_factor=2, mode="nearest")
        return self.conv3(h)  # type: ignore[no-any-return]
