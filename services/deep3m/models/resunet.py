"""Residual U-Nets: 2D (frames as input channels) and 3D (frames as a z-depth).

Both take ``(B, frames, Y, X)`` and return logits ``(B, classes, Y, X)`` for the
centre slice. Four 2× in-plane downsamplings (total stride 16) with residual
blocks at every level, transposed-convolution upsampling and concatenated skips.
Channel counts at width 1.0: 32, 64, 128, 256, 512 (width 0.5 gives the 16…256 of
the usual small EM U-Nets). The 3D variant keeps z at full resolution (EM is
anisotropic; the stack is only a few slices deep), pools in y/x only and reads out
the centre z plane at the end.

The 2D and 3D networks are one definition (``_ResUNet``) over a ``_Dims`` table of
the layer types and the in-plane kernel/stride shapes of each dimensionality.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deep3m.models.deepem3d import check_input
from deep3m.models.layers import norm2d, norm3d, scaled

PUBLISHED_WIDTHS: tuple[int, ...] = (32, 64, 128, 256, 512)


@dataclass(frozen=True)
class _Dims:
    conv: type[nn.Conv2d] | type[nn.Conv3d]
    up: type[nn.ConvTranspose2d] | type[nn.ConvTranspose3d]
    norm: type[nn.BatchNorm2d] | type[nn.BatchNorm3d]
    # In-plane only: z (3D) keeps its resolution. (Tuples of 2 or 3 ints.)
    down_kernel: Any
    down_stride: Any
    down_padding: Any


_2D = _Dims(nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, (3, 3), (2, 2), (1, 1))
_3D = _Dims(nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, (1, 3, 3), (1, 2, 2), (0, 1, 1))


def _norm(dims: _Dims, channels: int) -> nn.Module:
    return norm2d(channels) if dims.norm is nn.BatchNorm2d else norm3d(channels)


class _Res(nn.Module):
    """conv-norm-ReLU-conv-norm plus a (projected) skip, then ReLU."""

    def __init__(self, dims: _Dims, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            dims.conv(c_in, c_out, 3, padding=1, bias=False),
            _norm(dims, c_out),
            nn.ReLU(inplace=True),
            dims.conv(c_out, c_out, 3, padding=1, bias=False),
            _norm(dims, c_out),
        )
        self.skip: nn.Module = (
            nn.Identity()
            if c_in == c_out
            else nn.Sequential(dims.conv(c_in, c_out, 1, bias=False), _norm(dims, c_out))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))  # type: ignore[no-any-return]


class _ResUNet(nn.Module):
    def __init__(self, dims: _Dims, c_in: int, frames: int, width: float, num_classes: int) -> None:
        super().__init__()
        self.frames = frames
        self.width = width
        self.num_classes = num_classes
        ch = [scaled(c, width) for c in PUBLISHED_WIDTHS]
        self.inc = _Res(dims, c_in, ch[0])
        self.down = nn.ModuleList(
            nn.Sequential(
                dims.conv(
                    ch[i],
                    ch[i],
                    dims.down_kernel,
                    stride=dims.down_stride,
                    padding=dims.down_padding,
                    bias=False,
                ),
                _norm(dims, ch[i]),
                nn.ReLU(inplace=True),
                _Res(dims, ch[i], ch[i + 1]),
            )
            for i in range(4)
        )
        self.up = nn.ModuleList(
            dims.up(ch[i + 1], ch[i], dims.down_stride, stride=dims.down_stride)
            for i in reversed(range(4))
        )
        self.dec = nn.ModuleList(_Res(dims, 2 * ch[i], ch[i]) for i in reversed(range(4)))
        self.head = dims.conv(ch[0], num_classes, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up, dec in zip(self.up, self.dec, strict=True):
            y = dec(torch.cat([up(y), skips.pop()], 1))
        return self.head(y)  # type: ignore[no-any-return]


class ResUNet2D(_ResUNet):
    def __init__(self, frames: int, width: float = 1.0, num_classes: int = 2) -> None:
        super().__init__(_2D, frames, frames, width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.frames)
        return self.features(x)


class ResUNet3D(_ResUNet):
    def __init__(self, frames: int, width: float = 1.0, num_classes: int = 2) -> None:
        super().__init__(_3D, 1, frames, width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.frames)
        # (B, classes, frames, Y, X) → the centre slice.
        return self.features(x.unsqueeze(1))[:, :, self.frames // 2]
