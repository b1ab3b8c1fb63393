"""Residual U-Nets: 2D (frames as input channels) and 3D (frames as a z-depth).

Both take ``(B, frames, Y, X)`` and return logits ``(B, classes, Y, X)`` for the
centre slice. Four 2× in-plane downsamplings (total stride 16) with residual
blocks at every level, transposed-convolution upsampling and concatenated skips.
Channel counts at width 1.0: 32, 64, 128, 256, 512. The 3D variant keeps z at
full resolution (EM is anisotropic; the stack is only a few slices deep), pools in
y/x only and reads out the centre z plane at the end.
"""

from __future__ import annotations

import torch
from torch import nn

from deep3m.models.deepem3d import check_input
from deep3m.models.layers import norm2d, norm3d, scaled

PUBLISHED_WIDTHS: tuple[int, ...] = (32, 64, 128, 256, 512)


class _Res2d(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            norm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            norm2d(c_out),
        )
        self.skip: nn.Module = (
            nn.Identity()
            if c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), norm2d(c_out))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))  # type: ignore[no-any-return]


class _Res3d(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(c_in, c_out, 3, padding=1, bias=False),
            norm3d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv3d(c_out, c_out, 3, padding=1, bias=False),
            norm3d(c_out),
        )
        self.skip: nn.Module = (
            nn.Identity()
            if c_in == c_out
            else nn.Sequential(nn.Conv3d(c_in, c_out, 1, bias=False), norm3d(c_out))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))  # type: ignore[no-any-return]


class ResUNet2D(nn.Module):
    def __init__(self, frames: int, width: float = 1.0, num_classes: int = 2) -> None:
        super().__init__()
        self.frames = frames
        self.width = width
        self.num_classes = num_classes
        ch = [scaled(c, width) for c in PUBLISHED_WIDTHS]
        self.inc = _Res2d(frames, ch[0])
        self.down = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(ch[i], ch[i], 3, stride=2, padding=1, bias=False),
                norm2d(ch[i]),
                nn.ReLU(inplace=True),
                _Res2d(ch[i], ch[i + 1]),
            )
            for i in range(4)
        )
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in reversed(range(4))
        )
        self.dec = nn.ModuleList(_Res2d(2 * ch[i], ch[i]) for i in reversed(range(4)))
        self.head = nn.Conv2d(ch[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.frames)
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up, dec in zip(self.up, self.dec, strict=True):
            y = dec(torch.cat([up(y), skips.pop()], 1))
        return self.head(y)  # type: ignore[no-any-return]


class ResUNet3D(nn.Module):
    def __init__(self, frames: int, width: float = 1.0, num_classes: int = 2) -> None:
        super().__init__()
        self.frames = frames
        self.width = width
        self.num_classes = num_classes
        ch = [scaled(c, width) for c in PUBLISHED_WIDTHS]
        self.inc = _Res3d(1, ch[0])
        self.down = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(ch[i], ch[i], (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False),
                norm3d(ch[i]),
                nn.ReLU(inplace=True),
                _Res3d(ch[i], ch[i + 1]),
            )
            for i in range(4)
        )
        self.up = nn.ModuleList(
            nn.ConvTranspose3d(ch[i + 1], ch[i], (1, 2, 2), stride=(1, 2, 2))
            for i in reversed(range(4))
        )
        self.dec = nn.ModuleList(_Res3d(2 * ch[i], ch[i]) for i in reversed(range(4)))
        self.head = nn.Conv3d(ch[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.frames)
        skips = [self.inc(x.unsqueeze(1))]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up, dec in zip(self.up, self.dec, strict=True):
            y = dec(torch.cat([up(y), skips.pop()], 1))
        # (B, classes, frames, Y, X) → the centre slice.
        return self.head(y)[:, :, self.frames // 2]  # type: ignore[no-any-return]
