"""Ensemble prediction of one block under CDeep3M's test-time augmentation.

For a block read with its halo, every ensemble member predicts the core slices
under each variation its speed-level row lists; predictions are mapped back
(de-augmented), averaged over the variations, then over the members (weighted by
the card's member weights, which validation chose).

Seamlessness: y/x are padded *after* the data only (mirror), so the network's
pooling grid starts at the read box's origin. A block whose core starts on a
multiple of the card's ``input_multiple`` and whose halo is a multiple of it
too sees the same grid as a whole-volume prediction; with a halo that covers the
receptive field its core equals that prediction within float tolerance.

Output: the foreground probability. Two classes: P(class 1). More classes:
1 − P(class 0), the probability of "anything but background".
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deep3m.core.augmentation import (
    MEMBERS,
    apply_variation,
    check_tta_level,
    invert_variation,
    member_row,
    tta_variations,
)
from deep3m.core.errors import (
    CancelledError,
    FailedPreconditionError,
    InvalidArgumentError,
)
from deep3m.core.geometry import Block, Box, ReadableArray, read_padded
from deep3m.models.card import ModelCard
from deep3m.runtime.task import StopFlag


def select_device(preference: str = "auto", *, cuda_available: bool | None = None) -> torch.device:
    """The device for ``DEEP3M_DEVICE``: ``auto`` takes CUDA when present, else the CPU."""
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda":
        if not available:
            raise FailedPreconditionError(
                "DEEP3M_DEVICE=cuda but no CUDA device is available in this process",
                field="DEEP3M_DEVICE",
            )
        return torch.device("cuda")
    if preference == "auto":
        return torch.device("cuda") if available else torch.device("cpu")
    raise InvalidArgumentError(
        f"device must be auto, cpu or cuda, got {preference!r}", field="DEEP3M_DEVICE"
    )


def inference_devices(
    preference: str = "auto", *, cuda_count: int | None = None
) -> tuple[torch.device, ...]:
    """Every device a worker should use: each GPU of the pod, or the CPU."""
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    device = select_device(preference, cuda_available=count > 0)
    if device.type == "cuda":
        return tuple(torch.device("cuda", i) for i in range(count))
    return (device,)


def foreground_probability(logits: torch.Tensor) -> torch.Tensor:
    """(B, C, Y, X) logits → (B, Y, X) float32 foreground probability (see module doc)."""
    logits = logits.float()
    if logits.shape[1] == 2:
        # sigmoid of the logit difference is softmax's class 1, with less rounding.
        return torch.sigmoid(logits[:, 1] - logits[:, 0])
    return 1.0 - torch.softmax(logits, dim=1)[:, 0]


def _pad_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
    """Mirror-pad y/x *after* the data up to a multiple (keeps the pooling grid's origin)."""
    pad = [(0, 0)] + [(0, -s % multiple) for s in x.shape[-2:]]
    if not any(p for _, p in pad):
        return x
    if min(x.shape[-2:]) > 1:
        return np.pad(x, pad, mode="reflect")
    return np.pad(x, pad, mode="symmetric")


@dataclass(frozen=True)
class _Member:
    name: str
    net: nn.Module
    frames: int
    variations: tuple[int, ...]


class EnsemblePredictor:
    """Predicts blocks with an ensemble under a CDeep3M speed level.

    ``members`` maps member names (as in the card) to networks already on
    ``device`` in eval mode; each takes float32 (B, frames, Y, X) and returns
    logits (B, num_classes, Y, X) for the centre slice. ``amp`` (default: on for
    CUDA) runs the networks under float16 autocast; it needs a CUDA device.
    """

    def __init__(
        self,
        card: ModelCard,
        members: Mapping[str, nn.Module],
        *,
        tta_level: int,
        device: torch.device | str = "cpu",
        batch_size: int = 4,
        amp: bool | None = None,
    ) -> None:
        if not members:
            raise InvalidArgumentError("an ensemble needs at least one member", field="members")
        if isinstance(batch_size, bool) or batch_size < 1:
            raise InvalidArgumentError(
                f"batch_size must be >= 1, got {batch_size}", field="batch_size"
            )
        self.card = card
        self.tta_level = check_tta_level(tta_level)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.amp = self.device.type == "cuda" if amp is None else bool(amp)
        if self.amp and self.device.type != "cuda":
            raise InvalidArgumentError(
                f"mixed precision needs a CUDA device, not {self.device}", field="amp"
            )
        plan = []
        for name, net in members.items():
            frames = card.member(name).frames
            row = name if name in MEMBERS else member_row(frames)
            plan.append(_Member(name, net, frames, tta_variations(self.tta_level, row)))
        self._members: tuple[_Member, ...] = tuple(plan)
        # Ensemble weights chosen on validation (model card); members asked for but all
        # weighted 0 are averaged equally rather than refused.
        weights = [card.member(m.name).weight for m in plan]
        self._weights = tuple(weights) if sum(weights) > 0 else tuple(1.0 for _ in plan)

    @property
    def member_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self._members)

    @property
    def z_context(self) -> int:
        """Slices of context each side that the widest member needs."""
        return max(m.frames for m in self._members) // 2

    def variations(self, member: str) -> tuple[int, ...]:
        for m in self._members:
            if m.name == member:
                return m.variations
        raise InvalidArgumentError(f"{member!r} is not a member of this predictor", field="members")

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.amp:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def predict_padded(
        self,
        raw: np.ndarray,
        *,
        z_margin: int | Sequence[int] | None = None,
        cancelled: StopFlag | None = None,
    ) -> np.ndarray:
        """Foreground probability of the inner slices of ``raw`` (z, y, x).

        ``z_margin`` (before, after; default ``z_context`` each side) is how many
        slices at each end serve only as context; each must be at least
        ``z_context``. Returns float32 (z − before − after, y, x).
        """
        if raw.ndim != 3:
            raise InvalidArgumentError(
                f"raw block must be 3D (z, y, x), got shape {raw.shape}", field="raw"
            )
        need = self.z_context
        if z_margin is None:
            before, after = need, need
        elif isinstance(z_margin, int | np.integer):
            before, after = z_margin, z_margin
        else:
            before, after = (int(v) for v in z_margin)
        if before < need or after < need:
            raise InvalidArgumentError(
                f"z margin ({before}, {after}) is less than the {need} slices of context the "
                f"members {list(self.member_names)} need",
                field="halo",
            )
        z, y, x = raw.shape
        z_out = z - before - after
        if z_out <= 0:
            raise InvalidArgumentError(
                f"raw block of {z} slices leaves nothing to predict inside the z margin "
                f"({before}, {after})",
                field="raw",
            )
        # Slices beyond the widest window are never seen by a network: drop them early.
        raw = raw[before - need : z - after + need]
        before = after = need
        stack = _pad_to_multiple(self.card.normalize(raw), self.card.input_multiple)
        weight_sum = sum(self._weights)
        with torch.inference_mode():
            data = torch.from_numpy(np.ascontiguousarray(stack)).to(self.device)
            # Accumulated in place into the first prediction: no zeroed buffers, and a
            # single member under the identity costs no pass over the block at all.
            total: torch.Tensor | None = None
            for member, weight in zip(self._members, self._weights, strict=True):
                if weight <= 0:
                    continue
                acc: torch.Tensor | None = None
                for v in member.variations:
                    pred = invert_variation(
                        self._predict_variation(member, data, v, before, after, cancelled), v
                    )
                    acc = pred if acc is None else acc.add_(pred)
                if acc is None:  # a speed level lists at least one variation
                    continue
                scale = weight / len(member.variations) / weight_sum
                if scale != 1.0:
                    acc = acc.mul_(scale)
                total = acc if total is None else total.add_(acc)
            if total is None:  # not reached: __init__ weighs all equally when none is positive
                raise InvalidArgumentError(
                    "no ensemble member has a positive weight", field="members"
                )
            out = total[:, :y, :x].cpu().numpy()
        return np.ascontiguousarray(out, dtype=np.float32)

    def _predict_variation(
        self,
        member: _Member,
        data: torch.Tensor,
        v: int,
        before: int,
        after: int,
        cancelled: StopFlag | None,
    ) -> torch.Tensor:
        stack = apply_variation(data, v)
        z = stack.shape[0]
        # The predicted slices, in the varied stack's own z order.
        lo, hi = (after, z - before) if v > 8 else (before, z - after)
        k = member.frames // 2
        # windows[j] holds slices j .. j+frames-1 (centre j+k) as (Y, X, frames).
        windows = stack.unfold(0, member.frames, 1)
        out = torch.empty((hi - lo, *stack.shape[1:]), dtype=torch.float32, device=self.device)
        for start in range(lo, hi, self.batch_size):
            if cancelled is not None and cancelled.is_set():
                raise CancelledError("prediction cancelled")
            stop = min(start + self.batch_size, hi)
            batch = windows[start - k : stop - k].permute(0, 3, 1, 2).contiguous()
            with self._autocast():
                logits = member.net(batch)
            if (
                logits.ndim != 4
                or logits.shape[0] != batch.shape[0]
                or tuple(logits.shape[2:]) != tuple(batch.shape[2:])
            ):
                raise InvalidArgumentError(
                    f"member {member.name!r} returned logits of shape {tuple(logits.shape)} for "
                    f"input {tuple(batch.shape)}; expected (B, classes, Y, X)",
                    field="model",
                )
            out[start - lo : stop - lo] = foreground_probability(logits)
        return out

    def read_box(self, block: Block) -> Box:
        """The box to read for ``block``: its read box in y/x; in z the core and exactly the
        context the members need (slices of a z halo beyond it are never seen by a network,
        so they are not read)."""
        core, read = block.core, block.read
        if not read.contains(core):
            raise InvalidArgumentError(
                f"read box {read} does not contain the core {core}", field="block"
            )
        need = self.z_context
        return Box((core.start[0] - need, *read.start[1:]), (core.stop[0] + need, *read.stop[1:]))

    def predict_core(
        self, raw: np.ndarray, core: Box, read: Box, *, cancelled: StopFlag | None = None
    ) -> np.ndarray:
        """Predict ``raw`` (the voxels of ``read``) and return the ``core`` (float32)."""
        if tuple(raw.shape) != read.shape or not read.contains(core):
            raise InvalidArgumentError(
                f"raw block of shape {list(raw.shape)} does not match the read box {read} "
                f"around the core {core}",
                field="block",
            )
        before, after = core.start[0] - read.start[0], read.stop[0] - core.stop[0]
        pred = self.predict_padded(raw, z_margin=(before, after), cancelled=cancelled)
        inner = core.relative_to(read)
        return pred[:, inner[1], inner[2]]

    def predict_block(
        self,
        input_array: ReadableArray,
        block: Block,
        *,
        cancelled: StopFlag | None = None,
    ) -> np.ndarray:
        """Read the block (one read, mirror-padded), predict, return the core (float32).

        A read box with less z context than the members need is widened in z.
        """
        read = self.read_box(block)
        raw = read_padded(input_array, read)
        return self.predict_core(raw, block.core, read, cancelled=cancelled)


def whole_volume_block(shape: Sequence[int], halo: Sequence[int]) -> Block:
    """One block covering a whole volume with ``halo`` of mirrored context."""
    core = Box.from_shape(shape)
    return Block((0,) * len(core.start), core, core.grow(halo))
