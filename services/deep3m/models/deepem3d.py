"""The DeepEM3D network as used by CDeep3M (Zeng et al. 2017; Haberl et al. 2018).

Input: ``frames`` consecutive slices ``(B, frames, Y, X)``; output: class logits for
the centre slice ``(B, classes, Y, X)``. Y and X must be multiples of 16.

Layout, following CDeep3M's ``inception_residual_train_prediction_{1,3,5}fm``
models (channel counts at width 1.0):

- stem, to 1/2: 1 frame: two in-plane 3×3 convolutions (32, 64), the first with
  stride 2. 3 and 5 frames: a 3×3×3 convolution (32, stride 2 in-plane) on the
  stack, then a convolution spanning all frames that collapses z (64).
- stem block at 1/2: two inception branches (1×1 → 3×3; 1×1 → 1×7 → 7×1 → 3×3),
  concatenated: 192 channels — the 1/2 features.
- 1/4: max-pool ‖ strided 3×3, then 1×1 to 384 and an inception-residual A block.
- 1/8: reduction A, 1×1 to 1154 and an inception-residual B block.
- 1/16: reduction B, 1×1 to 2048 and an inception-residual C block.
- decoder: from each of the 1/2, 1/4 and 1/8 features, a plain transposed
  convolution plus four dilated ones (dilation 5, 11, 17, 23), each straight to
  the class count, summed; from the 1/16 features one plain transposed
  convolution. Each scale's map passes ReLU and a 3×3 convolution; the four are
  summed into the logits (softmax gives the probabilities).

Residual branches are scaled by 0.1 before the sum, as in the Caffe models.
One difference from the Caffe original, on purpose: no normalisation or ReLU on
the final per-scale class maps, so logits can be negative. Normalisation is
BatchNorm, as published (see ``deep3m.models.layers`` for why).
"""

from __future__ import annotations

import torch
from torch import nn

from deep3m.core.errors import InvalidArgumentError
from deep3m.models.layers import ConvNormAct, ConvNormAct3d, norm2d, scaled

# Published channel counts (width 1.0): stem, stem 2, 1/2, 1/4, 1/8, 1/16.
PUBLISHED_WIDTHS: tuple[int, ...] = (32, 64, 192, 384, 1154, 2048)
DILATIONS: tuple[int, ...] = (5, 11, 17, 23)
RESIDUAL_SCALE = 0.1
TOTAL_STRIDE = 16


class _Stem(nn.Module):
    """Frames in, 1/2-resolution 2D features out (z collapsed)."""

    def __init__(self, frames: int, c1: int, c2: int) -> None:
        super().__init__()
        self.frames = frames
        if frames == 1:
            self.conv1: nn.Module = ConvNormAct(1, c1, 3, stride=2)
            self.conv2: nn.Module = ConvNormAct(c1, c2, 3)
        else:
            self.conv1 = ConvNormAct3d(1, c1, (3, 3, 3), stride=(1, 2, 2), padding=(1, 1, 1))
            # Spans every frame with no z padding: z collapses to the centre slice.
            self.conv2 = ConvNormAct3d(c1, c2, (frames, 3, 3), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frames == 1:
            return self.conv2(self.conv1(x))  # type: ignore[no-any-return]
        y = self.conv2(self.conv1(x.unsqueeze(1)))
        return y.squeeze(2)  # type: ignore[no-any-return]


class _StemBlock(nn.Module):
    def __init__(self, c_in: int, w: float) -> None:
        super().__init__()
        self.a = nn.Sequential(
            ConvNormAct(c_in, scaled(64, w), 1), ConvNormAct(scaled(64, w), scaled(96, w), 3)
        )
        self.b = nn.Sequential(
            ConvNormAct(c_in, scaled(64, w), 1),
            ConvNormAct(scaled(64, w), scaled(64, w), (7, 1)),
            ConvNormAct(scaled(64, w), scaled(64, w), (1, 7)),
            ConvNormAct(scaled(64, w), scaled(96, w), 3),
        )
        self.out_channels = 2 * scaled(96, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], 1)


class _StemReduction(nn.Module):
    """1/2 → 1/4: max-pool ‖ strided 3×3."""

    def __init__(self, c_in: int, w: float) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv = ConvNormAct(c_in, scaled(192, w), 3, stride=2)
        self.out_channels = c_in + scaled(192, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.pool(x), self.conv(x)], 1)


class _InceptionResidual(nn.Module):
    """Parallel branches, concatenated, projected back and added (scaled) to the input."""

    def __init__(self, channels: int, branches: list[nn.Module], branch_out: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(branch_out, channels, 1, bias=False), norm2d(channels)
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(torch.cat([b(x) for b in self.branches], 1))
        return self.act(x + RESIDUAL_SCALE * y)  # type: ignore[no-any-return]


def _block_a(c: int, w: float) -> _InceptionResidual:
    s = scaled
    branches: list[nn.Module] = [
        ConvNormAct(c, s(32, w), 1),
        nn.Sequential(ConvNormAct(c, s(32, w), 1), ConvNormAct(s(32, w), s(32, w), 3)),
        nn.Sequential(
            ConvNormAct(c, s(32, w), 1),
            ConvNormAct(s(32, w), s(48, w), 3),
            ConvNormAct(s(48, w), s(64, w), 3),
        ),
    ]
    return _InceptionResidual(c, branches, s(32, w) + s(32, w) + s(64, w))


def _block_b(c: int, w: float) -> _InceptionResidual:
    s = scaled
    branches: list[nn.Module] = [
        ConvNormAct(c, s(192, w), 1),
        nn.Sequential(
            ConvNormAct(c, s(128, w), 1),
            ConvNormAct(s(128, w), s(160, w), (1, 7)),
            ConvNormAct(s(160, w), s(192, w), (7, 1)),
        ),
    ]
    return _InceptionResidual(c, branches, 2 * s(192, w))


def _block_c(c: int, w: float) -> _InceptionResidual:
    s = scaled
    branches: list[nn.Module] = [
        ConvNormAct(c, s(192, w), 1),
        nn.Sequential(
            ConvNormAct(c, s(192, w), 1),
            ConvNormAct(s(192, w), s(224, w), (1, 3)),
            ConvNormAct(s(224, w), s(256, w), (3, 1)),
        ),
    ]
    return _InceptionResidual(c, branches, s(192, w) + s(256, w))


class _Reduction(nn.Module):
    """Halve the resolution: max-pool ‖ strided convolution branches, concatenated."""

    def __init__(self, c_in: int, branches: list[nn.Module], branch_out: int) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.branches = nn.ModuleList(branches)
        self.out_channels = c_in + branch_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.pool(x), *(b(x) for b in self.branches)], 1)


def _reduction_a(c: int, w: float) -> _Reduction:
    s = scaled
    return _Reduction(
        c,
        [
            ConvNormAct(c, s(384, w), 3, stride=2),
            nn.Sequential(
                ConvNormAct(c, s(256, w), 1),
                ConvNormAct(s(256, w), s(256, w), 3),
                ConvNormAct(s(256, w), s(384, w), 3, stride=2),
            ),
        ],
        2 * s(384, w),
    )


def _reduction_b(c: int, w: float) -> _Reduction:
    s = scaled
    return _Reduction(
        c,
        [
            nn.Sequential(
                ConvNormAct(c, s(256, w), 1), ConvNormAct(s(256, w), s(384, w), 3, stride=2)
            ),
            nn.Sequential(
                ConvNormAct(c, s(256, w), 1), ConvNormAct(s(256, w), s(288, w), 3, stride=2)
            ),
            nn.Sequential(
                ConvNormAct(c, s(256, w), 1),
                ConvNormAct(s(256, w), s(288, w), 3),
                ConvNormAct(s(288, w), s(320, w), 3, stride=2),
            ),
        ],
        s(384, w) + s(288, w) + s(320, w),
    )


def _up(c_in: int, classes: int, factor: int, dilation: int = 1) -> nn.ConvTranspose2d:
    """Transposed convolution (kernel 2f, stride f) whose output is exactly f× the input."""
    kernel = 2 * factor
    # out = (n-1)·f − 2p + d·(k−1) + 1 = n·f  ⇔  2p = d·(k−1) + 1 − f (always even here).
    padding = (dilation * (kernel - 1) + 1 - factor) // 2
    return nn.ConvTranspose2d(
        c_in, classes, kernel, stride=factor, padding=padding, dilation=dilation
    )


class _ScaleHead(nn.Module):
    """One decoder scale: plain (+ dilated) upsampling to classes, ReLU, 3×3 conv."""

    def __init__(self, c_in: int, classes: int, factor: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.ups = nn.ModuleList(
            [_up(c_in, classes, factor)] + [_up(c_in, classes, factor, d) for d in dilations]
        )
        self.act = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(classes, classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ups[0](x)
        for up in self.ups[1:]:
            y = y + _dilated_up(up, x)
        return self.conv(self.act(y))  # type: ignore[no-any-return]


def _dilated_up(up: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``up(x)``, in float32 under CPU autocast: oneDNN has no bfloat16 kernel for a
    dilated transposed convolution, and PyTorch's fallback is ~10× slower than float32
    (the whole network was ~35× slower; ``python -m bench training`` has a bfloat16
    row beside the float32 ones)."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return up(x.float())  # type: ignore[no-any-return]
    return up(x)  # type: ignore[no-any-return]


class DeepEM3D(nn.Module):
    """DeepEM3D for ``frames`` input slices at channel ``width`` (1.0 = published)."""

    def __init__(self, frames: int, width: float = 1.0, num_classes: int = 2) -> None:
        super().__init__()
        self.frames = frames
        self.width = width
        self.num_classes = num_classes
        w = width
        c1, c2 = scaled(PUBLISHED_WIDTHS[0], w), scaled(PUBLISHED_WIDTHS[1], w)
        c4, c8, c16 = (scaled(c, w) for c in PUBLISHED_WIDTHS[3:])
        self.stem = _Stem(frames, c1, c2)
        self.stem_block = _StemBlock(c2, w)
        c_half = self.stem_block.out_channels
        red = _StemReduction(c_half, w)
        self.to_quarter = nn.Sequential(red, ConvNormAct(red.out_channels, c4, 1), _block_a(c4, w))
        red_a = _reduction_a(c4, w)
        self.to_eighth = nn.Sequential(
            red_a, ConvNormAct(red_a.out_channels, c8, 1), _block_b(c8, w)
        )
        red_b = _reduction_b(c8, w)
        self.to_sixteenth = nn.Sequential(
            red_b, ConvNormAct(red_b.out_channels, c16, 1), _block_c(c16, w)
        )
        self.heads = nn.ModuleList(
            [
                _ScaleHead(c_half, num_classes, 2, DILATIONS),
                _ScaleHead(c4, num_classes, 4, DILATIONS),
                _ScaleHead(c8, num_classes, 8, DILATIONS),
                _ScaleHead(c16, num_classes, 16, ()),
            ]
        )
        self.feature_channels = (c_half, c4, c8, c16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.frames)
        half = self.stem_block(self.stem(x))
        quarter = self.to_quarter(half)
        eighth = self.to_eighth(quarter)
        sixteenth = self.to_sixteenth(eighth)
        out = self.heads[0](half)
        for head, feat in zip(self.heads[1:], (quarter, eighth, sixteenth), strict=True):
            out = out + head(feat)
        return out  # type: ignore[no-any-return]


def check_input(x: torch.Tensor, frames: int, multiple: int = TOTAL_STRIDE) -> None:
    """Refuse inputs the network cannot take, naming the offending size."""
    if x.ndim != 4 or x.shape[1] != frames:
        raise InvalidArgumentError(
            f"network input must be (batch, {frames} frames, y, x), got {tuple(x.shape)}",
            field="input",
        )
    if x.shape[2] % multiple or x.shape[3] % multiple or x.shape[2] == 0 or x.shape[3] == 0:
        raise InvalidArgumentError(
            f"network input y/x sizes {tuple(x.shape[2:])} must be positive multiples of "
            f"{multiple}",
            field="input",
        )
