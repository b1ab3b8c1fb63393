"""A strided residual U-Net (2D, frames as input channels): cheap at full resolution.

The layout of MONAI's ``UNet`` with residual units, which the accuracy benchmark
showed learns the most per CPU second (docs/ACCURACY.md): every encoder level is
one residual unit whose *first* convolution has stride 2, so the full-resolution
input is only read by strided convolutions and nothing runs at full resolution
except the last transposed convolution and a 1-unit refinement. The resunet2d
keeps two 3×3 convolutions of the first width at full resolution, which costs
about five times as much per step for no better accuracy in a fixed budget.

Encoder: four strided units (2 subunits each) to channels ``c0…c3`` at 1/2 … 1/16,
then a stride-1 bottom unit to ``c4``. Decoder: at each level the input of the
level's encoder unit is concatenated with its output (the skip), then a 3×3
transposed convolution (stride 2) and a 1-subunit residual unit return to that
level's input resolution; the top one ends in 2 logits without norm/activation.
Channel counts at width 1.0: 32, 64, 128, 256, 512 (width 0.5: the 16…256 of the
benchmark's MONAI peer). BatchNorm, not instance norm, so that predictions are
seamless across tiles (see ``deep3m.models.layers``); PReLU activations.
"""

from __future__ import annotations

import torch
from torch import nn

from deep3m.models.deepem3d import check_input
from deep3m.models.layers import ConvNormAct, norm2d, scaled

PUBLISHED_WIDTHS: tuple[int, ...] = (32, 64, 128, 256, 512)
LEVELS = 4


class ResidualUnit(nn.Module):
    """``subunits`` conv-norm-PReLU layers (the first may be strided) plus a skip.

    The skip is the identity when shape is kept, a 1×1 convolution when only the
    channels change and a strided 3×3 convolution when the resolution does.
    ``last_conv_only`` drops the last layer's norm and activation (for logits).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        stride: int = 1,
        subunits: int = 2,
        last_conv_only: bool = False,
    ) -> None:
        super().__init__()
        self.out_channels = c_out
        layers: list[nn.Module] = []
        for i in range(subunits):
            first, last = i == 0, i == subunits - 1
            c = c_in if first else c_out
            s = stride if first else 1
            if last and last_conv_only:
                layers.append(nn.Conv2d(c, c_out, 3, stride=s, padding=1))
            else:
                layers.append(ConvNormAct(c, c_out, stride=s, activation=nn.PReLU))
        self.body = nn.Sequential(*layers)
        self.skip: nn.Module
        if stride != 1:
            self.skip = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        elif c_in != c_out:
            self.skip = nn.Conv2d(c_in, c_out, 1)
        else:
            self.skip = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)  # type: ignore[no-any-return]


class _Up(nn.Sequential):
    """Transposed 3×3 stride-2 convolution (exactly doubles y/x), norm, PReLU, then
    a 1-subunit residual unit."""

    def __init__(self, c_in: int, c_out: int, *, top: bool) -> None:
        super().__init__(
            nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1, bias=False),
            norm2d(c_out),
            nn.PReLU(),
            ResidualUnit(c_out, c_out, subunits=1, last_conv_only=top),
        )


class UNet2D(nn.Module):
    def __init__(self, frames: int, width: float = 1.0, num_classes: int = 2) -> None:
        super().__init__()
        self.frames = frames
        self.width = width
        self.num_classes = num_classes
        ch = [scaled(c, width) for c in PUBLISHED_WIDTHS]
        inputs = [frames, *ch[: LEVELS - 1]]  # each encoder level's input channels
        self.down = nn.ModuleList(ResidualUnit(inputs[i], ch[i], stride=2) for i in range(LEVELS))
        self.bottom = ResidualUnit(ch[LEVELS - 1], ch[LEVELS])
        # Decoder level i sees cat(level i's encoder output, what came up from below).
        from_below = [*(inputs[i + 1] for i in range(LEVELS - 1)), ch[LEVELS]]
        outputs = [num_classes, *ch[: LEVELS - 1]]
        self.up = nn.ModuleList(
            _Up(ch[i] + from_below[i], outputs[i], top=i == 0) for i in range(LEVELS)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.frames)
        encoded = []
        for down in self.down:
            x = down(x)
            encoded.append(x)
        y = self.bottom(x)
        for i in reversed(range(LEVELS)):
            y = self.up[i](torch.cat([encoded[i], y], 1))
        return y
