"""Build a network by name: the one entry point training and inference share.

``build_network(architecture, frames=, width=, num_classes=)`` returns a module
whose ``forward`` maps float32 ``(B, frames, Y, X)`` to logits
``(B, num_classes, Y, X)`` for the centre slice; Y and X must be multiples of
``INPUT_MULTIPLE`` (also with an ``input_scale``). ``width=DEFAULT_WIDTH`` (1.0)
gives the published channel counts; tests and laptop runs use small multipliers such as 0.125.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from deep3m.core.errors import InvalidArgumentError
from deep3m.models.deepem3d import TOTAL_STRIDE, DeepEM3D
from deep3m.models.resunet import ResUNet2D, ResUNet3D
from deep3m.models.scaled import MAX_INPUT_SCALE, ScaledInput
from deep3m.models.unet import UNet2D
from deep3m.models.ynet import YNetSegmenter

INPUT_MULTIPLE = TOTAL_STRIDE
DEFAULT_WIDTH = 1.0
MAX_FRAMES = 15

_BUILDERS: dict[str, Callable[[int, float, int], nn.Module]] = {
    "deepem3d": DeepEM3D,
    "resunet2d": ResUNet2D,
    "resunet3d": ResUNet3D,
    "unet2d": UNet2D,
}
ARCHITECTURES: tuple[str, ...] = tuple(_BUILDERS)
# Networks only a procedure makes (not trainable by name): the multi-task domain
# adaptation's attention Y-Net, served as a 2-class segmenter.
PROCEDURE_BUILDERS: dict[str, Callable[[int, float, int], nn.Module]] = {
    "ynet": YNetSegmenter,
}

# How far, in input pixels along y and x, one output pixel's logits reach (measured
# by gradient, eval mode; ``tests/unit/test_networks.py`` measures it again). A
# prediction halo that covers it makes blockwise prediction equal a whole-volume pass.
RECEPTIVE_RADIUS_YX: dict[str, int] = {
    "deepem3d": 229,
    "resunet2d": 109,
    "resunet3d": 109,
    "unet2d": 93,
    "ynet": 94,
}

# CDeep3M's ensemble members and their input frames.
MEMBER_FRAMES: dict[str, int] = {"1fm": 1, "3fm": 3, "5fm": 5}


def check_architecture(architecture: str) -> str:
    if architecture not in _BUILDERS:
        raise InvalidArgumentError(
            f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}",
            field="architecture",
        )
    return architecture


def member_frames(member: str) -> int:
    """Frames of a member named like CDeep3M's (``1fm``, ``3fm``, ``5fm``, ``7fm``…)."""
    if member in MEMBER_FRAMES:
        return MEMBER_FRAMES[member]
    if member.endswith("fm") and member[:-2].isdigit():
        frames = int(member[:-2])
        if frames % 2 == 1 and 1 <= frames <= MAX_FRAMES:
            return frames
    raise InvalidArgumentError(
        f"unknown ensemble member {member!r}; use an odd frame count like "
        f"{', '.join(MEMBER_FRAMES)}",
        field="members",
    )


def build_network(
    architecture: str,
    *,
    frames: int,
    width: float = DEFAULT_WIDTH,
    num_classes: int = 2,
    input_scale: int = 1,
) -> nn.Module:
    """A freshly initialised network (train mode).

    ``input_scale`` > 1 wraps it in ``ScaledInput``: it sees its input downscaled by
    that factor and returns full-resolution logits (the model card records it).
    """
    builder = PROCEDURE_BUILDERS.get(architecture) or _BUILDERS[check_architecture(architecture)]
    if not isinstance(frames, int) or frames < 1 or frames % 2 == 0 or frames > MAX_FRAMES:
        raise InvalidArgumentError(
            f"frames must be an odd number from 1 to {MAX_FRAMES} (the centre slice is "
            f"predicted), got {frames!r}",
            field="frames",
        )
    if not width > 0 or width > 8:
        raise InvalidArgumentError(f"width must be in (0, 8], got {width!r}", field="width")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise InvalidArgumentError(
            f"num_classes must be at least 2, got {num_classes!r}", field="num_classes"
        )
    if not isinstance(input_scale, int) or not 1 <= input_scale <= MAX_INPUT_SCALE:
        raise InvalidArgumentError(
            f"input_scale must be an integer from 1 to {MAX_INPUT_SCALE}, got {input_scale!r}",
            field="input_scale",
        )
    net = builder(frames, float(width), num_classes)
    return ScaledInput(net, input_scale) if input_scale > 1 else net


def seamless_halo_yx(architecture: str, input_scale: int = 1) -> int:
    """The y/x halo that covers ``architecture``'s receptive field, on its input grid.

    A network that sees its input downscaled by ``input_scale`` reaches that much
    further, plus the resampling's one pixel less than a cell; the halo is a multiple
    of the grid the downscaled network pools on (``INPUT_MULTIPLE · input_scale``),
    so a block on that grid sees the same pooling windows as the whole volume.
    """
    if architecture not in RECEPTIVE_RADIUS_YX:
        check_architecture(architecture)  # raises, naming the choices
    multiple = INPUT_MULTIPLE * input_scale
    reach = (RECEPTIVE_RADIUS_YX[architecture] + 1) * input_scale - 1
    return -(-reach // multiple) * multiple


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
