"""A network that sees its input downscaled: more context per pixel for large objects.

``ScaledInput(net, factor)`` averages ``factor × factor`` pixels in-plane, runs the
wrapped network at that resolution and upsamples its logits bilinearly back to the
input's size, so callers (training, validation, inference) feed and receive full
resolution. Mitochondria in 5.9 nm SBEM span hundreds of pixels; at half
resolution a patch shows four times the context for the same compute. Inputs are
mirror-padded to the multiple the downscaled network needs and cropped back, so
the wrapper takes the same sizes (multiples of 16) as the network alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deep3m.models.deepem3d import TOTAL_STRIDE

MAX_INPUT_SCALE = 4


class ScaledInput(nn.Module):
    def __init__(self, net: nn.Module, factor: int) -> None:
        super().__init__()
        self.net = net
        self.factor = int(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factor
        h, w = x.shape[-2:]
        multiple = TOTAL_STRIDE * f
        ph, pw = (-h) % multiple, (-w) % multiple
        if ph or pw:
            # Reflect needs the pad smaller than the size; replicate covers tiny inputs.
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        logits = self.net(F.avg_pool2d(x, f))
        up = F.interpolate(logits, scale_factor=float(f), mode="bilinear", align_corners=False)
        return up[..., :h, :w]
