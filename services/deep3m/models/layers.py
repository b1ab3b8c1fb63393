"""Small building blocks shared by the networks: convolutions with norm and ReLU.

Normalisation is GroupNorm, not the BatchNorm of the published Caffe models:
training here runs with 2–8 patches per step (on a laptop CPU, or per GPU under
DDP), where batch statistics are noisy and differ between training and
inference; GroupNorm normalises each sample on its own, so a network behaves
the same on a training patch, a prediction tile and any batch size, and DDP
needs no synchronised statistics.
"""

from __future__ import annotations

import math

from torch import nn

MAX_GROUPS = 8


def scaled(channels: int, width: float, *, minimum: int = 4) -> int:
    """``channels`` scaled by the width multiplier (at least ``minimum``)."""
    return max(minimum, int(round(channels * width)))


def groups_for(channels: int) -> int:
    """Largest group count ≤ MAX_GROUPS that divides ``channels``."""
    return math.gcd(channels, MAX_GROUPS) or 1


def norm2d(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups_for(channels), channels)


def norm3d(channels: int) -> nn.GroupNorm:
    # GroupNorm normalises over every axis after the channels, so it serves 3D too.
    return nn.GroupNorm(groups_for(channels), channels)


class ConvNormAct(nn.Sequential):
    """Conv2d → GroupNorm → ReLU (the activation optional)."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int] = 3, *,
                 stride: int = 1, act: bool = True) -> None:
        k = (kernel, kernel) if isinstance(kernel, int) else kernel
        pad = (k[0] // 2, k[1] // 2)
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, bias=False),
            norm2d(c_out),
        ]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class ConvNormAct3d(nn.Sequential):
    """Conv3d → GroupNorm → ReLU with explicit (z, y, x) kernel, stride and padding."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int, int], *,
                 stride: tuple[int, int, int] = (1, 1, 1),
                 padding: tuple[int, int, int] = (1, 1, 1), act: bool = True) -> None:
        layers: list[nn.Module] = [
            nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
            norm3d(c_out),
        ]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
