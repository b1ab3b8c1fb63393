"""Small building blocks shared by the networks: convolutions with norm and ReLU.

Normalisation is BatchNorm, as in the published Caffe models, and deliberately
not GroupNorm/InstanceNorm, although those are the usual choice for small
batches: they normalise over each input's spatial extent, so a prediction would
depend on the tile's size and content — blocks predicted separately would not
agree at their seams, and whole validation slices would be normalised unlike
the training patches. BatchNorm in eval mode applies fixed running statistics,
so a voxel's prediction depends only on its receptive field, whatever the tile.
Small batches are fine here: each 128² patch contributes thousands of pixels to
every channel's statistics. Under DDP the buffers are broadcast from rank 0.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def scaled(channels: int, width: float, *, minimum: int = 4) -> int:
    """``channels`` scaled by the width multiplier (at least ``minimum``)."""
    return max(minimum, round(channels * width))


def norm2d(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels)


def norm3d(channels: int) -> nn.BatchNorm3d:
    return nn.BatchNorm3d(channels)


def relu() -> nn.Module:
    return nn.ReLU(inplace=True)


class ConvNormAct(nn.Sequential):
    """Conv2d → BatchNorm → activation (ReLU unless ``activation`` makes another; the
    activation optional)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int | tuple[int, int] = 3,
        *,
        stride: int = 1,
        act: bool = True,
        activation: Callable[[], nn.Module] = relu,
    ) -> None:
        k = (kernel, kernel) if isinstance(kernel, int) else kernel
        pad = (k[0] // 2, k[1] // 2)
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, bias=False),
            norm2d(c_out),
        ]
        if act:
            layers.append(activation())
        super().__init__(*layers)


class ConvNormAct3d(nn.Sequential):
    """Conv3d → BatchNorm → ReLU with explicit (z, y, x) kernel, stride and padding."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: tuple[int, int, int],
        *,
        stride: tuple[int, int, int] = (1, 1, 1),
        padding: tuple[int, int, int] = (1, 1, 1),
        act: bool = True,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
            norm3d(c_out),
        ]
        if act:
            layers.append(relu())
        super().__init__(*layers)
