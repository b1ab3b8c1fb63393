"""Attention Y-Net: one encoder, a segmentation and a reconstruction decoder.

The multi-task network of Franco-Barranco et al. 2022 (after Roels et al.'s
Y-Net, with Oktay et al.'s attention gates). A U-Net encoder (two 3×3
convolutions per level, ELU, dropout, 2× max pooling) and bottleneck are shared
by

- a **segmentation decoder**: transposed-convolution upsampling, the encoder's
  skip gated by an attention gate (the decoder feature decides where the skip
  is let through), concatenation, two convolutions; a 1×1 **mask head** whose
  sigmoid is the foreground probability (:meth:`AttentionYNet.forward` returns
  its logits; :func:`mask_probability` applies the sigmoid);
- a **reconstruction decoder** without skips, so the image must pass through the
  shared bottleneck, ending in a linear 1×1 **image head**.

Training it on both domains' images (reconstruction) and the source labels
(segmentation) makes the shared encoder fit the target too. Feature maps at
width 1.0 are the paper's 16, 32, 64, 128, 256. Input ``(B, 1, Y, X)`` with Y, X
multiples of 16; output ``(image, mask_logits)``, both ``(B, 1, Y, X)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deep3m.core.errors import InvalidArgumentError
from deep3m.models.deepem3d import check_input
from deep3m.models.layers import scaled

PAPER_FEATURE_MAPS: tuple[int, ...] = (16, 32, 64, 128, 256)
PAPER_DROPOUT: tuple[float, ...] = (0.1, 0.1, 0.2, 0.2, 0.3)
STRIDE = 2 ** (len(PAPER_FEATURE_MAPS) - 1)


def _double_conv(c_in: int, c_out: int, dropout: float, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ELU(inplace=True))
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Conv2d(c_out, c_out, 3, padding=1))
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ELU(inplace=True))
    return nn.Sequential(*layers)


class AttentionGate(nn.Module):
    """ψ = σ(conv(ReLU(W_g·g + W_x·skip))); returns ψ·skip (g: the decoder feature)."""

    def __init__(self, channels: int, batch_norm: bool) -> None:
        super().__init__()
        self.w_g = nn.Conv2d(channels, channels, 1)
        self.w_x = nn.Conv2d(channels, channels, 1)
        self.psi = nn.Conv2d(channels, 1, 1)
        self.norm: nn.Module = nn.BatchNorm2d(1) if batch_norm else nn.Identity()

    def forward(self, g: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.w_g(g) + self.w_x(skip))
        return skip * torch.sigmoid(self.norm(self.psi(a)))


class _UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float, batch_norm: bool, *, skip: bool):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        self.gate = AttentionGate(c_out, batch_norm) if skip else None
        self.conv = _double_conv(2 * c_out if skip else c_out, c_out, dropout, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        y = self.up(x)
        if self.gate is not None:
            if skip is None:
                raise InvalidArgumentError("this decoder block needs its skip", field="skip")
            y = torch.cat([y, self.gate(y, skip)], 1)
        return self.conv(y)  # type: ignore[no-any-return]


class AttentionYNet(nn.Module):
    """The attention Y-Net at channel ``width`` (1.0 = the paper's feature maps)."""

    def __init__(
        self,
        width: float = 1.0,
        *,
        dropout: Sequence[float] | None = PAPER_DROPOUT,
        batch_norm: bool = True,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if not 0 < width <= 8:
            raise InvalidArgumentError(f"width must be in (0, 8], got {width!r}", field="width")
        drops = tuple(dropout) if dropout is not None else (0.0,) * len(PAPER_FEATURE_MAPS)
        if len(drops) != len(PAPER_FEATURE_MAPS):
            raise InvalidArgumentError(
                f"dropout needs {len(PAPER_FEATURE_MAPS)} values, got {len(drops)}",
                field="dropout",
            )
        ch = [scaled(c, width) for c in PAPER_FEATURE_MAPS]
        depth = len(ch) - 1
        self.width = width
        self.in_channels = in_channels
        self.encoder = nn.ModuleList(
            _double_conv(in_channels if i == 0 else ch[i - 1], ch[i], drops[i], batch_norm)
            for i in range(depth)
        )
        self.bottleneck = _double_conv(ch[depth - 1], ch[depth], drops[depth], batch_norm)
        self.pool = nn.MaxPool2d(2)
        self.seg_decoder = nn.ModuleList(
            _UpBlock(ch[i + 1], ch[i], drops[i], batch_norm, skip=True)
            for i in reversed(range(depth))
        )
        self.rec_decoder = nn.ModuleList(
            _UpBlock(ch[i + 1], ch[i], drops[i], batch_norm, skip=False)
            for i in reversed(range(depth))
        )
        self.mask_head = nn.Conv2d(ch[0], 1, 1)
        self.image_head = nn.Conv2d(ch[0], in_channels, 1)

    def shared_modules(self) -> list[nn.Module]:
        """The encoder and bottleneck both decoders read."""
        return [self.encoder, self.bottleneck]

    def reconstruction_modules(self) -> list[nn.Module]:
        return [self.rec_decoder, self.image_head]

    def segmentation_modules(self) -> list[nn.Module]:
        return [self.seg_decoder, self.mask_head]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_input(x, self.in_channels, STRIDE)
        skips = []
        y = x
        for block in self.encoder:
            y = block(y)
            skips.append(y)
            y = self.pool(y)
        fork = self.bottleneck(y)
        seg = fork
        for block in self.seg_decoder:
            seg = block(seg, skips.pop())
        rec = fork
        for block in self.rec_decoder:
            rec = block(rec)
        return self.image_head(rec), self.mask_head(seg)


def mask_probability(net: AttentionYNet, x: torch.Tensor) -> torch.Tensor:
    """Foreground probability ``(B, Y, X)`` from the mask head (the sigmoid of its logit)."""
    return torch.sigmoid(net(x)[1][:, 0])


class YNetSegmenter(nn.Module):
    """A trained Y-Net as the registry's networks are: 2-class logits ``(B, 2, Y, X)``.

    The mask logit ``m`` becomes the logits ``(−m/2, m/2)``, whose softmax is
    ``(1 − σ(m), σ(m))``: inference treats it like any other 2-class member. The
    reconstruction branch is kept so the trained weights load as they are
    (under ``ynet.``).
    """

    def __init__(self, frames: int = 1, width: float = 1.0, num_classes: int = 2) -> None:
        super().__init__()
        if frames != 1:
            raise InvalidArgumentError(
                f"the Y-Net is a 2D network: frames must be 1, got {frames}", field="frames"
            )
        if num_classes != 2:
            raise InvalidArgumentError(
                f"the Y-Net has one foreground mask: num_classes must be 2, got {num_classes}",
                field="num_classes",
            )
        self.frames = 1
        self.ynet = AttentionYNet(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.ynet(x)[1] / 2.0
        return torch.cat([-half, half], dim=1)
