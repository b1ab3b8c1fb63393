"""Losses and learning-rate schedules a recipe chooses from.

Losses (``loss``):

- ``ce``: softmax cross-entropy, class-weighted when ``class_balance`` is on
  (Caffe's SoftmaxWithLoss as CDeep3M uses it, balanced).
- ``ce_dice``: the same cross-entropy plus a soft Dice loss over the foreground
  classes, computed over the whole batch. Dice scores the overlap directly, so it
  does not reward painting every uncertain pixel background; CE keeps gradients
  well-behaved where Dice alone is flat.

Schedules (``schedule``) give a factor of the base learning rate at a fraction of
the run (iterations done / iterations, or elapsed / budget under a time budget):

- ``poly``: CDeep3M's Caffe policy ``(1 − f)^power``.
- ``cosine``: ``(1 + cos(π f)) / 2``.
- ``onecycle``: a linear warm-up over the first ``WARMUP`` of the run, then cosine
  down to zero (Smith's one-cycle, without the momentum cycle).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Loss = Literal["ce", "ce_dice"]
Schedule = Literal["poly", "cosine", "onecycle"]
LOSSES: tuple[str, ...] = ("ce", "ce_dice")
SCHEDULES: tuple[str, ...] = ("poly", "cosine", "onecycle")
WARMUP = 0.1
_WARMUP_START = 0.04  # first step's factor: a cold start at the peak rate diverges


def training_loss(
    kind: str, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """The loss of ``logits`` (B, C, Y, X) against class ``labels`` (B, Y, X)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, labels, weight=weights)
    if kind == "ce":
        return ce
    if kind != "ce_dice":
        raise ValueError(f"unknown loss {kind!r}; choose from {list(LOSSES)}")
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)
    dice = (2 * intersection + 1.0) / (probs.sum(dims) + onehot.sum(dims) + 1.0)
    return ce + (1.0 - dice).mean()


def lr_factor(schedule: str, fraction: float, power: float = 0.8) -> float:
    """Factor of the base learning rate at ``fraction`` (0…1) of the run."""
    f = min(max(fraction, 0.0), 1.0)
    if schedule == "poly":
        return float((1.0 - f) ** power)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * f))
    if schedule == "onecycle":
        if f < WARMUP:
            return _WARMUP_START + (1.0 - _WARMUP_START) * f / WARMUP
        return 0.5 * (1.0 + math.cos(math.pi * (f - WARMUP) / (1.0 - WARMUP)))
    raise ValueError(f"unknown schedule {schedule!r}; choose from {list(SCHEDULES)}")
