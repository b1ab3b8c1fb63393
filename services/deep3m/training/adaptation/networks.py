"""The networks the adaptation procedures train, seen through one small interface.

Segmenters come from the registry (DeepEM3D members, residual U-Nets: 2-class
logits) or are the attention Y-Net (sigmoid mask head). This module gives their
foreground probability for whole slices, their encoder (what SSL fine-tuning
freezes) and their segmentation loss (2-class cross entropy = BCE, or BCE on
the mask logit).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deep3m.core.errors import InvalidArgumentError
from deep3m.models.registry import INPUT_MULTIPLE, build_network
from deep3m.models.ynet import AttentionYNet
from deep3m.training.adaptation.data import SCALE, mirror_index
from deep3m.training.adaptation.runtime import current

# Encoder parts by network family: everything before the decoder / class heads.
_ENCODER_ATTRS: tuple[tuple[str, ...], ...] = (
    ("inc", "down"),  # residual U-Nets
    ("down", "bottom"),  # the strided U-Net
    ("stem", "stem_block", "to_quarter", "to_eighth", "to_sixteenth"),  # DeepEM3D
)


def build_segmenter(architecture: str, *, frames: int, width: float) -> nn.Module:
    return build_network(architecture, frames=frames, width=width)


def frames_of(net: nn.Module) -> int:
    if isinstance(net, AttentionYNet):
        return net.in_channels
    return int(getattr(net, "frames", 1))


def encoder_modules(net: nn.Module) -> list[nn.Module]:
    """The encoder of ``net``: frozen during SSL fine-tuning."""
    if isinstance(net, AttentionYNet):
        return list(net.encoder)
    for attrs in _ENCODER_ATTRS:
        if all(hasattr(net, a) for a in attrs):
            return [getattr(net, a) for a in attrs]
    raise InvalidArgumentError(
        f"no known encoder in a {type(net).__name__}: cannot freeze it", field="architecture"
    )


def logits_to_probability(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Foreground probability (B, Y, X) of a batch."""
    if isinstance(net, AttentionYNet):
        return torch.sigmoid(net(x)[1][:, 0])
    return torch.softmax(net(x), dim=1)[:, 1]


def segmentation_loss(net: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if isinstance(net, AttentionYNet):
        return F.binary_cross_entropy_with_logits(net(x)[1][:, 0], labels.float())
    return F.cross_entropy(net(x), labels)


def reconstruction(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The restored centre slice (B, Y, X): the Y-Net's image head, or a registry
    network's class-1 logit used as a linear image head during the pretext."""
    if isinstance(net, AttentionYNet):
        return net(x)[0][:, 0]
    return net(x)[:, 1]  # type: ignore[no-any-return]


def _pad_to(n: int, multiple: int) -> int:
    return (-n) % multiple


def _device_of(net: nn.Module) -> torch.device:
    """Where ``net`` lives (the runtime's device for one without tensors)."""
    for t in itertools.chain(net.parameters(), net.buffers()):
        return t.device
    return current().device


def predict_stack(net: nn.Module, images: np.ndarray, *, batch: int = 2) -> np.ndarray:
    """Foreground probability (z, y, x) float32 of a grey-level stack, slice by slice
    (``frames`` neighbours mirrored at the ends; y/x mirror-padded to the network's stride)."""
    stack = np.asarray(images, dtype=np.float32)
    if stack.ndim != 3:
        raise InvalidArgumentError(
            f"images to predict must be (z, y, x), got shape {stack.shape}", field="images"
        )
    frames = frames_of(net)
    half = frames // 2
    n, h, w = stack.shape
    py, px = _pad_to(h, INPUT_MULTIPLE), _pad_to(w, INPUT_MULTIPLE)
    out = np.empty((n, h, w), np.float32)
    was_training = net.training
    net.eval()
    device = _device_of(net)
    runtime = current()
    try:
        with torch.inference_mode(), runtime.autocast():
            for start in range(0, n, batch):
                # A candidate's scoring predicts whole stacks: a cancel stops it here.
                runtime.stop_if_cancelled(f"while predicting slice {start} of {n}")
                zs = range(start, min(n, start + batch))
                wins = np.stack(
                    [stack[[mirror_index(i, n) for i in range(z - half, z + half + 1)]] for z in zs]
                )
                if py or px:
                    pad = ((0, 0), (0, 0), (0, py), (0, px))
                    wins = (
                        np.pad(wins, pad, mode="reflect")
                        if py < h and px < w
                        else np.pad(wins, pad, mode="edge")
                    )
                x = torch.from_numpy(wins / SCALE).float().to(device)
                prob = logits_to_probability(net, x)[:, :h, :w]
                out[zs.start : zs.stop] = prob.float().cpu().numpy()
    finally:
        net.train(was_training)
    return out
